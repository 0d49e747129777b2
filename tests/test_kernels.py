"""Tests of the compiled kernels: every code width, block and group edges, buffer bounds,
the ANS coder against constriction, and the blocked float64 sums."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from adaquantfl.compression import _kernels as kernels
from adaquantfl.compression._kernels import BLOCK, PACK_SLACK, ans, bitpack, measure
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


# --------------------------------------------------------------------------- the ANS coder


def constriction_words(
    mags: np.ndarray, signs: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The entropy body's words as constriction's own coder makes them, and the counts."""
    import constriction

    model = constriction.stream.model
    d = mags.size
    high = mags >> k
    counts = np.bincount(high, minlength=int(high.max()) + 1)
    m = counts.size - 1
    coder = constriction.stream.stack.AnsCoder()
    nonzero = mags != 0
    if nonzero.any():
        coder.encode_reverse(signs[nonzero].astype(np.int32), model.Uniform(2))
    if k:
        coder.encode_reverse((mags & ((1 << k) - 1)).astype(np.int32), model.Uniform(1 << k))
    if m:
        categorical = model.Categorical(counts.astype(np.float64), perfect=False)
        coder.encode_reverse(high.astype(np.int32), categorical)
        remaining = d - np.concatenate(([0], np.cumsum(counts[:-1])))
        for j in range(m - 1, -1, -1):
            value, bound = int(counts[j]), int(remaining[j])
            if bound == 0:
                continue
            if bound < 2**24 - 1:
                coder.encode_reverse(np.array([value], np.int32), model.Uniform(bound + 1))
                continue
            high_part, low_part = value >> 16, value & 0xFFFF
            low_size = 0x10000 if high_part < bound >> 16 else (bound & 0xFFFF) + 1
            if low_size > 1:
                coder.encode_reverse(np.array([low_part], np.int32), model.Uniform(low_size))
            coder.encode_reverse(np.array([high_part], np.int32), model.Uniform((bound >> 16) + 1))
    return coder.get_compressed().astype(np.uint32), counts.astype(np.int64)


