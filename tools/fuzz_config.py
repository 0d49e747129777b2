"""Config fuzzing of ``adaquantfl run``: every config ends in an ``error:`` line or a clean run.

    python -m tools.fuzz_config                          # 1,000 cases, seed 0
    python -m tools.fuzz_config --cases 100 --seed 3     # a quick run
    python -m tools.fuzz_config --replay 17              # re-run case 17 and print it

Every case starts from a config that runs in a fraction of a second (digits,
logistic regression, 3 clients, 2 rounds of 2 local steps) and applies one to
three mutations drawn from ``numpy.random.default_rng([seed, i])``, so any case
can be replayed alone:

- a key set to a hostile value: every key the config accepts (each field of
  ``[data]``, ``[model]``, ``[train]``, ``[compression]`` and ``[compare]``,
  the README's config block among them) and every option of the registered
  compressors and policies. Values: the wrong type (strings, booleans, lists,
  tables, dates), NaN, +-inf, -0.0, zero, negative, subnormal and huge numbers
  (1e308, just past float32's 3.4e38, 2**63 - 1, 2**64, 10**100), each bound
  of the key and one step past it, the key's own choices and near misses of
  them, huge (1 MB) and odd unicode strings (NUL, right-to-left marks, emoji),
  and deeply nested tables;
- a key, a section or the whole config removed, an unknown key, option or
  section added, a section that is not a table;
- the file itself hostile (not UTF-8, not TOML, empty, a directory, missing);
- hostile ``--set`` overrides and ``--out`` paths (a file, below a file, a
  NUL byte, a path too long);
- plugin modules that raise on import (any exception, a syntax error,
  ``SystemExit``), that do not exist, or that import and register nothing.

Each case runs the real CLI (``adaquantfl run``, or ``compare`` when the case
touches ``[compare]``) in a worker process, with runs stopped after
``--max-rounds`` rounds (a valid config asking for 10**9 rounds is a clean run
as far as the config goes). The outcome of a case is one of

=============== =============================================================
clean-error     exit 2 with an ``error:`` line
clean-run       exit 0; or exit 1 with the ``error:`` line of a run in which
                no client reply was ever accepted (a valid config whose
                training diverges at once, e.g. lr = 1e30)
traceback       an exception escaped the CLI, a traceback was printed, or the
                exit status was anything else (failure)
crash           the worker process died (failure)
timeout         the case ran past ``--case-s`` and its worker was killed (a
                valid config too slow for a fuzzer: reported, not a failure)
=============== =============================================================

The exit status is non-zero if any case failed; the counts go to
``benchmarks/results/fuzz_config.json``. Flower's engine is never drawn as a
valid value (it would start Ray for a single case); every other choice is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
OUTCOMES = ("clean-error", "clean-run", "traceback", "crash", "timeout")
FAILURES = ("traceback", "crash")

BASE: dict[str, dict[str, Any]] = {
    "data": {"dataset": "digits", "num_clients": 3},
    "model": {"name": "logreg"},
    "train": {"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "seed": 0},
    "compression": {"method": "qsgd", "levels": 3},
}
#: Options of the policies (``[compression.policy_options]``), by method.
POLICY_OPTIONS = {
    "adaquantfl": ("round_levels",),
    "dadaquant": ("psi", "phi", "round_levels", "client_rule"),
    "dadaquant-time": ("psi", "phi", "round_levels"),
    "dadaquant-client": ("psi", "phi", "round_levels", "client_rule"),
    "auto": ("window", "z"),
}
#: Modules the plugin mutation names, written into the worker's own directory.
PLUGINS = {
    "aqfuzz_raises": "raise ValueError('this plugin refuses to load\\nsecond line')\n",
    "aqfuzz_keyerror": "{}['missing']\n",
    "aqfuzz_syntax": "def broken(:\n",
    "aqfuzz_exit": "raise SystemExit(3)\n",
    "aqfuzz_imports_missing": "import aqfuzz_no_such_module_either\n",
    "aqfuzz_fine": "VALUE = 1\n",
}
STRINGS: tuple[Any, ...] = (
    "", " ", "none", "nan", "inf", "1e39", "0x10", "true", "../../..", "/dev/null", "%s%n{0}",
    "x" * 1_000_000, "\x00", "digits\x00", "\u202edigits", "dígits", "😀", "\ufeffdigits",
)  # fmt: skip
FLOATS: tuple[float, ...] = (
    math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0, 5e-324, 1e-300, 1e-30, 1e-7, 0.5, 1.0,
    1.5, 2.0, 1e6, 1e30, 3.4028235e38, 3.5e38, 1e39, 1e300, 1.7976931348623157e308,
)  # fmt: skip
INTS: tuple[int, ...] = (
    0, -1, 1, 2, 3, 7, 2**16, 2**20 + 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, -(2**63),
    2**64, 10**100, 10**400,
)  # fmt: skip
#: Whole config files.
FILES: tuple[bytes, ...] = (
    b"", b"\xff\xfe not utf-8 \x80", b"[train\nrounds = ", b"\xef\xbb\xbf[train]\n",
    b"[train]\nrounds = 1\n[train]\nrounds = 2\n", b"a = " + b"[" * 5000, b"a = " + b"{b=" * 3000,
)  # fmt: skip
OTHER: tuple[Any, ...] = (
    True, False, [], [1, 2], ["a"], {}, {"a": 1}, {"a": {"b": {"c": [1, {"d": 2}]}}},
    datetime.datetime(2020, 1, 1, 12, 0), datetime.date(2020, 1, 1), datetime.time(12, 0),
)  # fmt: skip


# --------------------------------------------------------------------------- drawing


def _sections() -> dict[str, type]:
    from adaquantfl.runner.config import _SECTION_CLASSES

    return dict(_SECTION_CLASSES)


def config_keys() -> list[tuple[str, ...]]:
    """Every key a config accepts, as paths: ``("compression", "options", k)``."""
    from adaquantfl.compression.compressor import COMPRESSORS

    keys: list[tuple[str, ...]] = []
    for section, cls in _sections().items():
        keys += [(section, f.name) for f in dataclasses.fields(cls)]
    for table in ("options", "downlink_options"):
        for compressor in COMPRESSORS.values():
            options = getattr(compressor, "options_type", None)
            if options is not None and dataclasses.is_dataclass(options):
                keys += [("compression", table, f.name) for f in dataclasses.fields(options)]
    for names in POLICY_OPTIONS.values():
        keys += [("compression", "policy_options", name) for name in names]
    return sorted(set(keys))


def _near(key: tuple[str, ...]) -> list[Any]:
    """Values at and one step past the key's own bounds and choices, when it has them."""
    from adaquantfl.compression.compressor import COMPRESSORS
    from adaquantfl.policy import POLICIES

    out: list[Any] = []
    cls = _sections().get(key[0])
    field = {f.name: f for f in dataclasses.fields(cls)}.get(key[1]) if cls else None
    if field is not None and len(key) == 2:
        meta = field.metadata
        for bound in (meta.get("min"), meta.get("max")):
            if isinstance(bound, int | float):
                out += [bound, bound - 1, bound + 1, float(bound), math.nextafter(bound, math.inf),
                        math.nextafter(bound, -math.inf)]  # fmt: skip
        for choice in meta.get("choices", ()):
            if choice != "flower":  # Flower's engine starts Ray: see the module docstring
                out += [choice, choice.upper(), f" {choice}", choice + "x"]
    if key[-1] in ("method",):
        out += list(POLICIES)
    if key[-1] in ("compressor", "downlink"):
        out += [*COMPRESSORS, "none"]
    if key[-1] == "plugins":
        out += [[name] for name in PLUGINS] + [
            ["aqfuzz_no_such_module"], [""], ["a..b"], [".relative"], ["x" * 10_000], [1],
            ["os.path"], "aqfuzz_fine", [["aqfuzz_fine"]],
        ]  # fmt: skip
    if key[-1] == "methods":
        out += [
            [{"method": "fp32"}, {"method": "qsgd", "levels": 7}],
            [{"method": "qsgd", "levels": 3, "label": "a/b"}],
            [{"method": "qsgd", "label": ""}], [{"method": 5}], [{"unknown": 1}], [1, 2],
            [{"method": "qsgd", "levels": 1e39}], [{}] * 50,
        ]  # fmt: skip
    if key[-1] == "dataset":
        out += ["synthetic", "mnist1d", "mnist-5k", "mnist", "cifar10"]
    if key[-1] == "name":
        out += ["mlp", "cnn", "cnn1d"]
    return out


