"""Compiled (numba) kernels of the quantizer and the packed codec.

:mod:`.fused` quantizes, packs, unpacks and dequantizes in blocks;
:mod:`.bitpack` packs fixed-width codes into a byte stream; :mod:`.measure`
takes float64 sums of float32 vectors in one fixed order. All are compiled
lazily on first use and cached on disk.
"""

from adaquantfl.compression._kernels.bitpack import PACK_SLACK
from adaquantfl.compression._kernels.fused import (
    BLOCK,
    LANES,
    decode_packed_into,
    decode_packed_to_codes,
    dequantize_into,
    encode_packed,
    norms_l2,
    norms_max,
    pack_quantized,
    quantize_into,
)

__all__ = [
    "BLOCK",
    "LANES",
    "PACK_SLACK",
    "decode_packed_into",
    "decode_packed_to_codes",
    "dequantize_into",
    "encode_packed",
    "norms_l2",
    "norms_max",
    "pack_quantized",
    "quantize_into",
]
