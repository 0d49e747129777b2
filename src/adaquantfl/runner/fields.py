"""Typed config fields: their metadata (choices, bounds) and the validation that reads it.

Every section of a config is a frozen dataclass whose fields carry a type and,
where it is a choice or a bound, metadata that :func:`validate` checks, so a
bad value is reported with its section, name and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConfigError",
    "at_least",
    "at_most",
    "build_section",
    "choice",
    "positive",
    "validate",
]


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
        where = f"[{section}] {f.name} = {value!r}"
        _check_type(value, hints[f.name], where)
        if isinstance(value, int) and _is_float_hint(hints[f.name]):
            value = float(value)  # TOML writes 1 for 1.0; store the float
            object.__setattr__(obj, f.name, value)
        meta = f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{where} is not allowed; choose one of {list(meta['choices'])}")
        if "min" in meta:
            low = meta["min"]
            if meta.get("exclusive") and not value > low:
                raise ConfigError(f"{where}: must be > {low}")
            if not meta.get("exclusive") and value < low:
                raise ConfigError(f"{where}: must be >= {low}")
        if "max" in meta and value > meta["max"]:
            why = f" ({meta['why']})" if "why" in meta else ""
            raise ConfigError(f"{where}: must be <= {meta['max']}{why}")


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
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"{where}: must be a finite number")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
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
