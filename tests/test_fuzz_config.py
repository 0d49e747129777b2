"""The config fuzzer (``python -m tools.fuzz_config``): a few cases, its coverage and its oracle.

The fuzzer runs the real CLI on hostile configs and counts the outcomes; any
traceback or crash fails it. Here it runs a handful of cases in its worker
process, its key list is held to the README's config block and to every
field a config accepts, and its oracle is shown to call a traceback one.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import tools.fuzz_config as fuzz

import adaquantfl.cli
import adaquantfl.runner.config
from adaquantfl.runner.config import _SECTION_CLASSES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_a_few_fuzz_cases_end_in_error_lines_or_clean_runs() -> None:
    report = fuzz.fuzz(12, seed=7, case_s=120.0)
    counts = report["counts"]
    assert sum(counts.values()) == 12
    assert counts["traceback"] == 0 and counts["crash"] == 0, report["failures"]
    assert counts["clean-error"] > 0


def test_the_fuzzer_draws_every_key_of_the_readme_and_of_every_section() -> None:
    keys = {".".join(k) for k in fuzz.config_keys()}
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    text = re.sub(r"^# ", "", block.group(1), flags=re.M)  # the commented-out keys too
    readme = tomllib.loads(text.replace("/path/to/files", "x"))
    documented = {
        f"{section}.{key}"
        for section, table in readme.items()
        for key, value in table.items()
        if not isinstance(value, dict)
    }
    assert documented and documented <= keys, documented - keys
    for section, cls in _SECTION_CLASSES.items():
        assert {f"{section}.{f.name}" for f in dataclasses.fields(cls)} <= keys
    assert {"compression.options.fraction", "compression.policy_options.window"} <= keys


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cases run in this process, as in the fuzzer's worker (undone after the test)."""
    monkeypatch.syspath_prepend(str(fuzz.write_plugins(tmp_path)))
    monkeypatch.setattr(adaquantfl.cli, "_progress", fuzz.capped_progress(2))
    return tmp_path


def test_the_oracle_calls_a_traceback_a_failure(
    in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: the same case is clean, then a traceback once loading raises KeyError."""
    case = fuzz.Case(0, {**fuzz.BASE, "train": {**fuzz.BASE["train"], "rounds": 10**9}})
    clean = fuzz.run_case(case, in_process)
    assert clean["outcome"] == "clean-run" and clean["capped"]  # stopped at the round cap

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("rows")

    monkeypatch.setattr(adaquantfl.runner.config, "load_config", broken)
    failed = fuzz.run_case(case, in_process)
    assert failed["outcome"] == "traceback" and "KeyError" in failed["detail"]


@pytest.mark.parametrize("plugin", sorted(fuzz.PLUGINS))
def test_each_plugin_the_fuzzer_draws_is_a_clean_outcome(in_process: Path, plugin: str) -> None:
    config = {**fuzz.BASE, "compression": {**fuzz.BASE["compression"], "plugins": [plugin]}}
    result = fuzz.run_case(fuzz.Case(0, config), in_process)
    expected = "clean-run" if plugin == "aqfuzz_fine" else "clean-error"
    assert result["outcome"] == expected, result
    if expected == "clean-error":
        assert f"cannot import module {plugin!r}" in result["error"]
