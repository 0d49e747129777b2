"""Tests of the compiled kernels: every code width, block and group edges, buffer bounds,
and the blocked float64 sums."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from adaquantfl.compression import _kernels as kernels
from adaquantfl.compression._kernels import BLOCK, PACK_SLACK, bitpack, measure
from tests.reference import reference_pack, reference_quantize

# Code widths w = 1 + bits(s): 2..8 (byte lanes), 9..16 (two-byte lanes), 17..25 (one by one).
LEVELS_BY_WIDTH = [(1 << (w - 1)) - 1 for w in range(2, 26)]
SIZES = [0, 1, 7, 8, 9, 63, 65, 1000, BLOCK - 1, BLOCK + 9]


def random_levels(
    numel: int, levels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:  # level indices and canonical signs
    rng = np.random.default_rng(seed)
    mags = rng.integers(0, levels + 1, size=numel, dtype=np.int32)
    mags[: min(numel, 3)] = [0, levels, levels][: min(numel, 3)]  # the extremes
    signs = rng.integers(0, 2, size=numel).astype(bool) & (mags > 0)
    return mags, signs


def packed_bytes(numel: int, levels: int) -> int:
    return -(-numel * (1 + levels.bit_length()) // 8)


@pytest.mark.parametrize("levels", LEVELS_BY_WIDTH, ids=lambda s: f"w{1 + s.bit_length()}")
def test_pack_matches_reference_and_stays_within_its_slack(levels: int) -> None:
    w = 1 + levels.bit_length()
    for numel in SIZES if w <= 16 else SIZES[:8]:
        mags, signs = random_levels(numel, levels, numel)
        size = packed_bytes(numel, levels)
        out = np.full(size + PACK_SLACK + 8, 0xA5, dtype=np.uint8)
        assert not kernels.pack_quantized(mags, signs, levels, w, out)
        if numel <= 1000:
            assert out[:size].tobytes() == reference_pack(mags.tolist(), signs.tolist(), levels)
        assert (out[size + PACK_SLACK :] == 0xA5).all()  # canary past the allowed slack


@pytest.mark.parametrize("use_pext", [False, True], ids=["shifts", "pext"])
@pytest.mark.parametrize("levels", LEVELS_BY_WIDTH[:15], ids=lambda s: f"w{1 + s.bit_length()}")
def test_both_compactions_give_the_reference_bytes(levels: int, use_pext: bool) -> None:
    # pack() takes one of the two at import (bitpack.FAST_PEXT); both are run
    # here, the pext one through the instruction or its bit-by-bit stand-in.
    w = 1 + levels.bit_length()
    dtype = np.uint8 if w <= 8 else np.uint16
    for numel in (8, 9, 64, 203):
        mags, signs = random_levels(numel, levels, 7 * numel + w)
        codes = np.zeros(-(-numel // 8) * 8, dtype)  # whole groups of 8
        codes[:numel] = (mags << 1) | signs
        size = packed_bytes(numel, levels)
        out = np.full(size + PACK_SLACK + 8, 0xA5, dtype=np.uint8)
        bitpack.pack_with(codes, numel, w, out, 0, use_pext)
        assert out[:size].tobytes() == reference_pack(mags.tolist(), signs.tolist(), levels)
        assert (out[size + PACK_SLACK :] == 0xA5).all()


@pytest.mark.parametrize("use_pdep", [False, True], ids=["shifts", "pdep"])
@pytest.mark.parametrize("levels", LEVELS_BY_WIDTH[:15], ids=lambda s: f"w{1 + s.bit_length()}")
def test_both_spreads_recover_the_codes(levels: int, use_pdep: bool) -> None:
    w = 1 + levels.bit_length()
    dtype = np.uint8 if w <= 8 else np.uint16
    for numel in (8, 9, 64, 203):
        mags, signs = random_levels(numel, levels, 5 * numel + w)
        body = np.frombuffer(reference_pack(mags.tolist(), signs.tolist(), levels), np.uint8)
        codes = np.zeros(-(-numel // 8) * 8, dtype)
        bitpack.unpack_with(body, 0, numel, w, codes, use_pdep)
        assert np.array_equal(codes[:numel], (mags << 1) | signs)


def test_software_pext_and_pdep_by_hand() -> None:
    # pext: the bits of the value under the mask, gathered at the bottom, lowest first.
    assert bitpack._pext_sw(np.uint64(0b1011_0110), np.uint64(0b1111_0000)) == 0b1011
    assert bitpack._pext_sw(np.uint64(0b1011_0110), np.uint64(0b0101_0101)) == 0b0110
    assert bitpack._pext_sw(np.uint64(2**64 - 1), np.uint64(0)) == 0
    top = np.uint64(1 << 63)
    assert bitpack._pext_sw(top, top) == 1
    # pdep: the low bits of the value scattered to the mask's bits.
    assert bitpack._pdep_sw(np.uint64(0b0110), np.uint64(0b0101_0101)) == 0b0001_0100
    assert bitpack._pdep_sw(np.uint64(1), top) == top


@numba.njit
def _selected_pext_pdep(values, masks, out):  # type: ignore[no-untyped-def]
    for i in range(values.size):
        out[i, 0] = bitpack._pext(values[i], masks[i])
        out[i, 1] = bitpack._pdep(values[i], masks[i])


def test_selected_pext_and_pdep_match_the_bitwise_definitions() -> None:
    # Where FAST_PEXT holds these are the CPU instructions, checked against the
    # bit-by-bit definitions; elsewhere they are those definitions themselves.
    rng = np.random.default_rng(11)
    values = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    masks = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    masks[:64] = [bitpack._lane_mask(w, 8 if w <= 8 else 16) for w in range(1, 17)] * 4
    out = np.empty((2000, 2), np.uint64)
    _selected_pext_pdep(values, masks, out)
    for (v, m), (px, pd) in zip(zip(values, masks, strict=True), out, strict=True):
        assert px == bitpack._pext_sw(v, m) and pd == bitpack._pdep_sw(v, m)


@pytest.mark.parametrize("levels", LEVELS_BY_WIDTH, ids=lambda s: f"w{1 + s.bit_length()}")
def test_unpack_inverts_pack_reading_only_the_body(levels: int) -> None:
    w = 1 + levels.bit_length()
    for numel in SIZES if w <= 16 else SIZES[:8]:
        mags, signs = random_levels(numel, levels, numel + 1)
        size = packed_bytes(numel, levels)
        out = np.zeros(size + PACK_SLACK, dtype=np.uint8)
        kernels.pack_quantized(mags, signs, levels, w, out)
        body = out[:size].copy()  # exactly the body: nothing to read past it
        got_mags = np.empty(numel, np.int32)
        got_signs = np.empty(numel, np.bool_)
        assert not kernels.decode_packed_to_codes(body, numel, levels, w, got_mags, got_signs)
        assert np.array_equal(got_mags, mags) and np.array_equal(got_signs, signs)
        steps = np.array([0.375], dtype=np.float32)
        y = np.empty(numel, np.float32)
        assert not kernels.decode_packed_into(body, numel, levels, w, steps, max(numel, 1), y)
        expected = mags.astype(np.float32) * np.float32(0.375)
        assert np.array_equal(y, np.where(signs, -expected, expected))


@pytest.mark.parametrize("levels", [1, 2, 255, 256, 70_000])
def test_decoders_flag_level_above_s_and_sign_on_zero(levels: int) -> None:
    w = 1 + levels.bit_length()
    numel = 20
    mags, signs = random_levels(numel, levels, 5)
    for bad_code in [(levels + 1) << 1, 1]:  # xi = s + 1; sign bit on xi = 0
        codes = (mags.astype(np.int64) << 1) | signs
        codes[13] = bad_code
        if bad_code >= 1 << w:
            continue  # s = 2^k - 1 has no room for s + 1
        stream = "".join(format(int(c), f"0{w}b")[::-1] for c in codes)
        stream += "0" * (-len(stream) % 8)
        body = np.array([int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)])
        body = body.astype(np.uint8)
        out_m, out_s = np.empty(numel, np.int32), np.empty(numel, np.bool_)
        assert kernels.decode_packed_to_codes(body, numel, levels, w, out_m, out_s)
        y = np.empty(numel, np.float32)
        steps = np.ones(1, np.float32)
        assert kernels.decode_packed_into(body, numel, levels, w, steps, numel, y)
    # Control: the valid body is not flagged.
    good = np.zeros(packed_bytes(numel, levels) + PACK_SLACK, np.uint8)
    kernels.pack_quantized(mags, signs, levels, w, good)
    out_m, out_s = np.empty(numel, np.int32), np.empty(numel, np.bool_)
    assert not kernels.decode_packed_to_codes(good, numel, levels, w, out_m, out_s)


def test_pack_quantized_flags_invalid_level_indices() -> None:
    out = np.zeros(64, np.uint8)
    ok = np.array([0, 1, 3], np.int32)
    assert not kernels.pack_quantized(ok, np.array([False, True, False]), 3, 3, out)
    assert kernels.pack_quantized(np.array([0, 4], np.int32), np.zeros(2, bool), 3, 3, out)
    assert kernels.pack_quantized(np.array([-1, 1], np.int32), np.zeros(2, bool), 3, 3, out)
    assert kernels.pack_quantized(np.array([0, 1], np.int32), np.array([True, False]), 3, 3, out)


@pytest.mark.parametrize("levels", [1, 3, 255, 40_000, 2**24 - 1])
@pytest.mark.parametrize("bucket", [1, 10, 64, 300])
def test_fused_encoder_equals_quantize_then_pack_and_the_reference(
    levels: int, bucket: int
) -> None:
    rng = np.random.default_rng(levels + bucket)
    x = (rng.standard_normal(300) * np.exp(3 * rng.standard_normal(300))).astype(np.float32)
    norms = np.empty(-(-300 // bucket), np.float32)
    kernels.norms_l2(x, bucket, norms)
    key = int(rng.integers(0, 2**63 - 1))
    mags = np.empty(300, np.int32)
    signs = np.empty(300, np.bool_)
    kernels.quantize_into(x, norms, bucket, levels, np.uint64(key), mags, signs)
    ref_mags, ref_signs = reference_quantize(x, levels, key, list(norms), bucket)
    assert mags.tolist() == ref_mags and signs.tolist() == ref_signs
    w = 1 + levels.bit_length()
    size = packed_bytes(300, levels)
    fused = np.zeros(size + PACK_SLACK, np.uint8)
    kernels.encode_packed(x, norms, bucket, levels, key, w, fused)
    assert fused[:size].tobytes() == reference_pack(ref_mags, ref_signs, levels)


def test_zero_norm_bucket_quantizes_to_zero() -> None:
    x = np.array([0, 0, 0, 1, -2, 0], np.float32)
    norms = np.empty(2, np.float32)
    kernels.norms_max(x, 3, norms)
    assert norms.tolist() == [0.0, 2.0]
    mags, signs = np.empty(6, np.int32), np.empty(6, np.bool_)
    kernels.quantize_into(x, norms, 3, 4, np.uint64(7), mags, signs)
    assert mags.tolist() == [0, 0, 0, 2, 4, 0]
    assert signs.tolist() == [False, False, False, False, True, False]


# --------------------------------------------------------------------------- blocked float64 sums


def blocked_sum(terms: list[float]) -> float:
    """The sum of ``_kernels.measure``'s docstring, term by term in Python floats."""
    total = carry = 0.0
    for start in range(0, len(terms), 4096):
        block = terms[start : start + 4096]
        lanes = [0.0] * 64
        for j, t in enumerate(block):
            lanes[j % 64] += t
        block_sum = 0.0
        for lane in lanes:
            block_sum += lane
        t = total + block_sum
        if abs(total) >= abs(block_sum):
            carry += (total - t) + block_sum
        else:
            carry += (block_sum - t) + total
        total = t
    return total + carry


