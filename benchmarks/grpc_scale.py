"""One real deployment round at model scale: a SuperLink and 2 SuperNodes on 127.0.0.1.

    python -m benchmarks.grpc_scale                    # the 270M GPT-2 (fp32 update 1.09 GB)
    python -m benchmarks.grpc_scale --model 124m       # what fits where 270M does not

For each contender (plain Flower ``FedAvg``; ``AdaQuant(FedAvg)`` with the
default settings; optionally more of :data:`benchmarks.scale.CONTENDERS`), a
fresh deployment, as ``tests/test_flower_deployment.py`` and
``examples/flower-app`` run one: ``flower-superlink`` on a free loopback port
with runtime dependency installation off, two ``flower-supernode`` processes
(``--node-config partition-id=i``), and ``flwr run benchmarks/grpc_app`` for
one round of the scale benchmark's train function
(:mod:`benchmarks.grpc_app`). Plain gRPC (``--insecure``) on 127.0.0.1: the
bytes counted are the protocol's own; TLS would add its record framing
(about 0.1%).

Measured:

- whether the round completes, and its time (the ServerApp's
  ``Strategy.start``), with the strategy's and the nodes' stages;
- the bytes through the SuperLink: every TCP connection to its port, from the
  kernel's per-socket counters (``ss -tin``: ``bytes_received`` and
  ``bytes_sent`` of the SuperLink's end), sampled every 100 ms, by the
  process at the other end (ServerApp, SuperNodes, the rest);
- Flower's own message sizes (the Arrays' data of every message the
  ServerApp sent and received) and, for adaquantfl, ``aq-wire-bits`` and
  ``aq-downlink-bits``;
- the peak resident set of every process of the deployment (SuperLink,
  SuperNodes, SuperExec, the ServerApp process, the ``flwr-clientapp``
  processes), sampled every 20 ms; a run is stopped when the machine has less
  than 2 GiB available.

Results: ``benchmarks/results/grpc_scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    LOOPBACK,
    RESULTS,
    describe,
    free_port,
    machine,
    pids_with,
    port_open,
    write_json,
    write_markdown,
)
from benchmarks.scale import EVENTS_ENV, TreeSampler

ROOT = Path(__file__).resolve().parents[1]
APP = Path(__file__).resolve().parent / "grpc_app"
BIN = Path(sys.executable).parent
CONNECTION = "bench"
START_TIMEOUT_S = 120.0
POLL_S = 0.25


# --------------------------------------------------------------------------- bytes on the wire

_CONNECTION = re.compile(
    r"^\S+\s+\S+\s+(?P<local>\S+):(?P<lport>\d+)\s+(?P<peer>\S+):(?P<pport>\d+)\s*(?P<rest>.*)$"
)
_PID = re.compile(r"pid=(\d+)")
_COUNTER = re.compile(r"\b(bytes_sent|bytes_received):(\d+)")


class WireCounter:
    """Bytes through a TCP port on loopback, per connection, from the kernel's tcp_info.

    Every ``interval_s`` it lists the established connections of ``port``
    (``ss -tinpH``) and keeps, for each, the largest ``bytes_sent`` and
    ``bytes_received`` of the listening side's socket, and the pid at the
    other end. Counters of a connection that closes between two samples
    lose at most its last ``interval_s``.
    """

    def __init__(self, port: int, interval_s: float = 0.1) -> None:
        self.port = port
        self.interval_s = interval_s
        self.sent: dict[tuple[int, int], int] = {}  # (peer port, pid) -> bytes to the peer
        self.received: dict[tuple[int, int], int] = {}
        self.peer_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WireCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        filt = f"( sport = :{self.port} or dport = :{self.port} )"
        out = subprocess.run(
            ["ss", "-tinpH", "state", "established", filt], capture_output=True, text=True
        ).stdout
        # One connection per two lines: the socket, then its tcp_info.
        lines = out.splitlines()
        for head, info in zip(lines[::2], lines[1::2], strict=False):
            m = _CONNECTION.match(head.strip())
            if m is None:
                continue
            pid = int(p.group(1)) if (p := _PID.search(m["rest"])) else 0
            counters = dict((k, int(v)) for k, v in _COUNTER.findall(info))
            lport, pport = int(m["lport"]), int(m["pport"])
            if lport == self.port:  # the SuperLink's end: its counters, keyed by the peer's port
                key = (pport, 0)
                self.sent[key] = max(self.sent.get(key, 0), counters.get("bytes_sent", 0))
                self.received[key] = max(
                    self.received.get(key, 0), counters.get("bytes_received", 0)
                )
            elif pport == self.port and pid:  # the peer's end: which process it is
                self.peer_pid[lport] = pid

    def by_peer(self, names: dict[int, str]) -> dict[str, dict[str, int]]:
        """Bytes to and from the SuperLink, by the kind of process at the other end."""
        out: dict[str, dict[str, int]] = {}
        for (peer_port, _), sent in self.sent.items():
            kind = names.get(self.peer_pid.get(peer_port, 0), "other")
            entry = out.setdefault(kind, {"from_superlink": 0, "to_superlink": 0})
            entry["from_superlink"] += sent
            entry["to_superlink"] += self.received.get((peer_port, 0), 0)
        return out


# --------------------------------------------------------------------------- the deployment


class Deployment:
    """The processes of one deployment on 127.0.0.1; :meth:`teardown` ends all of them.

    Every process started here carries a marker in its environment, which
    everything it starts inherits (the SuperExec, ServerApp and ClientApp
    processes run in sessions of their own).
    """

    def __init__(self, root: Path, contender: str) -> None:
        self.root = root
        self.contender = contender
        self.marker = uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.events = root / "events.jsonl"

    def env(self, name: str) -> dict[str, str]:
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ)
        env.update(
            AQF_GRPC_BENCH=self.marker,
            AQF_GRPC_PROC=f"{self.marker}:{name}",
            AQF_GRPC_CONTENDER=self.contender,
            FLWR_HOME=str(self.root / "flwr-home"),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join(paths),  # the app imports benchmarks.scale
            PYTHONUNBUFFERED="1",
            MALLOC_MMAP_THRESHOLD_=str(2**20),
            OMP_NUM_THREADS="1",
        )
        env[EVENTS_ENV] = str(self.events)
        return env

    def start(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], cwd=self.root, env=self.env(name),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def pids(self) -> list[int]:
        return pids_with(f"AQF_GRPC_BENCH={self.marker}")

    def names(self) -> dict[int, str]:
        """Every marked process's kind, by pid."""
        out = {}
        for pid in self.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for sign, kind in (
                ("flwr-serverapp", "ServerApp"),
                ("flwr-clientapp", "ClientApp"),
                ("flower-superexec", "SuperExec"),
                ("flower-superlink", "SuperLink"),
                ("flower-supernode", "SuperNode"),
                ("bin/flwr ", "flwr CLI"),
            ):
                if sign in cmd:
                    out[pid] = kind
                    break
        return out

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=self.root, env=self.env("flwr"),
            capture_output=True, text=True, timeout=START_TIMEOUT_S,
        )  # fmt: skip

    def wait_for(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(POLL_S)

    def start_all(self, nodes: int) -> None:
        self.start(
            "superlink", "flower-superlink", "--insecure", "--host", LOOPBACK,
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        )  # fmt: skip
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{LOOPBACK}:{self.port}"\ninsecure = true\n'
        )
        self.wait_for(lambda: port_open(self.port), START_TIMEOUT_S, "the SuperLink")
        for i in range(nodes):
            self.start(
                f"supernode-{i}", "flower-supernode", "--insecure",
                "--superlink", f"{LOOPBACK}:{self.port}", "--host", LOOPBACK,
                "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={nodes}",
            )  # fmt: skip
        self.wait_for(lambda: len(self.online_nodes()) >= nodes, START_TIMEOUT_S, "SuperNodes")

    def online_nodes(self) -> list[int]:
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            listing = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            return []
        return [int(n["node-id"]) for n in listing.get("nodes", []) if n["status"] == "online"]

    def run_failed(self) -> str:
        """The run's status text when it finished without success, else ''."""
        done = self.flwr("ls", CONNECTION, "--format", "json")
        with contextlib.suppress(ValueError, KeyError):
            runs = json.loads(done.stdout[done.stdout.index("{") :]).get("runs", [])
            for run in runs:
                status = str(run.get("status", ""))
                if status.startswith("finished") and "completed" not in status:
                    return status
        return ""

    def teardown(self) -> None:
        marker = f"AQF_GRPC_BENCH={self.marker}"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids_with(marker):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(pid), sig)
            deadline = time.monotonic() + 10
            while pids_with(marker) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


