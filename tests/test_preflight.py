"""A run never destroys results it did not produce, and a user's mistake is an ``error:`` line.

Each test reproduces a way a run once damaged earlier results (a run that
failed on its data truncated an earlier run's metrics and replaced its
config.toml; a refused --resume rewrote config.toml; --resume with changed
levels silently started over) or ended in a traceback. Every test here
snapshots the results directory and checks that a refused or failed run
leaves every byte of it as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import adaquantfl
from adaquantfl.cli import app
from adaquantfl.data.idx import IDX_FILES
from adaquantfl.runner import engines
from adaquantfl.runner.config import ConfigError, load_config
from adaquantfl.runner.files import LOCK_NAME, ResultsLock
from adaquantfl.runner.preflight import config_diff

BASE = """
[data]
dataset = "digits"
num_clients = 3

[model]
name = "logreg"

[train]
rounds = 4
local_steps = 2
batch_size = 8
lr = 0.1
seed = 0
checkpoint_every = 2

[compression]
method = "qsgd"
levels = 3
"""
LABEL = "qsgd-s3"


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``root``: SHA-256 of its bytes, inode and mtime (a rewrite changes them)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                st.st_ino,
                st.st_mtime_ns,
            )
    return out


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def assert_error_line(result: Any, *fragments: str, code: int = 2) -> None:
    """An ``error:`` line that names the problem, the exit code, and no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert "error:" in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)


@pytest.fixture
def done(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[str, int, int]]]:
    """A config, and the results directory of a finished run of it with its snapshot."""
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    out = tmp_path / "out"
    ok = cli("run", str(config), "--out", str(out), "-q")
    assert ok.exit_code == 0, ok.output
    assert (out / LABEL / "metrics.jsonl").stat().st_size > 0
    return config, out, snapshot(out)


# --------------------------------------------------------------------------- bad data


def write_bad_idx(data_dir: Path) -> Path:
    data_dir.mkdir()
    for pair in IDX_FILES.values():
        for name in pair:
            (data_dir / name).write_bytes(b"this is not an IDX file")
    return data_dir


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("problem", ["no data_dir", "bad IDX file", "missing data_dir"])
def test_a_run_whose_data_fails_writes_nothing(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]], problem: str, overwrite: list[str]
) -> None:
    config, out, before = done
    sets = ["--set", "data.dataset=mnist"]
    if problem == "bad IDX file":
        bad = write_bad_idx(out.parent / "idx")
        sets += ["--set", f"data.data_dir={str(bad)!r}"]
        expected = "bad magic number"
    elif problem == "missing data_dir":
        sets += ["--set", f"data.data_dir={str(out.parent / 'nowhere')!r}"]
        expected = "no IDX files"
    else:
        expected = "data_dir is required"
    result = cli("run", str(config), "--out", str(out), "-q", *sets, *overwrite)
    assert_error_line(result, expected)
    assert snapshot(out) == before  # metrics.jsonl not truncated, config.toml not replaced


# --------------------------------------------------------------------------- ownership


def test_an_out_holding_another_runs_results_needs_overwrite(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]],
) -> None:
    config, out, before = done
    refused = cli("run", str(config), "--out", str(out), "-q", "--set", "train.lr=0.2")
    assert_error_line(refused, "already holds a run's results", "--overwrite")
    assert snapshot(out) == before
    replaced = cli(
        "run", str(config), "--out", str(out), "-q", "--set", "train.lr=0.2", "--overwrite"
    )
    assert replaced.exit_code == 0, replaced.output
    assert "lr = 0.2" in (out / "config.toml").read_text()
    with pytest.raises(ConfigError, match="already holds"):
        adaquantfl.compare(config, out, overrides=["compare.target_loss=1.0"], plots=False)
    adaquantfl.compare(
        config, out, overrides=["compare.target_loss=1.0"], plots=False, overwrite=True
    )


