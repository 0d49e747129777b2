"""Tests of the entropy encoding: layout, exact round trips, size against the entropy, hardening."""

from __future__ import annotations

import math
from pathlib import Path

import constriction
import numpy as np
import pytest
import torch
from tools.fuzz_codec import entropy_body

from adaquantfl.compression.codec import (
    CodecError,
    decode,
    decode_dequantize,
    encode,
    message_bytes,
    packed_body_bytes,
    peek_header,
    quantize_encode,
)
from adaquantfl.compression.entropy import MAX_ALPHABET, empirical_entropy_bits
from adaquantfl.compression.qsgd import MAX_LEVELS, Quantized, dequantize, quantize
from tests.reference import reference_message, reference_pack

GOLDEN = Path(__file__).parent / "golden"
Uniform = constriction.stream.model.Uniform
Categorical = constriction.stream.model.Categorical


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def body_of(data: bytes) -> bytes:
    h = peek_header(data)
    return data[h.body_offset : h.body_offset + h.body_bytes]


def frame_bytes(data: bytes) -> int:
    """Header, norms and CRC: everything but the body."""
    return len(data) - peek_header(data).body_bytes


def message(numel: int, levels: int, body: bytes) -> bytes:
    return reference_message(2, numel, levels, 0, [np.float32(1.0)], body)


def by_hand(q: Quantized, k: int) -> bytes:
    """The ANS body of ``q`` built step by step from the module docstring's layout."""
    mags = q.magnitudes.numpy()
    high, low = mags >> k, mags & ((1 << k) - 1)
    m = int(high.max())
    counts = np.bincount(high, minlength=m + 1)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(q.signs.numpy()[mags > 0].astype(np.int32), Uniform(2))  # 4. signs
    if k:
        coder.encode_reverse(low.astype(np.int32), Uniform(1 << k))  # 3. low bits
    coder.encode_reverse(high.astype(np.int32), Categorical(counts.astype(float), perfect=False))
    remaining = q.numel - np.concatenate(([0], np.cumsum(counts)))
    for j in reversed(range(m)):  # 1. counts, c_j uniform on [0, R_j]
        coder.encode_reverse(np.array([counts[j]], np.int32), Uniform(int(remaining[j]) + 1))
    assert m < 128  # one-byte varint below
    return bytes([k, m]) + coder.get_compressed().astype("<u4").tobytes()


# --------------------------------------------------------------------------- golden, layout


def test_golden_hand_vector_uses_the_packed_fallback() -> None:
    data = (GOLDEN / "entropy_s3_hand.bin").read_bytes()
    mags, signs = [0, 1, 2, 3, 1], [False, True, False, True, False]
    body = b"\xff" + reference_pack(mags, signs, 3)  # 0xFF, then the packed body 18 2F
    assert body == bytes([0xFF, 0x18, 0x2F])
    assert data == message(5, 3, body)[:8] + data[8:]  # same header fields
    assert data == reference_message(2, 5, 3, 0, [np.float32(2.5)], body)
    q = decode(data, expected_numel=5)
    assert q.magnitudes.tolist() == mags and q.signs.tolist() == signs
    assert len(data) == message_bytes(5, 3) + 1  # never more than one byte over packed


@pytest.mark.parametrize(
    ("name", "k"),
    [
        ("entropy_s2_linspace410_seed2026.bin", 0),
        ("entropy_s65535_bucket100_logspace300_seed7.bin", 11),
    ],
)
def test_golden_ans_bodies_match_a_step_by_step_encoding(name: str, k: int) -> None:
    data = (GOLDEN / name).read_bytes()
    h = peek_header(data)
    q = decode(data, expected_numel=h.numel)
    assert body_of(data)[0] == k
    assert body_of(data) == by_hand(q, k)
    packed = encode(q, "packed")
    assert len(data) < len(packed)


def test_seeded_golden_vector_freezes_the_entropy_coder() -> None:
    q = quantize(torch.linspace(-1.0, 1.0, 410), 2, generator=gen(2026))
    data = (GOLDEN / "entropy_s2_linspace410_seed2026.bin").read_bytes()
    assert encode(q, "entropy") == data
    assert decode(data, expected_numel=410) == q


