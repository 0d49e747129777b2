"""``load_federated``: one call from a data set's name to per-client tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaquantfl.data.cifar import load_cifar10_split
from adaquantfl.data.containers import ArraySplit, ClientData, FederatedData
from adaquantfl.data.embedded import load_digits_split, load_mnist1d_split, load_mnist5k_split
from adaquantfl.data.idx import load_idx_split
from adaquantfl.data.partition import PARTITIONS
from adaquantfl.data.synthetic import generate_synthetic
from adaquantfl.imports import call_factory, import_object, is_import_path
from adaquantfl.rng import numpy_generator
from adaquantfl.validation import check_choice, check_int, check_real

__all__ = ["DATASETS", "DatasetSpec", "allowed_partitions", "load_federated", "user_split"]


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set looks like before it is loaded.

    Parameters
    ----------
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        The shape of one sample.
    source : {"embedded", "generated", "files"}
        Where the samples come from; ``"files"`` needs ``data_dir``.
    naturally_federated : bool
        True if the data set defines its own clients (partition ``"natural"``).
    """

    num_classes: int
    input_shape: tuple[int, ...]
    source: str
    naturally_federated: bool = False


#: Data sets by name; the CLI's and config's choices come from its keys.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(10, (64,), "embedded"),
    "synthetic": DatasetSpec(10, (60,), "generated", naturally_federated=True),
    "mnist1d": DatasetSpec(10, (40,), "generated"),
    "mnist-5k": DatasetSpec(10, (1, 28, 28), "embedded"),
    "mnist": DatasetSpec(10, (1, 28, 28), "files"),
    "fashion-mnist": DatasetSpec(10, (1, 28, 28), "files"),
    "cifar10": DatasetSpec(10, (3, 32, 32), "files"),
}

_NATURAL = "natural"


def allowed_partitions(dataset: str) -> list[str]:
    """The partition names that :func:`load_federated` accepts for ``dataset``.

    The first one is the default (what ``partition=None`` resolves to).
    """
    if is_import_path(dataset):  # a user's own data set: any split of its training part
        return [name for name in PARTITIONS if name != _NATURAL]
    spec = DATASETS[check_choice("dataset", dataset, list(DATASETS))]
    if spec.naturally_federated:
        return [_NATURAL]
    return [name for name in PARTITIONS if name != _NATURAL]


def _resolve_partition(dataset: str, partition: object) -> str:
    allowed = allowed_partitions(dataset)
    if partition is None:
        return allowed[0]
    check_choice("partition", partition, list(PARTITIONS))
    if partition in allowed:
        return str(partition)
    if dataset in DATASETS and DATASETS[dataset].naturally_federated:
        raise ValueError(
            f"partition {partition!r} is not available for dataset {dataset!r}: it is "
            f"naturally federated (every client's samples come from that client's own "
            f"model), so its only partition is {_NATURAL!r}; pass partition={_NATURAL!r} "
            "or None"
        )
    raise ValueError(
        f"partition {partition!r} is only for naturally federated data sets "
        f"({[n for n, s in DATASETS.items() if s.naturally_federated]}); "
        f"allowed for dataset {dataset!r}: {allowed}"
    )


def _load_split(dataset: str, seed: int, data_dir: Path | None) -> ArraySplit:
    if dataset == "digits":
        return load_digits_split(seed)
    if dataset == "mnist1d":
        return load_mnist1d_split()
    if dataset == "mnist-5k":
        return load_mnist5k_split(seed)
    if data_dir is None:
        raise ValueError(
            f"data_dir is required for dataset {dataset!r} (read from the user's files), got None"
        )
    if dataset in ("mnist", "fashion-mnist"):
        return load_idx_split(data_dir, dataset=dataset)
    return load_cifar10_split(data_dir)


