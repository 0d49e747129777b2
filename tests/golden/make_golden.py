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
from adaquantfl.compression.rotation import eden_encode

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
        **eden_golden_cases(),
        "packed_s3_hand.bin": encode(hand, "packed"),
        "packed_s1_bucket3_maxnorm.bin": encode(bucketed, "packed"),
        "packed_s2_linspace410_seed2026.bin": encode(seeded, "packed"),
        "raw_3.bin": encode_dense(torch.tensor([1.0, -2.0, 0.5])),
        "entropy_s3_hand.bin": encode(hand, "entropy"),
        "entropy_s2_linspace410_seed2026.bin": encode(seeded, "entropy"),
        "entropy_s65535_bucket100_logspace300_seed7.bin": encode(large_s, "entropy"),
    }


def eden_golden_cases() -> dict[str, bytes]:
    """The rotated ("eden") vectors: 300 entries in blocks of 128, every block mode.

    At s = 3 (groups of 16, 16, 32) block 0 (a ramp) takes the base
    rotations, block 1 (Gaussian, seed 286: a draw whose base rotations
    quantize over the bound) one more, and the tail of 44 entries (one of them
    1e30, too large to scale) is sent raw; s = 31 (2 bits) has them all in mode 0.
    """
    x = torch.zeros(300)
    x[:128] = torch.linspace(-1.0, 1.0, 128)
    x[128:256] = torch.randn(128, generator=torch.Generator().manual_seed(286))
    x[256:] = torch.linspace(0.0, 1.0, 44)
    x[299] = 1e30
    return {
        f"eden_s{s}_d300_block128_seed2026.bin": eden_encode(
            x, s, generator=torch.Generator().manual_seed(2026), block_size=128
        )
        for s in (3, 31)
    }


def main() -> None:
    for name, data in golden_cases().items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