def test_a_run_that_fails_midway_keeps_the_earlier_runs_files(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, out, before = done
    real = engines.ENGINES["sim"]

    def failing(cfg: Any, on_record: Any, **kwargs: Any) -> Any:
        def record_then_fail(record: Any) -> None:
            on_record(record)
            if record.round == 3:
                raise RuntimeError("the machine went away")

        return real(cfg, record_then_fail, **{**kwargs, "on_checkpoint": None})

    monkeypatch.setitem(engines.ENGINES, "sim", failing)
    with pytest.raises(RuntimeError, match="went away"):
        adaquantfl.run(config, out, overwrite=True, overrides=["train.checkpoint_every=0"])
    after = snapshot(out)
    # Only config.toml is the new run's (written once the run was validated);
    # every file of the earlier run is whole, and no partial or temp file is left.
    assert {k: v for k, v in after.items() if k != "config.toml"} == {
        k: v for k, v in before.items() if k != "config.toml"
    }
    assert set(after) == set(before)


# --------------------------------------------------------------------------- one writer


def run_files(out: Path) -> dict[str, Any]:
    """What a results directory holds: its file names, rows without time, config, summary, model."""
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    rows = [json.loads(line) for line in (out / LABEL / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time_s")  # wall-clock time is the one field a rerun cannot reproduce
    model = torch.load(out / LABEL / "model.pt")
    return {
        "names": names,
        "rows": rows,
        "config": (out / "config.toml").read_text(),
        "summary": json.loads((out / "summary.json").read_text()),
        "model": {k: v.tolist() for k, v in model.items()},
    }


def test_a_second_run_on_a_directory_in_use_is_refused_and_the_first_is_untouched(
    tmp_path: Path,
) -> None:
    """Two runs on one --out: the second is refused at once, whatever its flags.

    Reproduces a 20-round ``--overwrite`` run started on the directory of a
    longer run still streaming its metrics: both wrote the same
    ``metrics.jsonl.partial``, and the directory ended with the long run's
    rows, a torn line, and the short run's config.toml and summary.json.
    """
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    long = ["--set", "train.rounds=60", "--set", "train.checkpoint_every=0"]
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "adaquantfl", "run", str(config), "--out", str(out), "-q", *long],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        lock = out / LOCK_NAME
        # Wait until the first run owns the directory: it holds the lock (and,
        # without one, once it has written its config).
        while not (
            (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} "))
            or (out / "config.toml").is_file()
        ):
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.01)
        second = [
            cli("run", str(config), "--out", str(out), "-q", "--set", "train.rounds=20", *flags)
            for flags in ([], ["--overwrite"], ["--resume"])
        ]
        still_running = first.poll() is None
        assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert still_running, "the first run ended before the second tried: the test proves nothing"
    for refused in second:
        assert_error_line(refused, "is in use by another run", str(out), f"pid {first.pid} ")
    alone = tmp_path / "alone"
    ran = cli("run", str(config), "--out", str(alone), "-q", *long)
    assert ran.exit_code == 0, ran.output
    assert run_files(out) == run_files(alone)


def test_run_compare_and_report_refuse_a_held_directory_and_write_nothing(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]],
) -> None:
    config, out, before = done
    sets = ["--set", "compare.target_loss=1.0"]
    with ResultsLock(out, "run"):
        held = snapshot(out)
        for args in (
            ["run", str(config), "--out", str(out), "-q", "--overwrite"],
            ["run", str(config), "--out", str(out), "-q", "--resume", "--set", "train.rounds=6"],
            ["compare", str(config), "--out", str(out), "-q", "--overwrite", *sets],
            ["report", str(out)],
        ):
            result = cli(*args)
            assert_error_line(result, "is in use by another run", f"pid {os.getpid()} ")
            assert snapshot(out) == held
    assert snapshot(out) == before  # the lock file goes with the lock


def test_a_lock_file_left_by_a_killed_run_neither_blocks_nor_counts_as_results(
    tmp_path: Path,
) -> None:
    """A crashed run's lock file and partial files do not stop or confuse the next run."""
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    out = tmp_path / "out"
    (out / LABEL).mkdir(parents=True)
    (out / LOCK_NAME).write_text("pid 999999999 on a machine long gone\n")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = out / LABEL / f"metrics.jsonl.{gone}.0123abcd.partial"
    stale.write_text('{"round": 1}\n{"round": 2, "torn')
    ran = cli("run", str(config), "--out", str(out), "-q")  # no --overwrite needed
    assert ran.exit_code == 0, ran.output
    assert not stale.exists() and not (out / LOCK_NAME).exists()
    assert len((out / LABEL / "metrics.jsonl").read_text().splitlines()) == 4
    (out / LOCK_NAME).write_text("pid 999999999 on a machine long gone\n")
    report = cli("report", str(out))
    assert report.exit_code == 0, report.output


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("sets", "fragments"),
    [
        (["train.lr=0.2"], ["train.lr (0.1 -> 0.2)"]),
        (["compression.levels=7"], ["compression.levels (3 -> 7)"]),
        (["train.rounds=2"], ["already ran 4 rounds"]),
        (["train.lr=0.2", "train.rounds=2"], ["train.lr (0.1 -> 0.2)"]),
        (
            ["train.batch_size=4", "data.num_clients=2"],
            ["data.num_clients (3 -> 2)", "train.batch_size (8 -> 4)"],
        ),
    ],
    ids=["lr", "levels-3-to-7", "fewer-rounds", "lr-and-rounds", "two-keys"],
)
def test_a_refused_resume_names_the_changes_and_leaves_every_file(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]], sets: list[str], fragments: list[str]
) -> None:
    config, out, before = done
    args = [a for s in sets for a in ("--set", s)]
    result = cli("run", str(config), "--out", str(out), "-q", "--resume", *args)
    assert_error_line(result, "cannot resume", *fragments)
    assert snapshot(out) == before


