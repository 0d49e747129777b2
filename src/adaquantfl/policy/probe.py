"""``probe``: the cheapest rung whose noise the loss's progress outruns, measured by the clients.

Whether coarser levels pay depends on the loss's curvature along the
quantization noise, which no server statistic shows (DESIGN §2; ``auto``'s
notes). The clients can measure it on their own data at no uplink cost but
a few numbers: every ``every`` rounds each participant compresses its update
at the current rung and the one below and reports, per rung, the message's
bits and the loss ``C_r`` that the aggregate's share of that noise adds to
its new model (:func:`adaquantfl.fl.client.probe_noise`:
``(F(w + a e) + F(w - a e)) / 2 - F(w)``; the antithetic pair cancels the
first-order term, which on one draw is ten times larger and of random sign).

The model behind the rule. Noise injected every round does not slow the
descent so much as lift the loss: each round adds ``C_r``, the next rounds
remove a share ``rho`` of the excess, and the loss settles an offset
``E_r = C_r / rho`` above the noiseless trajectory (measured ``E_r / C_r`` of
7-14 on the 1-D CNN and on MNIST-1D logistic regression: the final loss of
each fixed level against fp32's, over the probes' ``C_r``). The offset is a
floor only once the loss's own decrease is no longer larger: over the
``1 / rho`` rounds in which the offset builds up, the loss falls by
``D / rho`` (``D``: its decrease per round), so the offset is overtaken by
progress while ``C_r`` stays below a few rounds of ``D``. Hence the rule:

1. ``D`` is the slope of an OLS line through ``F(w_k)`` over the last
   ``window`` rounds at the current rung (after a change, the rounds since);
   ``se`` its standard error.
2. Up one rung when the current rung's noise costs more than the loss can
   carry: ``C_cur > theta F`` (an offset of about ``10 theta`` of the loss,
   10% at ``theta = 0.01``, is a floor whatever the trend says), or
   ``C_cur > max(kappa (D + se), eps F)`` (the noise outweighs ``kappa = 4``
   rounds of progress; one round's, ``kappa = 1``, moved up on the slow but
   steady descent of the 1-D CNN, where the offset is overtaken anyway;
   ``eps F``, a noise of ``eps = 10^-4`` of the loss a round, an offset of
   about 0.1%, is never worth more bits).
3. Down one rung when the cheaper rung would pass both tests with a margin:
   ``C_below < min(kappa (D - se), theta F) / 2`` (the factor 2 keeps the
   level from flapping between two rungs that both sit near the line).
4. No blow-ups: after a move down, a round whose loss jumps by more than
   ``jump`` (relative) above the round before sends the level back at once,
   and that rung is not tried again for ``4 window`` rounds.
5. The horizon: with ``rounds`` known, the last ``tail`` of them never move
   down (what it saves cannot pay back, and a floor that shows then is
   final). Without probe results the policy falls back to ``auto``'s
   trials: on Flower, whose mod does not run the probe, always (only the
   simulator's clients measure it).

What this guarantees, and what it does not. In the model above, a run that
keeps ``C_r`` within ``kappa D`` and ``theta F`` stays within a few
relaxation times' progress of the noiseless run, on the cheapest rung the
probes show to satisfy it; it is the local form of Khirirat et al.'s rule
(AAAI 2021, "CAT": the compression with the most loss decrease per
communicated bit), with the decrease measured rather than bounded. It has no
regret bound against the best fixed rung in hindsight: the probes are a few
clients' data and one noise pair each, the trend lags, and a client's
curvature is not the population's; the regime suite and its held-out
regimes measure how far that goes.

Defaults, one set for every run, with their reasons: ``window = 10`` rounds
(as ``auto``: the fewest that give a trend with a useful standard error);
probes every ``every = 2`` rounds (each costs a client ``2 x 2 + 1`` forward
passes over at most 256 of its examples, and 24 bytes of uplink, counted in
``wire_bits``); ``kappa = 4``, ``theta = 0.01`` and ``eps = 10^-4`` as in
rules 2 and 3; ``jump = 0.25`` (a quarter more loss in one round is no noise
of the trend); ``tail = 0.1`` of the rounds; the ladder ``1, 3, 7, 15, ...``
(each rung one more bit per entry under the packed encoding), starting on
its second rung, 3; the ladder applies to any compressor whose rate grows
with its levels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.policy.auto import AutoLevels, ladder
from adaquantfl.policy.base import LevelPlan, RoundObservation
from adaquantfl.policy.registry import check_options, register_policy
from adaquantfl.validation import check_int, check_keys, check_real

__all__ = ["ProbeLevels"]

WINDOW = 10
EVERY = 2
EPS = 1e-4
#: How many rounds of progress a rung's noise cost may reach before the level rises.
KAPPA = 4.0
#: The share of the loss a rung's noise may cost a round before the level rises.
THETA = 0.01
JUMP = 0.25
TAIL = 0.1


def _trend(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """The loss's decrease per round (minus the OLS slope) and its standard error."""
    n = len(points)
    t_mean = math.fsum(t for t, _ in points) / n
    y_mean = math.fsum(y for _, y in points) / n
    sxx = math.fsum((t - t_mean) ** 2 for t, _ in points)
    if sxx <= 0:
        return 0.0, math.inf
    b = math.fsum((t - t_mean) * (y - y_mean) for t, y in points) / sxx
    residual = math.fsum((y - y_mean - b * (t - t_mean)) ** 2 for t, y in points)
    return -b, math.sqrt(residual / max(1, n - 2) / sxx)


