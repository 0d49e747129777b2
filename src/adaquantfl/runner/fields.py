"""Typed config fields: their metadata (choices, bounds) and the validation that reads it.

Every section of a config is a frozen dataclass whose fields carry a type and,
where it is a choice or a bound, metadata that :func:`validate` checks, so a
bad value is reported with its section, name and what is allowed.

Every number has a range: a float field's bounds are in its metadata (each
with the reason for it, shown with an error), and an integer field without an
upper bound of its own is at most ``2**63 - 1``, the largest integer TOML and
the random streams (which pack round, seed and client as signed 64-bit
integers) hold.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from adaquantfl.validation import as_int, as_real, is_real

__all__ = [
    "INT64_MAX",
    "ConfigError",
    "at_least",
    "at_most",
    "build_section",
    "choice",
    "positive",
    "validate",
    "within",
]

#: The largest value of an integer field without a bound of its own.
INT64_MAX = 2**63 - 1
_INT64_WHY = "a signed 64-bit integer, the largest TOML and the random streams hold"


class ConfigError(ValueError):
    """A configuration key or value is not allowed; the text names it."""


def choice(*choices: str) -> dict[str, Any]:
    return {"choices": tuple(choices)}


def positive() -> dict[str, Any]:
    return {"min": 0, "exclusive": True}


def at_least(low: float) -> dict[str, Any]:
    return {"min": low}


def at_most(high: float, why: str, low: float = 1) -> dict[str, Any]:
    """At least ``low`` and at most ``high``; ``why`` is the reason for ``high``, shown with it."""
    return {"min": low, "max": high, "why": why}


def within(low: float, high: float, why: str, *, above: bool = False) -> dict[str, Any]:
    """In ``[low, high]`` (``(low, high]`` with ``above``); ``why`` is the reason, shown with it."""
    return {"min": low, "max": high, "why": why, "exclusive": above}


def _range(meta: Mapping[str, Any], high: float) -> str:
    opening = "(" if meta.get("exclusive") else "["
    return f"{opening}{_number(meta.get('min', '-inf'))}, {_number(high)}]"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**64:
        value = int(value)
    if isinstance(value, int) and value > 2**32 and (value & (value - 1)) == 0:
        return f"2**{value.bit_length() - 1}"
    if isinstance(value, int) and value > 2**32 and ((value + 1) & value) == 0:
        return f"2**{value.bit_length()} - 1"
    return str(value)


def build_section(
    cls: type, values: Mapping[str, Any], section: str, *, strict_keys: Mapping[str, Any]
) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(strict_keys) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]!s}; allowed keys in [{section}]: {', '.join(names)}"
        )
    kwargs = {k: v for k, v in values.items() if k in names}
    for key, value in kwargs.items():  # TOML arrays -> the tuples the dataclasses hold
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"[{section}]: {exc}") from None


def validate(obj: Any, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        shown = repr(value)
        if len(shown) > 80:
            shown = f"{shown[:60]}... ({len(shown)} characters)"
        where = f"[{section}] {f.name} = {shown}"
        _check_type(value, hints[f.name], where)
        if isinstance(value, int) and _is_float_hint(hints[f.name]):
            value = float(value)  # TOML writes 1 for 1.0; store the float
            object.__setattr__(obj, f.name, value)
        meta = f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{where} is not allowed; choose one of {list(meta['choices'])}")
        if not is_real(value):
            continue
        high, why = meta.get("max"), meta.get("why")
        if high is None and isinstance(value, int):
            high, why = INT64_MAX, _INT64_WHY
        reason = f" ({why})" if why else ""
        allowed = f"; allowed range {_range(meta, high)}" if high is not None else ""
        if "min" in meta:
            low = meta["min"]
            if meta.get("exclusive") and not value > low:
                raise ConfigError(f"{where}: must be > {_number(low)}{reason}{allowed}")
            if not meta.get("exclusive") and value < low:
                raise ConfigError(f"{where}: must be >= {_number(low)}{reason}{allowed}")
        if high is not None and value > high:
            raise ConfigError(f"{where}: must be <= {_number(high)}{reason}{allowed}")


def _is_float_hint(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{where}: must be a list")
        return
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a table")
        return
    if hint is float:
        if as_real(value) is None:  # also an integer too large for a float
            raise ConfigError(f"{where}: must be a finite number")
        return
    if hint is int:
        if as_int(value) is None:
            raise ConfigError(f"{where}: must be an integer")
        return
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
        return
    if not isinstance(value, hint):  # pragma: no cover - every field type is handled above
        raise ConfigError(f"{where}: must be of type {hint}")
