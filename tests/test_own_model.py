"""A user's own model and data set in the simulator: by import path in a config, or from Python."""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import adaquantfl
from adaquantfl.cli import app
from adaquantfl.models import make_model
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import ConfigError, load_config
from tests import ownlib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own-model" / "own-model.toml"

CONFIG: dict[str, Any] = {
    "data": {"dataset": "tests.ownlib:load_blobs", "num_clients": 3},
    "model": {"name": "tests.ownlib:make_net"},
    "train": {"rounds": 6, "local_steps": 3, "batch_size": 16, "lr": 0.2, "seed": 0},
    "compression": {"method": "qsgd", "levels": 3, "bucket_size": 64},
}


def toml(config: dict[str, Any]) -> str:
    import tomli_w

    return tomli_w.dumps(config)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_a_config_names_a_model_and_a_data_set_of_its_own(tmp_path: Path) -> None:
    config = tmp_path / "own.toml"
    config.write_text(toml(CONFIG))
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "qsgd-s3" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == list(range(1, 7))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it trains
    written = tomllib.loads((tmp_path / "out" / "config.toml").read_text())
    assert written["model"]["name"] == "tests.ownlib:make_net"
    assert written["data"]["dataset"] == "tests.ownlib:load_blobs"


def test_compare_takes_a_model_of_its_own(tmp_path: Path) -> None:
    config = {
        **CONFIG,
        "compare": {"methods": [{"method": "fp32"}, {"method": "qsgd", "levels": 1}]},
    }
    result = adaquantfl.compare(config, tmp_path, plots=False)
    assert set(result.summary["methods"]) == {"fp32", "qsgd-s1"}


def test_the_shipped_example_runs_with_its_module_beside_the_config(tmp_path: Path) -> None:
    # The CLI makes modules next to the config importable (netlib.py), as python -m does for
    # the working directory.
    result = CliRunner().invoke(
        app, ["run", str(EXAMPLE), "--out", str(tmp_path), "-q", "--set", "train.rounds=3"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adaquantfl-s2" / "metrics.jsonl").is_file()


def test_a_factory_from_python_is_named_by_its_import_path(tmp_path: Path) -> None:
    plain = {**CONFIG, "model": {"name": "mlp"}, "data": {"dataset": "digits", "num_clients": 3}}
    result = adaquantfl.run(plain, tmp_path, model=ownlib.make_net, data=ownlib.load_blobs)
    written = tomllib.loads((tmp_path / "config.toml").read_text())
    assert written["model"]["name"] == "tests.ownlib:make_net"
    assert written["data"]["dataset"] == "tests.ownlib:load_blobs"
    by_path = adaquantfl.run(CONFIG)
    assert result.metrics == [
        {**r, "time_s": m["time_s"]} for r, m in zip(by_path.metrics, result.metrics, strict=True)
    ]


def test_objects_without_an_import_path_run_in_this_process_and_the_flower_engine_says_why(
    tmp_path: Path,
) -> None:
    module = ownlib.make_net((5,), 3)
    before = [p.detach().clone() for p in module.parameters()]
    result = adaquantfl.run(CONFIG, model=module, data=lambda seed: ownlib.load_blobs(seed))
    assert len(result.metrics) == 6
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    flower = {**CONFIG, "train": {**CONFIG["train"], "engine": "flower"}}
    with pytest.raises(ConfigError, match=r"\[model\] name is a Python object.*import path"):
        adaquantfl.run(flower, tmp_path, model=module)
    assert not any(tmp_path.iterdir())


def test_a_user_model_trains_batched_where_torch_func_can_and_says_why_where_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batched = build_simulator(load_config(CONFIG))
    assert batched.vectorized
    with caplog.at_level(logging.WARNING, logger="adaquantfl.sim.simulator"):
        digits = {**CONFIG, "data": {"dataset": "digits", "num_clients": 3}}
        config = load_config({**digits, "model": {"name": "tests.ownlib:make_item_net"}})
        sim = build_simulator(config)
    assert not sim.vectorized
    assert "per-client training; the model cannot be vmapped" in caplog.text
    assert ".item()" in caplog.text  # the reason is torch's own
    record = sim.run_round()
    assert record.participants == 3


def test_the_batched_path_matches_the_per_client_path_for_a_user_model() -> None:
    runs = []
    for vectorize in (True, False):
        config = load_config({**CONFIG, "train": {**CONFIG["train"], "vectorize": vectorize}})
        sim = build_simulator(config)
        assert sim.vectorized == vectorize
        runs.append([sim.run_round() for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.wire_bits == b.wire_bits  # packed: the size does not depend on the values


def test_a_factory_builds_the_same_model_in_every_run_and_leaves_torchs_generator_alone() -> None:
    state = torch.random.get_rng_state()
    a = make_model("tests.ownlib:make_net", (5,), 3, seed=7)
    b = make_model("tests.ownlib:make_net", (5,), 3, seed=7)
    c = make_model("tests.ownlib:make_net", (5,), 3, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    same = [
        torch.equal(x, y) for x, y in zip(a.module.parameters(), b.module.parameters(), strict=True)
    ]
    other = [
        torch.equal(x, y) for x, y in zip(a.module.parameters(), c.module.parameters(), strict=True)
    ]
    assert all(same) and not any(other)


def test_a_torch_dataset_in_a_mapping_does_as_well_as_tensors() -> None:
    config = load_config({**CONFIG, "data": {"dataset": "tests.ownlib:load_blobs_dataset"}})
    tensors = build_simulator(load_config(CONFIG)).data
    datasets = build_simulator(config).data
    assert datasets.num_classes == tensors.num_classes == 3
    assert datasets.input_shape == (5,)
    assert torch.equal(datasets.test.x, tensors.test.x) and torch.equal(
        datasets.test.y, tensors.test.y
    )


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        (
            "model",
            "tests.nowhere:make",
            "[model] name 'tests.nowhere:make': cannot import module 'tests.nowhere': "
            "ModuleNotFoundError",
        ),
        (
            "model",
            "tests.ownlib:make_nett",
            "[model] name 'tests.ownlib:make_nett': module 'tests.ownlib' has no 'make_nett'",
        ),
        (
            "model",
            "tests.ownlib:make_failing",
            "the factory failed: RuntimeError: the GPU driver is missing",
        ),
        ("model", "tests.ownlib:make_nothing", "the factory returned str, not an nn.Module"),
        ("model", "tests.ownlib:make_batchnorm_net", "models with buffers (e.g. BatchNorm)"),
        ("model", "tests/ownlib.py", "choose one of"),
        ("data", "tests.ownlib:load_negative_labels", "labels must be >= 0, got -1"),
        ("data", "tests.ownlib:load_nan", "x has non-finite values"),
        ("data", "tests.ownlib:load_one_part", "the factory must return (train, test)"),
        ("data", "tests.nowhere:load", "cannot import module 'tests.nowhere'"),
    ],
    ids=lambda v: str(v)[-40:],
)
def test_a_broken_model_or_data_set_is_an_error_line_and_writes_nothing(
    tmp_path: Path, section: str, value: str, message: str
) -> None:
    key = "name" if section == "model" else "dataset"
    config = tmp_path / "bad.toml"
    config.write_text(toml({**CONFIG, section: {**CONFIG[section], key: value}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists() or snapshot(out) == {}
