"""Property tests of wire format v1: exact round trips, and bad input never decodes.

Hypothesis generates valid messages (raw, packed and entropy; ``d`` from 0,
levels from 1 to ``MAX_LEVELS``, buckets, both norms, arbitrary level indices)
and mutations of them. Every mutated input goes through the oracle
:func:`tools.fuzz_codec.run_case`, shared with the standalone fuzzer
(``python -m tools.fuzz_codec``): ``decode``, ``decode_dense``,
``decode_dequantize`` (into an ``out`` buffer) and ``QSGDCompressor.decompress``
must each raise ``CodecError``, return the original bit for bit, or return a
different message of which the input is exactly a valid encoding; any other
exception (``BaseException`` included, which is what a Rust panic raises) or
a tracemalloc peak above ``64 * (expected_numel + len(data)) + 1 MiB`` fails.

Examples are deterministic (``derandomize=True``, no example database). No
test is timed: the decoders loop over at most the 4 header varints (5 bytes
each), the entropy body's 4095 counts and ``expected_numel`` symbols, so they
end by construction; the fuzzer watches wall time.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import constriction
import numpy as np
import pytest
import tools.fuzz_codec as fuzz
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from tools.fuzz_codec import (
    CONTAINERS,
    HUGE_VALUES,
    U32_MAX,
    Sample,
    alloc_bound_bytes,
    bitwise_equal,
    entropy_body,
    flip_bits,
    frame,
    leb128,
    make_sample,
    quantized_message,
    recrc,
    replace_field,
    run_case,
    same_quantized,
    values,
)

import adaquantfl.compression.codec as codec
import adaquantfl.compression.entropy as entropy
from adaquantfl.compression import QSGDCompressor
from adaquantfl.compression.codec import (
    CodecError,
    decode,
    decode_dense,
    decode_dequantize,
    encode,
    encode_dense,
    quantize_encode,
)
from adaquantfl.compression.qsgd import MAX_LEVELS, NORMS, dequantize, num_buckets, quantize

PROFILE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: zlib's CRC-32 over a message and its own little-endian CRC is always this.
CRC32_RESIDUE = 0x2144DF1C

NUMELS = st.one_of(st.sampled_from((0, 1, 2, 3, 7, 8, 9, 63, 64, 65)), st.integers(0, 600))
LEVELS = st.one_of(
    st.sampled_from((1, 2, 3, 4, 7, 8, 255, 256, 4095, 65_535, MAX_LEVELS)),
    st.integers(1, MAX_LEVELS),
)
BUCKETS = st.one_of(st.none(), st.integers(1, 80), st.just(U32_MAX))
SEEDS = st.integers(0, 2**16)


@st.composite
def quantized_samples(draw: Any, encodings: tuple[str, ...] = ("packed", "entropy")) -> Sample:
    """Valid packed or entropy messages, from the quantizer or of arbitrary level indices."""
    return make_sample(
        draw(st.sampled_from(encodings)),
        draw(NUMELS),
        draw(LEVELS),
        bucket_size=draw(BUCKETS),
        norm=draw(st.sampled_from(NORMS)),
        kind=draw(st.sampled_from(("gauss", "cubed", "sparse", "zeros", "indices"))),
        seed=draw(SEEDS),
    )


@st.composite
def raw_samples(draw: Any) -> Sample:
    kind = draw(st.sampled_from(("gauss", "cubed", "zeros", "special")))
    return make_sample("raw", draw(NUMELS), kind=kind, seed=draw(SEEDS))


SAMPLES = st.one_of(raw_samples(), quantized_samples())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- round trips


@settings(PROFILE, max_examples=300)
@given(sample=quantized_samples())
def test_quantized_messages_round_trip_exactly(sample: Sample) -> None:
    assert sample.quantized is not None
    n, levels = sample.numel, sample.levels
    q = decode(sample.data, expected_numel=n, expected_levels=levels)
    assert same_quantized(q, sample.quantized)
    assert encode(q, sample.encoding) == sample.data  # one encoding per vector
    out = torch.full((n,), math.nan)
    y = decode_dequantize(sample.data, expected_numel=n, expected_levels=levels, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert bitwise_equal(y, dequantize(sample.quantized))
    compressor = QSGDCompressor(encoding=sample.encoding, bucket_size=q.bucket_size, norm=q.norm)
    z = compressor.decompress(sample.data, numel=n, levels=levels)
    assert bitwise_equal(z, y)


@settings(PROFILE, max_examples=300)
@given(
    values_=arrays(
        np.float32,
        array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_raw_messages_round_trip_bit_exactly(values_: np.ndarray) -> None:
    x = torch.from_numpy(values_).reshape(-1)  # signed zeros, subnormals, extremes
    data = encode_dense(x)
    assert bitwise_equal(decode_dense(data, expected_numel=x.numel()), x)
    out = torch.full((x.numel(),), math.nan)
    QSGDCompressor().decompress(data, numel=x.numel(), levels=None, out=out)
    assert bitwise_equal(out, x)


@settings(PROFILE, max_examples=200)
@given(
    numel=NUMELS,
    levels=LEVELS,
    bucket_size=BUCKETS,
    norm=st.sampled_from(NORMS),
    encoding=st.sampled_from(("packed", "entropy")),
    kind=st.sampled_from(("gauss", "cubed", "sparse", "zeros")),
    seed=SEEDS,
)
def test_fused_paths_agree_with_the_two_step_paths(
    numel: int, levels: int, bucket_size: int | None, norm: str, encoding: str, kind: str, seed: int
) -> None:
    x = values(kind, numel, seed)
    kwargs: dict[str, Any] = {"bucket_size": bucket_size, "norm": norm}
    data = quantize_encode(x, levels, generator=gen(seed), encoding=encoding, **kwargs)
    q = quantize(x, levels, generator=gen(seed), **kwargs)
    assert data == encode(q, encoding)
    out = torch.full((numel,), math.nan)
    y = decode_dequantize(data, expected_numel=numel, expected_levels=levels, out=out)
    assert bitwise_equal(y, dequantize(decode(data, expected_numel=numel)))
    assert bitwise_equal(y, dequantize(q))


@settings(PROFILE, max_examples=200)
@given(sample=quantized_samples(encodings=("entropy",)))
def test_the_oracles_entropy_body_builder_matches_the_encoder(sample: Sample) -> None:
    # The oracle accepts an entropy body with a k the encoder would not pick
    # only if it equals entropy_body(..., k), so that builder must follow the
    # format exactly: check it against the encoder's own choice of k.
    assert sample.quantized is not None
    body = sample.data[sample.body_offset : len(sample.data) - 4]
    mags, signs = sample.quantized.magnitudes.numpy(), sample.quantized.signs.numpy()
    if body[:1] == b"\xff":  # the stored form: 0xFF, then the packed body
        packed = encode(sample.quantized, "packed")
        assert body[1:] == packed[len(packed) - 4 - (len(body) - 1) : len(packed) - 4]
    else:
        assert entropy_body(mags, signs, body[0] if body else 0) == body
        assert quantized_message(sample.quantized, "entropy", body) == sample.data


# --------------------------------------------------------------------------- mutations

MUTATIONS = (
    "truncate",
    "extend",
    "flip",
    "flip+crc",
    "overwrite+crc",
    "header-byte+crc",
    "field",
    "field+crc",
    "insert+crc",
    "delete+crc",
    "splice",
    "splice+crc",
    "reframe+crc",
    "entropy-body+crc",
    "random",
    "random-framed+crc",
    "norm+crc",
    "body-field+crc",
    "entropy-form+crc",
)

#: The fuzzer's structure-aware mutations, driven here by a drawn seed.
STRUCTURED: dict[str, Callable[[np.random.Generator, Sample], bytes]] = {
    "norm+crc": fuzz._mutate_norm,
    "body-field+crc": fuzz._mutate_body_field,
    "entropy-form+crc": fuzz._other_entropy_form,
}


def _norm_bytes(sample: Sample) -> tuple[int, bytes]:
    """The bucket size field and norms of a sample (one norm of 1.0 for raw)."""
    q = sample.quantized
    if q is None:
        return 0, struct.pack("<f", 1.0)
    return q.bucket_size or 0, q.norms.numpy().astype("<f4").tobytes()


@st.composite
def mutated_messages(draw: Any) -> tuple[Sample, str, bytes]:
    """A valid message, a mutation kind and the mutated bytes."""
    sample = draw(SAMPLES)
    data, n = sample.data, len(sample.data)
    kind = draw(st.sampled_from(MUTATIONS))
    flag = fuzz.FLAG_MAX_NORM if sample.quantized and sample.quantized.norm == "max" else 0
    if kind == "truncate":
        return sample, kind, data[: draw(st.integers(0, n - 1))]
    if kind == "extend":
        return sample, kind, data + draw(st.binary(min_size=1, max_size=64))
    if kind in ("flip", "flip+crc"):
        room = 8 * (n - 4) if kind == "flip+crc" else 8 * n
        bits = draw(st.lists(st.integers(0, room - 1), min_size=1, max_size=8, unique=True))
        flipped = flip_bits(data, bits)
        return sample, kind, recrc(flipped) if kind == "flip+crc" else flipped
    if kind in ("overwrite+crc", "header-byte+crc"):
        pos = draw(st.integers(0, 3 if kind == "header-byte+crc" else n - 5))
        mutated = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1 :]
        return sample, kind, recrc(mutated)
    if kind in ("field", "field+crc"):
        raw = draw(
            st.one_of(
                st.integers(0, U32_MAX).map(leb128),
                st.sampled_from(HUGE_VALUES).map(leb128),
                st.integers(U32_MAX + 1, 2**40).map(leb128),
                st.binary(max_size=7),
            )
        )
        mutated = replace_field(data, draw(st.integers(0, 3)), raw)
        return sample, kind, recrc(mutated) if kind == "field+crc" else mutated
    if kind == "insert+crc":
        pos = draw(st.integers(0, n - 4))
        return (
            sample,
            kind,
            recrc(data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]),
        )
    if kind == "delete+crc":
        pos = draw(st.integers(0, n - 5))
        return sample, kind, recrc(data[:pos] + data[pos + draw(st.integers(1, 16)) :])
    if kind in ("splice", "splice+crc"):
        other = draw(SAMPLES).data
        mutated = data[: draw(st.integers(0, n))] + other[draw(st.integers(0, len(other))) :]
        return sample, kind, recrc(mutated) if kind == "splice+crc" else mutated
    if kind == "reframe+crc":  # another message's body under this header
        donor = draw(quantized_samples())
        body = donor.data[donor.body_offset : len(donor.data) - 4]
        levels = draw(st.sampled_from((sample.levels or 1, donor.levels or 1)))
        bucket, norms = _norm_bytes(sample)
        code = fuzz.CODES[donor.encoding] | flag
        return sample, kind, frame(code, sample.numel, levels, bucket, norms, body)
    if kind == "entropy-body+crc":  # arbitrary k, m and coded words
        k = draw(st.integers(0, 25))
        m = draw(st.one_of(st.integers(0, 8), st.integers(0, 4097)))
        words = draw(st.lists(st.integers(0, U32_MAX), max_size=10))
        body = bytes([k]) + leb128(m) + np.array(words, dtype="<u4").tobytes()
        bucket, norms = _norm_bytes(sample)
        levels = sample.levels or draw(LEVELS)
        return sample, kind, frame(2 | flag, sample.numel, levels, bucket, norms, body)
    if kind in STRUCTURED:  # one field changed by the layout, CRC and body length recomputed
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return sample, kind, STRUCTURED[kind](rng, sample)
    if kind == "random":
        return sample, kind, draw(st.binary(max_size=300))
    # "random-framed+crc": a header that agrees with its length, random norms and body.
    code = draw(st.sampled_from((0, 1, 2, 0x10, 0x11, 0x12)))
    numel = draw(st.one_of(st.just(sample.numel), st.integers(0, 40)))
    levels = draw(st.one_of(st.just(0), LEVELS))
    bucket = draw(st.sampled_from((0, 1, 3, max(numel, 1))))
    nb = 0 if code & 0x0F == 0 else num_buckets(numel, bucket or None)
    norms = draw(st.binary(min_size=4 * nb, max_size=4 * nb))
    body_len = {0: 4 * numel, 1: -(-numel * (1 + levels.bit_length()) // 8)}.get(code & 0xF, 9)
    body = draw(st.binary(min_size=min(body_len, 2000), max_size=min(body_len, 2000)))
    return sample, kind, frame(code, numel, levels, bucket, norms, body)


def failures(calls: list[fuzz.Call]) -> list[fuzz.Call]:
    """The calls that broke the contract (wrong result, other exception, allocation)."""
    return [c for c in calls if not c.ok]


@pytest.mark.slow
@settings(PROFILE, max_examples=4000)
@given(case=mutated_messages(), container=st.sampled_from(CONTAINERS))
def test_every_mutation_is_rejected_or_decodes_exactly(
    case: tuple[Sample, str, bytes], container: str
) -> None:
    sample, kind, data = case
    calls = run_case(sample, data, measure_alloc=True, container=container)
    assert not failures(calls), f"{kind} of {sample.name} as {container}: {failures(calls)}"
    event(f"{kind}: {'/'.join(sorted({c.outcome for c in calls}))}")  # --hypothesis-show-statistics


@settings(PROFILE, max_examples=150)
@given(sample=quantized_samples())
def test_each_vector_has_one_valid_entropy_body(sample: Sample) -> None:
    # Every body the entropy layout allows for the vector (each legal k, the
    # stored form) is rejected, except the encoder's own, which re-encodes.
    q = sample.quantized
    assert q is not None
    canonical = encode(q, "entropy")
    mags, signs = q.magnitudes.numpy(), q.signs.numpy()
    packed = encode(q, "packed")
    bodies = [b"\xff" + fuzz.message_parts(packed)[3]] if q.numel else [b""]
    bodies += [entropy_body(mags, signs, k) for k in range(min(23, q.levels.bit_length()) + 1)]
    accepted = []
    for body in bodies:
        if body is None:
            continue
        data = quantized_message(q, "entropy", body)
        try:
            decoded = decode(data, expected_numel=q.numel)
        except CodecError as exc:
            assert "canonical" in str(exc) or data == canonical, str(exc)
            continue
        assert encode(decoded, "entropy") == data
        accepted.append(data)
    assert accepted == [canonical] * len(accepted) and accepted


# --------------------------------------------------------------------------- single-bit flips

FLIP_SAMPLES = [
    make_sample("raw", 0),
    make_sample("raw", 3, kind="special"),
    make_sample("packed", 0, 1),
    make_sample("packed", 5, 3),
    make_sample("packed", 7, 1, bucket_size=3, norm="max"),
    make_sample("packed", 3, MAX_LEVELS, kind="indices"),
    make_sample("entropy", 0, 7),
    make_sample("entropy", 5, 3),  # the stored form
    make_sample("entropy", 80, 7, kind="sparse", seed=1),  # ANS-coded
]


def test_flip_samples_cover_both_entropy_forms() -> None:
    bodies = [s.data[s.body_offset] for s in FLIP_SAMPLES if s.encoding == "entropy" and s.numel]
    assert 0xFF in bodies and any(b != 0xFF for b in bodies)


@pytest.mark.parametrize("sample", FLIP_SAMPLES, ids=lambda s: s.name)
def test_every_single_bit_flip_is_rejected(sample: Sample) -> None:
    data = sample.data
    assert zlib.crc32(data) == CRC32_RESIDUE  # a valid message ends in its own CRC
    stored = struct.unpack("<I", data[-4:])[0]
    for bit in range(8 * len(data)):
        flipped = flip_bits(data, [bit])
        # CRC-32 detects every 1-bit error: over the whole message the residue
        # changes, i.e. the content's CRC differs from the (possibly flipped) stored one.
        assert zlib.crc32(flipped) != CRC32_RESIDUE
        if bit < 8 * (len(data) - 4):
            assert zlib.crc32(flipped[:-4]) != stored
        else:
            assert struct.unpack("<I", flipped[-4:])[0] != zlib.crc32(data[:-4])
        calls = run_case(sample, flipped)
        assert all(c.outcome == "rejected" for c in calls), (bit, calls)


def test_without_the_crc_some_single_bit_flips_decode() -> None:
    # Negative control: with the CRC recomputed, body flips of a packed
    # message make other valid messages, so it is the CRC that rejects them above.
    sample = make_sample("packed", 5, 3)
    outcomes = [
        run_case(sample, recrc(flip_bits(sample.data, [bit])))[0].outcome
        for bit in range(8 * (len(sample.data) - 4))
    ]
    assert outcomes.count("decoded-other-valid") > 0
    assert set(outcomes) <= {"rejected", "decoded-other-valid"}


# --------------------------------------------------------------------------- allocation


def _peak_bytes(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """tracemalloc's peak during ``fn()`` above what was allocated before, and its exception."""
    started = not tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:
            error = exc
        return tracemalloc.get_traced_memory()[1] - base, error
    finally:
        if started:
            tracemalloc.stop()


