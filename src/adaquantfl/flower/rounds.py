"""What the strategy keeps of each round, and how it reports the nodes it left out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from logging import WARNING

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from adaquantfl.fl.server import RoundOutcome

__all__ = ["UNAVAILABLE", "FlowerRound", "PendingRound", "log_exclusions"]

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
