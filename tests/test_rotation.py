"""EDEN (the "eden" compressor): the bytes, the statistics, the checks, and the engines.

The bytes are compared with a NumPy re-implementation of the module's
specification (:func:`reference_message`), which shares no code with the
kernels; the statistics use tolerances derived from the math, each with a
negative control that must fail them.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adaquantfl.compression import (
    COMPRESSORS,
    EdenCompressor,
    EdenOptions,
    ErrorFeedback,
    QSGDCompressor,
    compressor_from_config,
)
from adaquantfl.compression._kernels import rotation as kernels
from adaquantfl.compression.codec import CodecError, decode, decode_dense, peek_header
from adaquantfl.compression.feedback import ClientCompressor, feedback_scale
from adaquantfl.compression.qsgd import draw_key
from adaquantfl.compression.rotation import (
    GROUP_MAGNITUDE,
    MAX_SCALE,
    RUNGS,
    UNIFORM_STEP,
    RotatedMessage,
    block_size_for,
    decode_rotated,
    eden_encode,
    encode_rotated,
    message_bytes,
    reconstruct,
    rung,
)

GOLDEN = Path(__file__).parent / "golden"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LEVELS = [1, 2, 3, 5, 6, 7, 12, 14, 15, 31, 63, 255, 2047]
_M = (1 << 64) - 1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


# ------------------------------------------------------------------ a NumPy reference


def ref_signs(seed: int, layer: int, base: int, n: int) -> np.ndarray:
    """The sign stream: True where entry base + i of rotation `layer` is negated."""
    out = np.zeros(n, dtype=bool)
    for w in range(n // 64):
        z = (seed + (8 * (base // 64 + w) + layer + 1) * 0x9E3779B97F4A7C15) & _M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
        z ^= z >> 31
        out[64 * w : 64 * w + 64] = [(z >> j) & 1 for j in range(64)]
    return out


def ref_rotations(n: int) -> int:
    """Hadamard rotations of a block of n entries: 2 from 1024 on, 3 from 256, else 4."""
    return 2 if n >= 1024 else 3 if n >= 256 else 4


def ref_flip(v: np.ndarray, negate: np.ndarray) -> np.ndarray:
    return np.where(negate, -v, v).astype(np.float32)


def ref_fwht(v: np.ndarray) -> np.ndarray:
    """Sylvester-ordered Walsh-Hadamard transform, radix 2, in float32."""
    v = v.astype(np.float32).copy()
    h = 1
    while h < v.size:
        w = v.reshape(-1, 2, h)
        a, b = w[:, 0, :].copy(), w[:, 1, :].copy()
        w[:, 0, :], w[:, 1, :] = a + b, a - b
        h *= 2
    return v


def lane_sum(values: np.ndarray) -> float:
    """Float64 sum in 32 interleaved lanes, the lanes added in order."""
    acc = np.zeros(32)
    for i in range(0, values.size, 32):
        row = values[i : i + 32]
        acc[: row.size] += row
    total = 0.0
    for a in acc:
        total += a
    return total


def ref_scale(dot_un: float, sv2: float, norm: float, nx: float) -> tuple[float, float]:
    """EDEN's float32 scale and the realized omega (inf for a scale out of range)."""
    dot = dot_un / norm
    if not dot > 0:
        return 0.0, math.inf
    s = float(np.float32(nx / dot))
    if not 2.0**-126 <= s < MAX_SCALE:
        return s, math.inf
    return s, (s * s * sv2 - 2 * s * dot + nx) / nx


