"""Tests of config loading and validation: every bad key or value is named."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from adaquantfl.cli import app
from adaquantfl.runner.config import (
    INT64_MAX,
    CompareConfig,
    CompressionConfig,
    Config,
    ConfigError,
    DataConfig,
    TrainConfig,
    load_config,
    parse_overrides,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.methods()


def test_demo_config_is_the_papers_comparison() -> None:
    cfg = load_config(CONFIGS / "mnist1d-floor.toml")
    assert (cfg.data.dataset, cfg.data.partition, cfg.data.dirichlet_alpha) == (
        "mnist1d",
        "dirichlet",
        0.1,
    )
    assert cfg.data.num_clients == 10 and cfg.clients_per_round == 10
    assert (cfg.model.name, cfg.model.init) == ("logreg", "zero")
    t = cfg.train
    assert (t.lr, t.local_steps, t.batch_size, t.rounds) == (0.1, 20, 10, 500)
    labels = [m.label for m in cfg.methods()]
    assert labels == ["fp32"] + [f"qsgd-s{s}" for s in (1, 2, 3, 4, 7, 8, 15, 16)] + [
        "adaquantfl-s2"
    ]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"train": {"roundz": 3}}, r"unknown key train\.roundz; allowed keys in \[train\]"),
        ({"trian": {}}, r"unknown section\(s\) \['trian'\]"),
        (
            {"data": {"dataset": "imagenet"}},
            r"\[data\] dataset = 'imagenet' is not allowed; choose one of",
        ),
        ({"data": {"partition": "random"}}, r"partition = 'random' is not allowed"),
        ({"model": {"name": "resnet"}}, r"choose one of \['logreg', 'mlp', 'cnn', 'cnn1d'\]"),
        ({"train": {"lr": -1.0}}, r"\[train\] lr = -1.0: must be > 0"),
        ({"train": {"lr": "fast"}}, r"\[train\] lr = 'fast': must be a finite number"),
        ({"train": {"rounds": 2.5}}, r"\[train\] rounds = 2.5: must be an integer"),
        ({"train": {"rounds": True}}, r"rounds = True: must be an integer"),
        (
            {"train": {"engine": "ray"}},
            r"engine = 'ray' is not allowed; choose one of \['sim', 'flower'\]",
        ),
        ({"compression": {"method": "topk"}}, r"method = 'topk' is not allowed"),
        ({"compression": {"encoding": "zip"}}, r"encoding = 'zip' is not allowed"),
        ({"compression": {"levels": 0}}, r"levels = 0: must be >= 1"),
        ({"compression": {"levels": 1, "min_levels": 2}}, r"levels = 1 must lie in \[min_levels"),
        (
            {"compare": {"methods": [{"method": "qsgd", "levls": 2}]}},
            r"methods\[0\]: unknown key compression\.levls",
        ),
        (
            {"compare": {"methods": [{"method": "qsgd", "levels": -2}]}},
            r"methods\[0\]: .*levels = -2",
        ),
        ({"compare": {"smooth_rounds": 0}}, r"smooth_rounds = 0: must be >= 1"),
        (
            {"data": {"num_clients": 3}, "train": {"clients_per_round": 5}},
            r"clients_per_round = 5 exceeds",
        ),
        ({"data": []}, r"\[data\] must be a table"),
    ],
)
def test_bad_keys_and_values_are_named(raw: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=match):
        load_config(raw)


def test_overrides_parse_toml_values_and_bare_words() -> None:
    assert parse_overrides(
        ["train.rounds=5", "data.dataset=digits", 'model.name="mlp"', "train.lr=0.5"]
    ) == [
        ("train", "rounds", 5),
        ("data", "dataset", "digits"),
        ("model", "name", "mlp"),
        ("train", "lr", 0.5),
    ]
    cfg = load_config(CONFIGS / "digits-mlp.toml", ["train.rounds=7", "compression.levels=3"])
    assert cfg.train.rounds == 7 and cfg.compression.levels == 3
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_overrides(["rounds=5"])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_labels_are_unique_and_ints_become_floats() -> None:
    cfg = load_config(
        {
            "train": {"lr": 1},
            "compare": {
                "methods": [
                    {"method": "qsgd", "levels": 2},
                    {"method": "qsgd", "levels": 2, "encoding": "entropy"},
                    {"method": "adaquantfl", "levels": 2, "label": "ada"},
                ]
            },
        }
    )
    assert [m.label for m in cfg.methods()] == ["qsgd-s2", "qsgd-s2-2", "ada"]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_round_trip_through_dict() -> None:
    cfg = load_config(CONFIGS / "mnist1d-floor.toml")
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_max_weight_share_is_a_train_key_the_server_gets() -> None:
    from adaquantfl.runner.build import build_server

    assert load_config({}).train.max_weight_share is None  # off by default
    cfg = load_config({"model": {"name": "logreg"}}, ["train.max_weight_share=0.25"])
    server = build_server(cfg, torch.zeros(8))
    assert server.max_weight_share == 0.25
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="max_weight_share"):
            load_config({}, [f"train.max_weight_share={bad}"])


# --------------------------------------------------------------------------- ranges

TINY = """
[data]
dataset = "digits"
num_clients = 3

[model]
name = "logreg"

[train]
rounds = 1
local_steps = 2
batch_size = 8
lr = 0.1

