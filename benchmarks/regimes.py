"""The regime suite: every level policy against the hindsight-best fixed level, per regime.

    python -m benchmarks.regimes --jobs 2           # 5 regimes, 3 seeds, packed + entropy
    python -m benchmarks.regimes --jobs 2 --quick   # the hard cells: floor + short CNN, 1 seed
    python -m benchmarks.regimes --jobs 2 --heldout # the held-out regimes (regimes_heldout.py)
    python -m benchmarks.regimes --jobs 2 --only mnist1d-floor,digits-mlp

For each regime (a shipped config), encoding and seed, every method runs
alone (``adaquantfl.run``): fp32, fixed QSGD levels s in {1, 2, 3, 4, 7, 8,
15, 16, 31}, AdaQuantFL with s0 in {1, 2}, DAdaQuant's time and doubly
adaptive rules, ``auto`` and ``probe``; and the rotation-based compressor
``eden`` at fixed rungs {1, 2, 3, 7, 15, 31} and steered by AdaQuantFL,
``auto`` and ``probe``. For each target (1.01, 1.05 and 1.2 x that seed's
fp32 final training loss) a method's score is its uplink wire bits to the
target divided by the fewest bits any fixed QSGD level needed in the same
seed, target and encoding (the hindsight-best fixed level). The tables give
the geometric mean of that ratio over the seeds that reached the target and
how many did; "never" where none did.

A method whose trajectory does not depend on the encoding (fp32, fixed levels,
AdaQuantFL and DAdaQuant's time rule: their levels follow the loss alone, and
the quantization noise is drawn from the same stream whatever the encoding)
runs once, entropy-coded; its packed bits are exact arithmetic on the same
rounds (a packed message's size depends only on d, s and the bucket), so it
is scored under both encodings from one run; ``eden`` has its own encoding,
so each of its runs is scored under both as it is. Policies that read the
bits (``auto``, DAdaQuant's doubly adaptive rule) and ``probe`` (whose
probes' bytes the rows do not separate) run under each. The test set is
evaluated every 5 rounds (and the last): the scores need the training loss
only, and the budget table's final accuracy takes the evaluated rounds.

Every run's metrics are kept in ``benchmarks/results/regimes/runs/`` under a
name derived from the run's whole resolved config, so a second invocation
reruns only what changed (``--fresh`` reruns everything). Outputs:
``benchmarks/results/regimes.json``, ``regimes.md`` (the ratio tables, every
method's final loss and accuracy at a budget, the wall time) and
``regimes.png`` (the regime map: a heat map of ratio per policy and regime).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
RUNS = RESULTS / "regimes" / "runs"
REGIMES: dict[str, Path | dict[str, Any]] = {
    "mnist1d-floor": ROOT / "configs" / "mnist1d-floor.toml",
    "digits-mlp": ROOT / "configs" / "digits-mlp.toml",
    "synthetic-1-1": ROOT / "configs" / "synthetic-1-1.toml",
    "mnist1d-cnn": ROOT / "configs" / "mnist1d-cnn.toml",
    "mnist5k-cnn": ROOT / "configs" / "mnist5k-cnn.toml",
}
FIXED_LEVELS = (1, 2, 3, 4, 7, 8, 15, 16, 31)
#: The rotation-based compressor's fixed rungs: 1/8, 3/16, 1/4, 1/2, 1 and 2 bits an entry.
EDEN_LEVELS = (1, 2, 3, 7, 15, 31)
TARGETS = (1.01, 1.05, 1.2)
#: The budget table's budget: the bits the best fixed level needed to reach this x fp32.
BUDGET_TARGET = 1.05
ENCODINGS = ("packed", "entropy")


#: The hard cells the quick run keeps: a floor regime and the short CNN run.
QUICK_REGIMES = ("mnist1d-floor", "mnist5k-cnn")
QUICK_METHODS = ("fp32", "adaquantfl-s2", "auto", "probe", "eden-probe", "eden-adaquantfl-s2")
EVAL_EVERY = 5


@dataclass(frozen=True)
class Method:
    label: str
    overrides: tuple[str, ...]
    fixed: bool = False
    #: Its rounds do not depend on the encoding (see the module notes).
    encoding_free: bool = False
    #: Its messages do not depend on the encoding either (another compressor).
    own_encoding: bool = False


def methods() -> list[Method]:
    """The suite's methods, as config overrides."""
    out = [Method("fp32", ("compression.method=fp32",), encoding_free=True)]
    for s in FIXED_LEVELS:
        out.append(
            Method(f"qsgd-s{s}", ("compression.method=qsgd", f"compression.levels={s}"), True, True)
        )
    for s0 in (1, 2):
        out.append(
            Method(
                f"adaquantfl-s{s0}",
                ("compression.method=adaquantfl", f"compression.levels={s0}"),
                encoding_free=True,
            )
        )
    for name in ("dadaquant-time", "dadaquant"):
        # DAdaQuant's q_min = 1 (its Synthetic and FEMNIST settings); the client
        # rule alone needs a static q, here 2 (AdaQuantFL's and DAdaQuant's s0).
        q = 2 if name == "dadaquant-client" else 1
        out.append(
            Method(
                f"{name}-s{q}",
                (f"compression.method={name}", f"compression.levels={q}"),
                encoding_free=name == "dadaquant-time",
            )
        )
    out.append(Method("auto", ("compression.method=auto",)))
    # probe's decisions do not read bits, but its probes' bytes are in each
    # round's uplink, which packed arithmetic on the rows cannot tell: run both.
    out.append(Method("probe", ("compression.method=probe",)))
    # The rotation-based compressor, at fixed rungs and steered by the policies.
    eden = ('compression.compressor="eden"',)
    for s in EDEN_LEVELS:
        out.append(
            Method(f"eden-s{s}", (*eden, "compression.method=qsgd", f"compression.levels={s}"),
                   own_encoding=True)
        )  # fmt: skip
    for label, policy in (("adaquantfl-s2", ("compression.method=adaquantfl",
                                             "compression.levels=2")),
                          ("auto", ("compression.method=auto",)),
                          ("probe", ("compression.method=probe",))):  # fmt: skip
        out.append(Method(f"eden-{label}", (*eden, *policy), own_encoding=True))
    return out


