"""A compressor and a per-client policy of the test suite's own, with error feedback, on Flower.

One Flower run: ``tests.plugins``' ``test-rounding`` compressor (a wire format
the package does not know) wrapped in error feedback, and the
``test-per-client`` policy (each client its own levels), with partial
participation, so that a node must keep its residual in ``Context.state``
across the rounds it sits out. Both engines must send the same bytes.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed")

from dataclasses import dataclass
from pathlib import Path

import torch

from adaquantfl.fl.record import RoundRecord
from adaquantfl.runner.config import load_config
from adaquantfl.runner.flower_engine import run_flower
from tests.flower_helpers import simulate

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist1d-floor.toml"
ROUNDS = 5
OVERRIDES = [
    "compression.plugins=['tests.plugins']",
    "compression.compressor=test-rounding",
    "compression.error_feedback=true",
    "compression.method=test-per-client",
    f"train.rounds={ROUNDS}",
    "train.clients_per_round=7",
    "train.vectorize=false",
]


@dataclass
class Runs:
    records: list[RoundRecord]
    flower_params: torch.Tensor
    sim: list[RoundRecord]
    sim_params: torch.Tensor


@pytest.fixture(scope="module")
def runs() -> Runs:
    config = load_config(CONFIG, OVERRIDES)
    records: list[RoundRecord] = []
    final = run_flower(config, records.append)
    sim, params = simulate(config)
    return Runs(records, final.params, sim, params)


def test_both_engines_send_the_same_bytes_with_plugins_and_error_feedback(runs: Runs) -> None:
    assert len(runs.records) == len(runs.sim) == ROUNDS
    for fr, sim in zip(runs.records, runs.sim, strict=True):
        assert fr.digests == sim.digests and len(sim.digests) == 7
        assert fr.client_levels == sim.client_levels
        assert fr.rejected == 0
    assert torch.equal(runs.flower_params, runs.sim_params)


def test_clients_used_their_own_levels(runs: Runs) -> None:
    for k, fr in enumerate(runs.records):
        assert all(levels == 1 + (cid + k) % 4 for cid, levels in fr.client_levels)
    assert len({lv for fr in runs.records for _, lv in fr.client_levels}) == 4


def test_the_bytes_depend_on_the_residuals_the_nodes_kept() -> None:
    # Negative control: without error feedback the payloads differ from round 2
    # on, so equal digests above mean every node kept and used its residual.
    config = load_config(CONFIG, OVERRIDES)
    plain = load_config(CONFIG, [*OVERRIDES, "compression.error_feedback=false"])
    with_ef, _ = simulate(config)
    without, _ = simulate(plain)
    assert with_ef[0].digests == without[0].digests
    assert all(a.digests != b.digests for a, b in zip(with_ef[1:], without[1:], strict=True))


def test_records_carry_the_named_measurements(runs: Runs) -> None:
    for record in runs.records:
        assert record.distortion is not None and 0 < record.distortion < 1
        assert record.bits_per_coordinate is not None and record.bits_per_coordinate > 32
