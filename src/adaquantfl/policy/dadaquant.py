"""DAdaQuant's time-, client- and doubly-adaptive levels.

Hönig, Zhao, Mullins, "DAdaQuant: Doubly-adaptive quantization for
communication-efficient Federated Learning", ICML 2022 (arXiv:2111.00465).
Where the paper's text and the authors' experiment code differ, the paper's
text is followed and the difference is stated.

**Time-adaptive** (§3.4), ``dadaquant-time``:

1. ``q_1 = q_min`` (the config's ``levels``).
2. After round ``t`` the server has ``G_t``, the sampled clients' sample-weighted
   loss on the model they received, before training (here ``F(w_k)``), and
   keeps the moving average ``H_t = psi H_{t-1} + (1 - psi) G_t``, started at
   ``H_1 = G_1`` (the authors' code; the paper does not say).
3. Training is taken to have converged when ``H_t >= H_{t+1-phi}``; then
   ``q`` doubles, at most to ``q_max``, and stays for at least ``phi`` rounds
   (no test until ``phi`` more losses were seen; the code compares with a
   strict ``>``).

Published settings (§4.1): ``psi = 0.9`` and ``phi`` = a tenth of the rounds.
``q_max`` is, in the paper, the fixed level a grid search found best; a
policy that must not be tuned cannot know it, so here it is the config's
``max_levels`` (2^16 by default, never reached in practice: at most one
doubling every ``phi`` rounds).

**Client-adaptive** (§3.5, Theorem 1), ``dadaquant-client``: with ``w_i``
the sampled clients' data shares, client ``i`` gets

    q_i = max(1, round(q * w_i^(2/3) * sqrt(sum_j w_j^(2/3) / sum_j w_j^2)))

which minimises ``sum_i q_i`` while keeping the aggregate's expected
quantization variance equal to that of every client at ``q`` (so the
expected bits never exceed ``K q``; with equal weights ``q_i = q``). Option
``client_rule = "budget"`` uses Lemma 4 instead, which keeps the expected
bits exactly: ``q_i = K q w_i^(2/3) / sum_j w_j^(2/3)`` (rounded the same way).
There is no upper clamp in the paper (a large client may exceed ``q``); here
``q_i`` is clamped to the codec's maximum only. The server learns each
client's ``n_i`` from its replies; a client not heard from yet counts with the
mean size of those that were (all equal in the first round).

**Doubly adaptive** (§3.6), ``dadaquant``: the client-adaptive rule applied
each round to the time-adaptive ``q_t``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.policy.base import (
    ROUNDINGS,
    LevelPlan,
    RoundObservation,
    check_loss,
    rounded_levels,
)
from adaquantfl.policy.registry import check_options, register_policy
from adaquantfl.validation import check_choice, check_int, check_keys, check_real

__all__ = ["CLIENT_RULES", "DAdaQuant", "client_levels"]

#: ``"variance"``: Theorem 1 (the paper's method); ``"budget"``: Lemma 4.
CLIENT_RULES: tuple[str, ...] = ("variance", "budget")
PSI = 0.9
PHI_FRACTION = 0.1


def client_levels(q: int, weights: Mapping[int, float], rule: str = "variance") -> dict[int, int]:
    """Each client's levels from the shared level ``q`` and the clients' weights.

    ``weights`` need not sum to 1 (the rule is scale-free).
    """
    if not weights:
        return {}
    w = {cid: float(v) for cid, v in weights.items()}
    if any(not (math.isfinite(v) and v > 0) for v in w.values()):
        raise ValueError(f"client weights must be finite and positive, got {weights!r}")
    total = sum(w.values())
    w = {cid: v / total for cid, v in w.items()}
    a = math.fsum(v ** (2 / 3) for v in w.values())
    if rule == "variance":
        b = math.fsum(v * v for v in w.values()) / (q * q)
        factor = math.sqrt(a / b)
    elif rule == "budget":
        factor = len(w) * q / a
    else:
        raise ValueError(f"client_rule must be one of {list(CLIENT_RULES)}, got {rule!r}")
    return {cid: min(MAX_LEVELS, max(1, round(factor * v ** (2 / 3)))) for cid, v in w.items()}


class DAdaQuant:
    """DAdaQuant's levels: time-adaptive, client-adaptive, or both (see the module docstring).

    Parameters
    ----------
    levels : int
        ``q_min`` of the time-adaptive rule, or the fixed ``q`` of the
        client-adaptive one.
    time_adaptive, client_adaptive : bool
        Which of the two adaptations run.
    max_levels : int
        ``q_max`` of the doubling.
    rounds : int
        The run's rounds; ``phi = max(1, round(rounds / 10))`` unless ``phi`` is given.
    psi : float
        Smoothing of the moving average (0.9).
    phi : int, optional
        Rounds between convergence tests.
    client_rule : {"variance", "budget"}
        Theorem 1 (the paper's) or Lemma 4.
    round_levels : {"none", "pow2m1"}
        Rounding of every level the rules give (not in the paper; default none).
    """

    def __init__(
        self,
        levels: int,
        *,
        time_adaptive: bool = True,
        client_adaptive: bool = True,
        max_levels: int = 2**16,
        rounds: int = 100,
        psi: float = PSI,
        phi: int | None = None,
        client_rule: str = "variance",
        round_levels: str = "none",
    ) -> None:
        self.q_min = check_int("levels", levels, 1, MAX_LEVELS)
        self.q_max = check_int("max_levels", max_levels, self.q_min, MAX_LEVELS)
        check_int("rounds", rounds, 1, 2**62)
        self.psi = check_real("psi", psi, 0.0, 1.0, high_open=True)
        self.phi = (
            max(1, round(PHI_FRACTION * rounds)) if phi is None else check_int("phi", phi, 1, 2**62)
        )
        self.time_adaptive = time_adaptive
        self.client_adaptive = client_adaptive
        self.client_rule = check_choice("client_rule", client_rule, CLIENT_RULES)
        self.rounding = check_choice("round_levels", round_levels, ROUNDINGS)
        self.q = self.q_min
        self.averages: list[float] = []  # H_1 .. H_t (only the last phi are needed)
        self.seen = 0  # losses observed
        self.last_increase = 0  # ``seen`` when q last doubled
        self.sizes: dict[int, int] = {}  # n_i of the clients heard from

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        q = rounded_levels(self.q, self.rounding, self.q_max)
        if not self.client_adaptive or not client_ids:
            return LevelPlan(q)
        known = self.sizes.values()
        default = sum(known) / len(known) if known else 1.0
        weights = {c: float(self.sizes.get(c, default)) for c in client_ids}
        per_client = {
            c: rounded_levels(v, self.rounding, MAX_LEVELS)
            for c, v in client_levels(self.q, weights, self.client_rule).items()
        }
        return LevelPlan(q, per_client)

    def observe(self, observation: RoundObservation) -> None:
        for client in observation.clients:
            self.sizes[client.client_id] = client.num_examples
        if not self.time_adaptive:
            return
        loss = check_loss(observation.train_loss)
        average = (
            loss if not self.averages else self.psi * self.averages[-1] + (1 - self.psi) * loss
        )
        self.averages = [*self.averages[-(self.phi - 1) :], average] if self.phi > 1 else [average]
        self.seen += 1
        due = self.seen >= self.last_increase + self.phi and self.seen >= self.phi
        if due and self.averages[-1] >= self.averages[0]:  # H_t >= H_{t+1-phi}
            self.q = min(2 * self.q, self.q_max)
            self.last_increase = self.seen

    def state_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "averages": list(self.averages),
            "seen": self.seen,
            "last_increase": self.last_increase,
            "sizes": dict(self.sizes),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys("DAdaQuant", state, {"q", "averages", "seen", "last_increase", "sizes"})
        self.q = check_int("q", state["q"], self.q_min, self.q_max)
        self.averages = [check_loss(v) for v in state["averages"]]
        self.seen = check_int("seen", state["seen"], 0, 2**62)
        self.last_increase = check_int("last_increase", state["last_increase"], 0, self.seen)
        self.sizes = {int(k): check_int("n_i", v, 1, 2**62) for k, v in state["sizes"].items()}

    def __repr__(self) -> str:
        kind = {(True, False): "time", (False, True): "client", (True, True): "doubly"}
        return (
            f"DAdaQuant({kind[(self.time_adaptive, self.client_adaptive)]}, q={self.q}, "
            f"q_min={self.q_min}, q_max={self.q_max}, psi={self.psi}, phi={self.phi})"
        )


def _factory(time_adaptive: bool, client_adaptive: bool, method: str) -> Any:
    defaults: dict[str, Any] = {"psi": PSI, "phi": None, "round_levels": "none"}
    if client_adaptive:
        defaults["client_rule"] = "variance"

    def build(
        *,
        levels: int,
        max_levels: int = 2**16,
        rounds: int = 100,
        options: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> DAdaQuant:
        opts = check_options(method, options, defaults)
        return DAdaQuant(
            levels,
            time_adaptive=time_adaptive,
            client_adaptive=client_adaptive,
            max_levels=max_levels if time_adaptive else MAX_LEVELS,
            rounds=rounds,
            **opts,
        )

    return build


register_policy("dadaquant-time")(_factory(True, False, "dadaquant-time"))
register_policy("dadaquant-client")(_factory(False, True, "dadaquant-client"))
register_policy("dadaquant")(_factory(True, True, "dadaquant"))