def _split_counts_body(m: int) -> bytes:
    """Entropy counts coded against a bound of 2**32 - 1 (each could claim 4 billion)."""
    coder = constriction.stream.stack.AnsCoder()
    for value in range(m):
        fuzz._push_bounded(coder, U32_MAX - 7 * value, U32_MAX)
    return bytes([0]) + leb128(m) + coder.get_compressed().astype("<u4").tobytes()


def _big_entropy_body(numel: int) -> bytes:
    rng = np.random.default_rng(0)
    mags = (rng.random(numel) < 0.01).astype(np.int32) * 7
    body = entropy_body(mags, (rng.random(numel) < 0.5) & (mags > 0), 0)
    assert body is not None
    return body


NORM = struct.pack("<f", 1.0)
_VALID = make_sample("packed", 10, 3).data
#: Messages for expected_numel = 10 that claim far more: entries, bytes, symbols.
MALICIOUS = {
    "packed numel 2**32-1": frame(1, U32_MAX, 3, 0, NORM, b""),
    "packed numel 2**32-1, bucket 1": frame(1, U32_MAX, 1, 1, NORM, b"\x00" * 8),
    "raw numel 2**30-1": frame(0, 2**30 - 1, 0, 0, b"", b"\x00" * 16),
    "body length 2**32-1": recrc(replace_field(_VALID, 3, leb128(U32_MAX))),
    "entropy numel 2**32-1, all-zero body": frame(2, U32_MAX, 3, 0, NORM, b"\x00\x00"),
    "stored entropy numel 2**32-1": frame(2, U32_MAX, 3, 0, NORM, b"\xff" + b"\x00" * 40),
    "entropy body of 200,000 entries": frame(2, 10, 7, 0, NORM, _big_entropy_body(200_000)),
    "entropy counts coded against 2**32-1": frame(2, 10, 7, 0, NORM, _split_counts_body(6)),
    "entropy alphabet 4095, random words": frame(
        2, 10, MAX_LEVELS, 0, NORM, b"\x00" + leb128(4095) + b"\x01\x02\x03\x04" * 50
    ),
    "entropy alphabet 4096": frame(2, 10, MAX_LEVELS, 0, NORM, b"\x00" + leb128(4096) + NORM),
    "entropy k 23, huge coded data": frame(
        2, 10, MAX_LEVELS, 0, NORM, bytes([23, 0]) + NORM * 5000
    ),
}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
@pytest.mark.parametrize(
    "decoder",
    [
        lambda d: decode(d, expected_numel=10),
        lambda d: decode_dense(d, expected_numel=10),
        lambda d: decode_dequantize(d, expected_numel=10, out=torch.empty(10)),
        lambda d: QSGDCompressor().decompress(d, numel=10, levels=7),
    ],
    ids=["decode", "decode_dense", "decode_dequantize", "decompress"],
)
def test_huge_claims_are_rejected_without_allocating_for_them(
    name: str, decoder: Callable[[bytes], object]
) -> None:
    data = MALICIOUS[name]
    peak, error = _peak_bytes(lambda: decoder(data))
    assert isinstance(error, CodecError), repr(error)
    assert peak <= alloc_bound_bytes(10, len(data)), (peak, alloc_bound_bytes(10, len(data)))


