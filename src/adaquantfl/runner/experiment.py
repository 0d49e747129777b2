"""Config -> run -> results directory; and the side-by-side comparison of methods.

Results directory (DESIGN §7)::

    DIR/config.toml             the resolved config
    DIR/summary.json            {"target_loss": ..., "methods": {label: {...}}}
    DIR/<label>/metrics.jsonl   one row per round (DIR/<label>/seed-<n>/ when seeds > 1)
    DIR/<label>/model.pt        the final global model (state_dict)
    DIR/*.png                   plots (see adaquantfl.runner.report)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from adaquantfl.fl.record import RoundRecord
from adaquantfl.runner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from adaquantfl.runner.config import Config, ConfigError, MethodSpec, load_config
from adaquantfl.runner.engines import ENGINES
from adaquantfl.runner.metrics import (
    DEFAULT_TARGET_FACTOR,
    aggregate_seeds,
    final_mean,
    summarize_run,
)

__all__ = ["CompareResult", "RunResult", "compare", "run"]

CHECKPOINT_NAME = "checkpoint.pt"

logger = logging.getLogger(__name__)

ConfigLike = Config | str | os.PathLike[str] | Mapping[str, Any]
#: Called after every round with (label, row); the CLI draws its progress bar from it.
RoundCallback = Callable[[str, Mapping[str, Any]], None]


@dataclass
class RunResult:
    """One method, one seed."""

    label: str
    seed: int
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    params: torch.Tensor
    out_dir: Path | None = None


@dataclass
class CompareResult:
    """All methods (and seeds) of a comparison."""

    target_loss: float | None
    summary: dict[str, Any]
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    out_dir: Path | None = None
    plots: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- running


class _RowWriter:
    """Turns records into metrics rows with running totals, and streams them out."""

    def __init__(
        self,
        label: str,
        sink: Any,
        on_round: RoundCallback | None,
        rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.label = label
        self.sink = sink
        self.on_round = on_round
        self.rows: list[dict[str, Any]] = []
        self._cum = {"wire_bits": 0, "formula_bits": 0, "downlink_bits": 0}
        for row in rows:  # rows restored from a checkpoint
            self._emit(dict(row))
            for key in self._cum:
                self._cum[key] = row[f"cum_{key}"]

    def __call__(self, record: RoundRecord) -> None:
        row = record.as_row()
        for key in self._cum:
            self._cum[key] += row[key]
            row[f"cum_{key}"] = self._cum[key]
        self._emit(row)

    def _emit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.sink is not None:
            self.sink.write(json.dumps(row) + "\n")
            self.sink.flush()
        if self.on_round is not None:
            self.on_round(self.label, row)


def _without_rounds(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    out.get("train", {}).pop("rounds", None)
    return out


def _resume_state(config: Config, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint of ``run_dir`` if there is one, checked against ``config``."""
    path = run_dir / CHECKPOINT_NAME
    if not (path.exists() or path.with_name(path.name + ".prev").exists()):
        logger.warning("no checkpoint in %s; starting the run from round 1", run_dir)
        return None
    try:
        state, source = load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    # The number of rounds may grow on resume; nothing else may change.
    if _without_rounds(state["config"]) != _without_rounds(config.to_dict()):
        raise ConfigError(
            f"cannot resume {run_dir}: {source.name} was written with a different config; "
            "only [train] rounds may change on resume"
        )
    if state["round"] > config.train.rounds:
        raise ConfigError(
            f"cannot resume {run_dir}: it already ran {state['round']} rounds, "
            f"more than rounds = {config.train.rounds}"
        )
    logger.info("resuming %s after round %d (%s)", run_dir, state["round"], source.name)
    return state


def _run_one(
    config: Config,
    label: str,
    run_dir: Path | None,
    *,
    target_loss: float | None,
    smooth_rounds: int,
    on_round: RoundCallback | None,
    resume: bool = False,
) -> RunResult:
    engine = ENGINES[config.train.engine]
    if run_dir is None and (resume or config.train.checkpoint_every):
        raise ConfigError("checkpoints and --resume need an output directory")
    state = _resume_state(config, run_dir) if resume and run_dir is not None else None
    sink = None
    on_checkpoint = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        sink = (run_dir / "metrics.jsonl").open("w", encoding="utf-8")
        checkpoint_path = run_dir / CHECKPOINT_NAME

        def on_checkpoint(server_state: dict[str, Any], done: int) -> None:
            save_checkpoint(
                checkpoint_path,
                {
                    "label": label,
                    "config": config.to_dict(),
                    "round": done,
                    "server": server_state,
                    "rows": list(writer.rows),
                },
            )

    try:
        writer = _RowWriter(label, sink, on_round, state["rows"] if state else ())
        final = engine(
            config,
            writer,
            resume_state=state["server"] if state else None,
            on_checkpoint=on_checkpoint if config.train.checkpoint_every else None,
        )
    finally:
        if sink is not None:
            sink.close()
    if run_dir is not None:
        torch.save(final.model.state_dict(final.params), run_dir / "model.pt")
    rows = writer.rows
    summary = summarize_run(rows, target_loss=target_loss, smooth_rounds=smooth_rounds)
    return RunResult(label, config.train.seed, rows, summary, final.params, run_dir)


