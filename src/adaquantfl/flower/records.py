"""What AdaQuantFedAvg and adaquant_mod put in Flower's records, and how to read it back.

One module owns every key and conversion, so the strategy (server side), the
mod (client side) and the engine cannot disagree about the message layout.

Train instruction (server -> node), one ``ConfigRecord`` per node::

    aq-levels               int   this node's levels s_k; 0 means full precision (raw float32)
    aq-seed                 int   run seed of every derived random stream
    aq-round                int   0-based round index (FedServer.round_idx)
    aq-compressor           str   the compressor's registry name (COMPRESSORS), e.g. "qsgd"
    aq-compressor-options   str   its options as JSON (Compressor.to_config()["options"])
    aq-error-feedback       int   1: the node adds its residual and keeps the new one
    aq-probe                int   1: only report the client id, do not train (see AdaQuantFedAvg)

Train reply (node -> server)::

    <the instruction's ArrayRecord name>: ArrayRecord {"aq-payload": Array(uint8)}
        the codec's bytes, unchanged: Array(dtype="uint8", shape=(n,), stype=PAYLOAD_STYPE)
    "metrics": MetricRecord {client-id, pre-train-loss, num-examples, aq-update-norm,
                             aq-distortion, ...the user's metrics}

The node rebuilds the compressor from the registry by name, so a compressor
of the user's own must be registered (its module imported) in the ClientApp
too. With error feedback the node keeps its residual in ``Context.state``
(the ``aq-client-state`` ArrayRecord).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from adaquantfl.compression.compressor import Compressor, compressor_from_config
from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.fl.client import ClientReply

__all__ = [
    "CLIENT_ID_KEY",
    "CLIENT_STATE_RECORD",
    "COMPRESSOR_KEY",
    "COMPRESSOR_OPTIONS_KEY",
    "DISTORTION_KEY",
    "ERROR_FEEDBACK_KEY",
    "LEVELS_KEY",
    "LOSS_PROXY_KEY",
    "NUM_EXAMPLES_KEY",
    "PAYLOAD_KEY",
    "PAYLOAD_STYPE",
    "PRE_TRAIN_LOSS_KEY",
    "PROBE_KEY",
    "ROUND_KEY",
    "SEED_KEY",
    "UPDATE_NORM_KEY",
    "ArrayLayout",
    "RecordError",
    "RoundPlan",
    "client_id_of",
    "parse_train_reply",
    "payload_array",
    "payload_bytes",
    "single_array_record",
    "single_metric_record",
]

LEVELS_KEY = "aq-levels"
SEED_KEY = "aq-seed"
ROUND_KEY = "aq-round"
COMPRESSOR_KEY = "aq-compressor"
COMPRESSOR_OPTIONS_KEY = "aq-compressor-options"
ERROR_FEEDBACK_KEY = "aq-error-feedback"
PROBE_KEY = "aq-probe"
UPDATE_NORM_KEY = "aq-update-norm"
DISTORTION_KEY = "aq-distortion"
#: The node's own state (its error-feedback residual) in ``Context.state``.
CLIENT_STATE_RECORD = "aq-client-state"

PAYLOAD_KEY = "aq-payload"
#: The Array's serialisation type: the bytes are a v1 message of adaquantfl.compression.codec,
#: not a .npy file (``Array(ndarray)`` would add a 128-byte .npy header).
PAYLOAD_STYPE = "adaquantfl.codec.v1"
METRICS_RECORD = "metrics"
CLIENT_ID_KEY = "client-id"
#: F_i(w_k): mean training loss of the received model on the local data, before training.
PRE_TRAIN_LOSS_KEY = "pre-train-loss"
#: Set to 1 by the mod when the loss it sent is the train function's training-loss
#: fallback, not ``pre-train-loss`` (see :mod:`adaquantfl.flower.mod`).
LOSS_PROXY_KEY = "aq-loss-proxy"
#: Flower's usual weighting key (FedAvg's ``weighted_by_key`` default).
NUM_EXAMPLES_KEY = "num-examples"

_INT64_MAX = 2**63 - 1


class RecordError(ValueError):
    """A Flower record does not have the layout this module describes; the text says why."""


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a node in one round (the ``aq-*`` config keys)."""

    levels: int | None
    seed: int
    round_idx: int
    compressor: Compressor
    probe: bool = False

    def to_config(self) -> dict[str, int | str]:
        """The ``aq-*`` entries of a train instruction's ConfigRecord."""
        config = describe_compressor(self.compressor)
        return {
            LEVELS_KEY: 0 if self.levels is None else self.levels,
            SEED_KEY: self.seed,
            ROUND_KEY: self.round_idx,
            COMPRESSOR_KEY: config["compressor"],
            COMPRESSOR_OPTIONS_KEY: json.dumps(config["options"], sort_keys=True),
            ERROR_FEEDBACK_KEY: int(bool(config.get("error_feedback"))),
            PROBE_KEY: int(self.probe),
        }

    @staticmethod
    def present(config: Mapping[str, object]) -> bool:
        """Whether ``config`` carries an AdaQuantFL plan (else the mod stays out of the way)."""
        return LEVELS_KEY in config

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RoundPlan:
        """Read and validate the plan; raises :class:`RecordError` naming the bad key."""
        levels = _int(config, LEVELS_KEY, 0, MAX_LEVELS)
        return cls(
            levels=levels or None,
            seed=_int(config, SEED_KEY, -_INT64_MAX - 1, _INT64_MAX),
            round_idx=_int(config, ROUND_KEY, 0, _INT64_MAX),
            compressor=_compressor(
                _str(config, COMPRESSOR_KEY),
                _str(config, COMPRESSOR_OPTIONS_KEY),
                _int(config, ERROR_FEEDBACK_KEY, 0, 1),
            ),
            probe=bool(config.get(PROBE_KEY, 0)),
        )


