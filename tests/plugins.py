"""A compressor and a level policy that live only in the test suite.

They show that adding either is one module that registers itself: nothing in
the package knows them. A config names this module in ``[compression]
plugins`` (the Flower engine imports it on every client too).

- ``test-rounding``: deterministic round-to-nearest onto ``s`` levels of the
  max-norm, a biased compressor with a wire format of its own;
- ``test-per-client``: a policy that gives every client its own levels.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaquantfl.compression import BaseCompressor, register_compressor
from adaquantfl.compression.codec import CodecError
from adaquantfl.policy import LevelPlan, RoundObservation, register_policy

MAGIC = b"TR"
_HEAD = struct.Struct("<2sIIf")  # magic, d, s, scale


@dataclass(frozen=True)
class RoundingOptions:
    """``clip``: values are clipped to this many times the scale (1.0: none beyond max)."""

    clip: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.clip <= 1:
            raise ValueError(f"clip must be in (0, 1], got {self.clip!r}")


@register_compressor
class RoundingCompressor(BaseCompressor):
    """``round(v / m * s)`` as int32 with ``m = clip * max|v|``: biased, deterministic."""

    name = "test-rounding"
    options_type = RoundingOptions
    takes_levels = True

    def _compress(self, update: torch.Tensor, levels: int, *, generator: torch.Generator) -> bytes:
        v = update.detach().reshape(-1).to(torch.float64)
        scale = float(v.abs().max()) * self.options.clip if v.numel() else 0.0
        q = torch.zeros_like(v) if scale == 0 else torch.round(v / scale * levels)
        q = q.clamp(-levels, levels).to(torch.int32)
        return _HEAD.pack(MAGIC, v.numel(), levels, scale) + q.numpy().astype("<i4").tobytes()

    def _decompress(
        self, payload: bytes, *, numel: int, levels: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        if len(payload) != _HEAD.size + 4 * numel:
            raise CodecError(f"test-rounding message of {len(payload)} bytes for {numel} entries")
        magic, d, s, scale = _HEAD.unpack_from(payload)
        if magic != MAGIC or d != numel or s != levels or not np.isfinite(scale) or scale < 0:
            raise CodecError("not a test-rounding message for this round")
        q = np.frombuffer(payload, dtype="<i4", offset=_HEAD.size).astype(np.float32)
        if np.abs(q).max(initial=0) > levels:
            raise CodecError("a test-rounding level is out of range")
        dense = torch.from_numpy(q * np.float32(scale / levels))
        if out is None:
            return dense
        out.copy_(dense)
        return out

    def _max_compressed_bytes(self, numel: int) -> int:
        return _HEAD.size + 4 * numel


class PerClientLevels:
    """Client ``c`` uses ``1 + (c + round) % 4`` levels; others the default 2."""

    def __init__(self) -> None:
        self.observed: list[float] = []

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        return LevelPlan(2, {c: 1 + (c + round_idx) % 4 for c in client_ids})

    def observe(self, observation: RoundObservation) -> None:
        self.observed.append(observation.train_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"observed": list(self.observed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.observed = [float(x) for x in state["observed"]]


@register_policy("test-per-client")
def _per_client(*, options: Mapping[str, Any] | None = None, **_: Any) -> PerClientLevels:
    if options:
        raise ValueError(f"test-per-client takes no options, got {sorted(options)}")
    return PerClientLevels()
