"""Everything between a float vector and the bytes a client sends.

- :mod:`.qsgd`: the QSGD quantizer ``Q_s(v)``, its inverse and its exact variance;
- :mod:`.container`: wire format v1's header, norms and CRC;
- :mod:`.packed` and :mod:`.entropy`: the two bodies of a quantized message;
- :mod:`.codec`: encode and decode by encoding (raw, packed, entropy);
- :mod:`.compressor`: the compressor protocol and the registry of compressors by name;
- :mod:`.qsgd_compressor`: QSGD in the v1 format (``"qsgd"``);
- :mod:`.topk`: top-k sparsification (``"topk"``, biased) and the sparse body;
- :mod:`.rotation`: EDEN, a randomized Hadamard rotation with an unbiasing scale
  (``"eden"``), and the rotated body;
- :mod:`.feedback`: a client's end of a compressor (:class:`ClientCompressor`), which
  keeps error feedback's residual between rounds;
- :mod:`._kernels`: the compiled (numba) kernels.

Importing this package registers the built-in compressors.
"""

from adaquantfl.compression.compressor import (
    COMPRESSORS,
    BaseCompressor,
    Compressor,
    compressor_from_config,
    default_message_limit,
    make_compressor,
    register_compressor,
)
from adaquantfl.compression.feedback import ClientCompressor, CompressedUpdate, ErrorFeedback
from adaquantfl.compression.qsgd_compressor import QSGDCompressor, QSGDOptions
from adaquantfl.compression.rotation import EdenCompressor, EdenOptions
from adaquantfl.compression.topk import TopKCompressor, TopKOptions

__all__ = [
    "COMPRESSORS",
    "BaseCompressor",
    "ClientCompressor",
    "CompressedUpdate",
    "Compressor",
    "EdenCompressor",
    "EdenOptions",
    "ErrorFeedback",
    "QSGDCompressor",
    "QSGDOptions",
    "TopKCompressor",
    "TopKOptions",
    "compressor_from_config",
    "default_message_limit",
    "make_compressor",
    "register_compressor",
]
