"""Codec throughput: GB/s of float32 input for encode (quantize + pack) and decode.

    python -m benchmarks.codec            # d in {1e5, 1e7}, s in {1, 3, 15, 255}
    python -m benchmarks.codec --quick    # smoke run: d = 1e5, few repeats

One thread (torch and numba), best of N calls after warm-up (numba compiles
on the first call, outside the timing). Every figure is also given as a ratio
to ``torch.Tensor.copy_`` of the same float32 vector into a preallocated
buffer, timed in the same process right before, and as a speed-up over a
naive implementation (``torch.rand`` QSGD plus NumPy ``packbits``, below).

Encode is ``quantize_encode(x, s, generator=g) -> bytes`` from a float32
tensor; decode is ``decode_dequantize(message, ..., out=buffer)`` into a
preallocated float32 tensor. Both include the CRC32 and the header checks.
The results go to ``benchmarks/results/codec.json``.
"""

from __future__ import annotations

import argparse
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adaquantfl.compression.codec import decode_dequantize, quantize_encode
from benchmarks._common import (
    best_time,
    describe,
    machine,
    pin_one_thread,
    print_table,
    write_json,
)

SIZES = (10**5, 10**7)
LEVELS = (1, 3, 15, 255)


# --------------------------------------------------------------------------- naive baseline


def naive_encode(x: torch.Tensor, levels: int, generator: torch.Generator) -> bytes:
    """QSGD as a first implementation writes it: torch ops, ``torch.rand``, ``np.packbits``."""
    v = x.reshape(-1).to(torch.float32)
    norm = torch.linalg.vector_norm(v)
    r = v.abs() / norm * levels
    low = r.floor()
    xi = (low + (torch.rand(v.numel(), generator=generator) < r - low)).to(torch.int64)
    codes = ((xi << 1) | ((v < 0) & (xi > 0))).numpy().astype(np.uint32)
    width = 1 + levels.bit_length()
    bits = ((codes[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    payload = struct.pack("<If", v.numel(), float(norm))
    payload += np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    return payload + struct.pack("<I", zlib.crc32(payload))


def naive_decode(data: bytes, numel: int, levels: int, out: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`naive_encode`: ``np.unpackbits``, a matmul, ``torch.where``."""
    if struct.unpack_from("<I", data, len(data) - 4)[0] != zlib.crc32(data[:-4]):
        raise ValueError("CRC mismatch")
    count, norm = struct.unpack_from("<If", data)
    if count != numel:
        raise ValueError("wrong size")
    width = 1 + levels.bit_length()
    body = np.frombuffer(data, dtype=np.uint8, offset=8, count=len(data) - 12)
    bits = np.unpackbits(body, bitorder="little")[: numel * width].reshape(numel, width)
    codes = bits.astype(np.uint32) @ (np.uint32(1) << np.arange(width, dtype=np.uint32))
    values = torch.from_numpy((codes >> 1).astype(np.float32)) * (norm / levels)
    out.copy_(torch.where(torch.from_numpy((codes & 1).astype(bool)), -values, values))
    return out


# --------------------------------------------------------------------------- measurement


def measure(
    sizes: Sequence[int] = SIZES,
    levels: Sequence[int] = LEVELS,
    *,
    quick: bool = False,
    entropy: bool = True,
) -> list[dict[str, Any]]:
    """Time every (d, s) pair; one dict of seconds and GB/s per pair."""
    rows = []
    for d in sizes:
        x = torch.randn(d, generator=torch.Generator().manual_seed(d))
        big = d >= 10**6
        fast_n = 3 if quick else (15 if big else 200)
        naive_n = 1 if quick else (3 if big else 20)
        for s in levels:
            rows.append(_measure_pair(x, s, fast_n, naive_n, entropy))
    return rows


def _measure_pair(
    x: torch.Tensor, s: int, fast_n: int, naive_n: int, entropy: bool
) -> dict[str, Any]:
    d = x.numel()
    buffer = torch.empty(d)
    gen = torch.Generator().manual_seed(s)
    message = quantize_encode(x, s, generator=gen)
    naive_message = naive_encode(x, s, gen)
    row: dict[str, Any] = {"numel": d, "levels": s, "message_bytes": len(message)}
    row["copy_s"] = best_time(lambda: buffer.copy_(x), fast_n)
    row["encode_s"] = best_time(lambda: quantize_encode(x, s, generator=gen), fast_n)
    row["decode_s"] = best_time(
        lambda: decode_dequantize(message, expected_numel=d, expected_levels=s, out=buffer),
        fast_n,
    )
    row["naive_encode_s"] = best_time(lambda: naive_encode(x, s, gen), naive_n, 1)
    row["naive_decode_s"] = best_time(lambda: naive_decode(naive_message, d, s, buffer), naive_n, 1)
    if entropy:
        coded = quantize_encode(x, s, generator=gen, encoding="entropy")
        row["entropy_bytes"] = len(coded)
        row["entropy_encode_s"] = best_time(
            lambda: quantize_encode(x, s, generator=gen, encoding="entropy"), naive_n, 1
        )
        row["entropy_decode_s"] = best_time(
            lambda: decode_dequantize(coded, expected_numel=d, out=buffer), naive_n, 1
        )
    for key in [k for k in row if k.endswith("_s")]:
        row[key.replace("_s", "_gbps")] = 4 * d / row[key] / 1e9
    return row


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        cells = [
            f"{r['numel']:.0e}",
            str(r["levels"]),
            f"{r['copy_gbps']:.2f}",
            f"{r['encode_gbps']:.2f}",
            f"{r['encode_gbps'] / r['copy_gbps']:.2f}",
            f"{r['naive_encode_s'] / r['encode_s']:.0f}x",
            f"{r['decode_gbps']:.2f}",
            f"{r['decode_gbps'] / r['copy_gbps']:.2f}",
            f"{r['naive_decode_s'] / r['decode_s']:.0f}x",
        ]
        if "entropy_encode_gbps" in r:
            cells += [f"{r['entropy_encode_gbps']:.3f}", f"{r['entropy_decode_gbps']:.3f}"]
        out.append(cells)
    return out


HEADER = [
    "d",
    "s",
    "copy_ GB/s",
    "encode GB/s",
    "enc/copy_",
    "enc vs naive",
    "decode GB/s",
    "dec/copy_",
    "dec vs naive",
    "entropy enc GB/s",
    "entropy dec GB/s",
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1e5 only, few repeats")
    parser.add_argument("--no-entropy", action="store_true", help="skip the entropy columns")
    args = parser.parse_args(argv)
    pin_one_thread()
    info = machine()
    sizes = (10**5,) if args.quick else SIZES
    rows = measure(sizes, LEVELS, quick=args.quick, entropy=not args.no_entropy)
    header = HEADER if not args.no_entropy else HEADER[:-2]
    print_table("Codec throughput (GB/s of float32 input, best of N)", header, table_rows(rows))
    print(describe(info))
    path = write_json("codec", {"machine": info, "quick": args.quick, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
