"""Tests of wire format v1: golden bytes, exact sizes, round trips, and rejection of bad input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from adaquantfl.compression.codec import (
    CodecError,
    decode,
    decode_dense,
    decode_dequantize,
    encode,
    encode_dense,
    formula_bits,
    message_bytes,
    packed_body_bytes,
    peek_header,
    quantize_encode,
    varint_bytes,
)
from adaquantfl.compression.qsgd import MAX_LEVELS, Quantized, dequantize, quantize
from tests.golden.make_golden import golden_cases
from tests.reference import reference_message, reference_pack

GOLDEN = Path(__file__).parent / "golden"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def recrc(data: bytes | bytearray) -> bytes:
    """Replace the trailing CRC so that a deliberately malformed body reaches the body checks."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


# --------------------------------------------------------------------------- golden vectors


@pytest.mark.parametrize("name", sorted(golden_cases()))
def test_encoder_reproduces_checked_in_golden_bytes(name: str) -> None:
    assert golden_cases()[name] == (GOLDEN / name).read_bytes()


def test_every_checked_in_vector_is_one_the_encoder_reproduces() -> None:
    # A .bin file no case builds would be checked by nothing above.
    assert sorted(p.name for p in GOLDEN.glob("*.bin")) == sorted(golden_cases())


def test_golden_hand_vector_matches_field_by_field_reference() -> None:
    data = (GOLDEN / "packed_s3_hand.bin").read_bytes()
    mags, signs = [0, 1, 2, 3, 1], [False, True, False, True, False]
    body = reference_pack(mags, signs, 3)
    assert body == bytes([0x18, 0x2F])  # worked by hand in the codec docstring's layout
    assert data == reference_message(1, 5, 3, 0, [np.float32(2.5)], body)
    q = decode(data, expected_numel=5)
    assert q.magnitudes.tolist() == mags and q.signs.tolist() == signs
    assert q.norms.tolist() == [2.5] and q.levels == 3 and q.bucket_size is None


def test_golden_raw_vector_layout() -> None:
    data = (GOLDEN / "raw_3.bin").read_bytes()
    assert data == reference_message(0, 3, 0, 0, [], struct.pack("<3f", 1.0, -2.0, 0.5))
    assert decode_dense(data, expected_numel=3).tolist() == [1.0, -2.0, 0.5]


def test_golden_bucketed_max_norm_vector_layout() -> None:
    data = (GOLDEN / "packed_s1_bucket3_maxnorm.bin").read_bytes()
    q = decode(data, expected_numel=7)
    assert q.norm == "max" and q.bucket_size == 3 and q.norms.tolist() == [1.0, 0.5, 0.25]
    # The entries make_golden.py wrote, not merely what this file decodes to.
    assert q.magnitudes.tolist() == [1, 0, 1, 1, 1, 0, 1]
    assert q.signs.tolist() == [True, False, False, True, False, False, True]
    body = reference_pack(q.magnitudes.tolist(), q.signs.tolist(), 1)
    norms = [np.float32(v) for v in (1.0, 0.5, 0.25)]
    assert data == reference_message(1, 7, 1, 3, norms, body, flags=0x10)


def test_golden_seeded_vector_freezes_the_quantizer_stream() -> None:
    data = (GOLDEN / "packed_s2_linspace410_seed2026.bin").read_bytes()
    q = quantize(torch.linspace(-1.0, 1.0, 410), 2, generator=gen(2026))
    assert decode(data, expected_numel=410) == q


# --------------------------------------------------------------------------- round trips, sizes

