"""Full-precision (raw float32) messages in the v1 container: encoding 0.

Full precision is sent in the same container as quantized updates, so every
message, compressed or not, is counted from the bytes actually produced.
"""

from __future__ import annotations

import numpy as np
import torch

from adaquantfl.compression.container import (
    ENCODINGS,
    U32_MAX,
    CodecError,
    as_buffer,
    build_message,
)
from adaquantfl.compression.header import checked_header

__all__ = ["decode_dense", "encode_dense"]


def encode_dense(x: torch.Tensor) -> bytes:
    """Encode a full-precision tensor (flattened, float32) as a raw v1 message."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"encode_dense needs a floating-point torch.Tensor, got {x!r:.80}")
    v = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous().numpy()
    bad = int(v.size - np.count_nonzero(np.isfinite(v)))
    if bad:
        raise ValueError(f"cannot encode a tensor with {bad} non-finite entries (NaN or inf)")
    if v.size > U32_MAX // 4:
        raise ValueError(f"raw v1 messages carry at most {U32_MAX // 4} entries")

    def write(out: np.ndarray) -> None:
        out[: 4 * v.size] = v.astype("<f4", copy=False).view(np.uint8)

    empty = np.zeros(0, dtype=np.float32)
    return build_message(ENCODINGS["raw"], v.size, 0, 0, empty, 4 * v.size, write)


def decode_dense(data: bytes | bytearray | memoryview, *, expected_numel: int) -> torch.Tensor:
    """Decode a raw full-precision message to a flat float32 tensor.

    Raises
    ------
    CodecError
        As :func:`decode`, and if the message is not raw or holds non-finite values.
    """
    buf = as_buffer(data)
    header = checked_header(buf, expected_numel)
    if header.encoding != "raw":
        raise CodecError(f"message is {header.encoding}-encoded; use decode for quantized data")
    values = np.frombuffer(buf, dtype="<f4", count=header.numel, offset=header.header_bytes)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise CodecError(f"raw body holds {bad} non-finite values")
    return torch.from_numpy(values.astype(np.float32, copy=True))
