"""A compressed downlink on Flower: what the strategy sends each node, and what the node rebuilds.

:class:`adaquantfl.fl.downlink.Downlink` decides, per round, the compressed
change ``m_k``, the replica ``x_k`` and, for each node, whether it gets
``m_k``, the messages since it last took part (catch-up), or the full model.
On Flower the train instruction's ArrayRecord then holds, instead of the
model's float arrays:

    aq-model                the full x_k as a raw float32 codec message, or
    aq-change-0, -1, ...    the change messages, oldest first,
    <the side arrays>       the model's uncompressed arrays (.npy), as always

(payload Arrays as in :func:`~adaquantfl.flower.records.payload_array`), and the
plan (:class:`~adaquantfl.flower.plan.DownlinkPlan`) names the compressor and the
round the node's replica must be of. ``adaquant_mod`` keeps the replica in
``Context.state``, applies the messages with
:func:`adaquantfl.fl.downlink.apply_change` (the server's own function, so the
same bits), and hands the train function ``x_k`` in the model's arrays.
``downlink_bits`` is 8 x the bytes of the Arrays sent.

Notes
-----
The strategy keys the downlink by node id, not client id: it must know what
each node holds before it knows the node's client id. A node that did not
deliver an accepted reply (no reply, an error, a rejected reply) is sent the
full model the next time: it may not hold ``x_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, Context

from adaquantfl.compression.codec import decode_dense, message_bytes
from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.downlink import Downlink, apply_change
from adaquantfl.fl.server import FedServer
from adaquantfl.flower.layout import ArrayLayout, record_bytes
from adaquantfl.flower.node_state import Replica, load_replica, store_replica
from adaquantfl.flower.plan import DownlinkPlan
from adaquantfl.flower.records import RecordError, payload_array, payload_bytes

__all__ = [
    "CHANGE_PREFIX",
    "MODEL_KEY",
    "DownlinkSender",
    "NodeDownlink",
    "receive_model",
    "send_model",
]

MODEL_KEY = "aq-model"
CHANGE_PREFIX = "aq-change-"


@dataclass(frozen=True)
class NodeDownlink:
    """What one node is sent in a round: its ArrayRecord, its plan, and the bytes."""

    record: ArrayRecord
    plan: DownlinkPlan
    sent_bytes: int


class DownlinkSender:
    """The strategy's side: one :class:`Downlink`, keyed by node id.

    Parameters
    ----------
    compressor : Compressor
        Compresses the change of the model.
    levels : int or None
        Its levels (None: a raw float32 change).
    seed : int
        Run seed of the (seed, round, "downlink") noise stream.
    """

    def __init__(self, compressor: Compressor, levels: int | None, seed: int) -> None:
        self.compressor = compressor
        self.levels = levels
        self.seed = seed
        self.downlink: Downlink | None = None

    def send(
        self,
        params: torch.Tensor,
        round_idx: int,
        nodes: Sequence[int],
        layout: ArrayLayout,
        side: Mapping[str, Array],
    ) -> dict[int, NodeDownlink]:
        """Broadcast round ``round_idx``'s model to ``nodes``: per node, what to send."""
        if self.downlink is None:
            self.downlink = Downlink(layout.numel, self.compressor, self.levels, seed=self.seed)
        downlink = self.downlink
        bases = {n: downlink.synced.get(n) for n in nodes}
        sent = downlink.broadcast(params, round_idx, list(nodes))
        full = set(sent.full)
        full_array = payload_array(downlink.full_model()) if full else None
        out: dict[int, NodeDownlink] = {}
        for node in nodes:
            arrays: dict[str, Array] = {}
            if node in full and full_array is not None:
                arrays[MODEL_KEY] = full_array
                plan = DownlinkPlan(self.compressor, self.levels, None, layout)
            else:
                messages = sent.catch_up.get(node)
                if messages is None:
                    if sent.payload is None:  # pragma: no cover - Downlink sends it after round 0
                        raise RuntimeError("the downlink has no change message for this round")
                    messages = [sent.payload]
                for i, message in enumerate(messages):
                    arrays[f"{CHANGE_PREFIX}{i}"] = payload_array(message)
                plan = DownlinkPlan(self.compressor, self.levels, bases[node])
            payload_bytes_sent = record_bytes(ArrayRecord(arrays))
            arrays.update(side)
            out[node] = NodeDownlink(ArrayRecord(arrays), plan, payload_bytes_sent)
        return out

    def forget(self, node: int) -> None:
        """``node`` may not hold the replica: send it the full model next time."""
        if self.downlink is not None:
            self.downlink.synced.pop(node, None)


def send_model(
    sender: DownlinkSender | None,
    server: FedServer,
    nodes: Sequence[int],
    layout: ArrayLayout,
    arrays: ArrayRecord,
) -> tuple[dict[int, NodeDownlink], int]:
    """What each node is sent this round (nothing to change without a sender), and the bytes.

    Without a compressed downlink the nodes get the inner strategy's float
    arrays, counted as the simulator counts them: the compressed arrays as one
    raw float32 codec message per node. The side arrays are counted as the
    .npy bytes Flower carries.
    """
    side_bytes = len(nodes) * record_bytes(arrays, layout.side)
    if sender is None:
        return {}, len(nodes) * message_bytes(layout.numel, None) + side_bytes
    side = {name: arrays[name] for name in layout.side}
    sent = sender.send(server.params, server.round_idx, nodes, layout, side)
    return sent, sum(d.sent_bytes for d in sent.values()) + side_bytes


def receive_model(
    context: Context, record: ArrayRecord, plan: DownlinkPlan, round_idx: int
) -> tuple[ArrayRecord, torch.Tensor, ArrayLayout]:
    """The node's side: ``x_k`` from the message and the replica in ``Context.state``.

    Returns the model in its own arrays (for the train function), ``x_k`` as
    the flat float32 vector the update is taken against, and the layout.

    Raises
    ------
    RecordError
        If the message does not fit what the node holds (it lost its state,
        or missed a message); the strategy then sends the full model next time.
    """
    if MODEL_KEY in record:
        if plan.layout is None:
            raise RecordError("the full model came without its layout (aq-layout)")
        layout = plan.layout
        params = decode_dense(payload_bytes(record[MODEL_KEY]), expected_numel=layout.numel)
        expected = {MODEL_KEY, *layout.side}
    else:
        held = load_replica(context)
        if held is None or plan.base is None or held.round_idx != plan.base:
            have = "no model" if held is None else f"the model of round {held.round_idx}"
            raise RecordError(
                f"adaquant_mod: the node holds {have}, but the downlink's changes start from "
                f"round {plan.base} (a lost node state?); the server sends the full model next time"
            )
        layout, params = held.layout, held.params
        count = sum(k.startswith(CHANGE_PREFIX) for k in record)
        if count == 0:
            raise RecordError(f"the downlink sent neither {MODEL_KEY!r} nor change messages")
        for i in range(count):
            key = f"{CHANGE_PREFIX}{i}"
            if key not in record:
                raise RecordError(f"the downlink's change messages skip {key!r}")
            params = apply_change(params, payload_bytes(record[key]), plan.compressor, plan.levels)
        expected = {f"{CHANGE_PREFIX}{i}" for i in range(count)} | set(layout.side)
    if set(record.keys()) != expected or not params.numel():
        raise RecordError(
            f"the downlink's ArrayRecord holds {sorted(record.keys())}, expected {sorted(expected)}"
        )
    store_replica(context, Replica(params, round_idx, layout))
    side = {name: record[name] for name in layout.side}
    return layout.to_record(params, side), params, layout