class MarkedSampler(TreeSampler):
    """:class:`TreeSampler` over a deployment's marked processes (not a process tree)."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(os.getpid(), pids=deployment.pids)


def measure(model: str, contender: str, nodes: int, timeout_s: float) -> dict[str, Any]:
    """One deployment, one round of ``contender``; what it took and carried."""
    root = Path(tempfile.mkdtemp(prefix="aqf-grpc-"))
    results = root / "results"
    dep = Deployment(root, contender)
    out: dict[str, Any] = {"model": model, "contender": contender, "nodes": nodes}
    started = time.perf_counter()
    names: dict[int, str] = {}
    try:
        dep.start_all(nodes)
        with MarkedSampler(dep) as sampler, WireCounter(dep.port) as wire:
            config = (f"model='{model}' contender='{contender}' nodes={nodes} "
                      f"results-dir='{results}'")  # fmt: skip
            done = dep.flwr("run", str(APP), CONNECTION, "--run-config", config)
            if "Successfully started run" not in done.stdout:
                raise RuntimeError(f"flwr run: {done.stdout}{done.stderr}")
            deadline = time.monotonic() + timeout_s
            while not (results / "result.json").is_file():
                names.update(dep.names())
                why = sampler.aborted or dep.run_failed()
                if why or time.monotonic() > deadline:
                    out["failed"] = why or f"no result after {timeout_s:.0f} s"
                    break
                time.sleep(1.0)
            names.update(dep.names())
        out["wall_s"] = time.perf_counter() - started
        out["wire"] = wire.by_peer(names)
        out["process_peaks"] = _peaks_by_kind(sampler, names)
        out["total_peak_bytes"] = sampler.total_peak
        if (results / "result.json").is_file():
            out.update(json.loads((results / "result.json").read_text()))
        if dep.events.exists():
            out["nodes_stages"] = [json.loads(x) for x in dep.events.read_text().splitlines()]
    except (RuntimeError, TimeoutError, OSError) as exc:
        out["failed"] = f"{type(exc).__name__}: {exc}"
    finally:
        if "failed" in out:
            out["logs"] = {p.name: p.read_text(errors="replace")[-3000:]
                           for p in sorted(root.glob("*.log"))}  # fmt: skip
        dep.teardown()
    return out


def _peaks_by_kind(sampler: TreeSampler, names: dict[int, str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for pid, peak in sampler.peaks.items():
        out.setdefault(names.get(pid, "other"), []).append(peak)
    return {k: sorted(v, reverse=True) for k, v in out.items()}


# --------------------------------------------------------------------------- report

HEADER = [
    "model", "contender", "completed", "round s (ServerApp)", "whole run s",
    "MB ServerApp -> SuperLink", "MB SuperLink -> SuperNodes", "MB SuperNodes -> SuperLink",
    "MB SuperLink -> ServerApp", "Flower's Arrays MB down / up", "aq-downlink / aq-wire MB",
    "peak GB: ServerApp", "SuperLink", "SuperNode", "ClientApp", "all",
]  # fmt: skip


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in results:
        wire = r.get("wire", {})

        def mb(kind: str, way: str, wire: dict[str, Any] = wire) -> str:
            return f"{wire.get(kind, {}).get(way, 0) / 1e6:,.1f}"

        peaks = r.get("process_peaks", {})

        def gb(kind: str, peaks: dict[str, list[int]] = peaks) -> str:
            return f"{max(peaks.get(kind, [0])) / 1e9:.2f}"

        records = r.get("records") or []
        aq = (f"{sum(x['downlink_bits'] for x in records) / 8e6:,.1f} / "
              f"{sum(x['wire_bits'] for x in records) / 8e6:,.1f}") if records else ""  # fmt: skip
        flower = (f"{r['bytes_down'] / 1e6:,.1f} / {r['bytes_up'] / 1e6:,.1f}"
                  if "bytes_down" in r else "")  # fmt: skip
        out.append([
            r["model"], r["contender"], "no: " + r["failed"][:120] if "failed" in r else "yes",
            f"{r['start_s']:.1f}" if "start_s" in r else "", f"{r.get('wall_s', 0):.0f}",
            mb("ServerApp", "to_superlink"), mb("SuperNode", "from_superlink"),
            mb("SuperNode", "to_superlink"), mb("ServerApp", "from_superlink"),
            flower, aq, gb("ServerApp"), gb("SuperLink"), gb("SuperNode"), gb("ClientApp"),
            f"{r.get('total_peak_bytes', 0) / 1e9:.2f}",
        ])  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a shape of benchmarks.gpt2 (270m)")
    parser.add_argument("--contender", action="append", help="default: flower and aq-default")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", default="grpc_scale")
    args = parser.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[:3]
    results = []
    for model in args.model or ["270m"]:
        for contender in args.contender or ["flower", "aq-default"]:
            print(f"deployment: {model}, {contender}", flush=True)
            result = measure(model, contender, args.nodes, args.timeout)
            print(json.dumps({k: v for k, v in result.items() if k != "logs"})[:2000], flush=True)
            results.append(result)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    info = {**machine(), "loadavg_before": load, "loadavg_after": load_after}
    path = write_json(args.out, {"machine": info, "runs": results})
    write_markdown(RESULTS / f"{args.out}.md", "One gRPC deployment round at model scale",
                   [("SuperLink + 2 SuperNodes on 127.0.0.1", HEADER, rows(results))])  # fmt: skip
    print(describe(info), f"; load average {' '.join(load)} -> {' '.join(load_after)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