@pytest.mark.parametrize(("levels", "bucket_size"), [(1, 512), (15, None), (255, 512), (65535, 16)])
def test_bodies_at_a_million_entries_are_constrictions_step_by_step_encoding(
    levels: int, bucket_size: int | None
) -> None:
    # The coder is numba code doing constriction's arithmetic; constriction
    # itself, driven by the layout, must produce the same bytes at scale.
    x = torch.randn(10**6, generator=gen(levels)) * torch.rand(10**6, generator=gen(1))
    q = quantize(x, levels, generator=gen(2), bucket_size=bucket_size)
    data = encode(q, "entropy")
    k = body_of(data)[0]
    assert k != 0xFF and m_of(data) < 128
    assert body_of(data) == by_hand(q, k)
    assert quantize_encode(x, levels, generator=gen(2), encoding="entropy",
                           bucket_size=bucket_size) == data  # fmt: skip
    assert decode(data, expected_numel=10**6, expected_levels=levels) == q
    out = torch.full((10**6,), float("nan"))
    decode_dequantize(data, expected_numel=10**6, out=out)
    assert torch.equal(out, dequantize(q))


def m_of(data: bytes) -> int:
    return body_of(data)[1]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("numel", [0, 1, 2, 17, 410, 3000])
@pytest.mark.parametrize("levels", [1, 2, 3, 8, 15, 255, 1000, 65535, MAX_LEVELS])
@pytest.mark.parametrize(("bucket_size", "norm"), [(None, "l2"), (None, "max"), (50, "l2")])
def test_round_trip_is_exact(numel: int, levels: int, bucket_size: int | None, norm: str) -> None:
    x = torch.randn(numel, generator=gen(numel)) ** 3
    q = quantize(x, levels, generator=gen(levels), bucket_size=bucket_size, norm=norm)  # type: ignore[arg-type]
    data = encode(q, "entropy")
    assert decode(data, expected_numel=numel, expected_levels=levels) == q
    assert len(data) <= message_bytes(numel, levels, bucket_size=bucket_size) + 1


@pytest.mark.parametrize("levels", [1, 7, MAX_LEVELS])
def test_all_zero_vector_costs_a_two_byte_body(levels: int) -> None:
    q = quantize(torch.zeros(10_000), levels, generator=gen())
    data = encode(q, "entropy")
    assert body_of(data) == b"\x00\x00"  # k = 0, m = 0, no coded data
    assert decode(data, expected_numel=10_000) == q


def test_random_level_indices_never_cost_more_than_packed_plus_one_byte() -> None:
    # Uniform indices are incompressible: the worst case for the model overhead.
    rng = np.random.default_rng(0)
    for numel in [1, 3, 8, 50, 400, 5000]:
        for levels in [1, 2, 5, 255, 4097, MAX_LEVELS]:
            mags = rng.integers(0, levels + 1, numel, dtype=np.int32)
            signs = rng.integers(0, 2, numel).astype(bool) & (mags > 0)
            q = Quantized(
                levels,
                numel,
                None,
                "l2",
                torch.ones(1),
                torch.from_numpy(mags),
                torch.from_numpy(signs),
            )
            data = encode(q, "entropy")
            assert len(data) <= message_bytes(numel, levels) + 1
            assert decode(data, expected_numel=numel) == q


# --------------------------------------------------------------------------- size


def _distribution(kind: str, numel: int) -> torch.Tensor:
    g = gen(11)
    if kind == "gauss":
        return torch.randn(numel, generator=g)
    if kind == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample((numel,))
    return torch.rand(numel, generator=g) - 0.5  # uniform


SIZE_CASES = [
    ("gauss", 1, "l2"),
    ("gauss", 3, "l2"),
    ("gauss", 15, "l2"),
    ("gauss", 255, "l2"),
    ("laplace", 1, "max"),
    ("laplace", 7, "max"),
    ("uniform", 3, "max"),
    ("gauss", 4095, "l2"),
]


