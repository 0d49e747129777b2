"""A checkpoint is checked, whole, before ``--resume`` writes anything.

A checkpoint whose digest is right may still hold the wrong things (a key
removed, a value of the wrong type, a server at another round than its rows):
it is refused with an ``error:`` line naming what is wrong and every file stays
as it was, or, when only the newest checkpoint is bad, the run resumes from the
previous one. A resume that fails while it writes (a full disk) leaves every
file as it was, with no temporary file behind.
"""

from __future__ import annotations

import hashlib
import io
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import adaquantfl
from adaquantfl.runner.checkpoint import load_checkpoint
from adaquantfl.runner.experiment import RunResult
from tests.test_preflight import assert_error_line, cli, snapshot

CONFIG = """
[data]
dataset = "digits"
num_clients = 4

[model]
name = "{model}"

[train]
rounds = 8
local_steps = 3
batch_size = 16
lr = 0.1
seed = 5
checkpoint_every = 4

[compression]
method = "adaquantfl"
levels = 2
"""
LABEL = "adaquantfl-s2"


def rewrap(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as a checkpoint file with a correct length and SHA-256."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = struct.pack("<4sBQ32s", b"AQCK", 1, len(payload), hashlib.sha256(payload).digest())
    path.write_bytes(header + payload)


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        if callable(value):
            target[keys[-1]] = value(target[keys[-1]])
        else:
            target[keys[-1]] = value

    return mutate


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def mutate(state: dict[str, Any]) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return mutate


def _drop_row_key(state: dict[str, Any]) -> None:
    del state["rows"][-1]["wire_bits"]


#: (id, mutation, what the error line must name)
MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("no-rows", _drop("rows"), "has no 'rows'"),
    ("no-config", _drop("config"), "has no 'config'"),
    ("no-server", _drop("server"), "has no 'server'"),
    ("no-round", _drop("round"), "has no 'round'"),
    ("no-label", _drop("label"), "has no 'label'"),
    ("no-params", _drop("server", "params"), "server state has no 'params'"),
    ("no-round-idx", _drop("server", "round_idx"), "server state has no 'round_idx'"),
    ("no-schedule", _drop("server", "schedule"), "server state has no 'schedule'"),
    ("no-clients", _drop("server", "clients"), "server state has no 'clients'"),
    ("extra-key", _set("extra", value=1), "unexpected keys ['extra']"),
    ("round-str", _set("round", value=str), "its 'round' is a str"),
    ("round-float", _set("round", value=float), "its 'round' is a float"),
    ("round-bool", _set("round", value=True), "its 'round' is a bool"),
    ("round-negative", _set("round", value=-1), "negative"),
    ("rows-dict", _set("rows", value=lambda rows: dict(enumerate(rows))), "'rows' is a dict"),
    ("rows-short", _set("rows", value=lambda rows: rows[:-1]), "metrics rows for round"),
    ("row-key-missing", _drop_row_key, "lacks ['wire_bits']"),
    ("row-value-str", _set("rows", 0, "participants", value="4"), "participants = '4'"),
    ("row-renumbered", _set("rows", 1, "round", value=1), "is numbered round 1"),
    ("row-total-wrong", _set("rows", 0, "cum_wire_bits", value=1), "cum_wire_bits = 1"),
    ("server-behind", _set("server", "round_idx", value=lambda r: r - 1), "server is at round"),
    ("server-ahead", _set("server", "round_idx", value=lambda r: r + 1), "server is at round"),
    ("round-behind", _set("round", value=lambda r: r - 1), "metrics rows for round"),
    ("round-idx-float", _set("server", "round_idx", value=float), "server is at round"),
    ("params-float64", _set("server", "params", value=lambda p: p.double()), "torch.float64"),
    ("params-short", _set("server", "params", value=lambda p: p[:-1]), "not float32 of shape"),
    ("params-list", _set("server", "params", value=lambda p: p.tolist()), "parameters are list"),
    ("schedule-list", _set("server", "schedule", value=[]), "does not load"),
    ("schedule-key", _drop("server", "schedule", "initial_loss"), "does not load"),
    ("schedule-type", _set("server", "schedule", "levels", value="3"), "does not load"),
    ("downlink-str", _set("server", "downlink", value="x"), "does not load"),
    ("clients-id", _set("server", "clients", value={99: {"residual": None}}), "client 99"),
    ("spent-wrong", _set("server", "uplink_bits_spent", value=0), "uplink bits"),
    ("config-str", _set("config", value="rounds = 8"), "'config' is a str"),
    ("config-tensor", _set("config", "train", "lr", value=torch.ones(1)), "not config data"),
    ("label-other", _set("label", value="fp32"), "belongs to method 'fp32'"),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config and the directory of its finished 8-round run: checkpoints of rounds 8 and 4."""
    root = tmp_path_factory.mktemp("resume")
    config = root / "run.toml"
    config.write_text(CONFIG.format(model="logreg"))
    adaquantfl.run(config, root / "done")
    return config, root / "done"


@pytest.fixture(scope="module")
def reference(finished: tuple[Path, Path]) -> RunResult:
    """The same run to 12 rounds without interruption."""
    config, out = finished
    return adaquantfl.run(config, out.parent / "ref", overrides=["train.rounds=12"])


def copy_of(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[1], out)
    return out


@pytest.mark.parametrize(("mutation", "fragment"), [m[1:] for m in MUTATIONS],
                         ids=[m[0] for m in MUTATIONS])  # fmt: skip
def test_a_checkpoint_with_the_wrong_contents_is_refused_and_every_file_stays(
    finished: tuple[Path, Path],
    tmp_path: Path,
    mutation: Callable[[dict[str, Any]], None],
    fragment: str,
) -> None:
    """Both checkpoints re-wrapped with a correct digest after one change: an error line.

    Reproduces resumes from such checkpoints that ended in a traceback
    (KeyError, TypeError, AttributeError), rewrote config.toml before they
    failed, or (the server's round differing from the stored round) exited 0
    with duplicated rounds.
    """
    out = copy_of(finished, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        path = out / LABEL / name
        state, _ = load_checkpoint(path)
        mutation(state)
        rewrap(path, state)
    before = snapshot(out)
    result = cli("run", str(finished[0]), "--out", str(out), "-q", "--resume",
                 "--set", "train.rounds=12")  # fmt: skip
    assert_error_line(result, "cannot resume", "checkpoint.pt ", "checkpoint.pt.prev ", fragment)
    assert snapshot(out) == before


FALLBACK = ("no-params", "server-behind", "rows-short", "schedule-key")


@pytest.mark.parametrize("mutation", [m[1] for m in MUTATIONS if m[0] in FALLBACK], ids=FALLBACK)
def test_a_bad_newest_checkpoint_falls_back_to_the_previous_one(
    finished: tuple[Path, Path],
    reference: RunResult,
    tmp_path: Path,
    mutation: Callable[[dict[str, Any]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the newest checkpoint is bad: the run resumes from round 4 to the same bits."""
    out = copy_of(finished, tmp_path)
    path = out / LABEL / "checkpoint.pt"
    state, _ = load_checkpoint(path)
    mutation(state)
    rewrap(path, state)
    resumed = adaquantfl.run(finished[0], out, resume=True, overrides=["train.rounds=12"])
    assert "trying the previous checkpoint" in caplog.text
    assert torch.equal(resumed.params, reference.params)
    assert [r["round"] for r in resumed.metrics] == list(range(1, 13))


def test_every_policy_and_state_resumes_through_the_checks(tmp_path: Path) -> None:
    """The checks accept every kind of state a run writes: each policy, residuals, downlink."""
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(model="logreg"))
    for sets in (
        ["compression.method=auto"],
        ["compression.method=dadaquant", "compression.levels=1"],
        ["compression.method=dadaquant-client"],
        ["compression.method=qsgd", "compression.error_feedback=true"],
        ["compression.method=fp32", "compression.downlink=qsgd"],
        ["compression.compressor=topk", "compression.options.fraction=0.2",
         "compression.error_feedback=true", "train.clients_per_round=2"],
    ):  # fmt: skip
        reference = adaquantfl.run(config, tmp_path / "ref", overrides=sets, overwrite=True)
        out = tmp_path / "out"
        adaquantfl.run(config, out, overrides=[*sets, "train.rounds=4"], overwrite=True)
        resumed = adaquantfl.run(config, out, overrides=sets, resume=True)
        assert torch.equal(resumed.params, reference.params), sets


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        # A write past the limit fails with EFBIG (the signal it would send is ignored),
        # the way a write to a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_resume_that_fails_to_write_its_checkpoint_leaves_every_file(tmp_path: Path) -> None:
    """A resume whose checkpoint write fails (no room) changes no file and leaves no temp file.

    Reproduces a failed ``--resume`` on a full disk that rewrote config.toml
    (rounds 6 -> 12) and left ``checkpoint.pt.tmp`` behind.
    """
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(model="mlp"))  # 15,010 parameters: a 60 kB checkpoint
    out = tmp_path / "out"
    adaquantfl.run(config, out, overrides=["train.rounds=6", "train.checkpoint_every=3"])
    before = snapshot(out)
    result = subprocess.run(
        [sys.executable, "-m", "adaquantfl", "run", str(config), "--out", str(out), "-q",
         "--resume", "--set", "train.rounds=12", "--set", "train.checkpoint_every=3"],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(30_000),  # config and metrics fit; a checkpoint does not
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert "File too large" in result.stderr
    assert snapshot(out) == before
