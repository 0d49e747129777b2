"""Writing a results directory safely: atomic files, and who owns a directory.

Every file a run writes (``config.toml``, ``metrics.jsonl``, ``summary.json``,
``model.pt``, the plots) appears whole or not at all: it is written to a
temporary file in the same directory, flushed and fsynced, and renamed over
the old one (:func:`atomic_write`). ``metrics.jsonl`` is streamed to
``metrics.jsonl.partial`` while a run goes on and renamed when it ends
(:class:`StreamedFile`), so a run that fails never truncates the metrics of an
earlier one (issue 12).

:func:`results_in` lists what marks a directory as holding a run's results;
the runner refuses to write into such a directory unless told to overwrite it
or to resume the run it holds.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO

__all__ = [
    "PARTIAL_SUFFIX",
    "StreamedFile",
    "atomic_write",
    "check_out_dir",
    "fsync_dir",
    "results_in",
]

#: Suffix of a file being streamed (``metrics.jsonl.partial``) until its run ends.
PARTIAL_SUFFIX = ".partial"

#: Files that mark a directory, or a run directory in it, as holding results.
_TOP_LEVEL = ("config.toml", "summary.json")
_RUN_FILES = ("metrics.jsonl", "model.pt", "checkpoint.pt", "checkpoint.pt.prev")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform can open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8); a crash leaves the old or the new file."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # Not tempfile.mkstemp: its files are private (0600); this one gets the umask's mode.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


class StreamedFile:
    """A text file written line by line to ``<path>.partial`` and renamed to ``path`` at the end.

    Used as a context manager: on a clean exit the file is fsynced and
    renamed over ``path``; on an exception the partial file is removed and
    ``path`` is left as it was. (A process killed outright leaves
    ``<path>.partial`` behind, with the rows written so far.)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self._file: IO[str] | None = None

    def __enter__(self) -> StreamedFile:
        self._file = self.partial.open("w", encoding="utf-8")
        return self

    def write(self, text: str) -> None:
        if self._file is None:
            raise ValueError(f"{self.partial} is not open")
        self._file.write(text)
        self._file.flush()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        if exc_type is not None:
            f.close()
            self.partial.unlink(missing_ok=True)
            return
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)


def check_out_dir(out: Path) -> None:
    """Raise ValueError if ``out`` cannot be a results directory (a file, or below one)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {str(out)!r} is below {str(parent)!r}, which is a file")
            break


def results_in(out: Path) -> list[str]:
    """The files in ``out`` that belong to a run's results (relative paths, sorted)."""
    if not out.is_dir():
        return []
    found = [name for name in _TOP_LEVEL if (out / name).is_file()]
    for pattern in ("*", "*/seed-*"):
        for run_dir in out.glob(pattern):
            if run_dir.is_dir():
                found += [
                    str((run_dir / name).relative_to(out))
                    for name in _RUN_FILES
                    if (run_dir / name).is_file()
                ]
    return sorted(found)
