"""Per-round metrics of short runs: the golden recording, and a bit-for-bit check on one machine.

    python -m tests.golden.make_metrics --record FILE   # rerun every case, write FILE
    python -m tests.golden.make_metrics --check FILE    # rerun, compare with FILE bit for bit
    python -m tests.golden.make_metrics --flips N       # N one-flip runs per quantized case

``--record`` then ``--check`` proves that a change (a refactor) left every
figure of every case exactly as it was *on this machine*: record on the
commit before, check on the commit after. Across machines the losses differ
in their last bits (PyTorch's kernels round differently from one CPU to
another), so ``tests/test_golden_metrics.py`` compares ``metrics.json`` (recorded
on an Intel Xeon before the compression stack became pluggable) with
tolerances derived there. ``--flips`` measures what one stochastic rounding
decision taken the other way does to each case, the basis of those tolerances.

``metrics.json`` itself is not re-recorded: a difference from it is a change
of behaviour, to be explained.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from adaquantfl.codec import decode, encode
from adaquantfl.compression import COMPRESSORS, QSGDCompressor

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
GOLDEN = HERE / "metrics.json"

#: Figures compared (time_s is not deterministic).
KEYS = (
    "round",
    "levels",
    "participants",
    "rejected",
    "dropped",
    "wire_bits",
    "formula_bits",
    "downlink_bits",
    "train_loss",
    "test_loss",
    "test_accuracy",
)

#: (name, config file, overrides): the demo's regime per method, and the
#: digits MLP (which trains through the batched simulator path).
CASES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("demo-fp32", "configs/mnist1d-floor.toml", ("compression.method=fp32",)),
    (
        "demo-qsgd-s3",
        "configs/mnist1d-floor.toml",
        ("compression.method=qsgd", "compression.levels=3"),
    ),
    (
        "demo-qsgd-s15-entropy",
        "configs/mnist1d-floor.toml",
        ("compression.method=qsgd", "compression.levels=15", "compression.encoding=entropy"),
    ),
    (
        "demo-adaquantfl-s2",
        "configs/mnist1d-floor.toml",
        ("compression.method=adaquantfl", "compression.levels=2"),
    ),
    (
        "digits-adaquantfl-s2-partial",
        "configs/digits-mlp.toml",
        (
            "compression.method=adaquantfl",
            "compression.levels=2",
            "train.clients_per_round=4",
            "train.dropout=0.2",
            "compression.bucket_size=512",
        ),
    ),
)
ROUNDS = 40


def run_case(name: str, extra: Sequence[str] = (), root: Path = ROOT) -> list[dict[str, Any]]:
    """Rows of case ``name`` (with ``extra`` overrides after its own), restricted to :data:`KEYS`.

    A figure the run no longer produces is a ``KeyError``, not a silent None.
    """
    from adaquantfl import run

    _, path, overrides = next(case for case in CASES if case[0] == name)
    result = run(
        root / path,
        None,
        overrides=[*overrides, *extra, f"train.rounds={ROUNDS}", "compare.methods=[]"],
    )
    return [{key: row[key] for key in KEYS} for row in result.metrics]


def run_cases(root: Path = ROOT) -> dict[str, Any]:
    """Every case, with the machine it ran on."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "rounds": ROUNDS,
        "cases": {name: run_case(name, root=root) for name, _, _ in CASES},
    }


