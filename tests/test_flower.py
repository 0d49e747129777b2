"""Tests of the Flower strategy and client mod, in process (no Ray, no network).

The Flower pieces run against :class:`tests.flower_helpers.InProcessGrid`, which
hands every message to a ClientApp in this process, so the tests exercise
Flower's own Message, records and ClientApp/mod machinery in milliseconds.
The Ray simulation engine is tested in test_flower_engine.py, real
SuperLink/SuperNode processes in test_flower_deployment.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed")

import hashlib
import importlib.util
import logging
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from adaquantfl.compression import QSGDCompressor
from adaquantfl.compression.codec import encode_dense, peek_header
from adaquantfl.fl.client import ClientReply
from adaquantfl.fl.record import RoundRecord
from adaquantfl.fl.server import FedServer, select_clients
from adaquantfl.flower import (
    AdaQuant,
    AdaQuantFedAvg,
    RecordError,
    adaquant_mod,
    make_adaquant_mod,
    server_metrics,
)
from adaquantfl.flower.layout import ArrayLayout
from adaquantfl.flower.messages import (
    LEVELS_KEY,
    LOSS_PROXY_KEY,
    PAYLOAD_KEY,
    PROBE_KEY,
    ROUND_KEY,
    SEED_KEY,
    DownlinkInstruction,
    Instruction,
    payload_array,
    read_train_reply,
)
from adaquantfl.policy import AdaQuantLevels, FixedLevels, FullPrecision, adaquant_levels
from adaquantfl.runner.build import build_model, build_server, load_data
from adaquantfl.runner.config import load_config
from adaquantfl.runner.flower_engine import (
    _raise_unexpected_failures,
    engine_client_app,
    flat_layout,
)
from tests.flower_helpers import (
    InProcessGrid,
    TinyNet,
    forget_warnings,
    initial_arrays,
    simulate,
    tiny_shards,
    user_client_app,
)

NUM_NODES = 4


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    forget_warnings()


def strategy_for(schedule: Any, **kwargs: Any) -> AdaQuantFedAvg:
    defaults: dict[str, Any] = {
        "seed": 3,
        "fraction_evaluate": 0.0,
        "min_train_nodes": NUM_NODES,
        "min_available_nodes": NUM_NODES,
        "node_wait_s": 1.0,
    }
    return AdaQuantFedAvg(schedule, QSGDCompressor(), **{**defaults, **kwargs})


def one_round(
    strategy: AdaQuantFedAvg, grid: InProcessGrid, arrays: ArrayRecord, server_round: int = 1
) -> tuple[list[Message], ArrayRecord | None, MetricRecord]:
    """One round by hand; the strategy's server-side figures of it (``aq-*``)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=5))
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    assert strategy.rounds[-1].round == server_round
    return messages, new_arrays, server_metrics(strategy.rounds[-1], strategy.server.levels)


# ------------------------------------------------------------------ same bytes as the simulator

SMALL = {
    "data": {"dataset": "digits", "num_clients": 3},
    "model": {"name": "logreg"},
    "train": {"rounds": 4, "local_steps": 3, "batch_size": 16, "lr": 0.1, "seed": 0,
              "vectorize": False},
}  # fmt: skip


