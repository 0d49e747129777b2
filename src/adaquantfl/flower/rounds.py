"""A training round on the server after its messages went out: replies, model, record.

:class:`~adaquantfl.flower.AdaQuant` calls these pure helpers from
``aggregate_train`` / ``aggregate_evaluate``: sort a round's replies into
usable, failed and missing ones (:func:`sort_replies`, which reads each with
:func:`~adaquantfl.flower.messages.read_train_reply`); build the new global
model, FedAvg's mean from :class:`~adaquantfl.fl.server.FedServer`
(:func:`fedavg_model`) or the inner strategy's aggregate of the nodes' models
(:func:`inner_model`); and report the round, whose
:class:`~adaquantfl.fl.record.RoundRecord` the strategy keeps
(:func:`server_metrics`, :func:`log_exclusions`, :func:`why_nothing_accepted`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import ERROR, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.serde import config_record_to_proto
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.guard import aggregation_weights
from adaquantfl.fl.record import RoundRecord
from adaquantfl.fl.server import FedServer
from adaquantfl.flower.layout import ArrayLayout, RecordError, record_bytes
from adaquantfl.flower.messages import (
    MISSING_MOD_HINT,
    NO_MOD_REASON,
    MissingModError,
    TrainReply,
    read_train_reply,
    with_content,
)
from adaquantfl.flower.mod import log_once

__all__ = [
    "SERVER_METRICS",
    "OpenRound",
    "SortedReplies",
    "common_metrics",
    "content_bytes",
    "describe_error",
    "evaluate_replies",
    "fedavg_model",
    "inner_model",
    "log_exclusions",
    "server_metrics",
    "sort_replies",
    "uses_fedavg_math",
    "why_nothing_accepted",
    "with_server_metrics",
]

#: Error codes with which Flower reports that a node never answered (as
#: opposed to a ClientApp that answered with an exception).
UNAVAILABLE = frozenset(
    {
        ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        ErrorCode.NODE_UNAVAILABLE,
    }
)


#: What each of Flower's error codes says about a node, in a round's failures.
ERROR_MEANINGS = {
    ErrorCode.UNKNOWN: "the node reported an error",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "the node could not load its ClientApp",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "the node's ClientApp raised an exception",
    ErrorCode.MESSAGE_UNAVAILABLE: "the instruction never reached the node",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "the node's reply expired",
    ErrorCode.NODE_UNAVAILABLE: "the node stopped sending heartbeats",
    ErrorCode.MOD_FAILED_PRECONDITION: "a mod of the node's ClientApp refused the message",
    ErrorCode.INVALID_FAB: "the node could not verify the app (FAB)",
    ErrorCode.CLIENT_APP_CRASHED: "the node's ClientApp stopped responding",
}

#: Flower's wrapping of an exception's text in an error reply:
#: "<class 'TypeError'>:<'message'>" (flwr 1.42, run_clientapp.py and vce_api.py).
_WRAPPED = re.compile(r"<class '(?P<type>[\w.]+)'>:<'(?P<text>.*)'>", re.DOTALL)
#: The simulation engine's wrapper exception adds this before the original text.
_SIMULATION_PREFIX = re.compile(r"\s*Exception ClientAppException occurred\. Message: ")

BFLOAT16_HINT = (
    "the nodes' train function puts a bfloat16 model into an ArrayRecord, which cannot hold "
    "bfloat16 (numpy has no such dtype): build its reply with "
    "`record_from_state_dict(model.state_dict())` (`from adaquantfl.flower import "
    "record_from_state_dict`), as for the server's initial arrays"
)
#: Failures that a user's app commonly causes: (text in the failure's reason, the fix).
KNOWN_FIXES = (
    (NO_MOD_REASON, MISSING_MOD_HINT),
    ("unsupported ScalarType BFloat16", BFLOAT16_HINT),
)


def describe_error(error: Error) -> str:
    """An error reply in words: what its code means, then the node's own text.

    Flower's reason ``"<class 'TypeError'>:<'Got unsupported ScalarType BFloat16'>"``
    (a SuperNode) or ``"<class '...ClientAppException'>:<'\\nException ClientAppException
    occurred. Message: Got ...'>"`` (the simulation engine, which keeps only the text)
    becomes ``"the node's ClientApp raised an exception: TypeError: Got ..."`` or
    ``"...: Got ..."``.
    """
    meaning = ERROR_MEANINGS.get(error.code, f"the node reported Flower error code {error.code}")
    detail = (error.reason or "").strip()
    wrapped = _WRAPPED.fullmatch(detail)
    if wrapped is not None:
        kind = wrapped["type"].rsplit(".", 1)[-1]
        text = wrapped["text"]
        if kind == "ClientAppException":
            detail = _SIMULATION_PREFIX.sub("", text, count=1).strip()
        else:
            detail = f"{kind}: {text.strip()}"
    return f"error reply: {meaning}: {detail}" if detail else f"error reply: {meaning}"


def fixes_for(reasons: Iterable[str]) -> list[str]:
    """The fixes of :data:`KNOWN_FIXES` whose failure is among ``reasons``."""
    reasons = list(reasons)
    return [fix for sign, fix in KNOWN_FIXES if any(sign in reason for reason in reasons)]


@dataclass
class OpenRound:
    """What the strategy remembers of a training round between ``configure_train`` and
    ``aggregate_train``: which nodes it sent what, and when."""

    server_round: int
    nodes: frozenset[int]
    downlink_bits: int
    started: float
    #: The train messages sent; the Grid gives each its message id when it pushes it.
    messages: tuple[Message, ...] = ()
    #: The levels each node was sent (a per-client plan gives nodes different ones).
    node_levels: Mapping[int, int | None] = field(default_factory=dict)
    #: The global model the round was configured with (w_k), as the flat vector.
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


# --------------------------------------------------------------------------- replies

Failures = list[tuple[int, str]]


@dataclass(frozen=True)
class SortedReplies:
    """A training round's replies, sorted by :func:`sort_replies`.

    Attributes
    ----------
    parsed : list of (node, TrainReply, Message)
        Every reply with the right layout, for :meth:`FedServer.aggregate` to judge.
    failures : list of (node, reason)
        Error replies and malformed ones.
    dropouts : list of (node, reason)
        Nodes that never replied, or that Flower reports unavailable.
    refused_bytes : list of int
        For each reply refused for its layout (malformed, or without a
        payload), the bytes it carried (:func:`content_bytes`): they crossed
        the network, so they count in ``wire_bits``.
    """

    parsed: list[tuple[int, TrainReply, Message]]
    failures: Failures
    dropouts: Failures
    refused_bytes: list[int]


def content_bytes(content: RecordDict) -> int:
    """What a reply carried that ``wire_bits`` counts: the bytes of its Arrays' data, and of
    its ConfigRecords as Flower encodes them (protobuf); MetricRecords are not counted,
    as for an accepted reply."""
    arrays = sum(record_bytes(record) for record in content.array_records.values())
    configs = sum(config_record_to_proto(c).ByteSize() for c in content.config_records.values())
    return int(arrays + configs)


def sort_replies(
    replies: Sequence[Message], pending: OpenRound, layout: ArrayLayout
) -> SortedReplies:
    """A training round's replies, sorted into usable, failed and missing ones.

    Each reply is read with :func:`~adaquantfl.flower.messages.read_train_reply`.
    A reply without a payload (:class:`MissingModError`) is explained once per
    process, at ERROR; the loss stand-in is warned about once.
    """
    parsed: list[tuple[int, TrainReply, Message]] = []
    failures: Failures = []
    dropouts: Failures = []
    refused_bytes: list[int] = []
    for msg in replies:
        node = pending.sender(msg)
        if msg.has_error():
            entry = (node, describe_error(msg.error))
            (dropouts if msg.error.code in UNAVAILABLE else failures).append(entry)
            for sign, fix in KNOWN_FIXES:
                if sign in entry[1]:  # explained once, at ERROR, when it is first seen
                    log_once(f"strategy-fix-{sign}", ERROR, "AdaQuant: node %d: %s. Fix: %s",
                             node, entry[1], fix)  # fmt: skip
            continue
        try:
            reply = read_train_reply(msg.content, layout)
        except MissingModError as exc:
            log_once("strategy-missing-mod", ERROR, "AdaQuant: %s", exc)
            failures.append((node, NO_MOD_REASON))
            refused_bytes.append(content_bytes(msg.content))
            continue
        except RecordError as exc:
            failures.append((node, f"malformed reply: {exc}"))
            refused_bytes.append(content_bytes(msg.content))
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
    return SortedReplies(parsed, failures, dropouts, refused_bytes)


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
            log(WARNING, "aggregate_evaluate: node %d: %s",
                msg.metadata.src_node_id, describe_error(msg.error))  # fmt: skip
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


# --------------------------------------------------------------------------- the new model

Accepted = Sequence[tuple[int, TrainReply, Message]]


def uses_fedavg_math(strategy: object) -> bool:
    """Whether ``strategy`` aggregates with FedAvg's own ``aggregate_train`` (FedAvg, FedProx)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def fedavg_model(
    strategy: Any,
    server: FedServer,
    layout: ArrayLayout,
    accepted: Accepted,
    metrics: Sequence[MetricRecord],
    weight_key: str,
) -> tuple[ArrayRecord, MetricRecord]:
    """FedAvg's model: FedServer's exact mean, and the side arrays' mean with the same ``p_i``.

    The metrics are aggregated with the strategy's ``train_metrics_aggr_fn``.
    """
    n = [int(tr.reply.num_examples) for _, tr, _ in accepted]
    weights = aggregation_weights(n, server.max_weight_share)  # FedServer's p_i
    side = layout.mean_side([tr.side for _, tr, _ in accepted], weights)
    params = server.params
    contents = [
        RecordDict({tr.metrics_name: m}) for (_, tr, _), m in zip(accepted, metrics, strict=True)
    ]
    try:
        aggregated: MetricRecord = strategy.train_metrics_aggr_fn(contents, weight_key)
    except (TypeError, ValueError, KeyError) as exc:  # e.g. lists of different lengths
        log(WARNING, "aggregate_train: could not aggregate the nodes' metrics: %s", exc)
        aggregated = MetricRecord()
    return layout.to_record(params, side), aggregated


