"""Simulator speed: seconds per round against a plain PyTorch loop and Flower's simulation.

    python -m benchmarks.sim             # 10 and 100 clients, all baselines (a few minutes)
    python -m benchmarks.sim --quick     # fewer rounds, no Flower

Workload (the same everywhere): scikit-learn digits split IID over N clients,
an MLP 64-200-10, full participation, tau = 10 local SGD steps on minibatches
of 32 drawn with replacement, lr 0.05, full precision (raw float32 messages).

Contenders, all in this process or launched from it, on this machine:

- ``batched``: adaquantfl's simulator, all clients of a round in one batched
  computation, with duplicate draws of small clients evaluated once
  (``dedup``), at 1 and 2 torch threads;
- ``batched, no dedup``: the same without deduplication (how much of the gain
  comes from it: exact in math, and only possible when shards are smaller than
  the batch, as at 100 clients here: ~14 examples per client);
- ``per-client``: adaquantfl's per-client path (the one the Flower engine
  matches byte for byte);
- ``plain loop``: a sequential FedAvg written the usual way (``nn.Module``,
  ``torch.optim.SGD``, ``load_state_dict`` per client);
- ``flower``: Flower's simulation engine (Ray backend) running a standard
  FedAvg ServerApp and a ClientApp with the plain loop's client code. Its
  backend configuration is printed: one CPU per client actor.

Every figure is the median seconds per round after warm-up rounds; ratios are
taken against ``batched`` in the same run. The FLOPs of a batched round are
compared with this machine's measured matmul throughput.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import RESULTS, describe, machine, write_json, write_markdown

LOCAL_STEPS = 10
BATCH = 32
LR = 0.05
HIDDEN = 200
#: FLOPs per example and step: forward 2 x (64*200 + 200*10); backward the
#: weight gradients of both layers and the hidden activations' gradient.
FWD_FLOPS = 2 * (64 * HIDDEN + HIDDEN * 10)
TRAIN_FLOPS = FWD_FLOPS + 2 * (64 * HIDDEN + HIDDEN * 10) + 2 * HIDDEN * 10


def config(num_clients: int, *, vectorize: bool, rounds: int = 1000) -> Any:
    from adaquantfl.runner.config import load_config

    return load_config(
        {
            "data": {"dataset": "digits", "partition": "iid", "num_clients": num_clients},
            "model": {"name": "mlp"},
            "train": {
                "rounds": rounds,
                "local_steps": LOCAL_STEPS,
                "batch_size": BATCH,
                "lr": LR,
                "vectorize": vectorize,
            },
            "compression": {"method": "fp32"},
        }
    )


def median_round_s(run_round: Callable[[], object], rounds: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run_round()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run_round()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(num_clients: int, *, vectorize: bool, dedup: bool, threads: int, rounds: int) -> float:
    from adaquantfl.runner.build import build_simulator

    torch.set_num_threads(threads)
    sim = build_simulator(config(num_clients, vectorize=vectorize))
    if sim.trainer is not None:
        sim.trainer.deduplicate = dedup
    return median_round_s(sim.run_round, rounds)


def plain_client(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The usual local training: load the global state, tau SGD steps, return the state."""
    model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(LOCAL_STEPS):
        idx = torch.randint(0, len(y), (BATCH,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain_loop(num_clients: int, *, threads: int, rounds: int) -> float:
    from adaquantfl.data import load_federated
    from adaquantfl.models import MLP

    torch.set_num_threads(threads)
    data = load_federated("digits", num_clients=num_clients, seed=0, partition="iid")
    model = MLP(64, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(len(c) for c in data.clients)
    gen = torch.Generator().manual_seed(0)

    def run_round() -> None:
        nonlocal state
        acc = {k: torch.zeros_like(v) for k, v in state.items()}
        for shard in data.clients:
            local = plain_client(model, state, shard.x, shard.y, gen)
            for k in acc:
                acc[k] += local[k] * (len(shard) / total)
        state = acc

    return median_round_s(run_round, rounds, warmup=1)


@dataclass(frozen=True)
class Workload:
    """A data set, its split over clients and a model (a key of ``adaquantfl.models.MODELS``)."""

    dataset: str
    model: str
    partition: tuple[tuple[str, Any], ...] = (("partition", "iid"),)

    def data(self, num_clients: int) -> Any:
        from adaquantfl.data import load_federated

        return load_federated(self.dataset, num_clients=num_clients, seed=0, **dict(self.partition))

    def module(self, data: Any) -> torch.nn.Module:
        from adaquantfl.models import MODELS

        return MODELS[self.model](data.input_shape, data.num_classes)


#: This benchmark's workload (the MLP on digits, IID).
DIGITS_MLP = Workload("digits", "mlp")


def flower(num_clients: int, *, rounds: int, workload: Workload = DIGITS_MLP) -> dict[str, Any]:
    """Flower's simulation engine with a standard FedAvg app; per-round times from the server.

    The ClientApp trains with :func:`plain_client` on its partition of
    ``workload``'s data (loaded once per worker process).
    """
    import os

    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from adaquantfl.runner.flower_engine import loopback_ray, ray_backend_config

    cpus = min(os.cpu_count() or 1, num_clients)
    backend = ray_backend_config(cpus)
    client_app = ClientApp()
    cache: dict[int, Any] = {}
    initial = workload.module(workload.data(num_clients)).state_dict()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if num_clients not in cache:
            cache[num_clients] = workload.data(num_clients)
        shard = cache[num_clients].clients[int(context.node_config["partition-id"])]
        model = workload.module(cache[num_clients])
        state = msg.content["arrays"].to_torch_state_dict()
        gen = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        local = plain_client(model, state, shard.x, shard.y, gen)
        content = RecordDict(
            {
                "arrays": ArrayRecord(local),
                "metrics": MetricRecord({"num-examples": len(shard)}),
            }
        )
        return Message(content=content, reply_to=msg)

    stamps: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )

        def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            stamps.append(time.perf_counter())
            return None

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=rounds,
            evaluate_fn=stamp,
        )

    start = time.perf_counter()
    with loopback_ray(cpus):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend,  # type: ignore[arg-type]
        )
    # stamps[0] is the evaluation of the initial model (round 0).
    deltas = [b - a for a, b in itertools.pairwise(stamps[1:])]
    return {
        "seconds_per_round": statistics.median(deltas),
        "startup_to_first_round_s": stamps[1] - start,
        "backend_config": backend,
    }


