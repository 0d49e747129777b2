"""Top-k sparsification: the ``"topk"`` compressor, and the sparse body of wire format v1.

``C(v)`` keeps the ``k = ceil(fraction * d)`` entries of largest magnitude and
zeroes the rest (Stich, Cordonnier, Jaggi, "Sparsified SGD with memory",
NeurIPS 2018; Aji and Heafield 2017). It is *biased*: ``E[C(v)] != v``, and
without error feedback (:class:`.feedback.ErrorFeedback`) the discarded mass
is lost for good. Its rate is ``fraction``, not a number of levels
(``takes_levels = False``): a policy's levels only switch it between
compressed and full precision (None).

Sparse message (encoding 3; header field ``levels`` holds ``k``, bucket size
0, no norms)::

    body  k unsigned LEB128 varints: the first kept index, then each next
          index minus the previous one minus 1 (canonical, at most 5 bytes)
          k float32 little-endian values, in index order

Ties in magnitude go to the lower index, and zero entries are never sent (a
vector with fewer than ``k`` non-zero entries sends only those), so each
vector has exactly one message: the decoder rejects non-canonical varints,
indices at or past ``d``, values that are zero or not finite, and a body whose
varints and values do not fill it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from adaquantfl.compression.codec import CodecError, checked_header, peek_header
from adaquantfl.compression.compressor import BaseCompressor, register_compressor
from adaquantfl.compression.container import (
    ENCODINGS,
    U32_MAX,
    as_buffer,
    build_message,
    frame_bytes,
)
from adaquantfl.validation import check_real

__all__ = ["TopKCompressor", "TopKOptions", "decode_sparse", "encode_sparse", "top_k_indices"]

_MAX_VARINT = 5


@dataclass(frozen=True)
class TopKOptions:
    """Options of :class:`TopKCompressor`.

    Parameters
    ----------
    fraction : float
        Share of the entries kept, in ``(0, 1]``: ``k = ceil(fraction * d)``.
    """

    fraction: float = 0.01

    def __post_init__(self) -> None:
        check_real("fraction", self.fraction, 0.0, 1.0, low_open=True)

    def k(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel))) if numel else 0


def top_k_indices(v: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest ``|v_i|`` (ties to the lower index), zeros left out."""
    a = np.abs(v)
    if k >= a.size:
        chosen = np.arange(a.size)
    else:
        # The k-th largest magnitude; everything above it is in, and of the
        # entries equal to it the lowest indices fill the rest.
        kth = np.partition(a, a.size - k)[a.size - k]
        above = np.flatnonzero(a > kth)
        ties = np.flatnonzero(a == kth)[: k - above.size]
        chosen = np.sort(np.concatenate([above, ties]))
    kept: np.ndarray = chosen[a[chosen] > 0]
    return kept


