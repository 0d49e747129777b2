"""``AdaQuant`` around Flower's own strategies, and no silent misuse.

Each inner strategy runs in Flower's simulation of a federation in process
(:class:`tests.flower_helpers.InProcessGrid`: Flower's Message, records and
ClientApp/mod machinery, no Ray). The model each round must be what the
inner strategy makes of the nodes' models ``w_k + C(Delta_i)``, computed here
independently from the decoded payloads; the level policy must see
``F(w_k)`` from the nodes' losses whatever the inner strategy does.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed")

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Parameters
from flwr.server.strategy import FedAdam as LegacyFedAdam
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
)

from adaquantfl.compression import QSGDCompressor
from adaquantfl.flower import AdaQuant, AdaQuantFedAvg, NoAcceptedRepliesError, adaquant_mod
from adaquantfl.flower.layout import ArrayLayout
from adaquantfl.flower.messages import PAYLOAD_KEY, payload_array
from adaquantfl.flower.mod import load_replica
from adaquantfl.policy import AdaQuantLevels, FixedLevels
from tests.flower_helpers import (
    InProcessGrid,
    forget_warnings,
    initial_arrays,
    tiny_shards,
    user_client_app,
)
from tests.test_flower import flower_template_app

NUM_NODES = 4
LEVELS = 3
SAMPLING = {
    "fraction_evaluate": 0.0,
    "min_train_nodes": NUM_NODES,
    "min_available_nodes": NUM_NODES,
}


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    forget_warnings()


def start(s: AdaQuant, grid: InProcessGrid, rounds: int = 1) -> tuple[dict[int, ArrayRecord], Any]:
    """Run ``rounds`` rounds; the global model after each (0: initial) and the Result."""
    models: dict[int, ArrayRecord] = {}
    result = s.start(grid, initial_arrays(), num_rounds=rounds, timeout=5,
                     evaluate_fn=lambda r, a: models.__setitem__(r, a))  # fmt: skip
    return models, result


def nodes_models(grid: InProcessGrid, w_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each replying node's ``w_k + C(Delta_i)`` (decoded here) and its weight ``n_i``."""
    replies = sorted(grid.replies, key=lambda m: m.content["metrics"]["aq-client-id"])
    models, weights = [], []
    for reply in replies:
        payload = bytes(reply.content["arrays"][PAYLOAD_KEY].data)
        update = QSGDCompressor().decompress(payload, numel=w_k.size, levels=LEVELS)
        models.append(w_k + update.numpy())
        weights.append(reply.content["metrics"]["num-examples"])
    return np.stack(models), np.asarray(weights, dtype=np.float64)


def flat(record: ArrayRecord) -> np.ndarray:
    return ArrayLayout.of(record).flatten(record).numpy()


# --------------------------------------------------------------------------- inner strategies


@pytest.mark.parametrize("inner", ["FedAvg", "FedProx", "FedAdam", "FedTrimmedAvg"])
def test_the_wrapper_hands_the_inner_strategy_the_nodes_models(inner: str) -> None:
    # Prepare
    strategies = {
        "FedAvg": lambda: FedAvg(**SAMPLING),
        "FedProx": lambda: FedProx(**SAMPLING, proximal_mu=0.5),
        "FedAdam": lambda: FedAdam(**SAMPLING, eta=0.05),
        "FedTrimmedAvg": lambda: FedTrimmedAvg(**SAMPLING, beta=0.25),
    }
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    s = AdaQuant(strategies[inner](), policy=FixedLevels(LEVELS), seed=0)

    # Execute
    models, result = start(s, grid)

    # Assert: the new model is the inner strategy's math on the nodes' models.
    w0 = flat(initial_arrays())
    x, n = nodes_models(grid, w0)
    p = n / n.sum()
    got = flat(models[1])
    if inner in ("FedAvg", "FedProx"):  # FedServer's exact weighted mean
        np.testing.assert_allclose(got, np.tensordot(p, x, axes=1), rtol=0, atol=1e-6)
        assert np.array_equal(got, s.server.params.numpy())  # type: ignore[union-attr]
    elif inner == "FedAdam":  # Adam on delta = mean - w_0, round 1 (Flower's formula)
        delta = np.tensordot(p, x, axes=1) - w0
        eta = 0.05 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
        adam = w0 + eta * (0.1 * delta) / (np.sqrt(0.01 * delta**2) + 1e-3)
        np.testing.assert_allclose(got, adam, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, np.tensordot(p, x, axes=1), atol=1e-4)
    else:  # trimmed mean: drop the smallest and largest of 4 per coordinate, unweighted
        np.testing.assert_allclose(got, np.sort(x, axis=0)[1:3].mean(axis=0), atol=1e-6)
    assert {a.dtype for a in models[1].values()} == {"float32"}  # FedAdam returns float64
    # The policy's input is the nodes' weighted pre-training loss, not the inner math.
    ordered = sorted(grid.replies, key=lambda m: m.content["metrics"]["aq-client-id"])
    loss = np.average([m.content["metrics"]["aq-loss"] for m in ordered], weights=n)
    assert s.rounds[0].train_loss == pytest.approx(loss, rel=1e-12)
    # The nodes' own metrics, aggregated by the inner strategy; ours server-side.
    assert set(result.train_metrics_clientapp[1]) == {"train-steps", "pre-train-loss"}
    server = result.evaluate_metrics_serverapp[1]
    assert server["aq-participants"] == NUM_NODES and server["aq-levels"] == LEVELS
    config = grid.sent[0].content["config"]
    assert config["aq-levels"] == LEVELS and config["server-round"] == 1
    if inner == "FedProx":
        assert config["proximal-mu"] == 0.5