@dataclass(frozen=True)
class Job:
    regime: str
    method: Method
    encoding: str
    seed: int
    rounds_scale: float

    def overrides(self) -> list[str]:
        from adaquantfl.runner.config import load_config

        base = load_config(REGIMES[self.regime])
        rounds = max(10, round(base.train.rounds * self.rounds_scale))
        return [
            *self.method.overrides,
            f'compression.encoding="{self.encoding}"',
            f"train.seed={self.seed}",
            f"train.rounds={rounds}",
            f"train.eval_every={EVAL_EVERY}",
            "train.noise_cost_every=0",
            "compare.methods=[]",
        ]

    def key(self) -> str:
        """A file name for this run, derived from its whole resolved config."""
        from adaquantfl.runner.config import load_config

        config = load_config(REGIMES[self.regime], self.overrides()).to_dict()
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.regime}-{self.method.label}-{self.encoding}-seed{self.seed}-{digest}"


def run_job(job: Job, fresh: bool) -> dict[str, Any]:
    """Run one method (or load its cached rows); rows and wall seconds."""
    path = RUNS / f"{job.key()}.json"
    if path.exists() and not fresh:
        cached: dict[str, Any] = json.loads(path.read_text())
        cached["cached"] = True
        return cached
    import torch

    import adaquantfl

    torch.set_num_threads(1)  # one process per core
    start = time.perf_counter()
    result = adaquantfl.run(REGIMES[job.regime], None, overrides=job.overrides())
    keep = ("round", "levels", "participants", "rejected", "train_loss", "test_accuracy",
            "wire_bits", "cum_wire_bits")  # fmt: skip
    out = {
        "rows": [{k: r.get(k) for k in keep} for r in result.metrics],
        "seconds": time.perf_counter() - start,
    }
    RUNS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    out["cached"] = False
    return out


