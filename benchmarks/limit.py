"""Bits against the rate-distortion limit: every compressor and rate, Gaussian and real updates.

    python -m benchmarks.limit            # Gaussian d = 1e4, 1e6, 1e8; two models' updates; speed
    python -m benchmarks.limit --quick    # Gaussian d = 1e4, 1e5; fewer updates; speed at 1e6

The limit. An unbiased compressor ``C`` with variance ratio ``omega``
(``E||C(x) - x||^2 = omega ||x||^2``) gives, scaled by ``1 / (1 + omega)``, an
estimate with mean squared error ``omega / (1 + omega) ||x||^2``; for
Gaussian entries the rate-distortion function then asks for at least
``R(omega) = d/2 log2(1 + 1/omega)`` bits. Every row reports the bits the
codec actually produced (header, scales or norms, padding and CRC included),
the measured ``omega``, and their ratio ``bits / R(omega)`` ("x bound"). Top-k
is biased, so the bound is not its limit (its row is there for reference).

Compressors: QSGD with packed and entropy bodies at s in {1, 2, 3, 7, 15,
31}, with the default options (max-norm buckets of 512) and with
``QSGDCompressor.paper()`` (one l2 norm for the vector); top-k at fractions
0.001, 0.01 and 0.1; EDEN (``"eden"``) at every rung of its ladder.

Data: (a) standard Gaussian vectors (one draw per compressor and rate; at
d = 1e4 the mean of 20 draws); (b) real client updates of the shipped models,
captured from a full-precision run of ``configs/mnist1d-cnn.toml`` (d = 5,210)
and ``configs/digits-mlp.toml`` (d = 15,010) at a few rounds (10 clients
each), every update compressed with 3 seeds; ``omega`` is the mean of the
messages' ``||C(x) - x||^2 / ||x||^2``, bits the mean message size.

Speed and memory: EDEN's encode and decode of a 1e8-entry float32 vector,
best of 3 after a warm-up, as GB/s of float32 and as a ratio to
``torch.Tensor.copy_`` of the same vector timed just before; extra memory is
the peak resident set above the vector (and the output buffer) during one
call, measured in a fresh process (``/proc/self/clear_refs``, ``VmHWM``).

Results: ``benchmarks/results/limit.json`` and ``limit.md``; the last table
printed is a summary for the README.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from adaquantfl.compression import EdenCompressor, QSGDCompressor, TopKCompressor
from adaquantfl.compression.compressor import BaseCompressor
from adaquantfl.compression.rotation import rung
from benchmarks._common import (
    RESULTS,
    best_time,
    describe,
    machine,
    markdown,
    pin_one_thread,
    print_table,
    write_json,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QSGD_LEVELS = (1, 2, 3, 7, 15, 31)
TOPK_FRACTIONS = (0.001, 0.01, 0.1)
EDEN_LEVELS = (*range(1, 15), 15, 31, 63, 127, 255, 511, 1023, 2047)
#: (config, the rounds whose updates are captured)
MODELS = {"mnist1d-cnn": (1, 50, 200), "digits-mlp": (1, 50, 150)}
SPEED_LEVELS = (1, 7, 15, 31, 255)
#: Distortion is summed over chunks of this many entries (no float64 copy of a 1e8 vector).
CHUNK = 1 << 22


def bound_bits(numel: int, omega: float) -> float:
    """``d/2 log2(1 + 1/omega)``: the fewest bits of an unbiased compressor of variance omega."""
    return math.inf if omega <= 0 else numel / 2 * math.log2(1 + 1 / omega)


def compressors() -> list[tuple[str, BaseCompressor, tuple[int, ...]]]:
    """(label, compressor, levels) of every row."""
    rows: list[tuple[str, BaseCompressor, tuple[int, ...]]] = []
    for encoding in ("packed", "entropy"):
        rows.append((f"qsgd-{encoding}", QSGDCompressor(encoding), QSGD_LEVELS))
    for encoding in ("packed", "entropy"):
        rows.append((f"qsgd-paper-{encoding}", QSGDCompressor.paper(encoding), QSGD_LEVELS))
    for fraction in TOPK_FRACTIONS:
        rows.append((f"topk-{fraction:g}", TopKCompressor(fraction), (1,)))
    rows.append(("eden", EdenCompressor(), EDEN_LEVELS))
    return rows


def distortion(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(||y - x||^2, ||x||^2)`` in float64, chunk by chunk."""
    err = norm = 0.0
    for start in range(0, x.numel(), CHUNK):
        xs = x[start : start + CHUNK].double()
        err += float((y[start : start + CHUNK].double() - xs).square().sum())
        norm += float(xs.square().sum())
    return err, norm