def hostile_value(rng: np.random.Generator, key: tuple[str, ...], *, edge: bool = False) -> Any:
    """Any hostile value; with ``edge``, one at the key's bounds or choices where it has them."""
    near = _near(key)
    if edge and near:
        return near[int(rng.integers(len(near)))]
    pools: list[Sequence[Any]] = [STRINGS, FLOATS, INTS, OTHER]
    if near:
        pools += [near, near]  # the key's own bounds and choices: twice as likely
    pool = pools[int(rng.integers(len(pools)))]
    return pool[int(rng.integers(len(pool)))]


def _set_path(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    table = config
    for part in path[:-1]:
        if not isinstance(table.get(part), dict):
            table[part] = {}
        table = table[part]
    table[path[-1]] = value


@dataclasses.dataclass
class Case:
    """One fuzz case: a config (or raw file bytes), CLI arguments and what was done."""

    index: int
    config: dict[str, Any] | None
    raw: bytes | None = None
    command: str = "run"
    sets: list[str] = dataclasses.field(default_factory=list)
    out: str | None = None  # None: a fresh directory
    config_path: str | None = None  # a hostile path to the config itself
    mutations: list[str] = dataclasses.field(default_factory=list)


def draw_case(index: int, seed: int, keys: Sequence[tuple[str, ...]]) -> Case:
    """Case ``index`` of run ``seed``: the base config with 1 to 3 mutations."""
    rng = np.random.default_rng([seed, index])
    config = json.loads(json.dumps(BASE))
    case = Case(index, config)
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):  # mostly one: one error masks another
        kind = rng.choice(
            ["set", "set", "set", "set", "edge", "edge", "edge", "override", "remove", "unknown",
             "not-a-table", "file", "out"],
        )  # fmt: skip
        key = keys[int(rng.integers(len(keys)))]
        if kind in ("set", "edge"):
            value = hostile_value(rng, key, edge=kind == "edge")
            _set_path(config, key, value)
            case.mutations.append(f"set {'.'.join(key)} = {_short(value)}")
        elif kind == "override":
            value = hostile_value(rng, key)
            text = _override_text(value)
            case.sets.append(f"{'.'.join(key)}={text}")
            case.mutations.append(f"--set {'.'.join(key)}={_short(text)}")
        elif kind == "remove":
            what = key[: int(rng.integers(1, len(key) + 1))]
            table = config
            for part in what[:-1]:
                table = table.get(part, {}) if isinstance(table, dict) else {}
            if isinstance(table, dict):
                table.pop(what[-1], None)
            case.mutations.append(f"remove {'.'.join(what)}")
        elif kind == "unknown":
            where = key[: int(rng.integers(0, len(key)))]
            name = ["roundz", "lR", "", " ", "é", "x" * 5000, "train"][int(rng.integers(7))]
            _set_path(config, (*where, name), hostile_value(rng, key))
            case.mutations.append(f"unknown key {'.'.join((*where, name))!r}"[:120])
        elif kind == "not-a-table":
            config[key[0]] = hostile_value(rng, ("", ""))
            case.mutations.append(f"[{key[0]}] = {_short(config[key[0]])}")
        elif kind == "file":
            case.raw = FILES[int(rng.integers(len(FILES)))]
            case.mutations.append(f"config file {case.raw[:24]!r}")
            if rng.random() < 0.2:
                case.config_path = ["<dir>", "<missing>", "\x00bad"][int(rng.integers(3))]
                case.mutations.append(f"config path {case.config_path!r}")
        else:
            case.out = ["<file>", "<below-file>", "\x00", "o" * 5000, "<held-results>"][
                int(rng.integers(5))
            ]
            case.mutations.append(f"--out {_short(case.out)}")
    if any(
        m.startswith(("set compare", "--set compare", "remove compare")) for m in case.mutations
    ):
        case.command = "compare"
    return case


