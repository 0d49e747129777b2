"""The packed body of wire format v1: sign bit + level index per entry, bit-packed.

Entry ``i`` becomes the code ``(xi_i << 1) | sign_i`` of
``w = 1 + ceil(log2(s + 1))`` bits; codes are concatenated least significant
bit first (bit ``j`` of code ``i`` is stream bit ``i*w + j``; stream bit ``p``
is bit ``p % 8`` of byte ``p // 8``); unused bits of the last byte are 0.

There is exactly one packed body for each quantized vector: a level index
above ``s``, a sign on a zero level or a non-zero padding bit is rejected.
"""

from __future__ import annotations

import numpy as np

from adaquantfl.compression.container import CodecError
from adaquantfl.compression.qsgd import bits_per_level_index

__all__ = ["check_padding", "code_width", "pack_into", "packed_body_bytes", "packed_levels"]


def code_width(levels: int) -> int:
    """``w = 1 + ceil(log2(s + 1))``: bits per packed entry (sign + level index)."""
    return 1 + bits_per_level_index(levels)


def packed_body_bytes(numel: int, levels: int) -> int:
    """``ceil(d * (1 + ceil(log2(s + 1))) / 8)``: the packed body size."""
    return -(-numel * code_width(levels) // 8)


def pack_into(mags: np.ndarray, signs: np.ndarray, levels: int, out: np.ndarray) -> None:
    """Pack level indices and signs into ``out`` (with the kernels' slack after the body).

    Raises
    ------
    ValueError
        If a level index is outside ``[0, levels]`` or a zero level has its sign set.
    """
    from adaquantfl.compression import _kernels as kernels

    if kernels.pack_quantized(mags, signs, levels, code_width(levels), out):
        raise ValueError(
            f"cannot encode: a level index is outside [0, {levels}] or a zero level "
            "has its sign set"
        )


def check_padding(body: np.ndarray, body_bytes: int, numel: int, levels: int) -> None:
    """Reject non-zero bits after the last code (there is one packed form per vector)."""
    body.flags.writeable = False  # one compiled kernel variant for bytes and bytearray input
    used = numel * code_width(levels)
    if used % 8 and int(body[body_bytes - 1]) >> (used % 8):
        raise CodecError("packed body has non-zero padding bits after the last entry")


def packed_levels(
    body: memoryview | np.ndarray, numel: int, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Level indices (int32) and signs (bool) of a packed body, validated.

    ``body`` holds exactly the packed body or extends past it.

    Raises
    ------
    CodecError
        On non-zero padding, a level index above ``levels`` or a sign on a zero level.
    """
    from adaquantfl.compression import _kernels as kernels

    arr = np.frombuffer(body, dtype=np.uint8)
    check_padding(arr, packed_body_bytes(numel, levels), numel, levels)
    mags = np.empty(numel, dtype=np.int32)
    signs = np.empty(numel, dtype=np.bool_)
    if kernels.decode_packed_to_codes(arr, numel, levels, code_width(levels), mags, signs):
        if int(mags.max()) > levels:
            raise CodecError(f"a level index exceeds levels {levels}")
        raise CodecError("a sign bit is set on a zero level (non-canonical encoding)")
    return mags, signs
