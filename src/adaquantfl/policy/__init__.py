"""Level policies: how many quantization levels each client uses, round by round.

A policy is a small mutable state object owned by the server
(:class:`~adaquantfl.fl.server.FedServer`). Each round it gives the levels of
every participant (:meth:`~base.LevelPolicy.levels_for`) and then observes
what happened (:meth:`~base.LevelPolicy.observe`). ``None`` levels mean full
precision.

- :mod:`.base`: the protocol and what a policy observes;
- :mod:`.classic`: ``fp32``, ``qsgd`` (fixed levels) and ``adaquantfl``, which
  keep the schedule interface of DESIGN §7 (``levels``, ``update(loss)``);
- :mod:`.dadaquant`: DAdaQuant's time-, client- and doubly-adaptive levels;
- :mod:`.auto`: ``auto``, levels chosen by trial for the most progress per bit;
- :mod:`.probe`: ``probe``, levels for the most progress per bit from the clients'
  measurements of nearby levels' noise;
- :mod:`.registry`: :data:`POLICIES` by method name.

Adding a policy is one module whose factory is decorated with
``@register_policy("name")``.
"""

import warnings
from typing import Any

from adaquantfl.policy.auto import AutoLevels
from adaquantfl.policy.base import (
    ClientOutcome,
    LevelPlan,
    LevelPolicy,
    RoundObservation,
)
from adaquantfl.policy.classic import (
    AdaQuantLevels,
    FixedLevels,
    FullPrecision,
    LevelSchedule,
    UniformLevels,
    adaquant_levels,
)
from adaquantfl.policy.dadaquant import DAdaQuant
from adaquantfl.policy.probe import ProbeLevels
from adaquantfl.policy.registry import POLICIES, make_policy, register_policy

__all__ = [
    "POLICIES",
    "AdaQuantLevels",
    "AutoLevels",
    "ClientOutcome",
    "DAdaQuant",
    "FixedLevels",
    "FullPrecision",
    "LevelPlan",
    "LevelPolicy",
    "LevelSchedule",
    "ProbeLevels",
    "RoundObservation",
    "UniformLevels",
    "adaquant_levels",
    "make_policy",
    "register_policy",
]

#: Old names of the registry, kept working with a warning: the policies
#: replaced the schedules, and one registry serves both.
_DEPRECATED = {"SCHEDULES": ("POLICIES", POLICIES), "make_schedule": ("make_policy", make_policy)}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(
            f"adaquantfl.policy.{name} is deprecated; use adaquantfl.policy.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'adaquantfl.policy' has no attribute {name!r}")
