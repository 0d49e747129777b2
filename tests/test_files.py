"""Results files appear whole or not at all, and a failed write keeps the old file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from adaquantfl.runner import files
from adaquantfl.runner.files import StreamedFile, atomic_write, check_out_dir, results_in


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
        assert (tmp_path / "metrics.jsonl.partial").read_text() == "row 1\n"  # flushed
        raise RuntimeError("the run failed")
    assert path.read_text() == "earlier run\n"
    assert not (tmp_path / "metrics.jsonl.partial").exists()
    with StreamedFile(path) as f:
        f.write("row 1\n")
        f.write("row 2\n")
    assert path.read_text() == "row 1\nrow 2\n"
    assert not (tmp_path / "metrics.jsonl.partial").exists()


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
