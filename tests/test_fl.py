"""Tests of the federated loop: client work, weighted aggregation, rejection, determinism."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adaquantfl.compression import ClientCompressor, QSGDCompressor
from adaquantfl.compression.codec import encode_dense, peek_header
from adaquantfl.data import ClientData, FederatedData
from adaquantfl.fl.client import (
    ClientError,
    ClientReply,
    LocalTraining,
    client_update,
    draw_minibatches,
    evaluate,
)
from adaquantfl.fl.server import FedServer, select_clients, weighted_mean
from adaquantfl.models import make_model
from adaquantfl.policy import AdaQuantLevels, FixedLevels, FullPrecision
from adaquantfl.rng import torch_generator
from adaquantfl.sim.simulator import Simulator


class RecordingSchedule:
    """A schedule that remembers the losses it was fed."""

    def __init__(self, levels: int | None = None) -> None:
        self._levels = levels
        self.losses: list[float] = []

    @property
    def levels(self) -> int | None:
        return self._levels

    def update(self, loss: float) -> int | None:
        self.losses.append(loss)
        return self._levels

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass


def tiny_data(
    num_clients: int = 3, seed: int = 0, sizes: tuple[int, ...] = (20, 35, 7)
) -> FederatedData:
    g = torch.Generator().manual_seed(seed)
    clients = []
    for n in sizes[:num_clients]:
        x = torch.randn(n, 5, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        clients.append(ClientData(x, y))
    xt = torch.randn(30, 5, generator=g)
    test = ClientData(xt, (xt[:, 0] > 0).long() + (xt[:, 1] > 0.5).long())
    return FederatedData(name="tiny", clients=clients, test=test, num_classes=3, input_shape=(5,))


TRAINING = LocalTraining(local_steps=4, batch_size=8, lr=0.3)


# --------------------------------------------------------------------------- aggregation


def test_weighted_aggregation_hand_case() -> None:
    schedule = RecordingSchedule()
    server = FedServer(torch.zeros(3), schedule, QSGDCompressor())
    replies = [
        ClientReply(1, encode_dense(torch.tensor([-1.0, 0.0, 1.0])), loss=1.0, num_examples=3),
        ClientReply(0, encode_dense(torch.tensor([1.0, 2.0, 3.0])), loss=2.0, num_examples=1),
    ]
    out = server.aggregate(replies)
    # w1 = (1 * [1, 2, 3] + 3 * [-1, 0, 1]) / 4
    assert server.params.tolist() == [-0.5, 0.5, 1.5]
    # F = (1 * 2.0 + 3 * 1.0) / 4 = 1.25, and that is what the schedule sees.
    assert out.train_loss == 1.25 and schedule.losses == [1.25]
    assert out.participants == 2 and out.rejected == 0
    assert out.wire_bits == 8 * sum(len(r.payload) for r in replies)
    assert out.formula_bits == 2 * 32 * 3
    assert server.round_idx == 1


def test_aggregation_does_not_depend_on_reply_order() -> None:
    updates = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    replies = [ClientReply(i, encode_dense(u), 1.0 + i, 10 + i) for i, u in enumerate(updates)]
    a = FedServer(torch.zeros(50), FullPrecision(), QSGDCompressor())
    b = FedServer(torch.zeros(50), FullPrecision(), QSGDCompressor())
    a.aggregate(replies)
    b.aggregate(list(reversed(replies)))
    assert torch.equal(a.params, b.params)


def test_weighted_mean() -> None:
    assert weighted_mean([2.0, 1.0], [1, 3]) == 1.25
    with pytest.raises(ValueError):
        weighted_mean([], [])


# --------------------------------------------------------------------------- rejection


def _good(cid: int, levels: int | None = 2, loss: float = 1.0, n: int = 5) -> ClientReply:
    comp = QSGDCompressor()
    payload = comp.compress(
        torch.full((4,), 0.5), levels, generator=torch.Generator().manual_seed(cid)
    )
    return ClientReply(cid, payload, loss, n)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_good(9, levels=3), "levels 3; expected 2"),
        (_good(9, levels=None), "got raw"),
        (ClientReply(9, b"garbage", 1.0, 5), "undecodable"),
        (ClientReply(9, _good(9).payload[:-1], 1.0, 5), "undecodable"),
        (_good(9, loss=float("nan")), "loss"),
        (_good(9, n=0), "num_examples"),
        (ClientReply(9, "text", 1.0, 5), "bytes"),  # type: ignore[arg-type]
    ],
)
def test_bad_reply_is_excluded_and_the_round_goes_on(bad: ClientReply, reason: str) -> None:
    ref = FedServer(torch.zeros(4), FixedLevels(2), QSGDCompressor())
    ref.aggregate([_good(0), _good(1)])
    schedule = RecordingSchedule(levels=2)
    server = FedServer(torch.zeros(4), schedule, QSGDCompressor())
    out = server.aggregate([_good(0), _good(1), bad])
    assert out.participants == 2 and out.rejected == 1
    assert reason in out.rejections[0][1]
    assert torch.equal(server.params, ref.params)  # the bad reply changed nothing
    assert schedule.losses == [1.0]


def test_replies_sharing_a_client_id_are_all_rejected() -> None:
    # Whichever arrived first must not win: both are excluded, in any order.
    for order in (
        [_good(0), _good(1), _good(1, loss=5.0)],
        [_good(1, loss=5.0), _good(1), _good(0)],
    ):
        schedule = RecordingSchedule(levels=2)
        server = FedServer(torch.zeros(4), schedule, QSGDCompressor())
        out = server.aggregate(order)
        assert out.participants == 1 and out.rejected == 2
        assert all("2 replies claim this client id" in why for _, why in out.rejections)
        assert schedule.losses == [1.0]


def test_oversized_payload_is_rejected_unread() -> None:
    server = FedServer(torch.zeros(4), FixedLevels(2), QSGDCompressor(), max_message_bytes=10)
    out = server.aggregate([_good(0)])
    assert out.rejected == 1 and "exceeds the limit" in out.rejections[0][1]


def test_all_replies_rejected_leaves_model_and_schedule_unchanged() -> None:
    schedule = AdaQuantLevels(2)
    schedule.update(2.0)
    before = schedule.state_dict()
    server = FedServer(torch.ones(4), schedule, QSGDCompressor())
    out = server.aggregate([ClientReply(0, b"x", 1.0, 3), _good(1, levels=5)])
    assert out.participants == 0 and out.rejected == 2 and out.train_loss is None
    assert torch.equal(server.params, torch.ones(4))
    assert schedule.state_dict() == before
    assert server.round_idx == 1


def test_client_error_on_diverged_training() -> None:
    data = tiny_data()
    model = make_model("logreg", (5,), 3)
    # Inputs of size ~1e3 and a step size of 1e37 overflow float32 in the first step.
    with pytest.raises(ClientError, match="diverged"):
        client_update(
            model, torch.zeros(model.numel), data.clients[0].x * 1e3, data.clients[0].y, levels=2,
            compressor=ClientCompressor(QSGDCompressor()), training=LocalTraining(5, 4, 1e37),
            seed=0, round_idx=0, client_id=0,
        )  # fmt: skip


# --------------------------------------------------------------------------- client


def test_client_reports_pre_training_loss_and_real_update() -> None:
    data = tiny_data()
    model = make_model("logreg", (5,), 3)
    params = torch.zeros(model.numel)
    shard = data.clients[1]
    reply = client_update(
        model, params, shard.x, shard.y, levels=None,
        compressor=ClientCompressor(QSGDCompressor()), training=TRAINING,
        seed=0, round_idx=0, client_id=1,
    )  # fmt: skip
    # Zero weights give uniform predictions: loss log(3) before training.
    assert reply.loss == pytest.approx(float(torch.log(torch.tensor(3.0))), rel=1e-6)
    assert reply.num_examples == 35
    update = QSGDCompressor().decompress(reply.payload, numel=model.numel, levels=None)
    assert float(update.abs().sum()) > 0
    loss_after, _ = evaluate(model, params + update, shard.x, shard.y)
    assert loss_after < reply.loss


def test_quantized_payload_is_the_codec_message_at_the_asked_levels() -> None:
    data = tiny_data()
    model = make_model("mlp", (5,), 3)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(0))
    shard = data.clients[0]
    reply = client_update(
        model, params, shard.x, shard.y, levels=7,
        compressor=ClientCompressor(QSGDCompressor()), training=TRAINING,
        seed=0, round_idx=2, client_id=0,
    )  # fmt: skip
    header = peek_header(reply.payload)
    assert header.levels == 7 and header.numel == model.numel and header.encoding == "packed"


def test_minibatches_with_replacement_let_tiny_clients_train() -> None:
    idx = draw_minibatches(3, LocalTraining(5, 32, 0.1), torch.Generator().manual_seed(0))
    assert idx.shape == (5, 32) and int(idx.max()) <= 2 and int(idx.min()) >= 0
    assert len(set(idx.flatten().tolist())) == 3


def test_select_clients() -> None:
    assert select_clients(5, 5, seed=0, round_idx=3) == [0, 1, 2, 3, 4]
    picks = [select_clients(100, 10, seed=1, round_idx=r) for r in range(5)]
    assert all(len(p) == 10 == len(set(p)) and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) == 5  # differs per round
    assert picks[0] == select_clients(100, 10, seed=1, round_idx=0)
    assert picks[0] != select_clients(100, 10, seed=2, round_idx=0)
    with pytest.raises(ValueError, match="clients_per_round"):
        select_clients(5, 6, seed=0, round_idx=0)


# --------------------------------------------------------------------------- whole loop


def _simulator(levels: int | None, seed: int = 0, schedule: Any = None) -> Simulator:
    data = tiny_data()
    model = make_model("logreg", (5,), 3)
    params = model.initial_parameters("zero", generator=torch.Generator())
    sched = schedule or (FullPrecision() if levels is None else FixedLevels(levels))
    server = FedServer(params, sched, QSGDCompressor())
    return Simulator(
        model, data, server, server.compressor, training=TRAINING, clients_per_round=3, seed=seed
    )


def handwritten_fedavg(data: FederatedData, rounds: int, seed: int) -> torch.Tensor:
    """FedAvg written out with plain tensors: the reference for the fp32 loop."""
    W = torch.zeros(3, 5)
    b = torch.zeros(3)
    for k in range(rounds):
        total = sum(len(c) for c in data.clients)
        dW, db = torch.zeros_like(W, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)
        for i, c in enumerate(data.clients):
            gen = torch_generator(seed, purpose="batch", round_idx=k, client_id=i)
            idx = torch.randint(
                0, len(c), (TRAINING.local_steps, TRAINING.batch_size), generator=gen
            )
            Wl, bl = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
            for t in range(TRAINING.local_steps):
                loss = F.cross_entropy(c.x[idx[t]] @ Wl.T + bl, c.y[idx[t]])
                gW, gb = torch.autograd.grad(loss, (Wl, bl))
                with torch.no_grad():
                    Wl = (Wl - TRAINING.lr * gW).requires_grad_(True)
                    bl = (bl - TRAINING.lr * gb).requires_grad_(True)
            dW += len(c) / total * (Wl.detach() - W).double()
            db += len(c) / total * (bl.detach() - b).double()
        W = (W.double() + dW).float()
        b = (b.double() + db).float()
    return torch.cat([W.reshape(-1), b])


def test_fp32_full_participation_equals_handwritten_fedavg() -> None:
    sim = _simulator(None)
    for _ in range(4):
        sim.run_round()
    expected = handwritten_fedavg(tiny_data(), 4, seed=0)
    torch.testing.assert_close(sim.server.params, expected, rtol=1e-5, atol=1e-6)
    assert float(expected.abs().sum()) > 0.1


def test_same_seed_same_bytes_and_different_seed_differs() -> None:
    def trace(seed: int) -> tuple[list[Any], torch.Tensor]:
        sim = _simulator(3, seed=seed)
        rows = [sim.run_round().as_row() for _ in range(3)]
        for r in rows:
            r.pop("time_s")
        return rows, sim.server.params

    rows_a, params_a = trace(0)
    rows_b, params_b = trace(0)
    _, params_c = trace(1)
    assert rows_a == rows_b and torch.equal(params_a, params_b)
    assert not torch.equal(params_a, params_c)


def test_round_record_accounts_bits_and_downlink() -> None:
    sim = _simulator(1)
    rec = sim.run_round()
    numel = sim.model.numel
    assert rec.levels == 1 and rec.participants == 3 and rec.rejected == 0
    assert rec.formula_bits == 3 * (numel * 1 + numel + 32)
    assert rec.downlink_bits == 3 * 8 * len(encode_dense(torch.zeros(numel)))
    assert rec.wire_bits > rec.formula_bits  # headers and CRC are on the wire too
    assert rec.train_loss == pytest.approx(float(torch.log(torch.tensor(3.0))), rel=1e-6)


def test_all_finite() -> None:
    from adaquantfl.fl.client import all_finite

    assert all_finite(torch.full((1000,), 3e38))  # the float64 sum does not overflow
    assert all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(100)
        x[57] = bad
        assert not all_finite(x)
    x = torch.ones(10)
    x[0], x[1] = float("inf"), -float("inf")
    assert not all_finite(x)


# ---------------------------------------------------------------- the limit and the noise


def test_the_rate_distortion_bound_per_coordinate() -> None:
    from adaquantfl.fl.record import rd_bits_per_coordinate

    assert rd_bits_per_coordinate(1.0) == pytest.approx(0.5)  # half a bit for omega = 1
    assert rd_bits_per_coordinate(1 / 3) == pytest.approx(1.0)  # log2(4) / 2
    assert rd_bits_per_coordinate(0.0) is None and rd_bits_per_coordinate(None) is None
    assert rd_bits_per_coordinate(0.1) > rd_bits_per_coordinate(1.0) > rd_bits_per_coordinate(10.0)


def _noise_runs(method: dict[str, object], every: int) -> list[Any]:
    from adaquantfl.runner.build import build_simulator
    from adaquantfl.runner.config import load_config

    config = load_config(
        {
            "data": {"dataset": "digits", "num_clients": 4},
            "model": {"name": "logreg"},
            "train": {"rounds": 4, "local_steps": 3, "batch_size": 16, "lr": 0.1,
                      "noise_cost_every": every},
            "compression": method,
        }
    )  # fmt: skip
    sim = build_simulator(config)
    return [sim.run_round() for _ in range(4)]


def test_the_noise_cost_is_the_loss_the_compression_adds_and_changes_nothing_else() -> None:
    fp32 = _noise_runs({"method": "fp32"}, 2)
    coarse = _noise_runs({"method": "qsgd", "levels": 1, "bucket_size": 0, "norm": "l2"}, 2)
    plain = _noise_runs({"method": "qsgd", "levels": 1, "bucket_size": 0, "norm": "l2"}, 0)
    # Measured every second round only.
    assert [r.test_loss_uncompressed is not None for r in coarse] == [False, True, False, True]
    # Full precision adds no noise: the same aggregate, to the bit.
    assert all(r.test_loss_uncompressed == r.test_loss for r in fp32[1::2])
    # Coarse QSGD does (the control): its aggregate differs from the uncompressed one.
    assert all(r.test_loss_uncompressed != r.test_loss for r in coarse[1::2])
    # Measuring it changes nothing of the run.
    for a, b in zip(coarse, plain, strict=True):
        assert a.as_row() | {"time_s": 0, "test_loss_uncompressed": None} == b.as_row() | {
            "time_s": 0
        }
    # And the bound is reported beside the bits sent.
    assert all(r.rd_bits_per_coordinate is not None for r in coarse)
    assert all(r.bits_per_coordinate > r.rd_bits_per_coordinate for r in coarse)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_server_refuses_initial_params_that_are_not_finite(bad: float) -> None:
    params = torch.zeros(1000)
    params[737] = bad
    with pytest.raises(ValueError, match="initial params contain non-finite values"):
        FedServer(params, FixedLevels(3), QSGDCompressor())
    params[737] = 0.0
    server = FedServer(params, FixedLevels(3), QSGDCompressor())
    params[0] = 5.0  # the server keeps its own copy
    assert float(server.params[0]) == 0.0
