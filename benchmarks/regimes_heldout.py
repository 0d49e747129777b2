"""Held-out regimes: written down before any policy was run on them.

    python -m benchmarks.regimes --heldout --jobs 2     # every held-out regime, 3 seeds

The regime suite's five regimes (benchmarks.regimes) are what the level
policies were built and checked on. These four were fixed, in this file, in a
commit made before any policy had been run on them; their results are
reported as they come, good or bad. Each differs from the suite's in its
horizon (50, 150, 400 rounds), its model or partition, or its participation:

- ``heldout-cnn1d-shards-50``: the 1-D CNN on MNIST-1D split in label shards
  (2 per client, the partition of McMahan et al.), a short 50-round horizon;
- ``heldout-mlp-mnist1d-150``: an MLP (a model the suite runs only on
  digits) on MNIST-1D, Dirichlet(0.5), 150 rounds;
- ``heldout-digits-100clients-400``: the digits MLP over 100 clients with a
  Dirichlet(0.5) skew, 10 clients a round (partial participation), 400 rounds;
- ``heldout-mnist5k-iid-100``: the 2-D CNN on 5,000 real MNIST digits, IID
  over 10 clients, 100 rounds.

The paper's QSGD (one l2 norm per update, packed or entropy-coded) as in the
suite. Learning rates were set from the shipped configs of the same model
(no run of any policy, nor of fp32, was looked at to set them).
"""

from __future__ import annotations

from typing import Any

_PAPER_QSGD = {"encoding": "packed", "bucket_size": 0, "norm": "l2"}
_TRAIN = {"local_steps": 10, "batch_size": 32, "noise_cost_every": 0}

#: Held-out regimes: name -> a complete config (as adaquantfl.load_config takes it).
HELDOUT: dict[str, dict[str, Any]] = {
    "heldout-cnn1d-shards-50": {
        "data": {"dataset": "mnist1d", "partition": "shards", "shards_per_client": 2,
                 "num_clients": 10},
        "model": {"name": "cnn1d"},
        "train": {**_TRAIN, "rounds": 50, "lr": 0.15, "seed": 0},
        "compression": dict(_PAPER_QSGD),
    },
    "heldout-mlp-mnist1d-150": {
        "data": {"dataset": "mnist1d", "partition": "dirichlet", "dirichlet_alpha": 0.5,
                 "num_clients": 10},
        "model": {"name": "mlp"},
        "train": {**_TRAIN, "rounds": 150, "lr": 0.1, "seed": 0},
        "compression": dict(_PAPER_QSGD),
    },
    "heldout-digits-100clients-400": {
        "data": {"dataset": "digits", "partition": "dirichlet", "dirichlet_alpha": 0.5,
                 "num_clients": 100, "min_client_samples": 5},
        "model": {"name": "mlp"},
        "train": {**_TRAIN, "rounds": 400, "lr": 0.05, "seed": 0, "clients_per_round": 10},
        "compression": dict(_PAPER_QSGD),
    },
    "heldout-mnist5k-iid-100": {
        "data": {"dataset": "mnist-5k", "partition": "iid", "num_clients": 10},
        "model": {"name": "cnn"},
        "train": {**_TRAIN, "rounds": 100, "lr": 0.2, "seed": 0},
        "compression": dict(_PAPER_QSGD),
    },
}  # fmt: skip
