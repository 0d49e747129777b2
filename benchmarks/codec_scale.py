"""The codec at model scale: a client's compress path and the server's decode, GB/s and memory.

    python -m benchmarks.codec_scale                 # d in {1e7, 1e8}
    python -m benchmarks.codec_scale --size 1e8      # one size
    python -m benchmarks.codec_scale --quick         # smoke run: d = 2e5, few repeats

For QSGD, packed and entropy, ``s`` in {1, 15, 255}, buckets of 512 and one
bucket, one thread, best of N calls after a warm-up:

- ``codec``: ``QSGDCompressor.compress`` alone (quantize + encode to bytes);
- ``client``: the node's whole path, :func:`adaquantfl.fl.client.compress_update`
  (finiteness check, then ``ClientCompressor.compress``: payload, ``||v||``
  and the distortion ``||C(v) - v||^2 / ||v||^2``);
- ``decompress``: ``QSGDCompressor.decompress`` into a preallocated buffer
  (what the server does with each reply).

GB/s are of float32 input (``4 d`` bytes), also given as a ratio to
``torch.Tensor.copy_`` of the same vector into a preallocated buffer, timed
in the same process.

Memory: the extra peak resident set of one call, as a multiple of the
update's float32 bytes ``4 d``, each measured in a fresh process (numba's
kernels loaded and warmed up at a small size first; the peak is reset through
``/proc/self/clear_refs`` right before the call; :func:`run_probe`): a client compressing
(packed and entropy at ``s = 15``, buckets of 512, and packed under error
feedback in a later round, when the residual exists), and the server
accumulating one reply (``FedServer._accumulate``, which decodes the reply
into a reusable buffer and adds it to the float64 accumulator; the
accumulator's own ``8 d`` bytes are part of its peak) and aggregating it
(``FedServer.aggregate``). Linux only.

Results go to ``benchmarks/results/codec_scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    RESULTS,
    best_time,
    describe,
    machine,
    pin_one_thread,
    write_json,
    write_markdown,
)

SIZES = (10**7, 10**8)
LEVELS = (1, 15, 255)
BUCKETS: tuple[int | None, ...] = (512, None)
ENCODINGS = ("packed", "entropy")
#: (label, encoding, levels, bucket, error feedback) of the client memory probes.
CLIENT_PROBES = (
    ("packed s=15 b=512", "packed", 15, 512, False),
    ("entropy s=15 b=512", "entropy", 15, 512, False),
    ("packed s=15 b=512, error feedback", "packed", 15, 512, True),
)
ROOT = Path(__file__).resolve().parents[1]


def update_vector(d: int) -> torch.Tensor:
    """A model update of ``d`` entries: Gaussian, scaled like a small SGD step."""
    return torch.randn(d, generator=torch.Generator().manual_seed(d)).mul_(1e-3)


# --------------------------------------------------------------------------- speed


def measure_speed(
    sizes: Sequence[int],
    *,
    levels: Sequence[int] = LEVELS,
    buckets: Sequence[int | None] = BUCKETS,
    encodings: Sequence[str] = ENCODINGS,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """GB/s of the codec, the client's path and the decoder for every configuration."""
    rows = []
    for d in sizes:
        x = update_vector(d)
        buffer = torch.empty(d)
        big = d >= 5 * 10**7
        for encoding in encodings:
            slow = encoding == "entropy"
            repeats = 1 if quick else (2 if big and slow else 3 if big or slow else 5)
            for bucket in buckets:
                for s in levels:
                    row = _measure_one(x, buffer, encoding, s, bucket, repeats)
                    rows.append(row)
                    print(_speed_cells(row), flush=True)
    return rows


