"""Wire format v1: quantized and full-precision vectors to bytes and back.

A message is a fixed-order header, the per-bucket norms, a body and a CRC32::

    offset  size  field
    0       2     magic b"AQ"
    2       1     format version (1)
    3       1     low nibble: encoding (0 raw, 1 packed, 2 entropy);
                  high nibble: flags (bit 4: max-norm); other bits must be 0
    4       ...   four unsigned LEB128 varints (canonical, at most 5 bytes):
                  numel d, levels s (0 for raw), bucket size (0 = one bucket),
                  body length in bytes
    ...     4*nb  norms, float32 little-endian (none for raw)
    ...     body  raw: d float32 LE; packed: see below; entropy: codec.entropy
    -4      4     CRC32 (zlib) of every byte before it, little-endian

Packed body: entry ``i`` becomes the code ``(xi_i << 1) | sign_i`` of
``w = 1 + ceil(log2(s + 1))`` bits; codes are concatenated least significant
bit first (bit ``j`` of code ``i`` is stream bit ``i*w + j``; stream bit ``p`` is
bit ``p % 8`` of byte ``p // 8``); unused bits of the last byte are 0.

Notes
-----
Varints keep the header small: a 410-entry s=1 message costs 103 bytes of body
and 16 bytes of header, norm and CRC, where fixed 32-bit fields would cost 24.
Every field is validated against the actual length and the caller's
``expected_numel`` before anything of a claimed size is allocated, and there is
exactly one valid encoding of each vector (canonical varints, zero padding,
no sign on zero), so a decoded message re-encodes to the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from adaquantfl.quantize import (
    MAX_LEVELS,
    NORMS,
    Quantized,
    bits_per_level_index,
    num_buckets,
)

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "CodecError",
    "Header",
    "decode",
    "decode_dense",
    "encode",
    "encode_dense",
    "formula_bits",
    "message_bytes",
    "packed_body_bytes",
    "peek_header",
    "varint_bytes",
]

MAGIC = b"AQ"
FORMAT_VERSION = 1
#: Encodings by name, with their code in the header.
ENCODINGS: dict[str, int] = {"raw": 0, "packed": 1, "entropy": 2}
_ENCODING_NAMES = {code: name for name, code in ENCODINGS.items()}
_FLAG_MAX_NORM = 0x10
_KNOWN_FLAGS = _FLAG_MAX_NORM
_U32_MAX = 2**32 - 1
_CRC_BYTES = 4
_FIXED_BYTES = 4  # magic, version, encoding/flags


class CodecError(ValueError):
    """A message could not be decoded; the text says which field is wrong and why."""


@dataclass(frozen=True)
class Header:
    """The parsed header of a message (see the module docstring)."""

    encoding: str
    numel: int
    levels: int  # 0 for raw
    bucket_size: int | None
    norm: str
    body_bytes: int
    header_bytes: int  # bytes before the norms

    @property
    def num_norms(self) -> int:
        return 0 if self.encoding == "raw" else num_buckets(self.numel, self.bucket_size)

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + 4 * self.num_norms + self.body_bytes + _CRC_BYTES


# --------------------------------------------------------------------------- sizes


def varint_bytes(value: int) -> int:
    """Length of the unsigned LEB128 encoding of ``value``."""
    return max(1, -(-int(value).bit_length() // 7))


def packed_body_bytes(numel: int, levels: int) -> int:
    """``ceil(d * (1 + ceil(log2(s + 1))) / 8)``: the packed body size."""
    return -(-numel * (1 + bits_per_level_index(levels)) // 8)


def message_bytes(
    numel: int, levels: int | None, *, bucket_size: int | None = None, encoding: str = "packed"
) -> int:
    """Exact size in bytes of a raw (``levels=None``) or packed message.

    ``4 + varints(d, s, b, body) + 4 * num_buckets + body + 4``. Entropy-coded
    messages depend on the data and have no closed form.
    """
    if levels is None or encoding == "raw":
        body = 4 * numel
        fields = (numel, 0, 0, body)
        norms = 0
    elif encoding == "packed":
        body = packed_body_bytes(numel, levels)
        fields = (numel, levels, bucket_size or 0, body)
        norms = 4 * num_buckets(numel, bucket_size)
    else:
        raise ValueError(
            f"message_bytes has a closed form for 'raw' and 'packed', not {encoding!r}"
        )
    return _FIXED_BYTES + sum(varint_bytes(f) for f in fields) + norms + body + _CRC_BYTES


def formula_bits(numel: int, levels: int | None, *, num_norms: int = 1) -> int:
    """The paper-style bit count of one message, for comparison with the literature.

    ``d * ceil(log2(s + 1)) + d + 32 * num_norms`` (level index, sign, norm) for
    a quantized vector; ``32 * d`` for full precision (``levels=None``).
    """
    if levels is None:
        return 32 * numel
    return numel * bits_per_level_index(levels) + numel + 32 * num_norms


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
    """
    if encoding == "packed":
        body = _pack(q)
    elif encoding == "entropy":
        from adaquantfl.entropy import encode_body

        body = encode_body(q)
    else:
        raise ValueError(
            f"encoding must be 'packed' or 'entropy' for a Quantized, got {encoding!r}"
        )
    if q.numel > _U32_MAX:
        raise ValueError(f"v1 messages carry at most {_U32_MAX} entries, got {q.numel}")
    flags = _FLAG_MAX_NORM if q.norm == "max" else 0
    norms = q.norms.numpy().astype("<f4", copy=False).tobytes()
    return _frame(ENCODINGS[encoding] | flags, q.numel, q.levels, q.bucket_size or 0, norms, body)


