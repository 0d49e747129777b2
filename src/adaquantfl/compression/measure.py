"""What a client measures of its update, at any size, without float64 copies of it.

A client reports ``||v||`` and the distortion ``||C(v) - v||^2 / ||v||^2`` of
each update it compresses (:class:`.feedback.ClientCompressor`), and checks
that the update is finite first. Written as float64 tensor expressions these
cost two to four float64 copies of the vector (8 bytes an entry each): at
10^8 entries, gigabytes and most of the time of a compression. Here they are
single passes over the float32 data, summed in float64 in the fixed order of
:mod:`._kernels.measure` (blocks of 4096 entries, 64 interleaved partial sums
each, blocks added with compensated summation), which is within about
``2**-47`` of the exact sum, relative, at any size.

:func:`compress_measured` is the path for any compressor: it compresses,
decodes the payload into one float32 buffer (which may be the caller's
residual) and measures against it. QSGD measures while it encodes instead
(:meth:`.qsgd_compressor.QSGDCompressor.compress_measured`), with no buffer.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np
import torch

__all__ = ["all_finite", "compress_measured", "flat_float32", "squared_error", "sum_squares"]


def _kernels() -> ModuleType:
    # Imported on first use, like every compiled kernel: importing the
    # package does not load numba.
    from adaquantfl.compression._kernels import measure

    return measure


def flat_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a flat, contiguous float32 CPU tensor: a view when it already is one."""
    return t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()


def sum_squares(v: torch.Tensor) -> float:
    """``sum_i v_i^2`` of a float32 vector, in float64 (one pass, nothing allocated)."""
    return float(_kernels().sum_squares(flat_float32(v).numpy()))


def squared_error(v: torch.Tensor, sent: torch.Tensor) -> float:
    """``sum_i (sent_i - v_i)^2`` of two float32 vectors, each difference in float64."""
    a, b = flat_float32(v), flat_float32(sent)
    if a.numel() != b.numel():
        raise ValueError(f"vectors of {a.numel()} and {b.numel()} entries")
    return float(_kernels().squared_error(a.numpy(), b.numpy()))


def all_finite(t: torch.Tensor | np.ndarray) -> bool:
    """Whether every entry of a float tensor is finite, in one pass with no temporary.

    float32 and float64 CPU tensors and numpy arrays are read in place (a
    non-contiguous one is copied once); other tensors (float16, GPU) are
    checked by their float64 sum, which is NaN or infinite exactly when some
    entry is and cannot overflow for float32 or narrower values.
    """
    if isinstance(t, np.ndarray):
        if t.dtype in (np.float32, np.float64):
            return bool(_kernels().all_finite(np.ascontiguousarray(t).reshape(-1)))
        return bool(np.isfinite(t).all())
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(_kernels().all_finite(t.detach().contiguous().reshape(-1).numpy()))
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def compress_measured(
    compressor: object,
    v: torch.Tensor,
    levels: int | None,
    *,
    generator: torch.Generator,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> tuple[bytes, float, float]:
    """Compress ``v`` and measure: ``(payload, ||v||^2, ||scale C(v) - v||^2)``.

    Works with any compressor of the :class:`.compressor.Compressor` protocol:
    the payload is decoded into one float32 buffer (``residual`` itself
    when it is given and is not ``v``), times ``scale`` as
    :class:`.feedback.ErrorFeedback` does it (float32 ``mul_``). ``residual``,
    if given (``v`` itself allowed), receives ``v - scale C(v)``.

    Parameters
    ----------
    compressor : Compressor
    v : torch.Tensor
        Flat, contiguous float32 CPU vector.
    levels : int or None
    generator : torch.Generator
    scale : float
    residual : torch.Tensor, optional
        Flat contiguous float32 CPU tensor of ``v``'s size.
    """
    payload: bytes = compressor.compress(v, levels, generator=generator)  # type: ignore[attr-defined]
    norm_sq = sum_squares(v)
    shares_v = residual is not None and residual.data_ptr() == v.data_ptr()
    buffer = residual if residual is not None and not shares_v else torch.empty_like(v)
    sent = compressor.decompress(payload, numel=v.numel(), levels=levels, out=buffer)  # type: ignore[attr-defined]
    if scale != 1.0:
        sent = sent.mul_(scale)
    error_sq = squared_error(v, sent)
    if residual is not None:
        torch.sub(v, sent, out=residual)
    return payload, norm_sq, error_sq
