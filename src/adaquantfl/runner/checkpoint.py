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

Resuming from a checkpoint checks it whole before anything is written
(:func:`resume_state`): the envelope, the config (only ``[train] rounds`` may
change), the rows and the server's state, loaded into a fresh simulator.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import struct
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from adaquantfl.fl.record import ROW_KEYS, RoundRecord
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import Config, ConfigError
from adaquantfl.runner.files import fsync_dir, temp_path
from adaquantfl.runner.report import CUMULATIVE_KEYS
from adaquantfl.validation import as_int, is_real

__all__ = [
    "CHECKPOINT_NAME",
    "RESUMABLE_KEYS",
    "CheckpointError",
    "check_checkpoint",
    "config_changes",
    "config_diff",
    "load_checkpoint",
    "resume_state",
    "save_checkpoint",
]


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


# --------------------------------------------------------------------------- resuming

CHECKPOINT_NAME = "checkpoint.pt"
#: The one key that may change when a run is resumed (a run may be extended).
RESUMABLE_KEYS = ("train.rounds",)

_ENVELOPE = {"label": str, "config": dict, "round": int, "server": dict, "rows": list}
_SERVER_KEYS = ("params", "round_idx", "schedule", "downlink", "clients", "uplink_bits_spent")
#: What the server's own loaders raise on a state they cannot take.
_LOAD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError,
                RuntimeError)  # fmt: skip


def _row_types() -> dict[str, tuple[type, bool]]:
    """Every key of a metrics row: (int or float, whether None is allowed)."""
    hints = typing.get_type_hints(RoundRecord)
    out: dict[str, tuple[type, bool]] = {}
    for name in ROW_KEYS:
        hint = hints[name]
        args = (
            typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType)
            else (hint,)
        )
        base = next(a for a in args if a is not type(None))
        out[name] = (base, type(None) in args)
    for key in CUMULATIVE_KEYS:
        out[f"cum_{key}"] = (int, False)
    return out


_ROW_TYPES = _row_types()


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"section.key (old -> new)"`` for every key whose value differs, ignoring ``rounds``."""
    a, b = _flatten(old), _flatten(new)
    missing = "unset"
    return [
        f"{key} ({a.get(key, missing)!r} -> {b.get(key, missing)!r})"
        for key in sorted(set(a) | set(b))
        if key not in RESUMABLE_KEYS and a.get(key, missing) != b.get(key, missing)
    ]


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Why ``new`` cannot resume a run of ``old`` (the keys that differ), or None if it can."""
    changed = config_diff(old, new)
    if not changed:
        return None
    return (
        f"the config differs from the run's in {', '.join(changed)}; only [train] rounds may "
        "change on resume (to start over, drop --resume and pass --overwrite)"
    )


def _plain(value: Any, where: str) -> None:
    """Raise CheckpointError unless ``value`` is TOML-like data (tables, lists, scalars)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where} has a key {key!r} that is not a string")
            _plain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
    elif not isinstance(value, str | int | float | bool):
        raise CheckpointError(f"{where} holds a {type(value).__name__}, not config data")


def _check_envelope(state: Mapping[str, Any], label: str) -> None:
    missing = [k for k in _ENVELOPE if k not in state]
    if missing:
        raise CheckpointError(f"it has no {', '.join(repr(k) for k in missing)}")
    extra = sorted(str(k) for k in state if k not in _ENVELOPE)
    if extra:
        raise CheckpointError(f"it has unexpected keys {extra}")
    for key, kind in _ENVELOPE.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"its {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    if state["label"] != label:
        raise CheckpointError(f"it belongs to method {state['label']!r}, not {label!r}")
    if state["round"] < 0:
        raise CheckpointError(f"its round {state['round']} is negative")
    _plain(state["config"], "its config")


def _check_rows(rows: list[Any], done: int) -> None:
    if len(rows) != done:
        raise CheckpointError(f"it holds {len(rows)} metrics rows for round {done}")
    totals = dict.fromkeys(CUMULATIVE_KEYS, 0)
    for i, row in enumerate(rows):
        where = f"metrics row {i + 1}"
        if not isinstance(row, dict):
            raise CheckpointError(f"its {where} is a {type(row).__name__}, not a table")
        missing = sorted(set(_ROW_TYPES) - set(row))
        extra = sorted(str(k) for k in set(row) - set(_ROW_TYPES))
        if missing or extra:
            raise CheckpointError(f"its {where} lacks {missing} or has unknown keys {extra}")
        for key, (kind, optional) in _ROW_TYPES.items():
            value = row[key]
            if value is None and optional:
                continue
            if kind is int:
                count = as_int(value)
                ok = count is not None and count >= 0
            else:
                ok = is_real(value)
            if not ok:
                raise CheckpointError(
                    f"its {where} has {key} = {value!r}, not "
                    + ("an integer >= 0" if kind is int else "a number")
                )
        if row["round"] != i + 1:
            raise CheckpointError(f"its {where} is numbered round {row['round']}")
        for key in CUMULATIVE_KEYS:
            totals[key] += row[key]
            if row[f"cum_{key}"] != totals[key]:
                raise CheckpointError(
                    f"its {where} has cum_{key} = {row[f'cum_{key}']}, but its rows add up to "
                    f"{totals[key]}"
                )


def _same(a: Any, b: Any) -> bool:
    """Deep equality of state dicts: tensors by dtype, shape and value; lists equal tuples."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and bool(a == b)