def _measure_one(
    x: torch.Tensor, buffer: torch.Tensor, encoding: str, s: int, bucket: int | None, repeats: int
) -> dict[str, Any]:
    from adaquantfl.compression import QSGDCompressor
    from adaquantfl.compression.feedback import ClientCompressor
    from adaquantfl.fl.client import compress_update

    d = x.numel()
    compressor = QSGDCompressor(encoding, bucket)
    client = ClientCompressor(compressor)
    gen = torch.Generator().manual_seed(s)
    payload = compressor.compress(x, s, generator=gen)

    def timed(fn: Callable[[], object]) -> float:
        return best_time(fn, repeats, warmup=1)

    row: dict[str, Any] = {
        "numel": d,
        "encoding": encoding,
        "levels": s,
        "bucket_size": bucket,
        "message_bytes": len(payload),
        "copy_s": timed(lambda: buffer.copy_(x)),
        "codec_s": timed(lambda: compressor.compress(x, s, generator=gen)),
        "client_s": timed(
            lambda: compress_update(
                x, levels=s, compressor=client, seed=0, round_idx=0, client_id=0
            )
        ),
        "decompress_s": timed(
            lambda: compressor.decompress(payload, numel=d, levels=s, out=buffer)
        ),
    }
    for key in [k for k in row if k.endswith("_s")]:
        row[key[:-2] + "_gbps"] = 4 * d / row[key] / 1e9
    return row


SPEED_HEADER = [
    "d",
    "encoding",
    "s",
    "bucket",
    "bits/entry",
    "copy_ GB/s",
    "codec GB/s",
    "client GB/s",
    "decompress GB/s",
    "codec / copy_",
    "client / copy_",
    "decompress / copy_",
    "client / codec",
]


def _speed_cells(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['numel']:.0e}",
        r["encoding"],
        str(r["levels"]),
        str(r["bucket_size"] or "one"),
        f"{8 * r['message_bytes'] / r['numel']:.2f}",
        f"{r['copy_gbps']:.2f}",
        f"{r['codec_gbps']:.3f}",
        f"{r['client_gbps']:.3f}",
        f"{r['decompress_gbps']:.3f}",
        f"{r['codec_gbps'] / r['copy_gbps']:.3f}",
        f"{r['client_gbps'] / r['copy_gbps']:.3f}",
        f"{r['decompress_gbps'] / r['copy_gbps']:.3f}",
        f"{r['client_gbps'] / r['codec_gbps']:.2f}",
    ]


