"""``auto``: levels chosen by trial, for the most loss decrease per uplink bit.

No fixed rule of the literature wins everywhere (DESIGN §2): whether finer
levels pay depends on whether quantization noise is what limits progress,
and that depends on the model's curvature along the noise, which no server
statistic reveals (a digits MLP trains as fast at s = 1, with quantization
noise ten times its update, as in full precision; a logistic regression on
MNIST-1D stalls at s = 3 with the same ratio). So ``auto`` measures it.

1. Levels climb a ladder ``1, 3, 7, 15, ...`` (``2^k - 1``: under the packed
   encoding each step costs one more bit per entry and nothing in between is
   cheaper), starting at the bottom.
2. *Hold*: the current level runs for at least ``wait`` rounds (``window`` at
   first). A line fitted to ``log F(w_k)`` over its last ``window`` rounds
   gives the progress rate ``b`` (log-loss per round) and the noise of the
   losses. The next level is probed once that line is flat within the noise
   (the level has settled: during a transient the line would extrapolate
   too much progress), or after ``4 window`` rounds at the latest.
3. *Probe*: the next level runs for ``window`` rounds. Its last half is
   compared with the line's extrapolation: ``I`` is how much lower the
   log-loss is than staying would have made it.
4. The probe is kept when ``I`` is significant (``z >= 2`` against the
   line's prediction error and the probe's own noise) and pays for its bits:
   the probe's extra uplink bits, spent at the old level, would have bought
   ``|b| m (c' / c - 1)`` of log-loss over its ``m`` rounds (``c``, ``c'``:
   measured wire bits per client and round at the two levels), so ``I``
   must exceed that. While ``0 < z < 2`` the probe goes on, re-judged every
   half window, for up to ``3 window`` rounds. Kept: ``wait`` returns to
   ``window``. Rejected: the level returns and ``wait`` doubles, so that a
   regime where finer levels do not help pays for ever fewer probes (about
   ``log2`` of the rounds).

Defaults, one set for every run: ``window = 10`` rounds (the fewest that
give a line fit with a useful error estimate and a probe whose second half
has settled after the one-round lag between a level and the loss it
produces); ``z = 2`` (a one-sided 2.3% false-keep rate per probe); the
ladder ``2^k - 1``. Everything it uses is what the server sees: ``F(w_k)``
and each reply's wire bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.policy.base import LevelPlan, RoundObservation, check_int, check_state_keys
from adaquantfl.policy.registry import check_options, register_policy

__all__ = ["AutoLevels", "ladder"]

WINDOW = 10
Z = 2.0
#: Longest hold, in windows (or ``wait``, if longer), before a probe of an unsettled level.
HOLD = 4
#: Longest probe, in windows, while its evidence stays inconclusive.
MAX_PROBE = 3


def ladder(max_levels: int) -> tuple[int, ...]:
    """``1, 3, 7, ..., 2^k - 1`` up to ``max_levels`` (which ends it if it is not of that form)."""
    steps = [(1 << k) - 1 for k in range(1, 25) if (1 << k) - 1 <= max_levels]
    if steps[-1] != max_levels:
        steps.append(max_levels)
    return tuple(steps)


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float, float, float, float]:
    """OLS line ``y = a + b t``: ``(a, b, residual variance, mean t, Sxx)``."""
    n = len(points)
    t_mean = math.fsum(t for t, _ in points) / n
    y_mean = math.fsum(y for _, y in points) / n
    sxx = math.fsum((t - t_mean) ** 2 for t, _ in points)
    sxy = math.fsum((t - t_mean) * (y - y_mean) for t, y in points)
    b = sxy / sxx if sxx > 0 else 0.0
    a = y_mean - b * t_mean
    residual = math.fsum((y - a - b * t) ** 2 for t, y in points)
    return a, b, residual / max(1, n - 2), t_mean, sxx


class AutoLevels:
    """Levels by trial: hold, probe the next level, keep it when it buys more per bit.

    Parameters
    ----------
    max_levels : int
        Top of the ladder.
    window : int
        Rounds of a fit and of a probe.
    z : float
        Significance a probe's gain needs.
    """

    def __init__(self, *, max_levels: int = 2**16, window: int = WINDOW, z: float = Z) -> None:
        self.steps = ladder(check_int("max_levels", max_levels, 1, MAX_LEVELS))
        self.window = check_int("window", window, 4, 10**6)
        if isinstance(z, bool) or not isinstance(z, int | float) or not z >= 0:
            raise ValueError(f"z must be a number >= 0, got {z!r}")
        self.z = float(z)
        self.step = 0  # index into steps of the level held
        self.probing = False
        self.wait = self.window
        # (round, log F(w_k), level that made w_k, bits per client of round k) since
        # the level last changed for good, and the probe's own since it began.
        self.held: list[tuple[int, float, int, float]] = []
        self.probe: list[tuple[int, float, int, float]] = []
        self.last_levels = self.steps[0]  # levels of the round that made the next model
        self.decisions: list[tuple[int, int, int, bool]] = []  # (round, from, to, kept)

    @property
    def levels(self) -> int:
        """The levels of the coming round."""
        return self.steps[self.step + 1] if self.probing else self.steps[self.step]

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        return LevelPlan(self.levels)

    def observe(self, observation: RoundObservation) -> None:
        # F(w_k) was made by the previous round's levels; this round's bits by this round's.
        made_by = self.last_levels
        self.last_levels = self.levels
        clients = observation.clients
        bits = math.fsum(c.wire_bits for c in clients) / len(clients) if clients else 0.0
        point = (observation.round_idx, math.log(observation.train_loss), made_by, bits)
        if self.probing:
            self.probe.append(point)
            # The first point was made by the previous level; decide once a
            # window was made by the probe, then every half window.
            made = len(self.probe) - 1
            if made >= self.window and (made - self.window) % (self.window // 2) == 0:
                self._decide()
            return
        self.held.append(point)
        ready = [p for p in self.held if p[2] == self.steps[self.step]]
        if len(ready) < self.window or self.step + 1 >= len(self.steps):
            return
        if len(ready) < self.wait:
            return
        # Probe once the level's loss has settled (its trend over the window is
        # within the noise: a transient would make the extrapolation too
        # optimistic), or at the latest after HOLD windows (or ``wait``).
        _, b, var, _, _ = _fit([(t, y) for t, y, _, _ in ready[-self.window :]])
        settled = abs(b) * self.window <= 2 * math.sqrt(var)
        if settled or len(ready) >= max(self.wait, HOLD * self.window):
            self.probing = True
            self.probe = []

    def _assess(self) -> tuple[float, float, float, int]:
        """The probe so far: ``(z, gain, price, rounds it made)``."""
        current, candidate = self.steps[self.step], self.steps[self.step + 1]
        base = [p for p in self.held if p[2] == current][-self.window :]
        a, b, var, t_mean, sxx = _fit([(t, y) for t, y, _, _ in base])
        made = [p for p in self.probe if p[2] == candidate]
        late = made[len(made) // 2 :]
        t_late = math.fsum(t for t, *_ in late) / len(late)
        gain = math.fsum(a + b * t - y for t, y, _, _ in late) / len(late)
        # Error of the line's prediction at the late rounds, plus their own noise.
        extrapolation = 1 / len(base) + ((t_late - t_mean) ** 2 / sxx if sxx else 1.0)
        spread = var * (extrapolation + 1 / len(late))
        z = gain / math.sqrt(spread) if spread > 0 else (math.inf if gain > 0 else 0.0)
        cost = math.fsum(p[3] for p in base) / len(base)
        cost_probe = math.fsum(p[3] for p in self.probe) / len(self.probe)
        extra = max(0.0, cost_probe / cost - 1) if cost > 0 else 0.0
        return z, gain, max(0.0, -b) * len(made) * extra, len(made)

    def _decide(self) -> None:
        """Keep, reject, or (when the evidence is still inconclusive) go on probing."""
        z, gain, price, made = self._assess()
        keep = z >= self.z and gain > price
        inconclusive = not keep and z > 0 and gain > price
        if inconclusive and made < MAX_PROBE * self.window:
            return
        current, candidate = self.steps[self.step], self.steps[self.step + 1]
        self.decisions.append((self.probe[-1][0], current, candidate, keep))
        self.probing = False
        if keep:
            self.step += 1
            self.wait = self.window
            self.held = list(self.probe)
        else:
            self.wait *= 2  # fresh rounds at the level before the next probe
            self.held = []
        self.probe = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "probing": self.probing,
            "wait": self.wait,
            "held": [list(p) for p in self.held],
            "probe": [list(p) for p in self.probe],
            "last_levels": self.last_levels,
            "decisions": [list(d) for d in self.decisions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"step", "probing", "wait", "held", "probe", "last_levels", "decisions"}
        check_state_keys("AutoLevels", state, keys)
        self.step = check_int("step", state["step"], 0, len(self.steps) - 1)
        self.probing = bool(state["probing"])
        self.wait = check_int("wait", state["wait"], 1, 2**62)
        self.held = [(int(t), float(y), int(lv), float(c)) for t, y, lv, c in state["held"]]
        self.probe = [(int(t), float(y), int(lv), float(c)) for t, y, lv, c in state["probe"]]
        self.last_levels = check_int("last_levels", state["last_levels"], 1, MAX_LEVELS)
        self.decisions = [(int(r), int(f), int(t), bool(k)) for r, f, t, k in state["decisions"]]

    def __repr__(self) -> str:
        return f"AutoLevels(levels={self.levels}, window={self.window}, z={self.z})"


@register_policy("auto", takes_levels=False)
def _auto(
    *, max_levels: int = 2**16, options: Mapping[str, Any] | None = None, **_: Any
) -> AutoLevels:
    opts = check_options("auto", options, {"window": WINDOW, "z": Z})
    return AutoLevels(max_levels=max_levels, **opts)