def matmul_gflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e9


def round_flops(num_clients: int, *, dedup: bool) -> float:
    """FLOPs of one batched round: training steps, pre-training losses, test evaluation."""
    from adaquantfl.data import load_federated

    data = load_federated("digits", num_clients=num_clients, seed=0, partition="iid")
    sizes = [len(c) for c in data.clients]
    per_step = max(sizes) if dedup and max(sizes) <= BATCH else BATCH
    train = LOCAL_STEPS * num_clients * per_step * TRAIN_FLOPS
    evaluation = (sum(sizes) + len(data.test)) * FWD_FLOPS
    return float(train + evaluation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no Flower")
    parser.add_argument("--no-flower", action="store_true")
    args = parser.parse_args(argv)
    fast_rounds = 5 if args.quick else 20
    slow_rounds = 2 if args.quick else 5
    peak = {t: matmul_gflops(t) for t in (1, 2)}
    results: dict[str, Any] = {"machine": machine(), "matmul_gflops": peak, "workloads": {}}
    tables = []
    for n in (int(c) for c in args.clients.split(",")):
        r: dict[str, Any] = {}
        r["batched (1 thread)"] = ours(n, vectorize=True, dedup=True, threads=1, rounds=fast_rounds)
        r["batched (2 threads)"] = ours(
            n, vectorize=True, dedup=True, threads=2, rounds=fast_rounds
        )
        r["batched, no dedup (1 thread)"] = ours(
            n, vectorize=True, dedup=False, threads=1, rounds=fast_rounds
        )
        r["per-client (1 thread)"] = ours(
            n, vectorize=False, dedup=False, threads=1, rounds=slow_rounds
        )
        r["plain loop (1 thread)"] = plain_loop(n, threads=1, rounds=slow_rounds)
        r["plain loop (2 threads)"] = plain_loop(n, threads=2, rounds=slow_rounds)
        flower_info = None
        if not (args.quick or args.no_flower):
            flower_info = flower(n, rounds=6)
            r["flower simulation"] = flower_info["seconds_per_round"]
        base = r["batched (2 threads)"]
        rows = [[name, f"{s * 1e3:.1f}", f"{s / base:.1f}x"] for name, s in r.items()]
        flops = round_flops(n, dedup=True)
        for threads in (1, 2):
            s = r[f"batched ({threads} thread{'s' if threads > 1 else ''})"]
            rows.append(
                [
                    f"batched ({threads} thread(s)): GFLOP/s vs matmul peak",
                    f"{flops / s / 1e9:.1f}",
                    f"{flops / s / 1e9 / peak[threads]:.0%} of {peak[threads]:.0f}",
                ]
            )
        title = f"{n} clients: ms per round (ratio = time / batched at 2 threads)"
        if flower_info is not None:
            title += (
                f"; Flower start-up to the first round "
                f"{flower_info['startup_to_first_round_s']:.1f} s, "
                f"backend {flower_info['backend_config']}"
            )
        tables.append((title, ["contender", "ms / round", "x batched"], rows))
        results["workloads"][n] = {
            "seconds_per_round": r,
            "flops_per_round": flops,
            "flower": flower_info,
        }
    write_json("sim", results)
    write_markdown(RESULTS / "sim.md", f"Simulator speed ({describe(machine())})", tables)


if __name__ == "__main__":
    main()