SIZES = [0, 1, 7, 410, 1001]
LEVELS = [1, 2, 3, 4, 7, 8, 15, 16, 255, 65_536]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bucket_size", [None, 1, 64])
def test_packed_round_trip_and_exact_size(numel: int, levels: int, bucket_size: int | None) -> None:
    x = torch.randn(numel, generator=gen(numel + levels))
    q = quantize(x, levels, generator=gen(1), bucket_size=bucket_size)
    data = encode(q, "packed")
    assert decode(data, expected_numel=numel, expected_levels=levels) == q
    assert len(data) == message_bytes(numel, levels, bucket_size=bucket_size)
    # The closed form, spelled out: fixed 4 bytes, 4 varints, norms, body, CRC.
    nb = 1 if bucket_size is None or numel == 0 else -(-numel // bucket_size)
    body = -(-numel * (1 + levels.bit_length()) // 8)
    fields = [numel, levels, bucket_size or 0, body]
    assert len(data) == 4 + sum(varint_bytes(f) for f in fields) + 4 * nb + body + 4


@pytest.mark.parametrize("numel", SIZES)
def test_raw_round_trip_is_bit_exact_and_sized(numel: int) -> None:
    x = torch.randn(numel, generator=gen(numel)) * 1e30
    data = encode_dense(x)
    assert torch.equal(decode_dense(data, expected_numel=numel), x)
    assert (
        len(data)
        == message_bytes(numel, None)
        == 4 + sum(varint_bytes(f) for f in (numel, 0, 0, 4 * numel)) + 4 * numel + 4
    )


def test_max_norm_flag_round_trips() -> None:
    q = quantize(torch.randn(100, generator=gen()), 5, generator=gen(), norm="max", bucket_size=10)
    assert decode(encode(q), expected_numel=100) == q


def test_demo_sized_message_sizes() -> None:
    # d = 410 (MNIST-1D logistic regression): the s=1 message is 120 bytes = 960 bits,
    # of which 17 bytes are header, norm and CRC; the paper formula counts 852 bits.
    assert message_bytes(410, 1) == 120
    assert packed_body_bytes(410, 1) == 103
    assert formula_bits(410, 1) == 852
    assert formula_bits(410, None) == 32 * 410
    assert formula_bits(410, 7, num_norms=3) == 410 * 3 + 410 + 96


def test_varint_sizes() -> None:
    assert [varint_bytes(v) for v in (0, 127, 128, 16383, 16384, 2**32 - 1)] == [1, 1, 2, 2, 3, 5]


def test_peek_header_reports_fields() -> None:
    q = quantize(torch.randn(50, generator=gen()), 7, generator=gen(), bucket_size=20)
    h = peek_header(encode(q))
    assert (h.encoding, h.numel, h.levels, h.bucket_size, h.norm) == ("packed", 50, 7, 20, "l2")
    assert h.num_norms == 3


# --------------------------------------------------------------------------- rejection


def _sample_message() -> bytes:
    return encode(quantize(torch.randn(40, generator=gen(2)), 3, generator=gen(3)))


def test_every_truncation_is_rejected() -> None:
    data = _sample_message()
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut], expected_numel=40)


@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 3, b"x" * 100])
def test_extension_is_rejected(extra: bytes) -> None:
    with pytest.raises(CodecError, match="bytes"):
        decode(_sample_message() + extra, expected_numel=40)


def test_every_single_bit_flip_is_rejected() -> None:
    data = _sample_message()
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError):
            decode(bytes(flipped), expected_numel=40)


def test_wrong_expected_numel_and_levels_are_rejected() -> None:
    data = _sample_message()
    with pytest.raises(CodecError, match="numel 40; expected 41"):
        decode(data, expected_numel=41)
    with pytest.raises(CodecError, match="levels 3; expected 4"):
        decode(data, expected_numel=40, expected_levels=4)


def test_huge_claimed_size_is_rejected_before_allocating() -> None:
    head = b"AQ\x01\x01" + b"\xff\xff\xff\xff\x0f" + b"\x03\x00" + b"\xff\xff\xff\xff\x0f"
    with pytest.raises(CodecError, match=r"packed body length|numel"):
        decode(recrc(head + b"\x00" * 8), expected_numel=10)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b"XQ" + b[2:], "magic"),
        (lambda b: b[:2] + b"\x02" + b[3:], "version"),
        (lambda b: b[:3] + b"\x07" + b[4:], "encoding code"),
        (lambda b: b[:3] + b"\x41" + b[4:], "flag"),
    ],
)
def test_bad_header_fields_are_named(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CodecError, match=match):
        decode(recrc(mutate(_sample_message())), expected_numel=40)


def test_crc_mismatch_is_named() -> None:
    data = bytearray(_sample_message())
    data[-1] ^= 0x01
    with pytest.raises(CodecError, match="CRC32"):
        decode(bytes(data), expected_numel=40)


def _hand(mags: list[int], signs: list[bool], levels: int = 1, norm: float = 1.0) -> bytes:
    body = reference_pack(mags, signs, levels)
    return reference_message(1, len(mags), levels, 0, [np.float32(norm)], body)


def test_non_canonical_bodies_are_rejected() -> None:
    # Well-formed reference layout, but: sign bit on a zero level.
    with pytest.raises(CodecError, match="sign bit"):
        decode(_hand([0, 1], [True, False]), expected_numel=2)
    # Level index 3 fits the 2 index bits of s=2 but exceeds s.
    with pytest.raises(CodecError, match="exceeds levels"):
        decode(_hand([3, 1], [False, False], levels=2), expected_numel=2)
    # Padding bits after the last entry must be zero.
    data = bytearray(_hand([1, 1], [False, False]))
    pos = len(data) - 5  # last body byte
    data[pos] |= 0x80
    with pytest.raises(CodecError, match="padding"):
        decode(recrc(data), expected_numel=2)
    # Over-long varint (numel 2 written as 0x82 0x00).
    good = _hand([1, 1], [False, False])
    long_varint = good[:4] + b"\x82\x00" + good[5:-4]
    with pytest.raises(CodecError, match="minimally"):
        decode(recrc(long_varint + b"0000"), expected_numel=2)


