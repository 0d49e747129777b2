"""Write the golden per-round metrics of short runs (run once; the file is checked in).

    python -m tests.golden.make_metrics

``tests/test_golden_metrics.py`` reruns the same runs and compares every
figure (losses as exact floats, bits as integers) with ``metrics.json``. The
file was written before the compression stack became pluggable, so it pins
that the fp32, fixed-level and AdaQuantFL methods kept their exact behaviour
through that change. Re-running this script must not be needed: a difference
is a change of behaviour, to be explained, not re-recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
OUT = HERE / "metrics.json"

#: Figures compared (time_s is not deterministic).
KEYS = (
    "round",
    "levels",
    "participants",
    "rejected",
    "dropped",
    "wire_bits",
    "formula_bits",
    "downlink_bits",
    "train_loss",
    "test_loss",
    "test_accuracy",
)

#: (name, config file, overrides): the demo's regime per method, and the
#: digits MLP (which trains through the batched simulator path).
CASES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("demo-fp32", "configs/mnist1d-floor.toml", ("compression.method=fp32",)),
    (
        "demo-qsgd-s3",
        "configs/mnist1d-floor.toml",
        ("compression.method=qsgd", "compression.levels=3"),
    ),
    (
        "demo-qsgd-s15-entropy",
        "configs/mnist1d-floor.toml",
        ("compression.method=qsgd", "compression.levels=15", "compression.encoding=entropy"),
    ),
    (
        "demo-adaquantfl-s2",
        "configs/mnist1d-floor.toml",
        ("compression.method=adaquantfl", "compression.levels=2"),
    ),
    (
        "digits-adaquantfl-s2-partial",
        "configs/digits-mlp.toml",
        (
            "compression.method=adaquantfl",
            "compression.levels=2",
            "train.clients_per_round=4",
            "train.dropout=0.2",
            "compression.bucket_size=512",
        ),
    ),
)
ROUNDS = 40


def run_cases(root: Path) -> dict[str, Any]:
    """Rows of every case, restricted to :data:`KEYS`."""
    from adaquantfl import run

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rounds": ROUNDS,
        "cases": {},
    }
    for name, path, overrides in CASES:
        result = run(
            root / path,
            None,
            overrides=[*overrides, f"train.rounds={ROUNDS}", "compare.methods=[]"],
        )
        out["cases"][name] = [{k: row.get(k) for k in KEYS} for row in result.metrics]
    return out


def main() -> None:
    root = HERE.parent.parent
    OUT.write_text(json.dumps(run_cases(root), indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