@pytest.mark.parametrize(("kind", "levels", "norm"), SIZE_CASES)
def test_size_is_within_two_percent_of_the_empirical_entropy(
    kind: str, levels: int, norm: str
) -> None:
    torch.manual_seed(3)  # the Laplace sampler draws from the global generator
    q = quantize(_distribution(kind, 100_000), levels, generator=gen(1), norm=norm)  # type: ignore[arg-type]
    data = encode(q, "entropy")
    ideal_bits = empirical_entropy_bits(q.magnitudes.numpy())
    body_bits = 8 * (len(data) - frame_bytes(data))
    # Upper: within 2% of d H(p_hat) + nnz. Lower: no code beats it by more
    # than the model's description length, here a fraction of a percent.
    assert body_bits <= 1.02 * ideal_bits
    assert body_bits >= 0.995 * ideal_bits
    # Negative control: the packed body of the same vector fails the bound.
    assert 8 * packed_body_bytes(q.numel, levels) > 1.02 * ideal_bits


def test_empirical_entropy_by_hand() -> None:
    # Indices (0, 0, 1, 2): p = (1/2, 1/4, 1/4), H = 1.5 bits; 2 nonzero signs.
    assert empirical_entropy_bits(np.array([0, 0, 1, 2])) == pytest.approx(4 * 1.5 + 2)
    assert empirical_entropy_bits(np.zeros(7, np.int32)) == 0.0
    assert math.isclose(empirical_entropy_bits(np.array([1, 1])), 2.0)


# --------------------------------------------------------------------------- hardening


def _sample() -> tuple[bytes, Quantized]:
    q = quantize(torch.randn(300, generator=gen(4)), 7, generator=gen(5))
    return encode(q, "entropy"), q


def test_every_truncation_and_bit_flip_is_rejected() -> None:
    data, _ = _sample()
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut], expected_numel=300)
    for bit in range(0, 8 * len(data), 3):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError):
            decode(bytes(flipped), expected_numel=300)


def test_claimed_size_is_bounded_by_the_caller_before_decoding() -> None:
    body = b"\x00\x00"  # an all-zero vector of any length costs nothing
    with pytest.raises(CodecError, match="numel 4000000000; expected 1000"):
        decode(message(4_000_000_000, 3, body), expected_numel=1000)


def _with_body(body: bytes, numel: int = 300, levels: int = 7) -> bytes:
    return message(numel, levels, body)


def test_malformed_bodies_with_a_valid_crc_are_named() -> None:
    data, q = _sample()
    good = body_of(data)
    assert good[0] == 0 and decode(_with_body(good), expected_numel=300).magnitudes.equal(
        q.magnitudes
    )  # control: the re-framed body decodes
    cases = [
        (b"", "at least 2"),
        (bytes([4]) + good[1:], "low bits"),  # k above bits(7) = 3
        (bytes([0, 8]) + good[2:], "high-part maximum"),  # m above s
        (good + b"\x01", "whole number"),
        (good + b"\x01\x00\x00\x00", "continues|disagree"),
        (good + b"\x00\x00\x00\x00", "malformed"),
        (good[:2] + good[6:], "disagree|continues|counts"),
        (b"\xff" + b"\x00" * 10, "stored entropy body"),
        (b"\xff" + b"\x01" + b"\x00" * 149, "sign bit"),  # 300 codes of 4 bits
    ]
    for body, match in cases:
        with pytest.raises(CodecError, match=match):
            decode(_with_body(body), expected_numel=300)
    with pytest.raises(CodecError, match="empty vector"):
        decode(_with_body(b"\x00\x00", numel=0), expected_numel=0)


def test_high_alphabet_is_capped() -> None:
    varint = bytes([0x80 | (MAX_ALPHABET & 0x7F), MAX_ALPHABET >> 7])
    with pytest.raises(CodecError, match="high-part maximum"):
        decode(_with_body(b"\x00" + varint + b"\x01\x00\x00\x00", levels=10**6), expected_numel=300)


# --------------------------------------------------------------------------- one body per vector


def _alternatives(q: Quantized) -> dict[str, bytes]:
    """Every body the layout allows for ``q``: each legal k, and the stored form."""
    mags, signs = q.magnitudes.numpy(), q.signs.numpy()
    out = {"stored": b"\xff" + reference_pack(mags.tolist(), signs.tolist(), q.levels)}
    for k in range(min(23, q.levels.bit_length()) + 1):
        body = entropy_body(mags, signs, k)
        if body is not None:  # None: the high alphabet would exceed MAX_ALPHABET
            out[f"k={k}"] = body
    return out


