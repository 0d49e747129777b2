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
   cheaper). ``auto`` starts on the second rung, 3: one step from both the
   cheapest level and the first one that lifts the coarse floors measured.
2. *Hold* the current rung A. After a transient of half a window, a line
   fitted to ``log F(w_k)`` over the last ``window`` rounds gives the trend.
   * If it is flat within the noise (A has settled at what it can reach),
     a trial of the rung *up* starts: more precision may lift a floor.
   * If the loss is still falling after ``2 window`` rounds, a trial of the
     rung *down* starts: the cheaper level may fall as fast.
   * After ``4 wait`` rounds without either, a trial of the rung up starts.
3. *Trial* (A-B-A): the other rung B runs for ``window`` rounds, then A again
   for half a window. The log-loss of B's last half window is compared with
   A's just before and just after, interpolated to B's time, so that a trend
   that goes on through the trial (a loss still falling at A) does not count
   for B (a line through one window of A would extrapolate its noisy slope
   over the whole trial and swamp small gains). ``I`` is how much lower B's
   log-loss is than that control.
4. Over B's ``m`` rounds, the bits it spent more (``c' > c``) or less
   (``c' < c``), at A's rate of progress, would have bought
   ``p = rate * m * (c' / c - 1)`` of log-loss (``c``, ``c'``: measured wire
   bits per client and round). For the rung up, A's rate is the slope of its
   own window before the trial: the rounds after the trial still hold part
   of what the finer rung bought, and a rate measured through the trial
   would credit that to A and charge it to B (measured: on the 1-D CNN with
   entropy coding, ``auto`` sat on s = 1, at 6-12x fp32's loss, for 300 rounds
   that way). For the rung down, A's rate is measured through the trial, as
   the same carry-over then works against the cheaper rung. B is kept when
   ``I - p`` is significant: ``z >= 2`` standard errors (from the windows'
   own scatter, and for the rung up the slope's) for the rung up, ``z >= 1``
   for the rung down. A kept trial resets the waits to
   ``window``; a rejected one doubles the wait before the next trial in that
   direction (0 < z < 2 up: inconclusive, retried without backing off), so a
   regime where a direction does not pay tries it ever less often.

Defaults, one set for every run: ``window = 10`` rounds (the fewest that
give a trend with a useful error estimate and a trial window whose second
half has settled after the one-round lag between a level and the loss it
produces); ``z = 2`` (a one-sided 2.3% false-keep rate per trial up) and 1
for the rung down (a cheaper rung is tried only while the loss still falls,
where its saving is the price); the ladder ``2^k - 1``; the start on its
second rung. Everything it uses is what the server sees: ``F(w_k)`` and each
reply's wire bits.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.policy.base import LevelPlan, RoundObservation
from adaquantfl.policy.registry import check_options, register_policy
from adaquantfl.validation import check_int, check_keys, check_real

__all__ = ["AutoLevels", "ladder"]

WINDOW = 10
Z = 2.0
#: Standard errors of evidence a trial of the rung down needs.
DOWN_Z = 1.0
#: Rounds, in windows, a level still improving is held before the rung down is tried.
HOLD_DOWN = 2
#: Longest hold, in waits (``window``, doubled by each rejected trial up), before the
#: rung up is tried anyway.
HOLD = 4

Point = tuple[int, float, int, float]  # round, log F(w_k), levels that made w_k, bits/client
#: Phases of a trial: B runs, then A again.
PROBE, RETURN = 1, 2


def ladder(max_levels: int) -> tuple[int, ...]:
    """``1, 3, 7, ..., 2^k - 1`` up to ``max_levels`` (which ends it if it is not of that form)."""
    steps = [(1 << k) - 1 for k in range(1, 25) if (1 << k) - 1 <= max_levels]
    if steps[-1] != max_levels:
        steps.append(max_levels)
    return tuple(steps)


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """Slope of the OLS line through ``points``, its residual variance and the slope's."""
    n = len(points)
    t_mean = math.fsum(t for t, _ in points) / n
    y_mean = math.fsum(y for _, y in points) / n
    sxx = math.fsum((t - t_mean) ** 2 for t, _ in points)
    b = math.fsum((t - t_mean) * (y - y_mean) for t, y in points) / sxx if sxx > 0 else 0.0
    residual = math.fsum((y - y_mean - b * (t - t_mean)) ** 2 for t, y in points)
    var = residual / max(1, n - 2)
    return b, var, var / sxx if sxx > 0 else 0.0


def _window(points: Sequence[Point]) -> tuple[float, float, float, int]:
    """``(mean round, mean log-loss, sum of squared deviations, count)``."""
    ts = [float(p[0]) for p in points]
    ys = [p[1] for p in points]
    mean = math.fsum(ys) / len(ys)
    return statistics.fmean(ts), mean, math.fsum((y - mean) ** 2 for y in ys), len(ys)


class AutoLevels:
    """Levels by trial: hold, try a neighbouring rung A-B-A, keep it when it buys more per bit.

    Parameters
    ----------
    max_levels : int
        Top of the ladder.
    window : int
        Rounds of a trend fit and of the rung tried.
    z : float
        Standard errors of evidence a trial of the rung up needs.
    """

    def __init__(self, *, max_levels: int = 2**16, window: int = WINDOW, z: float = Z) -> None:
        self.steps = ladder(check_int("max_levels", max_levels, 1, MAX_LEVELS))
        self.window = check_int("window", window, 4, 10**6)
        self.z = check_real("z", z, 0.0)
        self.step = min(1, len(self.steps) - 1)  # index into steps of the rung held (A)
        self.direction = 0  # +1 / -1 during a trial of the rung above / below, else 0
        self.phase = 0  # PROBE or RETURN during a trial
        self.wait = {1: self.window, -1: self.window}
        self.held: list[Point] = []  # since A was last changed to or returned to
        self.trial: list[Point] = []  # since the trial began
        self.before: list[Point] = []  # A's last window before the trial
        self.last_levels = self.steps[self.step]  # levels of the round that made the next model
        self.decisions: list[tuple[int, int, int, bool]] = []  # (round, from, to, kept)

    @property
    def levels(self) -> int:
        """The levels of the coming round."""
        if self.direction and self.phase == PROBE:
            return self.steps[self.step + self.direction]
        return self.steps[self.step]

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        return LevelPlan(self.levels)

    def observe(self, observation: RoundObservation) -> None:
        # F(w_k) was made by the previous round's levels; this round's bits by this round's.
        made_by = self.last_levels
        clients = observation.clients
        bits = math.fsum(c.wire_bits for c in clients) / len(clients) if clients else 0.0
        point = (observation.round_idx, math.log(observation.train_loss), made_by, bits)
        if self.direction:
            self._trial_step(point)
        else:
            self._hold_step(point)
        self.last_levels = self.levels

    def _hold_step(self, point: Point) -> None:
        self.held.append(point)
        current = self.steps[self.step]
        # The first half window after a change of level is its transient.
        ready = [p for p in self.held if p[2] == current][self.window // 2 :]
        if len(ready) < self.window:
            return
        b, var, _ = _fit([(t, y) for t, y, _, _ in ready[-self.window :]])
        settled = abs(b) * self.window <= 2 * math.sqrt(var)
        can_up = self.step + 1 < len(self.steps) and len(ready) >= self.wait[1]
        can_down = self.step > 0 and len(ready) >= self.wait[-1]
        if can_up and (settled or len(ready) >= HOLD * self.wait[1]):
            self._start(1, ready)
        elif can_down and b < 0 and len(ready) >= max(self.wait[-1], HOLD_DOWN * self.window):
            self._start(-1, ready)

    def _start(self, direction: int, ready: list[Point]) -> None:
        self.direction, self.phase = direction, PROBE
        self.before = ready[-self.window :]  # its last half is the control; all of it, A's trend
        self.trial = []

    def _trial_step(self, point: Point) -> None:
        self.trial.append(point)
        candidate = self.steps[self.step + self.direction]
        current = self.steps[self.step]
        if self.phase == PROBE and sum(p[2] == candidate for p in self.trial) >= self.window:
            self.phase = RETURN
        elif self.phase == RETURN:
            returned = [p for p in self.trial if p[2] == current]
            if len(returned) >= self.window // 2:
                self._decide()

    def _assess(self) -> tuple[float, float, float]:
        """The trial: ``(z, gain I, price p)``."""
        current = self.steps[self.step]
        candidate = self.steps[self.step + self.direction]
        half = self.window // 2
        before = self.before[-half:]
        during = [p for p in self.trial if p[2] == candidate][-half:]
        after = [p for p in self.trial if p[2] == current][-half:]
        (tb, yb, ssb, nb), (td, yd, ssd, nd), (ta, ya, ssa, na) = (
            _window(before),
            _window(during),
            _window(after),
        )
        weight = (td - tb) / (ta - tb)  # of A's after-window in the control at B's time
        control = (1 - weight) * yb + weight * ya
        gain = control - yd
        var = (ssb + ssd + ssa) / max(1, nb + nd + na - 3)  # pooled scatter within windows
        spread = var * ((1 - weight) ** 2 / nb + weight**2 / na + 1 / nd)
        cost = statistics.fmean(p[3] for p in before + after)
        cost_probe = statistics.fmean(p[3] for p in self.trial if p[2] == candidate)
        ratio = cost_probe / cost - 1 if cost > 0 else 0.0
        m = sum(p[2] == candidate for p in self.trial)
        if self.direction > 0:
            # A's own rate: the trend of its window before the trial. The rounds
            # after it still carry what the finer rung bought, which a rate taken
            # through the trial would credit to A (step 4 of the module notes).
            slope, _, slope_var = _fit([(float(p[0]), p[1]) for p in self.before])
            rate = max(0.0, -slope)
            if rate > 0:
                spread += (m * ratio) ** 2 * slope_var  # the price's own uncertainty
        else:
            # Through the trial: a coarser rung's harm that carries into A's return
            # slows this rate and so lowers the saving credited to the rung down.
            rate = max(0.0, (yb - ya) / (ta - tb))
        price = rate * m * ratio
        excess = gain - price
        z = excess / math.sqrt(spread) if spread > 0 else (math.inf if excess > 0 else -math.inf)
        return z, gain, price

    def _decide(self) -> None:
        z, _, _ = self._assess()
        keep = z >= (self.z if self.direction > 0 else DOWN_Z)
        inconclusive = self.direction > 0 and 0 < z < self.z
        current = self.steps[self.step]
        candidate = self.steps[self.step + self.direction]
        self.decisions.append((self.trial[-1][0], current, candidate, keep))
        if keep:
            self.step += self.direction
            self.wait = {1: self.window, -1: self.window}
        elif not inconclusive:
            self.wait[self.direction] *= 2  # fresh rounds at A before the next such trial
        self.held = []
        self.direction, self.phase = 0, 0
        self.trial, self.before = [], []

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "direction": self.direction,
            "phase": self.phase,
            "wait_up": self.wait[1],
            "wait_down": self.wait[-1],
            "held": [list(p) for p in self.held],
            "trial": [list(p) for p in self.trial],
            "before": [list(p) for p in self.before],
            "last_levels": self.last_levels,
            "decisions": [list(d) for d in self.decisions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"step", "direction", "phase", "wait_up", "wait_down", "held", "trial", "before",
                "last_levels", "decisions"}  # fmt: skip
        check_keys("AutoLevels", state, keys)
        step = check_int("step", state["step"], 0, len(self.steps) - 1)
        direction, phase = state["direction"], state["phase"]
        if direction not in (-1, 0, 1) or not 0 <= step + direction < len(self.steps):
            raise ValueError(
                f"AutoLevels direction must be -1, 0 or 1 on the ladder, got {direction!r}"
            )
        if phase not in ((0,) if direction == 0 else (PROBE, RETURN)):
            raise ValueError(f"AutoLevels phase {phase!r} does not fit direction {direction}")
        self.step, self.direction, self.phase = step, int(direction), int(phase)
        self.wait = {
            1: check_int("wait_up", state["wait_up"], 1, 2**62),
            -1: check_int("wait_down", state["wait_down"], 1, 2**62),
        }
        self.held, self.trial, self.before = (
            [(int(t), float(y), int(lv), float(c)) for t, y, lv, c in state[key]]
            for key in ("held", "trial", "before")
        )
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
