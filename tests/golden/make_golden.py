"""Write the golden wire-format vectors of format v1 (run once; the files are checked in).

    python -m tests.golden.make_golden

Re-running it must not change any file: ``tests/test_codec.py`` compares the
encoder's output with these bytes, so a change here is a change of format v1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaquantfl.compression.codec import encode, encode_dense
from adaquantfl.compression.qsgd import Quantized, quantize

HERE = Path(__file__).parent


def golden_cases() -> dict[str, bytes]:
    """Name -> message bytes of every golden vector."""
    hand = Quantized(
        levels=3,
        numel=5,
        bucket_size=None,
        norm="l2",
        norms=torch.tensor([2.5]),
        magnitudes=torch.tensor([0, 1, 2, 3, 1], dtype=torch.int32),
        signs=torch.tensor([False, True, False, True, False]),
    )
    bucketed = Quantized(
        levels=1,
        numel=7,
        bucket_size=3,
        norm="max",
        norms=torch.tensor([1.0, 0.5, 0.25]),
        magnitudes=torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.int32),
        signs=torch.tensor([True, False, False, True, False, False, True]),
    )
    x = torch.linspace(-1.0, 1.0, 410)
    seeded = quantize(x, 2, generator=torch.Generator().manual_seed(2026))
    # Entropy bodies: the categorical form (k = 0), uniform low bits (k > 0:
    # s = 65535 on 300 entries), and the packed fallback of a tiny vector.
    wide = torch.logspace(-2.0, 0.0, 300) * torch.linspace(-1.0, 1.0, 300).sign()
    large_s = quantize(wide, 65535, generator=torch.Generator().manual_seed(7), bucket_size=100)
    return {
        "packed_s3_hand.bin": encode(hand, "packed"),
        "packed_s1_bucket3_maxnorm.bin": encode(bucketed, "packed"),
        "packed_s2_linspace410_seed2026.bin": encode(seeded, "packed"),
        "raw_3.bin": encode_dense(torch.tensor([1.0, -2.0, 0.5])),
        "entropy_s3_hand.bin": encode(hand, "entropy"),
        "entropy_s2_linspace410_seed2026.bin": encode(seeded, "entropy"),
        "entropy_s65535_bucket100_logspace300_seed7.bin": encode(large_s, "entropy"),
    }


def main() -> None:
    for name, data in golden_cases().items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
