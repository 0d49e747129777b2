"""Crash-safe checkpoints: atomic files, corruption fallback, and kill -9 then resume."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import adaquantfl
from adaquantfl.runner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from adaquantfl.runner.config import ConfigError
from tests.killing import kill_after_checkpoint

CONFIG = """
[data]
dataset = "digits"
num_clients = 4

[model]
name = "logreg"

[train]
rounds = {rounds}
local_steps = 3
batch_size = 16
lr = 0.1
seed = 5
checkpoint_every = {every}

[compression]
method = "adaquantfl"
levels = 2
"""


def write_config(path: Path, rounds: int, every: int) -> Path:
    path.write_text(CONFIG.format(rounds=rounds, every=every))
    return path


def rows_without_time(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("time_s")  # wall-clock time is the one field a rerun cannot reproduce
    return rows


# --------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"round": 1, "params": torch.arange(5.0), "rows": [{"a": None}]})
    save_checkpoint(path, {"round": 2, "params": torch.arange(6.0), "rows": []})
    state, source = load_checkpoint(path)
    assert (
        source == path and state["round"] == 2 and torch.equal(state["params"], torch.arange(6.0))
    )
    prev, _ = load_checkpoint(tmp_path / "c.pt.prev")
    assert prev["round"] == 1 and prev["rows"] == [{"a": None}]
    assert not (tmp_path / "c.pt.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "delete"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"round": 1})
    save_checkpoint(path, {"round": 2})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all, but long enough to have a header......")
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING):
        state, source = load_checkpoint(path)
    assert state["round"] == 1 and source.name == "c.pt.prev"
    if damage != "delete":
        assert "trying the previous checkpoint" in caplog.text


def test_no_usable_checkpoint_names_both_files(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    path.write_bytes(b"AQCK")
    with pytest.raises(CheckpointError, match=r"torn.*c\.pt\.prev does not exist"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    rounds = 600
    config = write_config(tmp_path / "run.toml", rounds=rounds, every=20)
    reference = adaquantfl.run(config, tmp_path / "ref")

    out = tmp_path / "killed"
    run_dir = out / "adaquantfl-s2"
    proc = kill_after_checkpoint(
        ["run", str(config), "--out", str(out), "-q"], run_dir / "checkpoint.pt", timeout_s=120
    )
    # The kill really happened mid-run: killed by the signal, a checkpoint, no final model.
    assert proc.returncode == -signal.SIGKILL
    state, _ = load_checkpoint(run_dir / "checkpoint.pt")
    assert 20 <= state["round"] < rounds
    assert not (run_dir / "model.pt").exists()
    # Metrics stream to a partial file named by the run's pid; metrics.jsonl appears
    # only when a run ends.
    assert not (run_dir / "metrics.jsonl").exists()
    (partial,) = run_dir.glob(f"metrics.jsonl.{proc.pid}.*.partial")
    assert len(partial.read_text().splitlines()) < rounds

    resumed = adaquantfl.run(config, out, resume=True)
    assert not partial.exists()  # its writer is gone: the resumed run removed it
    assert torch.equal(resumed.params, reference.params)
    ref_model = torch.load(tmp_path / "ref" / "adaquantfl-s2" / "model.pt")
    new_model = torch.load(run_dir / "model.pt")
    assert all(torch.equal(ref_model[k], new_model[k]) for k in ref_model)
    assert rows_without_time(run_dir / "metrics.jsonl") == rows_without_time(
        tmp_path / "ref" / "adaquantfl-s2" / "metrics.jsonl"
    )


def test_resume_from_previous_checkpoint_when_the_newest_is_corrupt(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", rounds=12, every=4)
    reference = adaquantfl.run(config, tmp_path / "ref")
    out = tmp_path / "out"
    adaquantfl.run(config, out, overrides=["train.rounds=8"])  # stops after round 8
    ckpt = out / "adaquantfl-s2" / "checkpoint.pt"
    assert load_checkpoint(ckpt)[0]["round"] == 8
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    # Resuming with more rounds is allowed; the corrupt round-8 checkpoint is skipped for round 4.
    resumed = adaquantfl.run(config, out, resume=True)
    assert torch.equal(resumed.params, reference.params)
    assert [r["round"] for r in resumed.metrics] == list(range(1, 13))


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", rounds=4, every=2)
    adaquantfl.run(config, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"config differs .* in train.lr \(0.1 -> 0.2\)"):
        adaquantfl.run(config, tmp_path / "out", resume=True, overrides=["train.lr=0.2"])
    with pytest.raises(ConfigError, match="already ran 4 rounds"):
        adaquantfl.run(config, tmp_path / "out", resume=True, overrides=["train.rounds=2"])


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.toml", rounds=6, every=3)
    first = adaquantfl.run(config, tmp_path / "out")
    again = adaquantfl.run(config, tmp_path / "out", resume=True)
    assert torch.equal(first.params, again.params)
    assert [r["round"] for r in again.metrics] == list(range(1, 7))
