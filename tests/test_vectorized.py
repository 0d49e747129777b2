"""The batched simulator path agrees with the per-client path, and falls back when it must."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaquantfl.compression import QSGDCompressor
from adaquantfl.data import ClientData, FederatedData
from adaquantfl.fl.client import LocalTraining, local_sgd
from adaquantfl.fl.server import FedServer
from adaquantfl.models import FlatModel, make_model
from adaquantfl.policy import FixedLevels, FullPrecision
from adaquantfl.rng import torch_generator
from adaquantfl.sim.simulator import Simulator
from adaquantfl.sim.vectorized import BatchedTrainer, _GroupedPlan, can_vectorize


def make_data(sizes: list[int], shape: tuple[int, ...], classes: int = 3) -> FederatedData:
    g = torch.Generator().manual_seed(0)
    clients = []
    for n in sizes:
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        clients.append(ClientData(x, y))
    xt = torch.randn(20, *shape, generator=g)
    test = ClientData(xt, torch.randint(0, classes, (20,), generator=g))
    return FederatedData("t", clients, test, classes, shape)


def run(
    model: FlatModel, data: FederatedData, vectorize: bool, levels: int | None, rounds: int = 3
) -> Simulator:
    params = model.initial_parameters(generator=torch.Generator().manual_seed(1))
    schedule = FullPrecision() if levels is None else FixedLevels(levels)
    server = FedServer(params, schedule, QSGDCompressor())
    sim = Simulator(
        model, data, server, server.compressor, training=LocalTraining(5, 8, 0.2),
        clients_per_round=len(data.clients), seed=3, vectorize=vectorize,
    )  # fmt: skip
    for _ in range(rounds):
        sim.run_round()
    return sim


class TinyConvNet(nn.Module):
    """A user's own model: no batched forward and no hand-written steps, so vmap runs it."""

    def __init__(self, length: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * length, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))  # type: ignore[no-any-return]


def build(name: str, shape: tuple[int, ...], classes: int = 3) -> FlatModel:
    if name == "own":
        return FlatModel(TinyConvNet(shape[0], classes))
    return make_model(name, shape, classes)


CASES = [
    ("logreg", (6,), [30, 50, 12]),  # every client has more examples than the batch
    ("mlp", (6,), [5, 8, 3]),  # every client has at most B = 8: deduplicated
    ("mlp", (6,), [30, 4, 12]),  # mixed sizes: plain batched minibatches
    ("cnn", (1, 8, 8), [10, 9]),  # grouped convolutions, autograd
    ("cnn", (1, 8, 8), [10, 9, 12, 30, 6]),  # more clients than one group of convolutions
    ("cnn1d", (40,), [30, 7, 12]),  # hand-written im2col steps (MNIST-1D's shape)
    ("cnn1d", (17,), [5, 8]),  # odd lengths, deduplicated
    ("cnn1d", (12,), [5, 9, 7, 12] * 5),  # 20 clients: more than one group of 16
    ("own", (6,), [10, 9]),  # a user's module: vmap over the flat forward
]


@pytest.mark.parametrize(("name", "shape", "sizes"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_batched_rounds_match_per_client_rounds(
    name: str, shape: tuple[int, ...], sizes: list[int]
) -> None:
    model = build(name, shape)
    data = make_data(sizes, shape)
    fast = run(model, data, vectorize=True, levels=None)
    slow = run(model, data, vectorize=False, levels=None)
    assert fast.vectorized and not slow.vectorized
    torch.testing.assert_close(fast.server.params, slow.server.params, rtol=1e-4, atol=1e-5)
    moved = float(
        (slow.server.params - model.initial_parameters(generator=torch.Generator().manual_seed(1)))
        .abs()
        .max()
    )
    assert moved > 1e-2  # the comparison is not between two untrained models


def test_batched_trainer_matches_local_sgd_per_client() -> None:
    model = make_model("mlp", (4,), 3)
    data = make_data([3, 7, 40], (4,))
    training = LocalTraining(6, 8, 0.3)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch_generator(0, purpose="batch", round_idx=2, client_id=i) for i in range(3)]  # noqa: E731
    trainer = BatchedTrainer(model, training)
    batched = trainer.train(params, trainer.plan(data.clients, gens()))
    for i, (c, g) in enumerate(zip(data.clients, gens(), strict=True)):
        single = local_sgd(model, params, c.x, c.y, training=training, generator=g)
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-6)


