"""Compressors: quantize + encode as one step on the client, decode + dequantize on the server.

A compressor turns a flat update into the bytes a client sends, and those
bytes back into a tensor. ``levels=None`` means full precision: the update is
sent as raw float32 in the same container, so every message, compressed or
not, is counted from the bytes that were actually produced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from adaquantfl.compression.codec import (
    CodecError,
    decode_dense,
    decode_dequantize,
    encode_dense,
    formula_bits,
    message_bytes,
    peek_header,
    quantize_encode,
)
from adaquantfl.compression.qsgd import MAX_LEVELS, NORMS, num_buckets

__all__ = [
    "COMPRESSORS",
    "MESSAGE_ENCODINGS",
    "Compressor",
    "QSGDCompressor",
    "default_message_limit",
    "make_compressor",
]

#: Encodings of quantized messages a compressor can produce.
MESSAGE_ENCODINGS: tuple[str, ...] = ("packed", "entropy")


@runtime_checkable
class Compressor(Protocol):
    """What clients and the server need from a compressor."""

    def compress(
        self, update: torch.Tensor, levels: int | None, *, generator: torch.Generator
    ) -> bytes: ...

    def decompress(
        self,
        payload: bytes,
        *,
        numel: int,
        levels: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def formula_bits(self, numel: int, levels: int | None) -> int: ...


@dataclass(frozen=True)
class QSGDCompressor:
    """QSGD quantization (:mod:`adaquantfl.compression.qsgd`) in the v1 wire format.

    Parameters
    ----------
    encoding : {"packed", "entropy"}
        How quantized messages are encoded. Full precision is always raw.
    bucket_size : int, optional
        Entries per bucket (one norm each); None quantizes the whole update as
        one vector, as in the paper.
    norm : {"l2", "max"}
        Norm each bucket is scaled by.

    Notes
    -----
    ``decompress`` checks the message's element count and levels against what
    the server asked for before decoding the body, so a client cannot make the
    server allocate more than the model's size or aggregate an update at a
    level it was not asked for.
    """

    encoding: str = "packed"
    bucket_size: int | None = None
    norm: str = "l2"

    def __post_init__(self) -> None:
        if self.encoding not in MESSAGE_ENCODINGS:
            raise ValueError(
                f"encoding must be one of {list(MESSAGE_ENCODINGS)}, got {self.encoding!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.bucket_size is not None and (
            isinstance(self.bucket_size, bool)
            or not isinstance(self.bucket_size, int)
            or self.bucket_size < 1
        ):
            raise ValueError(
                f"bucket_size must be a positive integer or None, got {self.bucket_size!r}"
            )

    def compress(
        self, update: torch.Tensor, levels: int | None, *, generator: torch.Generator
    ) -> bytes:
        """Quantize (unless ``levels`` is None) and encode ``update``.

        Uses the fused :func:`adaquantfl.compression.codec.quantize_encode`: the bytes are
        those of ``encode(quantize(update, levels, ...), encoding)``.
        """
        if levels is None:
            return encode_dense(update)
        return quantize_encode(
            update,
            levels,
            generator=generator,
            encoding=self.encoding,
            bucket_size=self.bucket_size,
            norm=self.norm,  # type: ignore[arg-type]
        )

    def decompress(
        self,
        payload: bytes,
        *,
        numel: int,
        levels: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode ``payload`` to a flat float32 tensor of ``numel`` entries.

        Quantized payloads go through the fused
        :func:`adaquantfl.compression.codec.decode_dequantize`, which writes into ``out``
        when given (the server passes one reusable buffer).

        Raises
        ------
        CodecError
            If the payload is malformed, or its size or levels differ from
            ``numel`` and ``levels``.
        """
        if levels is None:
            dense = decode_dense(payload, expected_numel=numel)
            if out is not None:
                out.copy_(dense)
                return out
            return dense
        header = peek_header(payload)
        if header.encoding == "raw":
            raise CodecError(f"expected a quantized message at levels {levels}, got raw float32")
        return decode_dequantize(payload, expected_numel=numel, expected_levels=levels, out=out)

    def formula_bits(self, numel: int, levels: int | None) -> int:
        """Paper-style bits of one message of ``numel`` entries at ``levels``."""
        return formula_bits(numel, levels, num_norms=num_buckets(numel, self.bucket_size))


#: Compressors by quantizer family; constructors take the config's
#: ``encoding``, ``bucket_size`` and ``norm``.
COMPRESSORS: dict[str, Callable[..., Compressor]] = {"qsgd": QSGDCompressor}


def make_compressor(kind: str = "qsgd", **kwargs: Any) -> Compressor:
    """Build a compressor of ``kind`` (a key of :data:`COMPRESSORS`)."""
    try:
        factory = COMPRESSORS[kind]
    except KeyError:
        raise ValueError(f"unknown compressor {kind!r}; allowed: {sorted(COMPRESSORS)}") from None
    return factory(**kwargs)


def default_message_limit(numel: int, bucket_size: int | None) -> int:
    """The largest payload a well-behaved client can send for a model of ``numel`` entries.

    The larger of a raw float32 message and a packed message at the maximum
    number of levels (which exceeds raw only with very small buckets), plus
    1 KiB for the entropy coder's model description. Anything bigger is
    rejected unread.
    """
    raw = message_bytes(numel, None)
    packed = message_bytes(numel, MAX_LEVELS, bucket_size=bucket_size)
    return max(raw, packed) + 1024
