"""Everything between a float vector and the bytes a client sends.

- :mod:`.qsgd`: the QSGD quantizer ``Q_s(v)``, its inverse and its exact variance;
- :mod:`.container`: wire format v1's header, norms and CRC;
- :mod:`.packed` and :mod:`.entropy`: the two bodies of a quantized message;
- :mod:`.codec`: encode and decode by encoding (raw, packed, entropy);
- :mod:`.compressor`: the compressor protocol and the registry of compressors by name;
- :mod:`._kernels`: the compiled (numba) kernels.
"""
