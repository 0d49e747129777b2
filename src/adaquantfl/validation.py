"""Checks of values that come from outside: arguments, configs, checkpoints, clients' replies.

Every package checks its inputs with these, so that a bad value is refused
the same way everywhere: a :class:`ValueError` whose message names the value,
shows it and says what is allowed (DESIGN §6). None of them uses ``assert``,
which ``python -O`` strips.

- :func:`check_int`, :func:`check_real`, :func:`check_choice`,
  :func:`check_keys` raise;
- :func:`as_int` and :func:`as_real` return None for a value that is not a
  usable number, and :func:`is_real` says whether it is a number at all, for
  code that collects a reason instead of raising (the server's checks of a
  client's reply, :mod:`adaquantfl.fl.guard`).

Notes
-----
``bool`` is refused wherever a number is expected, although Python makes it
a subclass of ``int``: ``num_clients = true`` in a config is a mistake, not
the number one. NumPy integers and floats are accepted as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from numbers import Integral, Real
from typing import Any, TypeGuard, TypeVar

__all__ = [
    "as_int",
    "as_real",
    "check_choice",
    "check_int",
    "check_keys",
    "check_real",
    "is_real",
]

_E = TypeVar("_E", bound=Exception)


def as_int(value: object) -> int | None:
    """``value`` as an ``int``, or None when it is not an integer (``bool`` included)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        return None
    return int(value)


def is_real(value: object) -> TypeGuard[Real]:
    """Whether ``value`` is a real number, finite or not (``bool`` is not)."""
    return not isinstance(value, bool) and isinstance(value, Real)


def as_real(value: object) -> float | None:
    """``value`` as a finite ``float``, or None when it is not a finite real number.

    ``bool`` is not a number here; an ``int`` beyond float64's range is not finite.
    """
    if not is_real(value):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_int(
    name: str,
    value: object,
    low: int | None = None,
    high: int | None = None,
    *,
    error: type[_E] | type[ValueError] = ValueError,
) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (either bound optional).

    Raises
    ------
    ValueError
        (or ``error``) naming ``name``, the value and the allowed range.
    """
    result = as_int(value)
    if result is None:
        raise error(f"{name} must be an integer, got {value!r:.80}")
    if (low is not None and result < low) or (high is not None and result > high):
        raise error(f"{name} must be an integer {_range(low, high, False, False)}, got {result}")
    return result


def check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[_E] | type[ValueError] = ValueError,
) -> float:
    """``value`` as a finite ``float`` within the bounds (open or closed, each optional).

    Raises
    ------
    ValueError
        (or ``error``) naming ``name``, the value and the allowed range.
    """
    result = as_real(value)
    allowed = _range(low, high, low_open, high_open)
    if result is None:
        what = f"a finite number {allowed}".rstrip()
        raise error(f"{name} must be {what}, got {value!r:.80}")
    too_low = low is not None and (result <= low if low_open else result < low)
    too_high = high is not None and (result >= high if high_open else result > high)
    if too_low or too_high:
        raise error(f"{name} must be a finite number {allowed}, got {value!r}")
    return result


def check_choice(name: str, value: object, allowed: Collection[str]) -> str:
    """``value`` if it is one of ``allowed`` (exact and case-sensitive), else a ValueError."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r:.80}; allowed: {list(allowed)}")
    return value


def check_keys(what: str, state: object, keys: Collection[str]) -> Mapping[str, Any]:
    """``state`` if it is a mapping with exactly ``keys`` (a state dict), else a ValueError."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} state must be a mapping, got {type(state).__name__}")
    if set(state) != set(keys):
        found = sorted(map(str, state))
        raise ValueError(f"{what} state must have keys {sorted(keys)}, got {found}")
    return state
