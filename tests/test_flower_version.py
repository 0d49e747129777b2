"""The installed Flower is the release that the `flower` extra pins and the docs name."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def flower_requirement(pyproject: Path) -> Requirement:
    data = tomllib.loads(pyproject.read_text())
    deps = (
        data["project"].get("optional-dependencies", {}).get("flower")
        or data["project"]["dependencies"]
    )
    (flwr,) = [Requirement(d) for d in deps if Requirement(d).name == "flwr"]
    return flwr


def test_the_installed_flower_is_in_the_pinned_range() -> None:
    pytest.importorskip("flwr", reason="the Flower extra is not installed")
    installed = importlib.metadata.version("flwr")
    for pyproject in (REPO / "pyproject.toml", REPO / "examples/flower-app/pyproject.toml"):
        requirement = flower_requirement(pyproject)
        assert requirement.specifier.contains(installed), (pyproject, str(requirement))
        assert "simulation" in requirement.extras


def test_the_docs_name_the_pinned_release() -> None:
    # "Flower 1.41" in a doc that describes 1.42's behaviour would be stale. (README.md's
    # benchmark table names the release it was measured with, so it is not checked.)
    requirement = flower_requirement(REPO / "pyproject.toml")
    pinned = re.search(r">=(\d+\.\d+)", str(requirement.specifier))
    assert pinned is not None
    for doc in ("docs/flower.md", "examples/flower-app/README.md"):
        named = set(re.findall(r"(?:Flower|flwr) (\d+\.\d+)", (REPO / doc).read_text()))
        assert named <= {pinned.group(1)}, (doc, named)
