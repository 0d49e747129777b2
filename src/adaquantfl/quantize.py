"""QSGD quantization (DESIGN §7 import path); implemented in :mod:`adaquantfl.compression.qsgd`.

from adaquantfl.quantize import quantize, dequantize, Quantized
"""

from adaquantfl.compression.qsgd import *  # noqa: F403
from adaquantfl.compression.qsgd import MAX_NORM, NormName, __all__  # noqa: F401