@pytest.mark.parametrize("d", [0, 1, 63, 64, 65, 4095, 4096, 4097, 3 * 4096 + 5, 50_000])
def test_blocked_sums_follow_their_definition_and_stay_close_to_exact(d: int) -> None:
    rng = np.random.default_rng(d)
    x = (rng.standard_normal(d) * np.exp(4 * rng.standard_normal(d))).astype(np.float32)
    y = (x + rng.standard_normal(d).astype(np.float32) * 1e-2).astype(np.float32)
    squares = [float(v) * float(v) for v in x]
    errors = [(float(b) - float(a)) ** 2 for a, b in zip(x, y, strict=True)]
    assert measure.sum_squares(x) == blocked_sum(squares)
    assert measure.squared_error(x, y) == blocked_sum(errors)
    for ours, exact in ((measure.sum_squares(x), math.fsum(squares)),
                        (measure.squared_error(x, y), math.fsum(errors))):  # fmt: skip
        assert abs(ours - exact) <= 1e-14 * exact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_entry_anywhere(dtype: type, bad: float) -> None:
    x = np.random.default_rng(0).standard_normal(3 * 4096 + 70).astype(dtype)
    x[5] = np.finfo(dtype).max  # large but finite
    assert measure.all_finite(x)
    for where in (0, 63, 64, 4095, 4096, x.size - 70, x.size - 1):
        y = x.copy()
        y[where] = bad
        assert not measure.all_finite(y), where
    assert measure.all_finite(x[:0])
