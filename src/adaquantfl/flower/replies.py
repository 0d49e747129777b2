"""Sorting a round's replies: usable, failed, missing; and what of them the inner strategy sees."""

from __future__ import annotations

from collections.abc import Sequence
from logging import ERROR, WARNING

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from adaquantfl.flower.layout import ArrayLayout, RecordError
from adaquantfl.flower.messages import (
    NO_MOD_REASON,
    MissingModError,
    TrainReply,
    read_train_reply,
    with_content,
)
from adaquantfl.flower.mod import log_once
from adaquantfl.flower.rounds import UNAVAILABLE, PendingRound

__all__ = ["common_metrics", "evaluate_replies", "sort_replies"]

Failures = list[tuple[int, str]]


def sort_replies(
    replies: Sequence[Message], pending: PendingRound, layout: ArrayLayout
) -> tuple[list[tuple[int, TrainReply, Message]], Failures, Failures]:
    """``(parsed, failures, dropouts)`` of a training round's replies.

    ``parsed``: (node, reply, message) of every reply with the right layout,
    for :meth:`FedServer.aggregate` to judge. ``failures``: (node, reason) of
    error replies and malformed ones. ``dropouts``: nodes that never replied,
    or that Flower reports unavailable. A reply without a payload
    (:class:`MissingModError`) is explained once per process, at ERROR; the
    loss stand-in is warned about once.
    """
    parsed: list[tuple[int, TrainReply, Message]] = []
    failures: Failures = []
    dropouts: Failures = []
    for msg in replies:
        node = pending.sender(msg)
        if msg.has_error():
            entry = (node, f"error reply ({msg.error.code}): {msg.error.reason}")
            (dropouts if msg.error.code in UNAVAILABLE else failures).append(entry)
            continue
        try:
            reply = read_train_reply(msg.content, layout)
        except MissingModError as exc:
            log_once("strategy-missing-mod", ERROR, "AdaQuant: %s", exc)
            failures.append((node, NO_MOD_REASON))
            continue
        except RecordError as exc:
            failures.append((node, f"malformed reply: {exc}"))
            continue
        if reply.loss_proxy:
            log_once(
                "strategy-loss-proxy",
                WARNING,
                "AdaQuant: nodes send their train function's training loss, not "
                "'pre-train-loss': the level policy follows the loss during local training "
                "(see adaquantfl.flower.mod)",
            )
        parsed.append((node, reply, msg))
    answered = {pending.sender(m) for m in replies}
    for node in sorted(pending.nodes - answered):
        dropouts.append((node, "no reply before the round's timeout"))
    return parsed, failures, dropouts


def common_metrics(records: Sequence[MetricRecord], weight_key: str) -> list[MetricRecord]:
    """Each record restricted to the keys that every record has.

    Flower's strategies refuse a whole round when the replies' metrics have
    different keys; one node's extra metric must not stop the round (the
    weighting key is kept, whatever happens, so that a reply without it fails
    loudly in the inner strategy).
    """
    if not records:
        return []
    shared = set(records[0].keys()).intersection(*(r.keys() for r in records[1:]))
    dropped = set().union(*(r.keys() for r in records)) - shared - {weight_key}
    if dropped:
        log_once(
            "strategy-metric-keys",
            WARNING,
            "AdaQuant: the nodes report different metrics; aggregating only those all of them "
            "report (left out: %s; logged once)",
            sorted(dropped),
        )
    keep = shared | {weight_key}
    return [MetricRecord({k: v for k, v in r.items() if k in keep}) for r in records]


def evaluate_replies(replies: Sequence[Message], weight_key: str) -> list[Message]:
    """The evaluate replies the inner strategy can aggregate (one bad reply is dropped alone).

    Flower's FedAvg checks all replies together and gives up on the round if
    one differs; here error replies and replies that are malformed on their
    own are dropped with a warning, and the rest keep the metric keys they share.
    """
    good: list[Message] = []
    for msg in replies:
        if msg.has_error():
            log(WARNING, "aggregate_evaluate: node %d: error reply: %s",
                msg.metadata.src_node_id, msg.error.reason)  # fmt: skip
            continue
        try:
            validate_message_reply_consistency(
                [msg.content], weighted_by_key=weight_key, check_arrayrecord=False
            )
        except InconsistentMessageReplies as exc:
            log(WARNING, "aggregate_evaluate: dropped reply from node %d: %s",
                msg.metadata.src_node_id, exc)  # fmt: skip
            continue
        good.append(msg)
    if not good:
        return []
    names = [next(iter(m.content.metric_records)) for m in good]
    records = [m.content.metric_records[n] for m, n in zip(good, names, strict=True)]
    out = []
    for msg, name, record in zip(good, names, common_metrics(records, weight_key), strict=True):
        out.append(with_content(msg, RecordDict({**dict(msg.content.items()), name: record})))
    return out
