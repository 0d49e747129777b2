"""``python -m benchmarks`` (``make bench``): every benchmark, one after the other.

    python -m benchmarks            # the full set (about half an hour on 2 cores)
    python -m benchmarks --quick    # smoke-sized runs of each

Each benchmark prints its tables and writes ``benchmarks/results/<name>.json``
and ``.md``; run one alone with ``python -m benchmarks.<name> --help``.
"""

from __future__ import annotations

import argparse
import importlib

#: (module, arguments for a quick run)
BENCHMARKS = [
    ("codec", ["--quick"]),
    ("codec_scale", ["--quick"]),
    ("entropy_check", ["--quick"]),
    ("bits", ["--quick"]),
    ("sim", ["--quick"]),
    ("cnn", ["--quick"]),
    ("memory", ["--clients", "1000", "--rounds", "2"]),
    ("comm", ["--quick"]),
    ("stack", ["--quick"]),
    ("limit", ["--quick"]),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark.")
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. codec,sim")
    args = parser.parse_args(argv)
    chosen = set(args.only.split(",")) if args.only else None
    for name, quick_args in BENCHMARKS:
        if chosen is not None and name not in chosen:
            continue
        print(f"\n=== benchmarks.{name} ===", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        module.main(quick_args if args.quick else [])


if __name__ == "__main__":
    main()
