"""Bad clients never corrupt the model; dropout and deadlines are seeded and counted."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adaquantfl.compression import QSGDCompressor
from adaquantfl.compression.codec import encode_dense
from adaquantfl.fl.client import ClientReply, LocalTraining
from adaquantfl.fl.server import FedServer
from adaquantfl.models import make_model
from adaquantfl.policy import AdaQuantLevels
from adaquantfl.sim.simulator import ClientFaults, Simulator
from tests.test_fl import RecordingSchedule, tiny_data

BAD_ROUND = 1  # 0-based round in which the faulty client misbehaves


def corrupt(kind: str, reply: ClientReply, numel: int) -> ClientReply | None:
    payload = reply.payload
    if kind == "garbage":
        return dataclasses.replace(reply, payload=b"\x00" * 37)
    if kind == "truncated":
        return dataclasses.replace(reply, payload=payload[:-3])
    if kind == "bitflip":
        flipped = bytearray(payload)
        flipped[len(flipped) // 2] ^= 0x10
        return dataclasses.replace(reply, payload=bytes(flipped))
    if kind == "wrong_size":
        return dataclasses.replace(reply, payload=encode_dense(torch.zeros(numel + 1)))
    if kind == "wrong_levels":
        q = QSGDCompressor().compress(torch.ones(numel), 7, generator=torch.Generator())
        return dataclasses.replace(reply, payload=q)
    if kind == "nan_loss":
        return dataclasses.replace(reply, loss=float("nan"))
    if kind == "huge":
        return dataclasses.replace(reply, payload=payload * 2000)
    if kind == "lost":
        return None
    raise AssertionError(kind)


class FaultySimulator(Simulator):
    """Delivers some clients' replies damaged in one round."""

    def __init__(self, *args, kind: str, bad: set[int], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.bad = bad

    def transmit(self, reply: ClientReply, round_idx: int) -> ClientReply | None:
        if round_idx == BAD_ROUND and reply.client_id in self.bad:
            return corrupt(self.kind, reply, self.model.numel)
        return reply


def build(
    kind: str | None, bad: set[int], faults: ClientFaults | None = None, vectorize: bool = True
) -> Simulator:
    data = tiny_data()
    model = make_model("logreg", (5,), 3)
    params = model.initial_parameters("zero", generator=torch.Generator())
    server = FedServer(params, AdaQuantLevels(2), QSGDCompressor(), max_message_bytes=10_000)
    kwargs = {"training": LocalTraining(4, 8, 0.3), "clients_per_round": 3, "seed": 0,
              "vectorize": vectorize, "faults": faults}  # fmt: skip
    if kind is None:
        return Simulator(model, data, server, server.compressor, **kwargs)
    return FaultySimulator(model, data, server, server.compressor, kind=kind, bad=bad, **kwargs)


KINDS = [
    "garbage",
    "truncated",
    "bitflip",
    "wrong_size",
    "wrong_levels",
    "nan_loss",
    "huge",
    "lost",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vectorize", [True, False], ids=["batched", "per-client"])
def test_a_bad_client_is_excluded_as_if_it_had_not_replied(kind: str, vectorize: bool) -> None:
    faulty = build(kind, {1}, vectorize=vectorize)
    # Reference: client 1's reply never arrives in that round.
    reference = build("lost", {1}, vectorize=vectorize)
    records = [faulty.run_round() for _ in range(4)]
    ref_records = [reference.run_round() for _ in range(4)]
    assert records[BAD_ROUND].participants == 2 and records[BAD_ROUND].rejected == 1
    assert all(r.rejected == 0 for i, r in enumerate(records) if i != BAD_ROUND)
    # The model, the schedule's input and its levels are exactly those without that client.
    assert torch.equal(faulty.server.params, reference.server.params)
    assert [r.train_loss for r in records] == [r.train_loss for r in ref_records]
    assert [r.levels for r in records] == [r.levels for r in ref_records]
    assert faulty.server.policy.state_dict() == reference.server.policy.state_dict()
    assert torch.isfinite(faulty.server.params).all()


def test_every_client_failing_leaves_the_model_unchanged() -> None:
    sim = build("garbage", {0, 1, 2})
    sim.run_round()
    before = sim.server.params.clone()
    schedule_before = sim.server.policy.state_dict()
    record = sim.run_round()
    assert record.participants == 0 and record.rejected == 3 and record.train_loss is None
    assert torch.equal(sim.server.params, before)
    assert sim.server.policy.state_dict() == schedule_before
    assert math.isfinite(record.test_loss)
    assert sim.run_round().participants == 3  # and the run goes on


def test_server_rejects_non_finite_decoded_updates() -> None:
    class NaNCompressor(QSGDCompressor):
        def decompress(self, payload, *, numel, levels, out=None):  # type: ignore[no-untyped-def]
            return torch.full((numel,), float("nan"))

    server = FedServer(torch.zeros(4), AdaQuantLevels(2), NaNCompressor())
    out = server.aggregate([ClientReply(0, b"anything", 1.0, 3)])
    assert out.rejected == 1 and "non-finite" in out.rejections[0][1]
    assert torch.equal(server.params, torch.zeros(4))


# --------------------------------------------------------------------------- dropout, deadline


def test_dropout_is_seeded_counted_and_about_the_right_rate() -> None:
    faults = ClientFaults(dropout=0.3)
    chosen = list(range(200))
    a = faults.availability(chosen, seed=0, round_idx=4)
    b = faults.availability(chosen, seed=0, round_idx=4)
    c = faults.availability(chosen, seed=0, round_idx=5)
    assert a == b and a != c
    # Binomial(200, 0.3): mean 60, sd 6.5.
    assert abs(len(a.dropped_out) - 60) < 5 * 6.5
    assert sorted(a.replying + a.dropped_out) == chosen


def test_deadline_drops_the_slow_clients_consistently() -> None:
    faults = ClientFaults(
        deadline_s=1.0, client_time_s=1.0, client_time_sigma=1.0, round_time_sigma=0.0
    )
    chosen = list(range(100))
    rounds = [faults.availability(chosen, seed=3, round_idx=k) for k in range(3)]
    # With no per-round jitter a client's time is fixed, so the same clients miss every round.
    assert rounds[0].missed_deadline == rounds[1].missed_deadline == rounds[2].missed_deadline
    assert 30 < len(rounds[0].missed_deadline) < 70  # median time = deadline: about half
    for cid in rounds[0].missed_deadline:
        assert faults.client_time_s_of(cid, seed=3, round_idx=0) > 1.0


def test_simulator_reports_dropped_clients_in_participants() -> None:
    sim = build(None, set(), faults=ClientFaults(dropout=0.5))
    records = [sim.run_round() for _ in range(8)]
    assert all(r.participants + r.dropped == 3 for r in records)
    assert sum(r.dropped for r in records) > 0
    again = build(None, set(), faults=ClientFaults(dropout=0.5))
    assert [r.dropped for r in records] == [again.run_round().dropped for _ in range(8)]


def test_fault_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="dropout"):
        ClientFaults(dropout=1.5)
    with pytest.raises(ValueError, match="deadline_s"):
        ClientFaults(deadline_s=0)


def test_valid_updates_whose_average_overflows_leave_the_model_unchanged() -> None:
    # Each raw update is finite (3e38), but w + 3e38 overflows float32 once w is large.
    schedule = RecordingSchedule(levels=None)
    server = FedServer(torch.full((3,), 3e38), schedule, QSGDCompressor())
    replies = [ClientReply(i, encode_dense(torch.full((3,), 3e38)), 1.0, 5) for i in range(2)]
    out = server.aggregate(replies)
    assert out.participants == 0 and out.rejected == 2 and out.train_loss is None
    assert "overflows" in out.rejections[0][1]
    assert torch.equal(server.params, torch.full((3,), 3e38))
    assert schedule.losses == []  # the schedule was not fed the round's loss
