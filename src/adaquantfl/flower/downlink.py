"""A compressed downlink on Flower: what the strategy sends each node, and what the node rebuilds.

:class:`adaquantfl.fl.downlink.Downlink` decides, per round, the compressed
change ``m_k``, the replica ``x_k`` and, for each node, whether it gets
``m_k``, the messages since it last took part (catch-up), or the full model.
On Flower the train instruction's ArrayRecord then holds, instead of the
model's float arrays, the full ``x_k`` (``aq-model``) or the change messages
(``aq-change-0``, ``-1``, ...), beside the side arrays
(:func:`~adaquantfl.flower.messages.downlink_arrays`), and the plan
(:class:`~adaquantfl.flower.messages.DownlinkInstruction`) names the compressor and
the round the node's replica must be of. ``adaquant_mod`` keeps the replica in
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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from adaquantfl.compression.codec import decode_dense, message_bytes
from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.downlink import Downlink, apply_change
from adaquantfl.fl.server import FedServer
from adaquantfl.flower.layout import ArrayLayout, RecordError, record_bytes
from adaquantfl.flower.messages import (
    LAYOUT_KEY,
    MODEL_KEY,
    DownlinkInstruction,
    downlink_arrays,
    read_downlink_arrays,
)

__all__ = ["DownlinkSender", "NodeDownlink", "Replica", "receive_model", "send_model"]


@dataclass(frozen=True)
class NodeDownlink:
    """What one node is sent in a round: its ArrayRecord, its plan, and the bytes."""

    record: ArrayRecord
    plan: DownlinkInstruction
    sent_bytes: int


@dataclass(frozen=True)
class Replica:
    """The downlink model ``x_k`` a node holds, the round it is of, and the model's layout.

    ``arrays`` holds ``x_k`` as float32 ``.npy`` Arrays, one per compressed
    array of the layout (what the node keeps in its ``Context.state``). Where
    the model's array is float32 the train function is handed the same bytes.
    """

    arrays: ArrayRecord
    round_idx: int
    layout: ArrayLayout

    def flat(self) -> torch.Tensor:
        """``x_k`` as a new flat float32 vector."""
        return self.layout.flatten(self.arrays)


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
        self, server: FedServer, nodes: Sequence[int], layout: ArrayLayout, arrays: ArrayRecord
    ) -> dict[int, NodeDownlink]:
        """Broadcast the server's model of this round to ``nodes``: per node, what to send."""
        if self.downlink is None:
            self.downlink = Downlink(layout.numel, self.compressor, self.levels, seed=self.seed)
        downlink = self.downlink
        side = {name: arrays[name] for name in layout.side}
        bases = {n: downlink.synced.get(n) for n in nodes}
        sent = downlink.broadcast(server.params, server.round_idx, list(nodes), server.plan())
        full = set(sent.full)
        full_model = downlink.full_model() if full else None
        out: dict[int, NodeDownlink] = {}
        for node in nodes:
            if node in full and full_model is not None:
                carried = downlink_arrays(full_model)
                plan = DownlinkInstruction(self.compressor, self.levels, None, layout)
            else:
                messages = sent.catch_up.get(node)
                if messages is None:
                    if sent.payload is None:  # pragma: no cover - Downlink sends it after round 0
                        raise RuntimeError("the downlink has no change message for this round")
                    messages = [sent.payload]
                carried = downlink_arrays(None, messages)
                plan = DownlinkInstruction(self.compressor, self.levels, bases[node])
            sent_bytes = record_bytes(ArrayRecord(carried))
            out[node] = NodeDownlink(ArrayRecord({**carried, **side}), plan, sent_bytes)
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
    sent = sender.send(server, nodes, layout, arrays)
    return sent, sum(d.sent_bytes for d in sent.values()) + side_bytes


def receive_model(
    record: ArrayRecord, plan: DownlinkInstruction, round_idx: int, held: Replica | None
) -> tuple[ArrayRecord, Replica]:
    """The node's side: ``x_k`` from the message and the replica the node ``held``.

    Returns the model in its own arrays (for the train function) and the new
    replica (``x_k`` in float32, the model the update is taken against).
    Rebuilding ``x_k`` needs one flat float32 vector, the decoded change
    while it is added (:func:`~adaquantfl.fl.downlink.apply_change` in place),
    and the new replica's bytes, which the train function's float32 arrays
    share: at most twice the model's float32 bytes beside what the node held.

    Raises
    ------
    RecordError
        If the message does not fit what the node holds (it lost its state,
        or missed a message); the strategy then sends the full model next time.
    """
    if MODEL_KEY in record:
        if plan.layout is None:
            raise RecordError(f"the full model came without its layout ({LAYOUT_KEY})")
        layout = plan.layout
        (full,) = read_downlink_arrays(record, layout.side)
        params = decode_dense(full, expected_numel=layout.numel)
    else:
        if held is None or plan.base is None or held.round_idx != plan.base:
            have = "no model" if held is None else f"the model of round {held.round_idx}"
            raise RecordError(
                f"adaquant_mod: the node holds {have}, but the downlink's changes start from "
                f"round {plan.base} (a lost node state?); the server sends the full model next time"
            )
        layout = held.layout
        changes = read_downlink_arrays(record, layout.side)
        params = held.flat()
        for change in changes:
            params = apply_change(params, change, plan.compressor, plan.levels, in_place=True)
    if not params.numel():
        raise RecordError("the downlink's model is empty")
    replica = layout.float32_record(params)
    del params
    model = layout.with_dtypes(replica, {name: record[name] for name in layout.side})
    return model, Replica(replica, round_idx, layout)
