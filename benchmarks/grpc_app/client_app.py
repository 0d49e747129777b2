"""ClientApp of benchmarks.grpc_scale: the scale benchmark's train function, and its mods.

Plain Flower: ``ClientApp(mods=[probe_mod])``; adaquantfl:
``ClientApp(mods=[probe_mod, adaquant_mod])`` (:func:`benchmarks.scale.client_app`).
The contender is the SuperNode's ``--node-config contender=...``: a ClientApp
is built when its process starts, before it sees a run config. ``probe_mod``
writes the node's stages to ``$AQF_SCALE_EVENTS``.
"""

from __future__ import annotations

import os

from benchmarks.scale import client_app

app = client_app(os.environ.get("AQF_GRPC_CONTENDER", "flower"))
