"""AdaQuantFL on Flower: a strategy and a client mod (``pip install 'adaquantfl[flower]'``).

    from adaquantfl.flower import AdaQuantFedAvg, adaquant_mod
    from adaquantfl.policy import AdaQuantLevels

    client_app = ClientApp(mods=[adaquant_mod])              # the user's train function unchanged
    strategy = AdaQuantFedAvg(AdaQuantLevels(2), seed=0)     # instead of FedAvg(...)

The strategy sends the levels of each round; the mod quantizes and encodes the
update with :mod:`adaquantfl.compression.codec`; the strategy decodes and aggregates with
:class:`adaquantfl.fl.server.FedServer`. The train reply reports
``pre-train-loss`` for the exact rule, or else Flower's usual ``train_loss``
stands in for it (see :mod:`adaquantfl.flower.mod`). ``flwr`` is imported
only inside this subpackage.

Importing this package sets ``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1`` and ``RAY_USAGE_STATS_ENABLED=0`` unless they
are already set: a library should not make network calls its user did not
ask for (Flower reads the first one when it is imported, hence here).
"""

from __future__ import annotations

import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_name, _value)

from adaquantfl.flower.mod import (  # noqa: E402
    FLOWER_TRAIN_LOSS_KEY,
    adaquant_mod,
    encode_update,
    make_adaquant_mod,
)
from adaquantfl.flower.records import (  # noqa: E402
    LOSS_PROXY_KEY,
    PAYLOAD_KEY,
    PRE_TRAIN_LOSS_KEY,
    ArrayLayout,
    RecordError,
    RoundPlan,
    parse_train_reply,
    payload_array,
    payload_bytes,
)
from adaquantfl.flower.strategy import AdaQuantFedAvg, FlowerRound  # noqa: E402

__all__ = [
    "FLOWER_TRAIN_LOSS_KEY",
    "LOSS_PROXY_KEY",
    "PAYLOAD_KEY",
    "PRE_TRAIN_LOSS_KEY",
    "AdaQuantFedAvg",
    "ArrayLayout",
    "FlowerRound",
    "RecordError",
    "RoundPlan",
    "adaquant_mod",
    "encode_update",
    "make_adaquant_mod",
    "parse_train_reply",
    "payload_array",
    "payload_bytes",
]
