"""Level schedules: how many quantization levels the clients use each round.

A schedule is a small mutable state object owned by the server. ``levels`` is
the number of levels for the coming round; ``update(loss)`` takes the
sample-weighted training loss ``F(w_k)`` the clients reported before training in
round ``k`` and returns the levels for round ``k + 1``. ``None`` levels mean
full precision (no quantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from adaquantfl.compression.qsgd import MAX_LEVELS

__all__ = [
    "SCHEDULES",
    "AdaQuantLevels",
    "FixedLevels",
    "FullPrecision",
    "LevelSchedule",
    "adaquant_levels",
    "make_schedule",
]


@runtime_checkable
class LevelSchedule(Protocol):
    """What the server needs from a schedule."""

    @property
    def levels(self) -> int | None: ...

    def update(self, loss: float) -> int | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _check_loss(loss: float) -> float:
    if isinstance(loss, bool | str | bytes):
        raise ValueError(f"loss must be a real number, got {loss!r}")
    try:
        value = float(loss)  # also accepts NumPy and 0-d torch scalars
    except (TypeError, ValueError):
        raise ValueError(f"loss must be a real number, got {loss!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"loss must be finite and positive, got {value!r}")
    return value


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_state_keys(cls: str, state: Mapping[str, Any], keys: set[str]) -> None:
    if set(state) != keys:
        raise ValueError(f"{cls} state must have keys {sorted(keys)}, got {sorted(state)}")


def adaquant_levels(
    initial_loss: float, loss: float, initial_levels: int, min_levels: int, max_levels: int
) -> int:
    """AdaQuantFL's rule: ``clamp(ceil(sqrt(F_0 / F_k) * s_0), min, max)``.

    Jhunjhunwala et al., "Adaptive Quantization of Model Updates for
    Communication-Efficient Federated Learning", ICASSP 2021, eq. (13).
    Computed in float64 exactly as written.
    """
    raw = math.ceil(math.sqrt(initial_loss / loss) * initial_levels)
    return max(min_levels, min(max_levels, raw))


class FullPrecision:
    """No quantization: clients send float32 updates (``levels`` is None)."""

    @property
    def levels(self) -> None:
        return None

    def update(self, loss: float) -> None:
        _check_loss(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state_keys("FullPrecision", state, set())

    def __repr__(self) -> str:
        return "FullPrecision()"


class FixedLevels:
    """The same number of levels every round (QSGD with fixed ``s``)."""

    def __init__(self, levels: int) -> None:
        self._levels = _check_int("levels", levels, 1, MAX_LEVELS)

    @property
    def levels(self) -> int:
        return self._levels

    def update(self, loss: float) -> int:
        _check_loss(loss)
        return self._levels

    def state_dict(self) -> dict[str, Any]:
        return {"levels": self._levels}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state_keys("FixedLevels", state, {"levels"})
        self._levels = _check_int("levels", state["levels"], 1, MAX_LEVELS)

    def __repr__(self) -> str:
        return f"FixedLevels({self._levels})"


class AdaQuantLevels:
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
    """

    def __init__(self, initial_levels: int = 2, *, min_levels: int = 1, max_levels: int = 2**16):
        self._min = _check_int("min_levels", min_levels, 1, MAX_LEVELS)
        self._max = _check_int("max_levels", max_levels, self._min, MAX_LEVELS)
        self._s0 = _check_int("initial_levels", initial_levels, self._min, self._max)
        self._levels = self._s0
        self._initial_loss: float | None = None

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def initial_loss(self) -> float | None:
        """``F_0``, or None before the first update."""
        return self._initial_loss

    def update(self, loss: float) -> int:
        value = _check_loss(loss)
        if self._initial_loss is None:
            self._initial_loss = value
        self._levels = adaquant_levels(self._initial_loss, value, self._s0, self._min, self._max)
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
        _check_state_keys(
            "AdaQuantLevels",
            state,
            {"initial_levels", "min_levels", "max_levels", "levels", "initial_loss"},
        )
        restored = AdaQuantLevels(
            state["initial_levels"], min_levels=state["min_levels"], max_levels=state["max_levels"]
        )
        levels = _check_int("levels", state["levels"], restored._min, restored._max)
        initial_loss = state["initial_loss"]
        if initial_loss is not None:
            initial_loss = _check_loss(initial_loss)
        self.__dict__.update(restored.__dict__)
        self._levels = levels
        self._initial_loss = initial_loss

    def __repr__(self) -> str:
        return (
            f"AdaQuantLevels(initial_levels={self._s0}, min_levels={self._min}, "
            f"max_levels={self._max})"
        )


#: Schedules by method name. Each constructor takes the config's keyword
#: arguments (``levels``, ``min_levels``, ``max_levels``); the CLI's choices of
#: ``[compression] method`` come from this dict.
SCHEDULES: dict[str, Callable[..., LevelSchedule]] = {
    "fp32": lambda **_: FullPrecision(),
    "qsgd": lambda *, levels, **_: FixedLevels(levels),
    "adaquantfl": lambda *, levels, min_levels=1, max_levels=2**16, **_: AdaQuantLevels(
        levels, min_levels=min_levels, max_levels=max_levels
    ),
}


def make_schedule(method: str, **kwargs: Any) -> LevelSchedule:
    """Build the schedule of ``method`` (a key of :data:`SCHEDULES`)."""
    try:
        factory = SCHEDULES[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; allowed: {sorted(SCHEDULES)}") from None
    return factory(**kwargs)