_COMPRESSOR_CACHE: dict[tuple[str, str, int], Compressor] = {}


def _compressor(name: str, options_json: str, error_feedback: int) -> Compressor:
    """The compressor a plan names, rebuilt from the registry (cached per process)."""
    key = (name, options_json, error_feedback)
    cached = _COMPRESSOR_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        options = json.loads(options_json)
        compressor: Compressor = compressor_from_config({"compressor": name, "options": options})
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise RecordError(f"bad compressor settings in the train config: {exc}") from None
    if error_feedback:
        compressor = ErrorFeedback(compressor)
    if len(_COMPRESSOR_CACHE) > 64:
        _COMPRESSOR_CACHE.clear()
    _COMPRESSOR_CACHE[key] = compressor
    return compressor


def describe_compressor(compressor: Compressor) -> dict[str, Any]:
    """The compressor as plain data a node can rebuild it from (its ``to_config()``).

    Raises
    ------
    ValueError
        If the registry does not rebuild an equal compressor from it (the
        compressor is not registered, or its options do not round-trip).
    """
    to_config = getattr(compressor, "to_config", None)
    if not callable(to_config):
        raise ValueError(
            f"the compressor must have to_config() to be described to the nodes, got "
            f"{type(compressor).__name__}"
        )
    config: dict[str, Any] = to_config()
    rebuilt: Compressor = compressor_from_config(config)
    if config.get("error_feedback"):
        rebuilt = ErrorFeedback(rebuilt)
    if rebuilt != compressor:
        raise ValueError(
            f"{compressor!r} does not round-trip through the compressor registry "
            f"(rebuilt {rebuilt!r}); register its class with @register_compressor"
        )
    return config


def _int(config: Mapping[str, object], key: str, low: int, high: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(
            f"train config {key!r} must be an integer in [{low}, {high}], got {value!r}"
        )
    return value


def _str(config: Mapping[str, object], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str):
        raise RecordError(f"train config {key!r} must be a string, got {value!r}")
    return value


# --------------------------------------------------------------------------- payload


def payload_array(payload: bytes) -> Array:
    """The codec's bytes as a uint8 Array, with nothing added.

    Built from (dtype, shape, stype, data) so that ``Array.data`` is the
    payload itself: ``len(array.data) * 8 == wire_bits`` of the message.
    """
    return Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=bytes(payload))


def payload_bytes(array: Array) -> bytes:
    """The codec bytes carried by ``array``; raises :class:`RecordError` if it is not one."""
    shape = tuple(array.shape)
    if array.stype != PAYLOAD_STYPE or array.dtype != "uint8" or shape != (len(array.data),):
        raise RecordError(
            f"update payload must be Array(dtype='uint8', shape=(len(data),), "
            f"stype={PAYLOAD_STYPE!r}), got dtype={array.dtype!r} shape={shape} "
            f"stype={array.stype!r} with {len(array.data)} bytes"
        )
    return bytes(array.data)


# --------------------------------------------------------------------------- records


def single_array_record(content: RecordDict, what: str) -> tuple[str, ArrayRecord]:
    """The one ArrayRecord of ``content`` and its name."""
    records = list(content.array_records.items())
    if len(records) != 1:
        raise RecordError(f"{what} must hold exactly one ArrayRecord, found {len(records)}")
    return records[0]


def single_metric_record(content: RecordDict, what: str) -> MetricRecord:
    """The one MetricRecord of ``content``."""
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise RecordError(f"{what} must hold exactly one MetricRecord, found {len(records)}")
    return records[0]


