"""The messages between ``AdaQuant`` and ``adaquant_mod``: every key, written and read here.

The strategy (server side), the mod (node side) and the runner's Flower
engine build and take apart their messages only through this module, so they
cannot disagree about the layout. Every key, record and metric adaquantfl
adds starts with ``aq-``; the user's keys are never written.

Train instruction (server -> node): the inner strategy's message, with these
keys added to a per-node copy of its ConfigRecord (:class:`Instruction`)::

    aq-levels               int   this node's levels s_k; 0 means full precision (raw float32)
    aq-seed                 int   run seed of every derived random stream
    aq-round                int   0-based round index (FedServer.round_idx)
    aq-compressor           str   the compressor's registry name (COMPRESSORS), e.g. "qsgd"
    aq-compressor-options   str   its options as JSON (Compressor.to_config()["options"])
    aq-error-feedback       int   1: the node adds its residual and keeps the new one
    aq-uncompressed         str   JSON list of the arrays that travel beside the update
    aq-probe                int   1: only report the client id, do not train (no arrays)

With a compressed downlink (:mod:`adaquantfl.flower.downlink`) also::

    aq-downlink             str   the downlink compressor's registry name
    aq-downlink-options     str   its options as JSON
    aq-downlink-levels      int   its levels; 0: a raw float32 change
    aq-downlink-base        int   the round of the model the node must hold before it
                                  applies the changes; -1: the full model is sent
    aq-layout               str   with the full model: the model's arrays (ArrayLayout JSON)

and the instruction's ArrayRecord holds, instead of the model's float arrays,
``aq-model`` (the full ``x_k``, a raw float32 codec message) or
``aq-change-0``, ``aq-change-1``, ... (the change messages, oldest first),
plus the side arrays as always.

The JSON values (``aq-compressor-options``, ``aq-downlink-options``,
``aq-uncompressed``, ``aq-layout``) are read with
:func:`~adaquantfl.flower.layout.read_json`, which refuses, with a
:class:`RecordError` naming the key, JSON nested deeper than 32 levels or
longer than the key's limit (64 KiB of options, 16 MiB of names or layout)
before ``json.loads`` sees it.

Train reply (node -> server), built by ``adaquant_mod``::

    <the instruction's ArrayRecord name>: ArrayRecord
        "aq-payload": the codec's bytes, unchanged:
                      Array(dtype="uint8", shape=(n,), stype=PAYLOAD_STYPE)
        <each array that travels beside the update>: the node's .npy array
    <the train function's MetricRecord name>: MetricRecord
        the train function's own metrics, untouched (num-examples, train_loss, ...)
        aq-client-id      int    the node's client id (its partition-id)
        aq-loss           float  what the level policy is fed: F_i(w_k) from
                                 "pre-train-loss", or the "train_loss" stand-in
        aq-loss-proxy     int    1: aq-loss is the train_loss stand-in
        aq-update-norm    float  ||v||_2 of the vector the node compressed
        aq-distortion     float  ||C(v) - v||^2 / ||v||^2

A probe's reply is one MetricRecord ``"metrics"`` with ``aq-client-id``.

What a node keeps between messages, in its ``Context.state`` (the records
``aq-client-state`` and ``aq-node-state``), is :mod:`adaquantfl.flower.mod`'s.

The node rebuilds a compressor from the registry by name, so a compressor
of the user's own must be registered (its module imported) in the ClientApp too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from adaquantfl.compression.compressor import Compressor, compressor_from_config
from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.fl.client import ClientReply
from adaquantfl.flower.layout import MAX_LAYOUT_CHARS, ArrayLayout, RecordError, read_json
from adaquantfl.validation import as_int, check_int, is_real

__all__ = [
    "PRE_TRAIN_LOSS_KEY",
    "DownlinkInstruction",
    "Instruction",
    "MissingModError",
    "RecordError",
    "TrainReply",
    "add_plans",
    "read_downlink_arrays",
    "read_probe_reply",
    "read_train_reply",
    "train_reply_content",
]

# --------------------------------------------------------------------------- keys

#: Every record, key and metric that adaquantfl adds starts with this.
PREFIX = "aq-"
# The train instruction's plan (ConfigRecord).
LEVELS_KEY = "aq-levels"
SEED_KEY = "aq-seed"
ROUND_KEY = "aq-round"
COMPRESSOR_KEY = "aq-compressor"
COMPRESSOR_OPTIONS_KEY = "aq-compressor-options"
ERROR_FEEDBACK_KEY = "aq-error-feedback"
UNCOMPRESSED_KEY = "aq-uncompressed"
PROBE_KEY = "aq-probe"
DOWNLINK_KEY = "aq-downlink"
DOWNLINK_OPTIONS_KEY = "aq-downlink-options"
DOWNLINK_LEVELS_KEY = "aq-downlink-levels"
DOWNLINK_BASE_KEY = "aq-downlink-base"
LAYOUT_KEY = "aq-layout"
# The downlink's Arrays in the train instruction's ArrayRecord.
MODEL_KEY = "aq-model"
CHANGE_PREFIX = "aq-change-"
# The train reply.
PAYLOAD_KEY = "aq-payload"
#: The payload Array's serialisation type: the bytes are a v1 message of
#: adaquantfl.compression.codec, not a .npy file (``Array(ndarray)`` would add a
#: 128-byte .npy header).
PAYLOAD_STYPE = "adaquantfl.codec.v1"
METRICS_RECORD = "metrics"
CLIENT_ID_KEY = "aq-client-id"
#: The level policy's input from one node: F_i(w_k), or the train_loss stand-in.
LOSS_KEY = "aq-loss"
#: 1 when ``aq-loss`` is the train function's training-loss stand-in, not ``pre-train-loss``.
LOSS_PROXY_KEY = "aq-loss-proxy"
UPDATE_NORM_KEY = "aq-update-norm"
DISTORTION_KEY = "aq-distortion"
# The user's metrics that adaquantfl reads (never writes).
#: F_i(w_k): the mean training loss of the received model, before training.
PRE_TRAIN_LOSS_KEY = "pre-train-loss"
#: The training-loss metric of Flower's app templates (and of Flower's ``QFedAvg``).
FLOWER_TRAIN_LOSS_KEY = "train_loss"
#: Flower's usual weighting key (FedAvg's ``weighted_by_key`` default).
NUM_EXAMPLES_KEY = "num-examples"
# The records of the node's Context.state (kept by adaquantfl.flower.mod).
CLIENT_STATE_RECORD = "aq-client-state"
NODE_STATE_RECORD = "aq-node-state"

_INT64_MAX = 2**63 - 1
#: The longest JSON a compressor's options may be in a train config (characters).
MAX_OPTIONS_CHARS = 2**16

# --------------------------------------------------------------------------- errors

MISSING_MOD_HINT = (
    "the node's ClientApp does not run adaquant_mod: add it, "
    "`ClientApp(mods=[adaquant_mod])` with `from adaquantfl.flower import adaquant_mod`"
)
#: How a reply without a payload is recorded among a round's failures.
NO_MOD_REASON = "no adaquant_mod on the node (its reply holds the model's own arrays)"


class MissingModError(RecordError):
    """A train reply holds the model's own arrays: the node runs no ``adaquant_mod``."""


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


