"""The container of wire format v1: header, norms, CRC (the layout is in :mod:`.codec`).

This module reads and writes everything around a message's body: the fixed
header and its varints, the per-bucket norms and the trailing CRC32. It
checks only what holds for every encoding (magic, version, known encoding and
flags, canonical varints, total length, CRC); what a header field must be for
a given encoding is checked by :mod:`.codec`, and the bodies are read by
:mod:`.packed` and :mod:`.entropy`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

try:
    # The same CRC-32 as zlib's, computed with carry-less multiplication
    # (about 15x zlib 1.2.13's speed here: 0.2 ms instead of 2.6 ms for 11 MB,
    # which is a quarter of the time of encoding 10^7 entries at s=255).
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the standard library's, always there
    from zlib import crc32

from adaquantfl.compression.qsgd import MAX_NORM, NORMS, num_buckets

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "Header",
    "as_buffer",
    "build_message",
    "check_length",
    "check_norms",
    "crc32",
    "frame_bytes",
    "get_varint",
    "parse_header",
    "put_varint",
    "read_norms",
    "varint_bytes",
    "verify_crc",
]

MAGIC = b"AQ"
FORMAT_VERSION = 1
#: Encodings by name, with their code in the header.
ENCODINGS: dict[str, int] = {"raw": 0, "packed": 1, "entropy": 2, "sparse": 3, "rotated": 4}
_ENCODING_NAMES = {code: name for name, code in ENCODINGS.items()}
FLAG_MAX_NORM = 0x10
_KNOWN_FLAGS = FLAG_MAX_NORM
U32_MAX = 2**32 - 1
CRC_BYTES = 4
FIXED_BYTES = 4  # magic, version, encoding/flags
#: Spare bytes after a message buffer that body writers may scribble on.
_BODY_SLACK = 16


class CodecError(ValueError):
    """A message could not be decoded; the text says which field is wrong and why."""


@dataclass(frozen=True)
class Header:
    """The parsed header of a message (see :mod:`adaquantfl.compression.codec`)."""

    encoding: str
    numel: int
    levels: int  # 0 for raw
    bucket_size: int | None
    norm: str
    body_bytes: int
    header_bytes: int  # bytes before the norms
    flags: int = 0  # high nibble of byte 3

    @property
    def num_norms(self) -> int:
        if self.encoding in ("raw", "sparse"):
            return 0
        return num_buckets(self.numel, self.bucket_size)

    @property
    def body_offset(self) -> int:
        return self.header_bytes + 4 * self.num_norms

    @property
    def total_bytes(self) -> int:
        return self.body_offset + self.body_bytes + CRC_BYTES


def varint_bytes(value: int) -> int:
    """Length of the unsigned LEB128 encoding of ``value``."""
    return max(1, -(-int(value).bit_length() // 7))


def frame_bytes(fields: tuple[int, int, int, int], num_norms: int) -> int:
    """Total bytes of a message with header fields ``(d, s, b, body)`` and ``num_norms`` norms.

    ``4 + varints(d, s, b, body) + 4 * num_norms + body + 4``.
    """
    varints = sum(varint_bytes(f) for f in fields)
    return FIXED_BYTES + varints + 4 * num_norms + fields[3] + CRC_BYTES


# --------------------------------------------------------------------------- writing


def build_message(
    code: int,
    numel: int,
    levels: int,
    bucket: int,
    norms: np.ndarray,
    body_bytes: int,
    write_body: Callable[[np.ndarray], object],
) -> bytes:
    """Assemble a message in one buffer: header, norms, body, CRC.

    ``write_body`` receives the buffer from the body's first byte on (with
    :data:`_BODY_SLACK` spare bytes after the message) and must fill exactly
    ``body_bytes`` bytes. The result is copied out once, as ``bytes``.
    """
    head = bytearray(MAGIC)
    head.append(FORMAT_VERSION)
    head.append(code)
    for value in (numel, levels, bucket, body_bytes):
        put_varint(head, value)
    start = len(head) + 4 * norms.size
    total = start + body_bytes + CRC_BYTES
    buf = np.empty(total + _BODY_SLACK, dtype=np.uint8)
    buf[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    buf[len(head) : start] = np.ascontiguousarray(norms, dtype="<f4").view(np.uint8)
    write_body(buf[start:])
    crc = crc32(buf[: total - CRC_BYTES])
    buf[total - CRC_BYTES : total] = np.frombuffer(struct.pack("<I", crc), dtype=np.uint8)
    return buf[:total].tobytes()


def put_varint(out: bytearray, value: int) -> None:
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"header field {value} does not fit in 32 bits")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


# --------------------------------------------------------------------------- reading


def as_buffer(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of a message, without copying bytes-like input."""
    if isinstance(data, bytes | bytearray):
        return memoryview(data)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return memoryview(np.ascontiguousarray(data))
    if isinstance(data, memoryview):
        if data.c_contiguous and data.itemsize == 1:
            return data.cast("B")
        return memoryview(data.tobytes())
    raise CodecError(f"a message must be bytes, got {type(data).__name__}")


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse a message's header: magic, version, encoding, flags and four varints.

    Only what holds for every encoding is checked here (magic, version, a
    known encoding code and flags, canonical varints). :func:`.codec.peek_header`
    adds the checks of each encoding's fields and :func:`check_length`.

    Raises
    ------
    CodecError
        If the header is malformed or disagrees with the message length.
    """
    buf = as_buffer(data)
    minimum = FIXED_BYTES + 4 + CRC_BYTES
    if len(buf) < minimum:
        raise CodecError(f"message is {len(buf)} bytes; a v1 message has at least {minimum}")
    if buf[:2] != MAGIC:
        raise CodecError(f"bad magic {bytes(buf[:2])!r}; expected {MAGIC!r}")
    if buf[2] != FORMAT_VERSION:
        raise CodecError(
            f"unsupported format version {buf[2]}; this decoder reads {FORMAT_VERSION}"
        )
    code = buf[3]
    encoding = _ENCODING_NAMES.get(code & 0x0F)
    if encoding is None:
        raise CodecError(f"unknown encoding code {code & 0x0F}; known: {_ENCODING_NAMES}")
    flags = code & 0xF0
    if flags & ~_KNOWN_FLAGS:
        raise CodecError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x} in byte 3")
    pos = FIXED_BYTES
    fields = []
    for name in ("numel", "levels", "bucket size", "body length"):
        value, pos = get_varint(buf, pos, name)
        fields.append(value)
    numel, levels, bucket, body_bytes = fields
    return Header(
        encoding=encoding,
        numel=numel,
        levels=levels,
        bucket_size=bucket or None,
        norm=NORMS[1] if flags & FLAG_MAX_NORM else NORMS[0],
        body_bytes=body_bytes,
        header_bytes=pos,
        flags=flags,
    )


def check_length(header: Header, length: int) -> None:
    """Check that header, norms, body and CRC add up to the message's ``length``."""
    if header.total_bytes != length:
        raise CodecError(
            f"message is {length} bytes but its header describes {header.total_bytes} "
            f"(header {header.header_bytes} + norms {4 * header.num_norms} + body "
            f"{header.body_bytes} + CRC 4)"
        )


