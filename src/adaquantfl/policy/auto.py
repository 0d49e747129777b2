"""``auto``: levels chosen by trial, for the most loss decrease per uplink bit.

No fixed rule of the literature wins everywhere (DESIGN §2): whether finer
levels pay depends on whether quantization noise is what limits progress,
and that depends on the model's curvature along the noise, which no server
statistic reveals (measured: a digits MLP trains as fast at s = 1, with
quantization noise ten times the energy of its aggregate update, as in full
precision, while a logistic regression on MNIST-1D stalls at s = 3 with the
same ratio). So ``auto`` measures it: a local search on a ladder of levels,
judged by the loss the clients report and the bits their replies cost.

1. The ladder is ``1, 3, 7, 15, ...`` (``2^k - 1``: under the packed encoding
   each rung costs one more bit per entry and nothing in between is
   cheaper). ``auto`` starts on the second rung, 3, one step from both the
   cheapest level and the first one that lifts the coarse floors measured.
2. *Hold*: a level runs for at least ``wait`` rounds (``window`` at first).
   A line fitted to ``log F(w_k)`` over its last ``window`` rounds gives the
   progress rate ``b`` (log-loss per round) and the noise of the losses.
   * If the line is flat within the noise (the level has settled at what it
     can reach), the next rung *up* is probed: more precision may lift a floor.
   * If the loss is still falling after ``2 window`` rounds, the next rung
     *down* is probed: the cheaper level may fall as fast.
   * After ``4 wait`` rounds without either, the next rung up is probed.
3. *Probe*: the other rung runs for ``window`` rounds. Its last half is
   compared with the held line's extrapolation: ``I`` is how much lower the
   log-loss is than staying would have made it (negative: higher).
4. Over the probe's ``m`` rounds, the bits it spent more (``c' > c``) or
   less (``c' < c``), at the held level's rate, would have bought
   ``p = |b| m (c' / c - 1)`` of log-loss (``c``, ``c'``: measured wire bits
   per client and round). A probe *up* is kept when ``I`` is significant
   (``z >= 2`` against the line's prediction error and the probe's own
   noise) and ``I > p``; while ``0 < z < 2`` it goes on, re-judged every
   half window, for up to ``3 window`` rounds. A probe *down* is kept when
   ``I > p`` (``p`` is then negative: the cheaper rung may lose that much).
   A kept probe resets ``wait`` to ``window``; a rejected one doubles the
   wait before the next probe in that direction, so a regime where one
   direction does not pay probes it ever less often (about ``log2`` of the
   rounds).

Defaults, one set for every run: ``window = 10`` rounds (the fewest that
give a line fit with a useful error estimate and a probe whose second half
has settled after the one-round lag between a level and the loss it
produces); ``z = 2`` (a one-sided 2.3% false-keep rate per probe up); the
ladder ``2^k - 1``; the start on its second rung. Everything it uses is what
the server sees: ``F(w_k)`` and each reply's wire bits.
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
#: Rounds, in windows, a level still improving is held before the rung down is tried.
HOLD_DOWN = 2
#: Longest hold, in waits (``window``, doubled by each rejected probe up), before the
#: rung up is tried anyway.
HOLD = 4
#: Longest probe up, in windows, while its evidence stays inconclusive.
MAX_PROBE = 3

Point = tuple[int, float, int, float]  # round, log F(w_k), levels that made w_k, bits/client


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
    """Levels by trial: hold, probe a neighbouring rung, keep it when it buys more per bit.

    Parameters
    ----------
    max_levels : int
        Top of the ladder.
    window : int
        Rounds of a fit and of a probe.
    z : float
        Significance a probe up needs.
    """

    def __init__(self, *, max_levels: int = 2**16, window: int = WINDOW, z: float = Z) -> None:
        self.steps = ladder(check_int("max_levels", max_levels, 1, MAX_LEVELS))
        self.window = check_int("window", window, 4, 10**6)
        if isinstance(z, bool) or not isinstance(z, int | float) or not z >= 0:
            raise ValueError(f"z must be a number >= 0, got {z!r}")
        self.z = float(z)
        self.step = min(1, len(self.steps) - 1)  # index into steps of the level held
        self.direction = 0  # +1 / -1 while probing the rung above / below, else 0
        self.settled = False  # whether the held level had settled when the probe began
        self.wait = {1: self.window, -1: self.window}
        # Points since the level last changed for good, and the probe's since it began.
        self.held: list[Point] = []
        self.probe: list[Point] = []
        self.last_levels = self.steps[self.step]  # levels of the round that made the next model
        self.decisions: list[tuple[int, int, int, bool]] = []  # (round, from, to, kept)

    @property
    def levels(self) -> int:
        """The levels of the coming round."""
        return self.steps[self.step + self.direction]

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        return LevelPlan(self.levels)

    def observe(self, observation: RoundObservation) -> None:
        # F(w_k) was made by the previous round's levels; this round's bits by this round's.
        made_by = self.last_levels
        self.last_levels = self.levels
        clients = observation.clients
        bits = math.fsum(c.wire_bits for c in clients) / len(clients) if clients else 0.0
        point = (observation.round_idx, math.log(observation.train_loss), made_by, bits)
        if self.direction:
            self.probe.append(point)
            # The first point was made by the held level; judge once a window was
            # made by the probe, then (a probe up) every half window.
            made = len(self.probe) - 1
            if made >= self.window and (made - self.window) % (self.window // 2) == 0:
                self._decide()
            return
        self.held.append(point)
        ready = [p for p in self.held if p[2] == self.steps[self.step]]
        if len(ready) < self.window:
            return
        _, b, var, _, _ = _fit([(t, y) for t, y, _, _ in ready[-self.window :]])
        settled = abs(b) * self.window <= 2 * math.sqrt(var)
        can_up = self.step + 1 < len(self.steps) and len(ready) >= self.wait[1]
        can_down = self.step > 0 and len(ready) >= self.wait[-1]
        if can_up and (settled or len(ready) >= HOLD * self.wait[1]):
            self._start(1, settled)
        elif can_down and b < 0 and len(ready) >= max(self.wait[-1], HOLD_DOWN * self.window):
            self._start(-1, settled)

    def _start(self, direction: int, settled: bool) -> None:
        self.direction = direction
        self.settled = settled
        self.probe = []

    def _assess(self) -> tuple[float, float, float, int]:
        """The probe so far: ``(z, gain I, price p, rounds it made)``."""
        current = self.steps[self.step]
        candidate = self.steps[self.step + self.direction]
        base = [p for p in self.held if p[2] == current][-self.window :]
        a, b, var, t_mean, sxx = _fit([(t, y) for t, y, _, _ in base])
        rate = max(0.0, -b)  # the held level's progress, for the price of the bits
        if self.settled:
            # Flat within the noise: the level's mean is the baseline, with no
            # slope to extrapolate (whose error would swamp a small gain).
            a, b, sxx = a + b * t_mean, 0.0, 0.0
        made = [p for p in self.probe if p[2] == candidate]
        late = made[len(made) // 2 :]
        t_late = math.fsum(t for t, *_ in late) / len(late)
        gain = math.fsum(a + b * t - y for t, y, _, _ in late) / len(late)
        # Error of the line's prediction at the late rounds, plus their own noise.
        extrapolation = 1 / len(base) + ((t_late - t_mean) ** 2 / sxx if sxx else 0.0)
        spread = var * (extrapolation + 1 / len(late))
        z = gain / math.sqrt(spread) if spread > 0 else (math.inf if gain > 0 else 0.0)
        cost = math.fsum(p[3] for p in base) / len(base)
        cost_probe = math.fsum(p[3] for p in self.probe) / len(self.probe)
        ratio = cost_probe / cost - 1 if cost > 0 else 0.0
        return z, gain, rate * len(made) * ratio, len(made)

    def _decide(self) -> None:
        """Keep, reject, or (a probe up whose evidence is inconclusive) go on probing."""
        z, gain, price, made = self._assess()
        if self.direction > 0:
            keep = z >= self.z and gain > price
            inconclusive = not keep and z > 0 and gain > price
            if inconclusive and made < MAX_PROBE * self.window:
                return
        else:
            keep = gain > price
        current = self.steps[self.step]
        candidate = self.steps[self.step + self.direction]
        self.decisions.append((self.probe[-1][0], current, candidate, keep))
        if keep:
            self.step += self.direction
            self.wait = {1: self.window, -1: self.window}
            self.held = list(self.probe)
        else:
            self.wait[self.direction] *= 2  # fresh rounds at the level before the next such probe
            self.held = []
        self.direction = 0
        self.probe = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "direction": self.direction,
            "settled": self.settled,
            "wait_up": self.wait[1],
            "wait_down": self.wait[-1],
            "held": [list(p) for p in self.held],
            "probe": [list(p) for p in self.probe],
            "last_levels": self.last_levels,
            "decisions": [list(d) for d in self.decisions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"step", "direction", "settled", "wait_up", "wait_down", "held", "probe",
                "last_levels", "decisions"}  # fmt: skip
        check_state_keys("AutoLevels", state, keys)
        self.step = check_int("step", state["step"], 0, len(self.steps) - 1)
        direction = state["direction"]
        if direction not in (-1, 0, 1) or not 0 <= self.step + direction < len(self.steps):
            raise ValueError(
                f"AutoLevels direction must be -1, 0 or 1 on the ladder, got {direction!r}"
            )
        self.direction = int(direction)
        self.settled = bool(state["settled"])
        self.wait = {
            1: check_int("wait_up", state["wait_up"], 1, 2**62),
            -1: check_int("wait_down", state["wait_down"], 1, 2**62),
        }
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