def load_federated(
    dataset: str,
    *,
    num_clients: int,
    seed: int,
    partition: str | None = None,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_client_samples: int = 10,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
    data_dir: str | os.PathLike[str] | None = None,
) -> FederatedData:
    """Load a data set and split its training part over ``num_clients`` clients.

    Parameters
    ----------
    dataset : str
        A key of :data:`DATASETS`, or a data set of your own: an import path
        ``"package.module:load"`` (or a ``"python:"`` name, see
        :mod:`adaquantfl.imports`) of a factory that returns ``(train,
        test)``, each a ``(x, y)`` pair of tensors or arrays or a torch
        ``Dataset`` of ``(x, y)`` samples (see :func:`user_split`).
    num_clients : int
        Number of clients, between 1 and the number of training samples.
    seed : int
        Run seed. The partition draws from ``numpy_generator(seed,
        purpose="partition")``; generated data and train/test splits from
        ``purpose="data"``. The same seed gives identical tensors.
    partition : str or None, optional
        A key of :data:`~adaquantfl.data.PARTITIONS` allowed for the data set
        (see :func:`allowed_partitions`); None means ``"natural"`` for
        synthetic and ``"iid"`` otherwise.
    dirichlet_alpha : float, optional
        Concentration of the ``"dirichlet"`` partition, > 0.
    shards_per_client : int, optional
        Shards per client of the ``"shards"`` partition, >= 1.
    min_client_samples : int, optional
        Minimum samples per client of the ``"dirichlet"`` partition, >= 1.
    synthetic_alpha, synthetic_beta : float, optional
        The alpha and beta of Synthetic(alpha, beta), >= 0.
    data_dir : str or PathLike, optional
        Directory with the files of ``mnist``, ``fashion-mnist`` or
        ``cifar10``; ignored by the other data sets.

    Returns
    -------
    FederatedData
        One :class:`ClientData` per client plus the global test set.

    Raises
    ------
    ValueError
        For any invalid argument (the message names it, its value and what is
        allowed), a malformed data file (the message names the file), or a
        partition that cannot give every client enough samples.
    FileNotFoundError
        If a data file is missing; the message names the path and the files
        expected.

    Notes
    -----
    Every argument is validated, also the options the chosen partition does
    not use, so that a typo in a config fails now rather than when the option
    is switched on. Test sets: digits a stratified 80/20 split, mnist-5k a
    stratified 4,000/1,000 split, synthetic 20% of each client's samples, the
    others their own official split.
    """
    own = is_import_path(dataset)
    if not own:
        check_choice("dataset", dataset, list(DATASETS))
    seed = check_int("seed", seed, -(2**63), 2**63 - 1)
    num_clients = check_int("num_clients", num_clients, 1)
    resolved = _resolve_partition(dataset, partition)
    dirichlet_alpha = check_real("dirichlet_alpha", dirichlet_alpha, 0.0, low_open=True)
    shards_per_client = check_int("shards_per_client", shards_per_client, 1)
    min_client_samples = check_int("min_client_samples", min_client_samples, 1)
    synthetic_alpha = check_real("synthetic_alpha", synthetic_alpha, 0.0)
    synthetic_beta = check_real("synthetic_beta", synthetic_beta, 0.0)
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ValueError(f"data_dir must be a path (str or os.PathLike) or None, got {data_dir!r}")
    directory = None if data_dir is None else Path(data_dir)

    options: dict[str, Any]
    if dataset == "synthetic":
        generated = generate_synthetic(
            num_clients, seed=seed, alpha=synthetic_alpha, beta=synthetic_beta
        )
        split = ArraySplit(generated.x_train, generated.y_train, generated.x_test, generated.y_test)
        options = {"client_ids": generated.client_train}
    else:
        split = user_split(dataset, seed) if own else _load_split(dataset, seed, directory)
        by_partition: dict[str, dict[str, Any]] = {
            "iid": {},
            "dirichlet": {"alpha": dirichlet_alpha, "min_client_samples": min_client_samples},
            "shards": {"shards_per_client": shards_per_client},
        }
        options = by_partition[resolved]
    num_train = int(split.y_train.shape[0])
    if num_clients > num_train:
        raise ValueError(
            f"num_clients must be <= the {num_train} training samples of dataset "
            f"{dataset!r}, got {num_clients}"
        )

    parts = PARTITIONS[resolved](
        split.y_train, num_clients, rng=numpy_generator(seed, purpose="partition"), **options
    )
    sizes = np.array([len(p) for p in parts])
    if len(parts) != num_clients or sizes.min() < 1:
        raise ValueError(  # a partitioner's own checks should make this unreachable
            f"partition {resolved!r} gave client sizes {sizes.tolist()}; every one of the "
            f"{num_clients} clients needs at least one sample"
        )
    # Fancy indexing makes fresh arrays, so the tensors can take them over.
    clients = [
        ClientData.from_numpy(split.x_train[idx], split.y_train[idx], copy=False) for idx in parts
    ]
    if own:
        labels = max(int(split.y_train.max()), int(split.y_test.max()) if split.y_test.size else 0)
        num_classes, input_shape = labels + 1, tuple(int(n) for n in split.x_train.shape[1:])
    else:
        num_classes, input_shape = DATASETS[dataset].num_classes, DATASETS[dataset].input_shape
    return FederatedData(
        name=dataset,
        clients=clients,
        test=ClientData.from_numpy(split.x_test, split.y_test),
        num_classes=num_classes,
        input_shape=input_shape,
    )