def test_deduplicated_plan_weights_are_draw_counts() -> None:
    model = make_model("logreg", (2,), 2)
    data = make_data([3, 5], (2,), classes=2)
    training = LocalTraining(4, 8, 0.1)
    trainer = BatchedTrainer(model, training)
    plan = trainer.plan(data.clients, [torch.Generator().manual_seed(i) for i in range(2)])
    assert plan.deduplicated == 2 and plan.x.shape[:3] == (4, 2, 5)
    # Each client's weights sum to 1 per step (B draws of weight 1/B), padding weighs 0.
    torch.testing.assert_close(plan.weights.sum(dim=2), torch.ones(4, 2))
    assert float(plan.weights[:, 0, 3:].abs().sum()) == 0.0
    plain = BatchedTrainer(model, training, deduplicate=False).plan(
        data.clients, [torch.Generator().manual_seed(i) for i in range(2)]
    )
    assert plain.deduplicated == 0 and plain.x.shape[:3] == (4, 2, 8)


def moved_entries(a: torch.Tensor, b: torch.Tensor) -> int:
    """Entries of two models further apart than float rounding of their training."""
    return int((~torch.isclose(a, b, rtol=1e-5, atol=1e-6)).sum())


def test_quantized_batched_rounds_equal_per_client_rounds_up_to_one_flipped_decision() -> None:
    # The batched path trains with other kernels than the per-client one, so the
    # updates differ in their last bits, and where that lands on a threshold one
    # stochastic rounding decision goes the other way: one entry of one client's
    # decoded update moves by a step, and so exactly one entry of the aggregate.
    # Every round starts both from the same model, so at most one entry may move.
    model = make_model("logreg", (6,), 3)
    data = make_data([30, 50, 12], (6,))
    fast = run(model, data, vectorize=True, levels=15, rounds=0)
    slow = run(model, data, vectorize=False, levels=15, rounds=0)
    assert fast.vectorized and not slow.vectorized
    for _ in range(4):
        a, b = fast.run_round(), slow.run_round()
        assert (a.participants, a.wire_bits, a.levels) == (b.participants, b.wire_bits, b.levels)
        assert moved_entries(fast.server.params, slow.server.params) <= 1
        fast.server.params.copy_(slow.server.params)
    # Control: other levels (s = 7) move nearly every entry in one round.
    coarse = run(model, data, vectorize=True, levels=7, rounds=0)
    fine = run(model, data, vectorize=False, levels=15, rounds=0)
    coarse.run_round()
    fine.run_round()
    assert (
        moved_entries(coarse.server.params, fine.server.params) > coarse.server.params.numel() // 2
    )


