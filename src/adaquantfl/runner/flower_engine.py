"""``[train] engine = "flower"``: the experiment runner's rounds on Flower's simulation engine.

The same config, data, model and server pieces as the simulator
(:func:`adaquantfl.runner.experiment.load_data`, ``build_model``, ``build_server``),
run as a Flower app on the Ray backend: a ServerApp with
:class:`~adaquantfl.flower.AdaQuantFedAvg`, and a ClientApp whose train
function runs :func:`adaquantfl.fl.client.train_locally`, the simulator's own
steps before compression (``F_i(w_k)``, then local SGD on the (seed, round,
client, "batch") stream), wrapped in :data:`~adaquantfl.flower.adaquant_mod`, which quantizes
and encodes. Every random stream is keyed by (seed, round, client id), so both
engines send the same bytes in every round (tests/test_flower_engine.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from adaquantfl.compression.compressor import default_message_limit
from adaquantfl.data import FederatedData
from adaquantfl.fl.client import LocalTraining, evaluate, train_locally
from adaquantfl.fl.record import RoundRecord
from adaquantfl.flower.layout import ArrayLayout, RecordError
from adaquantfl.flower.messages import (
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PRE_TRAIN_LOSS_KEY,
    Instruction,
    client_id_of,
    single_array_record,
)
from adaquantfl.flower.mod import adaquant_mod
from adaquantfl.flower.strategy import AdaQuantFedAvg
from adaquantfl.models import FlatModel
from adaquantfl.runner.build import EngineRun, build_model, load_data
from adaquantfl.runner.config import Config

__all__ = ["engine_client_app", "flat_layout", "loopback_ray", "ray_backend_config", "run_flower"]

#: A ClientError's text (adaquantfl.fl.client.compress_update, via adaquant_mod): the
#: simulator counts such a client as failed and goes on; any other client
#: failure is a bug, and the simulator would have raised it too.
_DIVERGED = "local training diverged"


def flat_layout(model: FlatModel) -> ArrayLayout:
    """The ArrayRecord layout of a :class:`FlatModel`'s parameters (its named slots)."""
    views = model.unflatten(torch.zeros(model.numel, dtype=torch.float32))
    return ArrayLayout(tuple(views), tuple(tuple(v.shape) for v in views.values()))


