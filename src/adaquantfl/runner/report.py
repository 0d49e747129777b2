"""Plots and the summary table, drawn from a results directory alone.

``write_report(DIR)`` reads ``DIR/summary.json`` and every
``DIR/<label>/[seed-<n>/]metrics.jsonl`` and writes:

- ``loss_vs_bits.png``: training loss against cumulative uplink wire bits (log x),
  with the target loss and where each method first reached it;
- ``accuracy_vs_bits.png``: test accuracy against cumulative uplink bits;
- ``levels_vs_round.png``: the levels each method used, round by round;
- ``loss_vs_round.png``: training loss per round;
- ``report.png``: all four panels on one page;
- ``summary.md``: the summary table in Markdown.

The scores of a run come first (:func:`final_mean`, :func:`bits_to_target`,
seed statistics): the experiment computes them as it writes the summary, and
the tables and plots read them.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaquantfl.runner.files import atomic_write

__all__ = [
    "CUMULATIVE_KEYS",
    "DEFAULT_TARGET_FACTOR",
    "SUMMARY_KEYS",
    "aggregate_seeds",
    "best_fixed_bits",
    "final_mean",
    "first_round_at_target",
    "load_results",
    "markdown_table",
    "rich_table",
    "summarize_run",
    "table_rows",
    "write_report",
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


PLOT_FILES = (
    "loss_vs_bits.png",
    "accuracy_vs_bits.png",
    "levels_vs_round.png",
    "loss_vs_round.png",
    "report.png",
)


def load_results(
    out_dir: str | Path,
) -> tuple[dict[str, Any], dict[str, list[list[dict[str, Any]]]]]:
    """``(summary, {label: [rows of each seed]})`` of a results directory.

    Raises
    ------
    FileNotFoundError
        If ``summary.json`` or a method's metrics are missing; the message names the path.
    ValueError
        If a file is not valid JSON.
    """
    root = Path(out_dir)
    summary_path = root / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found: is {root} a results directory?")
    summary = _read_json(summary_path)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for label in summary.get("methods", {}):
        direct = root / label / "metrics.jsonl"
        paths = (
            [direct] if direct.is_file() else sorted((root / label).glob("seed-*/metrics.jsonl"))
        )
        if not paths:
            raise FileNotFoundError(f"no metrics.jsonl for method {label!r} under {root / label}")
        runs[label] = [_read_jsonl(p) for p in paths]
    return summary, runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from None
    return rows


# --------------------------------------------------------------------------- table


def best_fixed_bits(methods: Mapping[str, Mapping[str, Any]]) -> tuple[str, float] | None:
    """The hindsight-best fixed level: the qsgd method with the fewest bits to target."""
    reached = [
        (label, float(m["bits_to_target"]))
        for label, m in methods.items()
        if m.get("method") == "qsgd" and m.get("bits_to_target") is not None
    ]
    return min(reached, key=lambda item: item[1]) if reached else None


def table_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The summary table as strings, one dict per method, in the summary's order."""
    methods: Mapping[str, Mapping[str, Any]] = summary.get("methods", {})
    best = best_fixed_bits(methods)
    fp32 = next((m for m in methods.values() if m.get("method") == "fp32"), None)
    fp32_loss = fp32.get("final_train_loss") if fp32 else None
    rows = []
    for label, m in methods.items():
        bits = m.get("bits_to_target")
        sd = (m.get("sd") or {}).get("bits_to_target")
        seeds = m.get("seeds")
        reached = f" ({m.get('reached')}/{seeds})" if seeds else ""
        loss = m.get("final_train_loss")
        rows.append(
            {
                "method": label,
                "Mbit to target": ("never" if bits is None else _mbit(bits, sd)) + reached,
                "x best fixed": "" if bits is None or best is None else f"{bits / best[1]:.2f}",
                "rounds to target": _num(m.get("rounds_to_target"), "{:.0f}"),
                "final train loss": _num(loss, "{:.4f}"),
                "x fp32 loss": "" if loss is None or not fp32_loss else f"{loss / fp32_loss:.3f}",
                "final test acc": _num(m.get("final_test_accuracy"), "{:.3f}"),
                "total Mbit": _mbit(m.get("total_wire_bits")),
                "wire/formula": ""
                if not m.get("total_formula_bits")
                else f"{m['total_wire_bits'] / m['total_formula_bits']:.3f}",
            }
        )
        if summary.get("uplink_budget_bits") is not None:
            rows[-1]["rounds run"] = _num(m.get("rounds_run"), "{:.0f}")
    return rows


