"""GPT-2-shaped models on Flower: adaquant_mod and AdaQuant(FedAvg) beside plain Flower FedAvg.

    python -m benchmarks.scale                        # 124M and 355M, in process and run_simulation
    python -m benchmarks.scale --model 124m --path inprocess --nodes 2 --nodes 4
    python -m benchmarks.scale --quick                # a 15M toy GPT-2, both paths

Every contender runs the same train function (:func:`benchmarks.gpt2.train_step`:
one SGD step on 2 x 32 random tokens) on the same randomly initialised
GPT-2-shaped model:

- ``flower``: plain Flower, ``FedAvg`` and a ClientApp without mods;
- ``aq-default``: ``AdaQuant(FedAvg(...), policy=AdaQuantLevels(2), seed=0)``
  with the default compressor (QSGD, packed, max-norm buckets of 512) and
  ``ClientApp(mods=[adaquant_mod])``;
- ``aq-s15``: the same at fixed ``s = 15`` (packed, buckets of 512);
- ``aq-s15-ef``: that in ``ErrorFeedback`` (two rounds: the residual exists in the second);
- ``aq-s15-down``: ``aq-s15`` with the compressed downlink
  ``downlink=QSGDCompressor(), downlink_levels=255`` (two rounds: the first
  sends the model in full, the second its compressed change).

Two paths:

- ``inprocess``: the ServerApp's strategy and the nodes' ClientApps in one
  process, through a minimal in-process Grid (:class:`InProcessGrid`), as
  Flower's own strategies are driven by ``Strategy.start``: configure_train,
  send and receive, aggregate_train. Every contender of a model runs in the
  same fresh process, one after the other, from the same initial model; the
  error of what arrives is measured against plain Flower's aggregate of the
  same round.
- ``simulation``: one ``flwr.simulation.run_simulation`` run per contender
  (Ray on 127.0.0.1 as adaquantfl's Flower engine starts it, one CPU per
  ClientApp, 2 nodes), each in a fresh process.

Measured per stage (configure_train, the mod before the train function, the
train function, the mod after it, aggregate_train, the whole round): seconds
and the extra peak resident set, read exactly from the kernel (``VmHWM``,
reset through ``/proc/self/clear_refs`` at each stage boundary; glibc maps
every block of 64 KiB and more on its own, so freed memory leaves the
resident set at once). Per process: the peak resident set (all the Ray
processes of a simulation, sampled every 20 ms). Bytes up and down (the
Arrays' data Flower carries, and ``aq-wire-bits`` / ``aq-downlink-bits``),
and the relative error of what arrives: of the aggregate,
``||w_{k+1} - w^fp32_{k+1}||^2 / ||w^fp32_{k+1} - w_k||^2`` against plain
Flower's FedAvg of the same replies, and per node ``aq-distortion``
(``||C(v) - v||^2 / ||v||^2``).

Results: ``benchmarks/results/scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, describe, machine, write_json, write_markdown

ROOT = Path(__file__).resolve().parents[1]
#: (contender, rounds)
CONTENDERS = {
    "flower": 2,
    "aq-default": 1,
    "aq-s15": 1,
    "aq-s15-ef": 2,
    "aq-s15-down": 2,
}
SIM_CONTENDERS = ("flower", "aq-default", "aq-s15")
#: The environment of every measuring process: big blocks mapped on their own
#: (freed memory leaves the resident set at once), one thread per process.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
#: A measurement is stopped when the machine has less than this available.
MIN_AVAILABLE_BYTES = 2 * 2**30
EVENTS_ENV = "AQF_SCALE_EVENTS"


# --------------------------------------------------------------------------- memory and time


def status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty if it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class Probe:
    """Stage boundaries of one process: time, resident set, and the peak since the last mark.

    :meth:`mark` closes the running stage (its peak is ``VmHWM`` now, its
    start the resident set at the previous mark) and resets the peak to the
    current resident set (``/proc/self/clear_refs``, Linux >= 4.0).
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def mark(self, stage: str, **info: Any) -> None:
        now = time.perf_counter()
        s = status()
        self.events.append({"stage": stage, "t": now, "rss": s["VmRSS"], "hwm": s["VmHWM"], **info})
        Path("/proc/self/clear_refs").write_text("5")

    def stages(self, start: int = 0) -> list[dict[str, Any]]:
        """Each stage since event ``start``: its name, seconds and extra peak bytes."""
        out = []
        events = self.events[start:]
        for a, b in itertools.pairwise(events):
            out.append({**{k: v for k, v in a.items() if k not in ("t", "rss", "hwm")},
                        "s": b["t"] - a["t"], "extra_bytes": b["hwm"] - a["rss"],
                        "start_rss": a["rss"]})  # fmt: skip
        return out

    def peak(self) -> int:
        return max((e["hwm"] for e in self.events), default=0)


