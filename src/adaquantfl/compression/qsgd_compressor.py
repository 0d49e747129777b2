"""QSGD in wire format v1: the ``"qsgd"`` compressor (the paper's, and the default)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaquantfl.compression.codec import (
    CodecError,
    decode_dequantize,
    formula_bits,
    message_bytes,
    peek_header,
    quantize_encode,
    quantize_encode_measured,
)
from adaquantfl.compression.compressor import BaseCompressor, register_compressor
from adaquantfl.compression.qsgd import MAX_LEVELS, NORMS, num_buckets
from adaquantfl.validation import check_choice, check_int

__all__ = ["DEFAULT_BUCKET_SIZE", "MESSAGE_ENCODINGS", "QSGDCompressor", "QSGDOptions"]

#: Encodings of quantized messages a QSGD compressor can produce.
MESSAGE_ENCODINGS: tuple[str, ...] = ("packed", "entropy")
#: The default bucket: one norm per 512 entries (0.0625 bits per entry for the norms).
DEFAULT_BUCKET_SIZE = 512


@dataclass(frozen=True)
class QSGDOptions:
    """Options of :class:`QSGDCompressor`.

    Parameters
    ----------
    encoding : {"packed", "entropy"}
        How quantized messages are encoded. Full precision is always raw.
    bucket_size : int or None
        Entries per bucket (one norm each; default 512). None (or 0) quantizes
        the whole update as one vector, as in the paper.
    norm : {"max", "l2"}
        Norm each bucket is scaled by (default the max-norm; the paper's is l2).

    Notes
    -----
    The defaults bound the error at any size. QSGD's relative error
    ``E||Q(v) - v||^2 / ||v||^2`` is at most ``min(b / s^2, sqrt(b) / s)``
    for buckets of ``b`` entries (Alistarh et al. 2017, Lemma 3.1; with the
    max-norm each entry's step is no larger, so the bound holds too). With one
    bucket, ``b`` is the whole update: on a 124M-parameter update the error
    is 2,510 at s = 2 (measured, l2), so the update arrives as noise. With
    buckets of 512 it is at most ``22.6 / s`` whatever the model's size, and
    the max-norm, whose step follows the bucket's largest entry rather than
    its length, cuts it 10-30x below the l2 norm's on real updates (the same
    124M update: 0.53 at s = 2 and 0.010 at s = 15, against 7.6 and 0.37 with
    l2; ``python -m benchmarks.scale``). :meth:`QSGDCompressor.paper` is the
    paper's setting by name.
    """

    encoding: str = "packed"
    bucket_size: int | None = DEFAULT_BUCKET_SIZE
    norm: str = "max"

    def __post_init__(self) -> None:
        check_choice("encoding", self.encoding, MESSAGE_ENCODINGS)
        check_choice("norm", self.norm, NORMS)
        if self.bucket_size is not None:
            check_int("bucket_size (0 or None: the whole update)", self.bucket_size, 0, 2**32 - 1)
            if self.bucket_size == 0:  # the wire format's "one bucket"
                object.__setattr__(self, "bucket_size", None)


@register_compressor
class QSGDCompressor(BaseCompressor):
    """QSGD quantization (:mod:`adaquantfl.compression.qsgd`) in the v1 wire format.

    ``QSGDCompressor()`` (packed, max-norm buckets of 512),
    ``QSGDCompressor(encoding="entropy", bucket_size=128)``,
    ``QSGDCompressor.paper()`` (one l2 norm per update, as in the paper) or
    ``QSGDCompressor(options=QSGDOptions(...))``.

    Notes
    -----
    ``decompress`` checks the message's encoding, element count and levels
    against what the server asked for before decoding the body, so a client
    cannot make the server allocate more than the model's size, aggregate an
    update at a level it was not asked for, or run a decoder it did not choose.
    """

    name = "qsgd"
    options_type = QSGDOptions
    takes_levels = True

    def __init__(
        self,
        encoding: str = "packed",
        bucket_size: int | None = DEFAULT_BUCKET_SIZE,
        norm: str = "max",
        *,
        options: QSGDOptions | None = None,
    ) -> None:
        super().__init__(options or QSGDOptions(encoding, bucket_size, norm))

    @classmethod
    def paper(cls, encoding: str = "packed") -> QSGDCompressor:
        """The paper's QSGD: one l2 norm for the whole update (``bucket_size=None, norm="l2"``).

        Its error grows with the update's size (see :class:`QSGDOptions`): at
        10^8 parameters the update arrives as noise. The reproduction configs
        name it (``bucket_size = 0``, ``norm = "l2"``).
        """
        return cls(encoding, None, "l2")

    @property
    def encoding(self) -> str:
        return str(self.options.encoding)

    @property
    def bucket_size(self) -> int | None:
        return self.options.bucket_size  # type: ignore[no-any-return]

    @property
    def norm(self) -> str:
        return str(self.options.norm)

    def _compress(self, update: torch.Tensor, levels: int, *, generator: torch.Generator) -> bytes:
        """Quantize and encode ``update`` with the fused :func:`.codec.quantize_encode`.

        The bytes are those of ``encode(quantize(update, levels, ...), encoding)``.
        """
        return quantize_encode(
            update,
            levels,
            generator=generator,
            encoding=self.encoding,
            bucket_size=self.bucket_size,
            norm=self.norm,  # type: ignore[arg-type]
        )

    def compress_measured(
        self,
        update: torch.Tensor,
        levels: int | None,
        *,
        generator: torch.Generator,
        scale: float = 1.0,
        residual: torch.Tensor | None = None,
    ) -> tuple[bytes, float, float]:
        """Measure while encoding (:func:`.codec.quantize_encode_measured`): no decoding, no
        buffer of the update's size. Full precision goes the default way."""
        if levels is None:
            return super().compress_measured(
                update, None, generator=generator, scale=scale, residual=residual
            )
        return quantize_encode_measured(
            update,
            levels,
            generator=generator,
            encoding=self.encoding,
            bucket_size=self.bucket_size,
            norm=self.norm,  # type: ignore[arg-type]
            scale=scale,
            residual=residual,
        )

    def _decompress(
        self, payload: bytes, *, numel: int, levels: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Decode with the fused :func:`.codec.decode_dequantize` (into ``out`` when given)."""
        header = peek_header(payload)
        if header.encoding != self.encoding:
            raise CodecError(
                f"expected a {self.encoding} message at levels {levels}, got {header.encoding}"
            )
        if header.norm != self.norm or header.bucket_size != self.bucket_size:
            raise CodecError(
                f"expected norm {self.norm} and bucket size {self.bucket_size}, got "
                f"{header.norm} and {header.bucket_size}"
            )
        return decode_dequantize(payload, expected_numel=numel, expected_levels=levels, out=out)

    def _max_compressed_bytes(self, numel: int) -> int:
        """A packed message at the maximum levels (entropy bodies are at most 1 byte more,
        within :data:`.compressor.MESSAGE_SLACK_BYTES`)."""
        return message_bytes(numel, MAX_LEVELS, bucket_size=self.bucket_size)

    def variance_bound(self, numel: int, levels: int | None) -> float | None:
        """QSGD's ``min(b / s^2, sqrt(b) / s)`` for buckets of ``b`` entries (Alistarh et al.,
        2017, Lemma 3.1; with the max-norm each entry's step is no larger, so it holds too)."""
        if levels is None:
            return 0.0
        b = min(self.bucket_size or numel, numel)
        return min(b / levels**2, math.sqrt(b) / levels)

    def _compressed_formula_bits(self, numel: int, levels: int) -> int:
        """``d * ceil(log2(s + 1)) + d + 32 * buckets`` (level index, sign, norms)."""
        return formula_bits(numel, levels, num_norms=num_buckets(numel, self.bucket_size))
