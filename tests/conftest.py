"""Session-wide test settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
