"""Everything a run checks before it writes a byte into its results directory.

A run that fails must not destroy results it did not produce. So before
anything is written:

1. ``--out`` must be a directory or nothing yet (not a file, nor below one),
   and no other run may hold it: :func:`hold_out_dir` takes its lock, for the
   run's whole life;

then, under that lock, :func:`preflight` checks

2. every run's engine options, data (files included) and model, and that a
   client's first message fits ``[train] max_message_bytes``;
3. ownership: a directory that holds another run's results is refused unless
   ``overwrite``; with ``resume`` the run it holds must have the same config
   (only ``[train] rounds`` may change), and every checkpoint to resume from
   must be intact, hold what a resume needs and not be past ``rounds``
   (:func:`.resume.resume_state`).
"""

from __future__ import annotations

import contextlib
import logging
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaquantfl.compression.codec import message_bytes
from adaquantfl.compression.container import frame_bytes
from adaquantfl.compression.qsgd_compressor import QSGDCompressor
from adaquantfl.imports import is_import_path
from adaquantfl.runner.build import build_model, load_data
from adaquantfl.runner.checkpoint import CHECKPOINT_NAME, config_changes, config_diff, resume_state
from adaquantfl.runner.config import Config, ConfigError
from adaquantfl.runner.engines import check_engine
from adaquantfl.runner.files import ResultsLock, check_out_dir, results_in

__all__ = ["CHECKPOINT_NAME", "Job", "config_diff", "hold_out_dir", "preflight"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One run of an experiment: a method at a seed, and its directory (None: not written)."""

    label: str
    config: Config
    run_dir: Path | None


@contextlib.contextmanager
def hold_out_dir(out: Path | None, command: str) -> Iterator[None]:
    """Hold ``out``'s :class:`~.files.ResultsLock` (after checking ``--out``) while the block runs.

    The lock is taken before anything else is checked, so that the ownership
    checks of :func:`preflight`, the checkpoints and every write happen with
    no other run in the directory. A directory another run holds is refused
    at once, whatever the flags.
    """
    if out is None:
        yield
        return
    try:
        check_out_dir(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    with ResultsLock(out, command):
        yield


def _first_message_bytes(config: Config, numel: int) -> tuple[int, str]:
    """A lower bound on every client's first message, and how it was found."""
    compressor = config.compression.build_compressor()
    inner = getattr(compressor, "inner", compressor)  # ErrorFeedback sends inner's bytes
    plan = config.compression.build_policy().levels_for(0, list(range(config.clients_per_round)))
    sizes = []
    for levels in {plan.default, *plan.values()}:
        if levels is None:
            sizes.append((message_bytes(numel, None), "a float32 message"))
        elif isinstance(inner, QSGDCompressor) and inner.encoding == "packed":
            size = message_bytes(numel, levels, bucket_size=inner.bucket_size)
            sizes.append((size, f"a packed message at levels {levels}"))
        else:  # data-dependent sizes: header and CRC at least
            sizes.append((frame_bytes((numel, 0, 0, 0), 0), "the header and CRC alone"))
    return min(sizes)


def _check_job(job: Job) -> None:
    config = job.config
    check_engine(config)
    try:
        data = load_data(config)
    except (ValueError, OSError) as exc:
        own = is_import_path(config.data.dataset)  # its own messages name it
        raise ConfigError(
            f"[data] {exc}" if own else f"[data] dataset {config.data.dataset!r}: {exc}"
        ) from None
    try:
        model, _ = build_model(config, data)
    except ValueError as exc:
        raise ConfigError(f"[model] {exc}") from None
    limit = config.train.max_message_bytes
    if limit is not None:
        smallest, what = _first_message_bytes(config, model.numel)
        if limit < smallest:
            raise ConfigError(
                f"[train] max_message_bytes = {limit} is smaller than any first-round message "
                f"of {job.label} ({what} of the model's {model.numel} parameters takes "
                f"{smallest} bytes): every reply would be rejected"
            )


def _stored_config(out: Path) -> dict[str, Any] | None:
    path = out / "config.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot resume {out}: {path} is unreadable ({exc})") from None


def preflight(
    jobs: Sequence[Job],
    out: Path | None,
    written: Config,
    *,
    resume: bool,
    overwrite: bool,
) -> None:
    """Check ``--out``, every job's data, model and limits, and who owns ``out``; write nothing.

    ``written`` is the config the run writes as ``out/config.toml``. Called
    while holding ``out`` (:func:`hold_out_dir`).

    Raises
    ------
    ConfigError
        Naming the problem; nothing in ``out`` has been touched.
    """
    if out is not None:
        try:
            check_out_dir(out)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if out is None and resume:
        raise ConfigError("--resume needs the results directory (--out) of the run to continue")
    for job in jobs:
        _check_job(job)
    if out is None:
        return
    existing = results_in(out)
    if not resume:
        if existing and not overwrite:
            shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise ConfigError(
                f"--out {str(out)!r} already holds a run's results ({shown}); choose another "
                "directory, pass --overwrite to replace them, or --resume to continue that run"
            )
        return
    stored = _stored_config(out)
    if stored is not None:
        changes = config_changes(stored, written.to_dict())
        if changes is not None:
            raise ConfigError(f"cannot resume {out}: {changes}")
    resumable = False
    for job in jobs:  # one at a time: a checkpoint holds a model
        if job.run_dir is not None and resume_state(job.config, job.run_dir, job.label):
            resumable = True
    if existing and stored is None and not resumable:
        raise ConfigError(
            f"cannot resume {out}: it holds results ({', '.join(existing[:4])}) but no "
            "config.toml or checkpoint to resume from; pass --overwrite (without --resume) "
            "to replace them"
        )
    if not existing:
        logger.warning("nothing to resume in %s; starting the run from round 1", out)