def _override_text(value: Any) -> str:
    import tomli_w

    if isinstance(value, str) and value.isidentifier():
        return value  # a bare word: the CLI reads it as a string
    try:
        return tomli_w.dumps({"v": value}).partition("=")[2].strip()
    except (TypeError, ValueError):
        return repr(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} chars)"


# --------------------------------------------------------------------------- running


class _RoundCap(BaseException):
    """Stops a run after the fuzzer's round budget (not an Exception: nothing catches it)."""


@contextlib.contextmanager
def _capped(max_rounds: int) -> Iterator[Any]:
    def on_round(label: str, row: Any) -> None:
        if row["round"] >= max_rounds:
            raise _RoundCap

    yield on_round


def capped_progress(max_rounds: int) -> Any:
    """A stand-in for the CLI's progress bar that stops every run after ``max_rounds`` rounds."""
    return lambda total, quiet: _capped(max_rounds)


def write_plugins(workdir: Path) -> Path:
    """Write the plugin modules of :data:`PLUGINS` into ``workdir/plugins``; returns that folder."""
    plugins = workdir / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    for name, source in PLUGINS.items():
        (plugins / f"{name}.py").write_text(source)
    return plugins


def prepare_worker(workdir: Path, max_rounds: int) -> None:
    """Make the plugin modules importable and cap the rounds of every run (in this process)."""
    import adaquantfl.cli as cli

    plugins = write_plugins(workdir)
    if str(plugins) not in sys.path:
        sys.path.insert(0, str(plugins))
    os.environ.setdefault("ADAQUANTFL_CACHE_DIR", str(workdir / "cache"))
    cli._progress = capped_progress(max_rounds)