@pytest.mark.parametrize("bad_norm", [float("nan"), float("inf"), -1.0])
def test_bad_norms_are_rejected(bad_norm: float) -> None:
    with pytest.raises(CodecError, match="norm"):
        decode(_hand([1, 0], [False, False], norm=bad_norm), expected_numel=2)


#: float32's largest value; also the smallest norm from which xi * (norm / s) reaches inf
#: at s = 25 (25 * (max / 25) rounds up past it).
F32_MAX = float(np.finfo(np.float32).max)
BELOW_MAX_NORM = float(np.nextafter(np.float32(2.0**127), np.float32(0)))


def _with_norm(data: bytes, norm: float) -> bytes:
    """A valid one-bucket message with its norm replaced (and its CRC recomputed)."""
    start = peek_header(data).header_bytes
    return recrc(data[:start] + struct.pack("<f", norm) + data[start + 4 :])


@pytest.mark.parametrize("encoding", ["packed", "entropy"])
@pytest.mark.parametrize(
    "norm", [2.0**127, 2.0**127 * 1.5, F32_MAX], ids=["2^127", "1.5*2^127", "f32max"]
)
def test_norms_the_encoder_never_produces_are_rejected(encoding: str, norm: float) -> None:
    # Prepare: s = 25 and xi = 25 everywhere, so that at float32's largest norm
    # the dequantized value 25 * (norm / 25) rounds up to inf.
    q = quantize(torch.ones(4), 25, generator=gen(), norm="max")
    assert q.magnitudes.tolist() == [25] * 4
    data = _with_norm(encode(q, encoding), norm)
    # Execute / Assert: both decoders name the problem before producing anything.
    for decoder in (decode, decode_dequantize):
        with pytest.raises(CodecError, match=r"norm .* encoder's range.*< 2\*\*127"):
            decoder(data, expected_numel=4)
    # The encoder refuses such a vector too, so decode accepts what encode makes.
    bad = Quantized(25, 4, None, "max", torch.tensor([norm]), q.magnitudes, q.signs)
    with pytest.raises(ValueError, match="norm"):
        encode(bad, encoding)


@pytest.mark.parametrize("encoding", ["packed", "entropy"])
def test_largest_norm_the_encoder_produces_decodes_finitely(encoding: str) -> None:
    # Control for the test above: the largest norm below 2**127 still decodes.
    q = quantize(torch.ones(4), 25, generator=gen(), norm="max")
    data = _with_norm(encode(q, encoding), BELOW_MAX_NORM)
    y = decode_dequantize(data, expected_numel=4)
    assert torch.isfinite(y).all()
    assert decode(data, expected_numel=4).norms.tolist() == [BELOW_MAX_NORM]
    # Negative control: the arithmetic the check guards against does overflow.
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(25) * (np.float32(F32_MAX) / np.float32(25)))


def test_raw_non_finite_is_rejected_and_kinds_cannot_be_mixed() -> None:
    bad = reference_message(0, 2, 0, 0, [], struct.pack("<2f", 1.0, float("nan")))
    with pytest.raises(CodecError, match="non-finite"):
        decode_dense(bad, expected_numel=2)
    with pytest.raises(CodecError, match="raw"):
        decode(encode_dense(torch.ones(3)), expected_numel=3)
    with pytest.raises(CodecError, match="decode for quantized"):
        decode_dense(_sample_message(), expected_numel=40)
    with pytest.raises(CodecError, match="raw message must have levels 0"):
        decode_dense(reference_message(0, 1, 2, 0, [], b"\x00" * 4), expected_numel=1)


def test_non_bytes_input_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="bytes"):
        decode("AQ", expected_numel=1)  # type: ignore[arg-type]


def test_encode_rejects_non_finite_dense_input_and_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode_dense(torch.tensor([1.0, float("inf")]))
    q = quantize(torch.ones(3), 1, generator=gen())
    with pytest.raises(ValueError, match="encoding"):
        encode(q, "zip")


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# --------------------------------------------------------------------------- fused fast paths


def _varied(numel: int, seed: int) -> torch.Tensor:
    # Entries over many magnitudes, so that every level index occurs.
    return torch.randn(numel, generator=gen(seed)) * torch.logspace(-3, 1, numel)