def packed_rows(rows: Sequence[dict[str, Any]], regime: str) -> list[dict[str, Any]]:
    """The same rounds with the bits a packed message of each round's levels takes.

    Exact: every accepted message is one packed message of the round's
    levels (raw float32 at full precision). The suite configures no faults,
    so its only rejected replies are clients whose training diverged, which
    fail before they compress and send nothing (their rounds' entropy-coded
    rows count 0 bits for them too).
    """
    from adaquantfl.compression.codec import message_bytes

    numel, bucket = _packed_shape(regime)
    out, total = [], 0
    for row in rows:
        size = message_bytes(numel, row["levels"], bucket_size=bucket)
        bits = 8 * size * row["participants"]
        total += bits
        out.append({**row, "wire_bits": bits, "cum_wire_bits": total})
    return out


@functools.cache
def _packed_shape(regime: str) -> tuple[int, int | None]:
    """The model's size and the compressor's bucket of a regime."""
    from adaquantfl.runner.build import build_model, load_data
    from adaquantfl.runner.config import load_config

    config = load_config(REGIMES[regime])
    numel = build_model(config, load_data(config))[0].numel
    return numel, config.compression.build_compressor().options.bucket_size


def bits_to(rows: Sequence[dict[str, Any]], target: float, smooth: int = 10) -> int | None:
    from adaquantfl.runner.report import first_round_at_target

    hit = first_round_at_target(rows, target, smooth)
    return None if hit is None else int(rows[hit]["cum_wire_bits"])


def final_loss(rows: Sequence[dict[str, Any]]) -> float:
    from adaquantfl.runner.report import final_mean

    value = final_mean(rows, "train_loss")
    if value is None:
        raise ValueError("a run has no training loss")
    return value


def at_budget(rows: Sequence[dict[str, Any]], budget: int) -> tuple[float | None, float | None]:
    """Final train loss and test accuracy of a run stopped at an uplink budget.

    The rounds whose cumulative uplink stays within ``budget`` are exactly the
    rows a run with ``[train] uplink_budget_bits = budget`` produces (the
    simulator is deterministic and a budget stop only drops the rounds
    after), so their final means are what that run would report.
    """
    from adaquantfl.runner.report import final_mean

    kept = [r for r in rows if r["cum_wire_bits"] <= budget]
    if not kept:
        return None, None
    return final_mean(kept, "train_loss"), final_mean(kept, "test_accuracy")


def _to_target(
    runs: dict[tuple[str, str, str, int], dict[str, Any]],
    regime: str,
    encoding: str,
    seed: int,
    suite: Sequence[Method],
    factor: float,
    fixed: frozenset[str] | None = None,
) -> tuple[float, dict[str, int | None], int | None] | None:
    """fp32's final loss, each method's bits to ``factor`` x it, and the fewest
    bits any fixed level needed (None if none reached it); None without fp32."""
    fp32 = runs.get((regime, "fp32", "packed", seed))
    if fp32 is None:
        return None
    fp32_loss = final_loss(fp32["rows"])
    bits = {
        m.label: bits_to(runs[key]["rows"], factor * fp32_loss)
        for m in suite
        if (key := (regime, m.label, encoding, seed)) in runs
    }
    labels = fixed if fixed is not None else {m.label for m in suite if m.fixed}
    best = [b for label in labels if (b := bits.get(label))]
    return fp32_loss, bits, min(best) if best else None


