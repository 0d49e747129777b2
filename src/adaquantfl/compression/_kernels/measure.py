"""Float64 sums over float32 vectors in one pass, without a float64 copy.

The sums here have one fixed order, so that every machine and thread count
gets the same bits: the vector is cut into blocks of :data:`BLOCK` entries
(block ``b`` holds entries ``b * BLOCK .. (b + 1) * BLOCK - 1``); in a block,
:data:`LANES` float64 partial sums take turns (lane ``j`` adds the terms of
entries ``j, j + LANES, ...`` of the block, in order) and are added in order
``0 .. LANES - 1``; the block sums are added in order with Neumaier's
compensated summation (Neumaier, ZAMM 54, 1974). Each term (a square of a
float32, or of the difference of two float32 values, taken in float64) is
within half an ulp of its exact value, so the sum of ``d`` non-negative terms
is within about ``(LANES + 4) * 2**-53`` of its exact value, relative, at any
``d`` (a left-to-right float64 sum drifts by up to ``d * 2**-53``).

The fused quantizer (:mod:`.fused`) measures what it quantizes with the same
helpers, block by block, while it encodes.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "BLOCK",
    "LANES",
    "all_finite",
    "block_error_squares",
    "block_squares",
    "compensated_add",
    "squared_error",
    "sum_squares",
]

#: Entries per block of the blocked sums (the fused kernels' block too).
BLOCK = 4096
#: Interleaved float64 partial sums in a block.
LANES = 64

_jit = numba.njit(cache=True, nogil=True)


@_jit
def compensated_add(total, carry, term):  # type: ignore[no-untyped-def]
    """One step of Neumaier's summation: ``(total, carry)`` after adding ``term``."""
    t = total + term
    if abs(total) >= abs(term):
        carry += (total - t) + term
    else:
        carry += (term - t) + total
    return t, carry


@_jit
def block_squares(xs, acc):  # type: ignore[no-untyped-def]
    """``sum xs[i]**2`` of one block (at most :data:`BLOCK` entries) in the lane order."""
    acc[:] = 0.0
    m = xs.size
    full = m - m % LANES
    for i in range(0, full, LANES):
        row = xs[i : i + LANES]
        for j in range(LANES):
            v = np.float64(row[j])
            acc[j] += v * v
    row = xs[full:]
    for j in range(row.size):
        v = np.float64(row[j])
        acc[j] += v * v
    total = 0.0
    for j in range(LANES):
        total += acc[j]
    return total


@_jit
def block_error_squares(xs, ys, acc):  # type: ignore[no-untyped-def]
    """``sum (ys[i] - xs[i])**2`` of one block, each difference taken in float64."""
    acc[:] = 0.0
    m = xs.size
    full = m - m % LANES
    for i in range(0, full, LANES):
        row = xs[i : i + LANES]
        got = ys[i : i + LANES]
        for j in range(LANES):
            e = np.float64(got[j]) - np.float64(row[j])
            acc[j] += e * e
    row = xs[full:]
    got = ys[full:]
    for j in range(row.size):
        e = np.float64(got[j]) - np.float64(row[j])
        acc[j] += e * e
    total = 0.0
    for j in range(LANES):
        total += acc[j]
    return total


@_jit
def sum_squares(x):  # type: ignore[no-untyped-def]
    """``sum x[i]**2`` in float64, in the module's fixed order."""
    acc = np.zeros(LANES, np.float64)
    total = 0.0
    carry = 0.0
    for start in range(0, x.size, BLOCK):
        term = block_squares(x[start : start + BLOCK], acc)
        total, carry = compensated_add(total, carry, term)
    return total + carry


@_jit
def squared_error(x, y):  # type: ignore[no-untyped-def]
    """``sum (y[i] - x[i])**2`` in float64, in the module's fixed order (``x.size == y.size``)."""
    acc = np.zeros(LANES, np.float64)
    total = 0.0
    carry = 0.0
    for start in range(0, x.size, BLOCK):
        stop = start + BLOCK
        term = block_error_squares(x[start:stop], y[start:stop], acc)
        total, carry = compensated_add(total, carry, term)
    return total + carry


@_jit
def all_finite(x):  # type: ignore[no-untyped-def]
    """Whether no entry of ``x`` is NaN or infinite (``v - v`` is 0 exactly for finite ``v``)."""
    acc = np.zeros(LANES, x.dtype)
    for start in range(0, x.size, BLOCK):
        xs = x[start : start + BLOCK]
        m = xs.size
        full = m - m % LANES
        for i in range(0, full, LANES):
            row = xs[i : i + LANES]
            for j in range(LANES):
                acc[j] += row[j] - row[j]
        row = xs[full:]
        for j in range(row.size):
            acc[j] += row[j] - row[j]
        if acc.sum() != 0:
            return False
    return True
