"""Wire format v1: quantized and full-precision vectors to bytes and back.

A message is a fixed-order header, the per-bucket norms, a body and a CRC32::

    offset  size  field
    0       2     magic b"AQ"
    2       1     format version (1)
    3       1     low nibble: encoding (0 raw, 1 packed, 2 entropy, 3 sparse, 4 rotated);
                  high nibble: flags (bit 4: max-norm); other bits must be 0
    4       ...   four unsigned LEB128 varints (canonical, at most 5 bytes):
                  numel d, levels s (0 for raw; entries sent for sparse),
                  bucket size (0 = one bucket),
                  body length in bytes
    ...     4*nb  norms, float32 little-endian (none for raw and sparse; rotated: a
                  scale per block, the bucket size being the block size)
    ...     body  raw: d float32 LE; packed: see below; entropy: adaquantfl.compression.entropy;
                  sparse: adaquantfl.compression.topk; rotated: adaquantfl.compression.rotation
    -4      4     CRC32 (zlib) of every byte before it, little-endian

Packed body: entry ``i`` becomes the code ``(xi_i << 1) | sign_i`` of
``w = 1 + ceil(log2(s + 1))`` bits; codes are concatenated least significant
bit first (bit ``j`` of code ``i`` is stream bit ``i*w + j``; stream bit ``p`` is
bit ``p % 8`` of byte ``p // 8``); unused bits of the last byte are 0.

This module is the codec of every encoding: :func:`encode` / :func:`decode`
(a :class:`~.qsgd.Quantized` vector to bytes and back), :func:`encode_dense` /
:func:`decode_dense` (full precision, raw float32), the checks each encoding
makes of a header (:func:`peek_header`, :func:`checked_header`) and the exact
sizes of raw and packed messages (:func:`message_bytes`). The frame around the
body (header fields, norms, CRC) is read and written by :mod:`.container`.

The client side has a fused path, :func:`quantize_encode`, that quantizes and
packs in one pass straight into the message buffer, and the server side has
:func:`decode_dequantize`, which unpacks and dequantizes into a caller's
buffer. Both give exactly what ``encode(quantize(...))`` and
``dequantize(decode(...))`` give: they are the two layers' verbs in one pass,
which the QSGD compressor's ``compress`` and ``decompress`` use.
:func:`quantize_encode_measured` is :func:`quantize_encode` that also
measures, in the same pass, what the client reports of the message.

Notes
-----
Varints keep the header small: a 410-entry s=1 message costs 103 bytes of body
and 16 bytes of header, norm and CRC, where fixed 32-bit fields would cost 24.
Every field is validated against the actual length and the caller's
``expected_numel`` before anything of a claimed size is allocated, and there is
exactly one valid encoding of each vector in each encoding (canonical varints,
zero padding, no sign on zero, and an entropy body that must be the encoder's
own, see :mod:`adaquantfl.compression.entropy`), so a decoded message
re-encodes to the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from adaquantfl.compression.container import (
    ENCODINGS,
    FLAG_MAX_NORM,
    FORMAT_VERSION,
    MAGIC,
    U32_MAX,
    CodecError,
    Header,
    as_buffer,
    build_message,
    check_length,
    check_norms,
    frame_bytes,
    parse_header,
    read_norms,
    varint_bytes,
    verify_crc,
)
from adaquantfl.compression.measure import all_finite
from adaquantfl.compression.packed import (
    check_padding,
    code_width,
    pack_into,
    packed_body_bytes,
    packed_levels,
)
from adaquantfl.compression.qsgd import (
    MAX_LEVELS,
    NormName,
    Quantized,
    bits_per_level_index,
    bucket_span,
    bucket_steps,
    num_buckets,
    output_buffer,
    quantize_inputs,
)
from adaquantfl.validation import check_int

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "Header",
    "checked_header",
    "decode",
    "decode_dense",
    "decode_dequantize",
    "encode",
    "encode_dense",
    "formula_bits",
    "message_bytes",
    "packed_body_bytes",
    "packed_levels",
    "peek_header",
    "quantize_encode",
    "quantize_encode_measured",
    "varint_bytes",
]

_QUANTIZED_ENCODINGS = ("packed", "entropy")


# ---------------------------------------------------------------------- header checks and sizes


def message_bytes(
    numel: int, levels: int | None, *, bucket_size: int | None = None, encoding: str = "packed"
) -> int:
    """Exact size in bytes of a raw (``levels=None``) or packed message.

    ``4 + varints(d, s, b, body) + 4 * num_buckets + body + 4``. Entropy-coded
    messages depend on the data and have no closed form.
    """
    if levels is None or encoding == "raw":
        return frame_bytes((numel, 0, 0, 4 * numel), 0)
    if encoding == "packed":
        body = packed_body_bytes(numel, levels)
        return frame_bytes((numel, levels, bucket_size or 0, body), num_buckets(numel, bucket_size))
    raise ValueError(f"message_bytes has a closed form for 'raw' and 'packed', not {encoding!r}")


def formula_bits(numel: int, levels: int | None, *, num_norms: int = 1) -> int:
    """The paper-style bit count of one message, for comparison with the literature.

    ``d * ceil(log2(s + 1)) + d + 32 * num_norms`` (level index, sign, norm) for
    a quantized vector; ``32 * d`` for full precision (``levels=None``).
    """
    if levels is None:
        return 32 * numel
    return numel * bits_per_level_index(levels) + numel + 32 * num_norms


def peek_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and check a message's header against its own length; nothing else is read.

    Adds to :func:`.container.parse_header` what each encoding requires of the
    fields: raw has levels 0, bucket size 0, no flags and a body of ``4 d``
    bytes; quantized messages have levels in ``[1, MAX_LEVELS]``, and packed
    ones the packed body length.

    Raises
    ------
    CodecError
        If the header is malformed or disagrees with the message length.
    """
    buf = as_buffer(data)
    header = parse_header(buf)
    numel, levels, body_bytes = header.numel, header.levels, header.body_bytes
    if header.encoding == "raw":
        bucket = header.bucket_size or 0
        if levels != 0 or bucket != 0 or header.flags:
            raise CodecError(
                f"raw message must have levels 0, bucket size 0 and no flags; got levels "
                f"{levels}, bucket size {bucket}, flags 0x{header.flags:02x}"
            )
        if body_bytes != 4 * numel:
            raise CodecError(f"raw body length {body_bytes} != 4 * numel = {4 * numel}")
    elif header.encoding == "sparse":
        # levels holds the number k of entries sent; the body is k index
        # varints (1 to 5 bytes each) and k float32 values (see .topk).
        bucket = header.bucket_size or 0
        if bucket != 0 or header.flags:
            raise CodecError(
                f"sparse message must have bucket size 0 and no flags; got bucket size "
                f"{bucket}, flags 0x{header.flags:02x}"
            )
        if levels > numel:
            raise CodecError(f"sparse message sends {levels} entries of a vector of {numel}")
        if not 5 * levels <= body_bytes <= 9 * levels:
            raise CodecError(
                f"sparse body length {body_bytes} is outside [5k, 9k] for k = {levels} entries"
            )
    elif header.encoding == "rotated":
        # The rotated body (see .rotation): an 8-byte seed, 2 bits of mode per
        # block, then at most 8 code bits per entry of each block (a tail block
        # is padded to at most the block size) and 4 bytes per raw entry.
        block = header.bucket_size or 0
        if header.flags or not 64 <= block <= 65536 or block & (block - 1):
            raise CodecError(
                f"rotated message must have no flags and a block size that is a power of two "
                f"in [64, 65536]; got flags 0x{header.flags:02x}, block size {block}"
            )
        if not 1 <= levels <= MAX_LEVELS:
            raise CodecError(f"levels {levels} out of range [1, {MAX_LEVELS}]")
        blocks = num_buckets(numel, block)
        low = 8 + -(-blocks // 4)
        if not low <= body_bytes <= low + blocks * block + 4 * numel:
            raise CodecError(
                f"rotated body length {body_bytes} is outside [{low}, "
                f"{low + blocks * block + 4 * numel}] for numel {numel} in blocks of {block}"
            )
    else:
        if not 1 <= levels <= MAX_LEVELS:
            raise CodecError(f"levels {levels} out of range [1, {MAX_LEVELS}]")
        if header.encoding == "packed" and body_bytes != packed_body_bytes(numel, levels):
            raise CodecError(
                f"packed body length {body_bytes} != {packed_body_bytes(numel, levels)} "
                f"expected for numel {numel} and levels {levels}"
            )
    check_length(header, len(buf))
    return header


def checked_header(buf: memoryview, expected_numel: int) -> Header:
    """:func:`peek_header`, then the caller's element count and the CRC32."""
    check_int("expected_numel", expected_numel)
    header = peek_header(buf)
    if header.numel != expected_numel:
        raise CodecError(f"message has numel {header.numel}; expected {expected_numel}")
    verify_crc(buf)
    return header


# ----------------------------------------------------------------------- full precision (raw)


def encode_dense(x: torch.Tensor) -> bytes:
    """Encode a full-precision tensor (flattened, float32) as a raw v1 message."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"encode_dense needs a floating-point torch.Tensor, got {x!r:.80}")
    v = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if not all_finite(v):  # one pass; the count only for the message
        bad = int(v.size - np.count_nonzero(np.isfinite(v)))
        raise ValueError(f"cannot encode a tensor with {bad} non-finite entries (NaN or inf)")
    if v.size > U32_MAX // 4:
        raise ValueError(f"raw v1 messages carry at most {U32_MAX // 4} entries")

    def write(out: np.ndarray) -> None:
        out[: 4 * v.size] = v.astype("<f4", copy=False).view(np.uint8)

    empty = np.zeros(0, dtype=np.float32)
    return build_message(ENCODINGS["raw"], v.size, 0, 0, empty, 4 * v.size, write)


def decode_dense(data: bytes | bytearray | memoryview, *, expected_numel: int) -> torch.Tensor:
    """Decode a raw full-precision message to a flat float32 tensor.

    Raises
    ------
    CodecError
        As :func:`decode`, and if the message is not raw or holds non-finite values.
    """
    buf = as_buffer(data)
    header = checked_header(buf, expected_numel)
    if header.encoding != "raw":
        raise CodecError(f"message is {header.encoding}-encoded; use decode for quantized data")
    values = np.frombuffer(buf, dtype="<f4", count=header.numel, offset=header.header_bytes)
    if not all_finite(values):  # one pass; the count only for the message
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise CodecError(f"raw body holds {bad} non-finite values")
    return torch.from_numpy(values.astype(np.float32, copy=True))


# --------------------------------------------------------------------------- encode


def encode(q: Quantized, encoding: str = "packed") -> bytes:
    """Encode a quantized vector as a v1 message.

    Parameters
    ----------
    q : Quantized
    encoding : {"packed", "entropy"}

    Returns
    -------
    bytes

    Raises
    ------
    ValueError
        On an unknown encoding, more than 2**32 - 1 entries, or a ``q`` whose
        level indices are outside ``[0, levels]``, that has a sign on a zero level,
        or a norm outside the quantizer's range (NaN, infinite, negative or
        ``>= 2**127``).
    """
    _check_encoding(encoding)
    if q.numel > U32_MAX:
        raise ValueError(f"v1 messages carry at most {U32_MAX} entries, got {q.numel}")
    mags = np.ascontiguousarray(q.magnitudes.numpy())
    signs = np.ascontiguousarray(q.signs.numpy())
    norms = np.ascontiguousarray(q.norms.numpy())
    try:
        check_norms(norms)  # what decode rejects, encode must not produce
    except ValueError as exc:
        raise ValueError(f"cannot encode: {exc}") from None
    if encoding == "entropy":
        from adaquantfl.compression.entropy import codes_of

        codes = codes_of(mags, signs, q.levels)
        return _entropy_message(q.numel, q.levels, q.bucket_size, q.norm, norms, codes)

    return build_message(
        _code("packed", q.norm),
        q.numel,
        q.levels,
        q.bucket_size or 0,
        norms,
        packed_body_bytes(q.numel, q.levels),
        lambda out: pack_into(mags, signs, q.levels, out),
    )


def quantize_encode(
    x: torch.Tensor,
    levels: int,
    *,
    generator: torch.Generator,
    encoding: str = "packed",
    bucket_size: int | None = None,
    norm: NormName = "l2",
) -> bytes:
    """``encode(quantize(x, levels, ...), encoding)`` without the intermediate arrays.

    For ``"packed"`` the entries are quantized and packed in one pass straight
    into the message buffer; for ``"entropy"`` they are quantized into one
    level code per entry (1, 2 or 4 bytes) and entropy-coded from there. The
    bytes are identical to the two-step path (the same single draw is taken
    from ``generator``).

    Raises
    ------
    ValueError
        As :func:`adaquantfl.compression.qsgd.quantize` and :func:`encode`.
    """
    payload, _, _ = _quantize_encode(
        x, levels, generator, encoding, bucket_size, norm, measure=False, scale=1.0, residual=None
    )
    return payload


def quantize_encode_measured(
    x: torch.Tensor,
    levels: int,
    *,
    generator: torch.Generator,
    encoding: str = "packed",
    bucket_size: int | None = None,
    norm: NormName = "l2",
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> tuple[bytes, float, float]:
    """:func:`quantize_encode`, measuring in the same pass: ``(payload, ||x||^2, error^2)``.

    ``error^2 = ||scale * y - x||^2`` where ``y`` is what
    :func:`decode_dequantize` returns for the payload and ``scale * y`` is
    taken in float32 (as ``y.mul_(scale)``); both sums are float64, in the
    fixed order of :mod:`._kernels.measure`. ``residual``, if given (a flat
    contiguous float32 CPU tensor of ``x``'s size; ``x`` itself allowed),
    receives ``x - scale * y`` in float32. Nothing of ``x``'s size is
    allocated for the measurements.

    Raises
    ------
    ValueError
        As :func:`quantize_encode`, and for a ``residual`` of the wrong kind.
    """
    return _quantize_encode(
        x, levels, generator, encoding, bucket_size, norm, measure=True, scale=scale,
        residual=residual,
    )  # fmt: skip


def _quantize_encode(
    x: torch.Tensor,
    levels: int,
    generator: torch.Generator,
    encoding: str,
    bucket_size: int | None,
    norm: NormName,
    *,
    measure: bool,
    scale: float,
    residual: torch.Tensor | None,
) -> tuple[bytes, float, float]:
    from adaquantfl.compression import _kernels as kernels

    _check_encoding(encoding)
    v, key, norms = quantize_inputs(
        x, levels, generator=generator, bucket_size=bucket_size, norm=norm
    )
    d = v.size
    if d > U32_MAX:
        raise ValueError(f"v1 messages carry at most {U32_MAX} entries, got {d}")
    kept = None if residual is None else output_buffer(residual, d).detach().numpy()
    steps = bucket_steps(norms, levels) if measure else None
    span = bucket_span(d, bucket_size)
    w = code_width(levels)
    if encoding == "entropy":
        codes = np.empty(d, dtype=kernels.code_dtype(w))
        norm_sq, error_sq = kernels.quantize_codes(
            v, norms, span, int(levels), key, codes, steps=steps, scale=scale, residual=kept
        )
        message = _entropy_message(d, int(levels), bucket_size, norm, norms, codes)
        return message, norm_sq, error_sq
    sums: list[float] = [0.0, 0.0]

    def write(out: np.ndarray) -> None:
        if steps is None:
            kernels.encode_packed(v, norms, span, int(levels), key, w, out)
        else:
            sums[:] = kernels.encode_packed_measured(
                v, norms, steps, span, int(levels), key, w, out, scale, kept
            )

    message = build_message(
        _code("packed", norm),
        d,
        int(levels),
        bucket_size or 0,
        norms,
        packed_body_bytes(d, levels),
        write,
    )
    return message, sums[0], sums[1]


def _entropy_message(
    numel: int,
    levels: int,
    bucket_size: int | None,
    norm: str,
    norms: np.ndarray,
    codes: np.ndarray,
) -> bytes:
    from adaquantfl.compression.entropy import body_writer

    size, write = body_writer(codes, levels)
    code = _code("entropy", norm)
    return build_message(code, numel, levels, bucket_size or 0, norms, size, write)


def _code(encoding: str, norm: str) -> int:
    return ENCODINGS[encoding] | (FLAG_MAX_NORM if norm == "max" else 0)


def _check_encoding(encoding: str) -> None:
    if encoding not in _QUANTIZED_ENCODINGS:
        raise ValueError(
            f"encoding must be 'packed' or 'entropy' for a Quantized, got {encoding!r}"
        )


# --------------------------------------------------------------------------- decode


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expected_numel: int,
    expected_levels: int | None = None,
) -> Quantized:
    """Decode a packed or entropy-coded message; the exact inverse of :func:`encode`.

    Parameters
    ----------
    data : bytes-like
    expected_numel : int
        The number of entries the caller expects. A message claiming any other
        count is rejected before anything is allocated.
    expected_levels : int, optional
        If given, a message with other levels is rejected.

    Raises
    ------
    CodecError
        If any field is malformed, disagrees with the length or the caller's
        expectations, the CRC does not match, a norm is outside the encoder's
        range (finite, ``>= 0``, ``< 2**127``), or the body is not canonical.
    """
    buf, header, norms = _open(data, expected_numel, expected_levels)
    mags, signs = _level_indices(buf, header)
    return Quantized(
        levels=header.levels,
        numel=header.numel,
        bucket_size=header.bucket_size,
        norm=header.norm,  # type: ignore[arg-type]
        norms=torch.from_numpy(norms),
        magnitudes=torch.from_numpy(mags),
        signs=torch.from_numpy(signs),
    )


def decode_dequantize(
    data: bytes | bytearray | memoryview,
    *,
    expected_numel: int,
    expected_levels: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(decode(data, ...), out=out)`` in one pass for packed messages.

    Parameters
    ----------
    data : bytes-like
    expected_numel, expected_levels
        As :func:`decode`.
    out : torch.Tensor, optional
        A contiguous float32 CPU tensor of ``expected_numel`` entries to write
        into (allocating a fresh 40 MB tensor costs more than decoding it).

    Returns
    -------
    torch.Tensor
        ``out`` (flattened), or a new float32 tensor.

    Raises
    ------
    CodecError
        As :func:`decode`. Every header field, the CRC and the norms are
        checked before ``out`` is touched; an invalid code in the body is found
        while decoding, so ``out`` then holds partial results.
    ValueError
        If ``out`` has the wrong size, dtype or layout.
    """
    from adaquantfl.compression import _kernels as kernels

    buf, header, norms = _open(data, expected_numel, expected_levels)
    flat = output_buffer(out, header.numel)
    span = bucket_span(header.numel, header.bucket_size)
    steps = bucket_steps(norms, header.levels)
    if header.encoding == "entropy":
        from adaquantfl.compression.entropy import decode_codes

        start = header.body_offset
        codes = decode_codes(buf[start : start + header.body_bytes], header.numel, header.levels)
        kernels.dequantize_codes_into(codes, steps, span, flat.detach().numpy())
        return flat
    body = _packed_body(buf, header)
    w = code_width(header.levels)
    target = flat.detach().numpy()
    if kernels.decode_packed_into(body, header.numel, header.levels, w, steps, span, target):
        _level_indices(buf, header)  # raises the specific CodecError
    return flat


def _open(
    data: bytes | bytearray | memoryview, expected_numel: int, expected_levels: int | None
) -> tuple[memoryview, Header, np.ndarray]:
    """Check a quantized message's header, CRC and norms; return them with the buffer."""
    buf = as_buffer(data)
    header = checked_header(buf, expected_numel)
    if header.encoding == "raw":
        raise CodecError("message is raw full precision; use decode_dense")
    if header.encoding not in _QUANTIZED_ENCODINGS:
        raise CodecError(f"message is {header.encoding}-encoded, not a quantized vector")
    if expected_levels is not None and header.levels != expected_levels:
        raise CodecError(f"message has levels {header.levels}; expected {expected_levels}")
    return buf, header, read_norms(buf, header)


def _packed_body(buf: memoryview, header: Header) -> np.ndarray:
    """The packed body through the end of the message (the unpacker reads past the body)."""
    body = np.frombuffer(buf, dtype=np.uint8, offset=header.body_offset)
    check_padding(body, header.body_bytes, header.numel, header.levels)
    return body


def _level_indices(buf: memoryview, header: Header) -> tuple[np.ndarray, np.ndarray]:
    """Level indices (int32) and signs (bool) of a packed or entropy body, validated."""
    start = header.body_offset
    if header.encoding == "entropy":
        from adaquantfl.compression.entropy import decode_body

        return decode_body(buf[start : start + header.body_bytes], header.numel, header.levels)
    return packed_levels(buf[start:], header.numel, header.levels)
