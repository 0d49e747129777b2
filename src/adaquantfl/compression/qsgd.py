"""QSGD stochastic quantization: ``Q_s(v)`` and its inverse, as pure tensor kernels.

For a vector ``v`` with ``d`` entries and ``s`` levels (Alistarh et al., "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
2017), entry ``i`` of a bucket with norm ``||v||`` is sent as

    Q_s(v)_i = ||v|| * sign(v_i) * xi_i / s,

where, with ``r_i = s |v_i| / ||v||`` and ``l = floor(r_i)``, ``xi_i`` is
``l + 1`` with probability ``r_i - l`` and ``l`` otherwise. Then ``E[Q_s(v)] = v``, up
to a bias below ``2**-24`` of a step (Notes), and ``Var[Q_s(v)] <= min(d/s^2, sqrt(d)/s) ||v||^2``.

Notes
-----
The rounding noise comes from a counter-based stream: a 63-bit key is drawn
from the caller's ``torch.Generator``; entry ``i`` then uses the top 24 bits of
the SplitMix64 output (Steele, Lea, Flood 2014) for state
``key + (i + 1) * 0x9E3779B97F4A7C15`` (mod 2**64). Each entry's noise
therefore depends only on the key and the entry's index, so the compiled
kernels (:mod:`adaquantfl.compression._kernels`), :func:`rounding_uniforms` and the slow
reference in ``tests/`` produce the same bytes, and no kernel touches global
random state.

Bias: entry ``i`` rounds up iff ``J_i < 2**24 p_i`` (``J_i = 2**24 u_i``, ``p_i = r_i - floor(r_i)``
exactly), i.e. with probability ``ceil(2**24 p_i) / 2**24``: ``E[xi_i] = r_i + b_i``, where
``0 <= b_i < 2**-24`` is 0 unless ``r_i < 1/2`` and ``2**24 r_i`` is not an integer; those
entries dequantize to exactly 0 or ``+-step``, so ``|E[Q_s(v)_i]| - r_i step = b_i step``.
Float32 rounding of ``r_i``, ``step`` and ``xi * step`` adds at most ``~4 * 2**-24 |v_i|``.

The L2 norm of a bucket ``v_0 .. v_{m-1}`` is defined exactly, so that every
implementation gets the same float32: 64 float64 partial sums, lane ``j``
adding ``v_k**2`` for ``k = j, j + 64, j + 128, ...`` in order (a float32 square
is exact in float64); the lanes are added in order ``0 .. 63``; the float64
square root of that sum is rounded to float32. (For ``m <= 64`` this is the
plain left-to-right sum.) The interleaving lets the kernel use SIMD while the
order stays fixed. The max-norm is ``max |v_k|``, which is exact in any order.

Every other float operation is a single IEEE-754 float32 operation in a fixed
order (``r = (|v| / norm) * s``; dequantised ``y = xi * (norm / s)``), so any
implementation that follows the same steps reproduces the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from adaquantfl.validation import check_int

__all__ = [
    "MAX_LEVELS",
    "NORMS",
    "Quantized",
    "bits_per_level_index",
    "bucket_norms",
    "bucket_span",
    "bucket_steps",
    "dequantize",
    "draw_key",
    "num_buckets",
    "output_buffer",
    "quantization_variance",
    "quantize",
    "quantize_inputs",
    "rounding_uniforms",
]

#: Largest number of levels. Level indices up to 2**24 are exact in float32,
#: and a packed entry (sign + index) then fits in 25 bits.
MAX_LEVELS = 2**24 - 1

#: Bucket norms must stay below this (2**127) so that dequantized values are finite.
MAX_NORM = np.float32(2.0**127)

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
    """Per-bucket norms of a flat float tensor, as float32 of shape ``(num_buckets,)``.

    The L2 norm is the exactly specified float64 sum of the module docstring,
    rounded once to float32, so it does not overflow for large finite entries
    and every implementation gets the same bits.

    Raises
    ------
    ValueError
        If an entry is NaN or infinite, or the norm overflows float32.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    _check_bucket_size(bucket_size)
    return torch.from_numpy(_norms(_flat_float32(v).numpy(), bucket_size, norm))


def _norms(v: np.ndarray, bucket_size: int | None, norm: str) -> np.ndarray:
    from adaquantfl.compression import _kernels as kernels

    out = np.empty(num_buckets(v.size, bucket_size), dtype=np.float32)
    bucket = bucket_span(v.size, bucket_size)
    if norm == "l2":
        kernels.norms_l2(v, bucket, out)
    else:
        kernels.norms_max(v, bucket, out)
    if not np.isfinite(out).all():
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        if bad:
            raise ValueError(f"cannot quantize a vector with {bad} non-finite entries (NaN or inf)")
    # Dequantization computes xi * (norm / s) with the step rounded to float32;
    # for norms within an ulp of float32's maximum that product can round up
    # to infinity. Below 2**127 it cannot.
    if not (out < MAX_NORM).all():
        raise ValueError(
            f"the vector's norm overflows float32 or exceeds {MAX_NORM:.3g}, the largest "
            "that dequantizes finitely; scale the update down"
        )
    return out