def test_a_bad_reply_never_reaches_the_inner_strategy() -> None:
    # Prepare: one node of four sends bytes that do not decode; FedTrimmedAvg inside.
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    bad = grid.node_of(1)

    def garbage(msg: Message, reply: Message) -> Message:
        reply.content["arrays"][PAYLOAD_KEY] = payload_array(b"AQ\x01garbage")
        return reply

    grid.tamper = {bad: garbage}
    s = AdaQuant(FedTrimmedAvg(**SAMPLING, beta=0.25), policy=FixedLevels(LEVELS), seed=0)

    # Execute
    models, result = start(s, grid)

    # Assert: three models reach the trimmed mean (which then trims nothing: int(0.75) = 0).
    assert result.evaluate_metrics_serverapp[1]["aq-rejected"] == 1
    grid.replies = [r for r in grid.replies if r.metadata.src_node_id != bad]
    x, _ = nodes_models(grid, flat(initial_arrays()))
    np.testing.assert_allclose(flat(models[1]), x.mean(axis=0), atol=1e-6)


def test_a_dp_wrapper_inside_clips_each_nodes_decoded_update() -> None:
    # Prepare: Flower's server-side fixed clipping (no noise) around FedAvg, inside
    # AdaQuant, at a norm below every node's update (theirs are 0.92 to 1.01).
    clip = 0.4
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    dp = DifferentialPrivacyServerSideFixedClipping(FedAvg(**SAMPLING), 0.0, clip, NUM_NODES)
    s = AdaQuant(dp, policy=FixedLevels(LEVELS), seed=0)

    # Execute
    models, _ = start(s, grid)

    # Assert: w_1 = w_0 + sum_i p_i min(1, C / ||u_i||) u_i, with u_i = C(Delta_i)
    # decoded here from each node's payload: the clip acts on what the node sent.
    w0 = flat(initial_arrays())
    x, n = nodes_models(grid, w0)
    updates = x - w0
    norms = np.linalg.norm(updates.astype(np.float64), axis=1)
    assert (norms > 2 * clip).all()  # the clip binds for every node, by a factor of 2
    p = n / n.sum()
    clipped = w0 + p @ (updates * (clip / norms)[:, None])
    np.testing.assert_allclose(flat(models[1]), clipped, rtol=0, atol=1e-6)
    # Control: the plain weighted mean is far from that (the clip changed the model).
    assert np.abs(flat(models[1]) - (w0 + p @ updates)).max() > 0.1
    assert s.rounds[0].participants == NUM_NODES


# --------------------------------------------------------------------------- misuse


def test_a_clientapp_without_the_mod_fails_the_run_with_one_clear_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the user forgot adaquant_mod.
    caplog.set_level(logging.WARNING)
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES), mods=[]), NUM_NODES)
    s = AdaQuantFedAvg(AdaQuantLevels(2), seed=0, **SAMPLING)

    # Execute
    with pytest.raises(NoAcceptedRepliesError) as error:
        start(s, grid, rounds=3)

    # Assert: the run fails naming adaquant_mod; the explanation is logged once, not
    # once per node; the model never changed, and no round ran after the first.
    assert "ClientApp(mods=[adaquant_mod])" in str(error.value)
    assert "no adaquant_mod on the node" in str(error.value)
    explained = [r for r in caplog.records if "does not run adaquant_mod" in r.getMessage()]
    assert len(explained) == 1 and explained[0].levelno == logging.ERROR
    assert [r.participants for r in s.rounds] == [0]