def test_a_second_valid_looking_form_of_one_vector_is_rejected() -> None:
    # Both decode to 10 zeros at s = 7 (norm 0): the encoder's body 00 00
    # (k = 0, m = 0) and 01 00 (k = 1: ten zero low bits from an empty coder).
    canonical = bytes.fromhex("415101020a070002000000000000339804fe")
    other = bytes.fromhex("415101020a07000200000000010072a91fe7")
    q = decode(canonical, expected_numel=10)
    assert encode(q, "entropy") == canonical
    with pytest.raises(CodecError, match=r"sends k = 1 low bits; the encoder .* with k = 0"):
        decode(other, expected_numel=10)


QSGD_VECTORS = {
    "s7-gauss-300": (torch.randn(300, generator=gen(4)), 7, None),
    "s255-cubed-2000": (torch.randn(2000, generator=gen(5)) ** 3, 255, None),
    "s65535-cubed-500-bucket100": (torch.randn(500, generator=gen(6)) ** 3, 65535, 100),
    "s3-zeros-10": (torch.zeros(10), 3, None),
    "s15-gauss-3": (torch.randn(3, generator=gen(7)), 15, None),  # stored
    "s1-gauss-40": (torch.randn(40, generator=gen(8)), 1, None),
}


@pytest.mark.parametrize("name", sorted(QSGD_VECTORS))
def test_only_the_encoders_body_decodes(name: str) -> None:
    # Prepare: a vector and every body the layout allows for it.
    x, levels, bucket = QSGD_VECTORS[name]
    q = quantize(x, levels, generator=gen(1), bucket_size=bucket)
    data = encode(q, "entropy")
    canonical = body_of(data)
    bodies = _alternatives(q)
    assert canonical in bodies.values()  # control: the builders cover the encoder's choice
    assert len(bodies) >= 3
    # Execute: decode each form with both decoders.
    verdicts = {}
    for what, body in bodies.items():
        framed = reference_message(2, q.numel, levels, bucket or 0, list(q.norms.numpy()), body)
        for decoder in (decode, decode_dequantize):
            try:
                decoder(framed, expected_numel=q.numel)
                verdicts[what, decoder.__name__] = "decoded"
            except CodecError as exc:
                verdicts[what, decoder.__name__] = str(exc)
        if body == canonical:
            assert framed == data
            assert decode(framed, expected_numel=q.numel) == q
    # Assert: the encoder's body decodes; every other form is rejected, and says why.
    for (what, decoder_name), verdict in verdicts.items():
        if bodies[what] == canonical:
            assert verdict == "decoded", (what, decoder_name)
        else:
            assert "one canonical body per vector" in verdict, (what, decoder_name, verdict)


def test_a_stored_vector_sent_ans_coded_is_rejected() -> None:
    # The golden hand vector is stored (0xFF form); its ANS forms decode to it
    # but are longer than the stored one, which the encoder therefore picks.
    data = (GOLDEN / "entropy_s3_hand.bin").read_bytes()
    q = decode(data, expected_numel=5)
    coded = {w: b for w, b in _alternatives(q).items() if w != "stored"}
    assert coded
    for body in coded.values():
        with pytest.raises(CodecError, match="the encoder stores this vector"):
            decode(reference_message(2, 5, 3, 0, [np.float32(2.5)], body), expected_numel=5)


def test_random_bodies_raise_codec_error_or_decode_validly() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        k = int(rng.integers(0, 4))
        m = int(rng.integers(0, 8))
        words = rng.integers(0, 2**32, int(rng.integers(0, 6)), dtype=np.uint32)
        body = bytes([k, m]) + words.astype("<u4").tobytes()
        try:
            q = decode(_with_body(body, numel=50), expected_numel=50)
        except CodecError:
            continue
        assert encode(q, "entropy") == _with_body(body, numel=50)  # the canonical body
        assert int(q.magnitudes.max()) <= 7 and not bool((q.signs & (q.magnitudes == 0)).any())