[compression]
method = "qsgd"
levels = 3
"""


def cli_run(tmp_path: Path, *sets: str) -> Any:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    args = ["run", str(config), "--out", str(tmp_path / "out"), "-q"]
    for item in sets:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def assert_refused(result: Any, *fragments: str) -> None:
    """Exit 2 with an ``error:`` line holding every fragment, and no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error:" in text and "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def numeric_fields() -> list[tuple[str, Any, Any]]:
    sections = {"data": DataConfig, "train": TrainConfig, "compare": CompareConfig,
                "compression": CompressionConfig}  # fmt: skip
    out = []
    for name, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            if kinds & {int, float} and bool not in kinds:
                out.append((f"{name}.{f.name}", f, kinds))
    return out


@pytest.mark.parametrize(
    ("name", "f", "kinds"), numeric_fields(), ids=[n for n, *_ in numeric_fields()]
)
def test_every_numeric_key_has_a_range(name: str, f: Any, kinds: Any) -> None:
    """Each number has a lower bound, and an upper one (integers: 2**63 - 1 at most)."""
    assert "min" in f.metadata, name
    if float in kinds:  # a float without a bound of its own could be 1e308
        assert "max" in f.metadata and "why" in f.metadata, name
    else:
        assert f.metadata.get("max", INT64_MAX) <= INT64_MAX, name


@pytest.mark.parametrize("vectorize", ["true", "false"])
@pytest.mark.parametrize("lr", ["1e39", "3.5e38", "1e30", "2e6"])
def test_a_learning_rate_past_its_range_is_an_error_line_on_both_training_paths(
    tmp_path: Path, lr: str, vectorize: str
) -> None:
    """Reproduces lr = 1e39 ending in a RuntimeError traceback (value cannot be converted to
    float without overflow) from the batched path, while the per-client path ran."""
    result = cli_run(tmp_path, f"train.lr={lr}", f"train.vectorize={vectorize}")
    assert_refused(result, "[train] lr = ", "must be <= 1048576", "allowed range (0, 1048576]",
                   "float32")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sets", "fragments"),
    [
        (["train.prox_mu=1e39"], ["[train] prox_mu = 1e+39", "allowed range [0, 1048576]"]),
        (["train.deadline_s=1.0", "train.client_time_sigma=1e300"],
         ["client_time_sigma = 1e+300", "allowed range [0, 8]", "exp()"]),
        (["train.deadline_s=1.0", "train.round_time_sigma=800.0"],
         ["round_time_sigma = 800.0", "allowed range [0, 8]"]),
        (["train.deadline_s=1e300"], ["deadline_s = 1e+300", "allowed range (0, 2**64]"]),
        (["data.dataset=synthetic", "data.synthetic_beta=1e300"],
         ["synthetic_beta = 1e+300", "allowed range [0, 1048576]", "float32"]),
        (["data.dataset=synthetic", "data.synthetic_alpha=1e39"], ["synthetic_alpha = 1e+39"]),
        (["data.partition=dirichlet", "data.dirichlet_alpha=1e-300"],
         ["dirichlet_alpha = 1e-300", "allowed range [0.001, 1000000]"]),
        (["compare.target_loss=1e300"], ["target_loss = 1e+300", "2**64"]),
        (["train.seed=9223372036854775807", "compare.seeds=2"],
         ["seed = 9223372036854775807", "seeds = 2", "2**63 - 1"]),
        (["compare.seeds=100000"], ["seeds = 100000", "allowed range [1, 1024]"]),
        (["data.dataset=synthetic", "data.num_clients=100000"],
         ["num_clients = 100000", "dataset 'synthetic'", "[1, 65536]"]),
        (["train.uplink_budget_bits=100000000000000000000"], ["2**63 - 1"]),
        (["train.lr=1" + "0" * 400], ["[train] lr = 1000000", "characters): must be a finite"]),
    ],
    ids=["prox-mu", "client-sigma", "round-sigma", "deadline", "synthetic-beta",
         "synthetic-alpha", "dirichlet-alpha", "target-loss", "last-seed", "seeds",
         "synthetic-clients", "budget", "lr-400-digits"],
)  # fmt: skip
def test_a_value_past_its_keys_range_is_refused_naming_key_value_range_and_reason(
    tmp_path: Path, sets: list[str], fragments: list[str]
) -> None:
    """Values that ended in OverflowError tracebacks (a straggler's exp()), float32 overflow of
    generated data, a seed past int64 in the second of a comparison's runs, or a run of
    diverged clients, are refused when the config is loaded, before anything is written."""
    with pytest.raises(ConfigError):
        load_config(None, sets)
    assert_refused(cli_run(tmp_path, *sets), *fragments)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- plugins


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{}['missing']\n", "KeyError: 'missing'"),
        ("def broken(:\n", "SyntaxError: invalid syntax"),
        ("raise RuntimeError('no GPU here\\nsecond line')\n", "RuntimeError: no GPU here"),
        ("1 / 0\n", "ZeroDivisionError: division by zero"),
        ("raise SystemExit(3)\n", "SystemExit: 3"),
        ("raise ValueError('bad option\\nmore')\n", "ValueError: bad option"),
        ("import aq_no_such_module_at_all\n", "ModuleNotFoundError: No module named"),
    ],
    ids=["keyerror", "syntax", "runtime", "zerodivision", "systemexit", "valueerror", "import"],
)
def test_a_plugin_that_fails_to_import_is_an_error_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, fragment: str
) -> None:
    """Reproduces a plugin module that raises on import (anything but ImportError, or a
    syntax error) ending in a traceback; the error names the module and the first line."""
    (tmp_path / "aq_broken_plugin.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = cli_run(tmp_path, "compression.plugins=['aq_broken_plugin']")
    assert_refused(result, "cannot import module 'aq_broken_plugin'", fragment)
    assert "second line" not in result.output and "more" not in result.output
    assert not (tmp_path / "out").exists()