@pytest.mark.parametrize(
    "compression",
    [
        {"method": "fp32"},
        {"method": "qsgd", "levels": 3},
        {"method": "adaquantfl", "levels": 2},
        {"method": "qsgd", "levels": 5, "bucket_size": 64, "norm": "max"},
        pytest.param(
            {"method": "qsgd", "levels": 5, "encoding": "entropy"},
            marks=pytest.mark.skipif(
                importlib.util.find_spec("adaquantfl.compression.entropy") is None,
                reason="the entropy encoding is not in this tree yet",
            ),
        ),
    ],
    ids=["fp32", "qsgd-s3", "adaquantfl-s2", "qsgd-s5-bucket64-max", "qsgd-s5-entropy"],
)
def test_strategy_and_mod_send_the_simulators_bytes(compression: dict[str, Any]) -> None:
    # Prepare: the engine's ClientApp (simulator's training + adaquant_mod) behind a grid.
    config = load_config({**SMALL, "compression": compression})
    sim_outcomes, sim_params = simulate(config)
    data = load_data(config)
    model, params = build_model(config, data)
    template = build_server(config, params)
    strategy = AdaQuantFedAvg(
        template.policy, template.compressor, seed=0,
        max_message_bytes=template.max_message_bytes, fraction_evaluate=0.0,
        min_train_nodes=3, min_available_nodes=3,
    )  # fmt: skip
    grid = InProcessGrid(engine_client_app(config), 3)

    # Execute
    result = strategy.start(
        grid, flat_layout(model).to_record(params), num_rounds=config.train.rounds, timeout=10
    )

    # Assert: the same payload hashes, levels and losses in every round, the same model.
    assert [r.digests for r in strategy.rounds] == [o.digests for o in sim_outcomes]
    assert all(len(o.digests) == 3 for o in sim_outcomes)
    assert [r.levels for r in strategy.rounds] == [o.levels for o in sim_outcomes]
    assert [r.train_loss for r in strategy.rounds] == [o.train_loss for o in sim_outcomes]
    assert torch.equal(strategy.server.params, sim_params)  # type: ignore[union-attr]
    assert torch.equal(flat_layout(model).flatten(result.arrays), sim_params)
    # The bytes Flower carried are the codec's bytes, and wire_bits counts exactly them.
    for r in range(config.train.rounds):
        replies = grid.replies[3 * r : 3 * r + 3]
        arrays = [m.content["arrays"][PAYLOAD_KEY] for m in replies]
        digests = sorted(
            (m.content["metrics"]["aq-client-id"], hashlib.sha256(a.data).hexdigest())
            for m, a in zip(replies, arrays, strict=True)
        )
        assert tuple(digests) == sim_outcomes[r].digests
        metrics = result.evaluate_metrics_serverapp[r + 1]
        assert metrics["aq-wire-bits"] == sum(8 * len(a.data) for a in arrays)
        assert metrics["aq-wire-bits"] == sim_outcomes[r].wire_bits
        assert metrics["aq-formula-bits"] == sim_outcomes[r].formula_bits
        assert metrics["aq-levels"] == (sim_outcomes[r].levels or 0)
        # The server's figures are not the clients' metrics.
        assert not any(k.startswith("aq-") for k in result.train_metrics_clientapp[r + 1])


def test_payload_array_is_the_bare_codec_message() -> None:
    # Prepare
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    strategy = strategy_for(FixedLevels(3))

    # Execute
    _, _, metrics = one_round(strategy, grid, initial_arrays())

    # Assert: uint8, 1-D, custom stype, starts with the codec's magic, not a .npy header.
    assert metrics is not None
    total = 0
    for reply in grid.replies:
        array = reply.content["arrays"][PAYLOAD_KEY]
        assert (array.dtype, tuple(array.shape), array.stype) == (
            "uint8", (len(array.data),), "adaquantfl.codec.v1"
        )  # fmt: skip
        assert array.data[:2] == b"AQ" and not array.data.startswith(b"\x93NUMPY")
        header = peek_header(array.data)
        assert (header.levels, header.numel, header.encoding) == (3, 5 * 3 + 3, "packed")
        total += len(array.data)
    assert metrics["aq-wire-bits"] == 8 * total
    # Negative control: the same bytes through Array(ndarray) would carry a .npy header.
    data = grid.replies[0].content["arrays"][PAYLOAD_KEY].data
    assert len(Array(np.frombuffer(data, dtype=np.uint8)).data) == len(data) + 128


# --------------------------------------------------------------------------- levels per node


def test_levels_are_sent_per_node_and_follow_the_schedule() -> None:
    # Prepare
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    strategy = strategy_for(AdaQuantLevels(2))
    arrays = initial_arrays()
    losses: list[float] = []

    for server_round in range(1, 6):
        # Execute
        messages, arrays, metrics = one_round(strategy, grid, arrays, server_round)  # type: ignore[assignment]
        assert metrics is not None and arrays is not None

        # Assert: every node gets its own ConfigRecord with this round's plan.
        configs = [m.content["config"] for m in messages]
        assert len(messages) == NUM_NODES and len({id(c) for c in configs}) == NUM_NODES
        assert {m.metadata.dst_node_id for m in messages} == set(grid.contexts)
        expected = 2 if not losses else adaquant_levels(losses[0], losses[-1], 2, 1, 2**16)
        for c in configs:
            assert (c[LEVELS_KEY], c[ROUND_KEY], c[SEED_KEY]) == (expected, server_round - 1, 3)
            assert c["server-round"] == server_round
        assert metrics["aq-levels"] == expected
        losses.append(float(metrics["aq-loss"]))
    assert losses[-1] < losses[0]
    assert strategy.server.levels == adaquant_levels(losses[0], losses[-1], 2, 1, 2**16)
    assert server_metrics(strategy.rounds[-1], strategy.server.levels)["aq-next-levels"] == (
        adaquant_levels(losses[0], losses[-1], 2, 1, 2**16)
    )