def inner_model(
    strategy: Any,
    server_round: int,
    compressor: Compressor,
    layout: ArrayLayout,
    w_k: torch.Tensor,
    accepted: Accepted,
    metrics: Sequence[MetricRecord],
    levels: dict[int, int | None],
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The inner strategy's aggregate of the models ``w_k + C(Delta_i)``, in the model's dtypes.

    Each payload is decoded into one reused buffer and ``w_k`` added in place
    (``C(Delta_i) + w_k``, the same bits as ``w_k + C(Delta_i)``): beside the
    models the inner strategy is handed, this needs one vector of the model's size.

    Returns None for the model if the strategy aggregated nothing, raised on
    the replies, or returned arrays that do not fit the model (logged).
    """
    models = []
    buffer = torch.empty(layout.numel, dtype=torch.float32)
    for (_, tr, msg), m in zip(accepted, metrics, strict=True):
        update = compressor.decompress(
            tr.reply.payload, numel=layout.numel, levels=levels[tr.reply.client_id], out=buffer
        )
        record = layout.to_record(update.add_(w_k), tr.side)
        content = RecordDict({tr.arrays_name: record, tr.metrics_name: m})
        # A copy of the reply's metadata: the strategy sees each node as it replied.
        models.append(with_content(msg, content))
    try:
        arrays, aggregated = strategy.aggregate_train(server_round, models)
    except Exception as exc:  # one node's reply must not stop the run
        # Flower's strategies refuse a whole round for one node's reply (records
        # named differently, a missing weight key, metric lists of different
        # lengths): the model then stays as it was, like a round with nothing accepted.
        log(
            WARNING,
            "aggregate_train: round %d: the inner strategy refused the replies, the model "
            "is unchanged: %s: %s",
            server_round,
            type(exc).__name__,
            exc,
        )
        return None, None
    if arrays is None:
        return None, aggregated
    try:
        return layout.adopt(arrays), aggregated
    except RecordError as exc:
        log(
            WARNING,
            "aggregate_train: round %d: the inner strategy's model is unusable, the model is "
            "unchanged: %s",
            server_round,
            exc,
        )
        return None, aggregated


# --------------------------------------------------------------- what the strategy reports


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


def server_metrics(record: RoundRecord, next_levels: int | None) -> MetricRecord:
    """The strategy's own figures of a training round (``aq-*``), for the server-side results.

    ``next_levels`` is the policy's default for the round after it. Levels 0
    stand for full precision, as in the codec's header (a MetricRecord has no
    None); ``aq-loss`` (``F(w_k)``) and ``aq-distortion`` are left out when
    no reply was accepted.
    """
    values: dict[str, int | float | None] = {
        "aq-levels": record.levels or 0,
        "aq-next-levels": next_levels or 0,
        "aq-wire-bits": record.wire_bits,
        "aq-formula-bits": record.formula_bits,
        "aq-downlink-bits": record.downlink_bits,
        "aq-participants": record.participants,
        "aq-rejected": record.rejected,
        "aq-dropped": record.dropped,
        "aq-loss": record.train_loss,
        "aq-distortion": record.distortion,
        "aq-time-s": record.time_s,
    }
    return MetricRecord({k: v for k, v in values.items() if v is not None})


EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def with_server_metrics(
    evaluate_fn: EvaluateFn | None,
    rounds: Sequence[RoundRecord],
    first: int,
    next_levels: Callable[[], int | None],
) -> EvaluateFn:
    """``evaluate_fn`` plus the :func:`server_metrics` of the round it is called after.

    ``next_levels()`` gives the policy's default levels for the coming round.

    Flower's ``Strategy.start`` keeps what its ``evaluate_fn`` returns in
    ``Result.evaluate_metrics_serverapp``: the place for server-side figures.
    The user's keys win over ours (they are never overwritten).
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        own = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        done = rounds[-1] if len(rounds) > first else None
        if server_round == 0 or done is None or done.round != server_round:
            return own
        merged = MetricRecord(dict(own) if own is not None else {})
        for key, value in server_metrics(done, next_levels()).items():
            if key not in merged:
                merged[key] = value
        return merged

    return evaluate


