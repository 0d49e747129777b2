"""Slow, obviously correct reference implementations, used only by the tests.

Everything here is written element by element with Python integers and NumPy
float32 scalars, following the definitions in the module docstrings of
``adaquantfl.compression.qsgd`` and ``adaquantfl.compression.codec``. The fast kernels must
reproduce these byte for byte.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def splitmix64(key: int, counter: int) -> int:
    """SplitMix64 output for state ``key + counter * golden``."""
    z = (key + counter * GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def uniform24(key: int, index: int) -> int:
    """The rounding stream's 24-bit integer for element ``index`` (counter ``index + 1``)."""
    return splitmix64(key, index + 1) >> 40


LANES = 64


def reference_l2(chunk: list[float]) -> np.float32:
    """The L2 norm as defined in ``adaquantfl.compression.qsgd``: 64 interleaved float64 sums."""
    lanes = [0.0] * LANES
    for k, x in enumerate(chunk):
        lanes[k % LANES] += x * x  # Python floats are float64; x*x of a float32 is exact
    total = 0.0
    for lane in lanes:
        total += lane
    return np.float32(math.sqrt(total))


def reference_norms(v: np.ndarray, bucket_size: int | None, norm: str) -> list[np.float32]:
    d = len(v)
    b = d if bucket_size is None or d == 0 else bucket_size
    out = []
    for start in range(0, max(d, 1), max(b, 1)):
        chunk = [float(x) for x in v[start : start + b]]
        if norm == "l2":
            out.append(reference_l2(chunk))
        else:
            out.append(np.float32(max((abs(x) for x in chunk), default=0.0)))
    return out


def reference_quantize(
    v: np.ndarray, levels: int, key: int, norms: list[np.float32], bucket_size: int | None
) -> tuple[list[int], list[bool]]:
    """Level indices and signs, one element at a time."""
    d = len(v)
    b = d if bucket_size is None else bucket_size
    s = np.float32(levels)
    mags, signs = [], []
    for i in range(d):
        x = np.float32(v[i])
        n = norms[i // b] if d else np.float32(0)
        if n > 0:
            r = np.float32(np.float32(abs(x) / n) * s)
            r = min(r, s)
        else:
            r = np.float32(0)
        lo = np.float32(math.floor(r))
        frac = np.float32(r - lo)
        u = np.float32(uniform24(key, i)) * np.float32(2.0**-24)
        xi = int(lo) + (1 if u < frac else 0)
        mags.append(xi)
        signs.append(bool(x < 0) and xi > 0)
    return mags, signs


def reference_dequantize(
    mags: list[int],
    signs: list[bool],
    norms: list[np.float32],
    levels: int,
    bucket_size: int | None,
) -> np.ndarray:
    d = len(mags)
    b = d if bucket_size is None else bucket_size
    out = np.zeros(d, dtype=np.float32)
    for i in range(d):
        step = np.float32(norms[i // b] / np.float32(levels))
        y = np.float32(np.float32(mags[i]) * step)
        out[i] = -y if signs[i] else y
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def reference_pack(mags: list[int], signs: list[bool], levels: int) -> bytes:
    """Bit stream, least significant bit first, code = (xi << 1) | sign."""
    width = 1 + levels.bit_length()
    bits: list[int] = []
    for xi, neg in zip(mags, signs, strict=True):
        code = (xi << 1) | int(neg)
        bits.extend((code >> j) & 1 for j in range(width))
    out = bytearray((len(bits) + 7) // 8)
    for p, bit in enumerate(bits):
        out[p // 8] |= bit << (p % 8)
    return bytes(out)


def reference_message(
    encoding_code: int,
    numel: int,
    levels: int,
    bucket: int,
    norms: list[np.float32],
    body: bytes,
    flags: int = 0,
) -> bytes:
    """A v1 message assembled field by field (see adaquantfl.compression.codec)."""
    head = b"AQ" + bytes([1, encoding_code | flags])
    head += _varint(numel) + _varint(levels) + _varint(bucket) + _varint(len(body))
    head += b"".join(struct.pack("<f", float(n)) for n in norms)
    head += body
    return head + struct.pack("<I", zlib.crc32(head))