PROBE = Probe()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class TreeSampler:
    """Samples the resident set of a process tree every ``interval_s``: per-process and total peaks.

    ``pids`` lists the processes to sample instead of ``root``'s tree.

    Stops the tree's processes (SIGKILL to every one but the root, whose
    measurement is then marked aborted) when the machine runs short of
    memory, so that a measurement never takes the memory other work needs.
    """

    def __init__(
        self, root: int, interval_s: float = 0.02, pids: Callable[[], list[int]] | None = None
    ) -> None:
        self.root = root
        self.interval_s = interval_s
        self.find = pids if pids is not None else (lambda: descendants(root))
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.total_peak = 0
        self.aborted = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tick = 0
        pids = [self.root]
        while not self._stop.is_set():
            if tick % 25 == 0:  # the tree changes slowly; /proc is scanned twice a second
                pids = self.find()
            tick += 1
            total = 0
            for pid in pids:
                rss = status(pid).get("VmRSS", 0)
                total += rss
                if rss > self.peaks.get(pid, 0):
                    self.peaks[pid] = rss
                    if pid not in self.names:
                        with suppress(OSError):
                            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                            self.names[pid] = _process_name(cmd)
            self.total_peak = max(self.total_peak, total)
            if not self.aborted and available_bytes() < MIN_AVAILABLE_BYTES:
                self.aborted = (
                    f"stopped: the machine had less than {MIN_AVAILABLE_BYTES / 2**30:.0f} GiB "
                    f"available (the measured processes held {total / 1e9:.1f} GB)"
                )
                for pid in pids:
                    if pid != self.root:
                        with suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
            time.sleep(self.interval_s)

    def by_kind(self) -> dict[str, int]:
        """Peak resident set per kind of process (the largest process of each kind)."""
        out: dict[str, int] = {}
        for pid, peak in self.peaks.items():
            name = self.names.get(pid, "?")
            out[name] = max(out.get(name, 0), peak)
        return out


def _process_name(cmdline: list[bytes]) -> str:
    text = " ".join(c.decode(errors="replace") for c in cmdline if c)
    for sign, name in (
        ("--simulation-probe", "driver (ServerApp, SuperLink state)"),
        ("--inprocess-probe", "in-process probe (ServerApp and nodes)"),
        ("ray::", "Ray worker (ClientApp)"),
        ("default_worker.py", "Ray worker (ClientApp)"),
        ("raylet", "raylet"),
        ("gcs_server", "Ray GCS"),
        ("flower-superlink", "SuperLink"),
        ("flower-supernode", "SuperNode"),
        ("flwr-clientapp", "ClientApp process"),
        ("flwr-serverapp", "ServerApp process"),
        ("flower-superexec", "SuperExec"),
    ):
        if sign in text:
            return name
    words = text.split()
    if len(words) > 1 and "python" in words[0]:  # a Python script: name it by the script
        return words[1].rsplit("/", 1)[-1][:40]
    return (words[0].rsplit("/", 1)[-1][:40] if words else "") or "?"


# --------------------------------------------------------------------------- the apps


