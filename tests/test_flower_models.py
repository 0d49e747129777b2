"""Any PyTorch model on Flower: BatchNorm buffers, integer counters, float16 and bfloat16.

A state_dict holds more than float32 parameters. The arrays that are not
parameters (BatchNorm's running statistics, ``num_batches_tracked``) travel
beside the compressed update, uncompressed and counted in ``wire_bits``, and
are aggregated as FedAvg would; float16 parameters are compressed like float32
ones and stay float16; a bfloat16 model travels as float32 (numpy has no
bfloat16). Everything runs in process (:class:`tests.flower_helpers.InProcessGrid`).
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed")

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam
from torch import nn

from adaquantfl.compression import QSGDCompressor
from adaquantfl.compression.codec import message_bytes
from adaquantfl.data import ClientData
from adaquantfl.fl.guard import aggregation_weights
from adaquantfl.flower import (
    AdaQuant,
    AdaQuantFedAvg,
    NoAcceptedRepliesError,
    RecordError,
    adaquant_mod,
    record_from_state_dict,
)
from adaquantfl.flower.layout import ArrayLayout
from adaquantfl.flower.messages import PAYLOAD_KEY
from adaquantfl.policy import FixedLevels
from tests.flower_helpers import InProcessGrid, TinyNet, forget_warnings, tiny_shards

NUM_NODES = 4
ROUNDS = 3
STEPS = 5
BN_SIDE = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    forget_warnings()


class BatchNormCNN(nn.Module):
    """A small CNN with a BatchNorm layer, for 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))  # type: ignore[no-any-return]


def image_shards(num_clients: int) -> list[ClientData]:
    g = torch.Generator().manual_seed(0)
    shards = []
    for i in range(num_clients):
        x = torch.randn(30 + 5 * i, 1, 8, 8, generator=g) * 3 + 2
        left, right = x[:, 0, :, :4].mean((1, 2)), x[:, 0, :, 4:].mean((1, 2))
        y = (left > right).long() + (x.mean((1, 2, 3)) > 2).long()
        shards.append(ClientData(x, y))
    return shards


