"""The strategies: ``AdaQuant`` around any Flower strategy, and the ``AdaQuantFedAvg`` preset.

    strategy = AdaQuant(FedAdam(), policy=AdaQuantLevels(2), seed=0)  # as Flower's DP wrappers
    strategy = AdaQuantFedAvg(AdaQuantLevels(2), seed=0)             # instead of FedAvg(...)
    client_app = ClientApp(mods=[adaquant_mod])

Each round the wrapper lets the inner strategy configure the round and adds
each node's plan (levels, seed, compressor; :mod:`adaquantfl.flower.messages`),
checks and decodes the replies with :meth:`adaquantfl.fl.server.FedServer.aggregate`
(which also feeds the level policy), hands the inner strategy the accepted
nodes' models ``w_k + C(Delta_i)`` with their own metrics, and returns its
aggregate as the new global model (:mod:`adaquantfl.flower.rounds`). Nothing
of quantization, aggregation or the policy is re-implemented here.

``AdaQuantFedAvg`` is ``AdaQuant(FedAvg(...), sample_nodes=True, ...)``: the
nodes are sampled reproducibly from the seed (FedAvg's ``fraction_train`` /
``min_train_nodes``, or by client id with ``num_clients`` /
``clients_per_round``, as the simulator does; :mod:`adaquantfl.flower.sampling`),
the wait for nodes is bounded by ``node_wait_s``, and the model is FedAvg's
weighted mean computed by :class:`~adaquantfl.fl.server.FedServer`, so a run
sends the simulator's bytes and ends with its model, bit for bit.

Every constructor argument is checked at construction, with a message that
says what was expected: a mistake in a ServerApp otherwise surfaces rounds
later, on another machine, as an ``AttributeError`` deep in a round.

Notes
-----
When the inner strategy aggregates with FedAvg's own ``aggregate_train``
(``FedAvg``, ``FedProx``), its result is the weighted mean of the replies; the
wrapper takes that mean from :class:`FedServer` instead, which accumulates
``sum_i p_i C(Delta_i)`` in float64 in client-id order: Flower's float32 sum in
arrival order would make the model depend on which reply came first, and
differ from the simulator's in the last bits. Any other ``aggregate_train``
(FedAdam, FedTrimmedAvg, a DP wrapper, your own) is used as it is. The level
policy always sees ``F(w_k) = sum_i p_i F_i(w_k)``: the accepted nodes'
sample-weighted loss of the global model they received, whatever the inner
strategy made of the previous round (see docs/flower.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as serverapp_strategies
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from adaquantfl.compression.compressor import Compressor, default_message_limit
from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.compression.qsgd_compressor import QSGDCompressor
from adaquantfl.fl.guard import check_weight_share
from adaquantfl.fl.record import RoundRecord
from adaquantfl.fl.server import FedServer, as_policy, select_clients
from adaquantfl.flower.downlink import DownlinkSender, send_model
from adaquantfl.flower.layout import BATCHNORM_BUFFERS, ArrayLayout
from adaquantfl.flower.messages import (
    NO_MOD_REASON,
    NUM_EXAMPLES_KEY,
    Instruction,
    TrainReply,
    add_plans,
    describe_compressor,
)
from adaquantfl.flower.rounds import (
    OpenRound,
    common_metrics,
    evaluate_replies,
    fedavg_model,
    inner_model,
    log_exclusions,
    sort_replies,
    uses_fedavg_math,
    why_nothing_accepted,
    with_server_metrics,
)
from adaquantfl.flower.sampling import SAMPLING_ATTRIBUTES, sampled_messages
from adaquantfl.policy import LevelPolicy, LevelSchedule
from adaquantfl.validation import check_int, check_real

__all__ = ["AdaQuant", "AdaQuantFedAvg", "NoAcceptedRepliesError"]

_USAGE = "AdaQuant(FedAvg(...), policy=AdaQuantLevels(2), seed=0, compressor=QSGDCompressor(), ...)"
_FEDAVG_USAGE = (
    "AdaQuantFedAvg(AdaQuantLevels(2), QSGDCompressor(), seed=0, fraction_train=1.0, "
    "min_available_nodes=2, ...)"
)
_INT64 = 2**63


class NoAcceptedRepliesError(RuntimeError):
    """A run in which no training round accepted a single reply (the model never changed)."""


class AdaQuant(Strategy):
    """Wrap a Flower strategy so that the nodes send compressed updates at scheduled levels.

    Parameters
    ----------
    strategy : Strategy
        The inner Flower strategy (``FedAvg``, ``FedProx``, ``FedAdam``,
        ``FedTrimmedAvg``, a DP wrapper, ...): it samples nodes (unless
        ``sample_nodes``), builds the messages and aggregates the models.
    policy : LevelPolicy or LevelSchedule
        Any level policy of :mod:`adaquantfl.policy` (``FullPrecision()``,
        ``FixedLevels(s)``, ``AdaQuantLevels(s0)``, ...).
    seed : int
        Run seed: nodes derive their minibatch and quantizer-noise streams from
        (seed, round, client id); seeded node sampling and the downlink's noise
        use it too. Required: a run is reproducible only from a known seed.
    compressor : Compressor, optional
        Any registered compressor, possibly in
        :class:`~adaquantfl.compression.feedback.ErrorFeedback` (default:
        ``QSGDCompressor()``, packed with max-norm buckets of 512, whose error
        stays bounded at any model size; ``QSGDCompressor.paper()`` is the
        paper's one l2 norm per update). The nodes rebuild it by name, so its module
        must be imported in the ClientApp too.
    downlink, downlink_levels : Compressor, int, optional
        Compress the model sent to the nodes too (:mod:`adaquantfl.flower.downlink`);
        ``downlink_levels`` None sends a raw float32 change. Default: the
        model as Flower's float arrays (the paper's setting).
    uncompressed : collection of str
        Names (or ``.``-suffixes) of float arrays that travel beside the
        update, uncompressed; arrays of a non-float dtype always do (default:
        BatchNorm's buffers, see :mod:`adaquantfl.flower.layout`).
    sample_nodes : bool
        False: the inner strategy samples the nodes as it always does. True:
        the wrapper samples them reproducibly from ``seed`` (by client id
        with ``num_clients`` / ``clients_per_round``, as the simulator does),
        waiting at most ``node_wait_s`` for the inner strategy's
        ``min_available_nodes``; the inner strategy must have FedAvg's
        sampling settings (``fraction_train``, ``min_train_nodes``, ...).
    num_clients, clients_per_round : int, optional
        Select ``clients_per_round`` of ``num_clients`` client ids (the nodes'
        ``partition-id``) per round with :func:`~adaquantfl.fl.server.select_clients`;
        nodes of unknown id are asked with a probe message first. Needs ``sample_nodes``.
    node_wait_s : float
        Longest wait for nodes (and probe replies) with ``sample_nodes``.
    record_digests : bool
        Keep the SHA-256 of every payload in :attr:`rounds` (for comparing engines).
    max_message_bytes : int, optional
        Payloads larger than this are rejected unread (default: the largest
        message an honest node can send for the model,
        :func:`~adaquantfl.compression.compressor.default_message_limit`).
    max_weight_share : float, optional
        FedServer's cap on a node's ``p_i`` (in ``F(w_k)`` and FedAvg's mean only).

    Notes
    -----
    A bad reply (an error, a malformed one, one :meth:`FedServer.aggregate`
    rejects) is left out of the model and of the policy's loss, logged, and
    counted in ``aq-rejected``; a silent node in ``aq-dropped``. These and the
    other ``aq-*`` figures go to ``Result.evaluate_metrics_serverapp`` (:meth:`start`)
    and :attr:`rounds`; ``train_metrics_clientapp`` is the inner strategy's
    aggregate of the nodes' own metrics. A run in which no round accepted a
    reply ends with :class:`NoAcceptedRepliesError`; so does a training round
    in which every reply that arrived holds the model's own arrays (no node
    runs ``adaquant_mod``), at once, from :meth:`aggregate_train`.
    """

    def __init__(
        self,
        strategy: Strategy,
        *args: object,
        policy: LevelPolicy | LevelSchedule | None = None,
        seed: int,
        compressor: Compressor | None = None,
        downlink: Compressor | None = None,
        downlink_levels: int | None = None,
        uncompressed: Collection[str] = BATCHNORM_BUFFERS,
        sample_nodes: bool = False,
        num_clients: int | None = None,
        clients_per_round: int | None = None,
        node_wait_s: float = 60.0,
        record_digests: bool = True,
        max_message_bytes: int | None = None,
        max_weight_share: float | None = None,
    ) -> None:
        settings = _check_settings(type(self).__name__, strategy, args, locals())
        self.strategy: Any = strategy
        self.policy: LevelPolicy = settings["policy"]
        self.seed: int = seed
        self.compressor: Compressor = compressor if compressor is not None else QSGDCompressor()
        self.uncompressed = tuple(uncompressed)
        self.sample_nodes = sample_nodes
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.node_wait_s = float(node_wait_s)
        self.record_digests = record_digests
        #: The limit asked for; None: :func:`default_message_limit` of the model.
        self.max_message_bytes = max_message_bytes
        self.max_weight_share: float | None = settings["max_weight_share"]
        self.downlink = (
            None if downlink is None else DownlinkSender(downlink, downlink_levels, seed)
        )
        #: The server state (global model, round counter, policy); built from
        #: the first arrays that ``configure_train`` sees.
        self.server: FedServer | None = None
        self.layout: ArrayLayout | None = None
        #: Every completed training round, in order.
        self.rounds: list[RoundRecord] = []
        #: Client id of every node whose reply was accepted (node id -> partition id).
        self.node_clients: dict[int, int] = {}
        self._global: ArrayRecord | None = None
        self._pending: OpenRound | None = None

    def __repr__(self) -> str:
        return f"AdaQuant({self.strategy!r}, policy={self.policy!r})"

    def summary(self) -> None:
        """Log the compression settings, then the inner strategy's."""
        limit = self.max_message_bytes
        downlink = "float arrays" if self.downlink is None else repr(self.downlink.compressor)
        log(INFO, "\t├──> AdaQuantFL: policy %r, compressor %r", self.policy, self.compressor)
        log(INFO, "\t│\t└── downlink %s, max payload %s, sampling by %s", downlink,
            "model default" if limit is None else f"{limit} B",
            "seed" if self.sample_nodes else "the inner strategy")  # fmt: skip
        self.strategy.summary()

    # ----------------------------------------------------------------- training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure the round; add each node's plan (and downlink)."""
        server, layout = self._sync(arrays)
        self._pending = None
        started = time.perf_counter()
        plan = Instruction(
            server.levels, self.seed, server.round_idx, self.compressor, uncompressed=layout.side
        )
        messages = self._inner_train_messages(server_round, arrays, config, grid, plan)
        nodes = [m.metadata.dst_node_id for m in messages]
        known = sorted({self.node_clients[n] for n in nodes if n in self.node_clients})
        server.begin_round(known)
        level_plan = server.plan()
        node_levels = {
            n: level_plan.levels_of(self.node_clients[n]) if n in self.node_clients
            else level_plan.default
            for n in nodes
        }  # fmt: skip
        downlinks, sent = send_model(self.downlink, server, nodes, layout, arrays)
        plans = {n: replace(plan, levels=node_levels[n]) for n in nodes}
        for node, down in downlinks.items():
            plans[node] = replace(plans[node], downlink=down.plan)
        add_plans(messages, self.strategy, plans, {n: d.record for n, d in downlinks.items()})
        log(
            INFO,
            "configure_train: round %d, levels %s, %d nodes",
            server_round,
            "fp32" if level_plan.default is None else level_plan.default,
            len(nodes),
        )
        self._pending = OpenRound(
            server_round=server_round,
            nodes=frozenset(nodes),
            downlink_bits=8 * sent,
            started=started,
            messages=tuple(messages),
            node_levels=node_levels,
            params=server.params,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check the replies with :class:`FedServer`; the inner strategy aggregates.

        Raises
        ------
        NoAcceptedRepliesError
            If replies arrived and every one holds the model's own arrays instead
            of a payload: no node runs ``adaquant_mod``, and Flower's run loop
            (``Strategy.start``) stops with this error after the round.
        """
        server = self._require_server()[0]
        replies = list(replies)
        pending = self._pending
        if pending is None or pending.server_round != server_round:
            pending = OpenRound(server_round, frozenset(), 0, time.perf_counter())
        replies_of = sort_replies(replies, pending, self._require_server()[1])
        parsed, failures, dropouts = replies_of.parsed, replies_of.failures, replies_of.dropouts
        nodes_of: dict[int, list[int]] = {}
        for node, tr, _ in parsed:
            nodes_of.setdefault(tr.reply.client_id, []).append(node)
        expected = {
            tr.reply.client_id: pending.node_levels.get(node, server.plan().default)
            for node, tr, _ in parsed
        }
        previous = server.params
        record = server.aggregate([tr.reply for _, tr, _ in parsed], expected_levels=expected)
        rejected = {c for c, _ in record.rejections}
        # In client-id order, as FedServer sums: the inner strategy's float sums
        # then do not depend on the order in which replies arrived.
        accepted = sorted(
            ((n, tr, m) for n, tr, m in parsed if tr.reply.client_id not in rejected),
            key=lambda item: item[1].reply.client_id,
        )
        for client_id, nodes in nodes_of.items():
            # Learn a node's client id only from a reply the server accepted (a
            # node that claims another's id must not take its place in sampling).
            if client_id not in rejected:
                self.node_clients.update(dict.fromkeys(nodes, client_id))
        if self.downlink is not None:
            for node in pending.nodes - {n for n, _, _ in accepted}:
                self.downlink.forget(node)
        # The arrays that travel beside the update count as uplink bits too, and
        # so does every reply refused for its layout: its bytes crossed the network.
        side_bytes = sum(tr.side_bytes for _, tr, _ in parsed)
        wire_bits = record.wire_bits + 8 * (side_bytes + sum(replies_of.refused_bytes))
        received = record.received + len(replies_of.refused_bytes)
        per_coordinate = wire_bits / (received * server.numel) if received else None
        record = replace(
            record,
            round=server_round,
            wire_bits=wire_bits,
            received=received,
            bits_per_coordinate=per_coordinate,
        ).completed(
            test_loss=None,
            test_accuracy=None,
            time_s=0.0,
            failures=failures,
            dropouts=dropouts,
            sent=len(pending.nodes),
            downlink_bits=pending.downlink_bits,
        )
        log_exclusions(record, nodes_of)
        arrays, metrics = None, None
        if accepted:
            arrays, metrics = self._aggregate(server_round, accepted, record, pending, previous)
        self.rounds.append(replace(record, time_s=time.perf_counter() - pending.started))
        self._pending = None
        if not parsed and failures and all(reason == NO_MOD_REASON for _, reason in failures):
            # Every reply that arrived holds the model's own arrays: no node runs
            # adaquant_mod, and every later round would fail the same way.
            raise NoAcceptedRepliesError(why_nothing_accepted(self.rounds[-1:], stopped=True))
        return arrays, metrics

    def _aggregate(
        self,
        server_round: int,
        accepted: list[tuple[int, TrainReply, Message]],
        record: RoundRecord,
        pending: OpenRound,
        previous: torch.Tensor,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model and the nodes' aggregated metrics (``accepted`` is not empty)."""
        server, layout = self._require_server()
        weight_key = getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES_KEY)
        metrics = common_metrics([tr.metrics for _, tr, _ in accepted], weight_key)
        if uses_fedavg_math(self.strategy):
            # FedAvg's mean, computed exactly by FedServer (see the module notes).
            mean, aggregated = fedavg_model(
                self.strategy, server, layout, accepted, metrics, weight_key
            )
            self._global = mean
            return mean, aggregated
        w_k = pending.params if pending.params is not None else previous
        model, inner_metrics = inner_model(
            self.strategy,
            server_round,
            self.compressor,
            layout,
            w_k,
            accepted,
            metrics,
            dict(record.client_levels),
        )
        if model is None:
            server.params = previous  # the model stays as it was
            return None, inner_metrics
        server.params = layout.flatten(model)
        self._global = model
        return model, inner_metrics

    # ----------------------------------------------------------------- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluation (on nodes the wrapper sampled, with ``sample_nodes``)."""
        if not self.sample_nodes:
            return list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        round_idx = self.server.round_idx if self.server is not None else server_round
        return sampled_messages(
            self,
            grid,
            round_idx,
            lambda view: self.strategy.configure_evaluate(server_round, arrays, config, view),
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's aggregate of the well-formed replies; the others are dropped."""
        weight_key = getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES_KEY)
        good = evaluate_replies(list(replies), weight_key)
        if not good:
            return None
        result: MetricRecord | None = self.strategy.aggregate_evaluate(server_round, good)
        return result

    # ----------------------------------------------------------------- the run

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's run loop; each round's ``aq-*`` figures join the server-side results.

        ``Result.evaluate_metrics_serverapp[round]`` holds what ``evaluate_fn``
        returned plus :func:`~adaquantfl.flower.rounds.server_metrics` (the
        user's keys are never overwritten).

        Raises
        ------
        NoAcceptedRepliesError
            If training rounds ran and none accepted a reply; after the first
            round in which no node runs ``adaquant_mod`` (see :meth:`aggregate_train`).
        """
        first = len(self.rounds)
        evaluate = with_server_metrics(
            evaluate_fn, self.rounds, first, lambda: self._require_server()[0].levels
        )
        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate
        )
        self.raise_if_nothing_accepted(first)
        return result

    def raise_if_nothing_accepted(self, first_round: int = 0) -> None:
        """Raise :class:`NoAcceptedRepliesError` if no round since ``first_round`` accepted a reply.

        :meth:`start` calls it at the end; call it after a loop of your own.
        """
        done = self.rounds[first_round:]
        if not done or any(r.participants for r in done):
            return
        if getattr(self.strategy, "fraction_train", None) != 0.0:  # training was asked for
            raise NoAcceptedRepliesError(why_nothing_accepted(done))

    # ----------------------------------------------------------------- helpers

    def _inner_train_messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        plan: Instruction,
    ) -> list[Message]:
        if not self.sample_nodes:
            return list(self.strategy.configure_train(server_round, arrays, config, grid))
        return sampled_messages(
            self,
            grid,
            plan.round_idx,
            lambda view: self.strategy.configure_train(server_round, arrays, config, view),
            probe=plan,
        )

    def _sync(self, arrays: ArrayRecord) -> tuple[FedServer, ArrayLayout]:
        if self.server is None or self.layout is None:
            self.layout = layout = ArrayLayout.of(arrays, self.uncompressed)
            limit = self.max_message_bytes or default_message_limit(layout.numel, self.compressor)
            self.server = FedServer(
                layout.flatten(arrays),
                self.policy,
                self.compressor,
                max_message_bytes=limit,
                record_digests=self.record_digests,
                max_weight_share=self.max_weight_share,
            )
            self._global = arrays
        elif arrays is not self._global:
            # Someone handed us a different model than the one we returned
            # (a custom loop); it becomes the global model.
            log(INFO, "configure_train: adopting the arrays passed in as the global model")
            self.server.params = self.layout.flatten(self.layout.adopt(arrays))
            self._global = arrays
        return self.server, self.layout

    def _require_server(self) -> tuple[FedServer, ArrayLayout]:
        if self.server is None or self.layout is None:  # aggregate_train before configure_train
            raise RuntimeError("no global model yet: configure_train has not run")
        return self.server, self.layout


class AdaQuantFedAvg(AdaQuant):
    """FedAvg whose nodes send quantized, encoded updates at the policy's levels.

    Parameters
    ----------
    policy : LevelPolicy or LevelSchedule
        The level policy (``FullPrecision()``, ``FixedLevels(s)``,
        ``AdaQuantLevels(s0)``, ...); the only positional argument besides
        ``compressor``.
    compressor : Compressor, optional
        Default: ``QSGDCompressor()``: packed, max-norm buckets of 512 (see :class:`AdaQuant`).
    seed : int
        Required, keyword only: the run seed (see :class:`AdaQuant`).
    num_clients, clients_per_round, node_wait_s, record_digests, \
max_message_bytes, max_weight_share, downlink, downlink_levels, uncompressed
        As in :class:`AdaQuant`.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in Flower's ``FedAvg`` (keywords); the inner FedAvg is ``.strategy``.
    """

    def __init__(
        self,
        policy: LevelPolicy | LevelSchedule,
        compressor: Compressor | None = None,
        *args: object,
        seed: int,
        num_clients: int | None = None,
        clients_per_round: int | None = None,
        node_wait_s: float = 60.0,
        record_digests: bool = True,
        max_message_bytes: int | None = None,
        max_weight_share: float | None = None,
        downlink: Compressor | None = None,
        downlink_levels: int | None = None,
        uncompressed: Collection[str] = BATCHNORM_BUFFERS,
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
        if args:
            raise _positional_error(
                type(self).__name__, _FEDAVG_USAGE, ("policy", "compressor"), len(args),
                ", FedAvg's options included,",
            )  # fmt: skip
        # The first argument first: FedAvg-style positional arguments
        # (AdaQuantFedAvg(0.5, ...)) land here.
        _check_policy(policy, f"{type(self).__name__}'s first argument (policy)")
        _check_fedavg(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        inner = FedAvg(
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
        super().__init__(
            inner,
            policy=policy,
            seed=seed,
            compressor=compressor,
            downlink=downlink,
            downlink_levels=downlink_levels,
            uncompressed=uncompressed,
            sample_nodes=True,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            node_wait_s=node_wait_s,
            record_digests=record_digests,
            max_message_bytes=max_message_bytes,
            max_weight_share=max_weight_share,
        )

    def __repr__(self) -> str:
        return f"AdaQuantFedAvg(policy={self.policy!r}, compressor={self.compressor!r})"


# --------------------------------------------------------------------------- argument checks


def _positional_error(
    name: str, usage: str, positional: tuple[str, ...], extra: int, note: str = ""
) -> TypeError:
    """The error for ``extra`` positional arguments beyond ``positional`` (e.g. FedAvg's)."""
    return TypeError(
        f"{name} takes {len(positional)} positional argument(s) ({', '.join(positional)}) "
        f"but {len(positional) + extra} were given; everything else{note} is a keyword "
        f"argument: {usage}"
    )


def _check_policy(policy: object, what: str = "policy") -> Any:
    """``policy`` as a :class:`LevelPolicy`, or a ValueError that says what a policy is."""
    try:
        return as_policy(policy)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(
            f"{what} must be a level policy of adaquantfl.policy, e.g. AdaQuantLevels(2), "
            f"FixedLevels(3) or FullPrecision() (or a schedule with .levels and .update(loss)), "
            f"got {type(policy).__name__} {policy!r}"
        ) from None


def _check_settings(
    name: str, strategy: object, args: tuple[object, ...], values: Mapping[str, Any]
) -> dict[str, Any]:
    """Check :class:`~adaquantfl.flower.AdaQuant`'s arguments; returns the normalised ones.

    Raises
    ------
    TypeError
        For extra positional arguments, or an inner strategy that is not a
        Flower strategy.
    ValueError
        For any other argument, naming it, what it must be, and what it got.
    """
    if args:
        raise _positional_error(name, _USAGE, ("the inner strategy",), len(args))
    if not isinstance(strategy, Strategy):
        raise TypeError(_not_a_strategy(name, strategy))
    if values["policy"] is None:
        raise TypeError(f"{name} needs a level policy, policy=...: {_USAGE}")
    out: dict[str, Any] = {"policy": _check_policy(values["policy"])}
    check_int("seed", values["seed"], -_INT64, _INT64 - 1)
    for key in ("compressor", "downlink"):
        if values[key] is not None:
            try:
                describe_compressor(values[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    if values["downlink_levels"] is not None:
        check_int("downlink_levels", values["downlink_levels"], 1, MAX_LEVELS)
        if values["downlink"] is None:
            raise ValueError("downlink_levels needs a downlink compressor (downlink=...)")
    uncompressed = values["uncompressed"]
    if (
        isinstance(uncompressed, str)
        or not isinstance(uncompressed, Collection)
        or not all(isinstance(u, str) and u for u in uncompressed)
    ):
        raise ValueError(
            f"uncompressed must be a collection of array names or name suffixes, "
            f"got {uncompressed!r}"
        )
    num_clients, per_round = values["num_clients"], values["clients_per_round"]
    if (num_clients is None) != (per_round is None):
        raise ValueError("num_clients and clients_per_round must be given together")
    if num_clients is not None:
        check_int("num_clients", num_clients, 1)
        check_int("clients_per_round", per_round, 1, num_clients)
        select_clients(num_clients, per_round, seed=values["seed"], round_idx=0)
        if not values["sample_nodes"]:
            raise ValueError(
                "num_clients and clients_per_round select nodes by client id, which the wrapper "
                "does itself: pass sample_nodes=True"
            )
    if values["sample_nodes"]:
        missing = [a for a in SAMPLING_ATTRIBUTES if not hasattr(strategy, a)]
        if missing:
            raise ValueError(
                f"sample_nodes=True reads FedAvg's sampling settings from the inner strategy; "
                f"{type(strategy).__name__} lacks {missing}"
            )
    check_real("node_wait_s", values["node_wait_s"], 0.0)
    out["max_weight_share"] = check_weight_share(values["max_weight_share"])
    limit = values["max_message_bytes"]
    if limit is not None:
        check_int("max_message_bytes (None: the model's default limit)", limit, 1)
    return out


def _not_a_strategy(name: str, strategy: object) -> str:
    """The error text for an inner strategy that is not one of Flower's Message API.

    The commonest case is a strategy of Flower's legacy API (``flwr.server.strategy``,
    ``fit``/``evaluate`` on ``Parameters``), whose classes have the same names as the
    Message API's (``flwr.serverapp.strategy``): say so, and name the import to use.
    """
    got = f"got {type(strategy).__name__} {strategy!r}"
    legacy = next(
        (c for c in type(strategy).__mro__ if c.__module__.startswith("flwr.server.strategy")),
        None,
    )
    if legacy is None or legacy.__name__ == "Strategy":
        return (
            f"{name} wraps a Flower strategy of flwr.serverapp.strategy (e.g. FedAvg(), "
            f"FedAdam()) as its first argument, {got}: {_USAGE}"
        )
    twin = legacy.__name__ if hasattr(serverapp_strategies, legacy.__name__) else "FedAvg"
    return (
        f"{name} wraps a Flower strategy as its first argument, {got}, which is Flower's "
        f"legacy strategy API (flwr.server.strategy). Use the Message API's: "
        f"`from flwr.serverapp.strategy import {twin}` (its options are renamed: "
        f"fraction_fit -> fraction_train, min_fit_clients -> min_train_nodes, "
        f"min_available_clients -> min_available_nodes), then {_USAGE}"
    )


def _check_fedavg(**values: Any) -> None:
    for name in ("fraction_train", "fraction_evaluate"):
        check_real(name, values[name], 0.0, 1.0)
    for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        check_int(name, values[name], 0)
