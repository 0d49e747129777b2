"""Results files appear whole or not at all, a failed write keeps the old file, one writer."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from adaquantfl.runner import files
from adaquantfl.runner.files import (
    LOCK_NAME,
    DirectoryInUseError,
    ResultsLock,
    StreamedFile,
    atomic_write,
    check_out_dir,
    results_in,
)


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")
    atomic_write(path, "new")
    atomic_write(tmp_path / "model.pt", b"\x00\x01")
    assert path.read_text() == "new" and (tmp_path / "model.pt").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not tempfile's private 0600


def test_a_failed_atomic_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("the earlier run's")

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "x" * 10_000)
    assert path.read_text() == "the earlier run's"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_a_streamed_file_replaces_the_old_one_only_when_it_completes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("earlier run\n")
    with pytest.raises(RuntimeError), StreamedFile(path) as f:
        f.write("row 1\n")
        assert f.partial.read_text() == "row 1\n"  # flushed
        raise RuntimeError("the run failed")
    assert path.read_text() == "earlier run\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    with StreamedFile(path) as f:
        f.write("row 1\n")
        f.write("row 2\n")
    assert path.read_text() == "row 1\nrow 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_out_dir_checks_and_what_counts_as_results(tmp_path: Path) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(a_file)
    with pytest.raises(ValueError, match="is below"):
        check_out_dir(a_file / "x" / "y")
    check_out_dir(tmp_path / "new" / "dir")  # not there yet: fine
    out = tmp_path / "out"
    (out / "qsgd-s3" / "seed-1").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's own file")
    assert results_in(out) == []  # other files do not make a directory a run's
    (out / "qsgd-s3" / "seed-1" / "model.pt").write_bytes(b"")
    (out / "summary.json").write_text("{}")
    assert results_in(out) == ["qsgd-s3/seed-1/model.pt", "summary.json"]


# --------------------------------------------------------------------------- one writer


def test_a_held_directory_refuses_a_second_lock_naming_the_holder(tmp_path: Path) -> None:
    """A second lock on a results directory fails at once, naming the directory and holder."""
    out = tmp_path / "out"
    with ResultsLock(out, "compare") as held:
        assert held.held and (out / LOCK_NAME).is_file()
        holder = (out / LOCK_NAME).read_text()
        assert holder.startswith(f"pid {os.getpid()} on ") and "adaquantfl compare" in holder
        with pytest.raises(DirectoryInUseError) as refused:
            ResultsLock(out).acquire()
        assert str(out) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    # Removed with the lock, and so are the directories it made, since nothing was written.
    assert not out.exists()
    with ResultsLock(tmp_path / "new" / "dir"):
        (tmp_path / "new" / "dir" / "config.toml").write_text("")
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["config.toml"]


def test_a_lock_held_by_a_killed_process_does_not_block_the_next(tmp_path: Path) -> None:
    """The kernel drops a flock when its holder dies, kill -9 included; its stale file is reused."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from adaquantfl.runner.files import ResultsLock\n"
         f"ResultsLock({str(out)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUseError, match=f"pid {holder.pid} "):
            ResultsLock(out).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # left behind by the killed holder
    with ResultsLock(out) as lock:
        assert lock.held
        assert (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")


def test_temporary_names_are_per_writer_and_orphans_of_dead_writers_are_removed(
    tmp_path: Path,
) -> None:
    """Two writers of one file never share a temporary; only a gone writer's leftovers go."""
    target = tmp_path / "metrics.jsonl"
    with StreamedFile(target) as a, StreamedFile(target) as b:
        assert a.partial != b.partial and str(os.getpid()) in a.partial.name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(dead.stdout)  # that process has exited: its pid names no process now
    names = {
        f"metrics.jsonl.{gone}.0123abcd.partial": False,  # removed
        f".config.toml.{gone}.89abcdef.tmp": False,  # removed
        f".checkpoint.pt.{gone}.00ff00ff.tmp": False,  # removed
        f"metrics.jsonl.{os.getpid()}.0123abcd.partial": True,  # a live writer's: kept
        f"metrics.jsonl.{os.getppid()}.0123abcd.partial": True,
        "metrics.jsonl.partial": True,  # not a name this module gives: not ours to judge
        "notes.txt": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    removed = files.remove_orphans(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items() if not kept)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, kept in names.items() if kept} | {"metrics.jsonl"}


def test_the_lock_file_is_not_a_runs_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 1 on a machine long gone\n")
    assert results_in(out) == []
