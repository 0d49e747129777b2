"""From a config to the pieces of a run: data, model, server and simulator.

Shared by every engine (:mod:`.engines`) and by the Flower engine
(:mod:`.flower_engine`), so that all of them build the same run from a config.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

from adaquantfl.compression.compressor import default_message_limit
from adaquantfl.data import FederatedData, load_federated
from adaquantfl.fl.client import LocalTraining
from adaquantfl.fl.downlink import Downlink
from adaquantfl.fl.server import FedServer
from adaquantfl.models import FlatModel, make_model
from adaquantfl.rng import derive_seed, torch_generator
from adaquantfl.runner.config import Config, ConfigError
from adaquantfl.sim.simulator import ClientFaults, Simulator

__all__ = [
    "EngineRun",
    "build_model",
    "build_server",
    "build_simulator",
    "load_data",
    "training_device",
]


@functools.lru_cache(maxsize=4)
def _cached_data(data_key: str, seed: int) -> FederatedData:
    params = json.loads(data_key)
    return load_federated(seed=seed, **params)


def load_data(config: Config) -> FederatedData:
    """The federated data set of ``config`` (cached per data config and seed)."""
    d = config.data
    key = json.dumps(
        {
            "dataset": d.dataset,
            "num_clients": d.num_clients,
            "partition": d.partition,
            "dirichlet_alpha": d.dirichlet_alpha,
            "shards_per_client": d.shards_per_client,
            "min_client_samples": d.min_client_samples,
            "synthetic_alpha": d.synthetic_alpha,
            "synthetic_beta": d.synthetic_beta,
            "data_dir": d.data_dir,
        },
        sort_keys=True,
    )
    return _cached_data(key, config.train.seed)


def build_model(config: Config, data: FederatedData) -> tuple[FlatModel, torch.Tensor]:
    """The model and its initial flat parameters (stream: seed, "init")."""
    model = make_model(
        config.model.name,
        data.input_shape,
        data.num_classes,
        seed=derive_seed(config.train.seed, purpose="init"),
    )
    params = model.initial_parameters(
        config.model.init, generator=torch_generator(config.train.seed, purpose="init")
    )
    return model, params


def build_server(config: Config, params: torch.Tensor, **kwargs: Any) -> FedServer:
    """The server of a single-method config: policy, compressor, downlink, size limit.

    Built once per run. ``[train] max_message_bytes`` bounds the size of a
    client's payload; by default it is the compressor's largest message for
    the model (:meth:`~adaquantfl.compression.compressor.BaseCompressor.max_message_bytes`).
    """
    c = config.compression
    compressor = c.build_compressor()
    numel = int(params.numel())
    limit = config.train.max_message_bytes or default_message_limit(numel, compressor)
    downlink = Downlink(
        numel, c.build_downlink_compressor(), c.downlink_levels, seed=config.train.seed
    )
    return FedServer(
        params,
        c.build_policy(config.train.rounds),
        compressor,
        max_message_bytes=limit,
        downlink=downlink,
        max_weight_share=config.train.max_weight_share,
        **kwargs,
    )


def training_device(config: Config) -> torch.device:
    """``[train] device`` as a torch device, if this machine has it.

    Raises
    ------
    ConfigError
        If ``device = "cuda"`` and PyTorch sees no CUDA device.
    """
    device = config.train.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "[train] device = 'cuda', but PyTorch sees no CUDA device on this machine "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use device = 'cpu'"
        )
    return torch.device(device)


def build_simulator(config: Config, data: FederatedData | None = None) -> Simulator:
    """A ready-to-run simulator for a single-method config."""
    device = training_device(config)
    data = data if data is not None else load_data(config)
    model, params = build_model(config, data)
    server = build_server(config, params)
    t = config.train
    return Simulator(
        model,
        data,
        server,
        server.compressor,
        training=LocalTraining(t.local_steps, t.batch_size, t.lr, t.prox_mu),
        clients_per_round=config.clients_per_round,
        seed=t.seed,
        vectorize=t.vectorize,
        device=device,
        noise_cost_every=t.noise_cost_every,
        faults=ClientFaults(
            dropout=t.dropout,
            deadline_s=t.deadline_s,
            client_time_s=t.client_time_s,
            client_time_sigma=t.client_time_sigma,
            round_time_sigma=t.round_time_sigma,
        ),
    )


@dataclass
class EngineRun:
    """What an engine hands back after its last round."""

    params: torch.Tensor
    model: FlatModel