def ref_quantize(y: np.ndarray, levels: int, inv: np.float32) -> tuple[list, float, float]:
    """Codes as (value, width) pairs, <y, v> and ||v||^2 of a rotated block."""
    r = rung(levels)
    n = y.size
    codes: list[tuple[int, int]] = []
    if r.bits == 0:
        dot = sv2 = 0.0
        start = 0
        for _ in range(n // 64):
            for j in r.groups:
                group = y[start : start + (1 << j)]
                best = int(np.argmax(np.abs(group)))
                codes.append(((best << 1) | int(group[best] < 0), j + 1))
                c = float(GROUP_MAGNITUDE[j])
                dot += c * float(abs(group[best]))
                sv2 += c * c
                start += 1 << j
        return codes, dot, sv2
    if r.bits == 1:
        codes = [(int(v >= 0), 1) for v in y]
        return codes, lane_sum(np.abs(y.astype(np.float64))), float(n)
    top = (1 << r.bits) - 1
    t = np.floor(y * inv) + np.float32(1 << (r.bits - 1))
    c = np.clip(t, np.float32(0), np.float32(top)).astype(np.int64)
    v = 2 * c - top
    codes = [(int(k), r.bits) for k in c]
    return codes, lane_sum(v.astype(np.float64) * y.astype(np.float64)), float(np.sum(v * v))


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def reference_message(x: np.ndarray, levels: int, seed: int, block: int) -> bytes:
    """The ``"eden"`` message of ``x``, built from the module docstring alone."""
    r = rung(levels)
    d = x.size
    nb = max(1, -(-d // block))
    scales, modes, raw = [], [], []
    stream, pos = 0, 0
    for b in range(nb):
        xs = x[b * block : (b + 1) * block]
        m = xs.size
        n = block if m == block else (max(64, 1 << (m - 1).bit_length()) if m else 0)
        nx = lane_sum(xs.astype(np.float64) ** 2)
        if nx == 0:
            scales.append(0.0)
            modes.append(0)
            pos += n // 64 * r.pattern_bits
            continue
        y = np.zeros(n, np.float32)
        y[:m] = xs
        base = ref_rotations(n)
        for layer in range(base):
            y = ref_fwht(ref_flip(y, ref_signs(seed, layer, b * block, n)))
        chosen = None
        for mode in (0, 1):
            if mode == 1:
                y = ref_fwht(ref_flip(y, ref_signs(seed, base, b * block, n)))
            norm = _norm(n, base + mode)
            inv = np.float32(math.sqrt(n) / (math.sqrt(nx) * norm * UNIFORM_STEP.get(r.bits, 1)))
            codes, dot_un, sv2 = ref_quantize(y, levels, inv)
            s, omega = ref_scale(dot_un, sv2, norm, nx)
            if omega > r.omega_max and r.bits > 1 and np.abs(y).max() > 0:
                # Over the bound: the step that clips nothing (largest |y| in the top bin).
                inv = np.float32((1 << (r.bits - 1)) / float(np.abs(y).max()))
                codes, dot_un, sv2 = ref_quantize(y, levels, inv)
                s, omega = ref_scale(dot_un, sv2, norm, nx)
            if omega <= r.omega_max:
                chosen = (mode, s, codes)
                break
        if chosen is None:
            scales.append(0.0)
            modes.append(2)
            raw += list(xs)
            continue
        mode, s, codes = chosen
        scales.append(s)
        modes.append(mode)
        for value, width in codes:
            stream |= value << pos
            pos += width
    code_bytes = stream.to_bytes(-(-pos // 8), "little")
    mode_bits = sum(mode << (2 * b) for b, mode in enumerate(modes))
    body = (
        struct.pack("<Q", seed)
        + mode_bits.to_bytes(-(-nb // 4), "little")
        + code_bytes
        + np.array(raw, dtype="<f4").tobytes()
    )
    head = b"AQ\x01\x04" + leb128(d) + leb128(levels) + leb128(block) + leb128(len(body))
    content = head + np.array(scales, dtype="<f4").tobytes() + body
    return content + struct.pack("<I", zlib.crc32(content))


def _norm(n: int, layers: int) -> float:
    """n^(layers/2) as the kernels compute it (a power of n, times sqrt(n) if odd)."""
    norm = float(n) ** (layers // 2)
    return norm * math.sqrt(n) if layers % 2 else norm


def reference_decode(message: RotatedMessage) -> np.ndarray:
    """``R^T (S v)`` per block, in float32 with the kernels' order of operations."""
    r = rung(message.levels)
    d, block = message.numel, message.block_size
    out = np.zeros(d, np.float32)
    stream = int.from_bytes(message.codes.tobytes(), "little")
    pos = 0
    raw_at = 0
    for b, (s, mode) in enumerate(zip(message.scales, message.modes, strict=True)):
        m = min(block, d - b * block)
        n = block if m == block else (max(64, 1 << (m - 1).bit_length()) if m else 0)
        if mode == 2:
            out[b * block : b * block + m] = message.raw[raw_at : raw_at + m]
            raw_at += m
            continue
        nbits = n // 64 * r.pattern_bits
        if s == 0:
            pos += nbits
            continue
        layers = ref_rotations(n) + int(mode)
        a = np.float32(s) * np.float32(1.0 / _norm(n, layers))
        v = np.zeros(n, np.float32)
        if r.bits == 0:
            start = 0
            for _ in range(n // 64):
                for j in r.groups:
                    code = (stream >> pos) & ((1 << (j + 1)) - 1)
                    pos += j + 1
                    value = a * GROUP_MAGNITUDE[j]
                    v[start + (code >> 1)] = -value if code & 1 else value
                    start += 1 << j
        else:
            top = (1 << r.bits) - 1
            for i in range(n):
                code = (stream >> pos) & top
                pos += r.bits
                v[i] = (a if code else -a) if r.bits == 1 else a * np.float32(2 * code - top)
        for layer in reversed(range(layers)):
            v = ref_flip(ref_fwht(v), ref_signs(message.seed, layer, b * block, n))
        out[b * block : b * block + m] = v[:m]
    return out


def structured(kind: str, d: int, seed: int = 0) -> torch.Tensor:
    """Test vectors: Gaussian, heavy-tailed, one-hot, constant, a few spikes, sparse."""
    g = gen(seed)
    if kind == "gauss":
        return torch.randn(d, generator=g)
    if kind == "cubed":
        return torch.randn(d, generator=g) ** 3
    x = torch.zeros(d)
    if d == 0:
        return x
    if kind == "onehot":
        x[d // 3] = 1.5
    elif kind == "constant":
        x[:] = 0.25
    elif kind == "spikes":
        x[[0, d // 2, d - 1]] = torch.tensor([3.0, -1.0, 2.0])
    elif kind == "sparse":
        x = torch.randn(d, generator=g) * (torch.rand(d, generator=g) < 0.05)
    return x


def realized_omega(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((y.double() - x.double()).square().sum() / x.double().square().sum())


# ------------------------------------------------------------------ the bytes


CASES = [
    (d, levels, block, kind)
    for d, block in [(0, 64), (1, 64), (64, 64), (100, 64), (300, 128), (1000, 256), (5210, 4096)]
    for levels in (1, 3, 6, 7, 13, 15, 31, 255)
    for kind in ("gauss", "onehot")
]


@pytest.mark.parametrize(("d", "levels", "block", "kind"), CASES)
def test_the_encoder_writes_the_reference_bytes(d: int, levels: int, block: int, kind: str) -> None:
    x = structured(kind, d, seed=d + levels)
    g = gen(levels)
    seed = draw_key(gen(levels))
    data = eden_encode(x, levels, generator=g, block_size=block)
    assert data == reference_message(x.numpy(), levels, seed, block)
    message = decode_rotated(data, expected_numel=d)
    assert np.array_equal(reconstruct(message).numpy(), reference_decode(message))


@pytest.mark.parametrize(
    ("x", "mode"),
    [
        (torch.full((64,), 1e30), 2),  # the scale would reach 2**96: sent as float32
        (torch.full((64,), 1e-42), 2),  # the scale would be subnormal
        (torch.zeros(64), 0),
    ],
    ids=["huge", "tiny", "zero"],
)
def test_blocks_that_cannot_be_scaled_go_raw(x: torch.Tensor, mode: int) -> None:
    c = EdenCompressor(max_block_size=64)
    data = c.compress(x, 7, generator=gen())
    message = decode_rotated(data, expected_numel=64)
    assert message.modes.tolist() == [mode]
    assert data == reference_message(x.numpy(), 7, draw_key(gen()), 64)
    assert torch.equal(c.decompress(data, numel=64, levels=7), x)


def _encode_without_bound(x: torch.Tensor, levels: int, block: int, seed_of: int) -> torch.Tensor:
    """The kernel with the variance check switched off (the negative control)."""
    r = rung(levels)
    v = x.numpy()
    nb = max(1, -(-v.size // block))
    scales, modes = np.zeros(nb, np.float32), np.zeros(nb, np.uint8)
    words = np.zeros(v.size + 64, np.uint32)
    seed = draw_key(gen(seed_of))
    total, _, _, _ = kernels.encode_blocks(
        v, block, np.uint64(seed), r.bits, UNIFORM_STEP.get(r.bits, 1.0),
        np.array(r.groups or (0,), np.int64),
        np.ascontiguousarray(GROUP_MAGNITUDE[list(r.groups or (0,))]),
        r.pattern_bits, np.inf, MAX_SCALE, scales, modes, words, np.empty(v.size, np.float32),
    )  # fmt: skip
    stream = words.view(np.uint8)[: -(-total // 8)].copy()
    empty = np.zeros(0, np.float32)
    return reconstruct(RotatedMessage(v.size, levels, block, seed, scales, modes, stream, empty))


def test_a_block_over_the_bound_is_rotated_once_more() -> None:
    # A block of 64 at s = 1 is one group: its realized omega, 64 ||y||^2 / max|y|^2
    # - 1, exceeds omega_max = 13 for about one rotation in eight. Those blocks
    # are rotated once more (mode 1), and every message stays within the bound.
    c = EdenCompressor(max_block_size=64)
    bound = c.variance_bound(64, 1)
    assert bound is not None
    extra = 0
    for seed in range(100):
        x = torch.randn(64, generator=gen(1000 + seed))
        message = decode_rotated(c.compress(x, 1, generator=gen(seed)), expected_numel=64)
        assert realized_omega(x, reconstruct(message)) <= bound
        if message.modes.tolist() == [1]:
            extra += 1
            # Negative control: the same draw without the check keeps the base
            # rotations, over the bound.
            assert realized_omega(x, _encode_without_bound(x, 1, 64, seed)) > bound
    assert 3 <= extra <= 40




@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize(("d", "block"), [(0, 4096), (1, 4096), (4096, 4096), (5210, 4096),
                                          (15010, 1024), (100, 64)])  # fmt: skip
def test_message_sizes_are_exact(d: int, levels: int, block: int) -> None:
    c = EdenCompressor(max_block_size=block)
    data = c.compress(torch.randn(d, generator=gen(d)), levels, generator=gen())
    chosen = c.block_size(d, levels)
    assert peek_header(data).bucket_size == chosen
    assert len(data) == message_bytes(d, levels, chosen)
    assert len(data) <= c.max_message_bytes(d)
    # The chosen block size makes the smallest message of those allowed.
    assert all(len(data) <= message_bytes(d, levels, 1 << k) for k in range(6, block.bit_length()))


def test_message_size_by_hand() -> None:
    # d = 100 in blocks of 64: a full block and a tail of 36 padded to 64. At
    # s = 1 each 64 entries send one group of 64: 6 + 1 bits. Body: seed 8,
    # modes 1, codes ceil(14 / 8) = 2 -> 11 bytes. Header 4 + varints 1+1+1+1,
    # two scales 8, CRC 4: 31 bytes.
    assert message_bytes(100, 1, 64) == 31
    data = EdenCompressor(max_block_size=64).compress(torch.randn(100), 1, generator=gen())
    assert len(data) == 31
    assert data[:8] == b"AQ\x01\x04" + bytes([100, 1, 64, 11])


def test_same_seed_same_bytes_and_one_draw() -> None:
    x = torch.randn(5000, generator=gen(1))
    c = EdenCompressor(max_block_size=1024)
    g1, g2 = gen(5), gen(5)
    assert c.compress(x, 3, generator=g1) == c.compress(x, 3, generator=g2)
    assert c.compress(x, 3, generator=gen(6)) != c.compress(x, 3, generator=gen(5))
    g3 = gen(5)
    c.compress(x, 3, generator=g3)
    reference = gen(5)
    draw_key(reference)  # exactly one draw was taken
    assert torch.equal(torch.randint(0, 100, (4,), generator=g3),
                       torch.randint(0, 100, (4,), generator=reference))  # fmt: skip


def test_golden_message_is_unchanged() -> None:
    from tests.golden.make_golden import eden_golden_cases

    for name, data in eden_golden_cases().items():
        assert (GOLDEN / name).read_bytes() == data, name


# ------------------------------------------------------------------ the statistics


def _mean_and_se(x: torch.Tensor, c: Any, levels: int, draws: int) -> tuple[np.ndarray, ...]:
    d = x.numel()
    total = np.zeros(d)
    total2 = np.zeros(d)
    omegas = []
    for i in range(draws):
        y = c.decompress(c.compress(x, levels, generator=gen(i)), numel=d, levels=levels)
        yd = y.double().numpy()
        total += yd
        total2 += yd * yd
        omegas.append(realized_omega(x, y))
    mean = total / draws
    var = np.maximum(total2 / draws - mean**2, 0.0) * draws / (draws - 1)
    return mean, np.sqrt(var / draws), np.array(omegas)


#: Per-coordinate z bound: with d = 256 coordinates, P(max |z| > 5) < 256 * 5.7e-7 ~ 1e-4
#: for an unbiased estimator (CLT over 3000 draws).
Z_MAX = 5.0


@pytest.mark.parametrize("levels", [1, 7, 15, 31])
@pytest.mark.parametrize("kind", ["gauss", "cubed", "onehot", "constant", "spikes", "sparse"])
def test_unbiased_over_the_rotation(kind: str, levels: int) -> None:
    x = structured(kind, 256, seed=3)
    c = EdenCompressor(max_block_size=64)
    mean, se, omegas = _mean_and_se(x, c, levels, 3000)
    xs = x.double().numpy()
    # A coordinate the rotation cannot move (one-hot's, whose estimate is fixed
    # by <x_hat, x> = ||x||^2) varies only by float32 rounding: allow that.
    scale = np.sqrt(se**2 + (1e-6 * np.abs(xs).max()) ** 2)
    z = np.abs(mean - xs) / scale
    assert z.max() < Z_MAX, (kind, levels, float(z.max()))
    # Negative control: DRIVE's biased scale <y, v> / ||v||^2 (the least-squares
    # fit, S cos^2) shrinks the estimate by cos^2 = 1 / (1 + omega) per draw.
    biased = mean / (1 + omegas.mean())
    zb = np.abs(biased - xs) / scale
    assert zb.max() > Z_MAX, (kind, levels, float(zb.max()))


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("kind", ["gauss", "cubed", "onehot", "constant", "spikes", "sparse"])
def test_every_message_is_within_the_variance_bound(kind: str, levels: int) -> None:
    c = EdenCompressor(max_block_size=256)
    bound = c.variance_bound(1000, levels)
    assert bound is not None
    for i in range(20):
        x = structured(kind, 1000, seed=i)
        y = c.decompress(c.compress(x, levels, generator=gen(i)), numel=1000, levels=levels)
        assert realized_omega(x, y) <= bound
        # The error is orthogonal to x (EDEN's scale): <y, x> = ||x||^2.
        assert float(y.double() @ x.double()) == pytest.approx(
            float(x.double() @ x.double()), rel=1e-5
        )


@pytest.mark.parametrize("levels", LEVELS)
def test_gaussian_variance_is_edens(levels: int) -> None:
    # Over 2^16 Gaussian entries in blocks of 4096 the realized omega averages
    # 16 blocks of 64-4096 group statistics: within 3% of the exact value for
    # Gaussian coordinates. The rotated coordinates are sums of signs, with
    # lighter tails than a Gaussian's: at 8 bits, where clipping is a large part
    # of the error, that makes omega ~8% smaller.
    x = torch.randn(2**16, generator=gen(levels))
    c = EdenCompressor()
    y = c.decompress(c.compress(x, levels, generator=gen()), numel=x.numel(), levels=levels)
    omega, exact = realized_omega(x, y), rung(levels).omega_gauss
    assert (0.88 if rung(levels).bits >= 7 else 0.97) * exact <= omega <= 1.03 * exact


def test_ladder_is_monotone() -> None:
    rungs = [rung(s) for s in range(1, 5000)]
    bits = [r.nominal_bits for r in rungs]
    omegas = [r.omega_gauss for r in rungs]
    assert bits == sorted(bits) and omegas == sorted(omegas, reverse=True)
    assert [rung(s).nominal_bits for s in (1, 3, 7, 15, 31, 63)] == [7 / 64, 0.25, 0.5, 1, 2, 3]
    assert rung(2**24 - 1).bits == 8
    assert all(r.omega_max >= 1.5 * r.omega_gauss for r in RUNGS.values())


# ------------------------------------------------------------------ checks of the message


def _message(
    d: int = 300, levels: int = 7, block: int = 128, x: torch.Tensor | None = None
) -> bytes:
    x = torch.randn(d, generator=gen(2)) if x is None else x
    return eden_encode(x, levels, generator=gen(), block_size=block)


def test_the_header_is_checked_before_anything_else() -> None:
    c = EdenCompressor(max_block_size=128)
    data = _message()
    broken = data[:-1] + bytes([data[-1] ^ 1])  # a bad CRC: only the header is read first
    with pytest.raises(CodecError, match="levels 7; expected 15"):
        c.decompress(broken, numel=300, levels=15)
    with pytest.raises(CodecError, match="blocks of 128; expected 64"):
        EdenCompressor(max_block_size=64).decompress(broken, numel=300, levels=7)
    with pytest.raises(CodecError, match="expected a rotated message, got packed"):
        c.decompress(QSGDCompressor().compress(torch.randn(300), 7, generator=gen()),
                     numel=300, levels=7)  # fmt: skip
    with pytest.raises(CodecError, match="CRC32"):
        c.decompress(broken, numel=300, levels=7)
    with pytest.raises(CodecError, match="numel 300; expected 301"):
        c.decompress(data, numel=301, levels=7)
    # The other decoders refuse a rotated message by its encoding.
    with pytest.raises(CodecError, match="rotated"):
        QSGDCompressor().decompress(data, numel=300, levels=7)
    with pytest.raises(CodecError, match="rotated"):
        decode(data, expected_numel=300)
    with pytest.raises(CodecError, match="rotated"):
        decode_dense(data, expected_numel=300)


def _with_header(data: bytes, **fields: int) -> bytes:
    """``data`` with header varints replaced (and the CRC recomputed)."""
    pos, values = 4, []
    for _ in range(4):
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(value)
    names = ("numel", "levels", "block", "body")
    new = [fields.get(n, v) for n, v in zip(names, values, strict=True)]
    code = fields.get("code", data[3])
    head = b"AQ\x01" + bytes([code]) + b"".join(leb128(v) for v in new)
    return recrc(head + data[pos:])


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"block": 100}, "power of two"),
        ({"block": 32}, "power of two"),
        ({"block": 2**17}, "power of two"),
        ({"code": 0x14}, "no flags"),
        ({"levels": 0}, "levels 0 out of range"),
        ({"body": 5}, "outside"),
        ({"body": 10**6}, "outside"),
    ],
)
def test_bad_header_fields_are_named(fields: dict[str, int], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        peek_header(_with_header(_message(), **fields))


def _body_parts(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header through the scales, body, CRC) of a valid message."""
    header = peek_header(data)
    return data[: header.body_offset], data[header.body_offset : -4], data[-4:]


def _scale_bytes(data: bytes, block: int, value: bytes) -> bytes:
    header = peek_header(data)
    at = header.header_bytes + 4 * block
    return recrc(data[:at] + value + data[at + 4 :])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (struct.pack("<f", -0.0), "scale"),
        (struct.pack("<I", 1), "scale"),  # subnormal
        (struct.pack("<f", 2.0**96), "scale"),
        (struct.pack("<f", float("nan")), "scale"),
        (struct.pack("<f", -1.0), "scale"),
    ],
    ids=["minus-zero", "subnormal", "2**96", "nan", "negative"],
)
def test_bad_scales_are_rejected(value: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_rotated(_scale_bytes(_message(), 1, value), expected_numel=300)


def _mutated_body(data: bytes, edit: Any) -> bytes:
    head, body, _ = _body_parts(data)
    new = bytearray(body)
    edit(new)
    return recrc(_with_header(head + bytes(new) + b"\0\0\0\0", body=len(new)))


def test_canonical_form_is_enforced() -> None:
    zero_block = torch.cat([torch.zeros(128), torch.randn(172, generator=gen())])
    data = _message(x=zero_block)  # block 0 is zero: scale 0, mode 0, zero codes
    assert decode_rotated(data, expected_numel=300).scales[0] == 0
    # 8 seed bytes, then the modes (3 blocks: one byte), then the codes.
    cases = {
        "a set seed top bit": (lambda b: b.__setitem__(7, b[7] | 0x80), "63 bits"),
        "mode 3": (lambda b: b.__setitem__(8, b[8] | 0x03), "mode 3"),
        "mode padding": (lambda b: b.__setitem__(8, b[8] | 0x40), "padding bit after the last"),
        "zero block with mode 1": (lambda b: b.__setitem__(8, b[8] | 0x01), "mode 1"),
        "zero block with a code": (lambda b: b.__setitem__(9, b[9] | 0x01), "non-zero codes"),
        "raw mode on a scaled block": (lambda b: b.__setitem__(8, b[8] | 0x08), "has a scale"),
        "raw mode without its entries": (lambda b: b.__setitem__(8, b[8] | 0x02), "modes need"),
    }
    for name, (edit, match) in cases.items():
        with pytest.raises(CodecError, match=match):
            decode_rotated(_mutated_body(data, edit), expected_numel=300)
        assert name
    # At s = 1 the blocks of 128, 128 and 44 (padded to 64) send 5 x 7 = 35 bits:
    # the last byte has 5 padding bits.
    data = _message(x=zero_block, levels=1)
    with pytest.raises(CodecError, match="padding bit after the last code"):
        decode_rotated(
            _mutated_body(data, lambda b: b.__setitem__(len(b) - 1, b[-1] | 0x80)),
            expected_numel=300,
        )


def test_a_vector_of_more_raw_entries_than_the_first_buffer_holds() -> None:
    # 2^20 + 4096 entries too large to scale: every block raw, past the first
    # pass's room for 2^20 raw entries.
    x = torch.full((2**20 + 4096,), 3e30)
    data = EdenCompressor().compress(x, 7, generator=gen())
    message = decode_rotated(data, expected_numel=x.numel())
    assert (message.modes == 2).all()
    assert torch.equal(reconstruct(message), x)


def test_an_empty_vector_has_one_zero_block() -> None:
    data = _message(d=0, x=torch.zeros(0))
    message = decode_rotated(data, expected_numel=0)
    assert message.scales.tolist() == [0.0] and message.modes.tolist() == [0]
    with pytest.raises(CodecError, match="empty vector's block has scale"):
        decode_rotated(_scale_bytes(data, 0, struct.pack("<f", 1.0)), expected_numel=0)


def test_raw_blocks_are_checked() -> None:
    x = torch.cat([torch.full((128,), 1e30), torch.randn(172, generator=gen())])
    data = _message(x=x)
    message = decode_rotated(data, expected_numel=300)
    assert message.modes.tolist()[0] == 2
    head, body, _ = _body_parts(data)
    raw_at = len(body) - 4 * 128
    for value, match in [(float("inf"), "NaN or inf"), (float("nan"), "NaN or inf")]:
        bad = body[:raw_at] + struct.pack("<f", value) + body[raw_at + 4 :]
        with pytest.raises(CodecError, match=match):
            decode_rotated(recrc(head + bad + b"\0" * 4), expected_numel=300)
    zeros = body[:raw_at] + bytes(4 * 128)
    with pytest.raises(CodecError, match="all zeros"):
        decode_rotated(recrc(head + zeros + b"\0" * 4), expected_numel=300)
    with pytest.raises(CodecError, match="raw block 0 has a scale"):
        decode_rotated(_scale_bytes(data, 0, struct.pack("<f", 1.0)), expected_numel=300)


@pytest.mark.parametrize("kind", ["gauss", "onehot", "zeros", "raw", "empty"])
def test_a_decoded_message_re_encodes_to_its_bytes(kind: str) -> None:
    d = 0 if kind == "empty" else 1000
    x = {"zeros": torch.zeros(d), "raw": torch.full((d,), 3e29)}.get(kind, structured(kind, d))
    for levels in LEVELS:
        data = EdenCompressor(max_block_size=256).compress(x, levels, generator=gen(levels))
        message = decode_rotated(data, expected_numel=d)
        assert encode_rotated(message) == data
        assert decode_rotated(encode_rotated(message), expected_numel=d).equals(message)


# ------------------------------------------------------------------ the compressor


def test_options_are_validated_and_round_trip() -> None:
    assert COMPRESSORS["eden"] is EdenCompressor
    c = EdenCompressor(max_block_size=1024)
    assert c.to_config() == {"compressor": "eden", "options": {"max_block_size": 1024}}
    assert compressor_from_config(c.to_config()) == c
    for bad in (100, 32, 2**17, 0, 1.5, "4096"):
        with pytest.raises(ValueError, match="max_block_size"):
            EdenOptions(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown compressor 'eden' option"):
        compressor_from_config({"compressor": "eden", "options": {"bits": 1}})
    with pytest.raises(ValueError, match="levels"):
        c.compress(torch.randn(10), 0, generator=gen())
    with pytest.raises(ValueError, match="non-finite"):
        c.compress(torch.tensor([1.0, float("nan")]), 3, generator=gen())


def test_variance_bound_and_formula_bits() -> None:
    c = EdenCompressor()
    assert c.variance_bound(1000, None) == 0.0
    assert c.variance_bound(1000, 7) == pytest.approx(2.3, abs=1e-4)
    assert feedback_scale(c, 1000, 7) == pytest.approx(1 / 3.3, rel=1e-4)
    # 5210 = 4096 + a tail of 1114 padded to 2048: 96 groups of 64 at s = 1.
    assert c.formula_bits(5210, 1) == 96 * 7 + 2 * 32 + 64
    assert c.formula_bits(5210, None) == 32 * 5210


def test_full_precision_is_raw_float32() -> None:
    x = torch.randn(77)
    c = EdenCompressor()
    data = c.compress(x, None, generator=gen())
    assert peek_header(data).encoding == "raw"
    assert torch.equal(c.decompress(data, numel=77, levels=None), x)


def test_decompress_writes_into_out() -> None:
    x = torch.randn(5000, generator=gen())
    c = EdenCompressor(max_block_size=1024)
    data = c.compress(x, 15, generator=gen())
    out = torch.full((5000,), float("nan"))
    result = c.decompress(data, numel=5000, levels=15, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, c.decompress(data, numel=5000, levels=15))


def test_error_feedback_contracts_with_eden() -> None:
    # Both sides use C / (1 + w) with w = variance_bound. Since every message has
    # ||C(v) - v||^2 <= w ||v||^2 and <C(v) - v, v> = 0, each round
    # ||v - C(v) / (1 + w)||^2 <= q^2 ||v||^2 with q^2 = w / (1 + w), so the
    # residual never exceeds q max||update|| / (1 - q).
    from adaquantfl.fl.client import compress_update

    ef = ErrorFeedback(EdenCompressor(max_block_size=256))
    client = ClientCompressor(ef)
    levels = 1
    w = ef.inner.variance_bound(1000, levels)
    assert w is not None
    q = math.sqrt(w / (1 + w))
    largest = 0.0
    for r in range(40):
        update = torch.randn(1000, generator=gen(r))
        largest = max(largest, float(update.norm()))
        v = update + (client.residual if client.residual is not None else 0)
        compress_update(update, levels=levels, compressor=client, seed=0, round_idx=r, client_id=1)
        assert client.residual is not None
        e = float(client.residual.double().norm())
        assert e <= q * float(v.double().norm()) * (1 + 1e-6)
        assert e <= q * largest / (1 - q) * (1 + 1e-6)
    # Negative control: unscaled (as if omega were 0), the residual is the full error,
    # sqrt(8.5) ||v|| on average at s = 1: no contraction.
    payload = ef.inner.compress(v, levels, generator=gen())
    plain = ef.inner.decompress(payload, numel=1000, levels=levels)
    assert float((v - plain).norm()) > float(v.norm())


# ------------------------------------------------------------------ the engines


@pytest.mark.parametrize("method", ["adaquantfl", "auto"])
def test_policies_steer_eden_in_the_simulator(method: str) -> None:
    from adaquantfl.runner.build import build_simulator
    from adaquantfl.runner.config import load_config

    config = load_config(
        CONFIGS / "mnist1d-cnn.toml",
        [f"compression.method={method}", "compression.compressor=eden", "compression.levels=2",
         "train.rounds=6"],
    )  # fmt: skip
    sim = build_simulator(config)
    rows = [sim.run_round() for _ in range(6)]
    numel = sim.server.params.numel()
    for row in rows:
        assert row.levels is not None and row.participants == 10
        per_client = message_bytes(numel, row.levels, block_size_for(numel, row.levels))
        # Every message has the exact size of its rung (no raw blocks on these updates).
        assert row.wire_bits == 8 * per_client * row.participants
    assert all(math.isfinite(row.train_loss) for row in rows)  # type: ignore[arg-type]
    assert rows[-1].train_loss < rows[0].train_loss  # type: ignore[operator]


def test_flower_strategy_and_mod_carry_eden() -> None:
    import hashlib

    from adaquantfl.flower import AdaQuantFedAvg
    from adaquantfl.flower.messages import PAYLOAD_KEY
    from adaquantfl.runner.build import build_model, build_server, load_data
    from adaquantfl.runner.config import load_config
    from adaquantfl.runner.flower_engine import engine_client_app, flat_layout
    from tests.flower_helpers import InProcessGrid, simulate

    small = {
        "data": {"dataset": "digits", "num_clients": 3},
        "model": {"name": "logreg"},
        "train": {"rounds": 3, "local_steps": 3, "batch_size": 16, "lr": 0.1, "seed": 0,
                  "vectorize": False},
        "compression": {"method": "adaquantfl", "levels": 2, "compressor": "eden",
                        "options": {"max_block_size": 256}},
    }  # fmt: skip
    config = load_config(small)
    sim_outcomes, sim_params = simulate(config)
    data = load_data(config)
    model, params = build_model(config, data)
    template = build_server(config, params)
    assert isinstance(template.compressor, EdenCompressor)
    strategy = AdaQuantFedAvg(
        template.policy, template.compressor, seed=0,
        max_message_bytes=template.max_message_bytes, fraction_evaluate=0.0,
        min_train_nodes=3, min_available_nodes=3,
    )  # fmt: skip
    grid = InProcessGrid(engine_client_app(config), 3)
    strategy.start(grid, flat_layout(model).to_record(params), num_rounds=3, timeout=10)
    assert [r.digests for r in strategy.rounds] == [o.digests for o in sim_outcomes]
    assert torch.equal(strategy.server.params, sim_params)  # type: ignore[union-attr]
    for reply in grid.replies:
        payload = reply.content["arrays"][PAYLOAD_KEY].data
        assert peek_header(payload).encoding == "rotated"
        assert hashlib.sha256(payload).hexdigest()
