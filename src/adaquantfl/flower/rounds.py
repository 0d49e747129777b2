"""What the strategy keeps of each round, and how it reports the nodes it left out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from adaquantfl.fl.server import RoundOutcome
from adaquantfl.flower.messages import MISSING_MOD_HINT, NO_MOD_REASON

__all__ = [
    "SERVER_METRICS",
    "UNAVAILABLE",
    "FlowerRound",
    "PendingRound",
    "log_exclusions",
    "server_metrics",
    "why_nothing_accepted",
    "with_server_metrics",
]

#: The keys of :func:`server_metrics`, one per figure of a training round.
SERVER_METRICS = (
    "aq-levels",
    "aq-next-levels",
    "aq-wire-bits",
    "aq-formula-bits",
    "aq-downlink-bits",
    "aq-participants",
    "aq-rejected",
    "aq-dropped",
    "aq-loss",
    "aq-distortion",
    "aq-time-s",
)

#: Error codes with which Flower reports that a node never answered (as
#: opposed to a ClientApp that answered with an exception).
UNAVAILABLE = frozenset(
    {
        ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        ErrorCode.NODE_UNAVAILABLE,
    }
)


@dataclass(frozen=True)
class FlowerRound:
    """One training round as the strategy saw it.

    Attributes
    ----------
    server_round : int
        Flower's 1-based round number.
    outcome : RoundOutcome
        The server's outcome; ``rejected`` also counts the failures below.
    sent : int
        Train messages sent (each carried the global model).
    downlink_bits : int
        With a compressed downlink, 8 x the bytes of the Arrays sent (change
        messages or the full model, and the side arrays). Otherwise ``sent``
        x 8 x the bytes of the compressed arrays as one raw float32 codec
        message (the simulator's measure; Flower carries the same values as
        .npy arrays, 128 header bytes more per array), plus the side arrays.
    failures : tuple of (node_id, reason)
        Error and malformed replies (counted in ``outcome.rejected``).
    dropouts : tuple of (node_id, reason)
        Nodes that never replied: no answer before the round's timeout, or
        Flower reported the node or its reply unavailable.
    time_s : float
        Seconds from configuring the round to the end of its aggregation.
    """

    server_round: int
    outcome: RoundOutcome
    sent: int
    downlink_bits: int
    failures: tuple[tuple[int, str], ...]
    dropouts: tuple[tuple[int, str], ...]
    time_s: float

    @property
    def dropped(self) -> int:
        """Nodes that were sent a train message and never replied."""
        return len(self.dropouts)


@dataclass
class PendingRound:
    """A training round between ``configure_train`` and ``aggregate_train``."""

    server_round: int
    nodes: frozenset[int]
    downlink_bits: int
    started: float
    #: The train messages sent; the Grid gives each its message id when it pushes it.
    messages: tuple[Message, ...] = ()
    #: The levels each node was sent (a per-client plan gives nodes different ones).
    node_levels: Mapping[int, int | None] = field(default_factory=dict)
    #: The global model the inner strategy configured the round with (w_k).
    arrays: ArrayRecord | None = None
    params: torch.Tensor | None = None

    def sender(self, reply: Message) -> int:
        """The node a reply stands for.

        An error reply that the SuperLink itself generates for a node that
        stopped sending heartbeats (NODE_UNAVAILABLE) or for an expired message
        comes from the SuperLink's node id, not the lost node's; it names the
        instruction it answers.
        """
        src = reply.metadata.src_node_id
        if src in self.nodes:
            return src
        for msg in self.messages:
            if msg.metadata.message_id and (
                msg.metadata.message_id == reply.metadata.reply_to_message_id
            ):
                return msg.metadata.dst_node_id
        return src


def log_exclusions(
    server_round: int,
    outcome: RoundOutcome,
    failures: Sequence[tuple[int, str]],
    dropouts: Sequence[tuple[int, str]],
    nodes_of: dict[int, list[int]],
) -> None:
    """One WARNING per node left out of the round, then the round's tally.

    Through Flower's logger, so that a deployment's ``flwr log`` shows them
    (:class:`FedServer` also logs its rejections, by client id, through
    :mod:`logging`).
    """
    for node, reason in failures:
        if reason == NO_MOD_REASON:
            continue  # explained once, at ERROR, when it is first seen
        log(WARNING, "aggregate_train: round %d: rejected node %d: %s", server_round, node, reason)
    for client_id, reason in dict.fromkeys(outcome.rejections):  # a shared id: once
        nodes = ", ".join(str(n) for n in nodes_of.get(client_id, [])) or "?"
        log(
            WARNING,
            "aggregate_train: round %d: rejected node %s (client %d): %s",
            server_round,
            nodes,
            client_id,
            reason,
        )
    for node, reason in dropouts:
        log(WARNING, "aggregate_train: round %d: dropped node %d: %s", server_round, node, reason)
    if outcome.rejected or dropouts:
        log(
            WARNING,
            "aggregate_train: round %d: %d accepted, %d rejected, %d dropped%s",
            server_round,
            outcome.participants,
            outcome.rejected,
            len(dropouts),
            "" if outcome.participants else "; the global model is unchanged",
        )


def server_metrics(flower_round: FlowerRound) -> MetricRecord:
    """The strategy's own figures of a training round (``aq-*``), for the server-side results.

    Levels 0 stand for full precision, as in the codec's header (a MetricRecord
    has no None); ``aq-loss`` (``F(w_k)``) and ``aq-distortion`` are left out
    when no reply was accepted.
    """
    o = flower_round.outcome
    values: dict[str, int | float | None] = {
        "aq-levels": o.levels or 0,
        "aq-next-levels": o.next_levels or 0,
        "aq-wire-bits": o.wire_bits,
        "aq-formula-bits": o.formula_bits,
        "aq-downlink-bits": flower_round.downlink_bits,
        "aq-participants": o.participants,
        "aq-rejected": o.rejected,
        "aq-dropped": flower_round.dropped,
        "aq-loss": o.train_loss,
        "aq-distortion": o.distortion,
        "aq-time-s": flower_round.time_s,
    }
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def why_nothing_accepted(rounds: Sequence[FlowerRound]) -> str:
    """The error text of a run in which no round accepted a reply: the commonest reasons."""
    reasons: Counter[str] = Counter()
    for r in rounds:
        for _, reason in r.failures:
            # An error reply's reason can be a whole traceback: its last line says it.
            head, _, detail = reason.partition(": ")
            last = detail.strip().splitlines()[-1][:200] if detail.strip() else ""
            reasons[f"{head}: {last}" if last else head] += 1
        reasons.update(reason for _, reason in r.outcome.rejections)
        reasons.update("no reply" for _ in r.dropouts)
    top = "; ".join(f"{reason} ({count}x)" for reason, count in reasons.most_common(3))
    if not any(r.sent for r in rounds):
        top = (
            "no node was sent a training message (none connected, or, with num_clients, none "
            "answered the probe for its client id: see the 'probe:' warnings)"
        )
    hint = f" Fix: {MISSING_MOD_HINT}." if NO_MOD_REASON in reasons else ""
    return (
        f"no reply was accepted in any of the {len(rounds)} training rounds, so the model never "
        f"changed. Why: {top or 'no node replied'}.{hint}"
    )


EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def with_server_metrics(
    evaluate_fn: EvaluateFn | None, rounds: Sequence[FlowerRound], first: int
) -> EvaluateFn:
    """``evaluate_fn`` plus the :func:`server_metrics` of the round it is called after.

    Flower's ``Strategy.start`` keeps what its ``evaluate_fn`` returns in
    ``Result.evaluate_metrics_serverapp``: the place for server-side figures.
    The user's keys win over ours (they are never overwritten).
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        own = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        done = rounds[-1] if len(rounds) > first else None
        if server_round == 0 or done is None or done.server_round != server_round:
            return own
        merged = MetricRecord(dict(own) if own is not None else {})
        for key, value in server_metrics(done).items():
            if key not in merged:
                merged[key] = value
        return merged

    return evaluate