def user_split(dataset: str, seed: int) -> ArraySplit:
    """The train/test split of a user's own data set, checked, as float32 and int64 arrays.

    The factory at ``dataset`` is called with ``seed`` if it takes it, and
    returns ``(train, test)`` (or ``{"train": ..., "test": ...}``), each a
    ``(x, y)`` pair (tensors or arrays) or a torch ``Dataset`` whose items
    are ``(x, y)``. ``x`` holds the inputs (any shape per sample, floating
    point), ``y`` the class labels (integers in ``[0, classes)``).

    Raises
    ------
    ValueError
        Naming the data set and what is wrong: the import, the factory, the
        shape of what it returned, empty parts, lengths, dtypes or labels.
    """
    what = f"dataset {dataset!r}"
    factory = import_object(dataset, what)
    if not callable(factory):
        raise ValueError(f"{what} must name a factory returning (train, test), got {factory!r:.80}")
    result = call_factory(factory, what, seed=seed)
    if isinstance(result, Mapping) and {"train", "test"} <= set(result):
        result = (result["train"], result["test"])
    looks_like_xy = isinstance(result, tuple | list) and any(
        hasattr(part, "shape") for part in result
    )
    if not isinstance(result, tuple | list) or len(result) != 2 or looks_like_xy:
        raise ValueError(
            f"{what}: the factory must return (train, test), each (x, y) or a torch Dataset; "
            f"got {type(result).__name__}"
        )
    x_train, y_train = _arrays(result[0], f"{what} train")
    x_test, y_test = _arrays(result[1], f"{what} test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{what}: train samples have shape {x_train.shape[1:]}, test samples {x_test.shape[1:]}"
        )
    return ArraySplit(x_train, y_train, x_test, y_test)


def _arrays(part: object, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one part as float32 and int64 NumPy arrays, checked."""
    if isinstance(part, tuple | list) and len(part) == 2:
        x, y = part
    elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
        items = [part[i] for i in range(len(part))]  # a map-style torch Dataset
        if not items or not all(isinstance(it, tuple | list) and len(it) == 2 for it in items):
            raise ValueError(f"{what}: a Dataset's items must be (x, y) pairs")
        x = np.stack([np.asarray(_numpy(it[0])) for it in items])
        y = np.asarray([int(_numpy(it[1])) for it in items])
    else:
        raise ValueError(f"{what} must be (x, y) or a torch Dataset, got {type(part).__name__}")
    x, y = np.asarray(_numpy(x)), np.asarray(_numpy(y))
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{what}: x must be (n, ...) and y (n,) with n >= 1, got shapes {x.shape} and {y.shape}"
        )
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: x must be numbers, y integer labels; got {x.dtype}, {y.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: x has non-finite values")
    if y.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0, got {int(y.min())}")
    return x.astype(np.float32), y.astype(np.int64)


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value