def test_fp32_sends_raw_float32_through_the_codec() -> None:
    # Prepare
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    strategy = strategy_for(FullPrecision())
    arrays = initial_arrays()

    # Execute
    messages, _, metrics = one_round(strategy, grid, arrays)

    # Assert
    assert metrics is not None
    assert all(m.content["config"][LEVELS_KEY] == 0 for m in messages)
    d = 5 * 3 + 3
    for reply in grid.replies:
        payload = reply.content["arrays"][PAYLOAD_KEY].data
        assert peek_header(payload).encoding == "raw"
        assert len(payload) == len(encode_dense(torch.zeros(d)))
    assert metrics["aq-levels"] == 0 and metrics["aq-formula-bits"] == NUM_NODES * 32 * d


# --------------------------------------------------------------------------- failures


def test_bad_or_missing_replies_are_dropped_and_the_round_goes_on() -> None:
    # Prepare: of 6 nodes, one raises, one replies with other record keys, one
    # sends bytes that do not decode, one never answers; two are fine.
    shards = tiny_shards(6)
    grid = InProcessGrid(user_client_app(shards), 6)
    raising, odd_keys, garbage, silent, *good = grid.contexts

    def raise_error(msg: Message, reply: Message) -> Message:
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"), reply_to=msg
        )

    def other_keys(msg: Message, reply: Message) -> Message:
        content = RecordDict(
            {"weights": reply.content["arrays"], "metrics": reply.content["metrics"]}
        )
        content["metrics"]["extra"] = 1.0
        content["more"] = MetricRecord({"x": 1})
        return Message(content, reply_to=msg)

    def bad_bytes(msg: Message, reply: Message) -> Message:
        reply.content["arrays"][PAYLOAD_KEY] = payload_array(b"AQ\x01garbage")
        return reply

    grid.tamper = {raising: raise_error, odd_keys: other_keys, garbage: bad_bytes}
    grid.drop = {silent}
    strategy = strategy_for(FixedLevels(7), min_train_nodes=6, min_available_nodes=6)
    arrays = initial_arrays()

    # Execute
    messages, new_arrays, metrics = one_round(strategy, grid, arrays)

    # Assert: the round aggregated the two good replies, exactly as FedServer would.
    assert len(messages) == 6 and new_arrays is not None and metrics is not None
    assert (metrics["aq-participants"], metrics["aq-rejected"], metrics["aq-dropped"]) == (2, 3, 1)
    outcome = strategy.rounds[0]
    assert {n for n, _ in outcome.failures} == {raising, odd_keys}
    garbage_client = grid.contexts[garbage].node_config["partition-id"]
    assert [c for c, _ in outcome.rejections] == [garbage_client]
    assert [n for n, _ in outcome.dropouts] == [silent]
    layout = ArrayLayout.of(arrays)
    reference = FedServer(layout.flatten(arrays), FixedLevels(7), QSGDCompressor())
    good_replies = [
        read_train_reply(r.content, layout).reply
        for r in grid.replies
        if r.metadata.src_node_id in good
    ]
    reference.aggregate(good_replies)
    assert torch.equal(layout.flatten(new_arrays), reference.params)
    assert not torch.equal(reference.params, layout.flatten(arrays))
    # Negative control: Flower's own FedAvg gives up on the whole round.
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_train(1, grid.replies)


