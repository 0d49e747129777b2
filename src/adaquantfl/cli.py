"""The ``adaquantfl`` command line: run, compare, report."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help text: config sections like [train] must not be read as markup.
    rich_markup_mode="markdown",
    help="Communication-efficient federated learning with adaptive quantization (AdaQuantFL).",
)
# Wide enough for the summary table when output is a file or a CI log (rich
# defaults to 80 columns there and would truncate the method names).
console = Console(width=None if sys.stdout.isatty() else 160)

# Paths are taken as plain strings: click's Path type stats its value while
# parsing and lets a ValueError (a NUL byte) escape as a traceback.
ConfigArg = Annotated[str, typer.Argument(help="Experiment config (TOML).", show_default=False)]
OutOpt = Annotated[
    str | None,
    typer.Option("--out", "-o", help="Results directory [default: results/CONFIG-NAME]."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set train.rounds=50 (repeatable)."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue from the last good checkpoint in --out ([train] checkpoint_every).",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the results of another run that --out already holds."
    ),
]


def _own_code_importable(config: str) -> None:
    """Let a config name modules in the working directory or next to the config file.

    A config's ``[model] name``, ``[data] dataset`` and ``[compression] plugins``
    may name a user's own modules (``"netlib:make_net"``); as with ``python -m``,
    those in the current directory import, and so do those beside the config.
    """
    for directory in (Path.cwd(), Path(config).resolve().parent):
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))


def _default_out(config: str, out: str | None) -> Path:
    return Path(out) if out is not None else Path("results") / Path(config).stem


@contextmanager
def _progress(total_rounds: int, quiet: bool) -> Iterator[Any]:
    """A rich progress bar fed by the runner's per-round callback."""
    if quiet:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    tasks: dict[str, TaskID] = {}

    def on_round(label: str, row: Mapping[str, Any]) -> None:
        if label not in tasks or row["round"] == 1:  # a new run (method or seed) starts
            tasks[label] = progress.add_task(label, total=total_rounds, info="")
        loss = row.get("train_loss")
        levels = row.get("levels")
        info = (
            f"s={'fp32' if levels is None else levels:<5} "
            f"loss={'-' if loss is None else f'{loss:.4f}'} "
            f"uplink={row['cum_wire_bits'] / 1e6:8.3f} Mbit"
        )
        progress.update(tasks[label], completed=row["round"], info=info)

    with progress:
        yield on_round


def _error(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def _fail(exc: Exception) -> None:
    """An ``error:`` line naming the problem (no traceback), exit code 2."""
    message = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
        message = f"{message}: {exc.filename}"
    if isinstance(exc, MemoryError):
        message = f"out of memory: {message or 'an allocation failed'}"
    _error(message)
    raise typer.Exit(code=2)


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _check_accepted(label: str, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Say so, as an error, if a run never accepted a client's reply; True if it did."""
    if rows and all(r["participants"] == 0 for r in rows):
        _error(
            f"{label}: no client reply was accepted in any of its {len(rows)} rounds (each "
            "rejection is logged with its reason, e.g. a [train] max_message_bytes below the "
            "message size); the model never changed"
        )
        return False
    return True


@app.command()
def run(
    config: ConfigArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the one method in [compression] and write its results directory."""
    from adaquantfl.runner.config import load_config
    from adaquantfl.runner.experiment import run as run_experiment

    out_dir = _default_out(config, out)
    try:
        _own_code_importable(config)
        cfg = load_config(config, set_ or [])
        with _progress(cfg.train.rounds, quiet) as on_round:
            result = run_experiment(
                cfg, out_dir, on_round=on_round, resume=resume, overwrite=overwrite
            )
    except (ValueError, OSError, MemoryError) as exc:
        _fail(exc)
        return
    s = result.summary
    console.print(
        f"[bold]{result.label}[/]: final train loss {_number(s['final_train_loss'], '.4f')}, "
        f"test accuracy {_number(s['final_test_accuracy'], '.3f')}, "
        f"uplink {s['total_wire_bits'] / 1e6:.3f} Mbit"
    )
    console.print(f"results in {out_dir}/")
    if not _check_accepted(result.label, result.metrics):
        raise typer.Exit(code=1)


@app.command()
def compare(
    config: ConfigArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run every method in [compare], then print the table and draw the plots."""
    from adaquantfl.runner.config import load_config
    from adaquantfl.runner.experiment import compare as compare_experiment
    from adaquantfl.runner.report import rich_table

    out_dir = _default_out(config, out)
    try:
        _own_code_importable(config)
        cfg = load_config(config, set_ or [])
        with _progress(cfg.train.rounds, quiet) as on_round:
            result = compare_experiment(
                cfg, out_dir, on_round=on_round, resume=resume, overwrite=overwrite
            )
    except (ValueError, OSError, MemoryError) as exc:
        _fail(exc)
        return
    console.print(rich_table(result.summary))
    console.print(f"results in {out_dir}/")
    for path in result.plots:
        console.print(f"  {path}")
    accepted = [_check_accepted(r.label, r.metrics) for runs in result.runs.values() for r in runs]
    if not all(accepted):
        raise typer.Exit(code=1)


@app.command()
def report(results: Annotated[str, typer.Argument(help="A results directory.")]) -> None:
    """Re-draw the plots and table of a results directory."""
    from adaquantfl.runner.preflight import hold_out_dir
    from adaquantfl.runner.report import load_results, rich_table, write_report

    try:
        with hold_out_dir(Path(results), "report"):  # it writes the plots: not while a run does
            paths = write_report(results)
            summary, _ = load_results(results)
    except (ValueError, OSError, MemoryError) as exc:
        _fail(exc)
        return
    console.print(rich_table(summary))
    for path in paths:
        console.print(f"  {path}")


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