def test_a_run_without_the_mod_on_any_node_stops_after_its_first_round() -> None:
    """No node runs adaquant_mod: the run stops after round 1, not after all its rounds.

    Before, the missing mod was explained in round 1, but the run went on through every
    round (each node trained ten times for nothing) before it failed at the end.
    """
    # Prepare: the ClientApp counts the rounds its train function is asked to run.
    rounds_seen: list[int] = []

    def count(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type.startswith("train"):
            rounds_seen.append(int(msg.content["config"]["server-round"]))
        return call_next(msg, context)

    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES), mods=[count]), NUM_NODES)
    s = AdaQuant(FedAdam(**SAMPLING, eta=0.01), policy=AdaQuantLevels(2), seed=0)

    # Execute
    with pytest.raises(NoAcceptedRepliesError) as error:
        start(s, grid, rounds=10)

    # Assert: one round of training messages, then the error with the fix.
    assert rounds_seen == [1] * NUM_NODES
    assert len(s.rounds) == 1 and s.rounds[0].participants == 0
    # The model's arrays the nodes sent back crossed the network: they are wire bits.
    carried = sum(len(a.data) for m in grid.replies for a in m.content["arrays"].values())
    assert s.rounds[0].wire_bits == 8 * carried > 0
    text = str(error.value)
    assert "training round 1" in text and "the run stops" in text
    assert (
        f"no adaquant_mod on the node (its reply holds the model's own arrays) "
        f"({NUM_NODES}x)" in text
    )
    assert "ClientApp(mods=[adaquant_mod])" in text


def test_a_node_without_the_mod_among_nodes_with_it_does_not_stop_the_run() -> None:
    # Prepare: only one of four nodes lacks the mod; another's reply is lost.
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    plain = grid.node_of(1)
    no_mod = user_client_app(tiny_shards(NUM_NODES), mods=[])
    grid.tamper = {plain: lambda msg, reply: no_mod(msg, grid.contexts[plain])}
    grid.drop = {grid.node_of(2)}
    s = AdaQuant(FedAvg(**SAMPLING), policy=FixedLevels(LEVELS), seed=0)

    # Execute
    start(s, grid, rounds=3)

    # Assert: every round ran with the two nodes that reply with a payload.
    assert [(r.participants, r.rejected, r.dropped) for r in s.rounds] == [(2, 1, 1)] * 3


def test_without_the_mod_and_selection_by_client_id_the_run_fails_too() -> None:
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES), mods=[]), NUM_NODES)
    s = AdaQuantFedAvg(FixedLevels(2), seed=0, num_clients=NUM_NODES, clients_per_round=2,
                       node_wait_s=1.0, **SAMPLING)  # fmt: skip
    with pytest.raises(NoAcceptedRepliesError, match="no node"):
        start(s, grid, rounds=2)


CONSTRUCTOR_ERRORS = [
    (lambda: AdaQuantFedAvg(2, seed=0), ValueError,
     "first argument (policy) must be a level policy of adaquantfl.policy, e.g. "
     "AdaQuantLevels(2), FixedLevels(3) or FullPrecision() (or a schedule with .levels and "
     ".update(loss)), got int 2"),
    (lambda: AdaQuantFedAvg(0.5, 0.5, 2, 2, 2, seed=0), TypeError,
     "AdaQuantFedAvg takes 2 positional argument(s) (policy, compressor) but 5 were given; "
     "everything else, FedAvg's options included, is a keyword argument"),
    (lambda: AdaQuantFedAvg(AdaQuantLevels(2)), TypeError, "missing 1 required keyword-only "
     "argument: 'seed'"),
    (lambda: AdaQuantFedAvg(AdaQuantLevels(2), 0.5, seed=0), ValueError,
     "compressor: compressor must be a compressor of adaquantfl.compression"),
    (lambda: AdaQuantFedAvg(AdaQuantLevels(2), seed=0, fraction_train=2), ValueError,
     "fraction_train must be a finite number in [0, 1], got 2"),
    (lambda: AdaQuantFedAvg(AdaQuantLevels(2), seed="0"), ValueError, "seed must be an integer"),
    (lambda: AdaQuant(AdaQuantLevels(2), policy=AdaQuantLevels(2), seed=0), TypeError,
     "AdaQuant wraps a Flower strategy of flwr.serverapp.strategy (e.g. FedAvg(), FedAdam()) "
     "as its first argument"),
    (lambda: AdaQuant(FedAvg(), AdaQuantLevels(2), seed=0), TypeError,
     "AdaQuant takes 1 positional argument(s) (the inner strategy) but 2 were given"),
    (lambda: AdaQuant(FedAvg(), policy=AdaQuantLevels(2), seed=0, num_clients=4,
                      clients_per_round=2), ValueError, "pass sample_nodes=True"),
    (lambda: AdaQuant(FedAvg(), policy=AdaQuantLevels(2), seed=0, downlink_levels=7),
     ValueError, "downlink_levels needs a downlink compressor"),
    (lambda: AdaQuant(FedAvg(), policy=AdaQuantLevels(2), seed=0, uncompressed="bn"),
     ValueError, "uncompressed must be a collection of array names"),
    (lambda: AdaQuantFedAvg(AdaQuantLevels(2), seed=0, max_weight_share=2),
     ValueError, "max_weight_share must be in (0, 1] or None, got 2"),
]  # fmt: skip


