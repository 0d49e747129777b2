"""The per-round metrics of short runs match those recorded in ``tests/golden/metrics.json``.

The file was recorded before the compression stack became pluggable (compressor
registry, level policies that observe a round, error feedback, downlink
compression). With none of those options on, fp32, fixed-level QSGD and
AdaQuantFL must produce the same bits, bytes and losses as before.

Bit-identity is a same-machine property: PyTorch picks its CPU kernels by
the instruction set, and another one may round matrix products differently.
On a CPU of another capability than the recording's, losses are compared to
1e-5 relative instead, and bits must still match exactly where the levels do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.golden.make_metrics import CASES, KEYS, run_cases

GOLDEN = Path(__file__).parent / "golden" / "metrics.json"
FLOAT_KEYS = ("train_loss", "test_loss", "test_accuracy")


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rerun() -> dict:
    return run_cases(Path(__file__).parent.parent)


def test_golden_file_covers_every_case(recorded: dict) -> None:
    assert set(recorded["cases"]) == {name for name, _, _ in CASES}
    for rows in recorded["cases"].values():
        assert len(rows) == recorded["rounds"]
        assert all(set(row) == set(KEYS) for row in rows)


@pytest.mark.parametrize("name", [name for name, _, _ in CASES])
def test_metrics_unchanged(name: str, recorded: dict, rerun: dict) -> None:
    exact = recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    old, new = recorded["cases"][name], rerun["cases"][name]
    assert len(new) == len(old)
    for before, after in zip(old, new, strict=True):
        for key in KEYS:
            a, b = before[key], after[key]
            if exact or key not in FLOAT_KEYS or a is None:
                assert b == a, f"{name} round {before['round']}: {key} {b!r} != {a!r}"
            else:
                assert math.isclose(b, a, rel_tol=1e-5), f"{name} round {before['round']}: {key}"


def test_recording_exercises_a_level_change(recorded: dict) -> None:
    # AdaQuantFL moves from s0 = 2 to 3 in the recorded runs; a schedule change
    # therefore shows up as a levels (and bits) difference above.
    levels = [row["levels"] for row in recorded["cases"]["demo-adaquantfl-s2"]]
    assert levels[0] == 2 and max(levels) > 2
