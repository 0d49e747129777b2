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
``flwr`` is imported only inside this subpackage (and by the runner's Flower engine).

Modules, server side first: ``strategy`` (the two strategies and their argument
checks), ``rounds`` (a round's replies, new model and record), ``sampling``
(seeded node sampling), ``downlink`` (the compressed downlink, both sides),
``mod`` (the client mod and the node's state), ``messages`` (every message key
and record), ``layout`` (which of a model's arrays are compressed).

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
    RecordError,
    record_from_state_dict,
)
from adaquantfl.flower.messages import PRE_TRAIN_LOSS_KEY, MissingModError  # noqa: E402
from adaquantfl.flower.mod import adaquant_mod, make_adaquant_mod  # noqa: E402
from adaquantfl.flower.rounds import SERVER_METRICS, server_metrics  # noqa: E402
from adaquantfl.flower.strategy import (  # noqa: E402
    AdaQuant,
    AdaQuantFedAvg,
    NoAcceptedRepliesError,
)

__all__ = [
    "BATCHNORM_BUFFERS",
    "PRE_TRAIN_LOSS_KEY",
    "SERVER_METRICS",
    "AdaQuant",
    "AdaQuantFedAvg",
    "MissingModError",
    "NoAcceptedRepliesError",
    "RecordError",
    "adaquant_mod",
    "make_adaquant_mod",
    "record_from_state_dict",
    "server_metrics",
]
