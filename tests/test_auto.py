"""``auto``: its ladder, its decisions on scripted losses, determinism, and kill -9 + resume."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

import adaquantfl
from adaquantfl.policy import AutoLevels, ClientOutcome, RoundObservation, make_policy
from adaquantfl.policy.auto import ladder
from tests.killing import kill_after_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist1d-floor.toml"


def feed(policy: AutoLevels, losses: list[float], bits_of: dict[int, float]) -> list[int]:
    """Play ``losses`` as F(w_k); each round's replies cost ``bits_of[levels]``. Levels used."""
    used = []
    for k, loss in enumerate(losses):
        levels = policy.levels_for(k, [0]).default
        assert levels is not None
        used.append(levels)
        outcome = ClientOutcome(0, 10, loss, levels, int(bits_of[levels]))
        policy.observe(RoundObservation(k, loss, (outcome,)))
    return used


BITS = {(1 << k) - 1: 100.0 * (k + 1) for k in range(1, 20)}  # packed: one more bit per step


def test_ladder_is_2k_minus_1_up_to_the_maximum() -> None:
    assert ladder(2**16) == (*((1 << k) - 1 for k in range(1, 17)), 2**16)
    assert ladder(15) == (1, 3, 7, 15) and ladder(10) == (1, 3, 7, 10) and ladder(1) == (1,)


def _play_floor_regime(policy: AutoLevels, rounds: int) -> list[int]:
    """A simulated floor regime: each level's loss decays to its floor 1 + 1 / levels."""
    loss, used = 2.0, []
    rng = torch.Generator().manual_seed(0)
    for k in range(rounds):
        levels = policy.levels_for(k, [0]).default
        assert levels is not None
        used.append(levels)
        floor = 1.0 + 1.0 / levels
        loss = floor + 0.7 * (loss - floor)
        observed = loss * (1 + 0.002 * float(torch.randn((), generator=rng)))
        outcome = ClientOutcome(0, 10, observed, levels, int(BITS[levels]))
        policy.observe(RoundObservation(k, observed, (outcome,)))
    return used


def _play_no_floor_regime(policy: AutoLevels, rounds: int) -> list[int]:
    """The loss falls the same whatever the levels: finer levels only cost bits."""
    used = []
    rng = torch.Generator().manual_seed(1)
    for k in range(rounds):
        levels = policy.levels_for(k, [0]).default
        assert levels is not None
        used.append(levels)
        observed = (0.1 + 2.0 * math.exp(-k / 40)) * (
            1 + 0.01 * float(torch.randn((), generator=rng))
        )
        outcome = ClientOutcome(0, 10, observed, levels, int(BITS[levels]))
        policy.observe(RoundObservation(k, observed, (outcome,)))
    return used


def test_auto_climbs_where_coarse_levels_have_a_floor() -> None:
    policy = AutoLevels()
    used = _play_floor_regime(policy, 300)
    assert used[0] == 3 and max(used) >= 31
    # Every trial up to 15 was kept: each rung's floor is clearly below the last.
    assert all(kept for _, frm, to, kept in policy.decisions if to <= 15)
    # Trials are A-B-A: a kept rung is held from the end of its trial on.
    first = next(r for r, frm, to, kept in policy.decisions if kept)
    assert used[first + 1] == policy.decisions[0][2]


def test_auto_stays_coarse_where_finer_levels_do_not_help() -> None:
    policy = AutoLevels()
    used = _play_no_floor_regime(policy, 300)
    # It leaves its start (3) for the cheaper rung while the loss falls there as fast.
    assert policy.decisions[0][1:] == (3, 1, True)
    assert used.count(1) >= 0.75 * len(used)
    assert not any(kept for _, frm, to, kept in policy.decisions if to > frm)
    # Backoff: each rejected trial up doubles the wait before the next.
    ups = [r for r, frm, to, _ in policy.decisions if to > frm]
    assert 1 <= len(ups) <= math.ceil(math.log2(300 / 10))
    assert policy.wait[1] == policy.window * 2 ** len(ups)


def test_a_finer_rung_is_not_charged_for_what_it_leaves_behind() -> None:
    # A floor regime whose loss relaxes slowly (10% of the way to the level's
    # floor per round), held at s = 1: after a trial of s = 3 the loss at s = 1
    # takes many rounds to climb back, so the rounds after the trial still hold
    # most of what s = 3 bought. Charged at a rate measured through the trial,
    # that gain looks like s = 1's own progress, and s = 1 (floor 1.6) is kept
    # over s = 3 (floor 1.1) trial after trial. A's rate from its own window
    # before the trial keeps s = 3 at the first trial.
    policy = AutoLevels()
    policy.step, policy.last_levels = 0, 1  # hold s = 1
    floors = {1: 1.6, 3: 1.1, 7: 1.08, 15: 1.07}
    bits = {1: 100.0, 3: 220.0, 7: 400.0, 15: 600.0}  # entropy-coded: s = 3 costs 2.2x
    rng = torch.Generator().manual_seed(0)
    loss, used = 1.6, []
    for k in range(200):
        levels = policy.levels
        used.append(levels)
        floor = floors.get(levels, 1.06)
        loss = floor + 0.9 * (loss - floor)
        observed = loss * (1 + 0.01 * float(torch.randn((), generator=rng)))
        outcome = ClientOutcome(0, 10, observed, levels, int(bits.get(levels, 900.0)))
        policy.observe(RoundObservation(k, observed, (outcome,)))
    assert policy.decisions[0][1:] == (1, 3, True)
    assert used.count(1) <= 0.25 * len(used)


def test_auto_is_deterministic_and_its_state_round_trips() -> None:
    a, b = AutoLevels(), AutoLevels()
    assert _play_floor_regime(a, 120) == _play_floor_regime(b, 120)
    c = AutoLevels()
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))  # plain data
    assert c.state_dict() == a.state_dict() and c.levels == a.levels
    losses = [1.2, 1.19, 1.21, 1.2, 1.18] * 6
    assert feed(a, losses, BITS) == feed(c, losses, BITS)


def test_options_are_checked() -> None:
    assert isinstance(make_policy("auto", levels=5, options={}), AutoLevels)
    with pytest.raises(ValueError, match="allowed: \\['window', 'z'\\]"):
        make_policy("auto", levels=1, options={"start": 3})
    with pytest.raises(ValueError, match="window"):
        AutoLevels(window=2)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    overrides = ["compression.method=auto", "compare.methods=[]", "train.rounds=300",
                 "train.checkpoint_every=10"]  # fmt: skip
    reference = adaquantfl.run(CONFIG, tmp_path / "ref", overrides=overrides)
    assert len({r["levels"] for r in reference.metrics}) > 2  # auto moved: its state matters
    out = tmp_path / "killed"
    run_dir = out / "auto"
    args = ["run", str(CONFIG), "--out", str(out), "-q", *[f"--set={o}" for o in overrides]]
    # Killed past round 60: after auto's first decisions, so its state matters.
    proc = kill_after_checkpoint(args, run_dir / "checkpoint.pt", round_at_least=60)
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "model.pt").exists()
    resumed = adaquantfl.run(CONFIG, out, overrides=overrides, resume=True)
    assert torch.equal(resumed.params, reference.params)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in reference.metrics]
