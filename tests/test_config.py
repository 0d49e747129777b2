"""Tests of config loading and validation: every bad key or value is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaquantfl.runner.config import Config, ConfigError, load_config, parse_overrides

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