def ans_case(d: int, levels: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level indices (geometric, some runs of zeros), signs and their codes."""
    rng = np.random.default_rng(seed)
    mags = (rng.geometric(rng.uniform(0.02, 0.9), size=d) - 1).clip(0, levels).astype(np.int32)
    if d > 10:
        mags[d // 3 : d // 2] = 0  # a run of zeros
        mags[-1] = levels  # the largest index, and a gap in the counts below it
    signs = (rng.random(d) < 0.5) & (mags > 0)
    codes = ((mags << 1) | signs).astype(kernels.code_dtype(1 + levels.bit_length()))
    return mags, signs, codes


def ans_encode(codes: np.ndarray, k: int, counts: np.ndarray, size: int) -> np.ndarray:
    cdf = ans.categorical_cdf(counts) if counts.size > 1 else np.zeros(2, np.uint64)
    out = np.zeros(size, np.uint32)
    count, _ = ans.encode(codes, k, counts, cdf, ans.ENCODE, out, np.zeros(0, np.uint32))
    assert count <= size
    return out[:count]


@pytest.mark.parametrize("levels", [1, 2, 7, 15, 255, 4000, 65535, 2**24 - 1])
@pytest.mark.parametrize("d", [1, 2, 63, 4097, 20_000])
def test_ans_coder_writes_constrictions_words_and_reads_them_back(d: int, levels: int) -> None:
    for seed in range(3):
        mags, signs, codes = ans_case(d, levels, seed + d)
        for k in sorted({0, 1, levels.bit_length() // 2, min(23, levels.bit_length())}):
            if int(mags.max()) >> k >= 4096:
                continue
            words, counts = constriction_words(mags, signs, k)
            ours = ans_encode(codes, k, counts, words.size + 8)
            assert np.array_equal(ours, words), (d, levels, seed, k)
            decoded = np.empty_like(codes)
            got_counts = np.empty_like(counts)
            status = ans.decode(words, d, k, counts.size - 1, levels, decoded, got_counts)
            assert status == 0 and np.array_equal(decoded, codes)
            assert np.array_equal(got_counts, counts)


def test_ans_counts_of_2_24_entries_and_more_take_the_split_form() -> None:
    # A count uniform on [0, R] with R >= 2**24 - 1 is sent as two parts; only
    # vectors of 2**24 entries and more reach it.
    d = 2**24 + 3
    mags = np.zeros(d, np.int32)
    mags[::7] = 1
    mags[::1000] = 2
    signs = (np.arange(d) % 3 == 0) & (mags > 0)
    codes = ((mags << 1) | signs).astype(np.uint8)
    words, counts = constriction_words(mags, signs, 0)
    assert np.array_equal(ans_encode(codes, 0, counts, words.size + 8), words)
    decoded, got = np.empty_like(codes), np.empty_like(counts)
    assert ans.decode(words, d, 0, 2, 2, decoded, got) == 0
    assert np.array_equal(decoded, codes) and np.array_equal(got, counts)


def test_ans_verify_compares_every_word_and_the_count() -> None:
    mags, signs, codes = ans_case(5000, 15, 1)
    words, counts = constriction_words(mags, signs, 0)
    cdf = ans.categorical_cdf(counts)
    none = np.zeros(0, np.uint32)

    def verify(reference: np.ndarray) -> tuple[int, bool]:
        count, same = ans.encode(codes, 0, counts, cdf, ans.VERIFY, none, reference)
        return int(count), bool(same)

    assert verify(words) == (words.size, True)
    for changed in (0, words.size // 2, words.size - 1):
        other = words.copy()
        other[changed] ^= 1 << 7
        assert verify(other) == (words.size, False)
    assert verify(words[:-1]) == (words.size, False)
    assert verify(np.append(words, np.uint32(1))) == (words.size, False)
    assert ans.encode(codes, 0, counts, cdf, ans.COUNT, none, none)[0] == words.size


def test_ans_decoder_names_what_is_wrong() -> None:
    mags, signs, codes = ans_case(3000, 7, 2)
    words, counts = constriction_words(mags, signs, 0)
    m = counts.size - 1
    out, got = np.empty_like(codes), np.empty_like(counts)
    assert ans.decode(words, 3000, 0, m, 7, out, got) == 0
    assert ans.decode(np.append(words, np.uint32(0)), 3000, 0, m, 7, out, got) == ans.MALFORMED
    # A word under the stack is left over when every symbol is read.
    assert ans.decode(np.insert(words, 0, 9), 3000, 0, m, 7, out, got) == ans.NOT_EMPTY
    # Another last word: another state, symbols that disagree with the counts.
    changed = words.copy()
    changed[-1] ^= 1 << 20
    assert ans.decode(changed, 3000, 0, m, 7, out, got) == ans.BAD_COUNTS
    # Counts that leave nothing for the largest high part.
    few, _ = constriction_words(np.array([1, 1, 0], np.int32), np.zeros(3, bool), 0)
    small = np.empty(3, np.uint8)
    assert ans.decode(few, 3, 0, 2, 7, small, np.empty(3, np.int64)) == ans.NO_ROOM
    # Low bits that take an index above the levels.
    top, top_signs, _ = ans_case(100, 6, 3)
    low_words, low_counts = constriction_words(np.append(top, 7).astype(np.int32),
                                               np.append(top_signs, False), 1)  # fmt: skip
    wide = np.empty(101, np.uint8)
    status = ans.decode(low_words, 101, 1, low_counts.size - 1, 6, wide, np.empty_like(low_counts))
    assert status == ans.LEVEL_TOO_LARGE


def test_ans_uniform_and_categorical_models_by_hand() -> None:
    # Uniform(n): p = 2**24 // n for all but the last symbol, which takes the rest.
    start, p = ans._uniform(2, 3)
    assert (int(start), int(p)) == (2 * (2**24 // 3), 2**24 - 2 * (2**24 // 3))
    # Categorical: floor(C_i * (2**24 - n) / total) + i, then 2**24.
    counts = np.array([5, 0, 3], np.int64)
    scale = (2**24 - 3) / 8
    expected = [0, int(5 * scale) + 1, int(5 * scale) + 2, 2**24]
    assert ans.categorical_cdf(counts).tolist() == expected


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


# --------------------------------------------------------------------------- measuring encoders


def dequantized(codes: np.ndarray, steps: np.ndarray, bucket: int) -> np.ndarray:
    """What the decoder returns for these codes: +-(xi * step), float32."""
    index = np.arange(codes.size) // bucket
    y = (codes >> 1).astype(np.float32) * steps[index]
    return np.where(codes & 1, -y, y).astype(np.float32)


@pytest.mark.parametrize("levels", [1, 15, 255, 70_000])
@pytest.mark.parametrize("bucket", [7, 512, 4096, 10_000])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_measuring_encoders_give_the_bytes_codes_and_sums_of_the_plain_ones(
    levels: int, bucket: int, scale: float
) -> None:
    d = 3 * 4096 + 123
    rng = np.random.default_rng(levels + bucket)
    x = (rng.standard_normal(d) * np.exp(rng.standard_normal(d))).astype(np.float32)
    x[:bucket] = 0  # a zero bucket
    norms = np.empty(-(-d // bucket), np.float32)
    kernels.norms_l2(x, bucket, norms)
    steps = (norms / np.float32(levels)).astype(np.float32)
    key, w = 12345, 1 + levels.bit_length()
    size = packed_bytes(d, levels)
    plain = np.zeros(size + PACK_SLACK, np.uint8)
    kernels.encode_packed(x, norms, bucket, levels, key, w, plain)
    mags, signs = np.empty(d, np.int32), np.empty(d, np.bool_)
    kernels.quantize_into(x, norms, bucket, levels, np.uint64(key), mags, signs)
    codes = ((mags << 1) | signs).astype(kernels.code_dtype(w))
    sent = (dequantized(codes, steps, bucket) * np.float32(scale)).astype(np.float32)
    expected = (measure.sum_squares(x), measure.squared_error(x, sent))
    # Packed, with the residual in a buffer of its own and in x's place.
    out = np.zeros(size + PACK_SLACK, np.uint8)
    residual = np.full(d, np.nan, np.float32)
    sums = kernels.encode_packed_measured(x, norms, steps, bucket, levels, key, w, out, scale,
                                          residual)  # fmt: skip
    assert out[:size].tobytes() == plain[:size].tobytes() and sums == expected
    assert np.array_equal(residual, x - sent)
    in_place = x.copy()
    sums = kernels.encode_packed_measured(in_place, norms, steps, bucket, levels, key, w, out,
                                          scale, in_place)  # fmt: skip
    assert sums == expected and np.array_equal(in_place, residual)
    # Codes (the entropy path), measuring or not.
    got = np.empty(d, codes.dtype)
    assert kernels.quantize_codes(x, norms, bucket, levels, key, got) == (0.0, 0.0)
    assert np.array_equal(got, codes)
    residual[:] = np.nan
    sums = kernels.quantize_codes(x, norms, bucket, levels, key, got, steps=steps, scale=scale,
                                  residual=residual)  # fmt: skip
    assert sums == expected and np.array_equal(residual, x - sent)
    decoded = np.empty(d, np.float32)
    kernels.dequantize_codes_into(codes, steps, bucket, decoded)
    assert np.array_equal(decoded, dequantized(codes, steps, bucket))