def _varints(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 bytes of non-negative int64 ``values`` (each < 2**35), concatenated."""
    lengths = np.ones(values.size, dtype=np.int64)
    for j in range(1, _MAX_VARINT):
        lengths += values >= (1 << (7 * j))
    owner = np.repeat(np.arange(values.size), lengths)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    groups = (values[owner] >> (7 * pos)) & 0x7F
    last = pos == lengths[owner] - 1
    return (groups | np.where(last, 0, 0x80)).astype(np.uint8)


def encode_sparse(v: torch.Tensor, indices: np.ndarray) -> bytes:
    """The sparse message of ``v`` keeping ``indices`` (sorted, distinct, values non-zero)."""
    flat = v.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous().numpy()
    d = flat.size
    if d > U32_MAX:
        raise ValueError(f"v1 messages carry at most {U32_MAX} entries, got {d}")
    values = flat[indices]
    if not np.isfinite(values).all():
        raise ValueError("cannot encode a vector with non-finite entries")
    gaps = np.diff(indices.astype(np.int64), prepend=-1) - 1
    head = _varints(gaps)
    body = np.concatenate([head, values.astype("<f4").view(np.uint8)])

    def write(out: np.ndarray) -> None:
        out[: body.size] = body

    empty = np.zeros(0, dtype=np.float32)
    return build_message(ENCODINGS["sparse"], d, int(indices.size), 0, empty, body.size, write)


def decode_sparse(data: bytes | bytearray | memoryview, *, expected_numel: int) -> torch.Tensor:
    """The dense float32 vector of a sparse message (zeros where nothing was sent).

    Raises
    ------
    CodecError
        If the message is not a canonical sparse message of ``expected_numel`` entries.
    """
    buf = as_buffer(data)
    header = checked_header(buf, expected_numel)
    if header.encoding != "sparse":
        raise CodecError(f"expected a sparse message, got {header.encoding}")
    k, d = header.levels, header.numel
    body = np.frombuffer(buf, dtype=np.uint8, count=header.body_bytes, offset=header.body_offset)
    head = body[: body.size - 4 * k]
    ends = np.flatnonzero(head < 0x80)
    if ends.size != k or (k and ends[-1] != head.size - 1):
        raise CodecError(f"sparse body holds {ends.size} index varints; its header says {k}")
    starts = np.concatenate(([0], ends[:-1] + 1)) if k else ends
    lengths = ends - starts + 1
    if k and (lengths.max() > _MAX_VARINT or np.any((head[ends] == 0) & (lengths > 1))):
        raise CodecError("a sparse index varint is longer than 5 bytes or not minimally encoded")
    owner = np.repeat(np.arange(k), lengths)
    pos = np.arange(head.size) - np.repeat(starts, lengths)
    parts = (head.astype(np.int64) & 0x7F) << (7 * pos)
    gaps = np.bincount(owner, weights=parts, minlength=k).astype(np.int64) if k else parts
    indices = np.cumsum(gaps + 1) - 1
    if k and indices[-1] >= d:
        raise CodecError(f"a sparse index reaches {int(indices[-1])}; the vector has {d} entries")
    values = np.frombuffer(body, dtype="<f4", count=k, offset=head.size).astype(np.float32)
    if not np.isfinite(values).all() or np.any(values == 0):
        raise CodecError("a sparse value is zero or not finite (non-canonical or corrupt)")
    out = np.zeros(d, dtype=np.float32)
    out[indices] = values
    return torch.from_numpy(out)


@register_compressor
class TopKCompressor(BaseCompressor):
    """Top-k sparsification in the v1 sparse encoding (biased: use it with error feedback).

    ``TopKCompressor(fraction=0.01)`` or ``TopKCompressor(options=TopKOptions(...))``.
    """

    name = "topk"
    options_type = TopKOptions
    takes_levels = False

    def __init__(self, fraction: float = 0.01, *, options: TopKOptions | None = None) -> None:
        super().__init__(options or TopKOptions(fraction))

    def _compress(self, update: torch.Tensor, levels: int, *, generator: torch.Generator) -> bytes:
        """The sparse message of the ``k`` largest entries (deterministic; ``generator`` unused)."""
        flat = update.detach().reshape(-1).to(device="cpu", dtype=torch.float32).numpy()
        return encode_sparse(update, top_k_indices(flat, self.options.k(flat.size)))

    def _decompress(
        self, payload: bytes, *, numel: int, levels: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        # Encoding and k are checked from the header alone, before the CRC or the body.
        header = peek_header(payload)
        if header.encoding != "sparse":
            raise CodecError(f"expected a sparse message, got {header.encoding}")
        if header.levels > self.options.k(numel):
            raise CodecError(
                f"sparse message sends {header.levels} entries; k = {self.options.k(numel)}"
            )
        dense = decode_sparse(payload, expected_numel=numel)
        if out is None:
            return dense
        out.copy_(dense)
        return out

    def _max_compressed_bytes(self, numel: int) -> int:
        k = int(self.options.k(numel))
        return frame_bytes((numel, k, 0, 9 * k), 0)

    def _compressed_formula_bits(self, numel: int, levels: int) -> int:
        """``k (32 + ceil(log2 d))``: a float32 value and an index per kept entry."""
        k = int(self.options.k(numel))
        return k * (32 + max(1, math.ceil(math.log2(max(numel, 2)))))
