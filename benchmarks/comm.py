"""Communication benchmark: bits to the target loss per method, per regime, over seeds.

    python -m benchmarks.comm                 # 3 seeds, packed and entropy (tens of minutes)
    python -m benchmarks.comm --quick         # 1 seed, a fifth of the rounds (a smoke run)

For each regime (a shipped config) and each encoding, every method of the
config's ``[compare]`` list runs for each seed (``adaquantfl.compare``). The
report gives, per method: uplink wire bits to the target loss (mean ± sd over
the seeds that reached it, and how many did), the same in paper-style
``formula_bits``, and the *regime map*: bits to target divided by the
hindsight-best fixed level's (the qsgd method with the fewest bits to target in
that regime and encoding). The target is 1.01 x fp32's final training loss.

Results go to ``benchmarks/results/comm.json`` and ``comm.md``; each run's
results directory (plots included) to ``benchmarks/results/comm/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, write_markdown

ROOT = Path(__file__).resolve().parents[1]
REGIMES = {
    "mnist1d-floor": ROOT / "configs" / "mnist1d-floor.toml",
    "digits-mlp": ROOT / "configs" / "digits-mlp.toml",
    "synthetic-1-1": ROOT / "configs" / "synthetic-1-1.toml",
}


def run_regime(
    name: str, config: Path, *, encoding: str, seeds: int, rounds_scale: float, out: Path
) -> dict[str, Any]:
    """Run one regime's comparison and return its summary plus the regime-map ratios."""
    from adaquantfl.runner.config import load_config
    from adaquantfl.runner.experiment import compare

    base = load_config(config)
    rounds = max(10, round(base.train.rounds * rounds_scale))
    overrides = [
        f"compare.seeds={seeds}",
        f"train.rounds={rounds}",
        f'compression.encoding="{encoding}"',
    ]
    start = time.perf_counter()
    # The benchmark regenerates its own results directory on every run.
    result = compare(config, out / f"{name}-{encoding}", overrides=overrides, overwrite=True)
    seconds = time.perf_counter() - start
    methods = result.summary["methods"]
    for key in ("bits_to_target", "formula_bits_to_target"):
        fixed = [
            m[key] for m in methods.values() if m.get("method") == "qsgd" and m.get(key) is not None
        ]
        best = min(fixed) if fixed else None
        for m in methods.values():
            value = m.get(key)
            m[f"{key}_vs_best_fixed"] = None if value is None or best is None else value / best
    return {
        "regime": name,
        "encoding": encoding,
        "rounds": rounds,
        "seeds": seeds,
        "seconds": seconds,
        "target_loss": result.summary["target_loss"],
        "methods": methods,
    }


def _fmt_bits(m: dict[str, Any], key: str) -> str:
    value = m.get(key)
    if value is None:
        return "never"
    sd = (m.get("sd") or {}).get(key)
    text = f"{value / 1e6:.3f}"
    if sd is not None:
        text += f" ± {sd / 1e6:.3f}"
    if m.get("seeds"):
        text += f" ({m['reached']}/{m['seeds']})"
    return text


def _ratio(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def tables(results: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    out = []
    for r in results:
        header = [
            "method",
            "Mbit to target (wire)",
            "x best fixed (wire)",
            "Mbit to target (formula)",
            "x best fixed (formula)",
            "final loss x fp32",
        ]
        fp32 = next((m for m in r["methods"].values() if m.get("method") == "fp32"), {})
        rows = []
        for label, m in r["methods"].items():
            loss, ref = m.get("final_train_loss"), fp32.get("final_train_loss")
            rows.append(
                [
                    label,
                    _fmt_bits(m, "bits_to_target"),
                    _ratio(m.get("bits_to_target_vs_best_fixed")),
                    _fmt_bits(m, "formula_bits_to_target"),
                    _ratio(m.get("formula_bits_to_target_vs_best_fixed")),
                    _ratio(None if loss is None or not ref else loss / ref),
                ]
            )
        title = (
            f"{r['regime']} ({r['encoding']}, {r['rounds']} rounds, {r['seeds']} seeds, "
            f"target {r['target_loss']:.4f}, {r['seconds']:.0f} s)"
        )
        out.append((title, header, rows))
    # The regime map: wire bits to target / hindsight-best fixed level, methods x regimes.
    columns = [f"{r['regime']} ({r['encoding']})" for r in results]
    labels: list[str] = []
    for r in results:
        labels += [label for label in r["methods"] if label not in labels]
    rows = [
        [label]
        + [
            _ratio(r["methods"][label].get("bits_to_target_vs_best_fixed"))
            if label in r["methods"]
            else "not run"
            for r in results
        ]
        for label in labels
    ]
    out.append(("regime map: wire bits to target / best fixed level's", ["method", *columns], rows))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--encodings", default="packed,entropy")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--quick", action="store_true", help="1 seed, a fifth of the rounds")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the tables from results/comm.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads((RESULTS / "comm.json").read_text())
        write_markdown(
            RESULTS / "comm.md", "Communication: bits to target", tables(saved["results"])
        )
        return
    seeds = 1 if args.quick else args.seeds
    scale = 0.2 if args.quick else 1.0
    out = RESULTS / "comm"
    results = []
    for name in args.regimes.split(","):
        for encoding in args.encodings.split(","):
            print(f"running {name} with {encoding} encoding ...", flush=True)
            results.append(
                run_regime(
                    name, REGIMES[name], encoding=encoding, seeds=seeds, rounds_scale=scale, out=out
                )
            )
    report = {"machine": machine(), "quick": args.quick, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "comm.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(RESULTS / "comm.md", "Communication: bits to target", tables(results))


if __name__ == "__main__":
    main()
