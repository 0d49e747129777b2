"""Config -> run -> results directory; and the side-by-side comparison of methods.

Results directory (DESIGN §7)::

    DIR/config.toml             the resolved config
    DIR/summary.json            {"target_loss": ..., "methods": {label: {...}}}
    DIR/<label>/metrics.jsonl   one row per round (DIR/<label>/seed-<n>/ when seeds > 1)
    DIR/<label>/model.pt        the final global model (state_dict)
    DIR/*.png                   plots (see adaquantfl.runner.report)

A run holds ``DIR``'s lock for its whole life (one run per directory at a
time), and writes nothing before the config, the data and ``DIR`` pass
:func:`.preflight.preflight` (``DIR`` holding another run's results needs
``overwrite``; ``resume`` needs the same config and a checkpoint that holds
what a resume needs). Every file is written atomically (:mod:`.files`);
``metrics.jsonl`` streams to a partial file of the run's own and replaces the
old file only when its run ends. A resumed run rewrites ``config.toml`` (its
new ``rounds``) only when it has finished, with ``summary.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w
import torch

from adaquantfl.fl.record import RoundRecord
from adaquantfl.imports import object_name
from adaquantfl.runner.checkpoint import CHECKPOINT_NAME, resume_state, save_checkpoint
from adaquantfl.runner.config import Config, ConfigError, MethodSpec, load_config
from adaquantfl.runner.engines import ENGINES
from adaquantfl.runner.files import StreamedFile, atomic_write, remove_orphans
from adaquantfl.runner.preflight import Job, hold_out_dir, preflight
from adaquantfl.runner.report import (
    CUMULATIVE_KEYS,
    DEFAULT_TARGET_FACTOR,
    aggregate_seeds,
    final_mean,
    summarize_run,
)

__all__ = ["CompareResult", "RunResult", "compare", "run"]

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
        sink: StreamedFile | None,
        on_round: RoundCallback | None,
        rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.label = label
        self.sink = sink
        self.on_round = on_round
        self.rows: list[dict[str, Any]] = []
        self._cum = dict.fromkeys(CUMULATIVE_KEYS, 0)
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
            self.sink.write(json.dumps(row) + "\n")  # flushed: a killed run keeps its rows
        if self.on_round is not None:
            self.on_round(self.label, row)


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
    """One method at one seed; its files appear only when it has finished (see :mod:`.files`)."""
    engine = ENGINES[config.train.engine]
    if run_dir is None and (resume or config.train.checkpoint_every):
        raise ConfigError("checkpoints and --resume need an output directory")
    state = resume_state(config, run_dir, label) if resume and run_dir is not None else None
    if resume and run_dir is not None and state is None:
        logger.warning("no checkpoint in %s; starting the run from round 1", run_dir)
    elif state is not None:
        logger.info("resuming %s after round %d", run_dir, state["round"])
    on_checkpoint = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
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

    with contextlib.ExitStack() as stack:
        sink = None
        if run_dir is not None:
            sink = stack.enter_context(StreamedFile(run_dir / "metrics.jsonl"))
        writer = _RowWriter(label, sink, on_round, state["rows"] if state else ())
        final = engine(
            config,
            writer,
            resume_state=state["server"] if state else None,
            on_checkpoint=on_checkpoint if config.train.checkpoint_every else None,
        )
    if run_dir is not None:
        buffer = io.BytesIO()
        torch.save(final.model.state_dict(final.params), buffer)
        atomic_write(run_dir / "model.pt", buffer.getvalue())
    rows = writer.rows
    if rows and all(r["participants"] == 0 for r in rows):
        logger.warning(
            "%s: no client reply was accepted in any of its %d rounds; the model is the "
            "initial one (the rejections above say why)",
            label,
            len(rows),
        )
    summary = summarize_run(rows, target_loss=target_loss, smooth_rounds=smooth_rounds)
    return RunResult(label, config.train.seed, rows, summary, final.params, run_dir)


def _with_own(config: Config, model: object, data: object) -> Config:
    """``config`` naming the model and data set from Python (:mod:`adaquantfl.imports`)."""
    if model is not None:
        named = replace(config.model, name=object_name(model, "model"))
        config = replace(config, model=named)
    if data is not None:
        config = replace(config, data=replace(config.data, dataset=object_name(data, "data")))
    return config


def _remove_orphans(out: Path, jobs: Sequence[Job]) -> None:
    """Temporary files of runs killed in ``out`` earlier (called holding its lock)."""
    dirs = {out}
    for job in jobs:
        if job.run_dir is not None:
            dirs |= {job.run_dir, job.run_dir.parent}
    for directory in sorted(dirs):
        remove_orphans(directory)


def _write_config(config: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "config.toml", tomli_w.dumps(config.to_dict()))


def _write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def run(
    config: ConfigLike,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    on_round: RoundCallback | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model: object = None,
    data: object = None,
) -> RunResult:
    """Run the single method of ``[compression]`` and write its results directory.

    ``summary.json`` has the same schema as :func:`compare`'s; its
    ``target_loss`` is ``[compare] target_loss`` (None if unset). With
    ``resume``, the run continues from the last good checkpoint in
    ``out_dir`` (written every ``[train] checkpoint_every`` rounds).

    Nothing is written before the config, the data and ``out_dir`` pass
    :func:`.preflight.preflight`: an ``out_dir`` that holds another run's
    results is refused unless ``overwrite`` (or ``resume`` of that same run).

    ``model`` and ``data`` put a model or data set of your own in place of
    ``[model] name`` and ``[data] dataset``: a factory (or an ``nn.Module``
    for the model), as :func:`~adaquantfl.models.make_model` and
    :func:`~adaquantfl.data.load_federated` take them by import path.
    """
    cfg = _with_own(load_config(config, overrides), model, data)
    cfg = cfg.with_compression(cfg.compression) if cfg.compare.methods else cfg
    spec = MethodSpec(cfg.compression, cfg.compression.label)
    out = Path(out_dir) if out_dir is not None else None
    job = Job(spec.label, cfg, out / spec.label if out is not None else None)
    with hold_out_dir(out, "run"):
        preflight([job], out, cfg, resume=resume, overwrite=overwrite)
        if out is not None:
            _remove_orphans(out, [job])
            if not resume:
                _write_config(cfg, out)
        result = _run_one(
            cfg,
            spec.label,
            job.run_dir,
            target_loss=cfg.compare.target_loss,
            smooth_rounds=cfg.compare.smooth_rounds,
            on_round=on_round,
            resume=resume,
        )
        if out is not None:
            if resume:
                _write_config(cfg, out)
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
    overwrite: bool = False,
    model: object = None,
    data: object = None,
) -> CompareResult:
    """Run every method of ``[compare]`` (for each seed), score them and draw the report.

    Without ``target_loss`` the target is 1.01 x fp32's final training loss
    (averaged over seeds), which needs an fp32 method in the list.
    ``resume``, ``overwrite``, ``model`` and ``data`` are as in :func:`run`.
    """
    cfg = _with_own(load_config(config, overrides), model, data)
    specs = cfg.methods()
    target = cfg.compare.target_loss
    if target is None and not any(s.compression.method == "fp32" for s in specs):
        raise ConfigError(
            "[compare] target_loss is not set and no fp32 method is listed to derive it from; "
            'add { method = "fp32" } to methods or set target_loss'
        )
    out = Path(out_dir) if out_dir is not None else None
    seeds = [cfg.train.seed + i for i in range(cfg.compare.seeds)]
    # fp32 first: its final loss sets the default target of the others.
    ordered = sorted(specs, key=lambda s: s.compression.method != "fp32")
    jobs = []
    for spec in ordered:
        for seed in seeds:
            run_dir = None
            if out is not None:
                run_dir = out / spec.label if len(seeds) == 1 else out / spec.label / f"seed-{seed}"
            run_cfg = cfg.with_compression(spec.compression).with_seed(seed)
            jobs.append(Job(spec.label, run_cfg, run_dir))
    with hold_out_dir(out, "compare"):
        preflight(jobs, out, cfg, resume=resume, overwrite=overwrite)
        if out is not None:
            _remove_orphans(out, jobs)
            if not resume:
                _write_config(cfg, out)
        runs, target = _run_jobs(jobs, specs, cfg, target, len(seeds), on_round, resume)
        result = _score(cfg, specs, runs, target, out)
        if out is not None:
            if resume:
                _write_config(cfg, out)
            _write_summary(out, result.summary)
            if plots:
                from adaquantfl.runner.report import write_report

                result.plots = write_report(out)
    return result


def _run_jobs(
    jobs: Sequence[Job],
    specs: Sequence[MethodSpec],
    cfg: Config,
    target: float | None,
    n_seeds: int,
    on_round: RoundCallback | None,
    resume: bool,
) -> tuple[dict[str, list[RunResult]], float | None]:
    """Every job in order; fp32's runs set the default target of those after them."""
    runs: dict[str, list[RunResult]] = {s.label: [] for s in specs}
    for job in jobs:
        runs[job.label].append(
            _run_one(
                job.config,
                job.label,
                job.run_dir,
                target_loss=target,
                smooth_rounds=cfg.compare.smooth_rounds,
                on_round=on_round,
                resume=resume,
            )
        )
        is_last_seed = len(runs[job.label]) == n_seeds
        if target is None and job.config.compression.method == "fp32" and is_last_seed:
            finals = [final_mean(r.metrics, "train_loss") for r in runs[job.label]]
            present = [f for f in finals if f is not None]
            if present:
                target = DEFAULT_TARGET_FACTOR * sum(present) / len(present)
    return runs, target


def _score(
    cfg: Config,
    specs: Sequence[MethodSpec],
    runs: dict[str, list[RunResult]],
    target: float | None,
    out: Path | None,
) -> CompareResult:
    """Every run re-scored against the final target (fp32's own runs included), and the summary."""
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
    return CompareResult(target_loss=target, summary=summary, runs=runs, out_dir=out)
