"""Downlink: what the server sends, what clients hold, and what it costs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import adaquantfl.sim.simulator as simulator_module
from adaquantfl.compression import Compressor, QSGDCompressor
from adaquantfl.compression.codec import decode_dense, encode_dense
from adaquantfl.fl.downlink import Downlink, RoundPlan, apply_change
from adaquantfl.policy import LevelPlan
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist1d-floor.toml"
D = 300
FP32 = LevelPlan(None)  # the participants' levels (the downlink does not read them)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Client:
    """A client's side of the downlink: it applies exactly the bytes it is sent."""

    def __init__(self, compressor: Compressor, levels: int | None) -> None:
        self.compressor, self.levels = compressor, levels
        self.model: torch.Tensor | None = None
        self.received_bytes = 0

    def receive(self, cid: int, sent: RoundPlan, downlink: Downlink) -> None:
        if cid in sent.full:
            message = downlink.full_model()
            self.model = decode_dense(message, expected_numel=D)
            self.received_bytes += len(message)
            return
        messages = sent.catch_up.get(cid) or [sent.payload]
        for message in messages:
            assert message is not None and self.model is not None
            self.model = apply_change(self.model, message, self.compressor, self.levels)
            self.received_bytes += len(message)


def walk(downlink: Downlink, rounds: list[list[int]]) -> Iterator[tuple[int, RoundPlan]]:
    """Broadcast a drifting model to each round's participants."""
    params = torch.randn(D, generator=gen(99))
    for round_idx, clients in enumerate(rounds):
        params = params + 0.1 * torch.randn(D, generator=gen(round_idx))
        yield round_idx, downlink.broadcast(params, round_idx, clients, FP32)


def test_raw_downlink_costs_the_real_messages_bytes_in_closed_form() -> None:
    params = torch.randn(410, generator=gen())
    sent = Downlink(410).broadcast(params, 0, [0, 1, 2], FP32)
    assert sent.model is params and sent.payload is None
    assert sent.bits == 3 * 8 * len(encode_dense(params))


@pytest.mark.parametrize("levels", [3, None], ids=["qsgd", "raw"])
def test_a_change_applied_in_place_is_the_same_model(levels: int | None) -> None:
    compressor = QSGDCompressor()
    replica = torch.randn(D, generator=gen(1))
    change = torch.randn(D, generator=gen(2)) * 0.1
    message = compressor.compress(change, levels, generator=gen(3))
    expected = apply_change(replica, message, compressor, levels)
    held = replica.clone()
    got = apply_change(held, message, compressor, levels, in_place=True)
    assert got is held and torch.equal(got, expected) and not torch.equal(expected, replica)


ROUNDS = [[0, 1, 2], [0, 1], [0, 2], [1], [0, 1, 2]]
#: (round, client) -> the rounds whose messages that client needs to catch up.
CATCH_UP = {(2, 2): [1, 2], (3, 1): [2, 3], (4, 2): [3, 4]}


@pytest.mark.parametrize("levels", [15, 2**20], ids=["small-messages", "huge-messages"])
def test_clients_hold_the_servers_replica_and_pay_for_what_they_receive(levels: int) -> None:
    compressor = QSGDCompressor(bucket_size=64)
    downlink = Downlink(D, compressor, levels, seed=3)
    clients = {c: Client(compressor, levels) for c in (0, 1, 2)}
    for round_idx, sent in walk(downlink, ROUNDS):
        paid = sum(c.received_bytes for c in clients.values())
        for cid in ROUNDS[round_idx]:
            clients[cid].receive(cid, sent, downlink)
            assert torch.equal(clients[cid].model, sent.model), (round_idx, cid)
        assert sent.bits == 8 * (sum(c.received_bytes for c in clients.values()) - paid)
        if round_idx == 0:
            assert sent.full == (0, 1, 2)
        for (r, cid), missed in CATCH_UP.items():
            if r != round_idx:
                continue
            if levels == 15:  # two small messages are cheaper than the model
                assert len(sent.catch_up[cid]) == len(missed)
            else:  # a message at 2**20 levels outweighs the float32 model: send it whole
                assert cid in sent.full and cid not in sent.catch_up


def test_the_replica_follows_a_moving_model_with_error_feedback() -> None:
    # What one round's message loses is part of the next round's change, so the
    # replica's distance to the model stays of the order of one round's
    # quantization error instead of adding up over the rounds.
    downlink = Downlink(D, QSGDCompressor(), 3, seed=0)
    params = torch.randn(D, generator=gen(5))
    gaps, steps = [], []
    for round_idx in range(60):
        step = 0.05 * torch.randn(D, generator=gen(100 + round_idx))
        params = params + step
        steps.append(float(step.norm()))
        gaps.append(float((downlink.broadcast(params, round_idx, [0], FP32).model - params).norm()))
    assert gaps[0] == 0.0
    assert max(gaps[30:]) < 3 * max(steps)  # bounded, not a random walk (sqrt(60) steps)


def test_downlink_state_round_trips_and_continues_identically() -> None:
    a = Downlink(D, QSGDCompressor(), 7, seed=1)
    results = list(walk(a, ROUNDS[:3]))
    b = Downlink(D, QSGDCompressor(), 7, seed=1)
    b.load_state_dict(a.state_dict())
    params = torch.randn(D, generator=gen(42))
    sa, sb = a.broadcast(params, 3, [1, 2], FP32), b.broadcast(params, 3, [1, 2], FP32)
    assert sa.payload == sb.payload and sa.bits == sb.bits and torch.equal(sa.model, sb.model)
    assert results  # the walk above ran


def test_simulator_clients_train_from_exactly_the_model_the_server_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = load_config(
        CONFIG,
        ["compression.downlink=qsgd", "compression.downlink_levels=7",
         "compression.method=qsgd", "compression.levels=7", "train.vectorize=false",
         "train.rounds=6"],
    )  # fmt: skip
    sim = build_simulator(cfg)
    trained_from: list[torch.Tensor] = []
    real = simulator_module.train_locally

    def spy(model, params, *args, **kwargs):  # type: ignore[no-untyped-def]
        trained_from.append(params.clone())
        return real(model, params, *args, **kwargs)

    monkeypatch.setattr(simulator_module, "train_locally", spy)
    rows = []
    for _ in range(6):
        trained_from.clear()
        rows.append(sim.run_round())
        replica = sim.server.downlink.replica
        assert replica is not None and trained_from
        assert all(torch.equal(p, replica) for p in trained_from)
        assert not torch.equal(replica, sim.server.params) or rows[-1].round == 1
    # Round 1 sends the model whole; later rounds send every client one
    # message of 1 + 3 bits per entry, far fewer bits than float32.
    full = 8 * len(encode_dense(sim.server.params)) * 10
    assert rows[0].downlink_bits == full
    assert all(r.downlink_bits < full / 6 for r in rows[1:])
    assert rows[-1].train_loss < rows[0].train_loss  # type: ignore[operator]