def torch_app(
    make: Any,
    shards: list[ClientData],
    *,
    dtype: torch.dtype = torch.float32,
    to_record: Callable[[dict[str, torch.Tensor]], ArrayRecord] = record_from_state_dict,
) -> ClientApp:
    """A plain PyTorch train function (SGD, ``model.train()``), wrapped in ``adaquant_mod``.

    ``to_record`` turns the trained model's state_dict into the reply's ArrayRecord.
    """
    app = ClientApp(mods=[adaquant_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        shard = shards[int(context.node_config["partition-id"])]
        x = shard.x.to(dtype)
        model = make().to(dtype)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.eval()  # the loss of the received model, running statistics untouched
        with torch.no_grad():
            pre_train_loss = float(F.cross_entropy(model(x).float(), shard.y))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(model(x).float(), shard.y).backward()
            opt.step()
        metrics = MetricRecord({"pre-train-loss": pre_train_loss, "num-examples": len(shard)})
        arrays = to_record(model.state_dict())
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def initial(make: Any, dtype: torch.dtype = torch.float32) -> ArrayRecord:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return record_from_state_dict(make().to(dtype).state_dict())


def strategy(**kwargs: Any) -> AdaQuantFedAvg:
    return AdaQuantFedAvg(
        FixedLevels(3), seed=0, fraction_evaluate=0.0, min_train_nodes=NUM_NODES,
        min_available_nodes=NUM_NODES, node_wait_s=1.0, **kwargs,
    )  # fmt: skip


def run(s: AdaQuant, grid: InProcessGrid, arrays: ArrayRecord) -> dict[int, ArrayRecord]:
    """ROUNDS rounds; the global model after each."""
    models: dict[int, ArrayRecord] = {}
    s.start(grid, arrays, num_rounds=ROUNDS, timeout=5,
            evaluate_fn=lambda r, a: models.__setitem__(r, a))  # fmt: skip
    return models


# --------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("share", [None, 0.26], ids=["weights-n", "weights-capped"])
def test_a_batchnorm_cnn_trains_with_its_buffers_beside_the_update(share: float | None) -> None:
    # Prepare: with a cap on one node's weight (shares 0.20-0.30 here), the buffers
    # are averaged with FedServer's capped p_i, like the parameters.
    shards = image_shards(NUM_NODES)
    grid = InProcessGrid(torch_app(BatchNormCNN, shards), NUM_NODES)
    s = strategy(max_weight_share=share)

    # Execute
    models = run(s, grid, initial(BatchNormCNN))

    # Assert: the buffers travel beside the update; the parameters are compressed.
    assert s.layout is not None and s.layout.side == BN_SIDE
    params = sum(p.numel() for p in BatchNormCNN().parameters())
    assert s.layout.numel == params
    for reply in grid.replies:
        arrays = reply.content["arrays"]
        assert set(arrays.keys()) == {PAYLOAD_KEY, *BN_SIDE}
        assert len(arrays[PAYLOAD_KEY].data) == message_bytes(params, 3, bucket_size=512)
    # wire_bits: the payloads and the side arrays, as Flower carried them.
    for k, r in enumerate(s.rounds):
        replies = grid.replies[NUM_NODES * k : NUM_NODES * (k + 1)]
        carried = sum(len(a.data) for m in replies for a in m.content["arrays"].values())
        assert r.wire_bits == 8 * carried and r.participants == NUM_NODES
    # FedAvg of the buffers: the weighted mean; the counter rounded, still int64.
    last = grid.replies[-NUM_NODES:]
    last = sorted(last, key=lambda m: m.content["metrics"]["aq-client-id"])
    sizes = [int(m.content["metrics"]["num-examples"]) for m in last]
    n = np.array(aggregation_weights(sizes, share), dtype=np.float64)
    assert (share is None) == (n.tolist() == sizes)
    for name in BN_SIDE:
        values = np.stack([m.content["arrays"][name].numpy() for m in last]).astype(np.float64)
        mean = np.tensordot(n / n.sum(), values, axes=1)
        got = models[ROUNDS][name].numpy()
        assert got.dtype == last[0].content["arrays"][name].numpy().dtype
        if name.endswith("num_batches_tracked"):
            assert got.dtype == np.int64 and int(got) == int(np.rint(mean)) == ROUNDS * STEPS
        else:
            np.testing.assert_array_equal(got, mean.astype(np.float32))
    # It trains: the policy's loss falls, and the model runs.
    losses = [r.train_loss for r in s.rounds]
    assert losses[-1] < losses[0]  # type: ignore[operator]
    model = BatchNormCNN()
    model.load_state_dict(models[ROUNDS].to_torch_state_dict())
    assert torch.isfinite(model.eval()(shards[0].x)).all()


def test_a_batchnorm_cnn_under_fedadam_keeps_its_dtypes() -> None:
    # Prepare: FedAdam returns float64 arrays; its Adam step moves the buffers too.
    grid = InProcessGrid(torch_app(BatchNormCNN, image_shards(NUM_NODES)), NUM_NODES)
    s = AdaQuant(FedAdam(fraction_evaluate=0.0, min_train_nodes=NUM_NODES,
                         min_available_nodes=NUM_NODES, eta=0.01),
                 policy=FixedLevels(3), seed=0)  # fmt: skip

    # Execute
    models = run(s, grid, initial(BatchNormCNN))

    # Assert: the model keeps the model's dtypes (float32, int64) and stays finite.
    assert {k: a.dtype for k, a in models[ROUNDS].items()} == {
        k: a.dtype for k, a in initial(BatchNormCNN).items()
    }
    assert all(np.isfinite(a.numpy()).all() for a in models[ROUNDS].values())
    assert all(r.participants == NUM_NODES for r in s.rounds)


def test_side_arrays_of_a_reply_are_checked_before_use() -> None:
    # Prepare: a node's reply with a running variance of the wrong shape, one with NaN,
    # and one whose .npy header claims a huge array.
    layout = ArrayLayout.of(initial(BatchNormCNN))
    good = Array(np.ones(4, dtype=np.float32))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    huge = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=header.getvalue())
    bad = {
        "shape": Array(np.ones(5, dtype=np.float32)),
        "nan": Array(np.array([1, np.nan, 1, 1], dtype=np.float32)),
        "header": huge,
    }
    side = {name: Array(np.zeros((), dtype=np.int64)) if "num" in name else good
            for name in layout.side}  # fmt: skip

    # Execute / Assert
    assert layout.side_arrays(side, trusted=False) == side
    for what, array in bad.items():
        with pytest.raises(RecordError, match=r"bn\.running_var"):
            layout.side_arrays({**side, "bn.running_var": array}, trusted=False)
        assert what in bad


# --------------------------------------------------------------------------- float16, bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_train(dtype: torch.dtype) -> None:
    # Prepare: TinyNet in half precision. Flower carries float16 as it is; bfloat16
    # has no numpy dtype, so record_from_state_dict sends it as float32 (exactly).
    shards = tiny_shards(NUM_NODES)
    grid = InProcessGrid(torch_app(TinyNet, shards, dtype=dtype), NUM_NODES)
    s = strategy()
    arrays = initial(TinyNet, dtype)

    # Execute
    models = run(s, grid, arrays)

    # Assert: the arrays keep their dtype on the wire, the updates are compressed,
    # and the model learns.
    wire_dtype = "float16" if dtype == torch.float16 else "float32"
    assert {a.dtype for a in arrays.values()} == {wire_dtype}
    assert {a.dtype for a in models[ROUNDS].values()} == {wire_dtype}
    assert s.layout is not None and s.layout.side == () and s.layout.numel == 5 * 3 + 3
    assert all(r.participants == NUM_NODES for r in s.rounds)
    losses = [r.train_loss for r in s.rounds]
    assert losses[-1] < losses[0]  # type: ignore[operator]
    model = TinyNet().to(dtype)
    model.load_state_dict(models[ROUNDS].to_torch_state_dict())
    assert model.fc.weight.dtype == dtype


def test_bfloat16_cannot_enter_an_arrayrecord_directly() -> None:
    # Negative control for record_from_state_dict: Flower's own conversion fails.
    with pytest.raises(TypeError, match="BFloat16"):
        ArrayRecord(TinyNet().to(torch.bfloat16).state_dict())
    record = record_from_state_dict(TinyNet().to(torch.bfloat16).state_dict())
    assert {a.dtype for a in record.values()} == {"float32"}


def test_a_bfloat16_model_converted_on_the_server_only_fails_naming_the_fix() -> None:
    """A user's bfloat16 app whose train function replies with ``ArrayRecord(state_dict)``.

    The server's initial arrays go through ``record_from_state_dict``; the nodes'
    replies do not, so every train function raises ``TypeError: Got unsupported
    ScalarType BFloat16`` and every reply is an error. Before, the run ended with
    "Why: error reply (2): Exception ClientAppException occurred. Message: Got
    unsupported ScalarType BFloat16'> (12x)", which names neither the fix nor what
    error code 2 is.
    """
    # Prepare: Flower's own conversion in the nodes' train function.
    grid = InProcessGrid(
        torch_app(TinyNet, tiny_shards(NUM_NODES), dtype=torch.bfloat16, to_record=ArrayRecord),
        NUM_NODES,
    )
    s = strategy()

    # Execute
    with pytest.raises(NoAcceptedRepliesError) as error:
        run(s, grid, initial(TinyNet, torch.bfloat16))

    # Assert: the error says what happened on the nodes and what to change, in words.
    text = str(error.value)
    assert (
        "the node's ClientApp raised an exception: Got unsupported ScalarType BFloat16 "
        f"({NUM_NODES * ROUNDS}x)" in text
    )
    assert "record_from_state_dict(model.state_dict())" in text and "train function" in text
    assert "'>" not in text and "(2)" not in text and "ClientAppException" not in text
    # Control: the same app with record_from_state_dict on the nodes too trains.
    fixed = InProcessGrid(torch_app(TinyNet, tiny_shards(NUM_NODES), dtype=torch.bfloat16),
                          NUM_NODES)  # fmt: skip
    ok = strategy()
    run(ok, fixed, initial(TinyNet, torch.bfloat16))
    assert all(r.participants == NUM_NODES for r in ok.rounds)


def test_layout_sorts_arrays_into_compressed_and_side() -> None:
    record = ArrayRecord(
        {
            "w": Array(np.zeros((2, 3), dtype=np.float16)),
            "b": Array(np.zeros(3, dtype=np.float64)),
            "steps": Array(np.zeros((), dtype=np.int64)),
            "mask": Array(np.ones(3, dtype=bool)),
            "norm.running_var": Array(np.ones(3, dtype=np.float32)),
        }
    )
    layout = ArrayLayout.of(record)
    assert layout.side == ("steps", "mask", "norm.running_var") and layout.numel == 9
    assert ArrayLayout.of(record, uncompressed=()).side == ("steps", "mask")
    assert ArrayLayout.from_json(layout.to_json()) == layout
    flat = torch.arange(9, dtype=torch.float32)
    back = layout.to_record(flat, layout.side_arrays(record))
    assert (back["w"].dtype, back["b"].dtype) == ("float16", "float64")
    assert torch.equal(layout.flatten(back), flat)
    with pytest.raises(RecordError, match="no floating-point parameters"):
        ArrayLayout.of(ArrayRecord({"steps": Array(np.zeros(2, dtype=np.int64))}))
    strings = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32)),
                           "s": Array(np.array(["a"]))})  # fmt: skip
    with pytest.raises(RecordError, match="dtype"):
        ArrayLayout.of(strings)


def test_downlink_and_side_arrays_together() -> None:
    # A compressed downlink sends the buffers beside the change messages.
    grid = InProcessGrid(torch_app(BatchNormCNN, image_shards(NUM_NODES)), NUM_NODES)
    s = strategy(downlink=QSGDCompressor(), downlink_levels=255)

    models = run(s, grid, initial(BatchNormCNN))

    train = [m for m in grid.sent if m.content.array_records]
    assert all(set(BN_SIDE) <= set(m.content["arrays"].keys()) for m in train)
    for k, r in enumerate(s.rounds):
        sent = train[NUM_NODES * k : NUM_NODES * (k + 1)]
        assert r.downlink_bits == 8 * sum(len(a.data) for m in sent
                                          for a in m.content["arrays"].values())  # fmt: skip
    assert models[ROUNDS]["bn.num_batches_tracked"].numpy() == ROUNDS * STEPS
