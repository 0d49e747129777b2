"""Memory benchmark: many clients, few participants, bounded RSS.

    python -m benchmarks.memory                      # 10,000 clients, 1% per round, 5 rounds
    python -m benchmarks.memory --clients 1000 --rounds 2   # smaller

Synthetic(1, 1) (the only embedded data set with that many natural clients),
logistic regression, 100 of 10,000 clients per round. The simulator keeps only
the participating clients' state (their stacked parameters and minibatches)
during a round, so the resident set grows by little more than the data set
itself. Reports peak RSS after loading the data and after the rounds, against
the 4 GB target.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from benchmarks._common import RESULTS, machine, write_markdown

TARGET_GB = 4.0


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(clients: int, fraction: float, rounds: int) -> dict[str, float | int]:
    from adaquantfl.runner.build import build_simulator, load_data
    from adaquantfl.runner.config import load_config

    per_round = max(1, round(clients * fraction))
    config = load_config(
        {
            "data": {"dataset": "synthetic", "num_clients": clients},
            "model": {"name": "logreg", "init": "zero"},
            "train": {
                "rounds": rounds,
                "local_steps": 20,
                "batch_size": 10,
                "lr": 0.01,
                "clients_per_round": per_round,
            },
            "compression": {"method": "adaquantfl", "levels": 2},
        }
    )
    start = time.perf_counter()
    data = load_data(config)
    load_s = time.perf_counter() - start
    after_load = peak_rss_gb()
    sim = build_simulator(config, data)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        sim.run_round()
        times.append(time.perf_counter() - t)
    return {
        "clients": clients,
        "clients_per_round": per_round,
        "rounds": rounds,
        "train_samples": sum(len(c) for c in data.clients),
        "load_s": load_s,
        "seconds_per_round": sum(times) / len(times),
        "peak_rss_after_load_gb": after_load,
        "peak_rss_gb": peak_rss_gb(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    r = measure(args.clients, args.fraction, args.rounds)
    ok = r["peak_rss_gb"] < TARGET_GB
    rows = [
        ["clients (per round)", f"{r['clients']} ({r['clients_per_round']})"],
        ["training samples", f"{r['train_samples']:,}"],
        ["data generation (s)", f"{r['load_s']:.1f}"],
        ["seconds per round", f"{r['seconds_per_round']:.3f}"],
        ["peak RSS after loading the data (GB)", f"{r['peak_rss_after_load_gb']:.2f}"],
        ["peak RSS after the rounds (GB)", f"{r['peak_rss_gb']:.2f}"],
        [f"under {TARGET_GB:.0f} GB", "yes" if ok else "NO"],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps({"machine": machine(), **r}, indent=2))
    write_markdown(RESULTS / "memory.md", "Memory", [("many clients", ["", "value"], rows)])


if __name__ == "__main__":
    main()
