"""Session-wide test settings."""

from __future__ import annotations

import os

# Flower and Ray read these when first imported: no telemetry, update checks or
# usage reports leave the machine during tests.
for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)