def _write_config(config: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(tomli_w.dumps(config.to_dict()), encoding="utf-8")


def _write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def run(
    config: ConfigLike,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    on_round: RoundCallback | None = None,
    resume: bool = False,
) -> RunResult:
    """Run the single method of ``[compression]`` and write its results directory.

    ``summary.json`` has the same schema as :func:`compare`'s; its
    ``target_loss`` is ``[compare] target_loss`` (None if unset). With
    ``resume``, the run continues from the last good checkpoint in
    ``out_dir`` (written every ``[train] checkpoint_every`` rounds).
    """
    cfg = load_config(config, overrides)
    cfg = cfg.with_compression(cfg.compression) if cfg.compare.methods else cfg
    spec = MethodSpec(cfg.compression, cfg.compression.label)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _write_config(cfg, out)
    result = _run_one(
        cfg,
        spec.label,
        out / spec.label if out is not None else None,
        target_loss=cfg.compare.target_loss,
        smooth_rounds=cfg.compare.smooth_rounds,
        on_round=on_round,
        resume=resume,
    )
    if out is not None:
        _write_summary(
            out,
            {
                "target_loss": cfg.compare.target_loss,
                "uplink_budget_bits": cfg.train.uplink_budget_bits,
                "methods": {spec.label: result.summary},
            },
        )
    return result


def compare(
    config: ConfigLike,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    on_round: RoundCallback | None = None,
    plots: bool = True,
    resume: bool = False,
) -> CompareResult:
    """Run every method of ``[compare]`` (for each seed), score them and draw the report.

    Without ``target_loss`` the target is 1.01 x fp32's final training loss
    (averaged over seeds), which needs an fp32 method in the list.
    """
    cfg = load_config(config, overrides)
    specs = cfg.methods()
    target = cfg.compare.target_loss
    if target is None and not any(s.compression.method == "fp32" for s in specs):
        raise ConfigError(
            "[compare] target_loss is not set and no fp32 method is listed to derive it from; "
            'add { method = "fp32" } to methods or set target_loss'
        )
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _write_config(cfg, out)
    seeds = [cfg.train.seed + i for i in range(cfg.compare.seeds)]
    # fp32 first: its final loss sets the default target of the others.
    ordered = sorted(specs, key=lambda s: s.compression.method != "fp32")
    runs: dict[str, list[RunResult]] = {s.label: [] for s in specs}
    for spec in ordered:
        for seed in seeds:
            run_cfg = cfg.with_compression(spec.compression).with_seed(seed)
            run_dir = None
            if out is not None:
                run_dir = out / spec.label if len(seeds) == 1 else out / spec.label / f"seed-{seed}"
            runs[spec.label].append(
                _run_one(
                    run_cfg,
                    spec.label,
                    run_dir,
                    target_loss=target,
                    smooth_rounds=cfg.compare.smooth_rounds,
                    on_round=on_round,
                    resume=resume,
                )
            )
        if target is None and spec.compression.method == "fp32":
            finals = [final_mean(r.metrics, "train_loss") for r in runs[spec.label]]
            present = [f for f in finals if f is not None]
            if present:
                target = DEFAULT_TARGET_FACTOR * sum(present) / len(present)
    # Re-score every run against the final target (fp32's own runs included).
    methods: dict[str, Any] = {}
    for spec in specs:
        for r in runs[spec.label]:
            r.summary = summarize_run(
                r.metrics, target_loss=target, smooth_rounds=cfg.compare.smooth_rounds
            )
        methods[spec.label] = aggregate_seeds([r.summary for r in runs[spec.label]])
        methods[spec.label]["method"] = spec.compression.method
        methods[spec.label]["levels"] = (
            None if spec.compression.method == "fp32" else spec.compression.levels
        )
        methods[spec.label]["encoding"] = spec.compression.resolved_encoding
        methods[spec.label]["compressor"] = spec.compression.compressor
    summary = {
        "target_loss": target,
        "smooth_rounds": cfg.compare.smooth_rounds,
        "uplink_budget_bits": cfg.train.uplink_budget_bits,
        "methods": methods,
    }
    result = CompareResult(target_loss=target, summary=summary, runs=runs, out_dir=out)
    if out is not None:
        _write_summary(out, summary)
        if plots:
            from adaquantfl.runner.report import write_report

            result.plots = write_report(out)
    return result