# --------------------------------------------------------------------------- train instruction


@dataclass(frozen=True)
class DownlinkInstruction:
    """The part of an :class:`Instruction` that says how a node rebuilds a compressed model.

    Attributes
    ----------
    compressor : Compressor
        Decodes the change messages (:func:`adaquantfl.fl.downlink.apply_change`).
    levels : int or None
        Their levels (None: raw float32 changes).
    base : int or None
        The round of the model the node must hold before it applies the
        change messages; None: the message carries the full model instead.
    layout : ArrayLayout or None
        The model's arrays, sent with the full model (the node keeps it).
    """

    compressor: Compressor
    levels: int | None
    base: int | None
    layout: ArrayLayout | None = None


@dataclass(frozen=True)
class Instruction:
    """What one node is asked in a round: its part of the server's plan, as its message carries it.

    The server opens a round with a :class:`~adaquantfl.fl.downlink.RoundPlan`;
    each node's train message carries that node's levels, the run's seed and
    compressor and, with a compressed downlink, how to rebuild the model, as
    the ``aq-*`` keys of its ConfigRecord (:meth:`to_config`, :meth:`from_config`).
    """

    levels: int | None
    seed: int
    round_idx: int
    compressor: Compressor
    probe: bool = False
    uncompressed: tuple[str, ...] = ()
    downlink: DownlinkInstruction | None = None

    def to_config(self) -> dict[str, int | str]:
        """The ``aq-*`` entries of a train instruction's ConfigRecord."""
        config = describe_compressor(self.compressor)
        out: dict[str, int | str] = {
            LEVELS_KEY: 0 if self.levels is None else self.levels,
            SEED_KEY: self.seed,
            ROUND_KEY: self.round_idx,
            COMPRESSOR_KEY: config["compressor"],
            COMPRESSOR_OPTIONS_KEY: json.dumps(config["options"], sort_keys=True),
            ERROR_FEEDBACK_KEY: int(bool(config.get("error_feedback"))),
            UNCOMPRESSED_KEY: json.dumps(list(self.uncompressed)),
            PROBE_KEY: int(self.probe),
        }
        if self.downlink is not None:
            down = describe_compressor(self.downlink.compressor)
            out[DOWNLINK_KEY] = down["compressor"]
            out[DOWNLINK_OPTIONS_KEY] = json.dumps(down["options"], sort_keys=True)
            out[DOWNLINK_LEVELS_KEY] = self.downlink.levels or 0
            out[DOWNLINK_BASE_KEY] = -1 if self.downlink.base is None else self.downlink.base
            if self.downlink.layout is not None:
                out[LAYOUT_KEY] = self.downlink.layout.to_json()
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Instruction:
        """Read and validate the plan; raises :class:`RecordError` naming the bad key."""
        levels = _int(config, LEVELS_KEY, 0, MAX_LEVELS)
        downlink = None
        if DOWNLINK_KEY in config:
            base = _int(config, DOWNLINK_BASE_KEY, -1, _INT64_MAX)
            layout = _str(config, LAYOUT_KEY) if LAYOUT_KEY in config else None
            downlink = DownlinkInstruction(
                compressor=_compressor(config, DOWNLINK_KEY, DOWNLINK_OPTIONS_KEY, 0),
                levels=_int(config, DOWNLINK_LEVELS_KEY, 0, MAX_LEVELS) or None,
                base=None if base < 0 else base,
                layout=None
                if layout is None
                else ArrayLayout.from_json(layout, f"train config {LAYOUT_KEY!r}"),
            )
        return cls(
            levels=levels or None,
            seed=_int(config, SEED_KEY, -_INT64_MAX - 1, _INT64_MAX),
            round_idx=_int(config, ROUND_KEY, 0, _INT64_MAX),
            compressor=_compressor(
                config,
                COMPRESSOR_KEY,
                COMPRESSOR_OPTIONS_KEY,
                _int(config, ERROR_FEEDBACK_KEY, 0, 1),
            ),
            probe=bool(config.get(PROBE_KEY, 0)),
            uncompressed=_names(config.get(UNCOMPRESSED_KEY, "[]")),
            downlink=downlink,
        )

    @classmethod
    def of(cls, msg: Message) -> Instruction | None:
        """The plan of a train instruction; None for any other message (the mod stays out).

        Raises
        ------
        RecordError
            If the message carries a plan with a bad value.
        """
        if not msg.has_content() or msg.metadata.message_type.split(".", 1)[0] != "train":
            return None
        for config in msg.content.config_records.values():
            if LEVELS_KEY in config:
                return cls.from_config(config)
        return None


