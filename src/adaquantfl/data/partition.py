"""Partitioners: split a training set's indices over federated clients.

Each partitioner takes the training labels, the number of clients and an
explicit ``numpy.random.Generator`` (from ``numpy_generator(seed,
purpose="partition")``) and returns one sorted ``int64`` index array per
client. Together the arrays hold every training index exactly once, and every
client gets at least one index.

The registry :data:`PARTITIONS` is a plain dict of these functions; the CLI's
choices come from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from adaquantfl.validation import check_int, check_real

__all__ = [
    "PARTITIONS",
    "Partitioner",
    "dirichlet_partition",
    "iid_partition",
    "natural_partition",
    "shards_partition",
]

#: A partitioner: ``fn(labels, num_clients, *, rng, **options) -> list of index arrays``.
Partitioner = Callable[..., list[NDArray[np.int64]]]


def _check_inputs(labels: NDArray[Any], num_clients: object) -> tuple[NDArray[np.int64], int]:
    """Validate ``labels`` (1-D integers) and ``num_clients`` (1 <= k <= n)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("labels must not be empty: there is nothing to partition")
    k = check_int("num_clients", num_clients, 1, n)
    return labels.astype(np.int64, copy=False), k


def _finish(parts: list[NDArray[Any]]) -> list[NDArray[np.int64]]:
    # Sorted indices make a partition canonical (easy to compare and print);
    # order within a client does not matter since minibatches are sampled.
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_partition(
    labels: NDArray[Any], num_clients: int, *, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Split a random permutation of the indices into near-equal parts.

    Client sizes differ by at most one.

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
        Training labels (only their number is used).
    num_clients : int
        Number of clients, ``1 <= num_clients <= n``.
    rng : numpy.random.Generator
        Source of the permutation.

    Returns
    -------
    list of ndarray of int64
        Sorted indices of each client's samples.
    """
    labels, num_clients = _check_inputs(labels, num_clients)
    permutation = rng.permutation(labels.shape[0])
    return _finish(np.array_split(permutation, num_clients))


def dirichlet_partition(
    labels: NDArray[Any],
    num_clients: int,
    *,
    rng: np.random.Generator,
    alpha: float = 0.5,
    min_client_samples: int = 10,
    max_attempts: int = 1000,
) -> list[NDArray[np.int64]]:
    """Label-skewed split: each class is spread over clients by Dirichlet proportions.

    1. For each class c, shuffle its indices and draw
       ``p_c ~ Dirichlet(alpha * 1_K)`` over the K clients.
    2. Give client k the next ``p_c[k]`` fraction of class c's indices.
    3. If some client ends with fewer than ``min_client_samples`` samples,
       redraw the whole partition (at most ``max_attempts`` times).

    This is the scheme of Hsu, Qi and Brown (2019), "Measuring the effects of
    non-identical data distribution for federated visual classification",
    arXiv:1909.06335, with the redraw rule of NIID-Bench (Li et al. 2022).
    Small ``alpha`` (0.1) gives each client few dominant classes; large
    ``alpha`` approaches an iid split.

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
        Training labels.
    num_clients : int
        Number of clients, ``1 <= num_clients <= n``.
    rng : numpy.random.Generator
        Source of the shuffles and proportions.
    alpha : float, optional
        Dirichlet concentration, > 0.
    min_client_samples : int, optional
        Minimum samples per client, >= 1, with
        ``num_clients * min_client_samples <= n``.
    max_attempts : int, optional
        Number of draws before giving up.

    Returns
    -------
    list of ndarray of int64
        Sorted indices of each client's samples.

    Raises
    ------
    ValueError
        On invalid arguments, or if no draw within ``max_attempts`` gives every
        client ``min_client_samples`` samples.
    """
    labels, num_clients = _check_inputs(labels, num_clients)
    alpha = check_real("dirichlet_alpha", alpha, 0.0, low_open=True)
    min_client_samples = check_int("min_client_samples", min_client_samples, 1)
    max_attempts = check_int("max_attempts", max_attempts, 1)
    n = labels.shape[0]
    if num_clients * min_client_samples > n:
        raise ValueError(
            f"min_client_samples={min_client_samples} is impossible with "
            f"num_clients={num_clients} and only {n} training samples; allowed: "
            f"min_client_samples <= {n // num_clients}"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, alpha)
    for _ in range(max_attempts):
        parts: list[list[NDArray[np.int64]]] = [[] for _ in range(num_clients)]
        for class_indices in by_class:
            shuffled = rng.permutation(class_indices)
            proportions = rng.dirichlet(concentration)
            # cumsum(p)[-1] may be 1 - eps; dropping it sends the remainder to
            # the last client so that no index is lost to rounding.
            cuts = (np.cumsum(proportions)[:-1] * shuffled.shape[0]).astype(np.int64)
            for k, chunk in enumerate(np.split(shuffled, cuts)):
                parts[k].append(chunk)
        sizes = [sum(chunk.shape[0] for chunk in p) for p in parts]
        if min(sizes) >= min_client_samples:
            return _finish([np.concatenate(p) for p in parts])
    raise ValueError(
        f"dirichlet partition failed: after {max_attempts} draws with "
        f"dirichlet_alpha={alpha:g} and num_clients={num_clients}, some client always had "
        f"fewer than min_client_samples={min_client_samples} of the {n} samples; "
        "raise dirichlet_alpha, or lower num_clients or min_client_samples"
    )


def shards_partition(
    labels: NDArray[Any],
    num_clients: int,
    *,
    rng: np.random.Generator,
    shards_per_client: int = 2,
) -> list[NDArray[np.int64]]:
    """Pathological non-iid split of McMahan et al. (2017), "Communication-Efficient
    Learning of Deep Networks from Decentralized Data" (FedAvg), Section 3.

    1. Sort the indices by label (ties in random order).
    2. Cut them into ``num_clients * shards_per_client`` near-equal shards.
    3. Give each client ``shards_per_client`` shards chosen at random.

    When each class's size is a multiple of the shard size, every shard holds
    one label, so a client sees at most ``shards_per_client`` labels.

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
        Training labels.
    num_clients : int
        Number of clients, with ``num_clients * shards_per_client <= n``.
    rng : numpy.random.Generator
        Source of the tie order and shard assignment.
    shards_per_client : int, optional
        Shards per client, >= 1.

    Returns
    -------
    list of ndarray of int64
        Sorted indices of each client's samples.
    """
    labels, num_clients = _check_inputs(labels, num_clients)
    shards_per_client = check_int("shards_per_client", shards_per_client, 1)
    n = labels.shape[0]
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"shards_per_client={shards_per_client} with num_clients={num_clients} needs "
            f"{num_shards} shards but there are only {n} training samples; allowed: "
            f"num_clients * shards_per_client <= {n}"
        )
    # Shuffle before the stable sort so that which samples of a class share a
    # shard depends on the seed.
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([shards[s] for s in row]) for row in assignment])


def natural_partition(
    labels: NDArray[Any],
    num_clients: int,
    *,
    rng: np.random.Generator,
    client_ids: NDArray[Any],
) -> list[NDArray[np.int64]]:
    """Keep a naturally federated data set's own split: sample i goes to ``client_ids[i]``.

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
        Training labels (only their number is used).
    num_clients : int
        Number of clients.
    rng : numpy.random.Generator
        Unused; accepted so that every partitioner has the same call shape.
    client_ids : ndarray of int, shape (n,)
        The client that owns each sample, in ``[0, num_clients)``.

    Returns
    -------
    list of ndarray of int64
        Sorted indices of each client's samples.
    """
    del rng  # the split is given, not drawn
    labels, num_clients = _check_inputs(labels, num_clients)
    owners = np.asarray(client_ids)
    if owners.shape != labels.shape or not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(
            f"client_ids must be an integer array of shape {labels.shape}, "
            f"got shape {owners.shape} dtype {owners.dtype}"
        )
    if owners.min() < 0 or owners.max() >= num_clients:
        raise ValueError(
            f"client_ids must be in [0, {num_clients}), got min {owners.min()}, max {owners.max()}"
        )
    parts = [np.flatnonzero(owners == k) for k in range(num_clients)]
    empty = [k for k, p in enumerate(parts) if p.shape[0] == 0]
    if empty:
        raise ValueError(f"clients {empty} own no samples; every client needs at least one")
    return _finish(parts)


#: Partitioners by name.
PARTITIONS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
    "natural": natural_partition,
}
