"""``AdaQuantFedAvg``: Flower's message-based FedAvg with AdaQuantFL's uplink compression.

Swap ``FedAvg`` for ``AdaQuantFedAvg`` in a ServerApp and add
:data:`~adaquantfl.flower.adaquant_mod` to the ClientApp. Every round the strategy

1. sends each sampled node the global arrays and, in its own ConfigRecord,
   the levels ``s_k`` that the schedule chose, the run seed, the round index
   and the compressor settings (see :mod:`adaquantfl.flower.records`);
2. turns every well-formed reply into a :class:`~adaquantfl.fl.client.ClientReply`
   and hands them to :meth:`adaquantfl.fl.server.FedServer.aggregate`, which
   decodes the payloads with :mod:`adaquantfl.compression.codec`, averages them weighted by
   ``n_i`` and feeds ``F(w_k)`` to the schedule (DESIGN §2, steps 4-5);
3. returns the new global arrays and a MetricRecord with the round's
   ``levels``, ``wire_bits``, ``formula_bits``, ``train_loss``, ... (kept in
   ``Result.train_metrics_clientapp``; the full outcomes, payload digests
   included, in :attr:`AdaQuantFedAvg.rounds`).

Nothing of quantization, aggregation or the schedule is re-implemented here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import INFO, WARNING

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from adaquantfl.compression.compressor import Compressor, default_message_limit
from adaquantfl.compression.qsgd_compressor import QSGDCompressor
from adaquantfl.fl.client import ClientReply
from adaquantfl.fl.server import FedServer, as_policy, select_clients
from adaquantfl.flower.nodes import choose_train_nodes, wait_for_nodes
from adaquantfl.flower.records import (
    LOSS_PROXY_KEY,
    NUM_EXAMPLES_KEY,
    PRE_TRAIN_LOSS_KEY,
    ArrayLayout,
    RecordError,
    RoundPlan,
    describe_compressor,
    parse_train_reply,
    plan_config,
    single_metric_record,
)
from adaquantfl.flower.rounds import (
    UNAVAILABLE,
    FlowerRound,
    PendingRound,
    log_exclusions,
    round_metrics,
)
from adaquantfl.policy import LevelPolicy, LevelSchedule

__all__ = ["AdaQuantFedAvg", "FlowerRound"]


class AdaQuantFedAvg(FedAvg):
    """FedAvg whose clients send quantized, encoded updates at scheduled levels.

    Parameters
    ----------
    schedule : LevelPolicy or LevelSchedule
        Any level policy of :mod:`adaquantfl.policy` (``FullPrecision``,
        ``FixedLevels``, ``AdaQuantLevels``, ...). A per-client policy gives
        each node the levels of its client id when the strategy knows it
        (``num_clients`` set, or learned from an earlier reply), else the
        round's default levels.
    compressor : Compressor, optional
        Any registered compressor, possibly wrapped in
        :class:`~adaquantfl.compression.feedback.ErrorFeedback` (default:
        QSGD, packed, one bucket, l2). The nodes rebuild it from its name and
        options, so its module must be imported in the ClientApp too.
    seed : int
        Run seed; nodes derive their minibatch and quantizer-noise streams
        from (seed, round, client id), and node sampling uses (seed, round).
    num_clients, clients_per_round : int, optional
        Select participants by client id (the nodes' ``partition-id``) with
        :func:`~adaquantfl.fl.server.select_clients`, exactly as the
        simulator does. Nodes whose id is not yet known are asked for it with
        a probe message first. When unset, nodes are sampled Flower-style
        with ``fraction_train`` / ``min_train_nodes``.
    node_wait_s : float
        Longest wait for ``min_available_nodes`` to connect before a round
        (and for probe replies). Flower's own FedAvg waits without limit; after
        this the round goes on with the nodes that are there, or with none.
    record_digests : bool
        Keep the SHA-256 of every payload in :attr:`rounds` (for comparing engines).
    max_message_bytes : int, optional
        Payloads larger than this are rejected unread (and counted in
        ``rejected``). By default the limit is
        :func:`adaquantfl.compression.compressor.default_message_limit` of the model: the
        largest message a well-behaved node can send (a raw float32 update,
        or a packed one at the maximum levels, plus 1 KiB). The effective
        limit is ``strategy.server.max_message_bytes``.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in Flower's ``FedAvg``. ``train_metrics_aggr_fn`` aggregates the
        user's own train metrics of the accepted replies.

    Notes
    -----
    Replies are validated one by one. An error reply, a malformed reply
    (records other than one ``aq-payload`` Array and one MetricRecord), or one
    that :meth:`FedServer.aggregate` rejects (undecodable, wrong size or
    levels, non-finite values or loss, too large, a client id claimed twice)
    is left out of the model and of the schedule's loss, logged, and counted
    in the round's ``rejected``; a node that does not answer within
    ``start(timeout=...)`` is counted in ``dropped``. The round goes on with
    the rest; if nothing is accepted the model and the schedule stay as they
    were and the round is recorded with ``participants`` 0.
    (Flower's FedAvg checks all replies together with
    ``validate_message_reply_consistency`` and skips the whole aggregation if
    one differs.) The strategy owns the global model: ``configure_train``
    takes its first ``arrays`` as ``w_0`` and afterwards expects back the
    record ``aggregate_train`` returned; other arrays replace the model.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        schedule: LevelPolicy | LevelSchedule,
        compressor: Compressor | None = None,
        *,
        seed: int = 0,
        num_clients: int | None = None,
        clients_per_round: int | None = None,
        node_wait_s: float = 60.0,
        record_digests: bool = True,
        max_message_bytes: int | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = NUM_EXAMPLES_KEY,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.schedule = as_policy(schedule)
        self.compressor: Compressor = compressor if compressor is not None else QSGDCompressor()
        describe_compressor(self.compressor)  # the nodes must be able to rebuild it
        self.seed = seed
        if (num_clients is None) != (clients_per_round is None):
            raise ValueError("num_clients and clients_per_round must be given together")
        if num_clients is not None and clients_per_round is not None:
            select_clients(num_clients, clients_per_round, seed=seed, round_idx=0)  # validates
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        finite = isinstance(node_wait_s, int | float) and math.isfinite(node_wait_s)
        if not finite or node_wait_s < 0:
            raise ValueError(f"node_wait_s must be a finite number >= 0, got {node_wait_s!r}")
        self.node_wait_s = float(node_wait_s)
        self.record_digests = record_digests
        if max_message_bytes is not None and (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 1
        ):
            raise ValueError(
                f"max_message_bytes must be a positive integer or None (the model's default "
                f"limit), got {max_message_bytes!r}"
            )
        #: The limit asked for; None: :func:`default_message_limit` of the model.
        self.max_message_bytes = max_message_bytes
        #: The server state (global model, round counter, schedule); built from
        #: the first arrays that ``configure_train`` sees.
        self.server: FedServer | None = None
        self.layout: ArrayLayout | None = None
        #: Every completed training round, in order.
        self.rounds: list[FlowerRound] = []
        self._warned_loss_proxy = False
        #: Client id of every node that has told us (node id -> partition id).
        self.node_clients: dict[int, int] = {}
        self._global: ArrayRecord | None = None
        self._pending: PendingRound | None = None

    # ----------------------------------------------------------------- summary

    def summary(self) -> None:
        """Log the FedAvg settings plus the compression settings."""
        super().summary()
        log(INFO, "\t└──> AdaQuantFL:")
        log(INFO, "\t\t├── Schedule: %r", self.schedule)
        log(INFO, "\t\t├── Compressor: %r", self.compressor)
        limit = self.max_message_bytes
        log(INFO, "\t\t├── Max payload: %s", "model default" if limit is None else f"{limit} B")
        log(INFO, "\t\t└── Node wait: %.0f s", self.node_wait_s)

    # ----------------------------------------------------------------- training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global arrays plus its own ConfigRecord with the plan."""
        server = self._sync(arrays)
        self._pending = None
        if self.fraction_train == 0.0:
            return []
        started = time.perf_counter()
        probe = RoundPlan(server.levels, self.seed, server.round_idx, self.compressor)
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_s)
        chosen = choose_train_nodes(grid, nodes, probe, self, self.node_clients)
        known = sorted({self.node_clients[n] for n in chosen if n in self.node_clients})
        sent = server.begin_round(known)
        level_plan = server.plan()
        node_levels = {
            node: level_plan.levels_of(self.node_clients[node])
            if node in self.node_clients
            else level_plan.default
            for node in chosen
        }
        log(
            INFO,
            "configure_train: round %d, levels %s, %d of %d nodes",
            server_round,
            "fp32" if level_plan.default is None else level_plan.default,
            len(chosen),
            len(nodes),
        )
        base = ConfigRecord(dict(config))
        base["server-round"] = server_round
        record = self._global
        if record is None:  # pragma: no cover - set by _sync
            raise RuntimeError("no global model to send")
        messages = [
            Message(
                content=RecordDict(
                    {
                        self.arrayrecord_key: record,
                        self.configrecord_key: plan_config(
                            base, replace(probe, levels=node_levels[node])
                        ),
                    }
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in chosen
        ]
        self._pending = PendingRound(
            server_round=server_round,
            nodes=frozenset(chosen),
            downlink_bits=sent.bits,
            started=started,
            messages=tuple(messages),
            node_levels=node_levels,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and average the replies with :class:`FedServer`; drop bad ones, not the round."""
        server = self._require_server()
        replies = list(replies)
        pending = self._pending
        if pending is None or pending.server_round != server_round:
            pending = PendingRound(server_round, frozenset(), 0, time.perf_counter())
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        failures: list[tuple[int, str]] = []
        dropouts: list[tuple[int, str]] = []
        for m in errors:
            entry = (pending.sender(m), f"error reply ({m.error.code}): {m.error.reason}")
            (dropouts if m.error.code in UNAVAILABLE else failures).append(entry)
        client_replies: list[ClientReply] = []
        reply_nodes: list[int] = []
        contents: list[RecordDict] = []
        nodes_of: dict[int, list[int]] = {}  # client id -> nodes that claimed it
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                reply = parse_train_reply(msg.content)
            except RecordError as exc:
                failures.append((node, f"malformed reply: {exc}"))
                continue
            nodes_of.setdefault(reply.client_id, []).append(node)
            if not self._warned_loss_proxy and LOSS_PROXY_KEY in single_metric_record(
                msg.content, "a train reply"
            ):
                self._warned_loss_proxy = True
                log(
                    WARNING,
                    "aggregate_train: node %d sends its train function's training loss, not "
                    "%r: the schedule follows the loss during local training (see "
                    "adaquantfl.flower.mod)",
                    node,
                    PRE_TRAIN_LOSS_KEY,
                )
            client_replies.append(reply)
            reply_nodes.append(node)
            contents.append(msg.content)
        answered = {pending.sender(m) for m in replies}
        for node in sorted(pending.nodes - answered):
            dropouts.append((node, "no reply before the round's timeout"))

        # Each reply is checked against the levels its node was sent.
        expected = {
            reply.client_id: pending.node_levels.get(node, server.plan().default)
            for reply, node in zip(client_replies, reply_nodes, strict=True)
        }
        outcome = server.aggregate(client_replies, expected_levels=expected)
        rejected = {c for c, _ in outcome.rejections}
        contents = [
            content
            for content, reply in zip(contents, client_replies, strict=True)
            if reply.client_id not in rejected
        ]
        for client_id, nodes in nodes_of.items():
            # Learn a node's client id only from a reply the server accepted (a
            # node that claims another's id must not take its place in sampling).
            if client_id not in rejected:
                self.node_clients.update(dict.fromkeys(nodes, client_id))
        if failures:
            outcome = replace(outcome, rejected=outcome.rejected + len(failures))
        log_exclusions(server_round, outcome, failures, dropouts, nodes_of)
        self._global = self._layout().to_record(server.params)
        flower_round = FlowerRound(
            server_round=server_round,
            outcome=outcome,
            sent=len(pending.nodes),
            downlink_bits=pending.downlink_bits,
            failures=tuple(failures),
            dropouts=tuple(dropouts),
            time_s=time.perf_counter() - pending.started,
        )
        self.rounds.append(flower_round)
        self._pending = None
        return self._global, round_metrics(
            flower_round, contents, self.train_metrics_aggr_fn, self.weighted_by_key
        )

    # ----------------------------------------------------------------- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation as in FedAvg, but with a bounded wait for nodes."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_s)
        if not nodes:
            return []
        size = max(int(len(nodes) * self.fraction_evaluate), self.min_evaluate_nodes)
        size = max(1, min(len(nodes), size))
        round_idx = self.server.round_idx if self.server is not None else server_round
        picked = select_clients(len(nodes), size, seed=self.seed, round_idx=round_idx)
        chosen = [nodes[i] for i in picked]
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation metrics of the well-formed replies; drop the others."""
        valid, _ = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        good: list[RecordDict] = []
        for msg in valid:
            try:
                validate_message_reply_consistency(
                    [msg.content], weighted_by_key=self.weighted_by_key, check_arrayrecord=False
                )
            except InconsistentMessageReplies as exc:
                log(
                    WARNING,
                    "aggregate_evaluate: dropped reply from node %d: %s",
                    msg.metadata.src_node_id,
                    exc,
                )
                continue
            good.append(msg.content)
        if not good:
            return None
        try:
            return self.evaluate_metrics_aggr_fn(good, self.weighted_by_key)
        except (TypeError, ValueError) as exc:  # e.g. metric lists of different lengths
            log(WARNING, "aggregate_evaluate: could not aggregate the metrics: %s", exc)
            return None

    # ----------------------------------------------------------------- helpers

    def _sync(self, arrays: ArrayRecord) -> FedServer:
        if self.server is None:
            self.layout = ArrayLayout.of(arrays)
            limit = self.max_message_bytes or default_message_limit(
                self.layout.numel, self.compressor
            )
            self.server = FedServer(
                self.layout.flatten(arrays),
                self.schedule,
                self.compressor,
                max_message_bytes=limit,
                record_digests=self.record_digests,
            )
            self._global = arrays
        elif arrays is not self._global:
            # Someone handed us a different model than the one we returned
            # (a custom loop); it becomes the global model.
            log(INFO, "configure_train: adopting the arrays passed in as the global model")
            self.server.params = self._layout().flatten(arrays)
            self._global = arrays
        return self.server

    def _require_server(self) -> FedServer:
        if self.server is None:
            raise RuntimeError("aggregate_train before configure_train: no global model yet")
        return self.server

    def _layout(self) -> ArrayLayout:
        if self.layout is None:  # pragma: no cover - set together with the server
            raise RuntimeError("no model layout yet")
        return self.layout
