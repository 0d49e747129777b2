"""What the strategy keeps of each round, and how it reports the nodes it left out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from adaquantfl.fl.server import RoundOutcome
from adaquantfl.flower.records import CLIENT_ID_KEY

__all__ = ["UNAVAILABLE", "FlowerRound", "PendingRound", "log_exclusions", "round_metrics"]

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
        ``sent`` x 8 x the bytes of the model as a raw float32 codec message
        (the simulator's measure; Flower carries the same float32 values as
        .npy arrays, 128 header bytes more per array).
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
    server_round: int
    nodes: frozenset[int]
    downlink_bits: int
    started: float
    #: The train messages sent; the Grid gives each its message id when it pushes it.
    messages: tuple[Message, ...] = ()
    #: The levels each node was sent (a per-client plan gives nodes different ones).
    node_levels: Mapping[int, int | None] = field(default_factory=dict)

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


def round_metrics(
    flower_round: FlowerRound,
    contents: list[RecordDict],
    aggregate: Callable[[list[RecordDict], str], MetricRecord],
    weighted_by_key: str,
) -> MetricRecord:
    """The MetricRecord of a training round: the clients' own metrics, aggregated, plus ours."""
    outcome = flower_round.outcome
    metrics = MetricRecord()
    if contents:
        try:
            metrics = aggregate(contents, weighted_by_key)
        except (TypeError, ValueError) as exc:
            log(WARNING, "aggregate_train: could not aggregate the clients' metrics: %s", exc)
        if CLIENT_ID_KEY in metrics:
            del metrics[CLIENT_ID_KEY]
    # fp32 is levels 0, as in the codec's header (MetricRecord has no None).
    metrics["levels"] = outcome.levels or 0
    metrics["next_levels"] = outcome.next_levels or 0
    metrics["wire_bits"] = outcome.wire_bits
    metrics["formula_bits"] = outcome.formula_bits
    metrics["downlink_bits"] = flower_round.downlink_bits
    metrics["participants"] = outcome.participants
    metrics["rejected"] = outcome.rejected
    metrics["dropped"] = flower_round.dropped
    if outcome.train_loss is not None:
        metrics["train_loss"] = outcome.train_loss
    return metrics