def encode_dense(x: torch.Tensor) -> bytes:
    """Encode a full-precision tensor (flattened, float32) as a raw v1 message."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"encode_dense needs a floating-point torch.Tensor, got {x!r:.80}")
    v = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    bad = int((~torch.isfinite(v)).sum())
    if bad:
        raise ValueError(f"cannot encode a tensor with {bad} non-finite entries (NaN or inf)")
    if v.numel() > _U32_MAX // 4:
        raise ValueError(f"raw v1 messages carry at most {_U32_MAX // 4} entries")
    body = v.numpy().astype("<f4", copy=False).tobytes()
    return _frame(ENCODINGS["raw"], v.numel(), 0, 0, b"", body)


def _frame(code: int, numel: int, levels: int, bucket: int, norms: bytes, body: bytes) -> bytes:
    out = bytearray(MAGIC)
    out.append(FORMAT_VERSION)
    out.append(code)
    for value in (numel, levels, bucket, len(body)):
        _put_varint(out, value)
    out += norms
    out += body
    out += struct.pack("<I", zlib.crc32(out))
    return bytes(out)


def _put_varint(out: bytearray, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"header field {value} does not fit in 32 bits")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _pack(q: Quantized) -> bytes:
    width = 1 + bits_per_level_index(q.levels)
    codes = (q.magnitudes.numpy().astype(np.uint32) << 1) | q.signs.numpy().astype(np.uint32)
    shifts = np.arange(width, dtype=np.uint32)
    bits = ((codes[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


# --------------------------------------------------------------------------- decode


def peek_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and check a message's header against its own length; nothing else is read.

    Raises
    ------
    CodecError
        If the header is malformed or disagrees with the message length.
    """
    buf = _as_bytes(data)
    minimum = _FIXED_BYTES + 4 + _CRC_BYTES
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
    pos = _FIXED_BYTES
    fields = []
    for name in ("numel", "levels", "bucket size", "body length"):
        value, pos = _get_varint(buf, pos, name)
        fields.append(value)
    numel, levels, bucket, body_bytes = fields
    norm = NORMS[1] if flags & _FLAG_MAX_NORM else NORMS[0]
    if encoding == "raw":
        if levels != 0 or bucket != 0 or flags:
            raise CodecError(
                f"raw message must have levels 0, bucket size 0 and no flags; got levels "
                f"{levels}, bucket size {bucket}, flags 0x{flags:02x}"
            )
        if body_bytes != 4 * numel:
            raise CodecError(f"raw body length {body_bytes} != 4 * numel = {4 * numel}")
    else:
        if not 1 <= levels <= MAX_LEVELS:
            raise CodecError(f"levels {levels} out of range [1, {MAX_LEVELS}]")
        if encoding == "packed" and body_bytes != packed_body_bytes(numel, levels):
            raise CodecError(
                f"packed body length {body_bytes} != {packed_body_bytes(numel, levels)} "
                f"expected for numel {numel} and levels {levels}"
            )
    header = Header(
        encoding=encoding,
        numel=numel,
        levels=levels,
        bucket_size=bucket or None,
        norm=norm,
        body_bytes=body_bytes,
        header_bytes=pos,
    )
    if header.total_bytes != len(buf):
        raise CodecError(
            f"message is {len(buf)} bytes but its header describes {header.total_bytes} "
            f"(header {pos} + norms {4 * header.num_norms} + body {body_bytes} + CRC 4)"
        )
    return header


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
        expectations, the CRC does not match, or the body is not canonical.
    """
    buf = _as_bytes(data)
    header = _checked_header(buf, expected_numel)
    if header.encoding == "raw":
        raise CodecError("message is raw full precision; use decode_dense")
    if expected_levels is not None and header.levels != expected_levels:
        raise CodecError(f"message has levels {header.levels}; expected {expected_levels}")
    nb = header.num_norms
    start = header.header_bytes
    norms_np = np.frombuffer(buf, dtype="<f4", count=nb, offset=start).astype(np.float32)
    if not np.all(np.isfinite(norms_np)) or np.any(norms_np < 0):
        raise CodecError("a bucket norm is negative or not finite")
    norms = torch.from_numpy(norms_np.copy())
    body = memoryview(buf)[start + 4 * nb : start + 4 * nb + header.body_bytes]
    if header.encoding == "packed":
        magnitudes, signs = _unpack(body, header.numel, header.levels)
    else:
        from adaquantfl.entropy import decode_body

        magnitudes, signs = decode_body(body, header.numel, header.levels)
    return Quantized(
        levels=header.levels,
        numel=header.numel,
        bucket_size=header.bucket_size,
        norm=header.norm,  # type: ignore[arg-type]
        norms=norms,
        magnitudes=magnitudes,
        signs=signs,
    )


def decode_dense(data: bytes | bytearray | memoryview, *, expected_numel: int) -> torch.Tensor:
    """Decode a raw full-precision message to a flat float32 tensor.

    Raises
    ------
    CodecError
        As :func:`decode`, and if the message is not raw or holds non-finite values.
    """
    buf = _as_bytes(data)
    header = _checked_header(buf, expected_numel)
    if header.encoding != "raw":
        raise CodecError(f"message is {header.encoding}-encoded; use decode for quantized data")
    values = np.frombuffer(buf, dtype="<f4", count=header.numel, offset=header.header_bytes)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise CodecError(f"raw body holds {bad} non-finite values")
    return torch.from_numpy(values.astype(np.float32, copy=True))


def _checked_header(buf: bytes, expected_numel: int) -> Header:
    if isinstance(expected_numel, bool) or not isinstance(expected_numel, int | np.integer):
        raise ValueError(f"expected_numel must be an integer, got {expected_numel!r}")
    header = peek_header(buf)
    if header.numel != expected_numel:
        raise CodecError(f"message has numel {header.numel}; expected {expected_numel}")
    stored = struct.unpack_from("<I", buf, len(buf) - _CRC_BYTES)[0]
    actual = zlib.crc32(memoryview(buf)[: len(buf) - _CRC_BYTES])
    if stored != actual:
        raise CodecError(
            f"CRC32 mismatch: message says 0x{stored:08x}, content gives 0x{actual:08x}"
        )
    return header


def _unpack(body: memoryview, numel: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = 1 + bits_per_level_index(levels)
    raw = np.frombuffer(body, dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")
    used = numel * width
    if bits[used:].any():
        raise CodecError("packed body has non-zero padding bits after the last entry")
    weights = np.left_shift(np.uint32(1), np.arange(width, dtype=np.uint32))
    codes = bits[:used].reshape(numel, width).astype(np.uint32) @ weights
    magnitudes = (codes >> 1).astype(np.int32)
    signs = (codes & 1).astype(bool)
    if numel and int(magnitudes.max()) > levels:
        raise CodecError(f"a level index exceeds levels {levels}")
    if bool((signs & (magnitudes == 0)).any()):
        raise CodecError("a sign bit is set on a zero level (non-canonical encoding)")
    return torch.from_numpy(magnitudes), torch.from_numpy(signs)


def _get_varint(buf: bytes, pos: int, name: str) -> tuple[int, int]:
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
            if value > _U32_MAX:
                raise CodecError(f"{name} field exceeds 32 bits")
            return value, pos
    raise CodecError(f"{name} field is longer than 5 bytes")


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return data.tobytes()
    raise CodecError(f"a message must be bytes, got {type(data).__name__}")