def score_budget(
    runs: dict[tuple[str, str, str, int], dict[str, Any]],
    regimes: Sequence[str],
    seeds: Sequence[int],
    suite: Sequence[Method],
) -> dict[str, Any]:
    """Every method's final loss (x fp32's final) and accuracy at one uplink budget.

    The budget of a regime, encoding and seed is what the hindsight-best fixed
    level needed to reach ``BUDGET_TARGET`` x fp32's final loss: the bits a
    user who had grid-searched s would have spent.
    """
    table: dict[str, Any] = {}
    for regime in regimes:
        for encoding in ENCODINGS:
            losses: dict[str, list[float]] = {m.label: [] for m in suite}
            accs: dict[str, list[float]] = {m.label: [] for m in suite}
            budgets = []
            for seed in seeds:
                scored = _to_target(runs, regime, encoding, seed, suite, BUDGET_TARGET)
                if scored is None or scored[2] is None:
                    continue
                fp32_loss, _, budget = scored
                budgets.append(budget)
                for m in suite:
                    if (regime, m.label, encoding, seed) not in runs:
                        continue
                    loss, acc = at_budget(runs[(regime, m.label, encoding, seed)]["rows"], budget)
                    if loss is not None:
                        losses[m.label].append(loss / fp32_loss)
                    if acc is not None:
                        accs[m.label].append(acc)
            if not budgets:
                continue
            table.setdefault(regime, {})[encoding] = {
                "budget_bits": statistics.fmean(budgets),
                "methods": {
                    label: {
                        "loss_x_fp32": statistics.fmean(losses[label]) if losses[label] else None,
                        "test_accuracy": statistics.fmean(accs[label]) if accs[label] else None,
                    }
                    for label in losses
                    if losses[label] or accs[label]
                },
            }
    return table