def client_id_of(context: Context) -> int:
    """The client id of a node: its ``partition-id`` node config.

    The random streams (minibatches, quantizer noise) and the server's
    aggregation order are keyed by this id, as in the simulator. A node
    without ``partition-id`` falls back to its Flower node id (masked to a
    signed 64-bit integer, which the streams and MetricRecord require).
    """
    value = context.node_config.get("partition-id")
    if value is None:
        return int(context.node_id) & _INT64_MAX
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordError(
            f"node config 'partition-id' must be a non-negative integer, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class ArrayLayout:
    """Names and shapes of a model's arrays: ArrayRecord <-> flat float32 vector.

    The federated loop works on one flat vector (DESIGN §2). Flower carries a
    model as named arrays. The layout is taken from the first ArrayRecord seen
    and every later record must match it exactly.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> ArrayLayout:
        names, shapes = [], []
        for name, array in record.items():
            if array.dtype != "float32":
                raise RecordError(
                    f"array {name!r} has dtype {array.dtype}; the federated loop averages "
                    "float32 parameters only (convert the model to float32, drop buffers)"
                )
            names.append(name)
            shapes.append(tuple(int(d) for d in array.shape))
        if not names:
            raise RecordError("the model's ArrayRecord is empty")
        return cls(tuple(names), tuple(shapes))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, record: ArrayRecord) -> torch.Tensor:
        """The arrays of ``record`` as one flat float32 tensor, in layout order."""
        if tuple(record.keys()) != self.names:
            raise RecordError(
                f"ArrayRecord keys {list(record.keys())} differ from the model's {list(self.names)}"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            array = record[name]
            if array.dtype != "float32" or tuple(int(d) for d in array.shape) != shape:
                raise RecordError(
                    f"array {name!r} is {array.dtype} {tuple(array.shape)}, "
                    f"expected float32 {shape}"
                )
            parts.append(torch.from_numpy(np.ascontiguousarray(array.numpy())).reshape(-1))
        return torch.cat(parts).to(torch.float32)

    def to_record(self, flat: torch.Tensor) -> ArrayRecord:
        """``flat`` as an ArrayRecord of .npy arrays (what a user's train function expects)."""
        if flat.dtype != torch.float32 or flat.numel() != self.numel:
            raise ValueError(
                f"expected a flat float32 tensor of {self.numel} entries, "
                f"got {flat.dtype} with {flat.numel()}"
            )
        values = flat.detach().cpu().numpy()
        arrays: dict[str, Array] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            arrays[name] = Array(values[offset : offset + size].reshape(shape).copy())
            offset += size
        return ArrayRecord(arrays)


def parse_train_reply(content: RecordDict) -> ClientReply:
    """The :class:`ClientReply` carried by an ``adaquant_mod`` train reply.

    Only the layout is checked here: one ArrayRecord holding only the
    payload Array, one MetricRecord with the three keys, nothing else.
    Whether the payload decodes, has the right size and levels, and whether
    the loss and ``n_i`` are acceptable is :meth:`FedServer.aggregate`'s to
    judge (and to report as a rejection).

    Raises
    ------
    RecordError
        If the reply does not have the layout of :mod:`adaquantfl.flower.records`.
    """
    if content.config_records:
        raise RecordError(
            f"a train reply must not carry ConfigRecords, found {sorted(content.config_records)}"
        )
    _, arrays = single_array_record(content, "a train reply")
    if list(arrays.keys()) != [PAYLOAD_KEY]:
        # Only the payload is size-checked and decoded: anything else would be
        # carried, stored and never looked at.
        raise RecordError(
            f"a train reply's ArrayRecord must hold only the {PAYLOAD_KEY!r} array, "
            f"found {sorted(arrays.keys())}"
        )
    payload = payload_bytes(arrays[PAYLOAD_KEY])
    metrics = single_metric_record(content, "a train reply")
    client_id = metrics.get(CLIENT_ID_KEY)
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        raise RecordError(
            f"a train reply's {CLIENT_ID_KEY!r} must be an integer, got {client_id!r}"
        )
    loss = metrics.get(PRE_TRAIN_LOSS_KEY)
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        raise RecordError(f"a train reply's {PRE_TRAIN_LOSS_KEY!r} must be a number, got {loss!r}")
    n = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int):
        raise RecordError(f"a train reply's {NUM_EXAMPLES_KEY!r} must be an integer, got {n!r}")
    measured = {}
    for key in (UPDATE_NORM_KEY, DISTORTION_KEY):
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise RecordError(f"a train reply's {key!r} must be a number, got {value!r}")
        measured[key] = None if value is None else float(value)
    return ClientReply(
        client_id=client_id,
        payload=payload,
        loss=float(loss),
        num_examples=n,
        update_norm=measured[UPDATE_NORM_KEY],
        distortion=measured[DISTORTION_KEY],
    )


def plan_config(base: ConfigRecord, plan: RoundPlan) -> ConfigRecord:
    """A fresh ConfigRecord: the user's train config plus the round's plan."""
    config = ConfigRecord(dict(base))
    for key, value in plan.to_config().items():
        config[key] = value
    return config
