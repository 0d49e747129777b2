"""Header checks of wire format v1 per encoding, and exact message sizes.

:func:`.container.parse_header` reads what every message has; this module
adds what each encoding requires of the fields, the caller's element count and
the CRC (:func:`checked_header`), and the closed-form sizes of raw and packed
messages.
"""

from __future__ import annotations

from adaquantfl.compression.container import (
    CodecError,
    Header,
    as_buffer,
    check_length,
    frame_bytes,
    parse_header,
    verify_crc,
)
from adaquantfl.compression.packed import packed_body_bytes
from adaquantfl.compression.qsgd import MAX_LEVELS, bits_per_level_index, num_buckets
from adaquantfl.validation import check_int

__all__ = ["checked_header", "formula_bits", "message_bytes", "peek_header"]


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