def score(
    runs: dict[tuple[str, str, str, int], dict[str, Any]],
    regimes: Sequence[str],
    seeds: Sequence[int],
    suite: Sequence[Method],
    fixed: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Ratios to the hindsight-best fixed level, per regime, encoding, target and method.

    ``fixed``: the labels the best is taken over (default: the fixed QSGD levels).
    """
    table: dict[str, Any] = {}
    for regime in regimes:
        for encoding in ENCODINGS:
            for factor in TARGETS:
                cell: dict[str, Any] = {}
                per_seed: dict[str, list[float | None]] = {m.label: [] for m in suite}
                # Seeds where no fixed level reached the target: no ratio exists, but
                # whether the method reached it is worth telling.
                alone: dict[str, list[bool]] = {m.label: [] for m in suite}
                for seed in seeds:
                    scored = _to_target(runs, regime, encoding, seed, suite, factor, fixed)
                    if scored is None:
                        continue
                    _, bits, best = scored
                    for label, b in bits.items():
                        if best is None:
                            alone[label].append(b is not None)
                        else:
                            per_seed[label].append(None if b is None else b / best)
                for label, ratios in per_seed.items():
                    if not ratios and not alone[label]:
                        continue
                    got = [r for r in ratios if r is not None]
                    cell[label] = {
                        "ratio": math.exp(statistics.fmean(math.log(r) for r in got))
                        if got
                        else None,
                        "reached": len(got),
                        "seeds": len(ratios),
                        "per_seed": ratios,
                        "unscored": len(alone[label]),
                        "alone": sum(alone[label]),
                    }
                table.setdefault(regime, {}).setdefault(encoding, {})[str(factor)] = cell
    return table


def _pool(cells: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Cells of the ratio table pooled: the geometric mean over every (target,
    seed) case reached, the cases counted, and those missed of the ones the
    best fixed level reached."""
    logs: list[float] = []
    missed = cases = 0
    for c in cells:
        if c is None:
            continue
        cases += c["seeds"]
        missed += c["seeds"] - c["reached"]
        if c["ratio"] is not None:
            logs += [math.log(c["ratio"])] * c["reached"]
    ratio = math.exp(statistics.fmean(logs)) if logs else None
    return {"ratio": ratio, "missed": missed, "cases": cases}


def _cells(report: dict[str, Any], label: str, regimes: Sequence[str]) -> list[dict[str, Any]]:
    """Every cell of ``label`` in ``regimes``, over encodings and targets."""
    return [
        cell[label]
        for regime in regimes
        for by_target in report["table"][regime].values()
        for cell in by_target.values()
        if label in cell
    ]


def summary_markdown(report: dict[str, Any]) -> list[str]:
    regimes = list(report["table"])
    lines = [
        "# Per regime: geometric mean ratio, and cases missed",
        "",
        "Each cell: the geometric mean of the ratio over every (target, encoding, seed) the "
        "method reached, then how many of the cases the hindsight-best fixed level reached "
        "it missed.",
        "",
        "| method | " + " | ".join(regimes) + " | all |",
        "|---|" + "---|" * (len(regimes) + 1),
    ]
    for m in methods():
        if not _cells(report, m.label, regimes):
            continue
        cells = []
        for group in [[regime] for regime in regimes] + [regimes]:
            cell = _cells(report, m.label, group)
            pooled = _pool(cell)
            ratio = "never" if pooled["ratio"] is None else f"{pooled['ratio']:.2f}"
            cells.append(f"{ratio}, missed {pooled['missed']}/{pooled['cases']}" if cell else "")
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


#: The adaptive methods the targets are stated for (DESIGN §2; the policy issue).
POLICIES = ("adaquantfl-s2", "dadaquant-s1", "auto", "probe",
            "eden-adaquantfl-s2", "eden-auto", "eden-probe")  # fmt: skip
EDEN_FIXED = tuple(f"eden-s{s}" for s in EDEN_LEVELS)


def targets_markdown(report: dict[str, Any]) -> list[str]:
    """Each policy against the targets, over every (regime, target, encoding, seed) case."""
    lines = [
        "# The targets, case by case",
        "",
        "Over every (regime, target, encoding, seed) case in which the hindsight-best fixed "
        "rung reached the target: the cases the policy missed, its worst ratio, the share of "
        "cases above 1.25x, and the geometric mean over the cases it reached (targets: 0 "
        "missed, worst <= 1.25, geometric mean <= 0.95). Against the best fixed QSGD level, "
        "and against the best fixed rung of either compressor (QSGD's levels or EDEN's rungs).",
        "",
        "| method | best fixed | missed | worst | cases > 1.25x | geometric mean |",
        "|---|---|---|---|---|---|",
    ]
    for label in POLICIES:
        for key, name in (("table", "QSGD level"), ("table_any", "any rung")):
            ratios: list[float | None] = [
                r
                for by_encoding in report.get(key, {}).values()
                for by_target in by_encoding.values()
                for cell in by_target.values()
                if label in cell
                for r in cell[label].get("per_seed", [])
            ]
            if not ratios:
                continue
            got = [r for r in ratios if r is not None]
            worst = f"{max(got):.2f}" if got else "never"
            over = sum(r > 1.25 for r in got)
            mean = f"{math.exp(statistics.fmean(math.log(r) for r in got)):.2f}" if got else ""
            lines.append(
                f"| {label} | {name} | {len(ratios) - len(got)}/{len(ratios)} | {worst} | "
                f"{over}/{len(got)} | {mean} |"
            )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    suite = [m.label for m in methods()]
    lines = [
        "# Regime suite: uplink bits to target / hindsight-best fixed level",
        "",
        f"{len(report['seeds'])} seed(s), rounds x {report['rounds_scale']}; wall time "
        f"{report['wall_s'] / 60:.1f} min on {report['machine']['cpu']} "
        f"({report['machine']['cores']} cores, {report['jobs']} parallel jobs; "
        f"{report['ran']} runs executed, {report['cached']} reused). Each cell: geometric mean "
        "of the ratio over the seeds that reached the target (k/n when not all did); 'never' "
        "when none did. The best fixed level of each seed is 1.00 by definition. Seeds in "
        "which no fixed level reached a target give no ratio: 'k/n alone' says the method "
        "reached it in k of those n seeds ('no fixed': in every seed).",
        "",
        *summary_markdown(report),
        *targets_markdown(report),
    ]
    for regime, by_encoding in report["table"].items():
        for encoding, by_target in by_encoding.items():
            lines.append(f"## {regime}, {encoding}")
            lines.append("")
            lines.append("| method | " + " | ".join(f"{t}x fp32" for t in by_target) + " |")
            lines.append("|---|" + "---|" * len(by_target))
            for label in suite:
                cells = []
                for cell in by_target.values():
                    cells.append(_ratio_cell(cell.get(label)))
                if any(cells):
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    budget = report.get("budget") or {}
    if budget:
        lines += [
            "# At a budget: final train loss (x fp32's) and test accuracy",
            "",
            "The budget of each regime, encoding and seed is the uplink the hindsight-best "
            f"fixed level needed to reach {BUDGET_TARGET}x fp32's final loss; every method's "
            "final figures are those of its rounds within that budget (mean over seeds).",
            "",
        ]
        columns = [(r, e) for r, by_enc in budget.items() for e in by_enc]
        lines.append("| method | " + " | ".join(f"{r}, {e}" for r, e in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        lines.append(
            "| budget (Mbit) | "
            + " | ".join(f"{budget[r][e]['budget_bits'] / 1e6:.2f}" for r, e in columns)
            + " |"
        )
        for label in suite:
            cells = []
            for r, e in columns:
                c = budget[r][e]["methods"].get(label)
                if c is None or c["loss_x_fp32"] is None:
                    cells.append("")
                else:
                    acc = c["test_accuracy"]
                    text = f"{c['loss_x_fp32']:.3f}"
                    cells.append(text if acc is None else f"{text} / {acc:.3f}")
            if any(cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _ratio_cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    unscored, alone = c.get("unscored", 0), c.get("alone", 0)  # absent in older reports
    if not c["seeds"]:
        return f"no fixed; {alone}/{unscored} alone"
    if c["ratio"] is None:
        text = "never"
    else:
        text = f"{c['ratio']:.2f}"
        text += "" if c["reached"] == c["seeds"] else f" ({c['reached']}/{c['seeds']})"
    if unscored:
        text += f"; {alone}/{unscored} alone"
    return text


def regime_map(report: dict[str, Any], path: Path) -> None:
    """Heat map: policy x (regime, encoding), the geometric mean ratio over the cases reached.

    The colour is the ratio's geometric mean over the (target, seed) cases the
    policy reached; a cell also says how many cases it missed of those the best
    fixed level reached ("never": it reached none of them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    policies = [m.label for m in methods() if not m.fixed and m.label != "fp32"]
    columns = [(r, e) for r, by_enc in report["table"].items() for e in by_enc]
    grid = np.full((len(policies), len(columns)), np.nan)
    texts = [["" for _ in columns] for _ in policies]
    for j, (regime, encoding) in enumerate(columns):
        for i, label in enumerate(policies):
            pooled = _pool(c.get(label) for c in report["table"][regime][encoding].values())
            missed, cases = pooled["missed"], pooled["cases"]
            if pooled["ratio"] is not None:
                grid[i, j] = pooled["ratio"]
                texts[i][j] = f"{grid[i, j]:.2f}" + (f"\nmissed {missed}/{cases}" if missed else "")
            elif cases:
                texts[i][j] = "never"
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 3, 0.5 * len(policies) + 2))
    image = ax.imshow(np.log2(grid), cmap="RdYlGn_r", vmin=-1.5, vmax=1.5, aspect="auto")
    for i in range(len(policies)):
        for j in range(len(columns)):
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=7.5)
    ax.set_xticks(range(len(columns)), [f"{r}\n{e}" for r, e in columns], fontsize=8)
    ax.set_yticks(range(len(policies)), policies, fontsize=8)
    ax.set_title(
        "uplink bits to target / hindsight-best fixed level: geometric mean over the cases "
        "reached (3 targets x seeds)\nmissed k/n: targets the best fixed level reached and the "
        "policy did not; never: it reached none of them",
        fontsize=9,
    )
    fig.colorbar(image, label="log2 ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="comma-separated regimes")
    parser.add_argument("--methods", default="", help="comma-separated method labels")
    parser.add_argument(
        "--quick", action="store_true", help="the hard cells: floor + short CNN, 1 seed"
    )
    parser.add_argument("--heldout", action="store_true", help="the held-out regimes instead")
    parser.add_argument(
        "--levels", default="", help="comma-separated fixed QSGD levels (default: all of them)"
    )
    parser.add_argument("--fresh", action="store_true", help="rerun cached runs")
    parser.add_argument(
        "--rerun", default="", help="comma-separated method labels to rerun (e.g. after a change)"
    )
    parser.add_argument(
        "--render", action="store_true", help="redraw regimes.md and .png from regimes.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        name = "regimes_heldout" if args.heldout else "regimes_quick" if args.quick else "regimes"
        report = json.loads((RESULTS / f"{name}.json").read_text())
        write_outputs(report)
        return
    if args.heldout:
        from benchmarks.regimes_heldout import HELDOUT

        REGIMES.clear()
        REGIMES.update(HELDOUT)
    seeds = [0] if args.quick else list(range(args.seeds))
    scale = 1.0
    default = QUICK_REGIMES if args.quick else list(REGIMES)
    regimes = [r for r in (args.only.split(",") if args.only else default) if r]
    missing = [r for r in regimes if r not in REGIMES]
    if missing:
        raise SystemExit(f"unknown regime(s) {missing}; known: {sorted(REGIMES)}")
    suite = methods()
    if args.levels:
        fixed = {f"qsgd-s{s}" for s in args.levels.split(",")}
        suite = [m for m in suite if not m.fixed or m.label in fixed]
    wanted_labels = args.methods.split(",") if args.methods else []
    if args.quick and not wanted_labels:
        wanted_labels = list(QUICK_METHODS)
    if wanted_labels:
        wanted = set(wanted_labels) | {"fp32"} | {m.label for m in suite if m.fixed}
        suite = [m for m in suite if m.label in wanted]
    jobs = [
        Job(regime, method, encoding, seed, scale)
        for regime in regimes
        for seed in seeds
        for method in suite
        for encoding in (("entropy",) if method.encoding_free or method.own_encoding else ENCODINGS)
    ]
    start = time.perf_counter()
    rerun = set(args.rerun.split(",")) if args.rerun else set()
    fresh = [args.fresh or job.method.label in rerun for job in jobs]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_job, jobs, fresh))
    wall = time.perf_counter() - start
    runs = {
        (j.regime, j.method.label, j.encoding, j.seed): r
        for j, r in zip(jobs, results, strict=True)
    }
    free = {m.label for m in suite if m.encoding_free}
    own = {m.label for m in suite if m.own_encoding}
    for (regime, label, _, seed), r in list(runs.items()):
        if label in free:  # the same rounds, with a packed message's bits
            runs[(regime, label, "packed", seed)] = {**r, "rows": packed_rows(r["rows"], regime)}
        elif label in own:  # the same rounds and the same bits
            runs[(regime, label, "packed", seed)] = r
    report = {
        "seeds": seeds,
        "rounds_scale": scale,
        "jobs": args.jobs,
        "wall_s": wall,
        "ran": sum(not r["cached"] for r in results),
        "cached": sum(bool(r["cached"]) for r in results),
        "run_seconds": sum(r["seconds"] for r in results if not r["cached"]),
        "machine": machine(),
        "table": score(runs, regimes, seeds, suite),
        # The best fixed rung of either compressor (QSGD's levels, EDEN's rungs).
        "table_any": score(runs, regimes, seeds, suite, frozenset(
            m.label for m in suite if m.fixed or m.label in EDEN_FIXED)),
        "budget": score_budget(runs, regimes, seeds, suite),
    }
    report["name"] = name = (
        "regimes_heldout" if args.heldout else ("regimes_quick" if args.quick else "regimes")
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_outputs(report)


def write_outputs(report: dict[str, Any]) -> None:
    name = report.get("name", "regimes")
    text = markdown(report)
    (RESULTS / f"{name}.md").write_text(text)
    regime_map(report, RESULTS / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
