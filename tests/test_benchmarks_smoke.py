"""Smoke tests of the benchmarks: their core functions run at tiny sizes (speed is not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchmarks import _common, bits, cnn, codec, entropy_check


def test_codec_benchmark_measures_every_pair_and_its_naive_baseline_round_trips() -> None:
    rows = codec.measure([1000], [1, 255], quick=True)
    assert [(r["numel"], r["levels"]) for r in rows] == [(1000, 1), (1000, 255)]
    for row in rows:
        for key in ("copy", "encode", "decode", "naive_encode", "naive_decode", "entropy_encode"):
            assert row[f"{key}_gbps"] > 0
        assert len(codec.table_rows([row])[0]) == len(codec.HEADER)
    # The naive baseline is a working codec too (same grid, its own noise).
    x = torch.randn(999, generator=torch.Generator().manual_seed(0))
    out = torch.empty(999)
    data = codec.naive_encode(x, 3, torch.Generator().manual_seed(1))
    y = codec.naive_decode(data, 999, 3, out)
    step = float(torch.linalg.vector_norm(x)) / 3
    assert float((y - x).abs().max()) <= step * (1 + 1e-5)


def test_entropy_check_benchmark_times_both_decoders_and_restores_the_check() -> None:
    import adaquantfl.compression.entropy as entropy

    check = entropy._check_canonical
    rows = entropy_check.measure([1000], [1, 255], repeats=1)
    assert [(r["numel"], r["levels"]) for r in rows] == [(1000, 1), (1000, 255)]
    assert all(r["decode_s"] > 0 and r["decode_without_check_s"] > 0 for r in rows)
    assert entropy._check_canonical is check
    assert len(entropy_check.table_rows(rows)[0]) == len(entropy_check.HEADER)


def test_bits_benchmark_orders_the_encodings() -> None:
    updates = [torch.randn(2000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rows = bits.measure(updates, [1, 15])
    for row in rows:
        assert row["ideal"] <= row["entropy"] < row["packed"]
        assert row["formula"] < row["packed"]  # the header is extra
    assert len(bits.table_rows(rows)[0]) == len(bits.HEADER)


def test_bits_benchmark_captures_client_updates() -> None:
    updates = bits.capture_updates(bits.CONFIGS / "mnist1d-floor.toml", [1])
    assert len(updates) == 10 and all(u.numel() == 410 for u in updates)
    assert all(bool(u.abs().sum() > 0) for u in updates)


def test_common_helpers(tmp_path: Path) -> None:
    calls = []
    assert _common.best_time(lambda: calls.append(1), repeats=3, warmup=1) >= 0
    assert len(calls) == 4
    path = _common.write_json("x", {"a": 1}, directory=tmp_path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert {"cpu", "cores", "numba_threads"} <= set(_common.machine())


def test_cnn_benchmark_times_batched_and_per_client_rounds_of_both_regimes() -> None:
    names = cnn.contenders([1])
    assert set(names) == {
        "batched (1 thread)", "per-client (1 thread)", "batched, adaquantfl s0=2 packed (1 thread)"
    }  # fmt: skip
    chosen = {k: v for k, v in names.items() if "adaquantfl" not in k}
    r = cnn.in_process(cnn.REGIMES["cnn1d"].workload, 3, rounds=1, contenders=chosen)
    for times in r.values():
        assert times["best_s"] > 0 and times["first_round_s"] > 0 and times["build_s"] >= 0
    data = cnn.REGIMES["cnn"].workload.data(3)
    assert sum(p.numel() for p in cnn.REGIMES["cnn"].workload.module(data).parameters()) == 28938