def verify_crc(buf: memoryview) -> None:
    """Check the trailing CRC32 of a whole message (its length already checked)."""
    stored = struct.unpack_from("<I", buf, len(buf) - CRC_BYTES)[0]
    actual = crc32(buf[: len(buf) - CRC_BYTES])
    if stored != actual:
        raise CodecError(
            f"CRC32 mismatch: message says 0x{stored:08x}, content gives 0x{actual:08x}"
        )


def read_norms(buf: memoryview, header: Header) -> np.ndarray:
    """The bucket norms of a quantized message (float32), checked against :func:`check_norms`."""
    norms = np.frombuffer(buf, dtype="<f4", count=header.num_norms, offset=header.header_bytes)
    norms = norms.astype(np.float32)
    try:
        check_norms(norms)
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    return norms


def check_norms(norms: np.ndarray) -> None:
    """Check that every bucket norm is in the encoder's range: finite, ``>= 0``, ``< 2**127``.

    The quantizer refuses vectors whose norm reaches :data:`.qsgd.MAX_NORM`
    (2**127), because ``xi * (norm / s)`` can round up to infinity above it
    (at float32's maximum and s = 25, for one). A message with such a norm was
    not made by an encoder, and decoding it could produce ``inf``.

    Raises
    ------
    ValueError
        Naming the first bucket whose norm is NaN, infinite, negative or ``>= 2**127``.
    """
    # One comparison covers NaN too (it compares False).
    ok = (norms >= 0) & (norms < MAX_NORM)
    if not ok.all():
        k = int(np.argmin(ok))
        value = float(norms[k])
        what = "not finite" if not np.isfinite(value) else "negative" if value < 0 else ">= 2**127"
        raise ValueError(
            f"bucket {k}'s norm {value!r} is {what}; the encoder's range is finite, "
            f">= 0 and < 2**127"
        )


def get_varint(buf: memoryview, pos: int, name: str) -> tuple[int, int]:
    value = 0
    for i in range(5):
        if pos >= len(buf):
            raise CodecError(f"header ends inside the {name} field")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and byte == 0:
                raise CodecError(f"{name} field is not minimally encoded")
            if value > U32_MAX:
                raise CodecError(f"{name} field exceeds 32 bits")
            return value, pos
    raise CodecError(f"{name} field is longer than 5 bytes")
