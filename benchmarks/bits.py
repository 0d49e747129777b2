"""Bits per coordinate of real model updates: packed vs entropy vs the empirical entropy.

    python -m benchmarks.bits            # MNIST-1D logreg (d=410) and digits MLP (d=15,210)
    python -m benchmarks.bits --quick    # fewer rounds

The updates are the clients' float updates ``Delta_i`` of a full-precision
run of the config (``compression.method = "fp32"``, so the trajectory does
not depend on s), captured at a few rounds through the library's own
simulator. Each update is then quantized at every s and encoded both ways.
Columns, all in bits per coordinate and averaged over the updates:

- ``packed``, ``entropy``: 8 x the message length / d (header, norm and CRC included);
- ``H(p_hat)+nnz``: the empirical entropy of the symbols the entropy body
  codes (level indices, plus one bit per nonzero sign), without any header;
- ``H(signed)``: the empirical entropy of the signed levels ``+-xi``, for comparison;
- ``formula``: the paper's ``d ceil(log2(s+1)) + d + 32``, over d.

The results go to ``benchmarks/results/bits.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaquantfl.compression.codec import encode, formula_bits
from adaquantfl.compression.entropy import empirical_entropy_bits
from adaquantfl.compression.qsgd import quantize
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import load_config
from benchmarks._common import describe, machine, print_table, write_json

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODELS = {"mnist1d-floor": (1, 10, 50, 200), "digits-mlp": (1, 10, 50, 100)}
LEVELS = (1, 2, 3, 7, 15, 255)


class _Recorder:
    """A compressor that keeps a copy of every update it is asked to send."""

    def __init__(self, inner: Any, rounds: set[int]) -> None:
        self.inner = inner
        self.rounds = rounds
        self.round = 0
        self.updates: list[torch.Tensor] = []

    def compress(self, update: torch.Tensor, levels: int | None, *, generator: Any) -> bytes:
        if self.round in self.rounds:
            self.updates.append(update.detach().clone())
        payload: bytes = self.inner.compress(update, levels, generator=generator)
        return payload

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def capture_updates(config_path: Path, rounds: Sequence[int]) -> list[torch.Tensor]:
    """Every client's update at the given (1-based) rounds of an fp32 run."""
    config = load_config(config_path, [f"train.rounds={max(rounds)}", "compression.method=fp32"])
    sim = build_simulator(config)
    recorder = _Recorder(sim.compressor, set(rounds))
    sim.compressor = recorder  # type: ignore[assignment]
    for r in range(1, max(rounds) + 1):
        recorder.round = r
        sim.run_round()
    return recorder.updates


def signed_entropy_bits(mags: np.ndarray, signs: np.ndarray) -> float:
    signed = np.where(signs, -mags, mags).astype(np.int64)
    _, counts = np.unique(signed, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def measure(updates: Sequence[torch.Tensor], levels: Sequence[int]) -> list[dict[str, Any]]:
    """Mean bits per coordinate of each encoding over ``updates``, for every s."""
    rows = []
    for s in levels:
        sums = dict.fromkeys(("packed", "entropy", "ideal", "signed", "formula"), 0.0)
        for i, update in enumerate(updates):
            d = update.numel()
            q = quantize(update, s, generator=torch.Generator().manual_seed(i))
            mags, signs = q.magnitudes.numpy(), q.signs.numpy()
            sums["packed"] += 8 * len(encode(q, "packed")) / d
            sums["entropy"] += 8 * len(encode(q, "entropy")) / d
            sums["ideal"] += empirical_entropy_bits(mags) / d
            sums["signed"] += signed_entropy_bits(mags, signs) / d
            sums["formula"] += formula_bits(d, s) / d
        row: dict[str, Any] = {k: v / len(updates) for k, v in sums.items()}
        row.update(levels=s, numel=int(updates[0].numel()), updates=len(updates))
        rows.append(row)
    return rows


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            str(r["levels"]),
            f"{r['packed']:.3f}",
            f"{r['entropy']:.3f}",
            f"{r['ideal']:.3f}",
            f"{r['signed']:.3f}",
            f"{r['formula']:.3f}",
            f"{r['entropy'] / r['packed']:.2f}",
        ]
        for r in rows
    ]


HEADER = ["s", "packed", "entropy", "H(p_hat)+nnz", "H(signed)", "formula", "entropy/packed"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="capture only rounds 1 and 10")
    args = parser.parse_args(argv)
    info = machine()
    results = {}
    for name, rounds in MODELS.items():
        captured = (1, 10) if args.quick else rounds
        updates = capture_updates(CONFIGS / f"{name}.toml", captured)
        rows = measure(updates, LEVELS)
        d = rows[0]["numel"]
        title = (
            f"{name} (d = {d}): bits per coordinate, mean of {len(updates)} client updates "
            f"from rounds {list(captured)}"
        )
        print_table(title, HEADER, table_rows(rows))
        results[name] = {"rounds": list(captured), "rows": rows}
    print(describe(info))
    path = write_json("bits", {"machine": info, "quick": args.quick, "models": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