class Dropout(nn.Module):
    """A model vmap cannot batch without a randomness mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.dropout(x, 0.5, training=True))


def test_unvectorizable_model_falls_back_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = FlatModel(Dropout())
    ok, reason = can_vectorize(model, (4,))
    assert not ok and reason
    data = make_data([5, 5], (4,), classes=2)
    params = model.initial_parameters(generator=torch.Generator())
    server = FedServer(params, FullPrecision(), QSGDCompressor())
    with caplog.at_level(logging.WARNING):
        sim = Simulator(model, data, server, server.compressor, training=LocalTraining(1, 2, 0.1),
                        clients_per_round=2, seed=0, vectorize=True)  # fmt: skip
    assert not sim.vectorized
    assert "per-client training" in caplog.text


def test_initial_losses_match_per_client_evaluation() -> None:
    from adaquantfl.fl.client import evaluate

    model = make_model("mlp", (4,), 3)
    data = make_data([3, 7, 40, 1], (4,))
    params = model.initial_parameters(generator=torch.Generator().manual_seed(2))
    batched = BatchedTrainer(model, LocalTraining(1, 8, 0.1)).initial_losses(params, data.clients)
    single = [evaluate(model, params, c.x, c.y)[0] for c in data.clients]
    assert batched == pytest.approx(single, rel=1e-6)
    assert len(set(single)) == 4


@pytest.mark.parametrize(
    ("name", "shape"), [("logreg", (6,)), ("mlp", (6,)), ("cnn1d", (40,)), ("cnn1d", (9,))]
)
def test_hand_written_batched_steps_match_autograd(name: str, shape: tuple[int, ...]) -> None:
    model = make_model(name, shape, 4)
    assert model.has_batched_sgd_step
    data = make_data([5, 30, 9, 12], shape, classes=4)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(3))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    manual = BatchedTrainer(model, LocalTraining(7, 8, 0.5))
    auto = BatchedTrainer(model, LocalTraining(7, 8, 0.5), manual_gradients=False)
    a = manual.train(params, manual.plan(data.clients, gens()))
    b = auto.train(params, auto.plan(data.clients, gens()))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float((a - params).abs().max()) > 1e-2  # the steps moved the models


@pytest.mark.parametrize("manual", [True, False], ids=["hand-written", "autograd"])
@pytest.mark.parametrize(
    ("name", "shape"),
    [("logreg", (6,)), ("mlp", (6,)), ("cnn", (1, 8, 8)), ("cnn1d", (40,)), ("own", (6,))],
)
def test_every_batched_path_applies_fedprox_like_local_sgd(
    name: str, shape: tuple[int, ...], manual: bool
) -> None:
    model = build(name, shape)
    data = make_data([30, 7, 12], shape)
    training = LocalTraining(5, 8, 0.3, prox_mu=0.8)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(4))
    gens = lambda: [torch_generator(1, purpose="batch", round_idx=0, client_id=i) for i in range(3)]  # noqa: E731
    trainer = BatchedTrainer(model, training, manual_gradients=manual)
    batched = trainer.train(params, trainer.plan(data.clients, gens()))
    plain = BatchedTrainer(model, LocalTraining(5, 8, 0.3), manual_gradients=manual)
    without = plain.train(params, plain.plan(data.clients, gens()))
    for i, (c, g) in enumerate(zip(data.clients, gens(), strict=True)):
        single = local_sgd(model, params, c.x, c.y, training=training, generator=g)
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-6)
    # The term pulled every client towards the global model.
    assert all((batched - params).norm(dim=1) < (without - params).norm(dim=1))


def test_grouped_plan_evaluates_each_distinct_draw_once_with_its_count() -> None:
    model = make_model("cnn", (1, 8, 8), 3)
    assert model.batched_chunk == 4
    data = make_data([3, 40, 5, 9, 30, 4], (1, 8, 8))
    training = LocalTraining(3, 8, 0.1)
    gens = [torch_generator(2, purpose="batch", round_idx=1, client_id=i) for i in range(6)]
    plan = BatchedTrainer(model, training).plan(data.clients, gens)
    assert isinstance(plan, _GroupedPlan) and plan.m == 6
    # Clients grouped by size, every client in exactly one group.
    assert [g.rows for g in plan.groups] == [[0, 5, 2, 3], [4, 1]]
    for group in plan.groups:
        for x, y, weights in group.steps:
            assert x.shape[:2] == y.shape == weights.shape and weights.shape[1] <= 8
            torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(group.rows)))
    # The 3-example client draws at most 3 distinct examples per step.
    assert plan.groups[0].steps[0][2][1].count_nonzero() <= 3
    plain = BatchedTrainer(model, training, deduplicate=False).plan(
        data.clients,
        [torch_generator(2, purpose="batch", round_idx=1, client_id=i) for i in range(6)],
    )
    assert isinstance(plain, _GroupedPlan)
    assert all(x.shape[1] == 8 for g in plain.groups for x, _, _ in g.steps)


@pytest.mark.parametrize(("name", "shape"), [("cnn1d", (12,)), ("cnn", (1, 8, 8))])
def test_groups_train_in_parallel_threads_to_the_same_bits(
    name: str, shape: tuple[int, ...]
) -> None:
    model = make_model(name, shape, 3)
    data = make_data([5, 9, 7, 12] * 5, shape)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(5))
    trainer = BatchedTrainer(model, LocalTraining(3, 8, 0.2))

    def gens() -> list[torch.Generator]:
        return [torch_generator(3, purpose="batch", round_idx=0, client_id=i) for i in range(20)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = trainer.train(params, trainer.plan(data.clients, gens()))
        torch.set_num_threads(2)
        two = trainer.train(params, trainer.plan(data.clients, gens()))
        assert torch.get_num_threads() == 2  # restored after the parallel groups
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