def log_exclusions(record: RoundRecord, nodes_of: dict[int, list[int]]) -> None:
    """One WARNING per node left out of the round, then the round's tally.

    Through Flower's logger, so that a deployment's ``flwr log`` shows them
    (:class:`FedServer` also logs its rejections, by client id, through
    :mod:`logging`).
    """
    server_round = record.round
    for node, reason in record.failures:
        if reason == NO_MOD_REASON:
            continue  # explained once, at ERROR, when it is first seen
        log(WARNING, "aggregate_train: round %d: rejected node %d: %s", server_round, node, reason)
    for client_id, reason in dict.fromkeys(record.rejections):  # a shared id: once
        nodes = ", ".join(str(n) for n in nodes_of.get(client_id, [])) or "?"
        log(
            WARNING,
            "aggregate_train: round %d: rejected node %s (client %d): %s",
            server_round,
            nodes,
            client_id,
            reason,
        )
    for node, reason in record.dropouts:
        log(WARNING, "aggregate_train: round %d: dropped node %d: %s", server_round, node, reason)
    if record.rejected or record.dropped:
        log(
            WARNING,
            "aggregate_train: round %d: %d accepted, %d rejected, %d dropped%s",
            server_round,
            record.participants,
            record.rejected,
            record.dropped,
            "" if record.participants else "; the global model is unchanged",
        )