def _check_server(server: dict[str, Any], done: int, rows: list[Any], config: Config) -> None:
    missing = [k for k in _SERVER_KEYS if k not in server]
    if missing:
        raise CheckpointError(f"its server state has no {', '.join(repr(k) for k in missing)}")
    extra = sorted(str(k) for k in server if k not in _SERVER_KEYS)
    if extra:
        raise CheckpointError(f"its server state has unexpected keys {extra}")
    if as_int(server["round_idx"]) is None or server["round_idx"] != done:
        raise CheckpointError(
            f"its server is at round {server['round_idx']!r}, but the checkpoint is of round {done}"
        )
    spent = rows[-1]["cum_wire_bits"] if rows else 0
    if as_int(server["uplink_bits_spent"]) is None or server["uplink_bits_spent"] != spent:
        raise CheckpointError(
            f"its server spent {server['uplink_bits_spent']!r} uplink bits, but its rows add "
            f"up to {spent}"
        )
    try:
        sim = build_simulator(config)
    except ValueError as exc:  # the config itself was checked: say so, not that the file is bad
        raise ConfigError(f"cannot rebuild the run to check its checkpoint: {exc}") from None
    numel = sim.model.numel
    params = server["params"]
    if (
        not isinstance(params, torch.Tensor)
        or params.dtype != torch.float32
        or params.layout != torch.strided
        or params.shape != (numel,)
    ):
        what = (
            f"{params.dtype} of shape {tuple(params.shape)}"
            if isinstance(params, torch.Tensor)
            else type(params).__name__
        )
        raise CheckpointError(f"its model parameters are {what}, not float32 of shape ({numel},)")
    clients = server["clients"]
    if not isinstance(clients, dict):
        raise CheckpointError(f"its client states are a {type(clients).__name__}, not a table")
    for cid, client in clients.items():
        if as_int(cid) is None or not 0 <= cid < config.data.num_clients:
            raise CheckpointError(
                f"it holds the state of client {cid!r}, not one of the run's "
                f"{config.data.num_clients} clients"
            )
        residual = client.get("residual") if isinstance(client, dict) else None
        if not isinstance(residual, torch.Tensor) or residual.shape != (numel,):
            raise CheckpointError(
                f"client {cid}'s state is not a residual of the model's {numel} entries"
            )
    state = {k: server[k] for k in _SERVER_KEYS if k != "uplink_bits_spent"}
    try:
        sim.load_state_dict(state)
        again = sim.state_dict()
    except _LOAD_ERRORS as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"its server state does not load: {type(exc).__name__}: {first}"
        ) from None
    for key in state:
        if not _same(again.get(key), state[key]):
            raise CheckpointError(
                f"its server's {key!r} state is not what the server writes (it loads as "
                "something else)"
            )


def check_checkpoint(state: dict[str, Any], config: Config, label: str) -> None:
    """Check a loaded checkpoint against ``config`` (see the module docstring).

    Raises
    ------
    CheckpointError
        If the checkpoint is unusable (a previous one may be tried).
    ConfigError
        If it is intact but of another config, or has run more rounds than ``config``.
    """
    _check_envelope(state, label)
    changes = config_changes(state["config"], config.to_dict())
    if changes is not None:
        raise ConfigError(changes)
    done = state["round"]
    if done > config.train.rounds:
        raise ConfigError(f"it already ran {done} rounds, more than rounds = {config.train.rounds}")
    _check_rows(state["rows"], done)
    _check_server(state["server"], done, state["rows"], config)


def resume_state(config: Config, run_dir: Path, label: str) -> dict[str, Any] | None:
    """The newest usable checkpoint of ``run_dir`` (None if none), checked against ``config``.

    Raises
    ------
    ConfigError
        If no checkpoint file is intact and usable (naming what is wrong with
        each), or the newest was written with another config (naming the
        keys) or has run more than ``[train] rounds``.
    """
    path = run_dir / CHECKPOINT_NAME
    if not (path.exists() or path.with_name(path.name + ".prev").exists()):
        return None
    try:
        state, _ = load_checkpoint(path, lambda s: check_checkpoint(s, config, label))
    except CheckpointError as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    return state


logger = logging.getLogger(__name__)