def test_huge_claims_are_well_formed_apart_from_the_claim() -> None:
    # Controls: the CRCs are right (the claims, not the CRC, are what is rejected),
    # and the 200,000-entry body decodes when the caller allows that many entries.
    assert all(zlib.crc32(data) == CRC32_RESIDUE for data in MALICIOUS.values())
    body = _big_entropy_body(200_000)
    q = decode(frame(2, 200_000, 7, 0, NORM, body), expected_numel=200_000)
    assert int((q.magnitudes == 7).sum()) > 1000


def test_tracemalloc_sees_the_decoders_per_entry_arrays() -> None:
    # Negative control for the bound: decoding 200,000 entries allocates at
    # least their int32 level indices, so a decoder that allocated for a
    # claimed count would show up in the peaks measured above.
    data = frame(2, 200_000, 7, 0, NORM, _big_entropy_body(200_000))
    peak, error = _peak_bytes(lambda: decode(data, expected_numel=200_000))
    assert error is None and peak >= 4 * 200_000
    assert peak > alloc_bound_bytes(10, len(data))


# --------------------------------------------------------------------------- the checker can fail


def _raise_index_error(*args: object, **kwargs: object) -> Any:
    raise IndexError("index 7 is out of bounds")


def _raise_panic(*args: object, **kwargs: object) -> Any:
    constriction.stream.model.Uniform(1)  # a Rust assertion: pyo3 raises PanicException


