"""Mutation fuzzing of wire format v1: every input is rejected or decodes to what re-encodes to it.

    python -m tools.fuzz_codec                         # 100,000 cases, seed 0
    python -m tools.fuzz_codec --cases 2000 --seed 3   # a quick run
    python -m tools.fuzz_codec --replay 1234           # re-run case 1234 and print it

A corpus of valid messages (raw, packed and entropy; 0 to 20,000 entries;
levels 1 to ``MAX_LEVELS``; buckets; l2 and max norm; Gaussian, heavy-tailed,
sparse, all-zero and arbitrary level indices; and rotated ``"eden"``
messages of every rung and block size, with zero, raw and re-rotated
blocks) is built deterministically.
Case ``i`` draws a message and one mutation from
``numpy.random.default_rng([seed, i])``, so any case can be replayed alone:
truncation, extension, bit flips, bytes overwritten, header fields set to
arbitrary, non-canonical or huge values, bytes inserted or deleted, splices
of two messages, bodies moved under another header (an entropy body that
codes more symbols than the header allows), crafted entropy bodies and
random bytes. Structure-aware mutations change one field by the layout:
a bucket norm (or raw value) set to a special float32 (``-0.0``, subnormals,
the edges of the encoder's range ``< 2**127``, inf, NaNs, negatives); a
packed code set to an edge value or a padding bit set; one field of an
entropy body (``k``, the varint ``m``, or the coded words: one appended,
prepended, dropped, nudged, swapped or replaced); one field of a rotated
body (the seed, a block's mode, a padding bit, a code bit, a raw value, the
code stream's length); and the sample's own
vector in another form the entropy layout allows (another ``k``, stored
instead of coded or the reverse). Most mutations that should reach the
body recompute the CRC (and the body length), so that the body checks, not
the CRC, have to reject them.

The mutated bytes go through the four decoders a server uses, each with the
original's element count as ``expected_numel``: ``decode``, ``decode_dense``,
``decode_dequantize`` (into an ``out`` buffer) and the original's compressor's
``decompress`` (``QSGDCompressor`` or ``EdenCompressor``, with the original's
levels), as ``bytes`` or,
in 40% of cases, as a ``bytearray``, a ``memoryview`` (also one sliced out of
a larger buffer) or a uint8 ``ndarray``. Each call is one of

====================== ========================================================
rejected               it raised CodecError
decoded-equal          it returned the original, bit for bit, from the
                       original's bytes
decoded-other-valid    it returned something else, and the mutated bytes are
                       exactly what the encoder makes of it (a CRC-recomputed
                       mutation can turn one valid message into another);
                       proved by re-encoding byte for byte
decoded-non-canonical  it returned something that does not re-encode to the
                       bytes, which are another form the layout allows for it
                       (an entropy body with another ``k``, or stored instead
                       of coded, or the reverse; rotated fields that
                       ``encode_rotated`` writes differently): every vector
                       has one valid encoding in each encoding (failure)
decoded-wrong          it returned something that does not re-encode to the
                       bytes and of which they are no encoding (failure)
inconsistent           ``decode_dequantize`` or ``decompress`` disagreed with
                       ``decode`` / ``decode_dense`` on the same bytes (failure)
other-exception        any other exception (failure)
====================== ========================================================

The counts are printed per decoder, per mutation and per encoding that the
mutated header names.

and is also checked against two bounds: its tracemalloc peak against
:func:`alloc_bound_bytes` (``64 * (expected_numel + len(data)) + 1 MiB``) and
the wall time of the case against ``--max-case-s`` (a potential hang). A
``faulthandler`` watchdog ends the run with a traceback if one case runs past
``--hang-s`` (the last progress line, ``--start`` and ``--cases`` narrow it down
to a case for ``--replay``). The exit status is non-zero if any failure or bound violation
occurred; the counts go to ``benchmarks/results/fuzz_codec.json``.

Notes
-----
tracemalloc sees NumPy's allocations (and so every array the decoders make)
and Python objects, but not torch's allocator (the output tensor, whose size
is ``expected_numel`` by construction) nor memory private to the numba
kernels or constriction's Rust code (the latter holds a copy of the coded
words, at most the input's length). Case times include tracemalloc's
overhead, which is larger than the decoding itself for small messages.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import platform
import struct
import sys
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import constriction
import numpy as np
import torch

from adaquantfl.compression import EdenCompressor, QSGDCompressor
from adaquantfl.compression.codec import (
    CodecError,
    decode,
    decode_dense,
    decode_dequantize,
    encode,
    encode_dense,
)
from adaquantfl.compression.qsgd import MAX_LEVELS, Quantized, dequantize, num_buckets, quantize
from adaquantfl.compression.rotation import (
    RotatedMessage,
    decode_rotated,
    eden_encode,
    encode_rotated,
    reconstruct,
)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
DECODERS = ("decode", "decode_dense", "decode_dequantize", "decompress")
OK_OUTCOMES = ("rejected", "decoded-equal", "decoded-other-valid")
BAD_OUTCOMES = ("decoded-non-canonical", "decoded-wrong", "inconsistent", "other-exception")
OUTCOMES = OK_OUTCOMES + BAD_OUTCOMES
CODES = {"raw": 0, "packed": 1, "entropy": 2, "rotated": 4}
FLAG_MAX_NORM = 0x10
U32_MAX = 2**32 - 1
#: The largest norm an encoder produces (the quantizer refuses 2**127 and above).
LARGEST_NORM = float(np.nextafter(np.float32(2.0**127), np.float32(0)))
HUGE_VALUES = (U32_MAX, U32_MAX - 1, 2**31, 2**28 + 3, 10**9, 0x0FFFFFFF, 2**24, 2**24 - 1)


def alloc_bound_bytes(expected_numel: int, data_bytes: int) -> int:
    """The most a decoder call may allocate: ``64 * (expected_numel + len(data)) + 1 MiB``.

    64 bytes per entry covers the decoded arrays and the entropy decoder's
    temporaries (about 12 bytes per entry are used); the MiB covers fixed
    costs (exception text, scratch blocks of the kernels).
    """
    return 64 * (expected_numel + data_bytes) + 2**20


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True, eq=False)
class Sample:
    """A valid message and what each decoder must give for it."""

    name: str
    encoding: str  # "raw", "packed", "entropy" or "rotated"
    data: bytes
    numel: int
    levels: int | None  # None for raw
    quantized: Quantized | None  # None for raw and rotated
    dense: torch.Tensor  # decode_dense's result for raw, dequantize(quantized) otherwise
    rotated: RotatedMessage | None = None  # the fields of a rotated message
    max_block_size: int = 0  # the "eden" compressor's option for a rotated message

    @property
    def body_bytes(self) -> int:
        return header_fields(self.data)[0][3]

    @property
    def body_offset(self) -> int:
        return len(self.data) - 4 - self.body_bytes


def values(kind: str, numel: int, seed: int) -> torch.Tensor:
    """Test vectors: "gauss", "cubed" (heavy tails: every level index occurs), "sparse",
    "zeros" and "special" (signed zeros, subnormals, the float32 extremes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    if kind == "cubed":
        return x**3
    if kind == "sparse":
        return x * (torch.rand(numel, generator=g) < 0.05)
    if kind == "zeros":
        return torch.zeros(numel)
    if kind == "special":
        pool = torch.tensor([-0.0, 0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1.0, -2.5])
        return pool[torch.randint(0, pool.numel(), (numel,), generator=g)]
    return x


def random_quantized(
    numel: int, levels: int, bucket_size: int | None, norm: str, seed: int
) -> Quantized:
    """A valid ``Quantized`` that no quantizer would make: uniform level indices,
    random signs, norms that may be 0, subnormal or the largest below 2**127."""
    rng = np.random.default_rng(seed)
    mags = rng.integers(0, levels + 1, numel, dtype=np.int64).astype(np.int32)
    signs = rng.integers(0, 2, numel).astype(np.bool_) & (mags > 0)
    nb = num_buckets(numel, bucket_size)
    norms = rng.choice(np.array([0.0, 1e-45, 1.0, LARGEST_NORM], np.float32), nb)
    norms = np.where(rng.random(nb) < 0.5, rng.random(nb).astype(np.float32), norms)
    return Quantized(
        levels,
        numel,
        bucket_size,
        norm,  # type: ignore[arg-type]
        torch.from_numpy(norms.astype(np.float32)),
        torch.from_numpy(mags),
        torch.from_numpy(signs),
    )


def make_sample(
    encoding: str,
    numel: int,
    levels: int | None = None,
    *,
    bucket_size: int | None = None,
    norm: str = "l2",
    kind: str = "gauss",
    seed: int = 0,
) -> Sample:
    """A valid message of ``encoding`` with the given shape and contents.

    ``kind="indices"`` makes a quantized message from :func:`random_quantized`.
    """
    name = f"{encoding}-d{numel}-s{levels}-b{bucket_size}-{norm}-{kind}-{seed}"
    if encoding == "raw":
        x = values(kind, numel, seed)
        return Sample(name, "raw", encode_dense(x), numel, None, None, x)
    if levels is None:
        raise ValueError(f"a {encoding} sample needs levels")
    if kind == "indices":
        q = random_quantized(numel, levels, bucket_size, norm, seed)
    else:
        x = values(kind, numel, seed)
        g = torch.Generator().manual_seed(seed + 1)
        q = quantize(x, levels, generator=g, bucket_size=bucket_size, norm=norm)  # type: ignore[arg-type]
    return Sample(name, encoding, encode(q, encoding), numel, levels, q, dequantize(q))


def make_rotated_sample(
    numel: int, levels: int, max_block_size: int, *, kind: str = "gauss", seed: int = 0
) -> Sample:
    """A valid ``"eden"`` message, made by the compressor (blocks by :func:`block_size_for`)."""
    if kind == "modes":  # the golden vector's kind of content: every block mode
        return _rotated_modes_sample(seed)
    name = f"rotated-d{numel}-s{levels}-b{max_block_size}-{kind}-{seed}"
    x = values(kind, numel, seed)
    g = torch.Generator().manual_seed(seed + 1)
    data = EdenCompressor(max_block_size).compress(x, levels, generator=g)
    message = decode_rotated(data, expected_numel=numel)
    return Sample(
        name, "rotated", data, numel, levels, None, reconstruct(message), message, max_block_size
    )


def _rotated_modes_sample(seed: int) -> Sample:
    """300 entries in blocks of 128 at s = 3: base rotations, one more, and raw."""
    x = torch.zeros(300)
    x[:128] = torch.linspace(-1.0, 1.0, 128)
    x[128:256] = torch.randn(128, generator=torch.Generator().manual_seed(286))
    x[256:] = torch.linspace(0.0, 1.0, 44)
    x[299] = 1e30
    data = eden_encode(x, 3, generator=torch.Generator().manual_seed(2026), block_size=128)
    message = decode_rotated(data, expected_numel=300)
    if message.modes.tolist() != [0, 1, 2]:
        raise RuntimeError(f"the modes sample has modes {message.modes.tolist()}")
    name = f"rotated-d300-s3-b128-modes-{seed}"
    return Sample(name, "rotated", data, 300, 3, None, reconstruct(message), message, 128)


SIZES = (0, 1, 2, 3, 5, 8, 9, 16, 17, 64, 100, 410, 1000, 4097)
#: Levels of rotated samples: every kind of rung (sub-bit, 1 bit, 2-8 bits).
ROTATED_LEVELS = (1, 2, 3, 5, 6, 7, 12, 14, 15, 31, 63, 255, 2047, 65_535, MAX_LEVELS)
LEVELS = (1, 2, 3, 4, 7, 8, 15, 16, 127, 128, 255, 256, 4095, 65_535, 70_000, MAX_LEVELS)


RAW_CORPUS = (
    (0, "gauss"),
    (1, "gauss"),
    (2, "special"),
    (3, "zeros"),
    (8, "special"),
    (17, "cubed"),
    (100, "special"),
    (410, "gauss"),
    (1000, "cubed"),
)


def corpus(seed: int = 2026) -> list[Sample]:
    """The valid messages the fuzzer mutates (deterministic)."""
    rng = np.random.default_rng(seed)
    out = [make_sample("raw", n, kind=kind, seed=i) for i, (n, kind) in enumerate(RAW_CORPUS)]
    kinds = ("gauss", "cubed", "sparse", "zeros", "indices")
    for encoding in ("packed", "entropy"):
        for i in range(48):
            n = int(rng.choice(SIZES))
            levels = int(rng.choice(LEVELS))
            bucket = [None, None, None, 1, 3, 64, 5000][int(rng.integers(7))]
            norm = ("l2", "max")[int(rng.integers(2))]
            kind = kinds[int(rng.integers(len(kinds)))]
            out.append(
                make_sample(encoding, n, levels, bucket_size=bucket, norm=norm, kind=kind, seed=i)
            )
        for n, levels, kind in [(0, 1, "gauss"), (1, MAX_LEVELS, "gauss"), (20_000, 3, "cubed")]:
            out.append(make_sample(encoding, n, levels, kind=kind, seed=99))
    # Rotated ("eden") messages; "special" values include +-3.4e38, whose blocks
    # are too large to scale and go raw.
    kinds = ("gauss", "cubed", "sparse", "zeros", "special")
    for i in range(40):
        n = int(rng.choice((*SIZES, 4096, 5210)))
        levels = int(rng.choice(ROTATED_LEVELS))
        block = int(rng.choice((64, 128, 1024, 4096)))
        kind = kinds[int(rng.integers(len(kinds)))]
        out.append(make_rotated_sample(n, levels, block, kind=kind, seed=i))
    out.append(make_rotated_sample(300, 3, 128, kind="modes", seed=0))
    out.append(make_rotated_sample(20_000, 1, 4096, kind="cubed", seed=99))
    return out


# --------------------------------------------------------------------------- message surgery


def leb128(value: int) -> bytes:
    """The canonical unsigned LEB128 encoding of ``value``."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def with_crc(content: bytes) -> bytes:
    """``content`` followed by its CRC32 (zlib), little-endian: a message's last field."""
    return content + struct.pack("<I", zlib.crc32(content))


def recrc(message: bytes) -> bytes:
    """Replace the trailing CRC so that a mutation reaches the checks behind it."""
    return with_crc(message[:-4]) if len(message) >= 4 else message


def header_fields(data: bytes) -> tuple[list[int], list[tuple[int, int]]]:
    """The four varint values of a valid message's header and their byte spans."""
    pos, values_, spans = 4, [], []
    for _ in range(4):
        start, value, shift = pos, 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values_.append(value)
        spans.append((start, pos))
    return values_, spans


def replace_field(data: bytes, index: int, raw: bytes) -> bytes:
    """``data`` with header varint ``index`` (numel, levels, bucket, body) replaced by ``raw``."""
    start, end = header_fields(data)[1][index]
    return data[:start] + raw + data[end:]


def frame(code: int, numel: int, levels: int, bucket: int, norms: bytes, body: bytes) -> bytes:
    """A message assembled field by field, with a correct CRC (any field values)."""
    head = b"AQ\x01" + bytes([code & 0xFF])
    head += leb128(numel) + leb128(levels) + leb128(bucket) + leb128(len(body))
    return with_crc(head + norms + body)


def flip_bits(data: bytes, positions: Sequence[int]) -> bytes:
    """``data`` with each stream bit ``p`` (bit ``p % 8`` of byte ``p // 8``) inverted."""
    out = bytearray(data)
    for p in positions:
        out[p // 8] ^= 1 << (p % 8)
    return bytes(out)


def _push_bounded(coder: Any, value: int, bound: int) -> None:
    # A count uniform on [0, bound], as the entropy module's docstring lays it out.
    uniform = constriction.stream.model.Uniform
    if bound == 0:
        return
    if bound < 2**24 - 1:
        coder.encode_reverse(np.array([value], np.int32), uniform(bound + 1))
        return
    high, low = value >> 16, value & 0xFFFF
    low_size = 0x10000 if high < bound >> 16 else (bound & 0xFFFF) + 1
    if low_size > 1:
        coder.encode_reverse(np.array([low], np.int32), uniform(low_size))
    coder.encode_reverse(np.array([high], np.int32), uniform((bound >> 16) + 1))


def entropy_body(mags: np.ndarray, signs: np.ndarray, k: int) -> bytes | None:
    """The ANS entropy body of these level indices with ``k`` uniform low bits.

    Built from the layout in :mod:`adaquantfl.compression.entropy`'s docstring with any
    legal ``k``, not only the one the encoder picks; None if the high
    alphabet would exceed 4096 symbols.
    """
    model = constriction.stream.model
    d = mags.size
    if d == 0:
        return b""
    high = mags >> k
    m = int(high.max())
    if m >= 4096:
        return None
    counts = np.bincount(high, minlength=m + 1)
    coder = constriction.stream.stack.AnsCoder()
    nonzero = mags != 0
    if nonzero.any():
        coder.encode_reverse(signs[nonzero].astype(np.int32), model.Uniform(2))
    if k:
        coder.encode_reverse((mags & ((1 << k) - 1)).astype(np.int32), model.Uniform(1 << k))
    if m:
        categorical = model.Categorical(counts.astype(np.float64), perfect=False)
        coder.encode_reverse(high.astype(np.int32), categorical)
        remaining = d - np.concatenate(([0], np.cumsum(counts)))
        for j in reversed(range(m)):
            _push_bounded(coder, int(counts[j]), int(remaining[j]))
    words: bytes = coder.get_compressed().astype("<u4").tobytes()
    return bytes([k]) + leb128(m) + words


def quantized_message(q: Quantized, encoding: str, body: bytes) -> bytes:
    """The message of ``q`` with the given body (for bodies the encoder would not pick)."""
    code = CODES[encoding] | (FLAG_MAX_NORM if q.norm == "max" else 0)
    norms = q.norms.numpy().astype("<f4").tobytes()
    return frame(code, q.numel, q.levels, q.bucket_size or 0, norms, body)


def encoding_check(q: Quantized, data: bytes) -> tuple[str, str]:
    """How ``data`` relates to ``q``: the outcome a decoder that returned ``q`` gets, and why.

    ``"decoded-other-valid"`` if ``data`` is exactly what the encoder makes of
    ``q`` (of every encoding, only that form is valid);
    ``"decoded-non-canonical"`` if it is another form the layout allows (an
    entropy body with a ``k`` the encoder would not pick, or the stored form
    of a vector the encoder codes, or the reverse); ``"decoded-wrong"`` if it
    is no encoding of ``q`` at all.
    """
    try:
        packed = encode(q, "packed")
        if data in (packed, encode(q, "entropy")):
            return "decoded-other-valid", "the encoder's bytes"
    except ValueError as exc:
        return "decoded-wrong", f"the decoded Quantized is invalid: {exc}"
    mags, signs = q.magnitudes.numpy(), q.signs.numpy()
    packed_bytes = -(-q.numel * (1 + q.levels.bit_length()) // 8)
    bodies: list[bytes | None] = [
        b"\xff" + packed[len(packed) - 4 - packed_bytes : len(packed) - 4]
    ]
    bodies += [entropy_body(mags, signs, k) for k in range(min(23, q.levels.bit_length()) + 1)]
    if any(b is not None and quantized_message(q, "entropy", b) == data for b in bodies):
        return (
            "decoded-non-canonical",
            "an entropy body the encoder would not pick (other k or stored form)",
        )
    return "decoded-wrong", "the decoded vector does not re-encode to the message"


# --------------------------------------------------------------------------- mutations

#: Mutation kinds and their relative weights.
MUTATIONS: dict[str, int] = {
    "truncate": 6,
    "extend": 5,
    "flip": 10,
    "flip+crc": 14,
    "overwrite": 4,
    "overwrite+crc": 8,
    "header-field+crc": 10,
    "huge-claim+crc": 6,
    "insert-delete+crc": 6,
    "splice": 3,
    "splice+crc": 5,
    "reframe-body+crc": 7,
    "entropy-body+crc": 8,
    "norm+crc": 6,
    "body-field+crc": 10,
    "entropy-form+crc": 6,
    "random": 3,
    "random-framed+crc": 5,
}

#: float32 bit patterns a norm or raw value is set to by "norm+crc" and "body-field+crc":
#: zeros, subnormals, 1, the edges of the encoder's norm range, inf, NaNs, negatives.
SPECIAL_F32_BITS = (
    0x00000000,  # 0.0
    0x80000000,  # -0.0
    0x00000001,  # smallest subnormal
    0x007FFFFF,  # largest subnormal
    0x3F800000,  # 1.0
    0x7EFFFFFF,  # LARGEST_NORM, the largest below 2**127
    0x7F000000,  # 2**127
    0x7F7FFFFF,  # float32 max
    0x7F800000,  # inf
    0xFF800000,  # -inf
    0x7FC00000,  # quiet NaN
    0x7F800001,  # signalling NaN
    0xFFC00000,  # negative NaN
    0xBF800000,  # -1.0
    0x80000001,  # negative subnormal
)


def _bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _field_value(rng: np.random.Generator, current: int) -> bytes:
    """A replacement for a header varint: near, far, huge, non-canonical or garbage."""
    pick = int(rng.integers(8))
    if pick == 0:
        return leb128(int(_choice(rng, HUGE_VALUES)))
    if pick == 1:
        return leb128(max(0, current + int(rng.integers(-3, 4))))
    if pick == 2:
        return leb128(int(_choice(rng, (0, 1, 2, current * 2, current // 2, 2**32, 2**35))))
    if pick == 3:  # non-canonical: a redundant continuation byte
        raw = bytearray(leb128(current))
        raw[-1] |= 0x80
        return bytes(raw) + b"\x00"
    if pick == 4:
        return b"\xff" * int(rng.integers(1, 7))
    if pick == 5:
        return b""
    if pick == 6:
        return leb128(int(rng.integers(0, 2**32)))
    return _bytes(rng, int(rng.integers(1, 6)))


def _random_norms(rng: np.random.Generator, count: int) -> bytes:
    if rng.random() < 0.5:  # valid norms
        return (rng.random(count) * 10.0).astype("<f4").tobytes()
    return _bytes(rng, 4 * count)  # any bit pattern: NaN, inf, negative


def _crafted_entropy_body(rng: np.random.Generator, sample: Sample) -> bytes:
    levels = sample.levels or int(_choice(rng, LEVELS))
    pick = int(rng.integers(4))
    if pick == 0 and sample.quantized is not None and sample.numel:
        # The true vector with another legal k: valid, though not the encoder's choice.
        mags, signs = sample.quantized.magnitudes.numpy(), sample.quantized.signs.numpy()
        body = entropy_body(mags, signs, int(rng.integers(0, min(23, levels.bit_length()) + 1)))
        if body is not None:
            return body
    if pick == 1:
        # A valid body of a larger vector: its counts and symbols claim more
        # entries than the header (and the caller) allow.
        big = sample.numel + int(_choice(rng, (1, 2, 17, 1000, sample.numel + 5)))
        big = min(big, 50_000)
        mags = rng.integers(0, min(levels, 300) + 1, big, dtype=np.int64).astype(np.int32)
        if rng.random() < 0.5:
            mags[rng.random(big) < 0.9] = 0
        signs = rng.integers(0, 2, big).astype(np.bool_) & (mags > 0)
        body = entropy_body(mags, signs, 0)
        if body is not None:
            return body
    if pick == 2:
        # Counts coded against a 32-bit bound (the split form), so that a
        # decoder trusting them would read billions of symbols.
        coder = constriction.stream.stack.AnsCoder()
        m = int(rng.integers(1, 8))
        for _ in range(m):
            _push_bounded(coder, int(rng.integers(0, U32_MAX)), U32_MAX)
        coded: bytes = coder.get_compressed().astype("<u4").tobytes()
        return bytes([0]) + leb128(m) + coded + _bytes(rng, 4 * int(rng.integers(0, 3)))
    k = int(rng.integers(0, 26))
    m = int(
        _choice(
            rng,
            (0, 1, 2, int(rng.integers(0, 8)), int(rng.integers(0, 4097)), 4095, 4096, levels >> k),
        )
    )
    words = rng.integers(0, 2**32, int(_choice(rng, (0, 1, 2, 3, 8, 40))), dtype=np.uint32)
    if words.size and rng.random() < 0.8:
        words[-1] |= 1  # ANS data never ends in a zero word
    return bytes([k]) + leb128(m) + words.astype("<u4").tobytes()


def mutate(rng: np.random.Generator, sample: Sample, corpus: list[Sample]) -> tuple[str, bytes]:
    """One random mutation of ``sample.data``: ``(kind, mutated bytes)``."""
    kinds = list(MUTATIONS)
    weights = np.array([MUTATIONS[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    data = sample.data
    n = len(data)
    if kind == "truncate":
        return kind, data[: int(rng.integers(0, n))]
    if kind == "extend":
        return kind, data + _bytes(rng, int(_choice(rng, (1, 2, 3, 4, 5, 8, 64, 1000))))
    if kind in ("flip", "flip+crc"):
        fix = kind.endswith("+crc")
        room = 8 * (n - 4) if fix else 8 * n
        count = min(room, int(_choice(rng, (1, 1, 1, 2, 3, 4, 8, 32))))
        if fix and rng.random() < 0.6:  # mostly inside the norms and body
            lo = 8 * min(sample.body_offset - 4 * _num_norms(sample), n - 4)
            positions = rng.choice(np.arange(lo, room), size=min(count, room - lo), replace=False)
        else:
            positions = rng.choice(room, size=count, replace=False)
        out = flip_bits(data, positions.tolist())
        return kind, recrc(out) if fix else out
    if kind in ("overwrite", "overwrite+crc"):
        fix = kind.endswith("+crc")
        buf = bytearray(data)
        for _ in range(int(_choice(rng, (1, 1, 2, 4, 8)))):
            pos = int(rng.integers(0, n - 4 if fix else n))
            buf[pos] = int(_choice(rng, (0x00, 0xFF, 0x80, 0x7F, int(rng.integers(256)))))
        return kind, recrc(bytes(buf)) if fix else bytes(buf)
    if kind == "header-field+crc":
        if rng.random() < 0.3:  # magic, version, encoding and flags
            buf = bytearray(data)
            buf[int(rng.integers(0, 4))] = int(rng.integers(256))
            mutated = bytes(buf)
        else:
            index = int(rng.integers(4))
            mutated = replace_field(data, index, _field_value(rng, header_fields(data)[0][index]))
        return kind, recrc(mutated) if rng.random() < 0.85 else mutated
    if kind == "huge-claim+crc":
        mutated = data
        for index in rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist():
            value = int(_choice(rng, HUGE_VALUES))
            if index == 3 and rng.random() < 0.5 and sample.levels:
                numel = header_fields(mutated)[0][0]
                value = min(U32_MAX, -(-numel * (1 + sample.levels.bit_length()) // 8))
            mutated = replace_field(mutated, int(index), leb128(value))
        return kind, recrc(mutated)
    if kind == "insert-delete+crc":
        pos = int(rng.integers(0, n - 3))
        if rng.random() < 0.5:
            out = data[:pos] + _bytes(rng, int(rng.integers(1, 17))) + data[pos:]
        else:
            out = data[:pos] + data[pos + int(rng.integers(1, 17)) :]
        return kind, recrc(out) if len(out) >= 4 else out
    if kind in ("splice", "splice+crc"):
        other = _choice(rng, corpus).data
        out = data[: int(rng.integers(0, n + 1))] + other[int(rng.integers(0, len(other) + 1)) :]
        return kind, recrc(out) if kind.endswith("+crc") else out
    if kind == "reframe-body+crc":
        donor = _choice(rng, [s for s in corpus if s.encoding != "raw"])
        body = donor.data[donor.body_offset : len(donor.data) - 4]
        return kind, _reframe(rng, sample, donor.encoding, donor.levels or 1, body)
    if kind == "entropy-body+crc":
        body = _crafted_entropy_body(rng, sample)
        return kind, _reframe(rng, sample, "entropy", sample.levels or 1, body)
    if kind == "norm+crc":
        return kind, _mutate_norm(rng, sample)
    if kind == "body-field+crc":
        return kind, _mutate_body_field(rng, sample)
    if kind == "entropy-form+crc":
        return kind, _other_entropy_form(rng, sample)
    if kind == "random":
        return kind, _bytes(rng, int(_choice(rng, (0, 1, 4, 11, 12, 13, 16, 40, 300))))
    # "random-framed+crc": a header consistent with its length around random norms and body.
    code = int(_choice(rng, (0, 1, 2, 4, 0x10, 0x11, 0x12, 0x12, 0x14, int(rng.integers(256)))))
    numel = sample.numel if rng.random() < 0.7 else int(rng.integers(0, 50))
    levels = int(_choice(rng, (*LEVELS, 0)))
    bucket = int(_choice(rng, (0, 0, 1, 3, max(1, numel), 64, 128, 4096)))
    nb = 0 if code & 0x0F == 0 else num_buckets(numel, bucket or None)
    if code & 0x0F == 0:
        body_len = 4 * numel
    elif code & 0x0F == 1 and levels:
        body_len = -(-numel * (1 + levels.bit_length()) // 8)
    else:
        body_len = int(rng.integers(0, 40))
    body_len = min(body_len, 200_000)
    return kind, frame(code, numel, levels, bucket, _random_norms(rng, nb), _bytes(rng, body_len))


def message_parts(data: bytes) -> tuple[int, list[int], bytes, bytes]:
    """Byte 3, the four header varints, the norms and the body of a valid message."""
    fields, spans = header_fields(data)
    numel, _, bucket, body_bytes = fields
    start = spans[3][1]
    nb = 0 if data[3] & 0x0F == CODES["raw"] else num_buckets(numel, bucket or None)
    end = start + 4 * nb
    return data[3], fields, data[start:end], data[end : end + body_bytes]


def with_parts(data: bytes, *, norms: bytes | None = None, body: bytes | None = None) -> bytes:
    """A valid message with its norms or body replaced: the body length and CRC follow."""
    code, (numel, levels, bucket, _), old_norms, old_body = message_parts(data)
    norms = old_norms if norms is None else norms
    return frame(code, numel, levels, bucket, norms, old_body if body is None else body)


def _special_f32(rng: np.random.Generator) -> bytes:
    if rng.random() < 0.15:
        return _bytes(rng, 4)
    return struct.pack("<I", int(_choice(rng, SPECIAL_F32_BITS)))


def _mutate_norm(rng: np.random.Generator, sample: Sample) -> bytes:
    """One bucket norm (a raw value, for raw messages) set to a special float32."""
    _, _, norms, body = message_parts(sample.data)
    field = norms if norms else body
    if not field:  # a raw message of no entries: a value it does not have
        return with_parts(sample.data, body=_special_f32(rng))
    j = 4 * int(rng.integers(len(field) // 4))
    field = field[:j] + _special_f32(rng) + field[j + 4 :]
    return with_parts(sample.data, norms=field) if norms else with_parts(sample.data, body=field)


def set_bits(buf: bytearray, position: int, width: int, value: int) -> None:
    """Write ``value`` into stream bits ``position .. position + width - 1`` (LSB first)."""
    for b in range(width):
        p = position + b
        buf[p // 8] = (buf[p // 8] & ~(1 << (p % 8))) | (((value >> b) & 1) << (p % 8))


def _mutate_packed_codes(rng: np.random.Generator, body: bytes, numel: int, levels: int) -> bytes:
    """One packed code set to an edge value, or a padding bit set."""
    w = 1 + levels.bit_length()
    out = bytearray(body)
    if numel == 0 or (rng.random() < 0.15 and (numel * w) % 8):
        if out:
            set_bits(out, numel * w + int(rng.integers((-numel * w) % 8)), 1, 1)  # padding
        return bytes(out)
    code = int(
        _choice(
            rng,
            (
                levels << 1,  # xi = s
                (levels << 1) | 1,  # xi = s, negative
                (levels + 1) << 1,  # xi = s + 1 (when it fits the w - 1 index bits)
                (1 << w) - 1,  # every bit set
                1,  # a sign on a zero level
                0,
                int(rng.integers(1 << w)),
            ),
        )
    )
    set_bits(out, int(rng.integers(numel)) * w, w, code & ((1 << w) - 1))
    return bytes(out)


def _coded_entropy_fields(body: bytes) -> tuple[int, int, bytes, np.ndarray]:
    """``(k, m, m's varint bytes, words)`` of an ANS-coded entropy body."""
    pos = 1
    while body[pos] & 0x80:
        pos += 1
    raw_m = body[1 : pos + 1]
    m = sum((b & 0x7F) << (7 * i) for i, b in enumerate(raw_m))
    return body[0], m, raw_m, np.frombuffer(body[pos + 1 :], dtype="<u4").astype(np.int64)


def _mutate_entropy_fields(rng: np.random.Generator, body: bytes, levels: int) -> bytes:
    """One field of an ANS-coded entropy body changed: k, the varint m, or the coded words."""
    k, m, raw_m, words = _coded_entropy_fields(body)
    pick = int(rng.integers(3))
    if pick == 0:  # k: another legal value, a neighbour, just out of range, or the stored marker
        legal = min(23, levels.bit_length())
        k2 = int(_choice(rng, (int(rng.integers(legal + 1)), k + 1, max(k - 1, 0), legal + 1)))
        k2 = 0xFF if rng.random() < 0.1 else k2 % 256
        return bytes([k2]) + raw_m + words.astype("<u4").tobytes()
    if pick == 1:  # m: a neighbour, an edge, or the same value non-canonically
        if rng.random() < 0.25:
            raw = bytearray(raw_m)
            raw[-1] |= 0x80
            new_m = bytes(raw) + b"\x00"
        else:
            new_m = leb128(int(_choice(rng, (m + 1, max(m - 1, 0), 0, 2 * m, 4095, 4096))))
        return bytes([k]) + new_m + words.astype("<u4").tobytes()
    word = int(_choice(rng, (0, 1, 0xFFFFFFFF, int(rng.integers(2**32)))))
    op = int(rng.integers(6))
    if op == 0:  # a word appended (on top of the stack: read first)
        words = np.append(words, word)
    elif op == 1:  # a word prepended (at the bottom: read last)
        words = np.insert(words, 0, word)
    elif op == 2 and words.size:  # the first or last word dropped
        words = words[1:] if rng.random() < 0.5 else words[:-1]
    elif op == 3 and words.size:  # a word nudged by one
        j = int(_choice(rng, (0, words.size - 1, int(rng.integers(words.size)))))
        words = words.copy()
        words[j] = (words[j] + int(_choice(rng, (1, -1)))) % 2**32
    elif op == 4 and words.size > 1:  # two words swapped
        words = words.copy()
        i, j = rng.choice(words.size, size=2, replace=False)
        words[[i, j]] = words[[j, i]]
    elif words.size:  # a word replaced
        words = words.copy()
        words[int(rng.integers(words.size))] = word
    return bytes([k]) + raw_m + words.astype("<u4").tobytes()


def _mutate_body_field(rng: np.random.Generator, sample: Sample) -> bytes:
    """One field of the body changed by its own layout (raw value, packed code, entropy field)."""
    _, (numel, levels, _, _), _, body = message_parts(sample.data)
    if sample.encoding == "raw":
        return _mutate_norm(rng, sample)  # a raw body is values: set one
    if sample.rotated is not None:
        return with_parts(sample.data, body=_mutate_rotated_body(rng, sample.rotated, body))
    if sample.encoding == "packed":
        return with_parts(sample.data, body=_mutate_packed_codes(rng, body, numel, levels))
    if not body:  # d = 0: any entropy body is too much
        return with_parts(sample.data, body=bytes([int(rng.integers(3))]) + b"\x00")
    if body[0] == 0xFF:  # the stored form: its packed codes, or its marker
        if rng.random() < 0.2:
            new = bytes([int(rng.integers(min(23, levels.bit_length()) + 1))]) + body[1:]
        else:
            new = b"\xff" + _mutate_packed_codes(rng, body[1:], numel, levels)
        return with_parts(sample.data, body=new)
    return with_parts(sample.data, body=_mutate_entropy_fields(rng, body, levels))


def _mutate_rotated_body(rng: np.random.Generator, m: RotatedMessage, body: bytes) -> bytes:
    """One field of a rotated body changed by its layout: the seed, a mode, a padding
    bit, a code bit, a raw value, or the code stream's length."""
    nb = m.scales.size
    codes_at = 8 + -(-nb // 4)
    codes_end = codes_at + m.codes.size
    out = bytearray(body)
    pick = int(rng.integers(6))
    if pick == 0:  # the seed: its top bit (over 63 bits), or any bytes
        if rng.random() < 0.5:
            out[7] |= 0x80
        else:
            out[:8] = _bytes(rng, 8)
    elif pick == 1 and nb:  # one block's mode set to 0, 1, 2 or 3
        j = int(rng.integers(nb))
        shift = 2 * (j % 4)
        out[8 + j // 4] = (out[8 + j // 4] & ~(3 << shift)) | (int(rng.integers(4)) << shift)
    elif pick == 2:  # the last mode byte's or the last code byte's high bit: padding, mostly
        at = codes_at - 1 if (rng.random() < 0.5 or not m.codes.size) else codes_end - 1
        if 0 <= at < len(out):
            out[at] |= 0x80 >> int(rng.integers(3))
    elif pick == 3 and m.codes.size:  # one code bit: another valid message, or a zero block's
        bit = int(rng.integers(8 * m.codes.size))
        out[codes_at + bit // 8] ^= 1 << (bit % 8)
    elif pick == 4 and m.raw.size:  # a raw value set to a special float32
        j = codes_end + 4 * int(rng.integers(m.raw.size))
        out[j : j + 4] = _special_f32(rng)
    else:  # the code stream (and everything after it) shortened or lengthened
        cut = int(rng.integers(1, 9))
        if rng.random() < 0.5:
            del out[max(codes_at, len(out) - cut) :]
        else:
            out += _bytes(rng, cut) if rng.random() < 0.5 else bytes(cut)
    return bytes(out)


def _other_entropy_form(rng: np.random.Generator, sample: Sample) -> bytes:
    """The sample's own vector in another form the entropy layout allows (another k, or
    stored / coded): valid to a decoder that checks only the layout, not the encoder's choice."""
    q = sample.quantized
    if q is None or q.numel == 0:
        return _mutate_body_field(rng, sample)
    mags, signs = q.magnitudes.numpy(), q.signs.numpy()
    if rng.random() < 0.25:
        packed = encode(q, "packed")
        body: bytes | None = b"\xff" + message_parts(packed)[3]
    else:
        body = entropy_body(mags, signs, int(rng.integers(min(23, q.levels.bit_length()) + 1)))
    if body is None:  # that k leaves too many high parts: the vector's packed form
        body = b"\xff" + message_parts(encode(q, "packed"))[3]
    return quantized_message(q, "entropy", body)


def _num_norms(sample: Sample) -> int:
    if sample.rotated is not None:
        return int(sample.rotated.scales.size)
    q = sample.quantized
    return 0 if q is None else q.num_buckets


def _reframe(
    rng: np.random.Generator, sample: Sample, encoding: str, levels: int, body: bytes
) -> bytes:
    """``body`` under a header claiming the sample's element count (and a valid CRC)."""
    q = sample.quantized
    r = sample.rotated
    if q is not None:
        levels = q.levels if rng.random() < 0.7 else levels
        bucket, norm = q.bucket_size or 0, q.norm
        norms = q.norms.numpy().astype("<f4").tobytes()
    elif r is not None:  # the rotated header and scales around another body
        levels = r.levels if rng.random() < 0.7 else levels
        bucket, norm = r.block_size, "l2"
        norms = r.scales.astype("<f4").tobytes()
    else:
        bucket, norm = 0, "l2"
        norms = (rng.random(1) * 3.0).astype("<f4").tobytes()
    code = CODES[encoding] | (FLAG_MAX_NORM if norm == "max" else 0)
    return frame(code, sample.numel, levels, bucket, norms, body)


# --------------------------------------------------------------------------- the oracle


@dataclass
class Call:
    """One decoder call on one input, classified."""

    decoder: str
    outcome: str
    detail: str = ""
    peak_bytes: int = 0
    bound_bytes: int = 0
    seconds: float = 0.0

    @property
    def alloc_ok(self) -> bool:
        return self.peak_bytes <= self.bound_bytes

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES and self.alloc_ok


def same_quantized(a: Quantized, b: Quantized) -> bool:
    """Equal fields and bit-identical tensors (``-0.0`` and ``0.0`` norms differ)."""
    return (
        (a.levels, a.numel, a.bucket_size, a.norm) == (b.levels, b.numel, b.bucket_size, b.norm)
        and bitwise_equal(a.norms, b.norms)
        and torch.equal(a.magnitudes, b.magnitudes)
        and torch.equal(a.signs, b.signs)
    )


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same float32 bit patterns."""
    return (
        a.dtype == b.dtype == torch.float32
        and a.shape == b.shape
        and torch.equal(a.view(torch.int32), b.view(torch.int32))
    )


def _timed(
    decoder: str, fn: Callable[[], Any], bound: int, measure_alloc: bool
) -> tuple[Any, Call]:
    """Run one decoder call: its value (or None) and a Call saying how it ended."""
    base = 0
    if measure_alloc:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    try:
        value, outcome, detail = fn(), "ok", ""
    except CodecError as exc:
        value, outcome, detail = None, "rejected", str(exc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pyo3 panics (PanicException) derive from BaseException
        value, outcome, detail = None, "other-exception", f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base if measure_alloc else 0
    return value, Call(decoder, outcome, detail, peak, bound, seconds)


def _classify_quantized(sample: Sample, data: bytes, q: Quantized, call: Call) -> None:
    # Re-encoding comes first: a decoded vector equal to the original from
    # bytes that differ from the original's is a second form of it (failure).
    call.outcome, call.detail = encoding_check(q, data)
    original = sample.quantized
    valid = call.outcome == "decoded-other-valid"
    if valid and original is not None and same_quantized(q, original):
        call.outcome, call.detail = "decoded-equal", ""


def _classify_dense(sample: Sample, data: bytes, x: torch.Tensor, call: Call) -> None:
    if encode_dense(x) != data:  # raw has no other form the layout allows
        call.outcome, call.detail = (
            "decoded-wrong",
            "the raw vector does not re-encode to the message",
        )
    elif sample.encoding == "raw" and bitwise_equal(x, sample.dense):
        call.outcome = "decoded-equal"
    else:
        call.outcome, call.detail = "decoded-other-valid", "the encoder's bytes"


def _mirror(
    call: Call, value: Any, out: torch.Tensor, expected: torch.Tensor | None, primary: Call
) -> None:
    """Check a dense decoder against the primary decoder's verdict on the same bytes."""
    if call.outcome == "other-exception":
        return
    if call.outcome == "rejected":
        if expected is not None:
            call.outcome = "inconsistent"
            call.detail = f"rejected ({call.detail}) what {primary.decoder} accepted"
        return
    if expected is None:
        call.outcome = "inconsistent"
        call.detail = f"accepted what {primary.decoder} rejected ({primary.detail})"
    elif value.data_ptr() != out.data_ptr() or not bitwise_equal(value, expected):
        call.outcome, call.detail = "decoded-wrong", "differs from the primary decoder's result"
    else:
        call.outcome, call.detail = primary.outcome, primary.detail


def _classify_rotated(
    sample: Sample, data: bytes, value: Any, out: torch.Tensor, call: Call
) -> None:
    """Judge ``EdenCompressor.decompress`` on (mutated) bytes of a rotated sample.

    Accepted bytes must be exactly what :func:`encode_rotated` makes of the fields
    :func:`decode_rotated` reads from them (one valid form per message), and the
    tensor must be :func:`reconstruct` of those fields, written into ``out``.
    """
    if call.outcome == "other-exception":
        return
    if call.outcome == "rejected":
        if data == sample.data:
            call.outcome = "inconsistent"
            call.detail = f"rejected the encoder's own message ({call.detail})"
        return
    assert sample.levels is not None
    compressor = EdenCompressor(sample.max_block_size)
    try:
        fields = decode_rotated(
            data,
            expected_numel=sample.numel,
            expected_levels=sample.levels,
            expected_block_size=compressor.block_size(sample.numel, sample.levels),
        )
    except CodecError as exc:
        call.outcome, call.detail = "inconsistent", f"decode_rotated rejected it ({exc})"
        return
    if value.data_ptr() != out.data_ptr() or not bitwise_equal(value, reconstruct(fields)):
        call.outcome, call.detail = "decoded-wrong", "differs from reconstruct(decode_rotated(...))"
    elif encode_rotated(fields) != data:
        call.outcome, call.detail = "decoded-non-canonical", "its fields re-encode to other bytes"
    elif data == sample.data and bitwise_equal(value, sample.dense):
        call.outcome, call.detail = "decoded-equal", ""
    else:
        call.outcome, call.detail = "decoded-other-valid", "the encoder's bytes (rotated fields)"


#: Types a message may arrive as; the decoders take any of them.
CONTAINERS = ("bytes", "bytearray", "memoryview", "memoryview-slice", "ndarray")


def wrap(data: bytes, container: str) -> Any:
    """``data`` as one of :data:`CONTAINERS` (a slice starts 3 bytes into its buffer)."""
    if container == "bytearray":
        return bytearray(data)
    if container == "memoryview":
        return memoryview(data)
    if container == "memoryview-slice":
        return memoryview(b"AQ\x01" + data)[3:]
    if container == "ndarray":
        return np.frombuffer(data, dtype=np.uint8).copy()
    return data


def _compressor_of(sample: Sample) -> QSGDCompressor | EdenCompressor:
    """The compressor a server expecting ``sample``'s kind of message uses."""
    if sample.rotated is not None:
        return EdenCompressor(sample.max_block_size)
    if sample.quantized is None:
        return QSGDCompressor()
    return QSGDCompressor(
        encoding=sample.encoding,
        bucket_size=sample.quantized.bucket_size,
        norm=sample.quantized.norm,
    )


def _encoding_of(data: bytes) -> str | None:
    """The encoding byte 3 names (None if the message is too short to say)."""
    if len(data) < 4:
        return None
    return {code: name for name, code in CODES.items()}.get(data[3] & 0x0F)


def run_case(
    sample: Sample, data: bytes, *, measure_alloc: bool = False, container: str = "bytes"
) -> list[Call]:
    """Feed ``data`` to every decoder with ``sample``'s element count; classify each call.

    ``decode`` and ``decode_dense`` are judged on their own (equal to the
    original, or ``data`` is a valid encoding of what they returned);
    ``decode_dequantize`` and ``decompress`` must then agree with them bit
    for bit, and no decoder may modify its input. ``data`` is passed as
    ``container``. ``measure_alloc`` traces allocations with ``tracemalloc``
    (started for the call if it is not already running).
    """
    started = measure_alloc and not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        return _run_case(sample, data, measure_alloc, container)
    finally:
        if started:
            tracemalloc.stop()


def _run_case(sample: Sample, data: bytes, measure_alloc: bool, container: str) -> list[Call]:
    n = sample.numel
    bound = alloc_bound_bytes(n, len(data))
    message = wrap(data, container)
    q, dec = _timed("decode", lambda: decode(message, expected_numel=n), bound, measure_alloc)
    if dec.outcome == "ok":
        _classify_quantized(sample, data, q, dec)
    x, dense = _timed(
        "decode_dense", lambda: decode_dense(message, expected_numel=n), bound, measure_alloc
    )
    if dense.outcome == "ok":
        _classify_dense(sample, data, x, dense)
    # What decode returned, accepted rightly or not: the other decoders must agree with it.
    reference = dequantize(q) if q is not None else None
    out = torch.full((n,), math.nan)
    y, fused = _timed(
        "decode_dequantize",
        lambda: decode_dequantize(message, expected_numel=n, out=out),
        bound,
        measure_alloc,
    )
    _mirror(fused, y, out, reference, dec)
    out2 = torch.full((n,), math.nan)
    # The server's compressor has the original's settings; it rejects any
    # other encoding, norm or bucket size before decoding.
    compressor = _compressor_of(sample)
    z, comp = _timed(
        "decompress",
        lambda: compressor.decompress(message, numel=n, levels=sample.levels, out=out2),
        bound,
        measure_alloc,
    )
    if sample.rotated is not None:
        _classify_rotated(sample, data, z, out2, comp)
    elif sample.levels is None:
        expected = x if x is not None else None
        _mirror(comp, z, out2, expected, dense)
    else:
        same = (
            q is not None
            and sample.quantized is not None
            and q.levels == sample.levels
            and q.norm == sample.quantized.norm
            and q.bucket_size == sample.quantized.bucket_size
            and _encoding_of(data) == sample.encoding
        )
        _mirror(comp, z, out2, reference if same else None, dec)
    if bytes(message) != data:
        comp.outcome, comp.detail = "inconsistent", "a decoder modified its input"
    return [dec, dense, fused, comp]


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    """Counts and extremes of a fuzzing run (what goes to the JSON file)."""

    cases: int = 0
    seed: int = 0
    counts: dict[str, Counter[str]] = field(
        default_factory=lambda: {d: Counter() for d in DECODERS}
    )
    by_mutation: dict[str, Counter[str]] = field(default_factory=dict)
    by_encoding: dict[str, Counter[str]] = field(default_factory=dict)
    other_valid_details: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    alloc_violations: int = 0
    max_alloc: dict[str, Any] = field(default_factory=lambda: {"ratio": 0.0})
    slowest_case: dict[str, Any] = field(default_factory=lambda: {"seconds": 0.0})
    slow_cases: int = 0
    seconds: float = 0.0

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.counts.values():
            total.update(c)
        return total

    def failed(self) -> bool:
        totals = self.totals()
        bad = sum(totals[o] for o in BAD_OUTCOMES)
        return bool(bad or self.alloc_violations or self.slow_cases)


def encoding_of(data: bytes) -> str:
    """The encoding a message's header names ("raw", "packed", "entropy", "rotated"), or
    "unknown"."""
    if len(data) < 4 or data[:3] != b"AQ\x01":
        return "unknown"
    names = {code: name for name, code in CODES.items()}
    return names.get(data[3] & 0x0F, "unknown")


def fuzz_case(index: int, seed: int, samples: list[Sample]) -> tuple[Sample, str, bytes, str]:
    """Case ``index`` of a run: its sample, mutation kind, mutated bytes and container."""
    rng = np.random.default_rng([seed, index])
    sample = samples[int(rng.integers(len(samples)))]
    kind, data = mutate(rng, sample, samples)
    container = CONTAINERS[0] if rng.random() < 0.6 else _choice(rng, CONTAINERS[1:])
    return sample, kind, data, container


def fuzz(
    cases: int,
    seed: int,
    *,
    start: int = 0,
    max_case_s: float = 1.0,
    hang_s: float = 60.0,
    progress: bool = True,
) -> Report:
    """Run cases ``start .. start + cases - 1`` and collect a :class:`Report`."""
    samples = corpus()
    for sample in samples:  # positive control, and compiles every kernel variant
        calls = run_case(sample, sample.data)
        wrong = [c for c in calls if c.outcome not in ("decoded-equal", "rejected")]
        primary = 3 if sample.rotated is not None else 0 if sample.levels else 1
        if wrong or calls[primary].outcome != "decoded-equal":
            raise RuntimeError(f"corpus message {sample.name} does not round-trip: {wrong}")
    report = Report(cases=cases, seed=seed)
    tracemalloc.start()
    began = time.perf_counter()
    try:
        for index in range(start, start + cases):
            faulthandler.dump_traceback_later(hang_s, exit=True)
            sample, kind, data, container = fuzz_case(index, seed, samples)
            calls = run_case(sample, data, measure_alloc=True, container=container)
            _record(report, index, sample, kind, data, calls, max_case_s)
            if progress and (index - start + 1) % 10_000 == 0:
                elapsed = time.perf_counter() - began
                print(f"  {index - start + 1:>7} cases  {elapsed:6.1f} s", file=sys.stderr)
    finally:
        faulthandler.cancel_dump_traceback_later()
        tracemalloc.stop()
    report.seconds = time.perf_counter() - began
    return report


def _record(
    report: Report,
    index: int,
    sample: Sample,
    kind: str,
    data: bytes,
    calls: list[Call],
    max_case_s: float,
) -> None:
    per_kind = report.by_mutation.setdefault(kind, Counter())
    per_encoding = report.by_encoding.setdefault(encoding_of(data), Counter())
    case_s = sum(c.seconds for c in calls)
    where = {"case": index, "mutation": kind, "sample": sample.name, "bytes": len(data)}
    if case_s > report.slowest_case["seconds"]:
        report.slowest_case = {"seconds": case_s, **where}
    if case_s > max_case_s:
        report.slow_cases += 1
        report.failures.append({**where, "failure": f"case took {case_s:.3f} s"})
    for c in calls:
        report.counts[c.decoder][c.outcome] += 1
        per_kind[c.outcome] += 1
        per_encoding[c.outcome] += 1
        if c.outcome == "decoded-other-valid":
            report.other_valid_details[f"{c.decoder}: {c.detail}"] += 1
        ratio = c.peak_bytes / c.bound_bytes
        if ratio > report.max_alloc["ratio"]:
            report.max_alloc = {
                "ratio": ratio,
                "peak_bytes": c.peak_bytes,
                "bound_bytes": c.bound_bytes,
                "decoder": c.decoder,
                **where,
            }
        if not c.alloc_ok:
            report.alloc_violations += 1
        if not c.ok and len(report.failures) < 50:
            report.failures.append(
                {
                    **where,
                    "decoder": c.decoder,
                    "outcome": c.outcome,
                    "detail": c.detail[:300],
                    "peak_bytes": c.peak_bytes,
                    "bound_bytes": c.bound_bytes,
                }
            )


def print_report(report: Report) -> None:
    """The counts per decoder, the bounds and the failures, as a text table."""
    cols = ("tried", *OUTCOMES)
    width = max(len(c) for c in cols) + 1
    print(
        f"\ncases {report.cases} (seed {report.seed}), decoder calls {4 * report.cases}, "
        f"{report.seconds:.1f} s"
    )
    print(f"{'decoder':<18}" + "".join(f"{c:>{width}}" for c in cols))
    rows = [*report.counts.items(), ("all", report.totals())]
    for name, counts in rows:
        tried = sum(counts.values())
        print(f"{name:<18}{tried:>{width}}" + "".join(f"{counts[o]:>{width}}" for o in OUTCOMES))
    print("\nby the encoding the mutated header names (all decoders):")
    print(f"{'encoding':<18}" + "".join(f"{c:>{width}}" for c in cols))
    for name, counts in sorted(report.by_encoding.items()):
        tried = sum(counts.values())
        print(f"{name:<18}{tried:>{width}}" + "".join(f"{counts[o]:>{width}}" for o in OUTCOMES))
    print("\nby mutation (all decoders):")
    for kind, counts in sorted(report.by_mutation.items()):
        line = ", ".join(f"{o} {counts[o]}" for o in OUTCOMES if counts[o])
        print(f"  {kind:<20} {line}")
    if report.other_valid_details:
        print("decoded-other-valid, re-encoded as:")
        for what, count in sorted(report.other_valid_details.items()):
            print(f"  {count:>7}  {what}")
    m = report.max_alloc
    if "peak_bytes" in m:
        print(
            f"max allocation: {m['peak_bytes']} B = {m['ratio']:.4f} of its bound "
            f"{m['bound_bytes']} B ({m['decoder']}, case {m['case']}, {m['mutation']}, "
            f"{m['sample']}); violations: {report.alloc_violations}"
        )
    s = report.slowest_case
    print(
        f"slowest case: {1e3 * s['seconds']:.2f} ms (case {s.get('case')}, {s.get('mutation')}, "
        f"{s.get('sample')}); cases over the limit: {report.slow_cases}"
    )
    for failure in report.failures[:20]:
        print("FAILURE", failure)
    print(
        "FAILED"
        if report.failed()
        else "OK: every input was rejected or decoded to what re-encodes to it byte for byte"
    )


def to_json(report: Report, argv: Sequence[str]) -> dict[str, Any]:
    totals = report.totals()
    return {
        "command": "python -m tools.fuzz_codec " + " ".join(argv),
        "cases": report.cases,
        "seed": report.seed,
        "decoder_calls": sum(totals.values()),
        "totals": {o: totals[o] for o in OUTCOMES},
        "per_decoder": {d: {o: c[o] for o in OUTCOMES} for d, c in report.counts.items()},
        "by_mutation": {k: dict(c) for k, c in sorted(report.by_mutation.items())},
        "by_encoding": {
            k: {o: c[o] for o in OUTCOMES} for k, c in sorted(report.by_encoding.items())
        },
        "decoded_other_valid": dict(report.other_valid_details),
        "alloc_bound": "64 * (expected_numel + len(data)) + 2**20 bytes (tracemalloc peak)",
        "max_alloc": report.max_alloc,
        "alloc_violations": report.alloc_violations,
        "slowest_case": report.slowest_case,
        "cases_over_time_limit": report.slow_cases,
        "failures": report.failures,
        "seconds": round(report.seconds, 2),
        "ok": not report.failed(),
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
    }


def replay(index: int, seed: int) -> int:
    """Re-run one case and print it: the mutation, the bytes and each decoder's verdict."""
    samples = corpus()
    sample, kind, data, container = fuzz_case(index, seed, samples)
    print(f"case {index} (seed {seed}): {kind} of {sample.name}, as {container}")
    print(f"original ({len(sample.data)} B): {sample.data[:96].hex()}")
    print(f"mutated  ({len(data)} B): {data[:96].hex()}")
    tracemalloc.start()
    calls = run_case(sample, data, measure_alloc=True, container=container)
    tracemalloc.stop()
    for c in calls:
        print(
            f"  {c.decoder:<18} {c.outcome:<20} {c.peak_bytes:>9} B / {c.bound_bytes} B  "
            f"{1e3 * c.seconds:.3f} ms  {c.detail[:200]}"
        )
    return 0 if all(c.ok for c in calls) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz_codec", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first case")
    parser.add_argument("--replay", type=int, default=None, help="re-run only this case")
    parser.add_argument("--max-case-s", type=float, default=1.0)
    parser.add_argument("--hang-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_codec.json")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay, args.seed)
    torch.set_num_threads(1)
    report = fuzz(
        args.cases, args.seed, start=args.start, max_case_s=args.max_case_s, hang_s=args.hang_s
    )
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(to_json(report, argv), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