def initial_arrays(shape_name: str) -> Any:
    """The initial global model: a GPT-2 of ``shape_name`` with GPT-2's random init."""
    from flwr.app import ArrayRecord

    from benchmarks.gpt2 import SHAPES, build

    return ArrayRecord(build(SHAPES[shape_name]).state_dict())


_MODELS: dict[str, Any] = {}


def train_model(shape_name: str) -> Any:
    """This process's GPT-2 module for training, without storage of its own (the train
    function assigns it the received arrays)."""
    from benchmarks.gpt2 import SHAPES, meta_model

    if shape_name not in _MODELS:
        _MODELS.clear()
        _MODELS[shape_name] = meta_model(SHAPES[shape_name])
    return _MODELS[shape_name]


def train_function(msg: Any, context: Any) -> Any:
    """The train function of every contender: one SGD step (see :mod:`benchmarks.gpt2`)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from benchmarks.gpt2 import train_step

    PROBE.mark("train")
    config = msg.content["config"]
    model = train_model(str(config["bench-model"]))
    state, loss, n = train_step(
        model,
        msg.content["arrays"].to_torch_state_dict(),
        partition=int(context.node_config["partition-id"]),
        server_round=int(config["server-round"]),
    )
    metrics = {"pre-train-loss": loss, "train_loss": loss, "num-examples": n}
    reply = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    del state
    model.to("meta")  # the trained tensors are in the reply now, as a local model would be
    out = Message(reply, reply_to=msg)
    PROBE.mark("mod-post")
    return out


def probe_mod(msg: Any, context: Any, call_next: Callable[[Any, Any], Any]) -> Any:
    """The outermost mod: marks a node's stages (and writes them out in a Ray worker).

    In a fresh process its first call first imports torch and adaquantfl and
    loads the codec's kernels (:func:`warm_up`), as a stage of its own: a
    one-time cost of a process, not of a round.
    """
    start = len(PROBE.events)
    if not _WARM:
        PROBE.mark("warm-up")
        warm_up()
    PROBE.mark("mod-pre", node=int(context.node_config["partition-id"]))
    reply = call_next(msg, context)
    PROBE.mark("idle")
    path = os.environ.get(EVENTS_ENV)
    if path:
        stages = PROBE.stages(start)
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "stages": stages}) + "\n")
    return reply


def client_app(contender: str) -> Any:
    from flwr.clientapp import ClientApp

    from adaquantfl.flower import adaquant_mod

    mods = [probe_mod] if contender == "flower" else [probe_mod, adaquant_mod]
    app = ClientApp(mods=mods)
    app.train()(train_function)
    return app


def strategy_for(contender: str, nodes: int) -> Any:
    from flwr.serverapp.strategy import FedAvg

    from adaquantfl.compression import ErrorFeedback, QSGDCompressor
    from adaquantfl.flower import AdaQuant
    from adaquantfl.policy import AdaQuantLevels, FixedLevels

    inner = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_evaluate_nodes=0,
        min_available_nodes=nodes,
    )
    if contender == "flower":
        return inner
    s15 = QSGDCompressor("packed", 512)
    options: dict[str, Any] = {
        "aq-default": {"policy": AdaQuantLevels(2)},
        "aq-s15": {"policy": FixedLevels(15), "compressor": s15},
        "aq-s15-ef": {"policy": FixedLevels(15), "compressor": ErrorFeedback(s15)},
        "aq-s15-down": {
            "policy": FixedLevels(15),
            "compressor": s15,
            "downlink": QSGDCompressor(),
            "downlink_levels": 255,
        },
    }[contender]
    return AdaQuant(inner, seed=0, **options)


def array_bytes(content: Any) -> int:
    return sum(len(a.data) for r in content.array_records.values() for a in r.values())


# --------------------------------------------------------------------------- in process


class InProcessGrid:
    """Delivers each message to the ClientApp of its node, in this process, one node at a time.

    A minimal stand-in for the SuperLink (Flower's ``Grid`` contract:
    ``send_and_receive`` returns the replies). It keeps nothing of a round
    but the bytes it carried, so that memory is what Flower itself holds.
    """

    def __init__(self, app: Any, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        # Message() reads the sender's identity from this process-wide record,
        # which a ServerApp process sets on start-up.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app = app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.bytes_down = 0
        self.bytes_up = 0
        self.node_metrics: list[dict[str, Any]] = []

    def as_grid(self) -> Any:
        """This object as a ``flwr.serverapp.Grid`` (built on first use: flwr is imported late)."""
        from flwr.app import Message
        from flwr.serverapp import Grid

        outer = self

        class _Grid(Grid):
            def set_run(self, run: object) -> None:  # type: ignore[override]
                pass

            @property
            def run(self) -> object:  # type: ignore[override]
                raise NotImplementedError

            def create_message(  # type: ignore[override]
                self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                ttl: float | None = None,
            ) -> Any:  # fmt: skip
                return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

            def get_node_ids(self) -> Iterable[int]:
                return list(outer.contexts)

            def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
                raise NotImplementedError

            def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
                raise NotImplementedError

            def send_and_receive(
                self, messages: Iterable[Any], *, timeout: float | None = None
            ) -> Iterable[Any]:
                return outer.send_and_receive(messages)

        return _Grid()

    def send_and_receive(self, messages: Iterable[Any]) -> list[Any]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.bytes_down += array_bytes(msg.content)
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            if reply.has_error():
                raise RuntimeError(f"node {msg.metadata.dst_node_id}: {reply.error.reason}")
            self.bytes_up += array_bytes(reply.content)
            metrics = next(iter(reply.content.metric_records.values()))
            self.node_metrics.append(dict(metrics))
            replies.append(reply)
            del msg
        return replies


def inprocess_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Every contender of ``spec`` in this process: rounds, stages, bytes and errors.

    The contenders take turns, ``repeats`` times over, each from the same
    initial model with a fresh strategy and fresh nodes; a stage's time is
    the fastest of its repeats (on a shared machine other work only ever
    adds time), its memory the largest.
    """
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(1)
    shape_name, nodes = spec["model"], int(spec["nodes"])
    numel = numel_of(shape_name)
    warm_up()
    w0 = initial_arrays(shape_name)
    reference: Any = None  # plain Flower's first aggregate
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(int(spec.get("repeats", 1))):
        for contender in spec["contenders"]:
            strategy = strategy_for(contender, nodes)
            grid = InProcessGrid(client_app(contender), nodes)
            arrays = w0
            for server_round in range(1, CONTENDERS[contender] + 1):
                row, new = _one_round(strategy, grid, arrays, server_round, shape_name, contender)
                if server_round == 1:
                    if contender == "flower":
                        reference = reference if reference is not None else new
                    elif reference is not None:
                        row["aggregate_error"] = _relative_error(new, reference, w0, np)
                runs.setdefault((contender, server_round), []).append(row)
                print(json.dumps(_brief(row)), file=sys.stderr, flush=True)
                arrays = new
                del new
            del strategy, grid, arrays
            gc.collect()
    rows = [_best_of(repeats) for repeats in runs.values()]
    for row in rows:
        row.update(model=shape_name, nodes=nodes, path="inprocess", numel=numel)
    return {"rows": rows, "process_peak_bytes": PROBE.peak(), "numel": numel}


