"""Session-wide test settings."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

# Flower and Ray read these when first imported: no telemetry, update checks or
# usage reports leave the machine during tests.
for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)

# adaquantfl.data.cache.CACHE_DIR_ENV, spelled out: importing the package here
# would import it before the settings above are in place.
CACHE_DIR_ENV = "ADAQUANTFL_CACHE_DIR"


@pytest.fixture(autouse=True, scope="session")
def _private_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Cached data sets go to a temporary directory, never the user's ~/.cache."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("adaquantfl-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


# --------------------------------------------------------------------------- registries


def _registries() -> list[dict[str, Any] | set[str]]:
    """The package's plug-in registries, found through their public import paths.

    Imported here, not at the top: the settings above must be in place first.
    ``adaquantfl.compression`` and ``adaquantfl.policy`` import every built-in
    compressor and policy, so a snapshot taken after this holds all of them.
    """
    from adaquantfl.compression import COMPRESSORS
    from adaquantfl.policy import POLICIES, register_policy

    found: list[dict[str, Any] | set[str]] = [COMPRESSORS, POLICIES]
    # Methods that ignore `levels` live beside POLICIES, wherever it is defined.
    levelless = getattr(sys.modules[register_policy.__module__], "LEVELLESS", None)
    if isinstance(levelless, set):
        found.append(levelless)
    return found


@contextlib.contextmanager
def isolated_registries() -> Iterator[None]:
    """Undo every registration made inside the block, in place.

    The registries are restored by content (the same dict and set objects, which
    other modules hold), and a module first imported inside the block whose
    registrations were undone is dropped from ``sys.modules``, so that importing
    it again (``[compression] plugins``) registers it again.
    """
    registries = _registries()
    saved = [copy.copy(registry) for registry in registries]
    imported_before = set(sys.modules)
    try:
        yield
    finally:
        undone: set[str] = set()
        for registry, before in zip(registries, saved, strict=True):
            if isinstance(registry, dict):
                undone.update(
                    getattr(value, "__module__", "")
                    for name, value in registry.items()
                    if before.get(name) is not value  # type: ignore[union-attr]
                )
            registry.clear()
            registry.update(before)  # type: ignore[arg-type]
        for module in undone - imported_before:
            sys.modules.pop(module, None)


@pytest.fixture(autouse=True, scope="module")
def _registries_per_module() -> Iterator[None]:
    """What a module-scoped fixture registers ends with the module."""
    with isolated_registries():
        yield


@pytest.fixture(autouse=True)
def _registries_per_test() -> Iterator[None]:
    """What a test registers (a compressor, a policy, a plug-in module) ends with the test."""
    with isolated_registries():
        yield