# --------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 resets VmHWM to the current resident set (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def extra_peak_bytes(fn: Callable[[], object]) -> int:
    """The resident set's peak during ``fn()`` minus the resident set before it."""
    _reset_peak()
    before = _status("VmRSS")
    result = fn()
    peak = _status("VmHWM")
    del result
    return peak - before


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One memory measurement, in this (fresh) process; see :func:`measure_memory`."""
    from adaquantfl.compression import ErrorFeedback, QSGDCompressor
    from adaquantfl.compression.feedback import ClientCompressor
    from adaquantfl.fl.client import ClientReply, compress_update

    pin_one_thread()
    d = int(spec["numel"])
    s = int(spec["levels"])
    inner = QSGDCompressor(spec["encoding"], spec["bucket_size"])
    compressor = ErrorFeedback(inner) if spec["error_feedback"] else inner

    def compress(client: ClientCompressor, x: torch.Tensor, round_idx: int) -> Any:
        return compress_update(
            x, levels=s, compressor=client, seed=0, round_idx=round_idx, client_id=0
        )

    # Load and warm up every kernel of the path at a small size, outside the measurement.
    small = update_vector(5000)
    warm = compress(ClientCompressor(compressor), small, 0)
    compressor.decompress(warm.payload, numel=small.numel(), levels=s)
    x = update_vector(d)
    client = ClientCompressor(compressor)
    if spec["what"] == "client":
        if spec["error_feedback"]:
            compress(client, x, 0)  # the residual exists from the second round on
        extra = extra_peak_bytes(lambda: compress(client, x, 1))
        return {**spec, "extra_bytes": extra, "extra_x": extra / (4 * d)}
    from adaquantfl.fl.server import FedServer
    from adaquantfl.policy import FixedLevels

    def server_for(n: int) -> FedServer:
        server = FedServer(torch.zeros(n), FixedLevels(s), compressor)
        server.begin_round([0])
        return server

    warm_server = server_for(small.numel())
    warm_server.aggregate([ClientReply(0, warm.payload, 1.0, 10)])
    reply = ClientReply(0, compress(client, x, 0).payload, 1.0, 10)
    server = server_for(d)
    inner_peaks: list[int] = []
    accumulate = server._accumulate

    def traced(*args: Any) -> Any:
        extra = [None]

        def call() -> Any:
            extra[0] = accumulate(*args)
            return None

        inner_peaks.append(extra_peak_bytes(call))
        return extra[0]

    server._accumulate = traced  # type: ignore[method-assign]
    extra = extra_peak_bytes(lambda: server.aggregate([reply]))
    return {
        **spec,
        "extra_bytes": inner_peaks[0],
        "extra_x": inner_peaks[0] / (4 * d),
        "aggregate_extra_bytes": extra,
        "aggregate_extra_x": extra / (4 * d),
    }


def measure_memory(sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Every memory probe at every size, each in a fresh Python process."""
    specs = []
    for d in sizes:
        for label, encoding, s, bucket, ef in CLIENT_PROBES:
            specs.append(dict(what="client", label=label, numel=d, encoding=encoding,
                              levels=s, bucket_size=bucket, error_feedback=ef))  # fmt: skip
        specs.append(dict(what="server", label="server: one packed s=15 b=512 reply", numel=d,
                          encoding="packed", levels=15, bucket_size=512,
                          error_feedback=False))  # fmt: skip
    rows = []
    for spec in specs:
        row = run_probe(spec)
        rows.append(row)
        print(_memory_cells(row), flush=True)
    return rows


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`probe` in a fresh Python process; its result.

    glibc's malloc is told to map every block of 64 KiB and more on its own
    (``MALLOC_MMAP_THRESHOLD_``), so that a freed block leaves the resident
    set at once instead of waiting in the heap for a later allocation to
    reuse it unseen (by default that happens to blocks up to 32 MiB).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.codec_scale", "--probe", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


MEMORY_HEADER = ["d", "what", "extra peak / 4d", "extra peak (MB)", "whole aggregate / 4d"]


def _memory_cells(r: dict[str, Any]) -> list[str]:
    whole = f"{r['aggregate_extra_x']:.2f}" if "aggregate_extra_x" in r else ""
    return [
        f"{r['numel']:.0e}",
        r["label"],
        f"{r['extra_x']:.2f}",
        f"{r['extra_bytes'] / 1e6:.0f}",
        whole,
    ]


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, action="append", help="d (repeatable)")
    parser.add_argument("--quick", action="store_true", help="d = 2e5 only, few repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed table")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    pin_one_thread()
    sizes = [2 * 10**5] if args.quick else [int(s) for s in args.size or SIZES]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    speed = [] if args.no_speed else measure_speed(sizes, quick=args.quick)
    memory = [] if args.no_memory else measure_memory(sizes)
    load_after = Path("/proc/loadavg").read_text().split()[:3] if load else []
    info = {**machine(), "loadavg_before": load, "loadavg_after": load_after}
    tables = []
    if speed:
        tables.append(("Speed (GB/s of float32 input, one thread, best of N)", SPEED_HEADER,
                       [_speed_cells(r) for r in speed]))  # fmt: skip
    if memory:
        tables.append(("Extra peak memory (multiple of the update's float32 bytes)",
                       MEMORY_HEADER, [_memory_cells(r) for r in memory]))  # fmt: skip
    name = "codec_scale" + ("_quick" if args.quick else "")
    write_markdown(RESULTS / f"{name}.md", "Codec at scale", tables)
    print(describe(info), f"; load average {' '.join(load)} -> {' '.join(load_after)}")
    path = write_json(name, {"machine": info, "speed": speed, "memory": memory})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