@pytest.mark.parametrize("encoding", ["packed", "entropy"])
@pytest.mark.parametrize("numel", [0, 1, 9, 410, 5000])
@pytest.mark.parametrize("levels", [1, 2, 3, 7, 15, 255, 4096, 70_000, MAX_LEVELS])
@pytest.mark.parametrize(
    ("bucket_size", "norm"), [(None, "l2"), (None, "max"), (7, "l2"), (64, "max")]
)
def test_fused_paths_equal_the_two_step_paths(
    encoding: str, numel: int, levels: int, bucket_size: int | None, norm: str
) -> None:
    x = _varied(numel, numel + levels)
    kwargs = {"bucket_size": bucket_size, "norm": norm}
    data = quantize_encode(x, levels, generator=gen(5), encoding=encoding, **kwargs)  # type: ignore[arg-type]
    q = quantize(x, levels, generator=gen(5), **kwargs)  # type: ignore[arg-type]
    assert data == encode(q, encoding)
    buf = torch.full((numel,), float("nan"))
    out = decode_dequantize(data, expected_numel=numel, expected_levels=levels, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out.view(torch.int32), dequantize(q).view(torch.int32))  # bitwise
    assert torch.equal(decode_dequantize(data, expected_numel=numel), dequantize(q))


def test_fused_encoder_takes_any_shape_and_float64_and_draws_one_value() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen())
    g1, g2 = gen(9), gen(9)
    assert quantize_encode(x, 7, generator=g1) == encode(quantize(x, 7, generator=g2))
    assert torch.equal(torch.rand(2, generator=g1), torch.rand(2, generator=g2))


def test_fused_encoder_rejects_what_quantize_rejects() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        quantize_encode(torch.tensor([1.0, float("nan")]), 2, generator=gen())
    with pytest.raises(ValueError, match="encoding"):
        quantize_encode(torch.ones(3), 2, generator=gen(), encoding="zip")
    with pytest.raises(ValueError, match="levels"):
        quantize_encode(torch.ones(3), 0, generator=gen())


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, np.frombuffer])
def test_decoders_accept_bytes_like_input(kind) -> None:  # type: ignore[no-untyped-def]
    data = _sample_message()
    q = decode(data, expected_numel=40)
    wrapped = kind(data) if kind is not np.frombuffer else np.frombuffer(data, np.uint8)
    assert decode(wrapped, expected_numel=40) == q
    assert torch.equal(decode_dequantize(wrapped, expected_numel=40), dequantize(q))


def test_decode_dequantize_rejects_what_decode_rejects() -> None:
    with pytest.raises(CodecError, match="sign bit"):
        decode_dequantize(_hand([0, 1], [True, False]), expected_numel=2)
    with pytest.raises(CodecError, match="exceeds levels"):
        decode_dequantize(_hand([3, 1], [False, False], levels=2), expected_numel=2)
    with pytest.raises(CodecError, match="levels 3; expected 4"):
        decode_dequantize(_sample_message(), expected_numel=40, expected_levels=4)
    with pytest.raises(CodecError, match="raw"):
        decode_dequantize(encode_dense(torch.ones(3)), expected_numel=3)
    with pytest.raises(CodecError, match="CRC32"):
        decode_dequantize(_sample_message()[:-1] + b"\x00", expected_numel=40)


def test_decode_dequantize_checks_the_out_buffer() -> None:
    data = _sample_message()
    for bad in (torch.empty(39), torch.empty(40, dtype=torch.float64), torch.empty(80)[::2]):
        with pytest.raises(ValueError, match="out"):
            decode_dequantize(data, expected_numel=40, out=bad)
    out = torch.empty(4, 10)  # any contiguous shape with the right size
    flat = decode_dequantize(data, expected_numel=40, out=out)
    assert flat.shape == (40,) and flat.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("encoding", ["packed", "entropy"])
def test_encode_rejects_an_invalid_quantized(encoding: str) -> None:
    def bad(mags: list[int], signs: list[bool]) -> Quantized:
        return Quantized(
            3,
            len(mags),
            None,
            "l2",
            torch.ones(1),
            torch.tensor(mags, dtype=torch.int32),
            torch.tensor(signs),
        )

    encode(bad([0, 3], [False, True]), encoding)  # control: valid
    for mags, signs in (
        ([0, 4], [False, False]),
        ([0, -1], [False, False]),
        ([0, 1], [True, False]),
    ):
        with pytest.raises(ValueError, match="level index"):
            encode(bad(mags, signs), encoding)


def test_crc_is_zlibs_crc32() -> None:
    from adaquantfl.compression.container import crc32

    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data) and crc32(b"") == 0
