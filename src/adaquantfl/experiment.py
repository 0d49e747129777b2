"""Config -> run -> results directory; and the side-by-side comparison of methods.

Results directory (DESIGN §7)::

    DIR/config.toml             the resolved config
    DIR/summary.json            {"target_loss": ..., "methods": {label: {...}}}
    DIR/<label>/metrics.jsonl   one row per round (DIR/<label>/seed-<n>/ when seeds > 1)
    DIR/<label>/model.pt        the final global model (state_dict)
    DIR/*.png                   plots (see adaquantfl.report)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

from adaquantfl.compressor import make_compressor
from adaquantfl.config import Config, ConfigError, MethodSpec, load_config
from adaquantfl.data import FederatedData, load_federated
from adaquantfl.fl.client import LocalTraining
from adaquantfl.fl.server import FedServer
from adaquantfl.metrics import DEFAULT_TARGET_FACTOR, aggregate_seeds, final_mean, summarize_run
from adaquantfl.models import FlatModel, make_model
from adaquantfl.rng import torch_generator
from adaquantfl.schedule import make_schedule
from adaquantfl.sim.simulator import RoundRecord, Simulator

__all__ = [
    "ENGINES",
    "CompareResult",
    "EngineRun",
    "RunResult",
    "build_simulator",
    "compare",
    "load_data",
    "run",
]

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


# --------------------------------------------------------------------------- building


@functools.lru_cache(maxsize=4)
def _cached_data(data_key: str, seed: int) -> FederatedData:
    params = json.loads(data_key)
    return load_federated(seed=seed, **params)


def load_data(config: Config) -> FederatedData:
    """The federated data set of ``config`` (cached per data config and seed)."""
    d = config.data
    key = json.dumps(
        {
            "dataset": d.dataset,
            "num_clients": d.num_clients,
            "partition": d.partition,
            "dirichlet_alpha": d.dirichlet_alpha,
            "shards_per_client": d.shards_per_client,
            "min_client_samples": d.min_client_samples,
            "synthetic_alpha": d.synthetic_alpha,
            "synthetic_beta": d.synthetic_beta,
            "data_dir": d.data_dir,
        },
        sort_keys=True,
    )
    return _cached_data(key, config.train.seed)


def build_model(config: Config, data: FederatedData) -> tuple[FlatModel, torch.Tensor]:
    """The model and its initial flat parameters (stream: seed, "init")."""
    model = make_model(config.model.name, data.input_shape, data.num_classes)
    params = model.initial_parameters(
        config.model.init, generator=torch_generator(config.train.seed, purpose="init")
    )
    return model, params


def build_server(config: Config, params: torch.Tensor) -> FedServer:
    c = config.compression
    schedule = make_schedule(
        c.method, levels=c.levels, min_levels=c.min_levels, max_levels=c.max_levels
    )
    compressor = make_compressor(encoding=c.encoding, bucket_size=c.bucket_size, norm=c.norm)
    return FedServer(params, schedule, compressor)


def build_simulator(config: Config, data: FederatedData | None = None) -> Simulator:
    """A ready-to-run simulator for a single-method config."""
    data = data if data is not None else load_data(config)
    model, params = build_model(config, data)
    server = build_server(config, params)
    t = config.train
    return Simulator(
        model,
        data,
        server,
        server.compressor,
        training=LocalTraining(t.local_steps, t.batch_size, t.lr),
        clients_per_round=config.clients_per_round,
        seed=t.seed,
    )


# --------------------------------------------------------------------------- engines


@dataclass
class EngineRun:
    """What an engine hands back after its last round."""

    params: torch.Tensor
    model: FlatModel


#: An engine runs ``config.train.rounds`` rounds of one method and calls
#: ``on_record`` after each, in round order.
EngineFn = Callable[[Config, Callable[[RoundRecord], None]], EngineRun]


def _sim_engine(config: Config, on_record: Callable[[RoundRecord], None]) -> EngineRun:
    sim = build_simulator(config)
    for _ in range(config.train.rounds):
        on_record(sim.run_round())
    return EngineRun(sim.server.params.clone(), sim.model)


def _flower_engine(config: Config, on_record: Callable[[RoundRecord], None]) -> EngineRun:
    try:
        from adaquantfl.flower.engine import run_flower
    except ImportError as exc:
        raise ConfigError(
            "[train] engine = 'flower' needs the Flower extra: pip install 'adaquantfl[flower]' "
            f"({exc})"
        ) from None
    result: EngineRun = run_flower(config, on_record)
    return result


#: Engines by ``[train] engine`` name.
ENGINES: dict[str, EngineFn] = {"sim": _sim_engine, "flower": _flower_engine}


# --------------------------------------------------------------------------- running


class _RowWriter:
    """Turns records into metrics rows with running totals, and streams them out."""

    def __init__(self, label: str, sink: Any, on_round: RoundCallback | None) -> None:
        self.label = label
        self.sink = sink
        self.on_round = on_round
        self.rows: list[dict[str, Any]] = []
        self._cum = {"wire_bits": 0, "formula_bits": 0, "downlink_bits": 0}

    def __call__(self, record: RoundRecord) -> None:
        row = record.as_row()
        for key in self._cum:
            self._cum[key] += row[key]
            row[f"cum_{key}"] = self._cum[key]
        self.rows.append(row)
        if self.sink is not None:
            self.sink.write(json.dumps(row) + "\n")
            self.sink.flush()
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
) -> RunResult:
    engine = ENGINES[config.train.engine]
    sink = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        sink = (run_dir / "metrics.jsonl").open("w", encoding="utf-8")
    with sink if sink is not None else nullcontext():
        writer = _RowWriter(label, sink, on_round)
        final = engine(config, writer)
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
) -> RunResult:
    """Run the single method of ``[compression]`` and write its results directory.

    ``summary.json`` has the same schema as :func:`compare`'s; its
    ``target_loss`` is ``[compare] target_loss`` (None if unset).
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
    )
    if out is not None:
        _write_summary(
            out, {"target_loss": cfg.compare.target_loss, "methods": {spec.label: result.summary}}
        )
    return result


def compare(
    config: ConfigLike,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    on_round: RoundCallback | None = None,
    plots: bool = True,
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
        methods[spec.label]["encoding"] = spec.compression.encoding
    summary = {
        "target_loss": target,
        "smooth_rounds": cfg.compare.smooth_rounds,
        "methods": methods,
    }
    result = CompareResult(target_loss=target, summary=summary, runs=runs, out_dir=out)
    if out is not None:
        _write_summary(out, summary)
        if plots:
            from adaquantfl.report import write_report

            result.plots = write_report(out)
    return result
