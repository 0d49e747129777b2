"""The ``probe`` policy and the clients' probes of what other levels' noise would cost."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from adaquantfl.compression import QSGDCompressor
from adaquantfl.fl.client import PROBE_BYTES, ClientReply, probe_noise
from adaquantfl.fl.guard import probe_problem
from adaquantfl.fl.server import FedServer
from adaquantfl.models import make_model
from adaquantfl.policy import FixedLevels, LevelPlan, ProbeLevels, RoundObservation
from adaquantfl.policy.base import ClientOutcome
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import load_config


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def logreg() -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = make_model("logreg", (20,), 4)
    x = torch.randn(300, 20, generator=gen(1))
    y = torch.randint(0, 4, (300,), generator=gen(2))
    params = torch.randn(model.numel, generator=gen(3)) * 0.1
    update = torch.randn(model.numel, generator=gen(4)) * 0.05
    return model, params, update, x, y


def _probe(
    logreg: Any, levels: tuple[int, ...], scale: float
) -> tuple[tuple[int, float, float], ...]:
    model, params, update, x, y = logreg
    return probe_noise(
        model, params, update, x, y, levels=levels, compressor=QSGDCompressor.paper(),
        scale=scale, seed=0, round_idx=3, client_id=1,
    )  # fmt: skip


def test_a_probe_reports_each_levels_message_bits_and_a_convex_losss_cost_is_never_negative(
    logreg: Any,
) -> None:
    levels = (1, 3, 7, 15)
    probe = _probe(logreg, levels, 0.5)
    assert [s for s, _, _ in probe] == list(levels)
    _, _, update, _, _ = logreg
    for s, bits, cost in probe:
        payload = QSGDCompressor.paper().compress(update, s, generator=gen())
        assert bits == 8 * len(payload)  # the encoder's real size at those levels
        # Cross-entropy of a linear model is convex, so the antithetic mean
        # (F(w + e) + F(w - e)) / 2 is at least F(w), whatever the noise.
        assert cost >= 0
    costs = [c for _, _, c in probe]
    assert costs == sorted(costs, reverse=True)  # coarser levels, more noise, more cost


def test_the_cost_is_the_second_order_term_it_scales_with_the_square_of_the_noise(
    logreg: Any,
) -> None:
    # (F(w + a e) + F(w - a e)) / 2 - F(w) = a^2 e^T H e / 2 + O(a^4): halving a
    # quarters it, to within the fourth-order term (small at this scale).
    full = {s: c for s, _, c in _probe(logreg, (1, 3), 0.2)}
    half = {s: c for s, _, c in _probe(logreg, (1, 3), 0.1)}
    for s in (1, 3):
        assert half[s] * 4 == pytest.approx(full[s], rel=0.05)
    # Control: a first-order cost would only halve.
    assert half[1] * 2 != pytest.approx(full[1], rel=0.05)


class _Asks(FixedLevels):
    """Fixed levels 3, asking every round for probes of levels 1 and 3."""

    def levels_for(self, round_idx: int, client_ids: Any) -> LevelPlan:
        return LevelPlan(3, probe=(1, 3), probe_scale=0.5)


def test_probe_results_travel_as_uplink_bytes_and_malformed_ones_are_refused() -> None:
    payload = QSGDCompressor().compress(torch.ones(8), 3, generator=gen())
    probe = ((1, 100.0, 0.5), (3, 150.0, 0.1))
    server = FedServer(torch.zeros(8), _Asks(3), QSGDCompressor())
    record = server.aggregate([ClientReply(0, payload, 1.0, 5, probe=probe)])
    assert record.participants == 1
    assert record.wire_bits == 8 * (len(payload) + 2 * PROBE_BYTES)
    assert probe_problem(probe) is None
    for bad in (
        ((0, 1.0, 0.0),), ((1, -1.0, 0.0),), ((1, 1.0, math.nan),), ((1, 1.0),),
        tuple((1, 1.0, 0.0) for _ in range(17)), [(1, 1.0, 0.0)],
    ):  # fmt: skip
        assert probe_problem(bad) is not None
        server = FedServer(torch.zeros(8), _Asks(3), QSGDCompressor())
        rejected = server.aggregate([ClientReply(0, payload, 1.0, 5, probe=bad)])  # type: ignore[arg-type]
        assert rejected.participants == 0 and "probe" in rejected.rejections[0][1]
    # Well-formed, but not what the round asked: a level twice, a level never
    # asked for, or any probe in a round that asked for none.
    for policy, bad, why in (
        (_Asks(3), ((3, 1.0, 0.0), (3, 1.0, 0.0)), "twice"),
        (_Asks(3), ((7, 1.0, 0.0),), "did not ask for"),
        (FixedLevels(3), ((1, 1.0, 0.0),), "did not ask for"),
    ):
        server = FedServer(torch.zeros(8), policy, QSGDCompressor())
        rejected = server.aggregate([ClientReply(0, payload, 1.0, 5, probe=bad)])
        assert rejected.participants == 0 and why in rejected.rejections[0][1]


def _observe(policy: ProbeLevels, k: int, loss: float, costs: dict[int, float]) -> None:
    probe = tuple((s, 100.0 * s.bit_length(), c) for s, c in costs.items())
    outcome = ClientOutcome(0, 10, loss, policy.levels, 100, probe=probe)
    policy.observe(RoundObservation(k, loss, (outcome,)))


def test_the_level_rises_when_its_noise_outweighs_the_progress_and_falls_when_it_does_not() -> None:
    policy = ProbeLevels(window=4, every=1, rounds=1000)
    assert policy.levels == 3
    assert policy.levels_for(0, [0, 1, 2, 3]).probe == (1, 3)  # the rung below and its own
    # The loss falls 0.01 a round; the noise of s = 3 costs 0.05: up.
    for k in range(4):
        _observe(policy, k, 10.0 - 0.01 * k, {1: 0.2, 3: 0.05})
    assert policy.levels == 7
    # Now the loss falls 0.1 a round and s = 3's noise costs 0.01, under half of it: down.
    for k in range(4, 12):
        _observe(policy, k, 9.97 - 0.1 * (k - 3), {3: 0.01, 7: 0.002})
    assert policy.levels == 3
    assert [(a, b) for _, a, b in policy.decisions] == [(3, 7), (7, 3)]


def test_a_loss_that_jumps_after_a_move_down_sends_the_level_back_at_once() -> None:
    policy = ProbeLevels(window=4, every=1, rounds=1000)
    for k in range(6):
        _observe(policy, k, 10.0 - 0.1 * k, {1: 0.001, 3: 0.0005})
    assert policy.levels == 1
    _observe(policy, 6, 20.0, {1: 0.001, 3: 0.0005})  # the loss doubles
    assert policy.levels == 3
    for k in range(7, 14):  # the rung below is barred for a while, however cheap it looks
        _observe(policy, k, 10.0 - 0.1 * k, {1: 0.0001, 3: 0.0001})
    assert policy.levels == 3


def test_late_in_a_run_the_level_never_moves_down() -> None:
    # 100 rounds: the last 10 (rounds 90-99) never move down.
    early, late = (
        ProbeLevels(window=4, every=1, rounds=100),
        ProbeLevels(window=4, every=1, rounds=100),
    )
    for policy, start in ((early, 0), (late, 84)):
        for k in range(start, start + 4):
            _observe(policy, k, 10.0 - 0.01 * k, {1: 0.2, 3: 0.2})  # up to 7
        assert policy.levels == 7
        for k in range(start + 4, start + 16):
            _observe(policy, k, 10.0 - 0.01 * start - 0.1 * (k - start), {3: 1e-6, 7: 1e-6})
    assert early.levels == 3  # s = 3's noise is negligible: down
    assert late.levels == 7  # the same, but in the last tenth of the run


def test_without_probe_results_the_policy_falls_back_to_trials() -> None:
    policy = ProbeLevels(window=4, every=1)
    for k in range(3):
        policy.observe(RoundObservation(k, 1.0, (ClientOutcome(0, 10, 1.0, 3, 100),)))
    assert policy.fallback is not None
    assert policy.levels_for(3, [0]) == LevelPlan(3)  # auto's plan: no probe asked


def test_its_state_round_trips() -> None:
    policy = ProbeLevels(window=4, every=1, rounds=100)
    for k in range(8):
        _observe(policy, k, 1.0 - 0.01 * k, {1: 0.2, 3: 0.05})
    restored = ProbeLevels(window=4, every=1, rounds=100)
    restored.load_state_dict(policy.state_dict())
    assert restored.state_dict() == policy.state_dict() and restored.levels == policy.levels
    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({"step": 0})


def test_the_simulator_runs_it_and_counts_the_probes_as_uplink() -> None:
    config = load_config(
        {
            "data": {"dataset": "digits", "num_clients": 4},
            "model": {"name": "logreg"},
            "train": {"rounds": 4, "local_steps": 3, "batch_size": 16, "lr": 0.1},
            "compression": {"method": "probe", "bucket_size": 0, "norm": "l2"},
        }
    )
    sim = build_simulator(config)
    records = [sim.run_round() for _ in range(4)]
    probed, plain = records[0], records[1]  # probes every 2nd round: rounds 1, 3
    d = sim.model.numel
    messages = 8 * QSGDCompressor.paper().max_message_bytes(d)  # an upper bound per message
    assert probed.wire_bits == plain.wire_bits + 4 * 8 * 2 * PROBE_BYTES
    assert probed.wire_bits < 4 * messages


def test_a_window_its_fallback_cannot_use_is_refused_when_built() -> None:
    # auto, which takes over without probe results, needs 4 rounds of trend.
    with pytest.raises(ValueError, match="window"):
        ProbeLevels(window=3)
    assert ProbeLevels(window=4).window == 4
