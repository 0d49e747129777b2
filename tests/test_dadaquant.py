"""DAdaQuant's rules on hand-worked sequences, and AdaQuantFL's 2^k - 1 rounding."""

from __future__ import annotations

import math

import pytest

from adaquantfl.policy import POLICIES, AdaQuantLevels, ClientOutcome, RoundObservation, make_policy
from adaquantfl.policy.base import rounded_levels
from adaquantfl.policy.dadaquant import DAdaQuant, client_levels


def observe(policy: object, losses: list[float], sizes: dict[int, int] | None = None) -> list[int]:
    """Feed ``losses`` one round at a time; the time-adaptive q after each."""
    clients = tuple(ClientOutcome(c, n, 1.0, 1, 8) for c, n in (sizes or {}).items())
    out = []
    for t, loss in enumerate(losses):
        policy.observe(RoundObservation(t, loss, clients))  # type: ignore[attr-defined]
        out.append(policy.q)  # type: ignore[attr-defined]
    return out


def test_time_adaptive_doubling_by_hand() -> None:
    # psi = 0.5, phi = 2. Moving averages H: 4, 3, 2.5, 2.25, 2.625, 2.8125, 1.90625.
    # Tests (H_t >= H_{t-1}) from t = 2 on: no, no, no, yes (t = 5: q 1 -> 2, and no
    # test at t = 6, phi rounds must pass), t = 7: 1.906 >= 2.8125? no.
    policy = DAdaQuant(1, client_adaptive=False, psi=0.5, phi=2)
    assert observe(policy, [4, 2, 2, 2, 3, 3, 1]) == [1, 1, 1, 1, 2, 2, 2]
    assert policy.averages == [2.8125, 1.90625]


def test_time_adaptive_doubles_at_most_every_phi_rounds_up_to_q_max() -> None:
    policy = DAdaQuant(1, client_adaptive=False, psi=0.5, phi=3, max_levels=5)
    # A flat loss is a plateau (H_t >= H_{t+1-phi} with equality, the paper's >=).
    assert observe(policy, [1.0] * 10) == [1, 1, 2, 2, 2, 4, 4, 4, 5, 5]


def test_phi_is_a_tenth_of_the_rounds_and_psi_the_published_value() -> None:
    policy = make_policy("dadaquant-time", levels=1, rounds=500, options={})
    assert isinstance(policy, DAdaQuant) and policy.phi == 50 and policy.psi == 0.9


def test_time_adaptive_rounding_to_2k_minus_1() -> None:
    policy = DAdaQuant(1, client_adaptive=False, psi=0.5, phi=1, round_levels="pow2m1")
    observe(policy, [1.0, 1.0, 1.0])  # q: 2, 4, 8
    assert policy.q == 8 and policy.levels_for(3, [0]).default == 15


@pytest.mark.parametrize(("given", "expected"), [(1, 1), (2, 3), (3, 3), (4, 7), (8, 15), (15, 15),
                                                 (16, 31), (100, 127)])  # fmt: skip
def test_pow2m1_rounds_up_to_the_next_free_level(given: int, expected: int) -> None:
    assert rounded_levels(given, "pow2m1", 2**16) == expected
    assert rounded_levels(given, "none", 2**16) == given
    assert rounded_levels(given, "pow2m1", 10) == min(expected, 10)


def test_adaquantfl_pow2m1_on_hand_cases() -> None:
    # The exact rule gives 2, 3, 3, 4, 8, 2 (tests/test_schedule.py); rounded: 3, 3, 3, 7, 15, 3.
    policy = AdaQuantLevels(2, round_levels="pow2m1")
    assert policy.levels == 3
    assert [policy.update(f) for f in (4.0, 3.0, 2.0, 1.0, 0.25, 5.0)] == [3, 3, 3, 7, 15, 3]
    exact = make_policy("adaquantfl", levels=2, options={})
    assert [exact.update(f) for f in (4.0, 3.0, 2.0, 1.0, 0.25, 5.0)] == [2, 3, 3, 4, 8, 2]


