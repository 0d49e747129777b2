"""Scores of a run from its per-round metrics: final loss, bits to a target loss, seed statistics.

Definitions (DESIGN §7):

- "final" is the mean over the last 10% of rounds (at least one round);
- ``bits_to_target`` is the cumulative wire bits at the first round whose
  trailing mean training loss over ``smooth_rounds`` rounds (fewer at the
  start of the run) is at or below the target; None if that never happens;
- the default target is 1.01 x fp32's final training loss.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CUMULATIVE_KEYS",
    "DEFAULT_TARGET_FACTOR",
    "SUMMARY_KEYS",
    "aggregate_seeds",
    "final_mean",
    "first_round_at_target",
    "summarize_run",
]

DEFAULT_TARGET_FACTOR = 1.01
#: The per-round figures every metrics row also carries as running totals, ``cum_<key>``.
CUMULATIVE_KEYS: tuple[str, ...] = ("wire_bits", "formula_bits", "downlink_bits")

#: Per-method summary figures, in the order tables show them.
SUMMARY_KEYS: tuple[str, ...] = (
    "bits_to_target",
    "formula_bits_to_target",
    "downlink_bits_to_target",
    "rounds_to_target",
    "final_train_loss",
    "final_test_loss",
    "final_test_accuracy",
    "total_wire_bits",
    "total_formula_bits",
    "total_downlink_bits",
    "final_levels",
    "rounds_run",
)


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def final_mean(rows: Sequence[Mapping[str, Any]], key: str, fraction: float = 0.1) -> float | None:
    """Mean of ``key`` over the last ``fraction`` of rounds (at least one); None if all missing."""
    if not rows:
        return None
    count = max(1, math.ceil(fraction * len(rows)))
    values = _finite([r.get(key) for r in rows[-count:]])
    return statistics.fmean(values) if values else None


def first_round_at_target(
    rows: Sequence[Mapping[str, Any]], target: float, smooth_rounds: int
) -> int | None:
    """Index into ``rows`` of the first round whose trailing mean loss is <= ``target``."""
    if smooth_rounds < 1:
        raise ValueError(f"smooth_rounds must be >= 1, got {smooth_rounds}")
    window: list[float] = []
    for i, row in enumerate(rows):
        loss = row.get("train_loss")
        if loss is not None and math.isfinite(loss):
            window.append(float(loss))
            window = window[-smooth_rounds:]
        if window and statistics.fmean(window) <= target:
            return i
    return None


def summarize_run(
    rows: Sequence[Mapping[str, Any]], *, target_loss: float | None, smooth_rounds: int
) -> dict[str, Any]:
    """The summary figures of one run (one method, one seed)."""
    hit = None if target_loss is None else first_round_at_target(rows, target_loss, smooth_rounds)
    last = rows[-1] if rows else {}
    return {
        "bits_to_target": None if hit is None else rows[hit]["cum_wire_bits"],
        "formula_bits_to_target": None if hit is None else rows[hit]["cum_formula_bits"],
        "downlink_bits_to_target": None if hit is None else rows[hit].get("cum_downlink_bits"),
        "rounds_to_target": None if hit is None else rows[hit]["round"],
        "final_train_loss": final_mean(rows, "train_loss"),
        "final_test_loss": final_mean(rows, "test_loss"),
        "final_test_accuracy": final_mean(rows, "test_accuracy"),
        "total_wire_bits": last.get("cum_wire_bits", 0),
        "total_formula_bits": last.get("cum_formula_bits", 0),
        "total_downlink_bits": last.get("cum_downlink_bits", 0),
        "final_levels": last.get("levels"),
        "rounds_run": len(rows),
    }


def aggregate_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine one method's per-seed summaries: the mean of each figure, and its sd.

    A figure that is None for some seeds (e.g. a target never reached) is
    averaged over the seeds that have it; ``reached`` counts the seeds that
    reached the target. With one seed the summary is that seed's, unchanged.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds needs at least one summary")
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out: dict[str, Any] = {}
    sd: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        values = [s.get(key) for s in per_seed]
        present = [float(v) for v in values if v is not None]
        out[key] = statistics.fmean(present) if present else None
        sd[key] = statistics.stdev(present) if len(present) > 1 else None
    out["sd"] = sd
    out["seeds"] = len(per_seed)
    out["reached"] = sum(s.get("bits_to_target") is not None for s in per_seed)
    out["per_seed"] = [dict(s) for s in per_seed]
    return out
