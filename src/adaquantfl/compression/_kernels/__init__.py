"""Compiled (numba) kernels of the quantizer and the codecs.

:mod:`.fused` quantizes, packs, unpacks and dequantizes in blocks, and can
measure what it quantizes while it encodes; :mod:`.bitpack` packs
fixed-width codes into a byte stream; :mod:`.ans` is the entropy body's ANS
coder; :mod:`.measure` takes float64 sums of float32 vectors in one fixed
order. All are compiled lazily on first use and cached on disk.
"""

from adaquantfl.compression._kernels.bitpack import PACK_SLACK
from adaquantfl.compression._kernels.fused import (
    BLOCK,
    LANES,
    code_dtype,
    codes_from_levels,
    decode_packed_into,
    decode_packed_to_codes,
    dequantize_codes_into,
    dequantize_into,
    encode_packed,
    encode_packed_measured,
    levels_from_codes,
    max_level,
    norms_l2,
    norms_max,
    pack_codes,
    pack_quantized,
    quantize_codes,
    quantize_into,
    unpack_codes,
)

__all__ = [
    "BLOCK",
    "LANES",
    "PACK_SLACK",
    "code_dtype",
    "codes_from_levels",
    "decode_packed_into",
    "decode_packed_to_codes",
    "dequantize_codes_into",
    "dequantize_into",
    "encode_packed",
    "encode_packed_measured",
    "levels_from_codes",
    "max_level",
    "norms_l2",
    "norms_max",
    "pack_codes",
    "pack_quantized",
    "quantize_codes",
    "quantize_into",
    "unpack_codes",
]
