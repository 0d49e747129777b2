"""CIFAR-10 from the user's "python version" batches, unpickled safely.

The batches (https://www.cs.toronto.edu/~kriz/cifar.html) are Python 2
pickles of dicts with ``b"data"`` (uint8, 10000 x 3072: 1024 red, 1024 green,
1024 blue values, each a row-major 32x32 plane) and ``b"labels"`` (a list of
ints in [0, 10)). A pickle can call any importable function while it loads,
so these files are read with :class:`NumpyOnlyUnpickler`, which resolves only
the globals that rebuilding NumPy arrays needs.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from adaquantfl.data.containers import ArraySplit

__all__ = [
    "CIFAR_SUBDIR",
    "TEST_BATCH",
    "TRAIN_BATCHES",
    "NumpyOnlyUnpickler",
    "load_cifar10_split",
    "read_cifar_batch",
]

CIFAR_SUBDIR = "cifar-10-batches-py"
TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
NUM_CLASSES = 10
_PIXELS = 3 * 32 * 32


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles written by Python 3 spell bytes as
    # _codecs.encode(str, "latin1"); admitting only that codec keeps the
    # call a plain data conversion.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(
            f"forbidden call _codecs.encode(..., {encoding!r}); only latin1 is allowed"
        )
    return codecs.encode(text, "latin1", errors)


def _numpy_core(submodule: str, name: str) -> Callable[..., Any]:
    # Pickles name numpy.core (NumPy 1) or numpy._core (NumPy 2); resolve to
    # whichever this NumPy has, preferring the one that does not warn.
    for base in ("numpy._core", "numpy.core"):
        try:
            module = importlib.import_module(f"{base}.{submodule}")
        except ImportError:
            continue
        return getattr(module, name)  # type: ignore[no-any-return]
    raise pickle.UnpicklingError(f"this NumPy has no {submodule}.{name}")


_NUMPY_CORE_GLOBALS = {
    ("multiarray", "_reconstruct"),  # ndarray.__reduce__ (protocols 0-4)
    ("multiarray", "scalar"),  # NumPy scalars, e.g. np.int64 labels
    ("numeric", "_frombuffer"),  # ndarray.__reduce_ex__ (protocol 5)
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that admits only what rebuilding NumPy arrays needs.

    Allowed globals: ``numpy.ndarray``, ``numpy.dtype``,
    ``numpy[._]core.multiarray._reconstruct`` and ``.scalar``,
    ``numpy[._]core.numeric._frombuffer``, and ``_codecs.encode`` restricted
    to latin1. Dicts, lists, tuples, str, bytes and numbers need no globals.
    Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError` before it is called.

    Notes
    -----
    This follows the "restricting globals" recipe of the :mod:`pickle`
    documentation. Object arrays can only hold what this same unpickler
    built, so they add no way out.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        for base in ("numpy.core.", "numpy._core."):
            if module.startswith(base) and (module[len(base) :], name) in _NUMPY_CORE_GLOBALS:
                return _numpy_core(module[len(base) :], name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"forbidden global {module}.{name}: a CIFAR-10 batch may only contain NumPy "
            "arrays, lists, dicts, str, bytes and numbers"
        )


def _field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    # The real files decode with bytes keys; a re-pickled copy may use str.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise ValueError(f"{path}: CIFAR-10 batch has no {key!r} entry; keys: {list(batch)[:10]}")


def read_cifar_batch(path: str | Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Read one CIFAR-10 batch file.

    Parameters
    ----------
    path : str or Path
        A ``data_batch_*`` or ``test_batch`` file.

    Returns
    -------
    data : ndarray of uint8, shape (n, 3072)
    labels : ndarray of int64, shape (n,)

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not a valid batch, or references a forbidden global; the
        message names the file.
    """
    path = Path(path)
    with path.open("rb") as stream:
        try:
            batch = NumpyOnlyUnpickler(stream, encoding="bytes").load()
        # A malformed pickle can fail in many ways (EOFError, struct.error,
        # TypeError from a bad reduce, ...); all mean the same to the user.
        except Exception as exc:
            raise ValueError(f"{path}: cannot unpickle CIFAR-10 batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = _field(batch, "data", path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
    ):
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (n, {_PIXELS}), got {got}")
    raw_labels = _field(batch, "labels", path)
    labels = np.asarray(raw_labels) if isinstance(raw_labels, list | np.ndarray) else None
    if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be a list of integers")
    if labels.shape[0] != data.shape[0] or data.shape[0] == 0:
        raise ValueError(
            f"{path}: {data.shape[0]} images but {labels.shape[0]} labels; they must match "
            "and be at least one"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
        raise ValueError(
            f"{path}: labels must be in [0, {NUM_CLASSES}), got min {int(labels.min())}, "
            f"max {int(labels.max())}"
        )
    return data, labels.astype(np.int64)


def _locate(data_dir: Path) -> Path:
    names = [*TRAIN_BATCHES, TEST_BATCH]
    candidates = [data_dir, data_dir / CIFAR_SUBDIR]
    for directory in candidates:
        present = [name for name in names if (directory / name).is_file()]
        if len(present) == len(names):
            return directory
        if present:
            missing = [name for name in names if name not in present]
            raise FileNotFoundError(f"cifar10: {directory} is missing batch files {missing}")
    raise FileNotFoundError(
        f"cifar10: no CIFAR-10 batches in {' or '.join(str(c) for c in candidates)}; "
        f"expected {names}"
    )


def _to_images(data: NDArray[np.uint8]) -> NDArray[np.float32]:
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x)


def load_cifar10_split(data_dir: str | Path) -> ArraySplit:
    """Load CIFAR-10's five training batches and its test batch.

    Parameters
    ----------
    data_dir : str or Path
        The ``cifar-10-batches-py`` directory, or the directory containing it.

    Returns
    -------
    ArraySplit
        ``x`` of shape ``(n, 3, 32, 32)``, pixels / 255; labels in ``[0, 10)``.
    """
    directory = _locate(Path(data_dir))
    train = [read_cifar_batch(directory / name) for name in TRAIN_BATCHES]
    x_test, y_test = read_cifar_batch(directory / TEST_BATCH)
    return ArraySplit(
        _to_images(np.concatenate([d for d, _ in train])),
        np.concatenate([labels for _, labels in train]),
        _to_images(x_test),
        y_test,
    )
