"""Constructor checks of the strategies: every argument at construction, saying what was expected.

A mistake in a ServerApp otherwise surfaces rounds later, on another
machine, as an ``AttributeError`` deep in a round.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.fl.guard import check_weight_share
from adaquantfl.fl.server import as_policy, select_clients
from adaquantfl.flower.messages import describe_compressor
from adaquantfl.flower.sampling import SAMPLING_ATTRIBUTES

__all__ = ["check_policy", "check_settings", "positional_error"]

_INT64 = 2**63

USAGE = "AdaQuant(FedAvg(...), policy=AdaQuantLevels(2), seed=0, compressor=QSGDCompressor(), ...)"


def positional_error(
    name: str, usage: str, positional: tuple[str, ...], extra: int, note: str = ""
) -> TypeError:
    """The error for ``extra`` positional arguments beyond ``positional`` (e.g. FedAvg's)."""
    return TypeError(
        f"{name} takes {len(positional)} positional argument(s) ({', '.join(positional)}) "
        f"but {len(positional) + extra} were given; everything else{note} is a keyword "
        f"argument: {usage}"
    )


def check_policy(policy: object, what: str = "policy") -> Any:
    """``policy`` as a :class:`LevelPolicy`, or a ValueError that says what a policy is."""
    try:
        return as_policy(policy)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(
            f"{what} must be a level policy of adaquantfl.policy, e.g. AdaQuantLevels(2), "
            f"FixedLevels(3) or FullPrecision() (or a schedule with .levels and .update(loss)), "
            f"got {type(policy).__name__} {policy!r}"
        ) from None


def _int(name: str, value: object, low: int, high: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def check_settings(
    name: str, strategy: object, args: tuple[object, ...], values: Mapping[str, Any]
) -> dict[str, Any]:
    """Check :class:`~adaquantfl.flower.AdaQuant`'s arguments; returns the normalised ones.

    Raises
    ------
    TypeError
        For extra positional arguments, or an inner strategy that is not a
        Flower strategy.
    ValueError
        For any other argument, naming it, what it must be, and what it got.
    """
    if args:
        raise positional_error(name, USAGE, ("the inner strategy",), len(args))
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"{name} wraps a Flower strategy (e.g. FedAvg(), FedAdam()) as its first argument, "
            f"got {type(strategy).__name__} {strategy!r}: {USAGE}"
        )
    if values["policy"] is None:
        raise TypeError(f"{name} needs a level policy, policy=...: {USAGE}")
    out: dict[str, Any] = {"policy": check_policy(values["policy"])}
    _int("seed", values["seed"], -_INT64, _INT64 - 1)
    for key in ("compressor", "downlink"):
        if values[key] is not None:
            try:
                describe_compressor(values[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    if values["downlink_levels"] is not None:
        _int("downlink_levels", values["downlink_levels"], 1, MAX_LEVELS)
        if values["downlink"] is None:
            raise ValueError("downlink_levels needs a downlink compressor (downlink=...)")
    uncompressed = values["uncompressed"]
    if (
        isinstance(uncompressed, str)
        or not isinstance(uncompressed, Collection)
        or not all(isinstance(u, str) and u for u in uncompressed)
    ):
        raise ValueError(
            f"uncompressed must be a collection of array names or name suffixes, "
            f"got {uncompressed!r}"
        )
    num_clients, per_round = values["num_clients"], values["clients_per_round"]
    if (num_clients is None) != (per_round is None):
        raise ValueError("num_clients and clients_per_round must be given together")
    if num_clients is not None:
        _int("num_clients", num_clients, 1)
        _int("clients_per_round", per_round, 1, num_clients)
        select_clients(num_clients, per_round, seed=values["seed"], round_idx=0)
        if not values["sample_nodes"]:
            raise ValueError(
                "num_clients and clients_per_round select nodes by client id, which the wrapper "
                "does itself: pass sample_nodes=True"
            )
    if values["sample_nodes"]:
        missing = [a for a in SAMPLING_ATTRIBUTES if not hasattr(strategy, a)]
        if missing:
            raise ValueError(
                f"sample_nodes=True reads FedAvg's sampling settings from the inner strategy; "
                f"{type(strategy).__name__} lacks {missing}"
            )
    wait = values["node_wait_s"]
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not math.isfinite(wait):
        raise ValueError(f"node_wait_s must be a finite number >= 0, got {wait!r}")
    if wait < 0:
        raise ValueError(f"node_wait_s must be a finite number >= 0, got {wait!r}")
    out["max_weight_share"] = check_weight_share(values["max_weight_share"])
    limit = values["max_message_bytes"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"max_message_bytes must be a positive integer or None (the model's default "
            f"limit), got {limit!r}"
        )
    return out