def _one_round(
    strategy: Any, grid: InProcessGrid, arrays: Any, server_round: int, shape_name: str,
    contender: str,
) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """One training round as ``Strategy.start`` runs it; its row and the new global model."""
    import gc

    from flwr.app import ConfigRecord

    config = ConfigRecord({"server-round": server_round, "bench-model": shape_name})
    first = len(PROBE.events)
    grid.bytes_down = grid.bytes_up = 0
    grid.node_metrics = []
    PROBE.mark("configure")
    messages = list(strategy.configure_train(server_round, arrays, config, grid.as_grid()))
    PROBE.mark("send")
    replies = grid.send_and_receive(messages)
    del messages
    PROBE.mark("aggregate")
    new, _ = strategy.aggregate_train(server_round, replies)
    del replies
    PROBE.mark("idle")
    gc.collect()
    row = _round_row(contender, server_round, PROBE.stages(first), grid, numel_of(shape_name))
    if contender != "flower":
        record = strategy.rounds[-1]
        row.update(levels=record.levels, wire_bits=record.wire_bits,
                   downlink_bits=record.downlink_bits, participants=record.participants,
                   distortion=record.distortion)  # fmt: skip
    return row, new


def _best_of(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of a contender's round: the fastest time and the largest memory of each stage."""
    out = dict(repeats[0])
    for key in out:
        if key.endswith("_s"):
            out[key] = min(r[key] for r in repeats)
        elif key.endswith("_bytes") and key not in ("bytes_down", "bytes_up"):
            out[key] = max(r[key] for r in repeats)
    out["repeats"] = len(repeats)
    out["round_s_all"] = [r["round_s"] for r in repeats]
    return out


_WARM: list[bool] = []


def warm_up() -> None:
    """Load and compile the codec's kernels at a small size, outside every measurement."""
    _WARM.append(True)
    import torch

    from adaquantfl.compression import QSGDCompressor
    from adaquantfl.compression.feedback import ClientCompressor
    from adaquantfl.fl.client import compress_update

    x = torch.randn(5000)
    for compressor in (QSGDCompressor(), QSGDCompressor("packed", 512)):
        for s in (2, 15, 255):
            sent = compress_update(x, levels=s, compressor=ClientCompressor(compressor), seed=0,
                                   round_idx=0, client_id=0)  # fmt: skip
            compressor.decompress(sent.payload, numel=x.numel(), levels=s)


def numel_of(shape_name: str) -> int:
    from benchmarks.gpt2 import SHAPES

    return SHAPES[shape_name].numel


def _relative_error(new: Any, reference: Any, w0: Any, np: Any) -> float:
    """``||new - reference||^2 / ||reference - w0||^2`` over every array, in float64 slices."""
    err = ref = 0.0
    for name in reference:
        a = new[name].numpy().reshape(-1)
        b = reference[name].numpy().reshape(-1)
        c = w0[name].numpy().reshape(-1)
        for i in range(0, a.size, 2**20):
            sa, sb, sc = (x[i : i + 2**20].astype(np.float64) for x in (a, b, c))
            err += float(np.square(sa - sb).sum())
            ref += float(np.square(sb - sc).sum())
    return err / ref


def _round_row(
    contender: str, server_round: int, stages: list[dict[str, Any]], grid: Any, numel: int
) -> dict[str, Any]:
    def total(name: str, key: str) -> float:
        return float(sum(st[key] for st in stages if st["stage"] == name))

    def peak(name: str) -> int:
        return max((st["extra_bytes"] for st in stages if st["stage"] == name), default=0)

    node_stages = [st for st in stages if st["stage"] in ("mod-pre", "train", "mod-post")]
    return {
        "contender": contender,
        "round": server_round,
        "numel": numel,
        "round_s": sum(st["s"] for st in stages),
        "configure_s": total("configure", "s"),
        "configure_extra_bytes": peak("configure"),
        "train_s": total("train", "s"),
        "train_extra_bytes": peak("train"),
        "mod_pre_s": total("mod-pre", "s"),
        "mod_pre_extra_bytes": peak("mod-pre"),
        "mod_post_s": total("mod-post", "s"),
        "mod_post_extra_bytes": peak("mod-post"),
        "aggregate_s": total("aggregate", "s"),
        "aggregate_extra_bytes": peak("aggregate"),
        "node_stages": node_stages,
        "bytes_down": grid.bytes_down,
        "bytes_up": grid.bytes_up,
        "node_distortion": [m.get("aq-distortion") for m in grid.node_metrics],
    }


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("model", "path", "nodes", "contender", "round", "round_s", "train_s", "mod_pre_s",
            "mod_post_s", "aggregate_s", "aggregate_error")  # fmt: skip
    out = {k: round(row[k], 3) if isinstance(row.get(k), float) else row.get(k) for k in keep}
    for key in ("mod_pre_extra_bytes", "mod_post_extra_bytes", "aggregate_extra_bytes"):
        out[key.replace("_bytes", "_x")] = round(row[key] / (4 * row["numel"]), 2)
    return out


# --------------------------------------------------------------------------- run_simulation


def instrument(strategy: Any) -> Any:
    """``strategy`` with :data:`PROBE` marks around ``configure_train`` and ``aggregate_train``."""
    inner_configure, inner_aggregate = strategy.configure_train, strategy.aggregate_train

    def configure(*args: Any) -> Any:
        PROBE.mark("configure")
        out = list(inner_configure(*args))
        PROBE.mark("send")
        return out

    def aggregate(*args: Any) -> Any:
        PROBE.mark("aggregate")
        out = inner_aggregate(*args)
        PROBE.mark("idle")
        return out

    strategy.configure_train, strategy.aggregate_train = configure, aggregate
    return strategy


def record_row(record: Any) -> dict[str, Any]:
    """The figures of a ``RoundRecord`` the report uses."""
    return {"round": record.round, "levels": record.levels, "wire_bits": record.wire_bits,
            "downlink_bits": record.downlink_bits, "participants": record.participants,
            "distortion": record.distortion}  # fmt: skip


def simulation_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``run_simulation`` round of one contender, 2 nodes, in this process and Ray's."""
    import tempfile

    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from adaquantfl.runner.flower_engine import loopback_ray, ray_backend_config

    shape_name, contender, nodes = spec["model"], spec["contender"], int(spec["nodes"])
    rounds = int(spec.get("rounds", 1))
    numel = numel_of(shape_name)
    events = Path(tempfile.mkdtemp(prefix="aqf-scale-")) / "events.jsonl"
    os.environ[EVENTS_ENV] = str(events)
    server_stages: list[dict[str, Any]] = []
    records: list[Any] = []
    model_bytes: list[int] = []

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = instrument(strategy_for(contender, nodes))
        arrays = initial_arrays(shape_name)
        model_bytes.append(sum(len(a.data) for a in arrays.values()))
        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=rounds,
            timeout=3600,
            train_config=ConfigRecord({"bench-model": shape_name}),
        )
        server_stages.extend(PROBE.stages())
        if contender != "flower":
            records.extend(strategy.rounds)

    before = status()["VmRSS"]
    started = time.perf_counter()
    warm_up()  # as in a ServerApp that ran a round before: measured apart
    warm_up_s, warm_up_bytes = time.perf_counter() - started, status()["VmRSS"] - before
    started = time.perf_counter()
    with TreeSampler(os.getpid()) as sampler, loopback_ray(2):
        run_simulation(
            server_app=server_app,
            client_app=client_app(contender),
            num_supernodes=nodes,
            backend_config=ray_backend_config(2),  # type: ignore[arg-type]
        )
    wall_s = time.perf_counter() - started
    lines = events.read_text().splitlines() if events.exists() else []
    node_rows = [json.loads(line) for line in lines]
    out: dict[str, Any] = {
        **spec,
        "numel": numel,
        "model_bytes": model_bytes[0] if model_bytes else 0,
        "wall_s": wall_s,
        "driver_warm_up_s": warm_up_s,
        "driver_warm_up_bytes": warm_up_bytes,
        "server_stages": server_stages,
        "nodes_stages": node_rows,
        "process_peaks": sampler.by_kind(),
        "total_peak_bytes": sampler.total_peak,
        "aborted": sampler.aborted,
    }
    if records:
        out["records"] = [record_row(r) for r in records]
    return out