def measure_one(
    compressor: BaseCompressor, levels: int, vectors: Sequence[torch.Tensor], seeds: int
) -> dict[str, Any]:
    """Mean bits per entry and mean omega of ``compressor`` at ``levels`` over the vectors."""
    bits, omegas = [], []
    out = torch.empty(vectors[0].numel())
    for i, x in enumerate(vectors):
        d = x.numel()
        if out.numel() != d:
            out = torch.empty(d)
        for seed in range(seeds):
            g = torch.Generator().manual_seed(1000 * i + seed)
            payload = compressor.compress(x, levels, generator=g)
            y = compressor.decompress(payload, numel=d, levels=levels, out=out)
            err, norm = distortion(x, y)
            bits.append(8 * len(payload) / d)
            omegas.append(err / norm if norm else 0.0)
            del payload
    d = vectors[0].numel()
    mean_bits = sum(bits) / len(bits)
    omega = sum(omegas) / len(omegas)
    limit = bound_bits(d, omega) / d
    return {
        "levels": levels,
        "numel": d,
        "messages": len(bits),
        "bits_per_entry": mean_bits,
        "omega": omega,
        "bound_bits_per_entry": limit,
        "ratio": mean_bits / limit if limit > 0 else math.inf,
    }


def measure_all(vectors: Sequence[torch.Tensor], seeds: int, label: str) -> list[dict[str, Any]]:
    rows = []
    for name, compressor, levels in compressors():
        for s in levels:
            start = time.perf_counter()
            row = measure_one(compressor, s, vectors, seeds)
            row.update(method=name, seconds=time.perf_counter() - start)
            if name == "eden":
                row["nominal_bits"] = rung(s).nominal_bits
            rows.append(row)
        print(f"  {label}: {name} done", flush=True)
    return rows


HEADER = ["method", "s", "bits/entry", "omega", "bound bits/entry", "x bound"]


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["method"],
            str(r["levels"]) if not r["method"].startswith("topk") else "",
            f"{r['bits_per_entry']:.4f}",
            f"{r['omega']:.4g}",
            f"{r['bound_bits_per_entry']:.4f}",
            f"{r['ratio']:.2f}",
        ]
        for r in rows
    ]


# --------------------------------------------------------------------------- speed and memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """The peak resident set above the current one while ``fn`` runs (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    base = _rss_kib("VmRSS")
    fn()
    return 1024 * (_rss_kib("VmHWM") - base)


def memory_probe(numel: int, levels: int, what: str) -> int:
    """Extra peak memory of one encode or decode of ``numel`` Gaussian entries (run alone)."""
    pin_one_thread()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    c = EdenCompressor()
    payload = c.compress(x, levels, generator=torch.Generator().manual_seed(1))  # compiles too
    if what == "encode":
        del payload
        return peak_extra_bytes(lambda: c.compress(x, levels, generator=torch.Generator()))
    out = torch.empty(numel)
    out.zero_()  # touched, so the output's pages are counted before
    return peak_extra_bytes(lambda: c.decompress(payload, numel=numel, levels=levels, out=out))


def measure_speed(numel: int, repeats: int) -> list[dict[str, Any]]:
    """EDEN encode/decode GB/s at ``numel``, against copy_, and extra peak memory."""
    pin_one_thread()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    out = torch.empty(numel)
    c = EdenCompressor()
    rows = []
    for s in SPEED_LEVELS:
        copy_s = best_time(lambda: out.copy_(x), repeats)
        g = torch.Generator().manual_seed(1)
        encode_s = best_time(lambda: c.compress(x, s, generator=g), repeats)  # noqa: B023
        payload = c.compress(x, s, generator=g)
        decode_s = best_time(
            lambda: c.decompress(payload, numel=numel, levels=s, out=out),  # noqa: B023
            repeats,
        )
        memory = {}
        for what in ("encode", "decode"):
            probe = subprocess.run(
                [sys.executable, "-m", "benchmarks.limit", "--memory-probe", what,
                 "--numel", str(numel), "--levels", str(s)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            memory[what] = int(probe.stdout.strip().splitlines()[-1])
        gb = 4 * numel / 1e9
        rows.append(
            {
                "levels": s,
                "numel": numel,
                "copy_gbps": gb / copy_s,
                "encode_gbps": gb / encode_s,
                "decode_gbps": gb / decode_s,
                "encode_vs_copy": copy_s / encode_s,
                "decode_vs_copy": copy_s / decode_s,
                "message_bytes": len(payload),
                "encode_extra_bytes": memory["encode"],
                "decode_extra_bytes": memory["decode"],
                "float32_bytes": 4 * numel,
            }
        )
        print(f"  speed s={s} done", flush=True)
    return rows


SPEED_HEADER = [
    "s", "copy_ GB/s", "encode GB/s", "decode GB/s", "encode / copy_", "decode / copy_",
    "message MB", "encode extra (x float32)", "decode extra (x float32)",
]  # fmt: skip


def speed_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            str(r["levels"]),
            f"{r['copy_gbps']:.2f}",
            f"{r['encode_gbps']:.2f}",
            f"{r['decode_gbps']:.2f}",
            f"{r['encode_vs_copy']:.3f}",
            f"{r['decode_vs_copy']:.3f}",
            f"{r['message_bytes'] / 1e6:.1f}",
            f"{r['encode_extra_bytes'] / r['float32_bytes']:.3f}",
            f"{r['decode_extra_bytes'] / r['float32_bytes']:.3f}",
        ]
        for r in rows
    ]


# --------------------------------------------------------------------------- summary


def targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    """EDEN's targets: <= 1.5x the bound at 1 bit, <= 2x at 0.1-0.5 bits per entry."""
    lines = []
    for r in rows:
        if r["method"] != "eden":
            continue
        b = r["bits_per_entry"]
        if r["levels"] == 15:
            verdict = "met" if r["ratio"] <= 1.5 else "NOT met"
            lines.append(f"1 bit (s = 15): {b:.3f} bits/entry, {r['ratio']:.2f}x: {verdict}")
        elif 0.1 <= b <= 0.5:
            verdict = "met" if r["ratio"] <= 2.0 else "NOT met"
            lines.append(f"s = {r['levels']}: {b:.3f} bits/entry, {r['ratio']:.2f}x: {verdict}")
    return lines


SUMMARY_METHODS = [("qsgd-entropy", s) for s in (1, 2, 3, 7, 15)] + [
    ("qsgd-paper-entropy", s) for s in (2, 7)
] + [("topk-0.01", 1)] + [("eden", s) for s in (1, 2, 3, 7, 15, 31)]  # fmt: skip


def summary(sources: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """One row per (method, s): bits/entry, omega and x bound for each source."""
    header = ["method", "s"]
    for name in sources:
        header += [f"{name}: bits/entry", "omega", "x bound"]
    rows = []
    for method, s in SUMMARY_METHODS:
        row = [method, "" if method.startswith("topk") else str(s)]
        for found in sources.values():
            match = [r for r in found if r["method"] == method and r["levels"] == s]
            if match:
                r = match[0]
                row += [f"{r['bits_per_entry']:.3f}", f"{r['omega']:.3g}", f"{r['ratio']:.2f}"]
            else:
                row += ["", "", ""]
        rows.append(row)
    return header, rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer updates")
    parser.add_argument("--no-speed", action="store_true", help="skip the 1e8 speed and memory")
    parser.add_argument("--memory-probe", choices=("encode", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--numel", type=int, default=10**8, help=argparse.SUPPRESS)
    parser.add_argument("--levels", type=int, default=15, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(memory_probe(args.numel, args.levels, args.memory_probe))
        return
    pin_one_thread()
    info = machine()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    sizes = (10**4, 10**5) if args.quick else (10**4, 10**6, 10**8)
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "gaussian": {}, "models": {}}
    tables = []
    sources: dict[str, list[dict[str, Any]]] = {}
    summary_d = sizes[1]
    for d in sizes:
        draws = 20 if d <= 10**4 else 1
        vectors = [
            torch.randn(d, generator=torch.Generator().manual_seed(7 + i)) for i in range(draws)
        ]
        rows = measure_all(vectors, 1, f"gaussian d={d:.0e}")
        del vectors
        results["gaussian"][str(d)] = rows
        title = f"Gaussian, d = {d:.0e}" + (f" (mean of {draws} vectors)" if draws > 1 else "")
        tables.append((title, HEADER, table_rows(rows)))
        if d == summary_d:
            sources[f"Gaussian {d:.0e}"] = rows
    from benchmarks.bits import capture_updates

    for name, rounds in MODELS.items():
        captured = rounds[:1] if args.quick else rounds
        updates = capture_updates(CONFIGS / f"{name}.toml", captured)
        rows = measure_all(updates, 1 if args.quick else 3, name)
        results["models"][name] = {"rounds": list(captured), "updates": len(updates), "rows": rows}
        d = updates[0].numel()
        title = f"{name} (d = {d:,}): {len(updates)} client updates from rounds {list(captured)}"
        tables.append((title, HEADER, table_rows(rows)))
        sources[name] = rows
    speed: list[dict[str, Any]] = []
    if not args.no_speed:
        speed = measure_speed(10**6 if args.quick else 10**8, 2 if args.quick else 3)
        results["speed"] = speed
        n = speed[0]["numel"]
        tables.append((f"EDEN speed and memory at d = {n:.0e}", SPEED_HEADER, speed_rows(speed)))
    checks = {name: targets(rows) for name, rows in sources.items()}
    results["targets"] = checks
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    results["loadavg"] = {"before": load_before, "after": load_after}
    head, summary_rows = summary(sources)
    tables.append(("Summary: bits per entry, omega and bits / bound", head, summary_rows))
    text = ["## Bits against the rate-distortion limit", ""]
    for name, header, rows_ in tables:
        print_table(name, header, rows_)
        text.append(markdown(name, header, rows_))
    text.append("### EDEN's targets (<= 1.5x at 1 bit, <= 2x at 0.1-0.5 bits per entry)\n")
    for name, lines in checks.items():
        text.append(f"- {name}: " + "; ".join(lines))
        print(f"{name}: " + "; ".join(lines))
    text.append(
        f"\nMachine: {describe(info)}. Load average {' '.join(load_before)} before, "
        f"{' '.join(load_after)} after.\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limit.md").write_text("\n".join(text))
    path = write_json("limit", results)
    print(f"wrote {path} and {RESULTS / 'limit.md'}")
    print("\n" + markdown("Summary", head, summary_rows))


if __name__ == "__main__":
    main()