def test_a_node_the_superlink_gives_up_on_is_dropped_once() -> None:
    # Prepare: the SuperLink answers for a node that stopped sending heartbeats
    # with an error reply of its own (from the SuperLink's node id), as Flower 1.42 does.
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    lost = grid.node_of(2)
    grid.tamper = {
        lost: lambda msg, reply: create_message_error_unavailable_res_message(
            msg.metadata, "node_unavail"
        )
    }
    strategy = strategy_for(FixedLevels(3))

    # Execute
    _, _, metrics = one_round(strategy, grid, initial_arrays())

    # Assert: one dropout, named after the lost node, not the SuperLink.
    (error,) = [r for r in grid.replies if r.has_error()]
    assert error.metadata.src_node_id not in grid.contexts
    assert metrics is not None
    assert (metrics["aq-participants"], metrics["aq-rejected"], metrics["aq-dropped"]) == (3, 0, 1)
    ((node, reason),) = strategy.rounds[0].dropouts
    assert node == lost and reason.startswith("error reply: the node stopped sending heartbeats")


ERROR_REPLIES = [
    # A SuperNode's flwr-clientapp process (flwr/supernode/runtime/run_clientapp.py).
    (ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
     "<class 'TypeError'>:<'Got unsupported ScalarType BFloat16'>",
     "error reply: the node's ClientApp raised an exception: TypeError: Got unsupported "
     "ScalarType BFloat16"),
    # The simulation engine (flwr/server/superlink/fleet/vce/vce_api.py), which keeps
    # only the exception's text.
    (ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
     "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
     "ClientAppException occurred. Message: Got unsupported ScalarType BFloat16'>",
     "error reply: the node's ClientApp raised an exception: Got unsupported ScalarType "
     "BFloat16"),
    (ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
     "An exception was raised when attempting to load `ClientApp`",
     "error reply: the node could not load its ClientApp: An exception was raised when "
     "attempting to load `ClientApp`"),
    (ErrorCode.CLIENT_APP_CRASHED, "ClientApp stopped responding.",
     "error reply: the node's ClientApp stopped responding: ClientApp stopped responding."),
    (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "",
     "error reply: the node's ClientApp raised an exception"),
    (99, "new in a later Flower", "error reply: the node reported Flower error code 99: new "
     "in a later Flower"),
]  # fmt: skip


@pytest.mark.parametrize("code, reason, described", ERROR_REPLIES)
def test_an_error_reply_is_described_in_words(code: int, reason: str, described: str) -> None:
    """What a round records of an error reply: the code's meaning and the node's own text.

    Before, it recorded "error reply (2): <class 'TypeError'>:<'...'>", Flower's
    code number and wrapping as they came.
    """
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    failing = grid.node_of(1)
    grid.tamper = {failing: lambda msg, reply: Message(Error(code, reason), reply_to=msg)}
    strategy = strategy_for(FixedLevels(3))

    one_round(strategy, grid, initial_arrays())

    assert strategy.rounds[0].failures == ((failing, described),)


def test_mod_fails_clearly_without_any_loss() -> None:
    # Prepare: a train function that reports no loss, then one that names it differently.
    shards = tiny_shards(NUM_NODES)
    silent = InProcessGrid(user_client_app(shards, loss_key=None), NUM_NODES)
    renamed = InProcessGrid(
        user_client_app(
            shards, loss_key="loss-before", mods=[make_adaquant_mod(loss_key="loss-before")]
        ),
        NUM_NODES,
    )

    # Execute
    _, _, failed = one_round(strategy_for(FixedLevels(3)), silent, initial_arrays())
    _, _, ok = one_round(strategy_for(FixedLevels(3)), renamed, initial_arrays())

    # Assert: every node's reply is an error naming the missing metrics; none is invented.
    assert (failed["aq-participants"], failed["aq-rejected"]) == (0, NUM_NODES)
    for r in silent.replies:
        assert r.has_error()
        assert "'pre-train-loss'" in r.error.reason and "'train_loss'" in r.error.reason
    assert ok["aq-participants"] == NUM_NODES and ok["aq-loss"] > 0
    assert all(r.content["metrics"][LOSS_PROXY_KEY] == 0 for r in renamed.replies)


