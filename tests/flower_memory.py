"""Peak memory of the Flower path's stages, measured in a fresh process (Linux).

    python -m tests.flower_memory '{"numel": 20000000}'

Run by ``tests/test_flower_scale.py`` with glibc told to map every block of
1 MiB and more on its own (``MALLOC_MMAP_THRESHOLD_``), so that freed memory
leaves the resident set at once. A stage's extra peak is ``VmHWM`` at its end
minus ``VmRSS`` at its start, the peak being reset at each stage boundary
through ``/proc/self/clear_refs``: exact, unlike a sampler, and it sees
torch's and numpy's allocations, which tracemalloc does not.

The model is a dict of float32 arrays (and a float16 one, and a BatchNorm-style
buffer that travels beside the update) of about ``numel`` entries; the "train
function" adds a small step to every array, as one SGD step would. Printed:
one JSON object with, per scenario and round, the extra peak bytes of the
mod's work before the train function (``pre``: rebuilding ``x_k`` with a
compressed downlink) and after it (``post``: forming, compressing and
replying), and of the server's ``aggregate_train``.
"""

from __future__ import annotations

import gc
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


class Stages:
    """Marks stage boundaries: the extra peak of every stage since the previous mark."""

    def __init__(self) -> None:
        self.current = ""
        self.start = 0
        self.extra: list[tuple[str, int]] = []

    def mark(self, stage: str) -> None:
        s = _status()
        if self.current:
            self.extra.append((self.current, s["VmHWM"] - self.start))
        Path("/proc/self/clear_refs").write_text("5")
        self.current, self.start = stage, _status()["VmRSS"]

    def take(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stage, extra in self.extra:
            out[stage] = max(out.get(stage, 0), extra)
        self.extra = []
        return out


STAGES = Stages()


def model(numel: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = 2000
    big = numel // 2 // rows
    return {
        "embed.weight": rng.standard_normal((rows, big), dtype=np.float32),
        "fc.weight": rng.standard_normal((big, rows), dtype=np.float32),
        "fc.bias": np.zeros(rows, dtype=np.float32),
        "head.weight": rng.standard_normal((64, 100), dtype=np.float32).astype(np.float16),
        "bn.running_var": np.ones(rows, dtype=np.float32),
    }


def app(with_mod: bool) -> Any:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from adaquantfl.flower import adaquant_mod
    from adaquantfl.flower.layout import npy_array

    def outer(msg: Message, context: Any, call_next: Any) -> Message:
        STAGES.mark("pre")
        reply = call_next(msg, context)
        STAGES.mark("idle")
        return reply

    client = ClientApp(mods=[outer, adaquant_mod] if with_mod else [outer])

    @client.train()
    def train(msg: Message, context: Any) -> Message:
        STAGES.mark("train")
        received = msg.content["arrays"]
        seed = int(msg.content["config"]["server-round"]) * 100 + int(
            context.node_config["partition-id"]
        )
        rng = np.random.default_rng(seed)
        local = {}
        for name, array in received.items():
            values = array.numpy()
            step = rng.standard_normal(values.shape, dtype=np.float32) * 1e-3
            local[name] = npy_array((values + step.astype(values.dtype)).astype(values.dtype))
            del values, step
        metrics = MetricRecord({"pre-train-loss": 1.0, "num-examples": 10 + seed % 7})
        reply = Message(
            RecordDict({"arrays": ArrayRecord(local), "metrics": metrics}), reply_to=msg
        )
        del local
        STAGES.mark("post")
        return reply

    return client


def contexts(nodes: int) -> dict[int, Any]:
    from flwr.app import Context, RecordDict

    return {
        1000 + i: Context(
            run_id=1,
            node_id=1000 + i,
            node_config={"partition-id": i},
            state=RecordDict(),
            run_config={},
        )
        for i in range(nodes)
    }


class Grid:
    """The least a strategy needs of a Grid, delivering to ClientApps in this process."""

    def __init__(self, client: Any, nodes: int) -> None:
        self.client = client
        self.contexts = contexts(nodes)

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: Any = None
    ) -> Any:
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: Any = None) -> list[Any]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self.client(msg, self.contexts[msg.metadata.dst_node_id])
            if reply.has_error():
                raise RuntimeError(reply.error.reason)
            replies.append(reply)
        return replies


def strategy(kind: str, nodes: int) -> Any:
    from flwr.serverapp.strategy import FedAvg

    from adaquantfl.compression import ErrorFeedback, QSGDCompressor
    from adaquantfl.flower import AdaQuant
    from adaquantfl.policy import FixedLevels

    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes)
    s15 = QSGDCompressor("packed", 512)
    options: dict[str, dict[str, Any]] = {
        "qsgd": {"compressor": s15},
        "error-feedback": {"compressor": ErrorFeedback(s15)},
        "downlink": {"compressor": s15, "downlink": QSGDCompressor(), "downlink_levels": 255},
    }
    if kind == "plain":
        return inner
    return AdaQuant(inner, policy=FixedLevels(15), seed=0, **options[kind])


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from adaquantfl.flower.layout import npy_array

    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    w0 = ArrayRecord({k: npy_array(v) for k, v in model(int(spec["numel"])).items()})
    numel = sum(a.numpy().size for k, a in w0.items() if "running" not in k)
    warm(w0)
    out: dict[str, Any] = {"numel": numel, "rounds": []}
    for kind, nodes, rounds in spec["scenarios"]:
        s = strategy(kind, nodes)
        grid = Grid(app(kind != "plain"), nodes)
        arrays = w0
        for server_round in range(1, rounds + 1):
            config = ConfigRecord({"server-round": server_round})
            messages = list(s.configure_train(server_round, arrays, config, grid))
            replies = grid.send_and_receive(messages)
            del messages
            node = STAGES.take()
            STAGES.mark("aggregate")
            arrays, _ = s.aggregate_train(server_round, replies)
            STAGES.mark("")
            del replies
            gc.collect()
            server = STAGES.take()
            out["rounds"].append(
                {"kind": kind, "nodes": nodes, "round": server_round,
                 "pre": node.get("pre", 0), "post": node.get("post", 0),
                 "aggregate": server.get("aggregate", 0)}
            )  # fmt: skip
        del s, grid, arrays
        gc.collect()
    return out


def warm(w0: Any) -> None:
    """Load the codec's kernels and Flower's code paths at a small size, outside the figures."""
    from flwr.app import ArrayRecord, ConfigRecord

    small = ArrayRecord({k: a for k, a in w0.items() if k in ("fc.bias", "bn.running_var")})
    for kind in ("plain", "qsgd", "error-feedback", "downlink"):
        s, grid = strategy(kind, 1), Grid(app(kind != "plain"), 1)
        arrays = small
        for server_round in (1, 2):
            config = ConfigRecord({"server-round": server_round})
            replies = grid.send_and_receive(s.configure_train(server_round, arrays, config, grid))
            arrays, _ = s.aggregate_train(server_round, replies)
    STAGES.take()


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