def plan_config(base: ConfigRecord, plan: Instruction) -> ConfigRecord:
    """A fresh ConfigRecord: the inner strategy's train config plus the node's plan."""
    config = ConfigRecord(dict(base))
    for key, value in plan.to_config().items():
        config[key] = value
    return config


def add_plans(
    messages: Sequence[Message],
    strategy: object,
    plans: Mapping[int, Instruction],
    downlinks: Mapping[int, ArrayRecord],
) -> None:
    """Give each of the inner strategy's train messages its node's plan (and downlink arrays).

    The plan goes into a copy of the message's ConfigRecord (the strategy's
    ``configrecord_key``, or its only one); with a compressed downlink the
    ArrayRecord (``arrayrecord_key``, or the only one) is replaced by the
    node's downlink record. Flower's FedAvg gives all its messages one
    RecordDict, so each gets a new one.
    """
    for msg in messages:
        node = msg.metadata.dst_node_id
        content = RecordDict(dict(msg.content.items()))
        if node in downlinks:
            arrays_name = _record_name(strategy, content.array_records, "arrayrecord_key", None)
            content[arrays_name] = downlinks[node]
        config_name = _record_name(strategy, content.config_records, "configrecord_key", "config")
        base = content.config_records.get(config_name, ConfigRecord())
        content[config_name] = plan_config(base, plans[node])
        msg.content = content


