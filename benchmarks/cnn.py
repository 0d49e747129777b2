"""Convolutional nets, the paper's regime: seconds per round, batched vs per-client vs Flower.

    python -m benchmarks.cnn             # both regimes, 10 and 100 clients, Flower (~20 min)
    python -m benchmarks.cnn --quick     # 10 clients, 2 rounds, no Flower

Regimes (tau = 10 local steps, minibatches of 32 drawn with replacement, lr 0.05,
full participation, fp32 messages):

- ``cnn1d``: MNIST-1D's ConvBase (5,210 parameters) on MNIST-1D, Dirichlet(0.5);
- ``cnn``: the 2-D CNN (conv5x5(16) - pool - conv5x5(32) - pool - linear,
  28,938 parameters) on mnist-5k, Dirichlet(0.3).

Contenders, on this machine, in this process except Flower:

- ``batched``: adaquantfl's simulator, all participants of a round in one
  computation (hand-written im2col GEMMs for cnn1d, grouped convolutions for
  cnn), at 1 torch thread (``--threads 1,2`` adds 2);
- ``per-client``: adaquantfl's per-client path, one client after another (the
  path the Flower engine matches byte for byte), at 1 thread (its best);
- ``batched, adaquantfl``: the batched round with AdaQuantFL (s0 = 2, packed)
  instead of fp32: what quantizing, encoding and decoding 100 updates adds;
- ``flower``: Flower's simulation engine (Ray backend, one CPU per client
  actor) running a standard FedAvg ServerApp and a ClientApp that trains the
  usual way (``nn.Module``, ``torch.optim.SGD``) -- the harness of
  :mod:`benchmarks.sim`. It does less per round than adaquantfl (no loss on
  the received model over all local data, no test evaluation), so its ratio
  is conservative.

In-process contenders run round by round in turn (batched, per-client,
batched, ...), so a burst of load from elsewhere hits all of them; the figure
is the fastest round of each (other processes only ever add time), with the
median beside it. The machine's load average is recorded before and after.
Warm-up (the first round: oneDNN primitives, first touch of buffers), data
loading and the numba codec's compilation (cold, and from its on-disk cache)
are reported apart from the steady state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks._common import RESULTS, describe, machine, write_json, write_markdown
from benchmarks.sim import BATCH, LOCAL_STEPS, LR, Workload, flower


@dataclass(frozen=True)
class Regime:
    name: str
    title: str
    workload: Workload


REGIMES = {
    "cnn1d": Regime(
        "cnn1d",
        "cnn1d (ConvBase) on MNIST-1D, Dirichlet(0.5)",
        Workload("mnist1d", "cnn1d", (("partition", "dirichlet"), ("dirichlet_alpha", 0.5))),
    ),
    "cnn": Regime(
        "cnn",
        "cnn on mnist-5k, Dirichlet(0.3)",
        Workload("mnist-5k", "cnn", (("partition", "dirichlet"), ("dirichlet_alpha", 0.3))),
    ),
}


def config(workload: Workload, num_clients: int, *, vectorize: bool, method: str) -> Any:
    from adaquantfl.runner.config import load_config

    compression: dict[str, Any] = {"method": method}
    if method == "adaquantfl":
        compression.update(levels=2, encoding="packed")
    return load_config(
        {
            "data": {
                "dataset": workload.dataset,
                "num_clients": num_clients,
                **dict(workload.partition),
            },
            "model": {"name": workload.model},
            "train": {
                "rounds": 1000,
                "local_steps": LOCAL_STEPS,
                "batch_size": BATCH,
                "lr": LR,
                "vectorize": vectorize,
            },
            "compression": compression,
        }
    )


def contenders(threads: list[int]) -> dict[str, tuple[bool, int, str]]:
    """name -> (vectorize, torch threads, compression method)."""
    out = {}
    for t in threads:
        out[f"batched ({t} thread{'s' if t > 1 else ''})"] = (True, t, "fp32")
    # One thread is the per-client path's best here: its ops are too small to
    # share, and at 2 threads the idle OpenMP thread spins, which also slows
    # whatever runs next in this process.
    out["per-client (1 thread)"] = (False, 1, "fp32")
    out["batched, adaquantfl s0=2 packed (1 thread)"] = (True, 1, "adaquantfl")
    return out


def in_process(
    workload: Workload,
    num_clients: int,
    *,
    rounds: int,
    contenders: dict[str, tuple[bool, int, str]],
) -> dict[str, dict[str, float]]:
    """Seconds per round of each contender, measured round by round in turn."""
    from adaquantfl.runner.build import build_simulator

    sims, out = {}, {}
    for name, (vectorize, threads, method) in contenders.items():
        torch.set_num_threads(threads)
        start = time.perf_counter()
        sim = build_simulator(config(workload, num_clients, vectorize=vectorize, method=method))
        built = time.perf_counter() - start
        if sim.vectorized != vectorize:
            raise RuntimeError(f"{name}: the simulator did not take the path asked for")
        start = time.perf_counter()
        sim.run_round()  # warm-up: oneDNN primitives, first touch of the buffers
        out[name] = {"build_s": built, "first_round_s": time.perf_counter() - start}
        sims[name] = sim
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, sim in sims.items():
            torch.set_num_threads(contenders[name][1])
            start = time.perf_counter()
            sim.run_round()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        out[name].update(best_s=min(ts), median_s=statistics.median(ts))
    return out


_NUMBA_PROBE = """
import time, torch
start = time.perf_counter()
from adaquantfl.compression.compressor import COMPRESSORS
c = COMPRESSORS["qsgd"].from_config({"encoding": "packed"})
x = torch.randn(5210, generator=torch.Generator().manual_seed(0))
payload = c.compress(x, 3, generator=torch.Generator().manual_seed(1))
c.decompress(payload, numel=x.numel(), levels=3)
print(time.perf_counter() - start)
"""


def numba_compile_s() -> dict[str, float]:
    """First compress + decompress in a fresh process: numba cache empty, then filled."""
    env = dict(os.environ)
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache
        for label in ("cold cache (compile)", "warm cache (load from disk)"):
            result = subprocess.run(
                [sys.executable, "-c", _NUMBA_PROBE],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            out[label] = float(result.stdout.split()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default="cnn1d,cnn")
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per contender")
    parser.add_argument("--quick", action="store_true", help="10 clients, 2 rounds, no Flower")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument(
        "--threads",
        default="1",
        help="torch threads of the in-process contenders, e.g. 1,2 (on a loaded 2-core "
        "machine 2 threads spin-wait for a core: see the README)",
    )
    args = parser.parse_args(argv)
    clients = [10] if args.quick else [int(c) for c in args.clients.split(",")]
    with_flower = not (args.quick or args.no_flower)
    results: dict[str, Any] = {
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "numba_first_compress_s": numba_compile_s(),
        "torch_compile": "not used",
        "regimes": {},
    }
    tables = []
    for regime in (REGIMES[r] for r in args.regimes.split(",")):
        for n in clients:
            rounds = args.rounds or (2 if args.quick else (5 if n <= 10 else 3))
            load_before = os.getloadavg()
            r = in_process(
                regime.workload,
                n,
                rounds=rounds,
                contenders=contenders([int(t) for t in args.threads.split(",")]),
            )
            flower_info = None
            if with_flower:
                flower_info = flower(n, rounds=4 if n > 10 else 6, workload=regime.workload)
                r["flower simulation"] = {
                    "best_s": flower_info["seconds_per_round"],
                    "median_s": flower_info["seconds_per_round"],
                    "first_round_s": flower_info["startup_to_first_round_s"],
                }
            load_after = os.getloadavg()
            base = r["batched (1 thread)"]["best_s"]
            rows = [
                [
                    name,
                    f"{v['best_s']:.3f}",
                    f"{v['median_s']:.3f}",
                    f"{v['best_s'] / base:.1f}x",
                    f"{v['first_round_s']:.2f}",
                    f"{v['build_s']:.2f}" if "build_s" in v else "",
                ]
                for name, v in r.items()
            ]
            title = (
                f"{regime.title}, {n} clients: seconds per round (x = time / batched at "
                f"1 thread); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
            )
            header = ["contender", "best s", "median s", "x batched", "first round s", "build s"]
            tables.append((title, header, rows))
            results["regimes"].setdefault(regime.name, {})[n] = {
                "seconds_per_round": r,
                "flower": flower_info,
                "rounds": rounds,
                "load_average": [load_before, load_after],
            }
    compile_rows = [[k, f"{v:.2f}"] for k, v in results["numba_first_compress_s"].items()]
    title = "numba codec: first QSGD compress + decompress in a fresh process"
    tables.append((title, ["", "s"], compile_rows))
    results["load_average_end"] = os.getloadavg()
    write_json("cnn", results)
    title = f"Conv nets, seconds per round ({describe(machine())})"
    write_markdown(RESULTS / "cnn.md", title, tables)


if __name__ == "__main__":
    main()