# --------------------------------------------------------------------------- report

INPROCESS_HEADER = [
    "model", "nodes", "contender", "round", "round s", "x plain", "train fn s/node",
    "mod s/node", "aggregate s", "node extra / 4d (before, after train)",
    "aggregate extra / 4d", "agg. extra - plain's / 4d", "MB down", "MB up",
    "aggregate rel. error", "node rel. error",
]  # fmt: skip
SIMULATION_HEADER = [
    "model", "contender", "round s", "x plain", "whole run s", "train fn s/node",
    "mod s/node", "aggregate s", "node extra / 4d (after train)", "aggregate extra / 4d",
    "peak RSS GB: driver", "each Ray worker", "all processes", "MB down", "MB up",
    "node rel. error",
]  # fmt: skip


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _x(n: float, numel: int) -> str:
    return f"{n / (4 * numel):.2f}"


def inprocess_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for probe in results:
        if "failed" in probe:
            why = f"failed: {probe['failed']}"
            rows.append([probe["model"], str(probe["nodes"]), "all", "", why]
                        + [""] * (len(INPROCESS_HEADER) - 5))  # fmt: skip
            continue
        plain = {r["round"]: r for r in probe["rows"] if r["contender"] == "flower"}
        for r in probe["rows"]:
            base = plain.get(r["round"])
            nodes, numel = r["nodes"], r["numel"]
            over = r["aggregate_extra_bytes"] - base["aggregate_extra_bytes"] if base else None
            errors = [e for e in r["node_distortion"] if e is not None]
            rows.append([
                r["model"], str(nodes), r["contender"], str(r["round"]), f"{r['round_s']:.2f}",
                f"{r['round_s'] / base['round_s']:.2f}" if base else "",
                f"{r['train_s'] / nodes:.2f}",
                f"{(r['mod_pre_s'] + r['mod_post_s']) / nodes:.2f}",
                f"{r['aggregate_s']:.2f}",
                f"{_x(r['mod_pre_extra_bytes'], numel)}, {_x(r['mod_post_extra_bytes'], numel)}",
                _x(r["aggregate_extra_bytes"], numel),
                _x(over, numel) if over is not None else "",
                _mb(r["bytes_down"]), _mb(r["bytes_up"]),
                f"{r['aggregate_error']:.3g}" if r.get("aggregate_error") is not None else "",
                f"{sum(errors) / len(errors):.3g}" if errors else "",
            ])  # fmt: skip
    return rows