def _summary(reason: str) -> str:
    """One line of a failure's reason: an error reply's text can be a whole traceback,
    whose first line says where and last line what."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0][:300] if lines else reason
    return f"{lines[0][:200]} ... {lines[-1][:200]}"


def why_nothing_accepted(rounds: Sequence[RoundRecord], *, stopped: bool = False) -> str:
    """The error text of a run in which no round accepted a reply: the commonest reasons.

    With ``stopped``, ``rounds`` is the one round after which the run stops
    because no node runs ``adaquant_mod``.
    """
    reasons: Counter[str] = Counter()
    for r in rounds:
        reasons.update(_summary(reason) for _, reason in r.failures)
        reasons.update(reason for _, reason in r.rejections)
        reasons.update("no reply" for _ in r.dropouts)
    top = "; ".join(f"{reason} ({count}x)" for reason, count in reasons.most_common(3))
    if not any(r.sent for r in rounds):
        top = (
            "no node was sent a training message (none connected, or, with num_clients, none "
            "answered the probe for its client id: see the 'probe:' warnings)"
        )
    hints = "".join(f" Fix: {fix}." for fix in fixes_for(reasons))
    if stopped:
        (last,) = rounds
        head = (
            f"no reply was accepted in training round {last.round}: none of its "
            f"{len(last.failures)} replies carries an adaquantfl payload, so the run stops "
            "here rather than train the remaining rounds for nothing"
        )
    elif len(rounds) == 1:
        head = "no reply was accepted in the one training round, so the model never changed"
    else:
        head = (
            f"no reply was accepted in any of the {len(rounds)} training rounds, so the model "
            "never changed"
        )
    return f"{head}. Why: {top or 'no node replied'}.{hints}"
