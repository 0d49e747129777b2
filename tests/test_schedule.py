"""Tests of the level schedules: the AdaQuantFL formula, clamping, state, bad losses."""

from __future__ import annotations

import math

import pytest

import adaquantfl.policy
from adaquantfl.policy import (
    POLICIES,
    AdaQuantLevels,
    FixedLevels,
    FullPrecision,
    LevelSchedule,
    adaquant_levels,
    make_policy,
)


def test_hand_worked_sequence() -> None:
    # F_0 = 4. Then s = ceil(sqrt(4 / F) * 2):
    #   F=4    -> sqrt(1)   * 2 = 2      -> 2
    #   F=3    -> sqrt(4/3) * 2 = 2.309  -> 3
    #   F=2    -> sqrt(2)   * 2 = 2.828  -> 3
    #   F=1    -> sqrt(4)   * 2 = 4      -> 4
    #   F=0.25 -> sqrt(16)  * 2 = 8      -> 8
    #   F=5    -> sqrt(0.8) * 2 = 1.789  -> 2 (the loss went up: levels fall)
    sched = AdaQuantLevels(2)
    assert sched.levels == 2
    assert [sched.update(f) for f in (4.0, 3.0, 2.0, 1.0, 0.25, 5.0)] == [2, 3, 3, 4, 8, 2]
    assert sched.initial_loss == 4.0
    assert sched.levels == 2


def test_clamping_to_min_and_max() -> None:
    sched = AdaQuantLevels(3, min_levels=3, max_levels=5)
    assert [sched.update(f) for f in (4.0, 8.0, 0.25, 0.01)] == [3, 3, 5, 5]
    assert adaquant_levels(4.0, 100.0, 2, 1, 10) == 1  # ceil(0.4) = 1
    assert adaquant_levels(4.0, 1e-9, 2, 1, 10) == 10


def test_formula_is_ceil_sqrt_ratio_times_s0() -> None:
    for f0, f, s0 in [(2.3, 1.6, 2), (2.3, 2.29, 2), (1.0, 0.5, 7), (10.0, 0.001, 1)]:
        expected = min(2**16, max(1, math.ceil(math.sqrt(f0 / f) * s0)))
        sched = AdaQuantLevels(s0)
        sched.update(f0)
        assert sched.update(f) == expected


def test_state_round_trip_continues_identically() -> None:
    a = AdaQuantLevels(2, max_levels=64)
    for f in (3.0, 2.0):
        a.update(f)
    b = AdaQuantLevels(5)
    b.load_state_dict(a.state_dict())
    assert b.levels == a.levels and b.initial_loss == a.initial_loss
    assert [b.update(f) for f in (1.0, 0.1)] == [a.update(f) for f in (1.0, 0.1)]
    fixed = FixedLevels(7)
    other = FixedLevels(1)
    other.load_state_dict(fixed.state_dict())
    assert other.levels == 7
    fp = FullPrecision()
    fp.load_state_dict(fp.state_dict())
    assert fp.levels is None


@pytest.mark.parametrize(
    "state",
    [
        {"levels": 3},
        {"initial_levels": 2, "min_levels": 1, "max_levels": 8, "levels": 9, "initial_loss": 1.0},
        {"initial_levels": 2, "min_levels": 1, "max_levels": 8, "levels": 2, "initial_loss": -1.0},
    ],
)
def test_bad_state_is_rejected_and_leaves_the_schedule_unchanged(state: dict) -> None:  # type: ignore[type-arg]
    sched = AdaQuantLevels(2)
    sched.update(4.0)
    before = sched.state_dict()
    with pytest.raises(ValueError):
        sched.load_state_dict(state)
    assert sched.state_dict() == before


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x", None, True])
def test_bad_losses_raise_clear_errors(bad: object) -> None:
    for sched in (AdaQuantLevels(2), FixedLevels(2), FullPrecision()):
        with pytest.raises(ValueError, match="loss"):
            sched.update(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial_levels": 0}, "initial_levels"),
        ({"initial_levels": 2, "min_levels": 3}, "initial_levels"),
        ({"initial_levels": 2, "max_levels": 1}, "initial_levels"),
        ({"initial_levels": 2, "min_levels": 3, "max_levels": 2}, "max_levels"),
        ({"initial_levels": 2.0}, "initial_levels"),
    ],
)
def test_bad_construction_arguments(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        AdaQuantLevels(**kwargs)


def test_fixed_levels_never_change() -> None:
    sched = FixedLevels(8)
    assert [sched.update(f) for f in (5.0, 1.0, 0.01)] == [8, 8, 8]
    with pytest.raises(ValueError, match="levels"):
        FixedLevels(0)


def test_registry_builds_each_method() -> None:
    # At least the paper's three (other policies register themselves too), and none
    # of the test suite's plug-ins: those are registered only inside the tests that use them.
    assert {"fp32", "qsgd", "adaquantfl"} <= set(POLICIES)
    assert "test-per-client" not in POLICIES
    for name in ("fp32", "qsgd", "adaquantfl"):
        assert isinstance(make_policy(name, levels=3), LevelSchedule)
    assert make_policy("qsgd", levels=3).levels == 3
    assert make_policy("adaquantfl", levels=4).levels == 4
    assert make_policy("fp32").levels is None
    with pytest.raises(ValueError, match="allowed"):
        make_policy("adaquant", levels=2)


def test_the_old_registry_names_still_work_and_warn() -> None:
    with pytest.warns(DeprecationWarning, match="use adaquantfl.policy.POLICIES"):
        assert adaquantfl.policy.SCHEDULES is POLICIES
    with pytest.warns(DeprecationWarning, match="use adaquantfl.policy.make_policy"):
        assert adaquantfl.policy.make_schedule is make_policy
    with pytest.raises(AttributeError, match="no attribute 'SCHEDULE'"):
        adaquantfl.policy.SCHEDULE  # noqa: B018