def ray_backend_config(num_cpus: int) -> dict[str, object]:
    """Flower simulation backend settings: Ray on loopback only, one CPU per ClientApp."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": num_cpus,
            "num_gpus": 0,
            # Bind Ray's processes to loopback and start no dashboard: the
            # simulation must never listen on or reach other addresses.
            "_node_ip_address": LOOPBACK,
            "include_dashboard": False,
            "logging_level": "WARNING",
        },
    }


LOOPBACK = "127.0.0.1"
#: The environment Ray's processes start with (they inherit it from this one).
_RAY_ENV = {
    # Ray replaces a node address of 127.0.0.1 by "the address other nodes can
    # reach", found by routing a UDP socket to 8.8.8.8, and starts its GCS
    # there (ray._private.services.resolve_ip_for_localhost). With multi-node
    # support off it keeps loopback (ray_constants.ENABLE_RAY_CLUSTER).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # CPU only: keep CUDA_VISIBLE_DEVICES as it is (and skip Ray's warning about it).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Even with usage stats off, Ray's minimal dashboard probes cloud metadata
    # services (169.254.169.254, metadata.google.internal) with `requests`
    # when it starts (UsageStatsHead.run -> get_cluster_config_to_report).
    # A proxy on a closed loopback port turns those probes into an immediate
    # "connection refused" on this machine; loopback traffic bypasses it.
    "http_proxy": f"http://{LOOPBACK}:9",
    "HTTP_PROXY": f"http://{LOOPBACK}:9",
    "no_proxy": f"{LOOPBACK},localhost,::1",
    "NO_PROXY": f"{LOOPBACK},localhost,::1",
}


@contextmanager
def loopback_ray(num_cpus: int) -> Iterator[None]:
    """Start Ray for one simulation on loopback only; Flower's backend uses and stops it.

    Flower's Ray backend starts Ray itself unless it is already running, and
    shuts it down at the end of the simulation. Starting it here lets the
    processes Ray spawns inherit :data:`_RAY_ENV`; this process's environment
    is restored right after.
    """
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        raise RuntimeError(
            "Ray is already running in this process; the Flower engine starts its own"
        )
    # The workers import what this process can import from its working
    # directory (a config's plugin modules, e.g. a compressor of the user's own).
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**_RAY_ENV, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    saved = {key: os.environ.get(key) for key in env}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    # Already read when ray was imported; resolve_ip_for_localhost reads it now.
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        init_args = dict(ray_backend_config(num_cpus)["init_args"])  # type: ignore[call-overload]
        ray.init(**init_args)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    address = ray.get_runtime_context().gcs_address
    if not address.startswith(f"{LOOPBACK}:"):
        ray.shutdown()
        raise RuntimeError(f"Ray started its GCS on {address}, not on loopback")
    try:
        yield
    finally:
        if ray.is_initialized():  # Flower's backend normally shuts it down
            ray.shutdown()


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class _ClientState:
    data: FederatedData
    model: FlatModel
    training: LocalTraining


_CLIENT_STATE: dict[str, _ClientState] = {}


def _client_state(config: Config) -> _ClientState:
    # One copy of the data and model per worker process, not per message.
    key = json.dumps(config.to_dict(), sort_keys=True)
    state = _CLIENT_STATE.get(key)
    if state is None:
        data = load_data(config)
        model, _ = build_model(config, data)
        t = config.train
        state = _ClientState(
            data, model, LocalTraining(t.local_steps, t.batch_size, t.lr, t.prox_mu)
        )
        _CLIENT_STATE.clear()
        _CLIENT_STATE[key] = state
    return state


def _train(config: Config, num_threads: int, msg: Message, context: Context) -> Message:
    """The simulator's client before compression: F_i(w_k), then tau local SGD steps."""
    if torch.get_num_threads() != num_threads:
        # Ray starts each worker with one thread; a different thread count
        # splits matrix products differently and changes the last bits of
        # the update, so the worker uses the driver's count (what the
        # simulator would use on this machine).
        torch.set_num_threads(num_threads)
    state = _client_state(config)
    client_id = client_id_of(context)
    plan = Instruction.of(msg)
    if plan is None:  # adaquant_mod passes only its own train messages on with a plan
        raise RecordError("the engine's train function got a message without an AdaQuantFL plan")
    shard = state.data.clients[client_id]
    # With a compressed downlink adaquant_mod has put x_k here already.
    name, received = single_array_record(msg.content, "the train instruction")
    layout = ArrayLayout.of(received)
    params = layout.flatten(received)
    local, loss = train_locally(
        state.model,
        params,
        shard.x,
        shard.y,
        training=state.training,
        seed=plan.seed,
        round_idx=plan.round_idx,
        client_id=client_id,
    )
    metrics = MetricRecord({PRE_TRAIN_LOSS_KEY: loss, NUM_EXAMPLES_KEY: len(shard)})
    return Message(
        RecordDict({name: layout.to_record(local), METRICS_RECORD: metrics}), reply_to=msg
    )