def test_resume_with_both_checkpoints_torn_is_refused_and_changes_nothing(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]],
) -> None:
    config, out, _ = done
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        path = out / LABEL / name
        path.write_bytes(path.read_bytes()[:50])
    before = snapshot(out)
    result = cli("run", str(config), "--out", str(out), "-q", "--resume")
    assert_error_line(result, "cannot resume", "torn")
    assert snapshot(out) == before


def test_resume_of_the_same_config_with_more_rounds_continues(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]],
) -> None:
    config, out, _ = done
    more = cli("run", str(config), "--out", str(out), "-q", "--resume", "--set", "train.rounds=6")
    assert more.exit_code == 0, more.output
    assert len((out / LABEL / "metrics.jsonl").read_text().splitlines()) == 6


def test_config_diff_names_nested_and_missing_keys() -> None:
    old = {"train": {"rounds": 4, "lr": 0.1}, "compression": {"options": {"fraction": 0.1}}}
    new = {"train": {"rounds": 9, "lr": 0.1}, "compression": {"options": {}}, "x": {"y": 1}}
    assert config_diff(old, new) == [
        "compression.options ('unset' -> {})",
        "compression.options.fraction (0.1 -> 'unset')",
        "x.y ('unset' -> 1)",
    ]


# --------------------------------------------------------------------------- mistakes


def test_out_pointing_at_a_file_or_below_one_is_an_error_line(tmp_path: Path) -> None:
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, fragment in [(a_file, "is a file"), (a_file / "sub" / "dir", "which is a file")]:
        result = cli("run", str(config), "--out", str(out), "-q")
        assert_error_line(result, fragment)
    assert a_file.read_text() == "mine"


def test_a_message_limit_no_reply_can_meet_is_refused_before_running(tmp_path: Path) -> None:
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    out = tmp_path / "out"
    result = cli("run", str(config), "--out", str(out), "-q", "--set", "train.max_message_bytes=1")
    assert_error_line(result, "[train] max_message_bytes = 1", "every reply would be rejected")
    assert not out.exists()


def test_compare_checks_every_method_before_it_writes_anything(
    done: tuple[Path, Path, dict[str, tuple[str, int, int]]],
) -> None:
    # The first method (s = 3, ~260-byte messages) fits a 400-byte limit; the
    # second (s = 255, ~750 bytes) cannot. Even with --overwrite, the refusal
    # comes before the first method runs, and the earlier run's files stay.
    config, out, before = done
    sets = ["--set", "train.max_message_bytes=400", "--set", "compare.target_loss=1.0", "--set",
            'compare.methods=[{method="qsgd", levels=3}, {method="qsgd", levels=255}]']  # fmt: skip
    result = cli("compare", str(config), "--out", str(out), "-q", "--overwrite", *sets)
    assert_error_line(result, "max_message_bytes = 400", "every reply would be rejected")
    assert snapshot(out) == before


def test_a_run_that_never_accepts_a_reply_says_so(tmp_path: Path) -> None:
    # Entropy messages have no closed-form size, so 40 bytes passes the check at
    # load time; every reply is then rejected, and the CLI must not format None.
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    out = tmp_path / "out"
    sets = ["--set", "train.max_message_bytes=40", "--set", "compression.encoding=entropy"]
    result = cli("run", str(config), "--out", str(out), "-q", *sets)
    assert_error_line(result, "no client reply was accepted in any of its 4 rounds", code=1)
    assert "final train loss -" in result.output
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("batch_size", 10**10, "batch_size = 10000000000: must be <= 65536"),
        ("local_steps", 2**63 - 1, "local_steps = 9223372036854775807: must be <= 1048576 (a"),
        ("batch_size", 2**16, "minibatch draws per round exceeds 2**27"),
    ],
)
def test_local_training_beyond_its_memory_bounds_is_refused_at_load(
    tmp_path: Path, key: str, value: int, fragment: str
) -> None:
    config = tmp_path / "base.toml"
    config.write_text(BASE)
    overrides = [f"train.{key}={value}", "train.local_steps=4096"] if value == 2**16 else []
    with pytest.raises(ConfigError, match=r"must be <=|exceeds"):
        load_config(config, overrides or [f"train.{key}={value}"])
    args = [a for s in (overrides or [f"train.{key}={value}"]) for a in ("--set", s)]
    result = cli("run", str(config), "--out", str(tmp_path / "out"), "-q", *args)
    assert_error_line(result, fragment)
    assert not (tmp_path / "out").exists()
