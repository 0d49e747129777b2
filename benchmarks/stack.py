"""What error feedback and a compressed downlink change: bits to the target on one preset.

    python -m benchmarks.stack              # configs/mnist1d-floor.toml, 2 seeds (a few minutes)
    python -m benchmarks.stack --quick      # 1 seed, a fifth of the rounds (a smoke run)

Every method runs the same preset (``adaquantfl.compare``): full precision,
fixed-level QSGD with and without error feedback, top-k with and without it,
and QSGD with the model sent down as a compressed change instead of float32.
The table gives, per method, the uplink wire bits to the target loss (1.01 x
fp32's final training loss), the downlink bits to the same round, their sum,
and the final loss relative to fp32's. Every bit is 8 x the bytes an encoder
produced.

Results go to ``benchmarks/results/stack.json`` and ``stack.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist1d-floor.toml"
# The downlink as measured for the README: the paper's QSGD (one l2 norm per update).
DOWNLINK = {
    "downlink": "qsgd",
    "downlink_levels": 255,
    "downlink_options": {"bucket_size": 0, "norm": "l2"},
}
METHODS: list[dict[str, Any]] = [
    {"method": "fp32"},
    {"method": "qsgd", "levels": 15},
    {"method": "qsgd", "levels": 15, **DOWNLINK},
    {"method": "qsgd", "levels": 3},
    {"method": "qsgd", "levels": 3, "error_feedback": True},
    {"method": "qsgd", "levels": 3, "error_feedback": True, **DOWNLINK},
    {"method": "qsgd", "compressor": "topk", "options": {"fraction": 0.1}},
    {"method": "qsgd", "compressor": "topk", "options": {"fraction": 0.1}, "error_feedback": True},
]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def run(seeds: int, rounds_scale: float, out: Path) -> dict[str, Any]:
    from adaquantfl.runner.config import load_config
    from adaquantfl.runner.experiment import compare

    base = load_config(CONFIG)
    rounds = max(10, round(base.train.rounds * rounds_scale))
    methods = "[" + ", ".join(_toml(m) for m in METHODS) + "]"
    overrides = [f"compare.methods={methods}", f"compare.seeds={seeds}", f"train.rounds={rounds}"]
    start = time.perf_counter()
    result = compare(CONFIG, out, overrides=overrides, plots=False, overwrite=True)
    seconds = time.perf_counter() - start
    fp32 = result.summary["methods"]["fp32"]["final_train_loss"]
    rows = []
    for label, runs in result.runs.items():
        up = [r.summary["bits_to_target"] for r in runs]
        down = [r.summary["downlink_bits_to_target"] for r in runs]
        total = [
            u + d if u is not None and d is not None else None
            for u, d in zip(up, down, strict=True)
        ]
        final = _mean([r.summary["final_train_loss"] for r in runs])
        rows.append(
            {
                "method": label,
                "reached": sum(u is not None for u in up),
                "uplink_mbit": None if _mean(up) is None else _mean(up) / 1e6,
                "downlink_mbit": None if _mean(down) is None else _mean(down) / 1e6,
                "total_mbit": None if _mean(total) is None else _mean(total) / 1e6,
                "final_vs_fp32": None if final is None else final / fp32,
            }
        )
    return {
        "config": str(CONFIG.relative_to(ROOT)),
        "seeds": seeds,
        "rounds": rounds,
        "target_loss": result.target_loss,
        "seconds": seconds,
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    def fmt(value: float | None, digits: int = 3) -> str:
        return "never" if value is None else f"{value:.{digits}f}"

    lines = [
        f"# Error feedback and downlink compression on `{report['config']}`",
        "",
        f"{report['seeds']} seed(s), {report['rounds']} rounds, target loss "
        f"{report['target_loss']:.4f} (1.01 x fp32's final); {report['seconds']:.0f} s on "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores). Means over the seeds "
        "that reached the target.",
        "",
        "| method | reached | uplink Mbit to target | downlink Mbit to target | total Mbit "
        "| final loss x fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['reached']}/{report['seeds']} | {fmt(r['uplink_mbit'])} "
            f"| {fmt(r['downlink_mbit'])} | {fmt(r['total_mbit'])} "
            f"| {fmt(r['final_vs_fp32'], 4)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, a fifth of the rounds")
    args = parser.parse_args(argv)
    seeds, scale = (1, 0.2) if args.quick else (args.seeds, 1.0)
    report = run(seeds, scale, RESULTS / "stack")
    report["machine"] = machine()
    write_json("stack", report)
    text = markdown(report)
    (RESULTS / "stack.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
