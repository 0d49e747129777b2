"""Cost of the entropy decoder's canonical-form check: decode time with and without it.

    python -m benchmarks.entropy_check            # d in {1e5, 1e6}, s in {1, 15, 255}
    python -m benchmarks.entropy_check --quick    # smoke run: d = 1e5, few repeats

The entropy decoder runs the encoder on the decoded symbols and compares its
words with the body's (``adaquantfl.compression.entropy._check_canonical``), so
that each vector has one valid body. This times ``decode_dequantize`` of a QSGD
message (Gaussian update, one bucket, L2 norm) into a preallocated buffer,
best of N, once as it is and once with the check replaced by a no-op (the
decoder as it was before the check), in the same process, one thread.
The results go to ``benchmarks/results/entropy_check.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

import adaquantfl.compression.entropy as entropy
from adaquantfl.compression.codec import decode_dequantize, quantize_encode
from benchmarks._common import best_time, describe, machine, pin_one_thread, print_table, write_json

SIZES = (10**5, 10**6)
LEVELS = (1, 15, 255)


@contextmanager
def without_check() -> Iterator[None]:
    """The entropy decoder without its canonical-form check (restored on exit)."""
    check = entropy._check_canonical
    entropy._check_canonical = lambda *args, **kwargs: None
    try:
        yield
    finally:
        entropy._check_canonical = check


def measure(sizes: Sequence[int], levels: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for d in sizes:
        x = torch.randn(d, generator=torch.Generator().manual_seed(0))
        out = torch.empty(d)
        for s in levels:
            data = quantize_encode(
                x, s, generator=torch.Generator().manual_seed(s), encoding="entropy"
            )

            def run(data: bytes = data, d: int = d, out: torch.Tensor = out) -> object:
                return decode_dequantize(data, expected_numel=d, out=out)

            with without_check():
                before = best_time(run, repeats)
            after = best_time(run, repeats)
            rows.append(
                {
                    "numel": d,
                    "levels": s,
                    "message_bytes": len(data),
                    "decode_without_check_s": before,
                    "decode_s": after,
                    "ratio": after / before,
                }
            )
    return rows


HEADER = ["d", "s", "bytes", "without check ms", "with check ms", "ratio"]


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f"{r['numel']:.0e}",
            str(r["levels"]),
            str(r["message_bytes"]),
            f"{1e3 * r['decode_without_check_s']:.2f}",
            f"{1e3 * r['decode_s']:.2f}",
            f"{r['ratio']:.2f}",
        ]
        for r in rows
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1e5 only, few repeats")
    args = parser.parse_args(argv)
    pin_one_thread()
    info = machine()
    sizes = SIZES[:1] if args.quick else SIZES
    rows = measure(sizes, LEVELS, repeats=3 if args.quick else 9)
    print_table("Entropy decode with and without the canonical check", HEADER, table_rows(rows))
    print(describe(info))
    path = write_json("entropy_check", {"machine": info, "quick": args.quick, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