def cpu_model() -> str:
    """The CPU's model name (Linux), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def exact_differences(recorded: dict[str, Any], rerun: dict[str, Any]) -> list[str]:
    """Every figure of ``rerun`` that is not bit-for-bit the one in ``recorded``.

    Floats are compared as floats (JSON round-trips a float64 exactly).
    """
    out = []
    if set(recorded["cases"]) != set(rerun["cases"]):
        out.append(f"cases {sorted(rerun['cases'])} != {sorted(recorded['cases'])}")
    for name in sorted(set(recorded["cases"]) & set(rerun["cases"])):
        old, new = recorded["cases"][name], rerun["cases"][name]
        if len(new) != len(old):
            out.append(f"{name}: {len(new)} rounds != {len(old)}")
        for before, after in zip(old, new, strict=False):
            out.extend(
                f"{name} round {before['round']}: {key} {after.get(key)!r} != {before[key]!r}"
                for key in KEYS
                if after.get(key) != before[key]
            )
    return out


# --------------------------------------------------------------------------- one flip


class OneFlipQSGD(QSGDCompressor):
    """QSGD that takes one stochastic rounding decision the other way.

    In message number :attr:`target` (0: a run's first message), the level index
    of one entry moves by one (up where ``up``, else down; entry ``pick`` modulo
    those that can move). Float noise of another machine's kernels, landing on
    a rounding threshold, does the same. Installed as ``COMPRESSORS["qsgd"]`` by
    :func:`run_with_one_flip`.
    """

    target: ClassVar[int] = 0
    up: ClassVar[bool] = True
    pick: ClassVar[int] = 0
    sent: ClassVar[int] = 0

    def _compress(self, update: torch.Tensor, levels: int, *, generator: torch.Generator) -> bytes:
        data = super()._compress(update, levels, generator=generator)
        cls = type(self)
        cls.sent += 1
        if cls.sent - 1 != cls.target:
            return data
        q = decode(data, expected_numel=update.numel())
        m = q.magnitudes
        movable = torch.nonzero((m >= 1) & (m < levels) if cls.up else (m >= 1)).flatten()
        j = int(movable[cls.pick % len(movable)])
        m[j] += 1 if cls.up else -1
        if m[j] == 0:
            q.signs[j] = False  # a zero carries no sign
        return encode(q, self.encoding)  # type: ignore[arg-type]


def run_with_one_flip(
    name: str, *, target: int = 0, up: bool = True, pick: int = 0
) -> list[dict[str, Any]]:
    """:func:`run_case` with one rounding decision flipped (see :class:`OneFlipQSGD`)."""
    saved = COMPRESSORS["qsgd"]
    OneFlipQSGD.target, OneFlipQSGD.up, OneFlipQSGD.pick, OneFlipQSGD.sent = target, up, pick, 0
    COMPRESSORS["qsgd"] = OneFlipQSGD
    try:
        rows = run_case(name)
    finally:
        COMPRESSORS["qsgd"] = saved
    if OneFlipQSGD.sent <= target:
        raise ValueError(f"{name} sent {OneFlipQSGD.sent} messages; none is number {target}")
    return rows


def flip_study(flips: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per quantized case, the largest deviation from the plain run over ``flips`` one-flip runs.

    Deviations: relative, per round, of train/test loss and of wire_bits; absolute
    of test_accuracy. The flipped message, entry and direction are drawn at random.
    """
    rng = random.Random(seed)
    out = {}
    for name, _, _ in CASES:
        base = run_case(name)
        if base[0]["levels"] is None:
            continue  # full precision: no rounding decision to flip
        messages = sum(row["participants"] for row in base)
        worst = {"loss": 0.0, "wire_bits": 0.0, "total_wire_bits": 0.0, "test_accuracy": 0.0}
        for _ in range(flips):
            rows = run_with_one_flip(
                name,
                target=rng.randrange(messages),
                up=rng.random() < 0.5,
                pick=rng.randrange(2**20),
            )
            dev = {
                "loss": max(
                    abs(b[k] - a[k]) / abs(a[k])
                    for a, b in zip(base, rows, strict=True)
                    for k in ("train_loss", "test_loss")
                ),
                "wire_bits": max(
                    abs(b["wire_bits"] - a["wire_bits"]) / a["wire_bits"]
                    for a, b in zip(base, rows, strict=True)
                ),
                "total_wire_bits": abs(
                    sum(r["wire_bits"] for r in rows) - sum(r["wire_bits"] for r in base)
                )
                / sum(r["wire_bits"] for r in base),
                "test_accuracy": max(
                    abs(b["test_accuracy"] - a["test_accuracy"])
                    for a, b in zip(base, rows, strict=True)
                ),
            }
            worst = {k: max(v, dev[k]) for k, v in worst.items()}
        out[name] = worst
    return out


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.golden.make_metrics", description=__doc__.split("\n\n")[0]
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", type=Path, metavar="FILE", help="rerun every case, write FILE")
    action.add_argument(
        "--check", type=Path, metavar="FILE", help="rerun, compare with FILE bit for bit"
    )
    action.add_argument("--flips", type=int, metavar="N", help="N one-flip runs per quantized case")
    args = parser.parse_args(argv)

    if args.flips is not None:
        print(json.dumps(flip_study(args.flips), indent=1))
        return 0
    if args.record is not None:
        args.record.write_text(json.dumps(run_cases(), indent=1) + "\n", encoding="utf-8")
        print(f"recorded {len(CASES)} cases x {ROUNDS} rounds in {args.record}")
        return 0
    recorded = json.loads(args.check.read_text(encoding="utf-8"))
    rerun = run_cases()
    for key in ("torch", "cpu_capability", "cpu"):
        if recorded.get(key) != rerun[key]:
            print(
                f"note: recorded with {key} {recorded.get(key)!r}, rerun with {rerun[key]!r}; "
                "losses are bit-identical only on the same machine and torch",
                file=sys.stderr,
            )
    differences = exact_differences(recorded, rerun)
    for line in differences:
        print(line)
    if differences:
        print(f"{len(differences)} figure(s) differ from {args.check}", file=sys.stderr)
        return 1
    print(f"every figure of {len(CASES)} cases x {ROUNDS} rounds is bit-identical to {args.check}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
