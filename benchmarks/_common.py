"""Timing, machine description and output shared by the codec and bits benchmarks.

Every speed figure is reported next to a baseline measured in the same
process (``torch.Tensor.copy_`` into a preallocated buffer), because absolute
numbers on a shared machine mean little.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def pin_one_thread() -> None:
    """One core: torch intra-op threads and numba's thread pool set to 1."""
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)


def machine() -> dict[str, Any]:
    """CPU model, core count, threads and library versions."""
    import numba
    import numpy
    import torch

    from adaquantfl.compression._kernels.bitpack import FAST_PEXT

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "bit_packing": "pext/pdep" if FAST_PEXT else "shifts and masks",
    }


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The fastest of ``repeats`` timed calls (seconds), after ``warmup`` untimed ones.

    The minimum is the least disturbed run: on a shared machine, other
    processes only ever add time.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def write_json(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Write ``payload`` to ``<directory>/<name>.json``; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on stdout (plain text if rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title)
        print("  ".join(header))
        for row in rows:
            print("  ".join(row))
        return
    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def describe(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores; torch {info['torch']} with "
        f"{info['torch_threads']} thread(s), numba {info['numba']} with "
        f"{info['numba_threads']} thread(s); bit packing with {info['bit_packing']}"
    )


def markdown(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """One table as Markdown, under a level-3 heading."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(
    path: Path, title: str, tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[str]]]]
) -> None:
    """Print the tables and write them, with the machine, as Markdown to ``path``."""
    text = [f"## {title}", ""]
    for name, header, rows in tables:
        print_table(name, header, rows)
        text.append(markdown(name, header, rows))
    text.append(f"Machine: {describe(machine())}.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


# --------------------------------------------------------------------------- loopback processes
# Shared with the deployment tests (tests/test_flower_deployment.py), which
# start Flower's processes the same way.

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def pids_with(entry: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``entry`` (``NAME=value``)."""
    found = []
    needle = entry.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return found
