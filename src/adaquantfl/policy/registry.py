"""Level policies by method name: the registry the config, the CLI and the Flower app read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from adaquantfl.policy.base import ROUNDINGS, LevelPolicy
from adaquantfl.policy.classic import AdaQuantLevels, FixedLevels, FullPrecision
from adaquantfl.validation import check_choice

__all__ = [
    "LEVELLESS",
    "POLICIES",
    "PolicyFactory",
    "check_options",
    "make_policy",
    "no_options",
    "register_policy",
]

#: ``(levels=, min_levels=, max_levels=, options=) -> LevelPolicy``: ``levels`` is the
#: config's ``[compression] levels`` (s for fixed levels, s0 for AdaQuantFL), and
#: ``options`` the ``[compression.policy_options]`` table, which the factory validates.
PolicyFactory = Callable[..., LevelPolicy]

#: Policies by method name (the config's ``[compression] method`` choices).
POLICIES: dict[str, PolicyFactory] = {}
#: The methods whose factory ignores ``levels`` (their results are labelled without it).
LEVELLESS: set[str] = set()


def register_policy(
    name: str, *, takes_levels: bool = True
) -> Callable[[PolicyFactory], PolicyFactory]:
    """Decorator: add a factory to :data:`POLICIES` under ``name``.

    ``takes_levels=False`` marks a policy that ignores the config's ``levels``.
    """

    def add(factory: PolicyFactory) -> PolicyFactory:
        if name in POLICIES and POLICIES[name] is not factory:
            raise ValueError(f"a policy named {name!r} is already registered")
        POLICIES[name] = factory
        if not takes_levels:
            LEVELLESS.add(name)
        return factory

    return add


def check_options(
    method: str, options: Mapping[str, Any] | None, defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """``defaults`` updated with ``options``; an unknown key names the allowed ones."""
    given = dict(options or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown policy option(s) {unknown} for method {method!r}; allowed: {sorted(defaults)}"
        )
    return {**defaults, **given}


def no_options(method: str, options: Mapping[str, Any] | None) -> None:
    """Reject policy options for a method that takes none."""
    if options:
        raise ValueError(f"method {method!r} takes no policy options, got {sorted(options)}")


@register_policy("fp32", takes_levels=False)
def _fp32(*, options: Mapping[str, Any] | None = None, **_: Any) -> LevelPolicy:
    no_options("fp32", options)
    return FullPrecision()


@register_policy("qsgd")
def _qsgd(*, levels: int, options: Mapping[str, Any] | None = None, **_: Any) -> LevelPolicy:
    no_options("qsgd", options)
    return FixedLevels(levels)


@register_policy("adaquantfl")
def _adaquantfl(
    *,
    levels: int,
    min_levels: int = 1,
    max_levels: int = 2**16,
    options: Mapping[str, Any] | None = None,
    **_: Any,
) -> LevelPolicy:
    opts = check_options("adaquantfl", options, {"round_levels": "none"})
    return AdaQuantLevels(
        levels,
        min_levels=min_levels,
        max_levels=max_levels,
        round_levels=check_choice("round_levels", opts["round_levels"], ROUNDINGS),
    )


def make_policy(method: str, **kwargs: Any) -> LevelPolicy:
    """Build the policy of ``method`` (a key of :data:`POLICIES`).

    Raises
    ------
    ValueError
        For an unknown method (listing the registered ones) or bad arguments.
    """
    try:
        factory = POLICIES[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; allowed: {sorted(POLICIES)}") from None
    return factory(**kwargs)