def _record_name(
    strategy: object, records: Mapping[str, object], attribute: str, default: str | None
) -> str:
    """The name of the strategy's record of a kind: its ``*_key`` setting, or the only one."""
    name = getattr(strategy, attribute, None)
    if isinstance(name, str) and (name in records or default is not None):
        return name
    if len(records) == 1:
        return str(next(iter(records)))
    if default is not None and not records:
        return default
    kind = "ArrayRecord" if attribute.startswith("array") else "ConfigRecord"
    raise RuntimeError(
        f"the inner strategy's train message must carry one {kind}, found {sorted(records)}"
    )


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
            f"compressor must be a compressor of adaquantfl.compression (e.g. QSGDCompressor()) "
            f"with to_config(), got {type(compressor).__name__} {compressor!r}"
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


_COMPRESSOR_CACHE: dict[tuple[str, str, int], Compressor] = {}


def _compressor(
    config: Mapping[str, object], name_key: str, options_key: str, error_feedback: int
) -> Compressor:
    """The compressor a plan names, rebuilt from the registry (cached per process)."""
    name, options_json = _str(config, name_key), _str(config, options_key)
    key = (name, options_json, error_feedback)
    cached = _COMPRESSOR_CACHE.get(key)
    if cached is not None:
        return cached
    options = read_json(options_json, f"train config {options_key!r}", max_chars=MAX_OPTIONS_CHARS)
    try:
        compressor: Compressor = compressor_from_config({"compressor": name, "options": options})
    except ValueError as exc:
        raise RecordError(f"bad compressor settings in the train config: {exc}") from None
    if error_feedback:
        compressor = ErrorFeedback(compressor)
    if len(_COMPRESSOR_CACHE) > 64:
        _COMPRESSOR_CACHE.clear()
    _COMPRESSOR_CACHE[key] = compressor
    return compressor


def _int(config: Mapping[str, object], key: str, low: int, high: int) -> int:
    return check_int(f"train config {key!r}", config.get(key), low, high, error=RecordError)


def _number(metrics: MetricRecord, key: str) -> float:
    """A reply's metric as a number (its range is the server's to judge, with a reason)."""
    value = metrics.get(key)
    if not is_real(value):
        raise RecordError(f"a train reply's {key!r} must be a number, got {value!r:.80}")
    return value  # type: ignore[return-value]


def _str(config: Mapping[str, object], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str):
        raise RecordError(f"train config {key!r} must be a string, got {value!r}")
    return value


def _names(value: object) -> tuple[str, ...]:
    what = f"train config {UNCOMPRESSED_KEY!r}"
    names = read_json(value, what, max_chars=MAX_LAYOUT_CHARS) if isinstance(value, str) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecordError(f"train config {UNCOMPRESSED_KEY!r} must be a JSON list of names")
    return tuple(names)


def probe_message(plan: Instruction, node: int, config_key: str) -> Message:
    """A probe for ``node``: the plan with ``aq-probe`` = 1 and no arrays."""
    config = plan_config(ConfigRecord(), replace(plan, probe=True))
    return Message(
        content=RecordDict({config_key: config}), message_type=MessageType.TRAIN, dst_node_id=node
    )


# --------------------------------------------------------------------------- downlink arrays


