"""Argument checks shared by the data loaders and partitioners.

Every check raises :class:`ValueError` with a message that names the argument,
the bad value and what is allowed (DESIGN §6); none uses ``assert``, which
``python -O`` would strip.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["check_choice", "check_int", "check_real"]


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int`` after checking ``minimum <= value <= maximum``.

    ``bool`` is refused although it subclasses ``int``: ``num_clients=True`` is
    a mistake, not the number one.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    result = int(value)
    if result < minimum or (maximum is not None and result > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {result}")
    return result


def check_real(name: str, value: object, *, minimum: float, inclusive: bool) -> float:
    """Return ``value`` as a finite ``float`` above ``minimum``.

    ``inclusive`` says whether ``minimum`` itself is allowed.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    result = float(value)
    ok = result >= minimum if inclusive else result > minimum
    if not math.isfinite(result) or not ok:
        allowed = f"{'>=' if inclusive else '>'} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return result


def check_choice(name: str, value: object, allowed: list[str]) -> str:
    """Return ``value`` if it is one of ``allowed`` (exact, case-sensitive)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {allowed}")
    return value