def test_client_levels_closed_form() -> None:
    # Theorem 1 by hand: w = (1, 2, 5) / 8, q = 8.
    w = [1 / 8, 2 / 8, 5 / 8]
    a = sum(v ** (2 / 3) for v in w)
    b = sum(v * v for v in w) / 64
    expected = [max(1, round(math.sqrt(a / b) * v ** (2 / 3))) for v in w]
    assert client_levels(8, {0: 1, 1: 2, 2: 5}) == dict(enumerate(expected))
    assert expected == [3, 5, 10]  # the large client gets more than q = 8; none is clamped
    # Lemma 4: K q w^(2/3) / sum w^(2/3).
    budget = [max(1, round(24 * v ** (2 / 3) / a)) for v in w]
    assert client_levels(8, {0: 1, 1: 2, 2: 5}, "budget") == dict(enumerate(budget))


def test_client_rules_keep_the_variance_or_the_expected_bits() -> None:
    weights = {c: n for c, n in enumerate([3, 50, 7, 120, 1, 9, 40])}
    q = 100_000  # large, so that rounding is negligible
    w = {c: n / sum(weights.values()) for c, n in weights.items()}
    var = client_levels(q, weights, "variance")
    bud = client_levels(q, weights, "budget")
    # Theorem 1: sum_i w_i^2 / q_i^2 equals the variance at q; bits never exceed K q.
    assert math.isclose(sum(w[c] ** 2 / var[c] ** 2 for c in w), sum(v * v for v in w.values())
                        / q**2, rel_tol=1e-4)  # fmt: skip
    assert sum(var.values()) <= len(w) * q
    # Lemma 4: the expected bits (linear in q, the paper's model) stay K q.
    assert abs(sum(bud.values()) - len(w) * q) <= len(w)
    # Equal weights: every client at q under both rules.
    assert set(client_levels(9, {0: 5, 1: 5, 2: 5}).values()) == {9}
    assert set(client_levels(9, {0: 5, 1: 5, 2: 5}, "budget").values()) == {9}


def test_client_adaptive_learns_sizes_from_replies() -> None:
    policy = make_policy("dadaquant-client", levels=8, options={})
    assert policy.levels_for(0, [0, 1, 2]).levels_of(2) == 8  # nothing known: equal weights
    observe(policy, [1.0], {0: 1, 1: 2, 2: 5})
    plan = policy.levels_for(1, [0, 1, 2])
    assert [plan.levels_of(c) for c in (0, 1, 2)] == [3, 5, 10]
    # An unknown client counts with the mean known size (8 / 3).
    plan = policy.levels_for(2, [0, 9])
    assert plan == policy.levels_for(2, [0, 9])  # levels_for does not change the policy
    assert plan.levels_of(0) == client_levels(8, {0: 1, 9: 8 / 3})[0]


def test_doubly_adaptive_feeds_the_time_adaptive_level_to_the_client_rule() -> None:
    policy = DAdaQuant(2, psi=0.5, phi=1, rounds=10)
    observe(policy, [1.0], {0: 1, 1: 2, 2: 5})  # phi = 1: a flat loss doubles q to 4
    assert policy.q == 4
    plan = policy.levels_for(1, [0, 1, 2])
    assert plan.default == 4 and dict(plan) == client_levels(4, {0: 1, 1: 2, 2: 5})


def test_state_round_trips_and_continues_identically() -> None:
    a = DAdaQuant(1, psi=0.5, phi=2, rounds=40)
    observe(a, [3, 2, 2.5, 2.6, 1], {0: 3, 1: 9})
    b = DAdaQuant(1, psi=0.5, phi=2, rounds=40)
    b.load_state_dict(a.state_dict())
    assert observe(a, [1, 1, 1, 0.5], {2: 4}) == observe(b, [1, 1, 1, 0.5], {2: 4})
    assert a.levels_for(9, [0, 1, 2, 3]) == b.levels_for(9, [0, 1, 2, 3])


def test_registered_with_their_options_checked() -> None:
    assert {"dadaquant-time", "dadaquant-client", "dadaquant"} <= set(POLICIES)
    with pytest.raises(ValueError, match="allowed: \\['phi', 'psi', 'round_levels'\\]"):
        make_policy("dadaquant-time", levels=1, options={"client_rule": "budget"})
    allowed = r"unknown client_rule .*allowed: \['variance', 'budget'\]"
    with pytest.raises(ValueError, match=allowed):
        make_policy("dadaquant", levels=1, options={"client_rule": "bits"})
    with pytest.raises(ValueError, match="psi must be"):
        make_policy("dadaquant", levels=1, options={"psi": 1.0})
