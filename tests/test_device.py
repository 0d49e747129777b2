"""``[train] device``: validated when loaded, checked against the machine when built."""

from __future__ import annotations

import pytest
import torch

from adaquantfl.runner.build import build_simulator, training_device
from adaquantfl.runner.config import ConfigError, load_config
from adaquantfl.runner.engines import ENGINES

TINY = {
    "data": {"dataset": "digits", "num_clients": 3},
    "model": {"name": "logreg"},
    "train": {"rounds": 1, "local_steps": 2, "batch_size": 4},
    "compression": {"method": "qsgd", "levels": 3},
}


def config(**train: object) -> object:
    return load_config({**TINY, "train": {**TINY["train"], **train}})


def test_device_defaults_to_cpu_and_names_the_choices() -> None:
    assert config().train.device == "cpu"  # type: ignore[attr-defined]
    with pytest.raises(
        ConfigError, match=r"device = 'tpu' is not allowed; choose one of \['cpu', 'cuda'\]"
    ):
        config(device="tpu")


def test_cuda_without_a_cuda_device_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = config(device="cuda")  # loads: the file may come from a GPU machine
    with pytest.raises(ConfigError, match="PyTorch sees no CUDA device"):
        training_device(cfg)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device = 'cuda'"):
        build_simulator(cfg)  # type: ignore[arg-type]


def test_the_flower_engine_refuses_a_device() -> None:
    with pytest.raises(ConfigError, match="Flower engine's clients train on the CPU"):
        ENGINES["flower"](config(engine="flower", device="cuda"), lambda record: None)  # type: ignore[arg-type]


@pytest.mark.parametrize("vectorize", [True, False], ids=["batched", "per-client"])
def test_an_explicit_cpu_device_gives_the_default_run(vectorize: bool) -> None:
    runs = []
    for train in ({}, {"device": "cpu"}):
        sim = build_simulator(config(vectorize=vectorize, **train))  # type: ignore[arg-type]
        assert sim.device == torch.device("cpu")
        runs.append((sim.run_round(), sim.server.params))
    (a, pa), (b, pb) = runs
    assert a.wire_bits == b.wire_bits and a.train_loss == b.train_loss
    assert torch.equal(pa, pb)