def bucket_span(numel: int, bucket_size: int | None) -> int:
    """Entries per bucket as the kernels take it: ``numel`` for one bucket, never 0."""
    return max(numel, 1) if bucket_size is None else int(bucket_size)


def quantize_inputs(
    x: torch.Tensor,
    levels: int,
    *,
    generator: torch.Generator,
    bucket_size: int | None,
    norm: NormName,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Validate the arguments of :func:`quantize`; return ``(v, key, norms)``.

    ``v`` is the flat float32 input (a view when ``x`` already is one), ``key``
    the stream key drawn from ``generator`` and ``norms`` the bucket norms.
    Shared by :func:`quantize` and the fused encoder in :mod:`adaquantfl.compression.codec`.
    """
    _check_levels(levels)
    _check_bucket_size(bucket_size)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    v = _flat_float32(x).numpy()
    key = draw_key(generator)
    return v, key, _norms(v, bucket_size, norm)


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
       draw from ``generator``; so ``0 <= E[xi_i] - r_i < 2**-24`` (module Notes).

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
    from adaquantfl.compression import _kernels as kernels

    v, key, norms = quantize_inputs(
        x, levels, generator=generator, bucket_size=bucket_size, norm=norm
    )
    magnitudes = np.empty(v.size, dtype=np.int32)
    signs = np.empty(v.size, dtype=np.bool_)
    span = bucket_span(v.size, bucket_size)
    kernels.quantize_into(v, norms, span, int(levels), np.uint64(key), magnitudes, signs)
    return Quantized(
        levels=int(levels),
        numel=v.size,
        bucket_size=None if bucket_size is None else int(bucket_size),
        norm=norm,
        norms=torch.from_numpy(norms),
        magnitudes=torch.from_numpy(magnitudes),
        signs=torch.from_numpy(signs),
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
    from adaquantfl.compression import _kernels as kernels

    flat = output_buffer(out, q.numel)
    steps = bucket_steps(q.norms.numpy(), q.levels)
    kernels.dequantize_into(
        q.magnitudes.numpy(),
        q.signs.numpy(),
        steps,
        bucket_span(q.numel, q.bucket_size),
        flat.detach().numpy(),
    )
    return flat


def output_buffer(out: torch.Tensor | None, numel: int) -> torch.Tensor:
    """``out`` viewed as a flat float32 tensor after checking it, or a new one."""
    if out is None:
        return torch.empty(numel, dtype=torch.float32)
    if (
        not isinstance(out, torch.Tensor)
        or out.dtype != torch.float32
        or out.device.type != "cpu"
        or out.numel() != numel
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous CPU float32 tensor with {numel} entries, got "
            f"{getattr(out, 'dtype', type(out).__name__)} with "
            f"{getattr(out, 'numel', lambda: '?')()} entries"
        )
    return out.view(-1)


def bucket_steps(norms: np.ndarray, levels: int) -> np.ndarray:
    """``norm / s`` per bucket: one IEEE float32 division each (float32 array)."""
    # Done in NumPy so that it is a true division (a tensor-by-scalar division
    # may be computed as a reciprocal multiply, which would change the last bit).
    return np.ascontiguousarray(norms / np.float32(levels), dtype=np.float32)


def quantization_variance(
    x: torch.Tensor, levels: int, *, bucket_size: int | None = None, norm: NormName = "l2"
) -> float:
    """Variance ``E||Q_s(x) - x||^2`` of the quantizer for this ``x`` (ideal rounding).

    Each entry is Bernoulli between two neighbouring levels a step ``n / s``
    apart, so its variance is ``(n/s)^2 p (1 - p)`` with ``p = r - floor(r)``.
    Computed in float64 from the quantizer's float32 ``r``; the 24-bit grid
    (module Notes) makes each entry's mean squared error larger by ``[0, (n/s)^2 2**-24)``.
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


def _ratios(
    v: torch.Tensor, norms: torch.Tensor, levels: int, b: int, start: int, stop: int
) -> torch.Tensor:
    """``min((|v_i| / n) * s, s)`` in float32 for entries ``start:stop``; 0 where ``n = 0``."""
    n = _expand_buckets(norms, b, start, stop)
    s = torch.tensor(levels, dtype=torch.float32)
    a = v[start:stop].abs()
    r = torch.minimum((a / torch.where(n > 0, n, 1.0)) * s, s)
    return torch.where(n > 0, r, 0.0)


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
    # Finiteness is checked by the norm kernels (a non-finite entry gives a
    # non-finite norm), which saves a pass over the data.
    return x.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()


def _check_levels(levels: int) -> None:
    check_int("levels", levels, 1, MAX_LEVELS)


def _check_bucket_size(bucket_size: int | None) -> None:
    if bucket_size is not None:
        check_int("bucket_size", bucket_size, 1, 2**32 - 1)