def downlink_arrays(full: bytes | None, changes: Sequence[bytes] = ()) -> dict[str, Array]:
    """The downlink's Arrays: the full model ``x_k``, or the change messages, oldest first."""
    if full is not None:
        return {MODEL_KEY: payload_array(full)}
    return {f"{CHANGE_PREFIX}{i}": payload_array(change) for i, change in enumerate(changes)}


def read_downlink_arrays(record: ArrayRecord, side: Sequence[str]) -> list[bytes]:
    """The downlink's messages in a train instruction's ArrayRecord.

    ``[x_k]`` when the record holds the full model, else the change messages,
    oldest first.

    Raises
    ------
    RecordError
        If the record holds neither, skips a change message, or holds other
        arrays than those and the ``side`` arrays.
    """
    keys = set(record.keys())
    if MODEL_KEY in keys:
        carried = [MODEL_KEY]
    else:
        count = sum(k.startswith(CHANGE_PREFIX) for k in keys)
        if count == 0:
            raise RecordError(f"the downlink sent neither {MODEL_KEY!r} nor change messages")
        carried = [f"{CHANGE_PREFIX}{i}" for i in range(count)]
        skipped = [k for k in carried if k not in keys]
        if skipped:
            raise RecordError(f"the downlink's change messages skip {skipped[0]!r}")
    expected = {*carried, *side}
    if keys != expected:
        raise RecordError(
            f"the downlink's ArrayRecord holds {sorted(keys)}, expected {sorted(expected)}"
        )
    return [payload_bytes(record[k]) for k in carried]


# --------------------------------------------------------------------------- train reply


def train_reply_content(
    names: tuple[str, str],
    payload: bytes,
    side: Mapping[str, Array],
    metrics: MetricRecord,
    *,
    client_id: int,
    loss: float,
    loss_proxy: bool,
    update_norm: float,
    distortion: float,
) -> RecordDict:
    """The mod's train reply: the payload and side arrays, the user's metrics plus ``aq-*``.

    ``names``: the ArrayRecord's and the MetricRecord's names (the
    instruction's and the train function's).
    """
    out = MetricRecord(dict(metrics))
    out[CLIENT_ID_KEY] = client_id
    out[LOSS_KEY] = loss
    out[LOSS_PROXY_KEY] = int(loss_proxy)
    out[UPDATE_NORM_KEY] = update_norm
    out[DISTORTION_KEY] = distortion
    arrays = ArrayRecord({PAYLOAD_KEY: payload_array(payload), **side})
    return RecordDict({names[0]: arrays, names[1]: out})


@dataclass(frozen=True)
class TrainReply:
    """A train reply taken apart.

    Attributes
    ----------
    reply : ClientReply
        What :meth:`~adaquantfl.fl.server.FedServer.aggregate` judges.
    side : dict of name -> Array
        The arrays that travelled beside the update, checked against the layout.
    metrics : MetricRecord
        The train function's own metrics (no ``aq-`` keys).
    arrays_name, metrics_name : str
        The names of the reply's ArrayRecord and MetricRecord.
    side_bytes : int
        Bytes of the side arrays as Flower carried them.
    loss_proxy : bool
        Whether the node reported the ``train_loss`` stand-in as its loss.
    """

    reply: ClientReply
    side: dict[str, Array]
    metrics: MetricRecord
    arrays_name: str
    metrics_name: str
    side_bytes: int
    loss_proxy: bool = False