def simulation_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    plain = {p["model"]: p for p in results if p["contender"] == "flower" and "failed" not in p}
    for p in results:
        if "failed" in p or p.get("aborted"):
            why = p.get("failed") or p.get("aborted")
            rows.append([p["model"], p["contender"], f"failed: {why}"]
                        + [""] * (len(SIMULATION_HEADER) - 3))  # fmt: skip
            continue
        numel, nodes = p["numel"], p["nodes"]
        server = {st["stage"]: st for st in p["server_stages"]}
        round_s = sum(st["s"] for st in p["server_stages"])
        node = [st for n in p["nodes_stages"] for st in n["stages"]]

        def total(stage: str, stages: list[dict[str, Any]] = node) -> float:
            return sum(st["s"] for st in stages if st["stage"] == stage)

        def peak(stage: str, stages: list[dict[str, Any]] = node) -> int:
            return max((st["extra_bytes"] for st in stages if st["stage"] == stage), default=0)

        base = plain.get(p["model"])
        base_round = sum(st["s"] for st in base["server_stages"]) if base else 0.0
        kinds = p["process_peaks"]
        records = p.get("records") or []
        up = sum(r["wire_bits"] for r in records) / 8 if records else nodes * p["model_bytes"]
        down = sum(r["downlink_bits"] for r in records) / 8 if records else nodes * p["model_bytes"]
        errors = [r["distortion"] for r in records if r["distortion"] is not None]
        rows.append([
            p["model"], p["contender"], f"{round_s:.1f}",
            f"{round_s / base_round:.2f}" if base_round else "", f"{p['wall_s']:.0f}",
            f"{total('train') / nodes:.2f}",
            f"{(total('mod-pre') + total('mod-post')) / nodes:.2f}",
            f"{server['aggregate']['s']:.2f}" if "aggregate" in server else "",
            _x(peak("mod-post"), numel),
            _x(server["aggregate"]["extra_bytes"], numel) if "aggregate" in server else "",
            f"{kinds.get('driver (ServerApp, SuperLink state)', 0) / 1e9:.2f}",
            f"{kinds.get('Ray worker (ClientApp)', 0) / 1e9:.2f}",
            f"{p['total_peak_bytes'] / 1e9:.2f}", _mb(down), _mb(up),
            f"{errors[0]:.3g}" if errors else "",
        ])  # fmt: skip
    return rows


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    if results["inprocess"]:
        out.append(("In process (one process: the strategy, and the nodes one after the other)",
                    INPROCESS_HEADER, inprocess_rows(results["inprocess"])))  # fmt: skip
    if results["simulation"]:
        out.append(("run_simulation (Ray on 127.0.0.1, 2 nodes, one CPU each), one round",
                    SIMULATION_HEADER, simulation_rows(results["simulation"])))  # fmt: skip
    return out


