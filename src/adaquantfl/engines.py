"""From a config to a running federated loop: data, model, server, and the engines.

An engine runs the rounds of one method and hands each round's
:class:`~adaquantfl.sim.simulator.RoundRecord` to a callback. ``sim`` is the
in-process simulator; ``flower`` runs the same client and server code on
Flower's simulation engine (needs the ``flower`` extra).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from adaquantfl.codec import message_bytes
from adaquantfl.compressor import make_compressor
from adaquantfl.config import Config, ConfigError
from adaquantfl.data import FederatedData, load_federated
from adaquantfl.fl.client import LocalTraining
from adaquantfl.fl.server import FedServer
from adaquantfl.models import FlatModel, make_model
from adaquantfl.quantize import MAX_LEVELS
from adaquantfl.rng import torch_generator
from adaquantfl.schedule import make_schedule
from adaquantfl.sim.faults import ClientFaults
from adaquantfl.sim.simulator import RoundRecord, Simulator

__all__ = [
    "ENGINES",
    "Engine",
    "EngineRun",
    "build_model",
    "build_server",
    "build_simulator",
    "load_data",
]

#: Called with the server's state and the number of completed rounds.
CheckpointFn = Callable[[dict[str, Any], int], None]


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
    model = make_model(config.model.name, data.input_shape, data.num_classes)
    params = model.initial_parameters(
        config.model.init, generator=torch_generator(config.train.seed, purpose="init")
    )
    return model, params


def default_message_limit(numel: int, bucket_size: int | None) -> int:
    """The largest payload a well-behaved client can send for a model of ``numel`` entries.

    The larger of a raw float32 message and a packed message at the maximum
    number of levels (which exceeds raw only with very small buckets), plus
    1 KiB for the entropy coder's model description. Anything bigger is
    rejected unread.
    """
    raw = message_bytes(numel, None)
    packed = message_bytes(numel, MAX_LEVELS, bucket_size=bucket_size)
    return max(raw, packed) + 1024


def build_server(config: Config, params: torch.Tensor, **kwargs: Any) -> FedServer:
    """The server of a single-method config: schedule, compressor, message size limit.

    ``[train] max_message_bytes`` bounds the size of a client's payload; by
    default it is :func:`default_message_limit` for the model.
    """
    c = config.compression
    schedule = make_schedule(
        c.method, levels=c.levels, min_levels=c.min_levels, max_levels=c.max_levels
    )
    compressor = make_compressor(encoding=c.encoding, bucket_size=c.bucket_size, norm=c.norm)
    limit = config.train.max_message_bytes or default_message_limit(
        int(params.numel()), c.bucket_size
    )
    return FedServer(params, schedule, compressor, max_message_bytes=limit, **kwargs)


def build_simulator(config: Config, data: FederatedData | None = None) -> Simulator:
    """A ready-to-run simulator for a single-method config."""
    data = data if data is not None else load_data(config)
    model, params = build_model(config, data)
    server = build_server(config, params)
    t = config.train
    return Simulator(
        model,
        data,
        server,
        server.compressor,
        training=LocalTraining(t.local_steps, t.batch_size, t.lr),
        clients_per_round=config.clients_per_round,
        seed=t.seed,
        vectorize=t.vectorize,
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


class Engine(Protocol):
    """Runs the rounds of ``config`` (from ``resume_state`` if given), calling ``on_record``."""

    def __call__(
        self,
        config: Config,
        on_record: Callable[[RoundRecord], None],
        *,
        resume_state: Mapping[str, Any] | None = None,
        on_checkpoint: CheckpointFn | None = None,
    ) -> EngineRun: ...


def sim_engine(
    config: Config,
    on_record: Callable[[RoundRecord], None],
    *,
    resume_state: Mapping[str, Any] | None = None,
    on_checkpoint: CheckpointFn | None = None,
) -> EngineRun:
    """The in-process simulator; checkpoints every ``[train] checkpoint_every`` rounds."""
    sim = build_simulator(config)
    if resume_state is not None:
        sim.server.load_state_dict(resume_state)
    every = config.train.checkpoint_every
    while sim.server.round_idx < config.train.rounds:
        on_record(sim.run_round())
        done = sim.server.round_idx
        if (
            on_checkpoint is not None
            and every
            and (done % every == 0 or done == config.train.rounds)
        ):
            on_checkpoint(sim.server.state_dict(), done)
    return EngineRun(sim.server.params.clone(), sim.model)


def flower_engine(
    config: Config,
    on_record: Callable[[RoundRecord], None],
    *,
    resume_state: Mapping[str, Any] | None = None,
    on_checkpoint: CheckpointFn | None = None,
) -> EngineRun:
    """Flower's simulation engine (Ray backend) running the shared client and server code."""
    if resume_state is not None or (on_checkpoint is not None and config.train.checkpoint_every):
        raise ConfigError(
            "[train] checkpoint_every and --resume are supported by engine = 'sim' only"
        )
    if config.train.dropout or config.train.deadline_s is not None:
        raise ConfigError(
            "[train] dropout and deadline_s simulate faults in engine = 'sim'; on Flower, "
            "faults are real (see the node-failure test), so they cannot be set"
        )
    try:
        from adaquantfl.flower.engine import run_flower
    except ImportError as exc:
        raise ConfigError(
            "[train] engine = 'flower' needs the Flower extra: pip install 'adaquantfl[flower]' "
            f"({exc})"
        ) from None
    result: EngineRun = run_flower(config, on_record)
    return result


#: Engines by ``[train] engine`` name.
ENGINES: dict[str, Engine] = {"sim": sim_engine, "flower": flower_engine}