class ProbeLevels:
    """The cheapest rung whose measured noise cost the loss's progress outruns.

    Parameters
    ----------
    max_levels : int
        Top of the ladder.
    rounds : int, optional
        The run's horizon (None: unknown, no end-of-run rule).
    window, every : int
        Rounds of the loss trend; rounds between probes.
    eps, kappa, theta, jump, tail : float
        See the module notes.
    """

    def __init__(
        self,
        *,
        max_levels: int = 2**16,
        rounds: int | None = None,
        window: int = WINDOW,
        every: int = EVERY,
        eps: float = EPS,
        kappa: float = KAPPA,
        theta: float = THETA,
        jump: float = JUMP,
        tail: float = TAIL,
    ) -> None:
        self.steps = ladder(check_int("max_levels", max_levels, 1, MAX_LEVELS))
        self.rounds = None if rounds is None else check_int("rounds", rounds, 1)
        self.window = check_int("window", window, 4, 10**6)  # auto, the fallback, needs 4
        self.every = check_int("every", every, 1, 10**6)
        self.eps = check_real("eps", eps, 0.0)
        self.kappa = check_real("kappa", kappa, 0.0, low_open=True)
        self.theta = check_real("theta", theta, 0.0, low_open=True)
        self.jump = check_real("jump", jump, 0.0, low_open=True)
        self.tail = check_real("tail", tail, 0.0, 1.0)
        self.step = min(1, len(self.steps) - 1)
        self.losses: list[tuple[int, float]] = []  # (round, F(w_k)) since the level last changed
        self.cost: dict[int, float] = {}  # levels -> averaged C_r
        # levels -> averaged B_r: recorded (and checkpointed) for the record; the
        # rule assumes only that a lower rung sends fewer bits, and reads none.
        self.bits: dict[int, float] = {}
        self.seen: dict[int, int] = {}  # levels -> round of its last probe
        self.blocked: dict[int, int] = {}  # levels -> first round it may be chosen again
        self.coarser_from: int | None = None  # the rung left by the last move down
        self.unprobed = 0  # probing rounds in a row without a probe result
        self.fallback: AutoLevels | None = None
        self.scale = 1.0
        self.decisions: list[tuple[int, int, int]] = []  # (round, from, to)

    @property
    def levels(self) -> int:
        """The levels of the coming round."""
        if self.fallback is not None:
            return self.fallback.levels
        return self.steps[self.step]

    def _probe_levels(self) -> tuple[int, ...]:
        return tuple(self.steps[max(0, self.step - 1) : self.step + 1])

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        if self.fallback is not None:
            return self.fallback.levels_for(round_idx, client_ids)
        if round_idx % self.every:
            return LevelPlan(self.levels)
        scale = self.scale if self.losses else 1 / math.sqrt(max(1, len(client_ids)))
        return LevelPlan(self.levels, probe=self._probe_levels(), probe_scale=min(1.0, scale))

    def observe(self, observation: RoundObservation) -> None:
        if self.fallback is not None:
            self.fallback.observe(observation)
            return
        k = observation.round_idx
        clients = observation.clients
        total = math.fsum(c.num_examples for c in clients)
        self.scale = math.sqrt(math.fsum((c.num_examples / total) ** 2 for c in clients))
        self._take_probes(k, clients, total)
        if k % self.every == 0 and not any(c.probe for c in clients):
            self.unprobed += 1
            if self.unprobed >= 2:  # nobody can probe: decide by trials instead
                self.fallback = AutoLevels(max_levels=self.steps[-1], window=self.window)
                self.fallback.step = self.step
                self.fallback.last_levels = self.levels
                return
        loss = observation.train_loss
        if self.losses and self.coarser_from is not None:
            previous = self.losses[-1][1]
            if loss > previous * (1 + self.jump):
                self._move(k, self.steps.index(self.coarser_from), blow_up=True)
                return
        self.losses.append((k, loss))
        self._decide(k)

    def _take_probes(self, k: int, clients: Sequence[Any], total: float) -> None:
        weight = 1 / (self.window / 2)  # half-life of about window / 2 probes
        per_level: dict[int, list[tuple[float, float, float]]] = {}
        for c in clients:
            for levels, bits, cost in c.probe:
                per_level.setdefault(levels, []).append((c.num_examples / total, bits, cost))
        for levels, entries in per_level.items():
            share = math.fsum(p for p, _, _ in entries)
            cost = math.fsum(p * c for p, _, c in entries) / share
            bits = math.fsum(b for _, b, _ in entries) / len(entries)
            old = self.cost.get(levels)
            self.cost[levels] = cost if old is None else (1 - weight) * old + weight * cost
            self.bits[levels] = bits
            self.seen[levels] = k
        if per_level:
            self.unprobed = 0

    def _decide(self, k: int) -> None:
        points = self.losses[-self.window :]
        if len(points) < 3:
            return
        current = self.steps[self.step]
        if current not in self.cost or k - self.seen[current] > 2 * self.every:
            return
        decrease, se = _trend(points)
        loss = points[-1][1]
        cost = self.cost[current]
        floor = cost > self.theta * loss
        outrun = cost > max(self.kappa * (decrease + se), self.eps * loss)
        if floor or outrun:
            if self.step + 1 < len(self.steps):
                self._move(k, self.step + 1)
            return
        late = self.rounds is not None and k + 1 >= (1 - self.tail) * self.rounds
        if self.step == 0 or late or len(points) < self.window:
            return
        below = self.steps[self.step - 1]
        fresh = below in self.cost and k - self.seen[below] <= 2 * self.every
        cost_below = self.cost[below]
        cheap = cost_below < min(self.kappa * (decrease - se), self.theta * loss) / 2
        if fresh and self.blocked.get(below, -1) <= k and cheap:
            self._move(k, self.step - 1)

    def _move(self, k: int, step: int, *, blow_up: bool = False) -> None:
        before = self.steps[self.step]
        if blow_up:
            self.blocked[before] = k + 4 * self.window
        self.coarser_from = before if step < self.step else None
        self.step = step
        self.losses = []
        self.decisions.append((k, before, self.steps[step]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "losses": [list(p) for p in self.losses],
            "cost": {str(s): v for s, v in self.cost.items()},
            "bits": {str(s): v for s, v in self.bits.items()},
            "seen": {str(s): v for s, v in self.seen.items()},
            "blocked": {str(s): v for s, v in self.blocked.items()},
            "coarser_from": self.coarser_from,
            "unprobed": self.unprobed,
            "scale": self.scale,
            "fallback": None if self.fallback is None else self.fallback.state_dict(),
            "decisions": [list(d) for d in self.decisions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"step", "losses", "cost", "bits", "seen", "blocked", "coarser_from",
                "unprobed", "scale", "fallback", "decisions"}  # fmt: skip
        check_keys("ProbeLevels", state, keys)
        self.step = check_int("step", state["step"], 0, len(self.steps) - 1)
        self.losses = [(int(t), check_real("loss", y, 0.0)) for t, y in state["losses"]]
        for key in ("cost", "bits"):
            table = {int(s): check_real(key, v) for s, v in state[key].items()}
            setattr(self, key, table)
        self.seen = {int(s): int(v) for s, v in state["seen"].items()}
        self.blocked = {int(s): int(v) for s, v in state["blocked"].items()}
        cf = state["coarser_from"]
        self.coarser_from = None if cf is None else check_int("coarser_from", cf, 1, MAX_LEVELS)
        self.unprobed = check_int("unprobed", state["unprobed"], 0)
        self.scale = check_real("scale", state["scale"], 0.0, 1.0)
        self.fallback = None
        if state["fallback"] is not None:
            self.fallback = AutoLevels(max_levels=self.steps[-1], window=self.window)
            self.fallback.load_state_dict(state["fallback"])
        self.decisions = [(int(r), int(a), int(b)) for r, a, b in state["decisions"]]

    def __repr__(self) -> str:
        return f"ProbeLevels(levels={self.levels}, window={self.window}, every={self.every})"


@register_policy("probe", takes_levels=False)
def _probe(
    *,
    max_levels: int = 2**16,
    rounds: int | None = None,
    options: Mapping[str, Any] | None = None,
    **_: Any,
) -> ProbeLevels:
    defaults = {
        "window": WINDOW, "every": EVERY, "eps": EPS, "kappa": KAPPA, "theta": THETA,
        "jump": JUMP, "tail": TAIL,
    }  # fmt: skip
    opts = check_options("probe", options, defaults)
    return ProbeLevels(max_levels=max_levels, rounds=rounds, **opts)