def read_train_reply(content: RecordDict, layout: ArrayLayout) -> TrainReply:
    """Take an ``adaquant_mod`` train reply apart and check its layout and side arrays.

    One ArrayRecord holding the payload Array and exactly the model's side
    arrays (checked: dtype, shape, the .npy header before any allocation,
    finite values), one MetricRecord with the mod's keys, nothing else.
    Whether the payload decodes, has the right size and levels, and whether
    the loss and ``n_i`` are acceptable is :meth:`FedServer.aggregate`'s to judge.

    Raises
    ------
    MissingModError
        If the reply holds arrays of the model and no payload: the node's
        ClientApp runs no ``adaquant_mod``.
    RecordError
        For any other deviation from the layout.
    """
    if content.config_records:
        raise RecordError(
            f"a train reply must not carry ConfigRecords, found {sorted(content.config_records)}"
        )
    arrays_name, arrays = single_array_record(content, "a train reply")
    keys = set(arrays.keys())
    if PAYLOAD_KEY not in keys and keys & set(layout.names):
        shown = sorted(keys)[:4] + (["..."] if len(keys) > 4 else [])
        raise MissingModError(
            f"the reply holds the model's own arrays ({', '.join(shown)}), not an adaquantfl "
            f"payload: {MISSING_MOD_HINT}"
        )
    if keys != {PAYLOAD_KEY, *layout.side}:
        # Only the payload is size-checked and decoded, and the side arrays
        # against the model: anything else would be carried and never looked at.
        expected = sorted({PAYLOAD_KEY, *layout.side})
        raise RecordError(
            f"a train reply's ArrayRecord must hold only {expected}, found {sorted(keys)}"
        )
    payload = payload_bytes(arrays[PAYLOAD_KEY])
    metrics_name, metrics = single_metric_record(content, "a train reply")
    # Types only: the ranges are FedServer's to judge (fl.guard), with a reason.
    client_id = check_int(f"a train reply's {CLIENT_ID_KEY!r}", metrics.get(CLIENT_ID_KEY),
                          error=RecordError)  # fmt: skip
    loss = _number(metrics, LOSS_KEY)
    n = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    n = check_int(f"a train reply's {NUM_EXAMPLES_KEY!r}", n, error=RecordError)
    measured = {
        key: None if metrics.get(key) is None else _number(metrics, key)
        for key in (UPDATE_NORM_KEY, DISTORTION_KEY)
    }
    side = layout.side_arrays({name: arrays[name] for name in layout.side}, trusted=False)
    return TrainReply(
        reply=ClientReply(
            client_id=client_id,
            payload=payload,
            loss=float(loss),
            num_examples=n,
            update_norm=measured[UPDATE_NORM_KEY],
            distortion=measured[DISTORTION_KEY],
        ),
        side=side,
        metrics=user_metrics(metrics),
        arrays_name=arrays_name,
        metrics_name=metrics_name,
        side_bytes=sum(len(a.data) for a in side.values()),
        loss_proxy=bool(metrics.get(LOSS_PROXY_KEY)),
    )


def probe_reply_content(client_id: int) -> RecordDict:
    """The mod's answer to a probe: its client id, nothing else."""
    return RecordDict({METRICS_RECORD: MetricRecord({CLIENT_ID_KEY: client_id})})


def read_probe_reply(content: RecordDict) -> int:
    """The client id a probe's reply names; raises :class:`RecordError` without one."""
    _, metrics = single_metric_record(content, "a probe reply")
    client_id = as_int(metrics.get(CLIENT_ID_KEY))
    if client_id is None:
        raise RecordError(
            f"the reply does not say its client id ({CLIENT_ID_KEY!r}): {MISSING_MOD_HINT}"
        )
    return client_id


# --------------------------------------------------------------------------- record helpers


def single_array_record(content: RecordDict, what: str) -> tuple[str, ArrayRecord]:
    """The one ArrayRecord of ``content`` and its name."""
    records = list(content.array_records.items())
    if len(records) != 1:
        raise RecordError(f"{what} must hold exactly one ArrayRecord, found {len(records)}")
    return records[0]


def single_metric_record(content: RecordDict, what: str) -> tuple[str, MetricRecord]:
    """The one MetricRecord of ``content`` and its name."""
    records = list(content.metric_records.items())
    if len(records) != 1:
        raise RecordError(f"{what} must hold exactly one MetricRecord, found {len(records)}")
    return records[0]


def user_metrics(metrics: MetricRecord) -> MetricRecord:
    """``metrics`` without the keys adaquantfl added (``aq-*``)."""
    return MetricRecord({k: v for k, v in metrics.items() if not k.startswith(PREFIX)})


def with_content(msg: Message, content: RecordDict) -> Message:
    """A copy of the message ``msg`` (same sender, same metadata) that carries ``content``."""
    new = copy.copy(msg)
    new.__dict__["_metadata"] = copy.copy(msg.metadata)
    new.content = content
    return new


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
    return check_int("node config 'partition-id'", value, 0, _INT64_MAX, error=RecordError)
