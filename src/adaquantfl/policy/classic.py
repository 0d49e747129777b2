"""The paper's three policies: full precision, fixed levels, and AdaQuantFL.

Each keeps the schedule interface of DESIGN §7 (``levels`` for the coming
round, ``update(loss)`` with ``F(w_k)``) and implements the
:class:`~adaquantfl.policy.base.LevelPolicy` protocol on top of it: every
client gets the same levels, and ``observe`` feeds the round's ``F(w_k)`` to
``update``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.policy.base import (
    LevelPlan,
    LevelPolicy,
    RoundObservation,
    check_loss,
    rounded_levels,
)
from adaquantfl.validation import check_int, check_keys

__all__ = [
    "AdaQuantLevels",
    "FixedLevels",
    "FullPrecision",
    "LevelSchedule",
    "UniformLevels",
    "adaquant_levels",
    "as_policy",
]


@runtime_checkable
class LevelSchedule(Protocol):
    """A schedule: one number of levels per round, driven by ``F(w_k)`` alone."""

    @property
    def levels(self) -> int | None: ...

    def update(self, loss: float) -> int | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class UniformLevels:
    """A schedule as a policy: every client gets ``levels``; ``observe`` calls ``update``."""

    @property
    def levels(self) -> int | None:
        raise NotImplementedError

    def update(self, loss: float) -> int | None:
        raise NotImplementedError

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        return LevelPlan(self.levels)

    def observe(self, observation: RoundObservation) -> None:
        self.update(observation.train_loss)


def adaquant_levels(
    initial_loss: float, loss: float, initial_levels: int, min_levels: int, max_levels: int
) -> int:
    """AdaQuantFL's rule: ``clamp(ceil(sqrt(F_0 / F_k) * s_0), min, max)``.

    Jhunjhunwala et al., "Adaptive Quantization of Model Updates for
    Communication-Efficient Federated Learning", ICASSP 2021, eq. (13).
    Computed in float64 exactly as written. A ratio so large that the product
    overflows (a loss near zero) gives ``max_levels``, the clamp's value.

    Raises
    ------
    ValueError
        If either loss is not a finite positive number.
    """
    scaled = math.sqrt(check_loss(initial_loss) / check_loss(loss)) * initial_levels
    if not scaled < max_levels:  # also inf and NaN: never ceil() a non-finite float
        return max_levels
    return max(min_levels, min(max_levels, math.ceil(scaled)))


class FullPrecision(UniformLevels):
    """No quantization: clients send float32 updates (``levels`` is None)."""

    @property
    def levels(self) -> None:
        return None

    def update(self, loss: float) -> None:
        check_loss(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys("FullPrecision", state, set())

    def __repr__(self) -> str:
        return "FullPrecision()"


class FixedLevels(UniformLevels):
    """The same number of levels every round (QSGD with fixed ``s``)."""

    def __init__(self, levels: int) -> None:
        self._levels = check_int("levels", levels, 1, MAX_LEVELS)

    @property
    def levels(self) -> int:
        return self._levels

    def update(self, loss: float) -> int:
        check_loss(loss)
        return self._levels

    def state_dict(self) -> dict[str, Any]:
        return {"levels": self._levels}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys("FixedLevels", state, {"levels"})
        self._levels = check_int("levels", state["levels"], 1, MAX_LEVELS)

    def __repr__(self) -> str:
        return f"FixedLevels({self._levels})"


class AdaQuantLevels(UniformLevels):
    """AdaQuantFL: levels grow as the training loss falls.

    1. Round 0 uses ``s_0 = initial_levels``.
    2. The first reported loss is kept as ``F_0 = F(w_0)``.
    3. After each round, ``s_{k+1} = clamp(ceil(sqrt(F_0 / F(w_k)) * s_0), min, max)``.

    The level used in a round therefore lags the loss by one round, as in the
    paper's Algorithm 1.

    Parameters
    ----------
    initial_levels : int
        ``s_0`` (the paper and the default: 2).
    min_levels, max_levels : int
        Clamp of the rule's output.
    round_levels : {"none", "pow2m1"}
        ``"pow2m1"`` rounds each ``s_{k+1}`` (and ``s_0``) up to the next
        ``2^k - 1``, which the packed encoding sends at no extra cost (not in
        the paper; the default is the paper's rule).
    """

    def __init__(
        self,
        initial_levels: int = 2,
        *,
        min_levels: int = 1,
        max_levels: int = 2**16,
        round_levels: str = "none",
    ):
        self._min = check_int("min_levels", min_levels, 1, MAX_LEVELS)
        self._max = check_int("max_levels", max_levels, self._min, MAX_LEVELS)
        self._s0 = check_int("initial_levels", initial_levels, self._min, self._max)
        self._rounding = round_levels
        self._levels = rounded_levels(self._s0, self._rounding, self._max)
        self._initial_loss: float | None = None

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def initial_loss(self) -> float | None:
        """``F_0``, or None before the first update."""
        return self._initial_loss

    def update(self, loss: float) -> int:
        value = check_loss(loss)
        if self._initial_loss is None:
            self._initial_loss = value
        raw = adaquant_levels(self._initial_loss, value, self._s0, self._min, self._max)
        self._levels = rounded_levels(raw, self._rounding, self._max)
        return self._levels

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_levels": self._s0,
            "min_levels": self._min,
            "max_levels": self._max,
            "levels": self._levels,
            "initial_loss": self._initial_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys(
            "AdaQuantLevels",
            state,
            {"initial_levels", "min_levels", "max_levels", "levels", "initial_loss"},
        )
        restored = AdaQuantLevels(
            state["initial_levels"],
            min_levels=state["min_levels"],
            max_levels=state["max_levels"],
            round_levels=self._rounding,
        )
        levels = check_int("levels", state["levels"], restored._min, restored._max)
        initial_loss = state["initial_loss"]
        if initial_loss is not None:
            initial_loss = check_loss(initial_loss)
        self.__dict__.update(restored.__dict__)
        self._levels = levels
        self._initial_loss = initial_loss

    def __repr__(self) -> str:
        rounding = "" if self._rounding == "none" else f", round_levels={self._rounding!r}"
        return (
            f"AdaQuantLevels(initial_levels={self._s0}, min_levels={self._min}, "
            f"max_levels={self._max}{rounding})"
        )


class _ScheduleAsPolicy(UniformLevels):
    """A schedule with only ``levels`` and ``update(loss)``, used as a policy."""

    def __init__(self, schedule: LevelSchedule) -> None:
        self.schedule = schedule

    @property
    def levels(self) -> int | None:
        return self.schedule.levels

    def update(self, loss: float) -> int | None:
        return self.schedule.update(loss)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self.schedule)


def as_policy(policy: LevelPolicy | LevelSchedule) -> LevelPolicy:
    """``policy`` itself, or a schedule (``levels`` / ``update``) adapted to the protocol."""
    if isinstance(policy, LevelPolicy):
        return policy
    if isinstance(policy, LevelSchedule):
        return _ScheduleAsPolicy(policy)
    raise ValueError(
        f"expected a level policy (levels_for, observe) or a schedule (levels, update), "
        f"got {type(policy).__name__}"
    )