@pytest.mark.parametrize(
    "legacy, name",
    [
        (lambda: LegacyFedAvg(), "FedAvg"),
        (lambda: LegacyFedAdam(initial_parameters=Parameters([], "")), "FedAdam"),
        (lambda: type("MyStrategy", (LegacyFedAvg,), {})(), "FedAvg"),
    ],
    ids=["FedAvg", "FedAdam", "a-subclass-of-FedAvg"],
)
def test_a_strategy_of_flowers_legacy_api_is_named_as_such(legacy: Any, name: str) -> None:
    """Wrapping ``flwr.server.strategy.FedAvg`` names the API that AdaQuant needs.

    Before, the error said only "AdaQuant wraps a Flower strategy (e.g. FedAvg(),
    FedAdam()) ... got FedAvg FedAvg(accept_failures=True)", which the user had done.
    """
    with pytest.raises(TypeError) as error:
        AdaQuant(legacy(), policy=AdaQuantLevels(2), seed=0)
    text = str(error.value)
    assert "legacy strategy API (flwr.server.strategy)" in text
    assert f"from flwr.serverapp.strategy import {name}" in text


@pytest.mark.parametrize("make, kind, message", CONSTRUCTOR_ERRORS)
def test_constructor_mistakes_fail_at_construction_saying_what_was_expected(
    make: Any, kind: type[Exception], message: str
) -> None:
    with pytest.raises(kind) as error:
        make()
    assert message in str(error.value)