def _mbit(bits: float | None, sd: float | None = None) -> str:
    if bits is None:
        return ""
    text = f"{bits / 1e6:.3f}"
    return text if sd is None else f"{text} ± {sd / 1e6:.3f}"


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def markdown_table(summary: Mapping[str, Any]) -> str:
    rows = table_rows(summary)
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    target = summary.get("target_loss")
    note = (
        f"\nTarget training loss: {target:.4f} (trailing mean over "
        f"{summary.get('smooth_rounds', 10)} rounds).\n"
        if target is not None
        else "\nNo target loss was set.\n"
    )
    budget = summary.get("uplink_budget_bits")
    if budget is not None:
        note += (
            f"Uplink budget: {budget / 1e6:.3f} Mbit; each run stopped before the round that "
            "would exceed it, so the final figures are those at the budget.\n"
        )
    return "\n".join(lines) + "\n" + note


def rich_table(summary: Mapping[str, Any]) -> Any:
    """The summary table as a ``rich.table.Table``."""
    from rich.table import Table

    target = summary.get("target_loss")
    title = "bits to reach the target loss" + (f" {target:.4f}" if target is not None else "")
    if summary.get("uplink_budget_bits") is not None:
        title += f"; final figures at the {summary['uplink_budget_bits'] / 1e6:.3f} Mbit budget"
    table = Table(title=title)
    rows = table_rows(summary)
    if not rows:
        return table
    for name in rows[0]:
        if name == "method":
            table.add_column(name, justify="left", no_wrap=True)
        else:
            table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*r.values())
    return table


# --------------------------------------------------------------------------- plots


def _style(
    label: str, method: str | None, levels: int | None, all_levels: Sequence[int]
) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    if method == "fp32":
        return {"color": "black", "linewidth": 2.0, "linestyle": "--", "zorder": 3}
    if method == "adaquantfl":
        return {"color": "#d62728", "linewidth": 2.4, "zorder": 4}
    # Adaptive policies other than the paper's: distinct hues, not the fixed
    # levels' colour scale (which their changing levels would not fit).
    if method == "auto":
        return {"color": "#ff7f0e", "linewidth": 2.4, "zorder": 5}
    if method is not None and method.startswith("dadaquant"):
        return {"color": "#e377c2", "linewidth": 2.0, "linestyle": "-.", "zorder": 4}
    cmap = plt.get_cmap("viridis")
    if levels is None or not all_levels:
        return {"color": "grey", "linewidth": 1.2}
    lo, hi = math.log2(min(all_levels)), math.log2(max(all_levels))
    t = 0.0 if hi == lo else (math.log2(levels) - lo) / (hi - lo)
    return {"color": cmap(0.1 + 0.8 * t), "linewidth": 1.3, "alpha": 0.9}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    out = np.empty_like(values)
    for i in range(len(values)):
        seg = values[max(0, i - window + 1) : i + 1]
        seg = seg[np.isfinite(seg)]
        out[i] = seg.mean() if seg.size else np.nan
    return out


def _mean_curve(runs: list[list[dict[str, Any]]], key: str) -> np.ndarray:
    arrays = [
        np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        for rows in runs
    ]
    length = min(len(a) for a in arrays)
    stacked = np.stack([a[:length] for a in arrays])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (fp32 levels) stay NaN
        mean: np.ndarray = np.nanmean(stacked, axis=0)
    return mean


