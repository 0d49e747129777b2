"""ServerApp: Flower's FedAvg loop with AdaQuantFedAvg, central evaluation, results on disk.

The results directory (run config ``results-dir``) gets, as the run goes:

    metrics.jsonl   one row per round: round, levels, wire_bits, formula_bits,
                    downlink_bits, train_loss, test_loss, test_accuracy,
                    participants, rejected, dropped, time_s
    model.pt        the final global model (state_dict)
    summary.json    written last: initial and final test loss/accuracy, rounds,
                    "complete": true
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from task import load_data, make_model, mean_loss

from adaquantfl.compression import QSGDCompressor
from adaquantfl.flower import AdaQuantFedAvg
from adaquantfl.policy import make_schedule

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
    strategy = AdaQuantFedAvg(
        make_schedule(str(run["method"]), levels=int(run["levels"])),
        QSGDCompressor(encoding=str(run["encoding"])),
        seed=seed,
        node_wait_s=float(run["node-wait-s"]),
        # 0: the largest payload an honest node can send for this model (the default).
        max_message_bytes=int(run["max-message-bytes"]) or None,
        fraction_evaluate=0.0,  # central evaluation below
        min_train_nodes=min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=min_nodes,
    )
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
            o = done.outcome
            row.update(
                levels=o.levels,
                wire_bits=o.wire_bits,
                formula_bits=o.formula_bits,
                downlink_bits=done.downlink_bits,
                train_loss=o.train_loss,
                participants=o.participants,
                rejected=o.rejected,
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
        "initial_test_loss": history[0]["test_loss"],
        "final_test_loss": history[-1]["test_loss"],
        "initial_test_accuracy": history[0]["test_accuracy"],
        "final_test_accuracy": history[-1]["test_accuracy"],
        "total_wire_bits": sum(int(r.get("wire_bits", 0)) for r in history),  # type: ignore[call-overload]
        "time_s": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
