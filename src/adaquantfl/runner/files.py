"""Writing a results directory safely: atomic files, one writer, and who owns a directory.

Every file a run writes (``config.toml``, ``metrics.jsonl``, ``summary.json``,
``model.pt``, the plots, checkpoints) appears whole or not at all: it is
written to a temporary file in the same directory, flushed and fsynced, and
renamed over the old one (:func:`atomic_write`). ``metrics.jsonl`` is streamed
to ``metrics.jsonl.<pid>.<token>.partial`` while a run goes on and renamed
when it ends (:class:`StreamedFile`), so a run that fails never truncates the
metrics of an earlier one. Every temporary name holds the writer's pid and a
random token: no two processes ever write the same file.

A run holds :class:`ResultsLock` on its directory for its whole life, so a
directory has one writer at a time; temporary files left by a writer that has
gone (killed outright) are removed by the next holder (:func:`remove_orphans`).

:func:`results_in` lists what marks a directory as holding a run's results;
the runner refuses to write into such a directory unless told to overwrite it
or to resume the run it holds.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import secrets
import socket
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - platforms without flock (Windows)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "PARTIAL_SUFFIX",
    "DirectoryInUseError",
    "ResultsLock",
    "StreamedFile",
    "atomic_write",
    "check_out_dir",
    "fsync_dir",
    "remove_orphans",
    "results_in",
    "temp_path",
]

logger = logging.getLogger(__name__)

#: Suffix of a file being streamed (``metrics.jsonl.<pid>.<token>.partial``) until its run ends.
PARTIAL_SUFFIX = ".partial"
#: The lock file a run holds in its results directory (never counted as results).
LOCK_NAME = ".adaquantfl.lock"
#: Temporary files of :func:`atomic_write` / the checkpoint, and streamed partial files:
#: ``.<name>.<pid>.<token>.tmp`` and ``<name>.<pid>.<token>.partial``.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")
_PARTIAL = re.compile(r"^(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.partial$")

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


def _token() -> str:
    return f"{os.getpid()}.{secrets.token_hex(4)}"


def temp_path(target: Path) -> Path:
    """A temporary name beside ``target`` that no other process or call uses."""
    return target.with_name(f".{target.name}.{_token()}.tmp")


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8); a crash leaves the old or the new file."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = temp_path(target)
    # Not tempfile.mkstemp: its files are private (0600); this one gets the umask's mode.
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
    """A text file written line by line to a partial file and renamed to ``path`` at the end.

    The partial file is ``<path>.<pid>.<token>.partial``: its own, whatever
    else writes beside it. Used as a context manager: on a clean exit the file
    is fsynced and renamed over ``path``; on an exception the partial file is
    removed and ``path`` is left as it was. (A process killed outright leaves
    its partial file behind, with the rows written so far, until the next run
    in the directory removes it: :func:`remove_orphans`.)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(f"{self.path.name}.{_token()}{PARTIAL_SUFFIX}")
        self._file: IO[str] | None = None

    def __enter__(self) -> StreamedFile:
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
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


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or an id we cannot ask about: assume alive
    return True


def remove_orphans(directory: Path) -> list[Path]:
    """Remove the temporary and partial files in ``directory`` whose writer has gone.

    Call it only while holding the directory's :class:`ResultsLock`. A file
    counts as orphaned when its name is one this module gives (it holds the
    writer's pid) and no process with that pid exists: its writer was killed
    before it could clean up. Files of a live pid are left alone (that pid may
    be another program's now, but nothing proves the file is not its own).
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMP.match(path.name) or _PARTIAL.match(path.name)
        if match is None or not path.is_file() or _alive(int(match["pid"])):
            continue
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("cannot remove %s, left by a run that has gone: %s", path, exc)
            continue
        logger.info("removed %s, left by a run that has gone", path)
        removed.append(path)
    return removed


class DirectoryInUseError(ValueError):
    """Another process holds the results directory's lock; the text names it and the holder."""


class ResultsLock:
    """An exclusive lock on a results directory, held for the whole life of a run.

    Used as a context manager. It creates the directory if need be, opens
    ``<out>/.adaquantfl.lock`` and takes an exclusive ``flock`` on it without
    waiting; if another process holds it, :class:`DirectoryInUseError` names
    the directory and the holder (pid, host, start time and command, which the
    holder writes into the file). On exit the lock file is removed and, if the
    run wrote nothing, so are the directories it created.

    Notes
    -----
    ``flock`` rather than the lock file's mere existence: the kernel releases
    it when its holder exits, however it exits (``kill -9`` included), so a
    lock left by a crashed run never blocks the next one. Because the holder
    removes the file when it is done, a process that opened the file just
    before may lock a file that is no longer in the directory; it checks,
    after locking, that the path still names the file it holds, and starts
    over if not. The lock is advisory: it binds adaquantfl runs, not other
    programs. Where ``flock`` does not exist, runs go unlocked (with a warning).
    """

    def __init__(self, out: str | os.PathLike[str], command: str = "run") -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> ResultsLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.release()

    def _make_dirs(self) -> None:
        missing = [d for d in (self.out, *self.out.parents) if not d.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self._created = self._created or missing  # deepest first

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DirectoryInUseError` at once."""
        if self._fd is not None:
            raise ValueError(f"{self.path} is already held by this object")
        if fcntl is None:  # pragma: no cover - platforms without flock
            logger.warning("no file locking on this platform: %s is not locked", self.out)
            self._make_dirs()
            return
        for _ in range(100):  # each retry means a holder released it meanwhile
            self._make_dirs()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the directory went away with its last holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DirectoryInUseError(
                    f"--out {str(self.out)!r} is in use by another run ({holder}); one run at "
                    "a time may write a results directory: wait for it to end, or choose "
                    "another directory"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                self._fd = fd
                self._write_holder(fd)
                return
            os.close(fd)  # we locked a file its holder had just removed: take the new one
        raise DirectoryInUseError(f"--out {str(self.out)!r}: cannot take its lock {self.path}")

    def _write_holder(self, fd: int) -> None:
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        text = (
            f"pid {os.getpid()} on {socket.gethostname()}, started {started}, "
            f"adaquantfl {self.command}\n"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8", "replace"), 0)

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the directories it made, if empty)."""
        fd, self._fd = self._fd, None
        if fd is None:
            if fcntl is None:  # pragma: no cover
                self._remove_created()
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()  # while locked: see the class notes
        except OSError as exc:
            logger.warning("cannot remove the lock file %s: %s", self.path, exc)
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for directory in self._created:  # deepest first; stops at one the run wrote into
            try:
                directory.rmdir()
            except OSError:
                break
        self._created = []


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "its holder has not written its pid yet"


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