def run_case(case: Case, workdir: Path) -> dict[str, Any]:
    """Run one case through the CLI (in this process); its outcome and the output's tail."""
    import tomli_w
    from typer.testing import CliRunner

    from adaquantfl.cli import app

    root = Path(tempfile.mkdtemp(prefix=f"case{case.index}-", dir=workdir))
    try:
        config_path = root / "config.toml"
        try:
            data = case.raw if case.raw is not None else tomli_w.dumps(case.config).encode()
        except (TypeError, ValueError) as exc:  # a value TOML cannot hold: not a case
            return {"outcome": "clean-error", "skipped": f"tomli_w: {exc}"}
        config_path.write_bytes(data)
        path = str(config_path)
        if case.config_path == "<dir>":
            path = str(root)
        elif case.config_path == "<missing>":
            path = str(root / "missing.toml")
        elif case.config_path is not None:
            path = case.config_path
        out = _out_path(case.out, root)
        args = [case.command, path, "--out", out]
        for item in case.sets:
            args += ["--set", item]
        start = time.perf_counter()
        capped = False
        try:
            result = CliRunner().invoke(app, args)
        except _RoundCap:
            capped = True
            result = None
        seconds = time.perf_counter() - start
        if result is None:
            return {"outcome": "clean-run", "capped": True, "seconds": seconds, "tail": ""}
        output = result.output
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            tb = "".join(traceback.format_exception(exc)[-4:])
            outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"[:500] + "\n" + tb[-1500:]
        elif "Traceback (most recent call last)" in output:
            outcome, detail = "traceback", output[-1500:]
        elif result.exit_code == 2 and "error:" in output:
            outcome, detail = "clean-error", ""
        elif result.exit_code == 0 or (
            result.exit_code == 1
            and "error:" in output
            and "no client reply was accepted" in output
        ):
            outcome, detail = "clean-run", ""
        else:
            outcome, detail = "traceback", f"exit {result.exit_code}: {output[-1500:]}"
        error_line = next((ln for ln in output.splitlines() if "error:" in ln), "")
        return {
            "outcome": outcome,
            "exit": result.exit_code,
            "capped": capped,
            "seconds": seconds,
            "error": error_line[:300],
            "detail": detail,
            "warning": "RuntimeWarning" in output,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _out_path(kind: str | None, root: Path) -> str:
    if kind is None:
        return str(root / "out")
    if kind == "<file>":
        (root / "a-file").write_text("mine")
        return str(root / "a-file")
    if kind == "<below-file>":
        (root / "a-file").write_text("mine")
        return str(root / "a-file" / "sub")
    if kind == "<held-results>":
        (root / "held").mkdir()
        (root / "held" / "summary.json").write_text("{}")
        return str(root / "held")
    return str(root / kind) if "\x00" not in kind else str(root) + "/" + kind


def _worker(conn: Any, seed: int, workdir: str, max_rounds: int) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the CLI's own warnings are not what is judged
    keys = config_keys()
    prepare_worker(Path(workdir), max_rounds)
    while True:
        index = conn.recv()
        if index is None:
            return
        case = draw_case(index, seed, keys)
        conn.send((index, run_case(case, Path(workdir))))


class _Pool:
    """One worker process; restarted when it dies or hangs."""

    def __init__(self, seed: int, workdir: Path, max_rounds: int) -> None:
        self.args = (seed, str(workdir), max_rounds)
        self.ctx = multiprocessing.get_context("spawn")
        self.proc: Any = None
        self.conn: Any = None

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()
        self.conn = parent

    def run(self, index: int, case_s: float, startup_s: float) -> tuple[Any, ...]:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send(index)
        if self.conn.poll(case_s + startup_s):
            try:
                return tuple(self.conn.recv())
            except EOFError:
                pass
        alive = self.proc.is_alive()
        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.proc = None
        if alive:
            return index, {"outcome": "timeout", "detail": f"over {case_s} s"}
        return index, {"outcome": "crash", "detail": f"worker exit code {code}"}

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()


def fuzz(cases: int, seed: int, *, start: int = 0, case_s: float = 60.0,
         max_rounds: int = 3) -> dict[str, Any]:  # fmt: skip
    """Run cases ``start .. start + cases - 1``; the counts, and every failure and timeout."""
    counts: Counter[str] = Counter()
    by_key: dict[str, Counter[str]] = {}
    failures: list[dict[str, Any]] = []
    timeouts: list[dict[str, Any]] = []
    capped = warnings = 0
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz_config-") as tmp:
        pool = _Pool(seed, Path(tmp), max_rounds)
        keys = config_keys()
        startup_s = 120.0  # the first case of a fresh worker also imports torch and numba
        try:
            for index in range(start, start + cases):
                result = pool.run(index, case_s, startup_s)[-1]
                case = draw_case(index, seed, keys)  # the worker's case, drawn again to name it
                mutations, command = case.mutations, case.command
                startup_s = 0.0 if result["outcome"] not in ("timeout", "crash") else 120.0
                outcome = result["outcome"]
                counts[outcome] += 1
                capped += bool(result.get("capped"))
                warnings += bool(result.get("warning"))
                for m in mutations:
                    name = m.split(" = ")[0].split("=")[0]
                    by_key.setdefault(name, Counter())[outcome] += 1
                where = {"case": index, "command": command, "mutations": mutations}
                if outcome in FAILURES:
                    failures.append({**where, "detail": result.get("detail", "")[:2000]})
                elif outcome == "timeout":
                    timeouts.append(where)
                if (index - start + 1) % 50 == 0:
                    done = index - start + 1
                    print(f"  {done}/{cases} cases, {dict(counts)}", flush=True)
        finally:
            pool.close()
    return {
        "cases": cases,
        "seed": seed,
        "start": start,
        "counts": {o: counts[o] for o in OUTCOMES},
        "runs_stopped_at_the_round_cap": capped,
        "runs_that_printed_a_runtime_warning": warnings,
        "by_mutation": {k: dict(v) for k, v in sorted(by_key.items())},
        "failures": failures,
        "timeouts": timeouts,
        "seconds": round(time.perf_counter() - began, 1),
    }


def print_report(report: dict[str, Any]) -> None:
    c = report["counts"]
    print(
        f"\ncases {report['cases']} (seed {report['seed']}), {report['seconds']} s: "
        + ", ".join(f"{o} {c[o]}" for o in OUTCOMES)
    )
    print(
        f"clean runs stopped at the round cap: {report['runs_stopped_at_the_round_cap']}; "
        f"cases that printed a RuntimeWarning: {report['runs_that_printed_a_runtime_warning']}"
    )
    for t in report["timeouts"][:10]:
        print("TIMEOUT", t)
    for f in report["failures"][:20]:
        print("FAILURE", json.dumps(f)[:3000])
    failed = sum(c[o] for o in FAILURES)
    print("FAILED" if failed else "OK: every config ended in an error: line or a clean run")


def replay(index: int, seed: int, max_rounds: int) -> int:
    """Run one case in this process and print its mutations, outcome and output."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    case = draw_case(index, seed, config_keys())
    print(f"case {index} (seed {seed}): adaquantfl {case.command}")
    for m in case.mutations:
        print(f"  {m}")
    with tempfile.TemporaryDirectory(prefix="fuzz_config-") as tmp:
        prepare_worker(Path(tmp), max_rounds)
        result = run_case(case, Path(tmp))
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0 if result["outcome"] not in FAILURES else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz_config", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first case")
    parser.add_argument("--replay", type=int, default=None, help="re-run only this case")
    parser.add_argument("--case-s", type=float, default=60.0, help="time limit of one case")
    parser.add_argument("--max-rounds", type=int, default=3, help="rounds a run may go")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_config.json")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay, args.seed, args.max_rounds)
    report = fuzz(args.cases, args.seed, start=args.start, case_s=args.case_s,
                  max_rounds=args.max_rounds)  # fmt: skip
    report["command"] = "python -m tools.fuzz_config " + " ".join(argv)
    report["machine"] = {"python": platform.python_version(), "processor": platform.machine()}
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(report["counts"][o] for o in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