def _allocate_then_reject(*args: object, **kwargs: object) -> Any:
    np.ones(50 * 2**20, dtype=np.uint8)
    raise CodecError("rejected, but only after allocating 50 MiB")


def test_the_checker_counts_a_second_form_of_a_vector_as_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the sample's vector as an entropy body with another k.
    sample = make_sample("entropy", 80, 7, kind="sparse", seed=1)
    assert sample.quantized is not None
    k = sample.data[sample.body_offset]
    mags, signs = sample.quantized.magnitudes.numpy(), sample.quantized.signs.numpy()
    body = entropy_body(mags, signs, (k + 1) % 4)
    assert body is not None
    data = quantized_message(sample.quantized, "entropy", body)
    assert all(c.outcome == "rejected" for c in run_case(sample, data))  # control
    # Execute: a decoder without the canonical check.
    monkeypatch.setattr(entropy, "_check_canonical", lambda *args, **kwargs: None)
    calls = {c.decoder: c for c in run_case(sample, data)}
    # Assert: it decodes the original vector, and the checker still fails it.
    quantized = ("decode", "decode_dequantize", "decompress")
    assert all(calls[name].outcome == "decoded-non-canonical" for name in quantized), calls
    assert failures(list(calls.values()))


def test_the_checker_counts_a_norm_the_encoder_refuses_as_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sample = make_sample("packed", 10, 3)
    data = fuzz.with_parts(sample.data, norms=struct.pack("<f", 2.0**127))
    assert all(c.outcome == "rejected" for c in run_case(sample, data))  # control

    def lax_norms(buf: memoryview, header: Any) -> np.ndarray:  # the check before 2**127
        return np.frombuffer(buf, "<f4", header.num_norms, header.header_bytes).copy()

    monkeypatch.setattr(codec, "read_norms", lax_norms)
    calls = {c.decoder: c for c in run_case(sample, data)}
    assert calls["decode"].outcome == "decoded-wrong"
    assert "norm" in calls["decode"].detail