def flower_template_app(shards: list[Any], mods: list[Any]) -> ClientApp:
    """A train function as Flower's app templates write it: ``train_loss`` after training."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        shard = shards[int(context.node_config["partition-id"])]
        model = TinyNet()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        running = 0.0
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(shard.x), shard.y)
            loss.backward()
            opt.step()
            running += loss.item()
        metrics = {"train_loss": running / 3, "num-examples": len(shard)}
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=msg)

    return app


def test_mod_runs_a_stock_flower_train_function_on_its_train_loss() -> None:
    # Prepare: Flower's template train function, which reports no pre-training loss.
    shards = tiny_shards(NUM_NODES)
    stock = InProcessGrid(flower_template_app(shards, [adaquant_mod]), NUM_NODES)
    strict = InProcessGrid(
        flower_template_app(shards, [make_adaquant_mod(fallback_loss_key=None)]), NUM_NODES
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    FLOWER_LOGGER.addHandler(handler)

    # Execute
    try:
        _, _, first = one_round(strategy := strategy_for(FixedLevels(3)), stock, initial_arrays())
        _, _, second = one_round(strategy, stock, initial_arrays(), 2)
        _, _, refused = one_round(strategy_for(FixedLevels(3)), strict, initial_arrays())
    finally:
        FLOWER_LOGGER.removeHandler(handler)

    # Assert: every node takes part; the loss fed to the schedule is the reported
    # train_loss, flagged as a proxy; mod and strategy each warn once, not every round.
    assert first["aq-participants"] == second["aq-participants"] == NUM_NODES
    for reply in stock.replies:
        metrics = reply.content["metrics"]
        assert metrics["aq-loss"] == metrics["train_loss"] and "pre-train-loss" not in metrics
        assert metrics[LOSS_PROXY_KEY] == 1
    expected = np.average(
        [r.content["metrics"]["train_loss"] for r in stock.replies[:NUM_NODES]],
        weights=[r.content["metrics"]["num-examples"] for r in stock.replies[:NUM_NODES]],
    )
    assert strategy.rounds[0].train_loss == pytest.approx(expected, rel=1e-6)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    # One mod instance serves every node of this in-process app: one warning.
    assert sum("the AdaQuantFL policy is fed 'train_loss'" in w for w in warnings) == 1
    assert sum("send their train function's training loss" in w for w in warnings) == 1
    # With the fallback off the same function is refused, naming the metric.
    assert refused["aq-participants"] == 0
    assert all("'pre-train-loss'" in r.error.reason for r in strict.replies)


def test_mod_leaves_other_messages_alone() -> None:
    # Prepare
    grid = InProcessGrid(user_client_app(tiny_shards(2)), 2)
    node = next(iter(grid.contexts))
    arrays = initial_arrays()
    plain_train = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})}), node, MessageType.TRAIN
    )
    evaluate = Message(RecordDict({"arrays": arrays}), node, MessageType.EVALUATE)

    # Execute
    train_reply, eval_reply = grid.send_and_receive([plain_train, evaluate])

    # Assert: a plain FedAvg train reply keeps the user's float arrays; evaluate is untouched.
    assert set(train_reply.content["arrays"].keys()) == {"fc.weight", "fc.bias"}
    assert train_reply.content["arrays"]["fc.weight"].stype == "numpy.ndarray"
    assert set(eval_reply.content["metrics"].keys()) == {"eval-loss", "num-examples"}


# --------------------------------------------------------------------------- sampling and waiting


def test_waiting_for_nodes_is_bounded() -> None:
    # Prepare: 1 of the 4 required nodes is connected.
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    grid.available = {next(iter(grid.contexts))}
    strategy = strategy_for(FixedLevels(3), node_wait_s=0.3)

    # Execute
    start = time.monotonic()
    messages, _, metrics = one_round(strategy, grid, initial_arrays())

    # Assert: the round went on with the one node instead of waiting forever.
    assert time.monotonic() - start < 3
    assert len(messages) == 1 and metrics is not None and metrics["aq-participants"] == 1


def test_participants_are_chosen_by_client_id_like_the_simulator() -> None:
    # Prepare
    grid = InProcessGrid(user_client_app(tiny_shards(5)), 5)
    strategy = strategy_for(FixedLevels(3), num_clients=5, clients_per_round=2,
                            min_train_nodes=1, min_available_nodes=5)  # fmt: skip
    arrays = initial_arrays()

    for server_round in (1, 2, 3):
        # Execute
        before = len(grid.sent)
        messages, arrays, metrics = one_round(strategy, grid, arrays, server_round)  # type: ignore[assignment]

        # Assert: the trained clients are select_clients' choice; the first round
        # probed every node for its id (no model sent), later rounds did not.
        chosen = select_clients(5, 2, seed=3, round_idx=server_round - 1)
        assert sorted(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"]
                      for m in messages) == chosen  # fmt: skip
        probes = [m for m in grid.sent[before:] if m.content["config"].get(PROBE_KEY) == 1]
        assert len(probes) == (5 if server_round == 1 else 0)
        assert all(not p.content.array_records for p in probes)
        assert metrics is not None and metrics["aq-participants"] == 2
        assert [c for c, _ in strategy.rounds[-1].digests] == chosen


def test_aggregate_evaluate_drops_a_malformed_reply() -> None:
    # Prepare: one evaluate reply lacks num-examples.
    grid = InProcessGrid(user_client_app(tiny_shards(3)), 3)
    strategy = strategy_for(FixedLevels(3), fraction_evaluate=1.0, min_evaluate_nodes=3,
                            min_available_nodes=3)  # fmt: skip
    bad = next(iter(grid.contexts))
    grid.tamper = {
        bad: lambda msg, reply: Message(
            RecordDict({"metrics": MetricRecord({"eval-loss": 99.0})}), reply_to=msg
        )
    }
    messages = strategy.configure_evaluate(1, initial_arrays(), ConfigRecord(), grid)

    # Execute
    replies = list(grid.send_and_receive(messages))
    metrics = strategy.aggregate_evaluate(1, replies)

    # Assert: the other two are averaged; Flower's FedAvg would have dropped everything.
    good = [r for r in replies if r.metadata.src_node_id != bad]
    n = [r.content["metrics"]["num-examples"] for r in good]
    mean = sum(r.content["metrics"]["eval-loss"] * k for r, k in zip(good, n, strict=True)) / sum(n)
    assert metrics is not None and math.isclose(metrics["eval-loss"], mean, rel_tol=1e-12)
    with pytest.raises(InconsistentMessageReplies):
        FedAvg().aggregate_evaluate(1, replies)


def test_a_reply_the_inner_strategy_refuses_leaves_the_model_and_the_round_standing() -> None:
    # Prepare: an inner strategy that is not FedAvg (so it aggregates the nodes'
    # models itself), and one node whose reply names its records differently,
    # which Flower's strategies refuse for the whole round.
    from flwr.serverapp.strategy import FedAdam

    grid = InProcessGrid(user_client_app(tiny_shards(3)), 3)
    inner = FedAdam(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    strategy = AdaQuant(inner, policy=FixedLevels(3), seed=3, node_wait_s=1.0)
    renamed = next(iter(grid.contexts))

    def rename(msg: Message, reply: Message) -> Message:
        c = reply.content
        records = {**{f"x-{k}": v for k, v in c.array_records.items()},
                   **{f"x-{k}": v for k, v in c.metric_records.items()}}  # fmt: skip
        return Message(RecordDict(records), reply_to=msg)

    grid.tamper = {renamed: rename}
    arrays = initial_arrays()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    before = strategy.server.params.clone()

    # Execute: Flower's FedAdam raises InconsistentMessageReplies on these replies.
    replies = list(grid.send_and_receive(messages, timeout=5))
    with pytest.raises(InconsistentMessageReplies):
        FedAdam().aggregate_train(1, replies)
    new_arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: no exception, the global model unchanged, the round recorded.
    assert new_arrays is None
    assert torch.equal(strategy.server.params, before)
    assert [r.round for r in strategy.rounds] == [1]
    assert strategy.rounds[0].participants == 3


# --------------------------------------------------------------------------- records


def test_the_package_exports_only_what_a_flower_user_touches() -> None:
    import adaquantfl.flower as flower

    # The strategies, the mod, the record helper and metric names a user's app
    # touches, the errors it may catch; the message layout stays internal.
    assert sorted(flower.__all__) == sorted(
        ["AdaQuant", "AdaQuantFedAvg", "adaquant_mod", "make_adaquant_mod",
         "record_from_state_dict", "BATCHNORM_BUFFERS", "PRE_TRAIN_LOSS_KEY",
         "SERVER_METRICS", "server_metrics", "NoAcceptedRepliesError", "MissingModError",
         "RecordError"]
    )  # fmt: skip
    assert all(getattr(flower, name) is not None for name in flower.__all__)
    assert not hasattr(flower, "Instruction") and not hasattr(flower, "payload_array")


def test_round_plan_round_trips_and_rejects_bad_values() -> None:
    plan = Instruction(7, 11, 4, QSGDCompressor("entropy", 32, "max"))
    assert Instruction.from_config(plan.to_config()) == plan
    full_precision = Instruction(None, 0, 0, QSGDCompressor())
    assert Instruction.from_config(full_precision.to_config()).levels is None
    bad = [
        (LEVELS_KEY, -1, LEVELS_KEY),
        (LEVELS_KEY, 1.5, LEVELS_KEY),
        (ROUND_KEY, -3, ROUND_KEY),
        ("aq-compressor-options", '{"norm": "l3"}', "norm"),
        ("aq-compressor-options", "{not json", "'aq-compressor-options' is not valid JSON"),
        ("aq-compressor-options", '{"bucket": 3}', "unknown compressor 'qsgd' option"),
        ("aq-compressor", "zip", "unknown compressor 'zip'"),
        ("aq-error-feedback", 2, "aq-error-feedback"),
    ]
    for key, value, message in bad:
        with pytest.raises(RecordError, match=message):
            Instruction.from_config({**plan.to_config(), key: value})


# --------------------------------------------------------------------------- JSON in a message

#: Deep enough that json.loads, left to itself, raises RecursionError.
DEEP = 100_000
#: The deepest JSON a message may carry, and the longest, per key (docs/flower.md).
MAX_DEPTH = 32
MAX_CHARS = {
    "aq-compressor-options": 2**16,
    "aq-downlink-options": 2**16,
    "aq-uncompressed": 2**24,
    "aq-layout": 2**24,
}


def downlink_plan() -> Instruction:
    """A plan with every JSON key: options of both compressors, side arrays and a layout."""
    layout = ArrayLayout.of(initial_arrays(), uncompressed=("bias",))
    down = DownlinkInstruction(QSGDCompressor(), levels=15, base=None, layout=layout)
    return Instruction(7, 11, 4, QSGDCompressor(), uncompressed=layout.side, downlink=down)


@pytest.mark.parametrize("key", list(MAX_CHARS))
def test_json_nested_too_deep_in_a_train_instruction_is_refused_naming_the_key(key: str) -> None:
    """JSON nested 100,000 deep in an instruction: the mod's own refusal, no RecursionError.

    Before, json.loads recursed into it and raised RecursionError, which is no
    RecordError and names no key.
    """
    # Prepare: arrays, objects, and brackets that never close, as deep as the key's
    # length limit allows (100,000; 10,922 for a compressor's options).
    config = downlink_plan().to_config()
    depth = min(DEEP, MAX_CHARS[key] // 6)
    deep = {
        "arrays": "[" * depth + "]" * depth,
        "objects": '{"a":' * depth + "1" + "}" * depth,
        "unclosed": "[" * depth,
    }

    # Execute / Assert
    for value in deep.values():
        with pytest.raises(
            RecordError,
            match=f"train config '{key}' nests JSON {depth} levels "
            f"deep, deeper than the {MAX_DEPTH} allowed",
        ):
            Instruction.from_config({**config, key: value})
    # 100,000 deep is refused too, naming the key, whichever limit it meets first.
    with pytest.raises(RecordError, match=f"train config '{key}' (nests|is 200,000 char)"):
        Instruction.from_config({**config, key: "[" * DEEP + "]" * DEEP})


@pytest.mark.parametrize("key", list(MAX_CHARS))
def test_oversized_json_in_a_train_instruction_is_refused_before_it_is_parsed(key: str) -> None:
    """A JSON value longer than its key's limit is refused by length, before parsing.

    Before, any length was parsed.
    """
    config = downlink_plan().to_config()
    limit = MAX_CHARS[key]
    value = '["' + "x" * (limit - 3) + '"]'  # limit + 1 characters
    with pytest.raises(RecordError) as error:
        Instruction.from_config({**config, key: value})
    assert str(error.value)[:200] == (
        f"train config '{key}' is {limit + 1:,} characters of JSON, more than the {limit:,} allowed"
    )


def test_legitimately_nested_json_in_a_train_instruction_still_parses() -> None:
    # Control for the two tests above: the plan with every JSON key round-trips, and
    # brackets inside JSON strings (array names may hold them) do not count as nesting.
    plan = downlink_plan()
    assert Instruction.from_config(plan.to_config()) == plan
    names = ("blocks[0].bn.running_var", 'odd"[[[[' * 40, "back\\slash[" * 40)
    with_brackets = replace(plan, uncompressed=names)
    assert Instruction.from_config(with_brackets.to_config()).uncompressed == names
    # Nesting up to the limit reaches the compressor's own check of its options.
    nested = '{"bucket_size": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    with pytest.raises(RecordError, match="bucket_size") as error:
        Instruction.from_config({**plan.to_config(), "aq-compressor-options": nested})
    assert "nests JSON" not in str(error.value)
    # One level more is refused by depth.
    deeper = '{"bucket_size": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    with pytest.raises(RecordError, match="nests JSON 33 levels deep"):
        Instruction.from_config({**plan.to_config(), "aq-compressor-options": deeper})


def test_the_mod_refuses_over_deep_json_with_an_error_reply_naming_the_key() -> None:
    """A train message whose compressor options nest 10,000 deep, through adaquant_mod.

    Before, the ClientApp failed with RecursionError ("maximum recursion depth exceeded").
    """
    # Prepare
    grid = InProcessGrid(user_client_app(tiny_shards(1)), 1)
    config = ConfigRecord(
        {**Instruction(3, 0, 0, QSGDCompressor()).to_config(),
         "aq-compressor-options": "[" * 10_000 + "]" * 10_000}
    )  # fmt: skip
    msg = Message(RecordDict({"arrays": initial_arrays(), "config": config}),
                  next(iter(grid.contexts)), MessageType.TRAIN)  # fmt: skip

    # Execute
    (reply,) = grid.send_and_receive([msg])

    # Assert
    assert reply.has_error()
    assert "'aq-compressor-options' nests JSON 10000 levels deep" in reply.error.reason
    assert "recursion" not in reply.error.reason


def test_read_train_reply_rejects_npy_payloads() -> None:
    layout = ArrayLayout(("w",), ((3,),))
    payload = payload_array(b"AQ-bytes")
    metrics = MetricRecord({"aq-client-id": 1, "aq-loss": 0.5, "num-examples": 3})
    ok = read_train_reply(
        RecordDict({"arrays": ArrayRecord({PAYLOAD_KEY: payload}), "m": metrics}), layout
    )
    assert ok.reply == ClientReply(1, b"AQ-bytes", 0.5, 3)
    npy = Array(np.frombuffer(b"AQ-bytes", dtype=np.uint8))
    with pytest.raises(RecordError, match="stype"):
        read_train_reply(
            RecordDict({"arrays": ArrayRecord({PAYLOAD_KEY: npy}), "m": metrics}), layout
        )
    with pytest.raises(RecordError, match="aq-client-id"):
        del metrics["aq-client-id"]
        read_train_reply(
            RecordDict({"arrays": ArrayRecord({PAYLOAD_KEY: payload}), "m": metrics}), layout
        )


def test_engine_raises_on_client_failures_other_than_divergence() -> None:
    # The simulator counts a diverged client as failed and goes on; anything
    # else a client raises is a bug that the simulator would have raised too.
    diverged = "client 3: local training diverged in round 0 (5 non-finite entries ...)"
    fine = RoundRecord(1, 2, 1, 1, 0, 0, 0, 1.0, failures=((7, f"error reply (2): {diverged}"),))
    _raise_unexpected_failures(fine)
    broken = replace(fine, failures=((7, "error reply (2): KeyError: 'partition-id'"),))
    with pytest.raises(RuntimeError, match=r"node 7: .*partition-id"):
        _raise_unexpected_failures(broken)
    lost = replace(fine, failures=(), dropouts=((8, "no reply before the round's timeout"),))
    with pytest.raises(RuntimeError, match="node 8"):
        _raise_unexpected_failures(lost)
