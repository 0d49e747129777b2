"""Compressors by name: the registry, options, config round trips, and a plugin compressor."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from adaquantfl.compression import (
    COMPRESSORS,
    ErrorFeedback,
    QSGDCompressor,
    TopKCompressor,
    compressor_from_config,
    default_message_limit,
    make_compressor,
)
from adaquantfl.compression.codec import CodecError, message_bytes
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist1d-floor.toml"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def plugins() -> ModuleType:
    """``tests.plugins``, imported in the test: test-rounding and test-per-client registered.

    The registries are restored after every test (tests/conftest.py), so no
    other test sees them.
    """
    return importlib.import_module("tests.plugins")


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_built_in_compressors_and_no_test_plugin() -> None:
    assert COMPRESSORS["qsgd"] is QSGDCompressor and COMPRESSORS["topk"] is TopKCompressor
    assert "test-rounding" not in COMPRESSORS  # registered only by tests that import it


def test_importing_a_plugin_module_registers_its_compressor(plugins: ModuleType) -> None:
    assert COMPRESSORS["test-rounding"] is plugins.RoundingCompressor
    assert COMPRESSORS["qsgd"] is QSGDCompressor and COMPRESSORS["topk"] is TopKCompressor


@pytest.mark.parametrize(
    "make",
    [
        lambda p: QSGDCompressor(),
        lambda p: QSGDCompressor("entropy", 64, "max"),
        lambda p: TopKCompressor(0.25),
        lambda p: p.RoundingCompressor(),
    ],
    ids=["qsgd", "qsgd-entropy-64-max", "topk-0.25", "test-rounding"],
)
def test_to_config_round_trips_through_the_registry(make: Any, plugins: ModuleType) -> None:
    compressor = make(plugins)
    config = compressor.to_config()
    assert json.loads(json.dumps(config)) == config  # plain data (a Flower message carries it)
    assert compressor_from_config(config) == compressor


def test_compressors_with_other_options_differ(plugins: ModuleType) -> None:
    # The negative control of the round trip above: equality sees the options.
    assert QSGDCompressor("packed", 64) != QSGDCompressor("packed", 32)
    assert TopKCompressor(0.1) != TopKCompressor(0.2)
    assert QSGDCompressor() != plugins.RoundingCompressor()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("zstd", {}, "unknown compressor 'zstd'; allowed: ["),
        ("qsgd", {"encodng": "packed"}, "allowed: ['encoding', 'bucket_size', 'norm']"),
        ("qsgd", {"encoding": "zip"}, "unknown encoding 'zip'; allowed: ['packed', 'entropy']"),
        ("topk", {"fraction": 0}, "fraction must be a finite number in (0, 1], got 0"),
        ("topk", {"k": 3}, "unknown compressor 'topk' option(s) ['k']; allowed: ['fraction']"),
    ],
)
def test_bad_names_and_options_are_refused_with_what_is_allowed(
    name: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        make_compressor(name, **options)
    assert message in str(info.value)


def test_max_message_bytes_bounds_every_message_of_a_compressor() -> None:
    d = 1000
    x = torch.randn(d, generator=gen())
    for compressor in (QSGDCompressor(), QSGDCompressor("entropy"), TopKCompressor(0.5)):
        limit = compressor.max_message_bytes(d)
        assert limit == default_message_limit(d, compressor)
        assert limit >= message_bytes(d, None)  # full precision always fits
        for levels in (None, 1, 255, 2**24 - 1):
            assert len(compressor.compress(x, levels, generator=gen())) <= limit


def test_qsgd_decompress_refuses_an_encoding_norm_or_bucket_it_was_not_asked_for() -> None:
    x = torch.randn(50, generator=gen())
    packed = QSGDCompressor().compress(x, 3, generator=gen())
    entropy = QSGDCompressor("entropy").compress(x, 3, generator=gen())
    bucketed = QSGDCompressor(bucket_size=10).compress(x, 3, generator=gen())
    server = QSGDCompressor()
    server.decompress(packed, numel=50, levels=3)  # what it asked for
    for payload, reason in [(entropy, "got entropy"), (bucketed, "bucket size")]:
        with pytest.raises(CodecError, match=reason):
            server.decompress(payload, numel=50, levels=3)


def test_error_feedback_sends_the_inner_compressors_bytes() -> None:
    x = torch.randn(100, generator=gen())
    inner = TopKCompressor(0.1)
    wrapped = ErrorFeedback(inner)
    assert wrapped.compress(x, 1, generator=gen()) == inner.compress(x, 1, generator=gen())
    assert wrapped.to_config() == {**inner.to_config(), "error_feedback": True}
    with pytest.raises(ValueError, match="wrap the compressor once"):
        ErrorFeedback(wrapped)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- config


def test_config_selects_a_compressor_with_an_options_table() -> None:
    cfg = load_config(
        CONFIG,
        ["compression.compressor=topk", "compression.options.fraction=0.05",
         "compression.error_feedback=true", "compression.method=qsgd"],
    )  # fmt: skip
    compressor = cfg.compression.build_compressor()
    assert compressor == ErrorFeedback(TopKCompressor(0.05))
    assert cfg.compression.label == "topk-ef"


def test_config_qsgd_keys_and_options_table_agree_or_fail() -> None:
    cfg = load_config(CONFIG, ["compression.bucket_size=64", "compression.options.bucket_size=64"])
    assert cfg.compression.build_compressor() == QSGDCompressor("packed", 64, "l2")
    with pytest.raises(ConfigError, match="contradicts"):  # the file says bucket_size = 0
        load_config(CONFIG, ["compression.options.bucket_size=64"])
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(CONFIG, ["compression.options.encoding=entropy"])  # the file says packed


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compression.compressor=zstd", "compressor = 'zstd' is not allowed; choose one of"),
        ("compression.options.fraction=0.1", "unknown compressor 'qsgd' option(s) ['fraction']"),
        ("compression.downlink=zstd", "downlink = 'zstd' is not allowed"),
        ("compression.plugins=['no.such.module']", "cannot import module 'no.such.module'"),
        ("compression.method=autoo", "method = 'autoo' is not allowed; choose one of"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, [override])
    assert message in str(info.value)


# --------------------------------------------------------------------------- plugin


def test_a_plugin_compressor_runs_through_the_simulator() -> None:
    # The config's `plugins` imports the module: no import of it in this test.
    assert "test-rounding" not in COMPRESSORS
    cfg = load_config(
        CONFIG,
        ["compression.plugins=['tests.plugins']", "compression.compressor=test-rounding",
         "compression.method=qsgd", "compression.levels=7", "train.rounds=5"],
    )  # fmt: skip
    sim = build_simulator(cfg)
    rows = [sim.run_round() for _ in range(5)]
    d = sim.model.numel
    message = COMPRESSORS["test-rounding"]()._max_compressed_bytes(d)
    assert all(r.wire_bits == 8 * message * r.participants for r in rows)
    assert rows[-1].train_loss is not None and rows[-1].train_loss < rows[0].train_loss
    # Round to nearest onto 7 levels of the max-norm: error at most half a step.
    assert all(r.distortion is not None and 0 < r.distortion < 1 for r in rows)


# --------------------------------------------------------------------------- safe defaults


def test_the_default_bounds_the_error_at_any_size_and_the_papers_setting_does_not() -> None:
    # A Gaussian update of 2**20 entries at s = 2. With one l2 norm the relative
    # error is about sqrt(2 d / pi) / s = 408 (it grows with sqrt(d)); with the
    # default max-norm buckets of 512 it is about M^2 / (6 s^2 sigma^2) ~ 0.5 (M,
    # a bucket's largest entry, ~3.3 sigma), under the bound sqrt(512) / s = 11.3.
    d, s = 2**20, 2
    x = torch.randn(d, generator=gen())

    def error(c: QSGDCompressor) -> float:
        back = c.decompress(c.compress(x, s, generator=gen(1)), numel=d, levels=s)
        return float((back.double() - x.double()).square().sum() / x.double().square().sum())

    default, paper = QSGDCompressor(), QSGDCompressor.paper()
    assert (default.bucket_size, default.norm, paper.bucket_size, paper.norm) == (
        512,
        "max",
        None,
        "l2",
    )
    assert error(default) < 1.0 <= default.variance_bound(d, s)
    assert error(paper) > 300
    assert default.variance_bound(d, s) == pytest.approx(512**0.5 / s)


def test_bucket_size_0_is_the_whole_update_as_in_the_wire_format() -> None:
    assert QSGDCompressor(bucket_size=0) == QSGDCompressor(bucket_size=None)
    with pytest.raises(ValueError, match="bucket_size"):
        QSGDCompressor(bucket_size=-1)


def test_a_client_says_once_when_its_updates_arrive_as_noise_and_how_to_fix_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from adaquantfl.compression import ClientCompressor
    from adaquantfl.fl import client

    x = torch.randn(2**16, generator=gen())
    client._NOISY.clear()
    noisy, fine = ClientCompressor(QSGDCompressor.paper()), ClientCompressor(QSGDCompressor())
    with caplog.at_level("WARNING", logger="adaquantfl.fl.client"):
        for cid in range(3):
            out = client.compress_update(
                x, levels=1, compressor=noisy, seed=0, round_idx=0, client_id=cid
            )
            assert out.distortion > 1
        quiet = client.compress_update(
            x, levels=15, compressor=fine, seed=0, round_idx=0, client_id=0
        )
    assert quiet.distortion < 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings  # once, for the noisy compressor only
    assert "relative error" in warnings[0] and 'norm="max"' in warnings[0]