@pytest.mark.parametrize(
    ("target", "replacement", "decoder", "outcome"),
    [
        (codec, ("_level_indices", _raise_index_error), "decode", "other-exception"),
        (entropy, ("decode_body", _raise_panic), "decode", "other-exception"),
        (entropy, ("decode_body", _allocate_then_reject), "decode", "rejected"),
        (fuzz, ("decode_dense", lambda d, **k: torch.ones(3)), "decode_dense", "decoded-wrong"),
        (
            fuzz,
            ("decode_dequantize", lambda d, *, expected_numel, out: out.zero_()),
            "decode_dequantize",
            "inconsistent",
        ),
    ],
    ids=["IndexError", "PanicException", "allocation", "wrong-value", "accepts-bad-input"],
)
def test_the_checker_catches_a_broken_decoder(
    monkeypatch: pytest.MonkeyPatch,
    target: object,
    replacement: tuple[str, Callable[..., Any]],
    decoder: str,
    outcome: str,
) -> None:
    entropy_sample = make_sample("entropy", 80, 7, kind="sparse", seed=1)
    raw_sample = make_sample("raw", 3)
    sample = raw_sample if decoder == "decode_dense" else entropy_sample
    data = sample.data if outcome != "inconsistent" else sample.data[:-1]
    assert not failures(run_case(sample, data, measure_alloc=True))  # control: sound decoders
    monkeypatch.setattr(target, *replacement)
    calls = {c.decoder: c for c in run_case(sample, data, measure_alloc=True)}
    assert calls[decoder].outcome == outcome
    assert not calls[decoder].ok and failures(list(calls.values()))
