"""QSGD stochastic quantization: ``Q_s(v)`` and its inverse, as pure tensor kernels.

For a vector ``v`` with ``d`` entries and ``s`` levels (Alistarh et al., "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
2017), entry ``i`` of a bucket with norm ``||v||`` is sent as

    Q_s(v)_i = ||v|| * sign(v_i) * xi_i / s,

where, with ``r_i = s |v_i| / ||v||`` and ``l = floor(r_i)``, ``xi_i`` is
``l + 1`` with probability ``r_i - l`` and ``l`` otherwise. Then
``E[Q_s(v)] = v`` and ``Var[Q_s(v)] <= min(d/s^2, sqrt(d)/s) ||v||^2``.

Notes
-----
The rounding noise comes from a counter-based stream: a 63-bit key is drawn
from the caller's ``torch.Generator``; element ``i`` then uses the SplitMix64
output for counter ``i``. Each element's noise therefore depends only on the
key and the element's index. A chunked torch kernel, a compiled kernel and the
slow reference in ``tests/`` all produce the same bytes, and no kernel needs to
touch global random state.

Every float operation is a single IEEE-754 float32 operation in a fixed order
(``r = (|v| / norm) * s``; dequantised ``y = xi * (norm / s)``), so any
implementation that follows the same steps reproduces the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "MAX_LEVELS",
    "NORMS",
    "Quantized",
    "bits_per_level_index",
    "bucket_norms",
    "dequantize",
    "draw_key",
    "num_buckets",
    "quantization_variance",
    "quantize",
    "rounding_uniforms",
]

#: Largest number of levels. Level indices up to 2**24 are exact in float32,
#: and a packed entry (sign + index) then fits in 25 bits.
MAX_LEVELS = 2**24 - 1

#: Norms the quantizer can scale by: the L2 norm of QSGD, or the max-norm
#: (L-infinity), which gives lower variance at the same levels.
NORMS: tuple[str, ...] = ("l2", "max")

NormName = Literal["l2", "max"]

# SplitMix64 (Steele, Lea, Flood 2014) constants, as signed int64 so that torch
# can hold them; torch's int64 multiply wraps modulo 2**64 like uint64.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
_UNIFORM_BITS = 24
_CHUNK = 1 << 20  # elements per chunk: bounds the int64 temporaries at 8 MiB each


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized vector: what a client sends, before it is encoded to bytes.

    Attributes
    ----------
    levels : int
        Number of quantization levels ``s``.
    numel : int
        Number of entries ``d`` of the original (flattened) vector.
    bucket_size : int or None
        Entries per bucket (one norm per bucket); None is one bucket of ``d``.
    norm : {"l2", "max"}
        Which norm the buckets were scaled by.
    norms : torch.Tensor
        float32, shape ``(num_buckets,)``.
    magnitudes : torch.Tensor
        int32 level indices ``xi`` in ``[0, levels]``, shape ``(numel,)``.
    signs : torch.Tensor
        bool, True where the entry is negative, shape ``(numel,)``. Always
        False where the magnitude is 0, so that every vector has exactly one
        representation.
    """

    levels: int
    numel: int
    bucket_size: int | None
    norm: NormName
    norms: torch.Tensor
    magnitudes: torch.Tensor
    signs: torch.Tensor

    def __post_init__(self) -> None:
        _check_levels(self.levels)
        _check_bucket_size(self.bucket_size)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        nb = num_buckets(self.numel, self.bucket_size)
        if self.norms.dtype != torch.float32 or tuple(self.norms.shape) != (nb,):
            raise ValueError(
                f"norms must be float32 of shape ({nb},), got {self.norms.dtype} "
                f"{tuple(self.norms.shape)}"
            )
        if self.magnitudes.dtype != torch.int32 or tuple(self.magnitudes.shape) != (self.numel,):
            raise ValueError(
                f"magnitudes must be int32 of shape ({self.numel},), got "
                f"{self.magnitudes.dtype} {tuple(self.magnitudes.shape)}"
            )
        if self.signs.dtype != torch.bool or tuple(self.signs.shape) != (self.numel,):
            raise ValueError(
                f"signs must be bool of shape ({self.numel},), got {self.signs.dtype} "
                f"{tuple(self.signs.shape)}"
            )

    @property
    def num_buckets(self) -> int:
        return num_buckets(self.numel, self.bucket_size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Quantized):
            return NotImplemented
        return (
            self.levels == other.levels
            and self.numel == other.numel
            and self.bucket_size == other.bucket_size
            and self.norm == other.norm
            and torch.equal(self.norms, other.norms)
            and torch.equal(self.magnitudes, other.magnitudes)
            and torch.equal(self.signs, other.signs)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside


def bits_per_level_index(levels: int) -> int:
    """``ceil(log2(s + 1))``: bits for a level index in ``[0, s]``."""
    _check_levels(levels)
    return int(levels).bit_length()


def num_buckets(numel: int, bucket_size: int | None) -> int:
    """Number of buckets (norms) for ``numel`` entries; a zero-length vector has one."""
    if bucket_size is None or numel == 0:
        return 1
    return -(-numel // bucket_size)


def draw_key(generator: torch.Generator) -> int:
    """Draw the 63-bit key of one message's rounding stream from ``generator``."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))


def rounding_uniforms(key: int, start: int, count: int) -> torch.Tensor:
    """The rounding stream: 24-bit integers for counters ``start .. start+count-1``.

    Counter ``i`` maps to the top 24 bits of SplitMix64's output for state
    ``key + (i + 1) * golden`` (mod 2**64). Returned as int64 in ``[0, 2**24)``.
    """
    counters = torch.arange(start + 1, start + count + 1, dtype=torch.int64)
    z = counters * _GOLDEN + key
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 64 - _UNIFORM_BITS)


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits.
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def bucket_norms(v: torch.Tensor, bucket_size: int | None, norm: NormName = "l2") -> torch.Tensor:
    """Per-bucket norms of a flat float32 vector, as float32 of shape ``(num_buckets,)``.

    The L2 norm is accumulated in float64 and rounded once to float32, so that
    it does not overflow for large finite entries and does not depend on the
    reduction order beyond float64 rounding.
    """
    d = v.numel()
    nb = num_buckets(d, bucket_size)
    if d == 0:
        return torch.zeros(1, dtype=torch.float32)
    b = d if bucket_size is None else bucket_size
    padded = v
    if nb * b != d:
        padded = torch.zeros(nb * b, dtype=v.dtype)
        padded[:d] = v
    rows = padded.view(nb, b)
    if norm == "l2":
        out = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).to(torch.float32)
    else:
        out = rows.abs().amax(dim=1)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            "the vector's norm overflows float32 (entries near 3.4e38); scale the update down"
        )
    result: torch.Tensor = out.contiguous()
    return result


def quantize(
    x: torch.Tensor,
    levels: int,
    *,
    generator: torch.Generator,
    bucket_size: int | None = None,
    norm: NormName = "l2",
) -> Quantized:
    """Stochastically quantize ``x`` to ``levels`` levels per sign (QSGD).

    Steps, per bucket of ``bucket_size`` entries (the whole vector by default):

    1. ``n = ||v||`` (L2, or max-norm), rounded to float32.
    2. ``r_i = min((|v_i| / n) * s, s)``, in float32; ``r_i = 0`` if ``n = 0``.
    3. ``xi_i = floor(r_i) + [u_i < r_i - floor(r_i)]`` with ``u_i`` uniform on
       the 24-bit grid of ``[0, 1)`` from the counter-based stream keyed by one
       draw from ``generator``.

    Parameters
    ----------
    x : torch.Tensor
        Floating tensor of any shape; it is flattened (row-major) and cast to float32.
    levels : int
        Number of levels ``s >= 1``.
    generator : torch.Generator
        The explicit random source; exactly one 63-bit draw is taken from it.
    bucket_size : int, optional
        Entries per bucket; None (default) quantizes the vector as one bucket.
    norm : {"l2", "max"}
        Norm each bucket is scaled by. "l2" is QSGD as published.

    Returns
    -------
    Quantized

    Raises
    ------
    ValueError
        On bad arguments or on non-finite entries in ``x``.
    """
    _check_levels(levels)
    _check_bucket_size(bucket_size)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    v = _flat_float32(x)
    key = draw_key(generator)
    norms = bucket_norms(v, bucket_size, norm)
    magnitudes, signs = _quantize_torch(v, norms, levels, bucket_size, key)
    return Quantized(
        levels=int(levels),
        numel=v.numel(),
        bucket_size=bucket_size,
        norm=norm,
        norms=norms,
        magnitudes=magnitudes,
        signs=signs,
    )


def dequantize(q: Quantized, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct ``norm * sign * xi / s`` as a flat float32 tensor.

    Computed as ``xi * (norm / s)`` with the per-bucket step ``norm / s``
    rounded to float32 first.

    Parameters
    ----------
    q : Quantized
    out : torch.Tensor, optional
        A contiguous float32 tensor of ``q.numel`` entries to write into.
    """
    d = q.numel
    if out is None:
        out = torch.empty(d, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.numel() != d or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor with {d} entries, got "
            f"{out.dtype} with {out.numel()} entries"
        )
    flat = out.view(-1)
    if d == 0:
        return flat
    steps = _bucket_steps(q.norms, q.levels)
    b = d if q.bucket_size is None else q.bucket_size
    for start in range(0, d, _CHUNK):
        stop = min(start + _CHUNK, d)
        step = _expand_buckets(steps, b, start, stop)
        vals = q.magnitudes[start:stop].to(torch.float32) * step
        flat[start:stop] = torch.where(q.signs[start:stop], -vals, vals)
    return flat


def quantization_variance(
    x: torch.Tensor, levels: int, *, bucket_size: int | None = None, norm: NormName = "l2"
) -> float:
    """Exact variance ``E||Q_s(x) - x||^2`` of the quantizer for this ``x``.

    Each entry is Bernoulli between two neighbouring levels a step ``n / s``
    apart, so its variance is ``(n/s)^2 p (1 - p)`` with ``p = r - floor(r)``.
    Computed in float64 from the same float32 ``r`` the quantizer uses.
    """
    _check_levels(levels)
    v = _flat_float32(x)
    d = v.numel()
    if d == 0:
        return 0.0
    norms = bucket_norms(v, bucket_size, norm)
    b = d if bucket_size is None else bucket_size
    r = _ratios(v, norms, levels, b, 0, d)
    p = (r - torch.floor(r)).to(torch.float64)
    step = _expand_buckets(norms.to(torch.float64) / levels, b, 0, d)
    return float((step * step * p * (1.0 - p)).sum())


def _quantize_torch(
    v: torch.Tensor, norms: torch.Tensor, levels: int, bucket_size: int | None, key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    d = v.numel()
    magnitudes = torch.empty(d, dtype=torch.int32)
    signs = torch.empty(d, dtype=torch.bool)
    b = d if bucket_size is None else bucket_size
    scale = 2.0**-_UNIFORM_BITS
    for start in range(0, d, _CHUNK):
        stop = min(start + _CHUNK, d)
        r = _ratios(v, norms, levels, b, start, stop)
        floor = torch.floor(r)
        u = rounding_uniforms(key, start, stop - start).to(torch.float32) * scale
        xi = floor.to(torch.int32) + (u < (r - floor)).to(torch.int32)
        magnitudes[start:stop] = xi
        signs[start:stop] = (v[start:stop] < 0) & (xi > 0)
    return magnitudes, signs


def _ratios(
    v: torch.Tensor, norms: torch.Tensor, levels: int, b: int, start: int, stop: int
) -> torch.Tensor:
    """``min((|v_i| / n) * s, s)`` in float32 for entries ``start:stop``; 0 where ``n = 0``."""
    n = _expand_buckets(norms, b, start, stop)
    s = torch.tensor(levels, dtype=torch.float32)
    a = v[start:stop].abs()
    r = torch.minimum((a / torch.where(n > 0, n, 1.0)) * s, s)
    return torch.where(n > 0, r, 0.0)


def _bucket_steps(norms: torch.Tensor, levels: int) -> torch.Tensor:
    # One IEEE float32 division per bucket, done in NumPy so that it is a true
    # division (a tensor-by-scalar division may be computed as a reciprocal
    # multiply, which would change the last bit).
    steps = norms.numpy() / np.float32(levels)
    return torch.from_numpy(np.ascontiguousarray(steps, dtype=np.float32))


def _expand_buckets(per_bucket: torch.Tensor, b: int, start: int, stop: int) -> torch.Tensor:
    """Per-entry values for entries ``start:stop`` from per-bucket values."""
    if per_bucket.numel() == 1:
        return per_bucket.expand(stop - start)
    idx = torch.arange(start, stop, dtype=torch.int64) // b
    return per_bucket[idx]


def _flat_float32(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    v = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        raise ValueError(f"cannot quantize a vector with {bad} non-finite entries (NaN or inf)")
    return v


def _check_levels(levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int | np.integer):
        raise ValueError(f"levels must be an integer, got {levels!r}")
    if not 1 <= int(levels) <= MAX_LEVELS:
        raise ValueError(f"levels must be in [1, {MAX_LEVELS}], got {levels}")


def _check_bucket_size(bucket_size: int | None) -> None:
    if bucket_size is None:
        return
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int | np.integer):
        raise ValueError(f"bucket_size must be a positive integer or None, got {bucket_size!r}")
    if not 1 <= int(bucket_size) <= 2**32 - 1:
        raise ValueError(f"bucket_size must be in [1, 2**32 - 1] or None, got {bucket_size}")
