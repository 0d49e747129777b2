"""Tests of the run scores: final means, bits to target, seed aggregation."""

from __future__ import annotations

import pytest

from adaquantfl.runner.report import (
    aggregate_seeds,
    final_mean,
    first_round_at_target,
    summarize_run,
)


def rows(losses: list[float | None]) -> list[dict[str, float | int | None]]:
    out: list[dict[str, float | int | None]] = []
    cum = 0
    for i, loss in enumerate(losses, start=1):
        cum += 100
        row = {"round": i, "train_loss": loss, "cum_wire_bits": cum, "cum_formula_bits": cum - 10}
        out.append({**row, "test_accuracy": 0.5, "levels": 2})
    return out


def test_final_mean_uses_last_tenth_at_least_one_round() -> None:
    r = rows([float(i) for i in range(20, 0, -1)])  # 20 ... 1
    assert final_mean(r, "train_loss") == 1.5  # last 2 of 20 rounds
    assert final_mean(r[:5], "train_loss") == 16.0  # last 1 of 5
    assert final_mean(rows([None, None]), "train_loss") is None


def test_first_round_at_target_uses_the_trailing_mean() -> None:
    r = rows([3.0, 1.0, 1.0, 1.0, 1.0])
    # Trailing means over 3 rounds: 3, 2, 5/3, 1, 1.
    assert first_round_at_target(r, 1.0, 3) == 3
    assert first_round_at_target(r, 2.0, 3) == 1
    assert first_round_at_target(r, 1.0, 1) == 1
    assert first_round_at_target(r, 0.5, 3) is None
    # A round with no accepted reply (None) does not enter the window.
    assert first_round_at_target(rows([3.0, None, 1.0]), 2.0, 2) == 2
    with pytest.raises(ValueError):
        first_round_at_target(r, 1.0, 0)


def test_summarize_run_reports_bits_at_the_hit() -> None:
    s = summarize_run(rows([3.0, 1.0, 1.0, 1.0, 1.0]), target_loss=1.0, smooth_rounds=3)
    assert (s["bits_to_target"], s["formula_bits_to_target"], s["rounds_to_target"]) == (
        400,
        390,
        4,
    )
    assert s["total_wire_bits"] == 500
    assert summarize_run(rows([3.0]), target_loss=None, smooth_rounds=3)["bits_to_target"] is None


def test_aggregate_seeds_mean_sd_and_reached() -> None:
    a = summarize_run(rows([3.0, 1.0, 1.0]), target_loss=1.0, smooth_rounds=1)
    b = summarize_run(rows([3.0, 2.0, 2.0]), target_loss=1.0, smooth_rounds=1)
    agg = aggregate_seeds([a, b])
    assert agg["seeds"] == 2 and agg["reached"] == 1
    assert agg["bits_to_target"] == 200  # mean over the seeds that reached it
    assert agg["final_train_loss"] == 1.5 and agg["sd"]["final_train_loss"] == pytest.approx(
        0.7071, rel=1e-3
    )
    assert aggregate_seeds([a]) == a
