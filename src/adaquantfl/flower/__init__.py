"""AdaQuantFL on Flower: a strategy wrapper and a client mod (``pip install 'adaquantfl[flower]'``).

    from adaquantfl.flower import AdaQuant, AdaQuantFedAvg, adaquant_mod
    from adaquantfl.policy import AdaQuantLevels

    client_app = ClientApp(mods=[adaquant_mod])                      # the train function unchanged
    strategy = AdaQuant(FedAdam(), policy=AdaQuantLevels(2), seed=0)  # around any strategy
    strategy = AdaQuantFedAvg(AdaQuantLevels(2), seed=0)             # or instead of FedAvg(...)

The wrapper sends the levels of each round; the mod quantizes and encodes the
update with :mod:`adaquantfl.compression`; the wrapper decodes and checks the
replies with :class:`adaquantfl.fl.server.FedServer`, which feeds the level
policy, and the inner strategy aggregates the nodes' models ``w_k + C(Delta_i)``.
The train reply reports ``pre-train-loss`` for the exact rule, or else
Flower's usual ``train_loss`` stands in for it (see :mod:`adaquantfl.flower.mod`).
``flwr`` is imported only inside this subpackage.

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

from adaquantfl.flower.layout import (  # noqa: E402
    BATCHNORM_BUFFERS,
    ArrayLayout,
    record_from_state_dict,
)
from adaquantfl.flower.mod import (  # noqa: E402
    FLOWER_TRAIN_LOSS_KEY,
    adaquant_mod,
    make_adaquant_mod,
)
from adaquantfl.flower.plan import DownlinkPlan, RoundPlan  # noqa: E402
from adaquantfl.flower.records import (  # noqa: E402
    LOSS_KEY,
    LOSS_PROXY_KEY,
    PAYLOAD_KEY,
    PRE_TRAIN_LOSS_KEY,
    MissingModError,
    RecordError,
    parse_train_reply,
    payload_array,
    payload_bytes,
)
from adaquantfl.flower.rounds import SERVER_METRICS, FlowerRound, server_metrics  # noqa: E402
from adaquantfl.flower.strategy import AdaQuantFedAvg  # noqa: E402
from adaquantfl.flower.wrapper import AdaQuant, NoAcceptedRepliesError  # noqa: E402

__all__ = [
    "BATCHNORM_BUFFERS",
    "FLOWER_TRAIN_LOSS_KEY",
    "LOSS_KEY",
    "LOSS_PROXY_KEY",
    "PAYLOAD_KEY",
    "PRE_TRAIN_LOSS_KEY",
    "SERVER_METRICS",
    "AdaQuant",
    "AdaQuantFedAvg",
    "ArrayLayout",
    "DownlinkPlan",
    "FlowerRound",
    "MissingModError",
    "NoAcceptedRepliesError",
    "RecordError",
    "RoundPlan",
    "adaquant_mod",
    "make_adaquant_mod",
    "parse_train_reply",
    "payload_array",
    "payload_bytes",
    "record_from_state_dict",
    "server_metrics",
]
