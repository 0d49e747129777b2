"""MNIST and Fashion-MNIST from the user's IDX files (plain or gzipped).

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte
big-endian magic ``0x0000TTNN`` (``TT = 0x08`` for unsigned bytes, ``NN`` the
number of dimensions), ``NN`` big-endian uint32 sizes, then the data in C
order. Everything is checked against the header before it is trusted.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from adaquantfl.data.containers import ArraySplit

__all__ = ["IDX_FILES", "IMAGE_MAGIC", "LABEL_MAGIC", "load_idx_split", "read_idx"]

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (n, rows, cols)
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (n,)
IMAGE_SIDE = 28
NUM_CLASSES = 10

#: The standard file names, by split; each may also carry a ``.gz`` suffix.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# torchvision's download layout, accepted besides the files lying in data_dir.
_SUBDIRS: dict[str, Path] = {
    "mnist": Path("MNIST") / "raw",
    "fashion-mnist": Path("FashionMNIST") / "raw",
}

_CHUNK_BYTES = 1 << 20


class _Readable(Protocol):
    """A binary stream: a plain file or a ``gzip.GzipFile``."""

    def read(self, size: int = -1, /) -> bytes: ...


def _read_up_to(stream: _Readable, num_bytes: int) -> bytes:
    """Read at most ``num_bytes``, in chunks.

    Chunks keep memory proportional to the bytes that really exist: a forged
    header that declares 2**32 images cannot make us allocate 3 TB up front.
    """
    chunks: list[bytes] = []
    remaining = num_bytes
    while remaining > 0:
        chunk = stream.read(min(remaining, _CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _parse(stream: _Readable, path: Path, expected_magic: int) -> NDArray[np.uint8]:
    ndim = expected_magic & 0xFF
    what = f"0x{expected_magic:08x} (IDX unsigned bytes, {ndim} dimension{'s' * (ndim > 1)})"
    head = _read_up_to(stream, 4 + 4 * ndim)
    if len(head) < 4:
        raise ValueError(f"{path}: file too short ({len(head)} bytes) for an IDX header")
    magic = int.from_bytes(head[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad magic number 0x{magic:08x}, expected {what}")
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(head)} bytes)")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{path}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if dims[0] == 0:
        raise ValueError(f"{path}: header declares 0 items; expected at least one")
    expected_bytes = int(np.prod(dims, dtype=np.int64))
    body = _read_up_to(stream, expected_bytes)
    if len(body) < expected_bytes:
        raise ValueError(
            f"{path}: truncated: header declares shape {dims} ({expected_bytes} data bytes) "
            f"but only {len(body)} follow"
        )
    if stream.read(1):
        raise ValueError(
            f"{path}: too long: trailing bytes after the {expected_bytes} data bytes "
            f"declared by the header (shape {dims})"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_idx(path: str | Path, *, expected_magic: int) -> NDArray[np.uint8]:
    """Read one unsigned-byte IDX file, gzipped if its name ends in ``.gz``.

    Parameters
    ----------
    path : str or Path
        The file.
    expected_magic : int
        :data:`IMAGE_MAGIC` or :data:`LABEL_MAGIC`. Image files must be 28x28.

    Returns
    -------
    ndarray of uint8
        Shaped as the header says.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not such an IDX file (bad magic, wrong image size,
        truncated, trailing bytes, corrupt gzip); the message names the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return _parse(stream, path, expected_magic)
        with path.open("rb") as stream:
            return _parse(stream, path, expected_magic)
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc


def _locate(data_dir: Path, dataset: str) -> dict[str, Path]:
    """Map each standard file name to an existing file (plain preferred over .gz)."""
    names = [name for pair in IDX_FILES.values() for name in pair]
    candidates = [data_dir, data_dir / _SUBDIRS[dataset]]
    for directory in candidates:
        found: dict[str, Path] = {}
        for name in names:
            for path in (directory / name, directory / f"{name}.gz"):
                if path.is_file():
                    found[name] = path
                    break
        if len(found) == len(names):
            return found
        if found:
            missing = [name for name in names if name not in found]
            raise FileNotFoundError(
                f"{dataset}: {directory} holds only some of the IDX files; missing "
                f"{missing} (each may also end in .gz)"
            )
    raise FileNotFoundError(
        f"{dataset}: no IDX files in {' or '.join(str(c) for c in candidates)}; expected "
        f"{names} (each may also end in .gz)"
    )


def load_idx_split(data_dir: str | Path, *, dataset: str) -> ArraySplit:
    """Load MNIST or Fashion-MNIST from the four standard IDX files.

    Parameters
    ----------
    data_dir : str or Path
        Directory holding the files (or torchvision's ``MNIST/raw`` /
        ``FashionMNIST/raw`` below it).
    dataset : {"mnist", "fashion-mnist"}
        Which data set; both use the same file names and format.

    Returns
    -------
    ArraySplit
        ``x`` of shape ``(n, 1, 28, 28)``, pixels / 255; labels in ``[0, 10)``.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message names the directory and files.
    ValueError
        If a file is malformed, a label is out of range or the image and label
        counts differ; the message names the file.
    """
    if dataset not in _SUBDIRS:
        raise ValueError(f"unknown IDX dataset {dataset!r}; allowed: {list(_SUBDIRS)}")
    files = _locate(Path(data_dir), dataset)
    x_train, y_train = _load_pair(*(files[name] for name in IDX_FILES["train"]))
    x_test, y_test = _load_pair(*(files[name] for name in IDX_FILES["test"]))
    return ArraySplit(x_train, y_train, x_test, y_test)


def _load_pair(image_path: Path, label_path: Path) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Read one split's image and label files and check that they agree."""
    images = read_idx(image_path, expected_magic=IMAGE_MAGIC)
    labels = read_idx(label_path, expected_magic=LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; they must match"
        )
    if int(labels.max()) >= NUM_CLASSES:
        raise ValueError(
            f"{label_path}: label {int(labels.max())} out of range; "
            f"expected labels in [0, {NUM_CLASSES})"
        )
    x = (images.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    return np.ascontiguousarray(x), labels.astype(np.int64)