def _save(fig: Any, path: Path, *, dpi: int) -> None:
    """``fig`` as a PNG at ``path``, written atomically (a failed redraw keeps the old plot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write(path, buffer.getvalue())


def write_report(out_dir: str | Path) -> list[Path]:
    """Draw every plot and the Markdown table of a results directory; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(out_dir)
    summary, runs = load_results(root)
    methods: Mapping[str, Mapping[str, Any]] = summary.get("methods", {})
    target = summary.get("target_loss")
    window = int(summary.get("smooth_rounds", 10))
    all_levels = [
        int(m["levels"]) for m in methods.values() if m.get("method") == "qsgd" and m.get("levels")
    ]
    curves = {}
    for label, seed_rows in runs.items():
        curves[label] = {
            key: _mean_curve(seed_rows, key)
            for key in ("round", "cum_wire_bits", "train_loss", "test_accuracy", "levels")
        }

    panels = {
        "loss_vs_bits.png": ("cumulative uplink wire bits", "training loss (trailing mean)"),
        "accuracy_vs_bits.png": ("cumulative uplink wire bits", "test accuracy (trailing mean)"),
        "levels_vs_round.png": ("round", "quantization levels s"),
        "loss_vs_round.png": ("round", "training loss (trailing mean)"),
    }

    def draw(ax: Any, name: str) -> None:
        xlabel, ylabel = panels[name]
        for label, c in curves.items():
            m = methods.get(label, {})
            style = _style(label, m.get("method"), m.get("levels"), all_levels)
            loss = _smooth(c["train_loss"], window)
            if name == "loss_vs_bits.png":
                ax.plot(c["cum_wire_bits"], loss, label=label, **style)
                bits = m.get("bits_to_target")
                if bits is not None and target is not None:
                    ax.plot([bits], [target], marker="o", color=style["color"], markersize=5)
            elif name == "accuracy_vs_bits.png":
                ax.plot(
                    c["cum_wire_bits"], _smooth(c["test_accuracy"], window), label=label, **style
                )
            elif name == "levels_vs_round.png":
                if m.get("method") != "fp32":
                    ax.step(c["round"], c["levels"], where="post", label=label, **style)
            else:
                ax.plot(c["round"], loss, label=label, **style)
        if name in ("loss_vs_bits.png", "accuracy_vs_bits.png"):
            ax.set_xscale("log")
        if name == "levels_vs_round.png":
            ax.set_yscale("log", base=2)
        if target is not None and name in ("loss_vs_bits.png", "loss_vs_round.png"):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1.0, label="target")
            smoothed = [_smooth(c["train_loss"], window) for c in curves.values()]
            losses = np.concatenate(smoothed) if smoothed else np.zeros(0)
            losses = losses[np.isfinite(losses)]  # a run that accepted nothing has no loss
            if losses.size:
                top, low = float(losses.max()), min(float(losses.min()), target)
                ax.set_ylim(low - 0.05 * (top - low), top + 0.02 * (top - low))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)

    written = []
    for name in panels:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
        draw(ax, name)
        ax.legend(fontsize=8, ncol=2, frameon=False)
        path = root / name
        _save(fig, path, dpi=130)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(2, 2, figsize=(14, 9), layout="constrained")
    for ax, name in zip(axes.flat, panels, strict=True):
        draw(ax, name)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9, frameon=False)
    title = "Uplink bits vs training loss"
    if target is not None:
        title += f" (target {target:.4f})"
    fig.suptitle(title)
    path = root / "report.png"
    _save(fig, path, dpi=110)
    plt.close(fig)
    written.append(path)

    table_path = root / "summary.md"
    atomic_write(table_path, markdown_table(summary))
    written.append(table_path)
    return written
