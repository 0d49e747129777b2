"""ServerApp of benchmarks.grpc_scale: one round of plain FedAvg or AdaQuant(FedAvg), measured.

Writes ``<results-dir>/result.json``: the strategy's stages (seconds and extra
peak memory, :func:`benchmarks.scale.instrument`), the Arrays' bytes of every
message sent and received (Flower's own message sizes), the round's
``RoundRecord`` figures for adaquantfl, and this process's peak resident set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks import scale
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    out = Path(str(run["results-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    contender, model, nodes = str(run["contender"]), str(run["model"]), int(run["nodes"])
    scale.warm_up()
    strategy = scale.instrument(scale.strategy_for(contender, nodes))
    sizes: dict[str, int] = {"bytes_down": 0, "bytes_up": 0, "messages": 0, "replies": 0}
    send_and_receive = grid.send_and_receive

    def counted(messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        sizes["messages"] += len(messages)
        sizes["bytes_down"] += sum(scale.array_bytes(m.content) for m in messages)
        replies = list(send_and_receive(messages, timeout=timeout))
        sizes["replies"] += len(replies)
        sizes["bytes_up"] += sum(scale.array_bytes(r.content) for r in replies if r.has_content())
        return replies

    grid.send_and_receive = counted  # type: ignore[method-assign]
    arrays = scale.initial_arrays(model)
    model_bytes = sum(len(a.data) for a in arrays.values())
    started = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=int(run["num-server-rounds"]),
        timeout=float(run["round-timeout-s"]),
        train_config=ConfigRecord({"bench-model": model}),
    )
    result: dict[str, Any] = {
        "contender": contender,
        "model": model,
        "numel": scale.numel_of(model),
        "model_bytes": model_bytes,
        "start_s": time.perf_counter() - started,
        "stages": scale.PROBE.stages(),
        **sizes,
        "serverapp_peak_bytes": scale.status()["VmHWM"],
    }
    if contender != "flower":
        result["records"] = [scale.record_row(r) for r in strategy.rounds]
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