# --------------------------------------------------------------------------- driver


def run_probe(kind: str, spec: dict[str, Any], timeout_s: float = 3600) -> dict[str, Any]:
    """``kind`` probe of ``spec`` in a fresh Python process (:data:`PROBE_ENV`); its result."""
    env = {**os.environ, **PROBE_ENV}
    with subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", f"--{kind}-probe", json.dumps(spec)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
    ) as proc, TreeSampler(proc.pid, interval_s=0.05) as sampler:  # fmt: skip
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = sampler.aborted or f"exit status {proc.returncode}"
        return {**spec, "failed": why, "total_peak_bytes": sampler.total_peak}
    result: dict[str, Any] = json.loads(lines[-1])
    result["tree_peak_bytes"] = sampler.total_peak
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=["toy", "124m", "270m", "355m"])
    parser.add_argument("--path", action="append", choices=["inprocess", "simulation"])
    parser.add_argument("--nodes", type=int, action="append", help="in process (default 2 and 4)")
    parser.add_argument("--contender", action="append", choices=list(CONTENDERS))
    parser.add_argument("--quick", action="store_true", help="the toy model only")
    parser.add_argument("--repeats", type=int, default=3, help="in-process rounds per contender")
    parser.add_argument("--out", default="scale", help="results name (benchmarks/results/NAME.*)")
    parser.add_argument("--inprocess-probe", help=argparse.SUPPRESS)
    parser.add_argument("--simulation-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The probes run from the module by its import name, not as __main__: Ray
    # pickles the ClientApp's functions by reference, and its workers import them.
    from benchmarks import scale

    if args.inprocess_probe:
        print(json.dumps(scale.inprocess_probe(json.loads(args.inprocess_probe))))
        return
    if args.simulation_probe:
        print(json.dumps(scale.simulation_probe(json.loads(args.simulation_probe))))
        return
    models = args.model or (["toy"] if args.quick else ["124m", "355m"])
    paths = args.path or ["inprocess", "simulation"]
    contenders = args.contender or list(CONTENDERS)
    load = Path("/proc/loadavg").read_text().split()[:3]
    inprocess, simulation = [], []
    for shape_name in models:
        if "inprocess" in paths:
            for nodes in args.nodes or ([2] if shape_name == "355m" else [2, 4]):
                spec = {"model": shape_name, "nodes": nodes, "contenders": contenders,
                        "repeats": args.repeats}  # fmt: skip
                print(f"in process: {spec}", flush=True)
                inprocess.append(run_probe("inprocess", spec))
        if "simulation" in paths:
            for contender in [c for c in contenders if c in SIM_CONTENDERS]:
                spec = {"model": shape_name, "nodes": 2, "contender": contender}
                print(f"run_simulation: {spec}", flush=True)
                simulation.append(run_probe("simulation", spec))
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    info = {**machine(), "loadavg_before": load, "loadavg_after": load_after}
    results = {"machine": info, "inprocess": inprocess, "simulation": simulation}
    path = write_json(args.out, results)
    write_markdown(RESULTS / f"{args.out}.md", "Flower at model scale", tables(results))
    print(describe(info), f"; load average {' '.join(load)} -> {' '.join(load_after)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