def engine_client_app(config: Config, num_threads: int | None = None) -> ClientApp:
    """The engine's ClientApp: the simulator's local training, wrapped in ``adaquant_mod``.

    ``num_threads`` (default: this process's ``torch.get_num_threads()``) is
    the intra-op thread count the workers train with.
    """

    def import_plugins(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # Before adaquant_mod rebuilds the compressor from the registry by name.
        config.compression.import_plugins()
        return call_next(msg, context)

    app = ClientApp(mods=[import_plugins, adaquant_mod])
    threads = num_threads or torch.get_num_threads()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(config, threads, msg, context)

    return app


# --------------------------------------------------------------------------- server side


def run_flower(
    config: Config,
    on_record: Callable[[RoundRecord], None],
    *,
    round_timeout_s: float = 600.0,
    num_cpus: int | None = None,
) -> EngineRun:
    """Run ``config.train.rounds`` rounds on Flower's simulation engine (Ray backend).

    Parameters
    ----------
    config : Config
        A single-method config (as :func:`adaquantfl.runner.experiment.run` passes it).
    on_record : callable
        Called after every round, in order, with the round's record (the same
        fields the simulator produces, payload digests included; test metrics
        are a central evaluation of the new global model on ``data.test``).
    round_timeout_s : float
        Longest wait for a round's replies (and for nodes to be available).
    num_cpus : int, optional
        CPUs given to Ray (default: all, at most one per client); one
        ClientApp runs per CPU.

    Returns
    -------
    EngineRun
        The final global model.

    Raises
    ------
    RuntimeError
        If a client failed for any reason other than a diverged update (the
        simulator would have raised it), or the run ended early.
    """
    data = load_data(config)
    model, params = build_model(config, data)
    compressor = config.compression.build_compressor()
    downlink = config.compression.build_downlink_compressor()
    layout = flat_layout(model)
    num_clients = len(data.clients)
    partial = config.clients_per_round < num_clients
    # The strategy builds the run's one FedServer from these, as build_server would.
    strategy = AdaQuantFedAvg(
        config.compression.build_policy(config.train.rounds),
        compressor,
        seed=config.train.seed,
        downlink=downlink,
        downlink_levels=config.compression.downlink_levels if downlink is not None else None,
        num_clients=num_clients if partial else None,
        clients_per_round=config.clients_per_round if partial else None,
        node_wait_s=round_timeout_s,
        record_digests=True,
        max_message_bytes=config.train.max_message_bytes
        or default_message_limit(model.numel, compressor),
        max_weight_share=config.train.max_weight_share,
        fraction_evaluate=0.0,  # central evaluation below, as in the simulator
        min_train_nodes=num_clients,
        min_evaluate_nodes=0,
        min_available_nodes=num_clients,
    )
    records: list[RoundRecord] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        start = time.perf_counter()
        trained = strategy.rounds[-1]
        if trained.round != server_round:
            raise RuntimeError(f"round {server_round} has no training outcome")
        _raise_unexpected_failures(trained)
        due = server_round % config.train.eval_every == 0 or server_round == config.train.rounds
        test_loss: float | None = None
        test_accuracy: float | None = None
        if due:
            flat = layout.flatten(arrays)
            test_loss, test_accuracy = evaluate(model, flat, data.test.x, data.test.y)
        record = replace(
            trained,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            time_s=trained.time_s + time.perf_counter() - start,
        )
        records.append(record)
        on_record(record)
        if test_loss is None or test_accuracy is None:
            return None
        return MetricRecord({"test_loss": test_loss, "test_accuracy": test_accuracy})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(
            grid=grid,
            initial_arrays=layout.to_record(params),
            num_rounds=config.train.rounds,
            timeout=round_timeout_s,
            evaluate_fn=central_evaluate,
        )

    cpus = num_cpus or max(1, min(os.cpu_count() or 1, num_clients))
    previous_level = FLOWER_LOGGER.level
    # The experiment runner owns the console (progress bars); Flower's per-round
    # INFO lines would interleave with them.
    FLOWER_LOGGER.setLevel(logging.WARNING)
    try:
        with loopback_ray(cpus):
            run_simulation(
                server_app=server_app,
                client_app=engine_client_app(config),
                num_supernodes=num_clients,
                backend_config=ray_backend_config(cpus),  # type: ignore[arg-type]
            )
    finally:
        FLOWER_LOGGER.setLevel(previous_level)
    if len(records) != config.train.rounds or strategy.server is None:
        raise RuntimeError(
            f"the Flower run ended after {len(records)} of {config.train.rounds} rounds"
        )
    return EngineRun(strategy.server.params.clone(), model)


def _raise_unexpected_failures(record: RoundRecord) -> None:
    failures = record.failures + record.dropouts
    unexpected = [(n, r) for n, r in failures if _DIVERGED not in r]
    if unexpected:
        node, reason = unexpected[0]
        raise RuntimeError(
            f"round {record.round}: {len(unexpected)} client(s) failed; "
            f"node {node}: {reason}"
        )
