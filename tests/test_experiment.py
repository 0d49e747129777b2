"""End-to-end tests: the CLI and Python API write the results directory of DESIGN §7."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import adaquantfl
from adaquantfl.cli import app
from adaquantfl.policy import adaquant_levels
from adaquantfl.runner.experiment import run
from adaquantfl.runner.report import final_mean, first_round_at_target

ROWS_KEYS = {
    "round", "levels", "wire_bits", "cum_wire_bits", "formula_bits", "downlink_bits",
    "train_loss", "test_loss", "test_accuracy", "participants",
}  # fmt: skip

TINY = """
[data]
dataset = "digits"
num_clients = 3

[model]
name = "logreg"

[train]
rounds = 8
local_steps = 3
batch_size = 16
lr = 0.1
seed = 0

[compare]
methods = [
  { method = "fp32" },
  { method = "qsgd", levels = 1 },
  { method = "qsgd", levels = 3 },
  { method = "adaquantfl", levels = 2 },
]
smooth_rounds = 1
"""


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("cmp")
    config = root / "tiny.toml"
    config.write_text(TINY)
    result = CliRunner().invoke(app, ["compare", str(config), "--out", str(root / "out"), "-q"])
    return root / "out", result


def test_cli_compare_writes_the_results_directory(compared: tuple[Path, Any]) -> None:
    out, result = compared
    assert result.exit_code == 0, result.output
    expected = ["summary.json", "config.toml", "loss_vs_bits.png", "accuracy_vs_bits.png"]
    expected += ["levels_vs_round.png", "loss_vs_round.png", "report.png", "summary.md"]
    for name in expected:
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "bits to reach the target loss" in result.output
    assert "loss_vs_bits.png" in result.output


def test_metrics_rows_follow_the_schema(compared: tuple[Path, Any]) -> None:
    out, _ = compared
    d = 64 * 10 + 10
    for label in ("fp32", "qsgd-s1", "qsgd-s3", "adaquantfl-s2"):
        rows = read_rows(out / label / "metrics.jsonl")
        assert [r["round"] for r in rows] == list(range(1, 9))
        for r in rows:
            assert set(r) >= ROWS_KEYS
            assert r["participants"] == 3 and r["rejected"] == 0
            assert 0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0
        cum = 0
        for r in rows:
            cum += r["wire_bits"]
            assert r["cum_wire_bits"] == cum
        assert (out / label / "model.pt").is_file()
    fp32 = read_rows(out / "fp32" / "metrics.jsonl")
    assert all(r["levels"] is None and r["formula_bits"] == 3 * 32 * d for r in fp32)
    s1 = read_rows(out / "qsgd-s1" / "metrics.jsonl")
    norms = -(-d // 512)  # the default: one norm per 512 entries
    assert all(r["levels"] == 1 and r["formula_bits"] == 3 * (2 * d + 32 * norms) for r in s1)
    # The first round's loss is F(w_0) on the same initial model for every method.
    assert s1[0]["train_loss"] == fp32[0]["train_loss"]


def test_adaquantfl_levels_follow_the_formula_on_logged_losses(compared: tuple[Path, Any]) -> None:
    out, _ = compared
    rows = read_rows(out / "adaquantfl-s2" / "metrics.jsonl")
    f0 = rows[0]["train_loss"]
    assert rows[0]["levels"] == 2
    for prev, row in itertools.pairwise(rows):
        assert row["levels"] == adaquant_levels(f0, prev["train_loss"], 2, 1, 2**16)
    assert max(r["levels"] for r in rows) > 2  # the loss fell enough to move s


def test_summary_scores_match_the_metrics(compared: tuple[Path, Any]) -> None:
    out, _ = compared
    summary = json.loads((out / "summary.json").read_text())
    fp32_rows = read_rows(out / "fp32" / "metrics.jsonl")
    fp32_final = final_mean(fp32_rows, "train_loss")
    assert summary["target_loss"] == pytest.approx(1.01 * fp32_final)
    assert set(summary["methods"]) == {"fp32", "qsgd-s1", "qsgd-s3", "adaquantfl-s2"}
    for label, m in summary["methods"].items():
        rows = read_rows(out / label / "metrics.jsonl")
        assert m["final_train_loss"] == pytest.approx(final_mean(rows, "train_loss"))
        assert m["final_test_accuracy"] == pytest.approx(final_mean(rows, "test_accuracy"))
        assert m["total_wire_bits"] == rows[-1]["cum_wire_bits"]
        hit = first_round_at_target(rows, summary["target_loss"], 1)
        assert m["bits_to_target"] == (None if hit is None else rows[hit]["cum_wire_bits"])
    # With smooth_rounds = 1, fp32 reaches 1.01 x its own final loss by its last round.
    assert summary["methods"]["fp32"]["bits_to_target"] is not None


@pytest.mark.slow
def test_report_redraws_from_the_directory(compared: tuple[Path, Any]) -> None:
    out, _ = compared
    (out / "loss_vs_bits.png").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "loss_vs_bits.png").is_file()


def test_python_api_run_and_seeds(tmp_path: Path) -> None:
    cfg = TINY.replace("rounds = 8", "rounds = 4") + "seeds = 2\n"
    path = tmp_path / "c.toml"
    path.write_text(cfg)
    res = adaquantfl.compare(path, tmp_path / "out", plots=False)
    m = res.summary["methods"]["qsgd-s3"]
    assert m["seeds"] == 2 and len(m["per_seed"]) == 2
    assert (tmp_path / "out" / "qsgd-s3" / "seed-0" / "metrics.jsonl").is_file()
    assert (tmp_path / "out" / "qsgd-s3" / "seed-1" / "metrics.jsonl").is_file()
    per = [s["final_train_loss"] for s in m["per_seed"]]
    assert m["final_train_loss"] == pytest.approx(sum(per) / 2)
    assert m["sd"]["final_train_loss"] == pytest.approx(abs(per[0] - per[1]) / math.sqrt(2))
    assert per[0] != per[1]

    single = adaquantfl.run(path, tmp_path / "one", overrides=["compression.method=qsgd"])
    assert single.label == "qsgd-s2" and len(single.metrics) == 4
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["methods"]["qsgd-s2"]
    state = torch.load(tmp_path / "one" / "qsgd-s2" / "model.pt")
    assert set(state) == {"linear.weight", "linear.bias"}


def test_cli_run_and_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TINY)
    runner = CliRunner()
    ok = runner.invoke(
        app, ["run", str(path), "-o", str(tmp_path / "r"), "-q", "--set", "train.rounds=2"]
    )
    assert ok.exit_code == 0, ok.output
    assert len(read_rows(tmp_path / "r" / "adaquantfl-s2" / "metrics.jsonl")) == 2
    bad = runner.invoke(app, ["run", str(path), "-q", "--set", "train.lr=-1"])
    assert bad.exit_code == 2 and "[train] lr = -1: must be > 0" in bad.output
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    no_target = runner.invoke(
        app, ["compare", str(path), "-q", "--set", 'compare.methods=[{method="qsgd", levels=2}]']
    )
    assert no_target.exit_code == 2 and "target_loss" in no_target.output


def test_run_without_output_dir_returns_results() -> None:
    res = run(
        {
            "data": {"dataset": "digits", "num_clients": 2},
            "train": {"rounds": 2, "local_steps": 1},
            "model": {"name": "logreg"},
            "compression": {"method": "fp32"},
        }
    )
    assert res.out_dir is None and len(res.metrics) == 2 and res.label == "fp32"


def test_the_test_set_can_be_evaluated_less_often_and_nothing_else_changes() -> None:
    config = {
        "data": {"dataset": "digits", "num_clients": 3},
        "model": {"name": "logreg"},
        "train": {"rounds": 7, "local_steps": 3, "batch_size": 16, "lr": 0.1},
        "compression": {"method": "adaquantfl", "levels": 2},
    }
    every = run(config)
    sparse = run({**config, "train": {**config["train"], "eval_every": 3}})
    evaluated = [r["round"] for r in sparse.metrics if r["test_loss"] is not None]
    assert evaluated == [3, 6, 7]  # every third round and the last
    for a, b in zip(every.metrics, sparse.metrics, strict=True):
        if b["test_loss"] is not None:
            assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])
        skip = {"test_loss", "test_accuracy", "time_s"}
        assert {k: v for k, v in a.items() if k not in skip} == {
            k: v for k, v in b.items() if k not in skip
        }
    assert sparse.summary["final_test_accuracy"] == every.metrics[-1]["test_accuracy"]
