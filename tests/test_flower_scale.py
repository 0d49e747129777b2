"""The Flower path at model scale: Arrays read in place, written in one copy, bounded memory.

The mod and the strategy read Flower's ``.npy`` Arrays where they lie
(:func:`adaquantfl.flower.layout.npy_values`), write new ones in one copy
(:func:`~adaquantfl.flower.layout.npy_array`), and form an update in the one
vector it needs (:meth:`ArrayLayout.difference`), with the bits of the
whole-model expressions they replace. The memory tests measure the peak
resident set of each stage of a round in a fresh process
(``tests/flower_memory.py``; torch's and numpy's allocations are invisible to
tracemalloc) on a model of 2x10^7 entries, against bounds derived from what
each stage must hold; one more copy of the model breaks every one of them.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed")

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from adaquantfl.compression.codec import message_bytes
from adaquantfl.flower import RecordError
from adaquantfl.flower.layout import ArrayLayout, npy_array, npy_values

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- Arrays


ARRAYS = {
    "float32 matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
    "0-d int64": np.array(7, dtype=np.int64),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "bool": np.array([True, False, True]),
    "float16": np.linspace(-1, 1, 5, dtype=np.float16),
    "float64 Fortran order": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "strided view": np.arange(24.0, dtype=np.float32).reshape(4, 6)[:, ::2],
}


@pytest.mark.parametrize("values", list(ARRAYS.values()), ids=list(ARRAYS))
def test_npy_array_is_flowers_array_byte_for_byte(values: np.ndarray) -> None:
    built = npy_array(values)
    flowers = Array(values)
    assert (built.dtype, built.shape, built.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert built.data == flowers.data
    np.testing.assert_array_equal(built.numpy(), values)


@pytest.mark.parametrize("values", list(ARRAYS.values()), ids=list(ARRAYS))
def test_npy_values_reads_an_array_where_it_lies(values: np.ndarray) -> None:
    array = Array(values)
    read = npy_values(array, "x", tuple(values.shape), str(values.dtype))
    np.testing.assert_array_equal(read, values)
    assert read.dtype == values.dtype and not read.flags.writeable
    if values.size:  # a view of the Array's own bytes, not a copy
        start = np.frombuffer(array.data, dtype=np.uint8).ctypes.data
        assert start <= read.ctypes.data < start + len(array.data)


def test_npy_values_refuses_what_the_array_does_not_hold() -> None:
    good = Array(np.ones((2, 3), dtype=np.float32))
    header_lies = Array(dtype="float32", shape=(3, 2), stype=good.stype, data=good.data)
    truncated = Array(dtype="float32", shape=(2, 3), stype=good.stype, data=good.data[:-4])
    padded = Array(dtype="float32", shape=(2, 3), stype=good.stype, data=good.data + bytes(2**17))
    garbage = Array(dtype="float32", shape=(2, 3), stype=good.stype, data=b"not a npy file")
    cases = {
        "wrong dtype": (good, (2, 3), "float64", "expected float64"),
        "header says another shape": (header_lies, (3, 2), "float32", "header says"),
        "truncated": (truncated, (2, 3), "float32", "bytes of data for 24"),
        "trailing bytes": (padded, (2, 3), "float32", "bytes of data for 24"),
        "not .npy": (garbage, (2, 3), "float32", "not a .npy array"),
    }
    for array, shape, dtype, message in cases.values():
        with pytest.raises(RecordError, match=message):
            npy_values(array, "x", shape, dtype)


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_difference_is_flatten_minus_flatten_bit_for_bit() -> None:
    # Prepare: every float dtype, a Fortran-ordered array, and a side buffer.
    g = np.random.default_rng(0)
    base = {
        "a": g.standard_normal((40, 30)).astype(np.float32),
        "b": np.asfortranarray(g.standard_normal((7, 9))),
        "c": g.standard_normal(50).astype(np.float16),
        "n": np.array(3, dtype=np.int64),
    }
    local = {k: np.asarray(v + g.standard_normal(v.shape) * 1e-3, v.dtype) for k, v in base.items()}
    local["b"] = np.asfortranarray(local["b"])
    layout = ArrayLayout.of(record(base))

    # Execute
    update = layout.difference(record(local), record(base))

    # Assert: the old expression, and the float32 rounding of each operand first.
    expected = layout.flatten(record(local)) - layout.flatten(record(base))
    assert update.dtype == torch.float32 and torch.equal(update, expected)
    by_hand = np.concatenate(
        [(local[k].astype(np.float32) - base[k].astype(np.float32)).ravel() for k in "abc"]
    )
    assert np.array_equal(update.numpy(), by_hand)
    float64_difference = (local["b"] - base["b"]).astype(np.float32).ravel()
    assert not np.array_equal(update.numpy()[1200:1263], float64_difference)  # it would differ


def test_flatten_and_to_record_round_trip_the_model() -> None:
    g = np.random.default_rng(1)
    arrays = {"w": g.standard_normal((5, 4)).astype(np.float16), "n": np.array(2, dtype=np.int64)}
    layout = ArrayLayout.of(record(arrays))
    flat = layout.flatten(record(arrays))
    back = layout.to_record(flat, {"n": Array(arrays["n"])})
    assert back["w"].data == Array(arrays["w"]).data and back["n"].data == Array(arrays["n"]).data
    replica = layout.float32_record(flat)
    assert list(replica.keys()) == ["w"] and torch.equal(layout.flatten(replica), flat)


# --------------------------------------------------------------------------- memory

NUMEL = 2 * 10**7
#: Scenarios of tests/flower_memory.py: (strategy, nodes, rounds).
SCENARIOS = [
    ["plain", 4, 1],
    ["qsgd", 4, 1],
    ["qsgd", 2, 1],
    ["error-feedback", 1, 2],
    ["downlink", 1, 2],
]


def _clear_refs_works() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def measured() -> dict[str, Any]:
    if not sys.platform.startswith("linux") or not _clear_refs_works():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
    spec = json.dumps({"numel": NUMEL, "scenarios": SCENARIOS})
    done = subprocess.run(
        [sys.executable, "-m", "tests.flower_memory", spec],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_nodes_work_needs_at_most_twice_the_update(measured: dict[str, Any]) -> None:
    # What each stage must hold, in float32 bytes of the update (4d):
    # - after training: the update (1x) and the payload, which the codec writes once
    #   into its buffer and once into the reply's bytes; under error feedback, in
    #   the first round, the new residual's bytes for the node's state too (1x);
    #   later the old residual is dropped before the new one is written;
    # - before training, with a compressed downlink: x_k (1x) while its change is
    #   decoded or while the new replica's bytes, which the train function's
    #   arrays share, are written (1x).
    d4 = 4 * measured["numel"]
    payload = message_bytes(measured["numel"], 15, bucket_size=512)
    slack = 0.05 * d4
    bound = {
        ("qsgd", 1): (0, d4 + 2 * payload),
        ("error-feedback", 1): (0, 2 * d4 + 2 * payload),
        ("error-feedback", 2): (0, d4 + 2 * payload),
        ("downlink", 1): (2 * d4, d4 + 2 * payload),
        ("downlink", 2): (2 * d4, d4 + 2 * payload),
    }
    checked = 0
    for r in measured["rounds"]:
        if r["kind"] == "plain":
            continue
        pre, post = bound[(r["kind"], r["round"])]
        assert r["pre"] <= pre + slack, (r, r["pre"] / d4)
        assert r["post"] <= post + slack, (r, r["post"] / d4)
        assert r["post"] <= 2 * d4 + 2 * payload + slack  # the claim: about 2x at most
        checked += 1
    assert checked == 6


def test_the_servers_aggregate_needs_one_accumulator_and_one_decoded_reply(
    measured: dict[str, Any],
) -> None:
    # FedServer adds each reply, decoded into one float32 buffer (1x), to a
    # float64 accumulator (2x), whose mean becomes the new model in that
    # buffer; the new model's Arrays are written afterwards, once the
    # accumulator is gone (1x). However many replies there are.
    d4 = 4 * measured["numel"]
    plain = {r["nodes"]: r["aggregate"] for r in measured["rounds"] if r["kind"] == "plain"}
    ours = [r for r in measured["rounds"] if r["kind"] != "plain"]
    assert plain[4] > 0 and len(ours) == 6
    # The slack: 5% of the model, and 16 MiB for what the interpreter, the
    # allocator and a kernel compiled on first use at this size may add.
    slack = 0.05 * d4 + 16 * 2**20
    for r in ours:
        assert r["aggregate"] <= 3 * d4 + slack, (r, r["aggregate"] / d4)
        if r["nodes"] in plain:  # the claim: at most the float64 accumulator beyond plain's
            assert r["aggregate"] - plain[r["nodes"]] <= 2 * d4 + slack, (r, plain)