def test_the_stock_train_function_warns_once_per_node_not_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a deployment runs every message in a new flwr-clientapp process; a mod
    # outside adaquant_mod forgets the process's warnings before each message.
    caplog.set_level(logging.WARNING)

    def new_process(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        forget_warnings()
        return call_next(msg, context)

    app = flower_template_app(tiny_shards(NUM_NODES), [new_process, adaquant_mod])
    grid = InProcessGrid(app, NUM_NODES)
    s = AdaQuantFedAvg(FixedLevels(LEVELS), seed=0, **SAMPLING)

    # Execute
    start(s, grid, rounds=3)

    # Assert: each node warned once (its Context.state remembers), 3 rounds x 4 messages.
    warned = [r for r in caplog.records if "policy is fed 'train_loss'" in r.getMessage()]
    assert len(warned) == NUM_NODES
    assert all(ctx.state.config_records["aq-node-state"]["warned-loss-proxy"]
               for ctx in grid.contexts.values())  # fmt: skip


# --------------------------------------------------------------------------- downlink


def test_a_compressed_downlink_reaches_every_node_bit_for_bit() -> None:
    # Prepare: 2 of 5 clients per round, so nodes miss rounds and catch up.
    grid = InProcessGrid(user_client_app(tiny_shards(5)), 5)
    s = AdaQuantFedAvg(FixedLevels(LEVELS), seed=0, downlink=QSGDCompressor(), downlink_levels=15,
                       num_clients=5, clients_per_round=2, fraction_evaluate=0.0,
                       min_train_nodes=1, min_available_nodes=5)  # fmt: skip
    received: dict[int, list[str]] = {}

    # Execute
    start(s, grid, rounds=8)

    # Assert: what each node was sent, and that its replica is the server's.
    train = [m for m in grid.sent if m.content.array_records]
    for msg in train:
        keys = [k for k in msg.content["arrays"] if k.startswith("aq-")]
        received.setdefault(msg.metadata.dst_node_id, []).append(",".join(keys))
    kinds = {k for keys in received.values() for k in keys}
    assert {"aq-model", "aq-change-0", "aq-change-0,aq-change-1"} <= kinds
    downlink = s.downlink.downlink  # type: ignore[union-attr]
    assert downlink is not None and downlink.replica is not None
    for node, ctx in grid.contexts.items():
        held = load_replica(ctx)
        if held is not None and held.round_idx == downlink.synced.get(node) == 7:
            assert torch.equal(held.params, downlink.replica)
    assert any(load_replica(c) is not None and load_replica(c).round_idx == 7  # type: ignore[union-attr]
               for c in grid.contexts.values())  # fmt: skip
    # downlink_bits: 8 x the bytes of the Arrays the strategy sent, round by round.
    for k, r in enumerate(s.rounds):
        sent = [m for m in train if m.content["config"]["aq-round"] == k]
        nbytes = sum(len(a.data) for m in sent for a in m.content["arrays"].values())
        assert r.downlink_bits == 8 * nbytes and r.participants == 2


def test_a_node_that_lost_its_replica_gets_the_full_model_next_time() -> None:
    # Prepare: node 0's state is wiped after round 1 (a restarted SuperNode).
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
    s = AdaQuantFedAvg(FixedLevels(LEVELS), seed=0, downlink=QSGDCompressor(),
                       downlink_levels=15, **SAMPLING)  # fmt: skip
    node = grid.node_of(0)
    messages = list(s.configure_train(1, initial_arrays(), ConfigRecord(), grid))
    arrays, _ = s.aggregate_train(1, list(grid.send_and_receive(messages)))
    grid.contexts[node].state.array_records.clear()

    # Execute: round 2 fails for that node; round 3 sends it the full model.
    for server_round in (2, 3):
        messages = list(s.configure_train(server_round, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
        replies = list(grid.send_and_receive(messages))
        arrays, _ = s.aggregate_train(server_round, replies)

    # Assert
    (failure,) = s.rounds[1].failures
    assert failure[0] == node and "the server sends the full model next time" in failure[1]
    third = next(m for m in messages if m.metadata.dst_node_id == node)
    assert "aq-model" in third.content["arrays"]
    assert s.rounds[2].participants == NUM_NODES


# --------------------------------------------------------------------------- Flower's engine


@pytest.mark.ray
def test_the_wrapper_runs_each_inner_strategy_on_flowers_simulation_engine() -> None:
    """AdaQuant around FedAvg, FedProx, FedAdam and FedTrimmedAvg on Ray, as in-process.

    One Ray start: one ServerApp runs the four wrapped strategies one after
    the other, two rounds each, against 4 SuperNodes of Flower's simulation
    engine. Each final model must equal the same run's on the in-process grid,
    whose math the tests above check against each strategy's formula.
    """
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from adaquantfl.runner.flower_engine import loopback_ray, ray_backend_config

    strategies = {
        "FedAvg": lambda: FedAvg(**SAMPLING),
        "FedProx": lambda: FedProx(**SAMPLING, proximal_mu=0.5),
        "FedAdam": lambda: FedAdam(**SAMPLING, eta=0.05),
        "FedTrimmedAvg": lambda: FedTrimmedAvg(**SAMPLING, beta=0.25),
    }
    on_ray: dict[str, tuple[np.ndarray, list[int]]] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, make in strategies.items():
            s = AdaQuant(make(), policy=AdaQuantLevels(2), seed=0)
            # A long timeout: the first round waits for Ray to start its actors.
            result = s.start(grid, initial_arrays(), num_rounds=2, timeout=600)
            on_ray[name] = (flat(result.arrays), [r.participants for r in s.rounds])

    with loopback_ray(2):
        run_simulation(
            server_app=server_app,
            client_app=user_client_app(tiny_shards(NUM_NODES)),
            num_supernodes=NUM_NODES,
            backend_config=ray_backend_config(2),  # type: ignore[arg-type]
        )

    assert set(on_ray) == set(strategies)
    finals = []
    for name, make in strategies.items():
        grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES)), NUM_NODES)
        s = AdaQuant(make(), policy=AdaQuantLevels(2), seed=0)
        models, _ = start(s, grid, rounds=2)
        model, participants = on_ray[name]
        assert participants == [NUM_NODES, NUM_NODES], name
        # Same bytes from the nodes; the inner strategies may sum in reply order.
        np.testing.assert_allclose(model, flat(models[2]), rtol=0, atol=1e-6, err_msg=name)
        finals.append(model)
    # FedAdam and FedTrimmedAvg end elsewhere than FedAvg, so the comparison tells
    # them apart; FedProx aggregates as FedAvg (its proximal term is the client's,
    # which this train function does not apply), so only its config differs.
    assert not np.allclose(finals[0], finals[2], atol=1e-4)
    assert not np.allclose(finals[0], finals[3], atol=1e-4)
