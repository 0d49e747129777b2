"""What a node sends back, and how the strategy reads it: keys, the payload Array, the reply.

Three modules own the message layout, so the strategy (server side), the mod
(client side) and the engine cannot disagree about it: this one (the train
reply and the keys of the metrics), :mod:`adaquantfl.flower.plan` (the train
instruction's ``aq-*`` config) and :mod:`adaquantfl.flower.layout` (which of
the model's arrays are compressed).

Train reply (node -> server), built by ``adaquant_mod``::

    <the instruction's ArrayRecord name>: ArrayRecord
        "aq-payload": the codec's bytes, unchanged:
                      Array(dtype="uint8", shape=(n,), stype=PAYLOAD_STYPE)
        <each array that travels beside the update>: the node's .npy array
                      (BatchNorm statistics, integer buffers; see ArrayLayout)
    "metrics": MetricRecord
        the train function's own metrics, untouched (num-examples, train_loss, ...)
        aq-client-id      int    the node's client id (its partition-id)
        aq-loss           float  what the level policy is fed: F_i(w_k) from
                                 "pre-train-loss", or the "train_loss" stand-in
        aq-loss-proxy     int    1: aq-loss is the train_loss stand-in
        aq-update-norm    float  ||v||_2 of the vector the node compressed
        aq-distortion     float  ||C(v) - v||^2 / ||v||^2

Every key adaquantfl adds starts with ``aq-``; the user's keys are never
written. The strategy hands the inner strategy each accepted reply with its
``aq-`` keys removed.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from adaquantfl.fl.client import ClientReply

__all__ = [
    "CLIENT_ID_KEY",
    "DISTORTION_KEY",
    "LOSS_KEY",
    "LOSS_PROXY_KEY",
    "METRICS_RECORD",
    "MISSING_MOD_HINT",
    "NO_MOD_REASON",
    "NUM_EXAMPLES_KEY",
    "PAYLOAD_KEY",
    "PAYLOAD_STYPE",
    "PREFIX",
    "PRE_TRAIN_LOSS_KEY",
    "UPDATE_NORM_KEY",
    "MissingModError",
    "RecordError",
    "TrainReply",
    "client_id_of",
    "parse_train_reply",
    "payload_array",
    "payload_bytes",
    "read_train_reply",
    "single_array_record",
    "single_metric_record",
    "user_metrics",
    "with_content",
]

#: Every record, key and metric that adaquantfl adds starts with this.
PREFIX = "aq-"
PAYLOAD_KEY = "aq-payload"
#: The Array's serialisation type: the bytes are a v1 message of adaquantfl.compression.codec,
#: not a .npy file (``Array(ndarray)`` would add a 128-byte .npy header).
PAYLOAD_STYPE = "adaquantfl.codec.v1"
METRICS_RECORD = "metrics"
CLIENT_ID_KEY = "aq-client-id"
#: The level policy's input from one node: F_i(w_k), or the train_loss stand-in.
LOSS_KEY = "aq-loss"
#: 1 when ``aq-loss`` is the train function's training-loss stand-in, not
#: ``pre-train-loss`` (see :mod:`adaquantfl.flower.mod`).
LOSS_PROXY_KEY = "aq-loss-proxy"
UPDATE_NORM_KEY = "aq-update-norm"
DISTORTION_KEY = "aq-distortion"
#: The user's metric with F_i(w_k): mean training loss of the received model, before training.
PRE_TRAIN_LOSS_KEY = "pre-train-loss"
#: Flower's usual weighting key (FedAvg's ``weighted_by_key`` default).
NUM_EXAMPLES_KEY = "num-examples"

_INT64_MAX = 2**63 - 1

MISSING_MOD_HINT = (
    "the node's ClientApp does not run adaquant_mod: add it, "
    "`ClientApp(mods=[adaquant_mod])` with `from adaquantfl.flower import adaquant_mod`"
)
#: How a reply without a payload is recorded among a round's failures.
NO_MOD_REASON = "no adaquant_mod on the node (its reply holds the model's own arrays)"


class RecordError(ValueError):
    """A Flower record does not have the layout this module describes; the text says why."""


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


# --------------------------------------------------------------------------- records


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
    """A copy of the reply ``msg`` (same sender, same metadata) that carries ``content``."""
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
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordError(
            f"node config 'partition-id' must be a non-negative integer, got {value!r}"
        )
    return value


# --------------------------------------------------------------------------- the train reply


@dataclass(frozen=True)
class TrainReply:
    """A train reply taken apart.

    Attributes
    ----------
    reply : ClientReply
        What :meth:`~adaquantfl.fl.server.FedServer.aggregate` judges.
    side : dict of name -> Array
        The arrays that travelled beside the update (not yet checked; see
        :meth:`ArrayLayout.side_arrays`).
    metrics : MetricRecord
        The train function's own metrics (no ``aq-`` keys).
    arrays_name, metrics_name : str
        The names of the reply's ArrayRecord and MetricRecord.
    side_bytes : int
        Bytes of the side arrays as Flower carried them.
    """

    reply: ClientReply
    side: dict[str, Array]
    metrics: MetricRecord
    arrays_name: str
    metrics_name: str
    side_bytes: int


def read_train_reply(
    content: RecordDict, side: Collection[str] = (), model_arrays: Collection[str] = ()
) -> TrainReply:
    """Take an ``adaquant_mod`` train reply apart (the layout only).

    One ArrayRecord holding the payload Array and exactly the ``side``
    arrays, one MetricRecord with the mod's keys, nothing else. Whether the
    payload decodes, has the right size and levels, and whether the loss
    and ``n_i`` are acceptable is :meth:`FedServer.aggregate`'s to judge.

    Raises
    ------
    MissingModError
        If the reply holds arrays of the model (``model_arrays``) and no
        payload: the node's ClientApp runs no ``adaquant_mod``.
    RecordError
        For any other deviation from the layout.
    """
    if content.config_records:
        raise RecordError(
            f"a train reply must not carry ConfigRecords, found {sorted(content.config_records)}"
        )
    arrays_name, arrays = single_array_record(content, "a train reply")
    keys = set(arrays.keys())
    if PAYLOAD_KEY not in keys and keys and (not model_arrays or keys & set(model_arrays)):
        shown = sorted(keys)[:4] + (["..."] if len(keys) > 4 else [])
        raise MissingModError(
            f"the reply holds the model's own arrays ({', '.join(shown)}), not an adaquantfl "
            f"payload: {MISSING_MOD_HINT}"
        )
    if keys != {PAYLOAD_KEY, *side}:
        # Only the payload is size-checked and decoded, and the side arrays
        # against the model: anything else would be carried and never looked at.
        expected = sorted({PAYLOAD_KEY, *side})
        raise RecordError(
            f"a train reply's ArrayRecord must hold only {expected}, found {sorted(keys)}"
        )
    payload = payload_bytes(arrays[PAYLOAD_KEY])
    metrics_name, metrics = single_metric_record(content, "a train reply")
    client_id = metrics.get(CLIENT_ID_KEY)
    if isinstance(client_id, bool) or not isinstance(client_id, int):
        raise RecordError(
            f"a train reply's {CLIENT_ID_KEY!r} must be an integer, got {client_id!r}"
        )
    loss = metrics.get(LOSS_KEY)
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        raise RecordError(f"a train reply's {LOSS_KEY!r} must be a number, got {loss!r}")
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
    reply = ClientReply(
        client_id=client_id,
        payload=payload,
        loss=float(loss),
        num_examples=n,
        update_norm=measured[UPDATE_NORM_KEY],
        distortion=measured[DISTORTION_KEY],
    )
    side_arrays = {name: arrays[name] for name in side}
    return TrainReply(
        reply=reply,
        side=side_arrays,
        metrics=user_metrics(metrics),
        arrays_name=arrays_name,
        metrics_name=metrics_name,
        side_bytes=sum(len(a.data) for a in side_arrays.values()),
    )


def parse_train_reply(content: RecordDict, side: Collection[str] = ()) -> ClientReply:
    """The :class:`ClientReply` carried by an ``adaquant_mod`` train reply.

    Raises
    ------
    RecordError
        If the reply does not have the layout of :func:`read_train_reply`.
    """
    return read_train_reply(content, side).reply
