"""Crash-safe checkpoints: atomic writes, integrity checks, fallback to the previous one.

A checkpoint file is::

    b"AQCK" | format version (u8) | payload length (u64 LE) | SHA-256 of payload | payload

where the payload is ``torch.save`` of a dict of tensors and plain data. It is
written to a temporary file of its own in the same directory, flushed and
fsynced, and renamed over the old one (whose previous version is kept as
``<name>.prev``); the directory is fsynced after the renames. A crash at any
point leaves either the new or the previous checkpoint intact, a failed write
(a full disk) removes its temporary file, and a torn or corrupt file is
detected by its length and digest. A file whose digest is right may still hold
the wrong things: :func:`load_checkpoint` takes the caller's check of the
contents and falls back to the previous file when the newest fails it.

Notes
-----
No random-generator state needs saving: every random draw of a run comes from
a stream derived from (seed, round, client, purpose) (:mod:`adaquantfl.rng`),
so the round counter and the seed in the config determine all of them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaquantfl.runner.files import fsync_dir, temp_path

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

_MAGIC = b"AQCK"
_VERSION = 1
_HEADER = struct.Struct("<4sBQ32s")


class CheckpointError(ValueError):
    """A checkpoint is missing, torn or corrupt; the text names the file and the problem."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomically write ``state`` to ``path``, keeping the previous file as ``path.prev``."""
    target = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = _HEADER.pack(_MAGIC, _VERSION, len(payload), hashlib.sha256(payload).digest())
    tmp = temp_path(target)
    try:
        with open(tmp, "xb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            os.replace(target, target.with_name(target.name + ".prev"))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    if len(data) < _HEADER.size:
        raise CheckpointError(
            f"checkpoint {path} is torn: {len(data)} bytes, shorter than its header"
        )
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CheckpointError(f"{path} is not an adaquantfl checkpoint (magic {magic!r})")
    if version != _VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; expected {_VERSION}"
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path} is torn: {len(payload)} of {length} payload bytes"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 mismatch")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # the digest matched, so this is a format problem
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state


def load_checkpoint(
    path: str | os.PathLike[str], check: Callable[[dict[str, Any]], None] | None = None
) -> tuple[dict[str, Any], Path]:
    """Load the newest intact checkpoint: ``path``, else ``path.prev``.

    ``check`` (optional) checks the contents of a file whose digest is right:
    a :class:`CheckpointError` it raises makes the file unusable, like a torn
    one (the previous file is tried); any other exception propagates.

    Returns
    -------
    (state, the file it came from)

    Raises
    ------
    CheckpointError
        If neither file holds an intact checkpoint; the message lists both problems.
    """
    target = Path(path)
    problems = []
    for candidate in (target, target.with_name(target.name + ".prev")):
        try:
            state = _read(candidate)
            if check is not None:
                try:
                    check(state)
                except CheckpointError as exc:
                    raise CheckpointError(f"checkpoint {candidate} is unusable: {exc}") from None
        except CheckpointError as exc:
            problems.append(str(exc))
            if candidate == target and candidate.exists():
                logger.warning("%s; trying the previous checkpoint", exc)
            continue
        return state, candidate
    raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
