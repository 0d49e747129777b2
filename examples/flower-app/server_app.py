"""ServerApp: AdaQuantFL around a Flower strategy, central evaluation, results on disk.

Run config ``strategy`` picks the inner strategy: ``fedavg`` (``AdaQuantFedAvg``,
the simulator's exact FedAvg), or ``fedprox``, ``fedadam``, ``fedtrimmedavg``
(Flower's own, wrapped in ``AdaQuant``). The results directory (run config
``results-dir``) gets, as the run goes:

    metrics.jsonl   one row per round: round, levels, wire_bits, formula_bits,
                    downlink_bits, train_loss, test_loss, test_accuracy,
                    participants, rejected, dropped, time_s
    model.pt        the final global model (state_dict)
    summary.json    written last: initial and final test loss/accuracy, rounds,
                    "complete": true

A run in which no round accepted a reply raises ``NoAcceptedRepliesError``:
the run's status is then ``finished:failed`` (``flwr ls``) and no summary is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedProx, FedTrimmedAvg
from task import load_data, make_model, mean_loss

from adaquantfl.compression import QSGDCompressor
from adaquantfl.flower import AdaQuant, AdaQuantFedAvg
from adaquantfl.policy import make_policy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    seed = int(run["seed"])
    rounds = int(run["num-server-rounds"])
    out = Path(str(run["results-dir"])).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("")
    (out / "summary.json").unlink(missing_ok=True)

    # The test set does not depend on how the training data is partitioned.
    test = load_data(str(run["dataset"]), 1, seed).test
    model = make_model(load_data(str(run["dataset"]), 1, seed), seed)
    min_nodes = int(run["min-nodes"])
    strategy = make_strategy(run, min_nodes)
    history: list[dict[str, object]] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        test_loss, test_accuracy = mean_loss(model, test)
        row: dict[str, object] = {
            "round": server_round,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }
        if server_round > 0:
            done = strategy.rounds[-1]
            row.update(
                levels=done.levels,
                wire_bits=done.wire_bits,
                formula_bits=done.formula_bits,
                downlink_bits=done.downlink_bits,
                train_loss=done.train_loss,
                participants=done.participants,
                rejected=done.rejected,
                dropped=done.dropped,
                time_s=done.time_s,
            )
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        history.append(row)
        return MetricRecord({"test_loss": test_loss, "test_accuracy": test_accuracy})

    start = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        timeout=float(run["round-timeout-s"]),
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
    summary = {
        "complete": True,
        "rounds": len(history) - 1,
        "method": str(run["method"]),
        "strategy": str(run["strategy"]),
        "initial_test_loss": history[0]["test_loss"],
        "final_test_loss": history[-1]["test_loss"],
        "initial_test_accuracy": history[0]["test_accuracy"],
        "final_test_accuracy": history[-1]["test_accuracy"],
        "total_wire_bits": sum(int(r.get("wire_bits", 0)) for r in history),  # type: ignore[call-overload]
        "time_s": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def make_strategy(run: Any, min_nodes: int) -> AdaQuant:
    """The run config's strategy, with AdaQuantFL's compression around it."""
    name = str(run["strategy"])
    downlink_levels = int(run["downlink-levels"])
    common: dict[str, Any] = {
        "policy": make_policy(str(run["method"]), levels=int(run["levels"])),
        "compressor": QSGDCompressor(encoding=str(run["encoding"])),
        "seed": int(run["seed"]),
        "node_wait_s": float(run["node-wait-s"]),
        # 0: the largest payload an honest node can send for this model (the default).
        "max_message_bytes": int(run["max-message-bytes"]) or None,
        # 0: the model as Flower's float arrays; else QSGD on the model's change.
        "downlink": QSGDCompressor() if downlink_levels else None,
        "downlink_levels": downlink_levels or None,
    }
    sampling = {
        "fraction_evaluate": 0.0,  # central evaluation in main()
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": min_nodes,
    }
    if name == "fedavg":
        policy = common.pop("policy")
        return AdaQuantFedAvg(policy, **common, **sampling)
    inner = {
        "fedprox": lambda: FedProx(**sampling, proximal_mu=float(run["proximal-mu"])),
        "fedadam": lambda: FedAdam(**sampling, eta=float(run["server-lr"])),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**sampling, beta=float(run["trim-beta"])),
    }
    if name not in inner:
        allowed = ", ".join(["fedavg", *inner])
        raise ValueError(f"run config strategy must be one of {allowed}; got {name!r}")
    # sample_nodes: seeded sampling and a bounded wait for nodes, as AdaQuantFedAvg does.
    return AdaQuant(inner[name](), sample_nodes=True, **common)
