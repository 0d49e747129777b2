"""Bad nodes never corrupt the model on Flower: faults injected around ``adaquant_mod``.

The Flower counterpart of tests/test_faults.py. One node misbehaves in one
round: a hostile mod outside ``adaquant_mod`` rewrites the reply the mod
built (what a broken or malicious node could send), or a mod inside it
spoils what the train function reports. Everything runs through Flower's
Message, records, ClientApp and mod machinery, in process
(:class:`tests.flower_helpers.InProcessGrid`). Each run is compared with one
in which that node's reply never arrives: the global model, the schedule's
losses and levels, and the other metrics of every round must be exactly the
same, ``rejected`` must count the bad node, and the exclusion must be logged
with the reason that caught it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed")

import logging
import math
import struct
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import config_record_to_proto
from flwr.serverapp.strategy import Result

from adaquantfl.compression import QSGDCompressor, default_message_limit
from adaquantfl.compression.codec import encode_dense, peek_header
from adaquantfl.flower import AdaQuantFedAvg, NoAcceptedRepliesError, adaquant_mod
from adaquantfl.flower.layout import ArrayLayout
from adaquantfl.flower.messages import LEVELS_KEY, PAYLOAD_KEY, PROBE_KEY, ROUND_KEY
from adaquantfl.policy import AdaQuantLevels, FullPrecision, LevelSchedule
from tests.flower_helpers import (
    InProcessGrid,
    forget_warnings,
    initial_arrays,
    tiny_shards,
    user_client_app,
)

NUM_NODES = 4
ROUNDS = 4
BAD_ROUND = 1  # 0-based round (aq-round) in which the bad node misbehaves: server round 2
BAD_CLIENT = 1
VICTIM_CLIENT = 2  # whose client id the bad node claims in "duplicate_id"
NUMEL = 5 * 3 + 3  # TinyNet

#: Rewrites a reply: (instruction, reply) -> what the node sends instead.
Rewrite = Callable[[Message, Message], Message]


# --------------------------------------------------------------------------- the faults


def _payload(reply: Message) -> bytes:
    return bytes(reply.content["arrays"][PAYLOAD_KEY].data)


def _with_payload(reply: Message, payload: bytes) -> Message:
    # Built field by field, like adaquant_mod's payload_array: the server reads the
    # bytes exactly as the node sent them.
    reply.content["arrays"][PAYLOAD_KEY] = Array(
        dtype="uint8", shape=(len(payload),), stype="adaquantfl.codec.v1", data=payload
    )
    return reply


def _with_metric(key: str, value: float | int) -> Rewrite:
    def rewrite(msg: Message, reply: Message) -> Message:
        reply.content["metrics"][key] = value
        return reply

    return rewrite


def _levels(msg: Message) -> int | None:
    return int(msg.content["config"][LEVELS_KEY]) or None


def _with_crc(message: bytearray) -> bytes:
    """``message`` with its CRC32 recomputed, so only the field changed is wrong."""
    message[-4:] = zlib.crc32(bytes(message[:-4])).to_bytes(4, "little")
    return bytes(message)


def garbage(msg: Message, reply: Message) -> Message:
    return _with_payload(reply, b"\x00" * 37)


def truncated(msg: Message, reply: Message) -> Message:
    return _with_payload(reply, _payload(reply)[:-3])


def bitflip(msg: Message, reply: Message) -> Message:
    flipped = bytearray(_payload(reply))
    flipped[len(flipped) // 2] ^= 0x10
    return _with_payload(reply, bytes(flipped))


def wrong_size(msg: Message, reply: Message) -> Message:
    # A well-formed message at the round's levels, for one entry too many.
    update = torch.ones(NUMEL + 1)
    payload = QSGDCompressor().compress(update, _levels(msg), generator=torch.Generator())
    return _with_payload(reply, payload)


def wrong_levels(msg: Message, reply: Message) -> Message:
    levels = _levels(msg)
    assert levels is not None
    payload = QSGDCompressor().compress(torch.ones(NUMEL), levels + 1, generator=torch.Generator())
    return _with_payload(reply, payload)


def nan_values(msg: Message, reply: Message) -> Message:
    # Full precision: a raw float32 message whose first value is NaN, CRC intact.
    message = bytearray(encode_dense(torch.ones(NUMEL)))
    start = peek_header(bytes(message)).header_bytes
    message[start : start + 4] = struct.pack("<f", math.nan)
    return _with_payload(reply, _with_crc(message))


def inf_norm(msg: Message, reply: Message) -> Message:
    # The node's own quantized message with its norm replaced by inf, CRC intact.
    message = bytearray(_payload(reply))
    start = peek_header(bytes(message)).header_bytes
    message[start : start + 4] = struct.pack("<f", math.inf)
    return _with_payload(reply, _with_crc(message))


def oversized(msg: Message, reply: Message) -> Message:
    return _with_payload(reply, _payload(reply) * 2000)


def extra_array(msg: Message, reply: Message) -> Message:
    # Smuggles a second (large) array next to the payload.
    reply.content["arrays"]["extra"] = Array(np.zeros(1_000_000, dtype=np.float32))
    return reply


def extra_config(msg: Message, reply: Message) -> Message:
    reply.content["stash"] = ConfigRecord({"blob": b"\x00" * 100_000})
    return reply


def nan_pre_train_loss(msg: Message, reply: Message) -> Message:
    # The train function (inside adaquant_mod) reports a NaN loss: the mod refuses it.
    reply.content["metrics"]["pre-train-loss"] = math.nan
    return reply


@dataclass(frozen=True)
class Fault:
    rewrite: Rewrite
    reason: str  # in the logged reason: proves which check caught it
    schedule: Callable[[], LevelSchedule] = lambda: AdaQuantLevels(2)
    inside: bool = False  # a mod between adaquant_mod and the train function
    lost: tuple[int, ...] = (BAD_CLIENT,)  # the clients the reference run loses


FAULTS: dict[str, Fault] = {
    "garbage": Fault(garbage, "undecodable payload"),
    "truncated": Fault(truncated, "undecodable payload"),
    "bitflip": Fault(bitflip, "undecodable payload"),
    "wrong_size": Fault(wrong_size, f"{NUMEL + 1}"),
    "wrong_levels": Fault(wrong_levels, "levels"),
    "nan_values": Fault(nan_values, "non-finite", schedule=FullPrecision),
    "inf_norm": Fault(inf_norm, "not finite"),
    "nan_loss": Fault(_with_metric("aq-loss", math.nan), "loss must be finite"),
    "negative_loss": Fault(_with_metric("aq-loss", -0.5), "loss must be finite"),
    "nan_loss_from_train_fn": Fault(nan_pre_train_loss, "'pre-train-loss' must be", inside=True),
    "zero_examples": Fault(_with_metric("num-examples", 0), "num_examples must be"),
    "oversized": Fault(oversized, "exceeds the limit"),
    "extra_array": Fault(extra_array, "must hold only ['aq-payload']"),
    "extra_config": Fault(extra_config, "must not carry ConfigRecords"),
    "duplicate_id": Fault(
        _with_metric("aq-client-id", VICTIM_CLIENT),
        "2 replies claim this client id",
        lost=(BAD_CLIENT, VICTIM_CLIENT),
    ),
}


# --------------------------------------------------------------------------- running


def _is_bad_train(msg: Message, context: Context, bad: Collection[int]) -> bool:
    if not msg.has_content() or not msg.metadata.message_type.startswith("train"):
        return False
    config = msg.content.config_records.get("config", ConfigRecord())
    return (
        config.get(ROUND_KEY) == BAD_ROUND
        and not config.get(PROBE_KEY)
        and int(context.node_config["partition-id"]) in bad
    )


def hostile_mod(rewrite: Rewrite, bad: Collection[int]) -> Mod:
    """Rewrites the reply of the ``bad`` clients in round ``BAD_ROUND``; others pass."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if _is_bad_train(msg, context, bad) and not reply.has_error():
            return rewrite(msg, reply)
        return reply

    return mod


@dataclass
class Run:
    strategy: AdaQuantFedAvg
    result: Result | None  # None: the run ended with `error`
    grid: InProcessGrid
    models: dict[int, torch.Tensor]  # global model after each round (0: initial)
    node_clients: dict[int, dict[int, int]]  # strategy.node_clients after each round
    error: NoAcceptedRepliesError | None = None

    def metrics(self, server_round: int) -> dict[str, Any]:
        """The strategy's server-side figures of the round (``aq-*``)."""
        assert self.result is not None, self.error
        return dict(self.result.evaluate_metrics_serverapp[server_round])

    def tally(self, server_round: int) -> tuple[int, int, int]:
        m = self.metrics(server_round)
        return m["aq-participants"], m["aq-rejected"], m["aq-dropped"]


def run(
    schedule: LevelSchedule,
    *,
    mods: list[Mod] | None = None,
    lost: Collection[int] = (),
    **strategy_kwargs: Any,
) -> Run:
    """ROUNDS rounds of AdaQuantFedAvg; the ``lost`` clients' replies of BAD_ROUND never arrive."""
    grid = InProcessGrid(user_client_app(tiny_shards(NUM_NODES), mods=mods), NUM_NODES)
    for client in lost:
        grid.tamper[grid.node_of(client)] = lambda msg, reply: (
            None if msg.content["config"][ROUND_KEY] == BAD_ROUND else reply
        )
    strategy = AdaQuantFedAvg(
        schedule,
        QSGDCompressor(),
        seed=3,
        fraction_evaluate=0.0,
        min_train_nodes=NUM_NODES,
        min_available_nodes=NUM_NODES,
        node_wait_s=1.0,
        **strategy_kwargs,
    )
    arrays = initial_arrays()
    layout = ArrayLayout.of(arrays)
    models: dict[int, torch.Tensor] = {}
    node_clients: dict[int, dict[int, int]] = {}

    def snapshot(server_round: int, arrays: ArrayRecord) -> None:
        models[server_round] = layout.flatten(arrays)
        node_clients[server_round] = dict(strategy.node_clients)

    try:
        result = strategy.start(grid, arrays, num_rounds=ROUNDS, timeout=5, evaluate_fn=snapshot)
    except NoAcceptedRepliesError as exc:
        return Run(strategy, None, grid, models, node_clients, exc)
    return Run(strategy, result, grid, models, node_clients)


def carried_bits(grid: InProcessGrid, client: int, round_idx: int) -> int:
    """8 x the bytes of a client's reply in a round (0-based) that count as wire bits:
    its Arrays' data and its ConfigRecords as Flower encodes them; 0 for an error reply."""
    node = grid.node_of(client)
    reply = [r for r in grid.replies if r.metadata.src_node_id == node][round_idx]
    if reply.has_error():
        return 0
    arrays = sum(len(a.data) for rec in reply.content.array_records.values() for a in rec.values())
    configs = sum(
        config_record_to_proto(c).ByteSize() for c in reply.content.config_records.values()
    )
    return 8 * (arrays + configs)


def faulty_run(kind: str) -> Run:
    fault = FAULTS[kind]
    bad = hostile_mod(fault.rewrite, {BAD_CLIENT})
    mods = [adaquant_mod, bad] if fault.inside else [bad, adaquant_mod]
    return run(fault.schedule(), mods=mods)


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    forget_warnings()


@pytest.fixture
def flower_warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    # Flower's logger propagates to the root logger, where caplog listens.
    caplog.set_level(logging.WARNING)
    return caplog


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_bad_node_is_excluded_as_if_it_had_not_replied(
    kind: str, flower_warnings: pytest.LogCaptureFixture
) -> None:
    # Prepare
    fault = FAULTS[kind]

    # Execute: the bad node's round, and a reference run in which its reply is lost.
    faulty = faulty_run(kind)
    reference = run(fault.schedule(), lost=fault.lost)

    # Assert: the bad round aggregated the others and counted the bad node as rejected ...
    bad_round = BAD_ROUND + 1
    n_bad = len(fault.lost)
    assert faulty.tally(bad_round) == (NUM_NODES - n_bad, n_bad, 0)
    assert reference.tally(bad_round) == (NUM_NODES - n_bad, 0, n_bad)
    for r in range(1, ROUNDS + 1):
        if r != bad_round:
            assert faulty.tally(r) == reference.tally(r) == (NUM_NODES, 0, 0)
    # ... and everything else is exactly what it is without the bad node: the model
    # after every round, the schedule's losses and levels, the clients' metrics.
    assert faulty.models.keys() == reference.models.keys() == set(range(ROUNDS + 1))
    for r, model in faulty.models.items():
        assert torch.equal(model, reference.models[r]), f"global model after round {r}"
    assert torch.isfinite(faulty.models[ROUNDS]).all()
    assert not torch.equal(faulty.models[bad_round], faulty.models[bad_round - 1])
    # aq-wire-bits counts a rejected payload's bytes too, once the server has read it.
    ignore = {"aq-rejected", "aq-dropped", "aq-wire-bits", "aq-time-s"}
    for r in range(1, ROUNDS + 1):
        got_r = {k: v for k, v in faulty.metrics(r).items() if k not in ignore}
        want_r = {k: v for k, v in reference.metrics(r).items() if k not in ignore}
        assert got_r == want_r, f"round {r}"
        # The nodes' own metrics, as the inner FedAvg aggregated them.
        clients = faulty.result.train_metrics_clientapp[r]
        assert clients == reference.result.train_metrics_clientapp[r], f"round {r}"
        assert "train-steps" in clients and not any(k.startswith("aq-") for k in clients)
    # aq-wire-bits counts every reply that arrived, accepted or not, refused for its
    # layout included (before, an extra array's or ConfigRecord's reply counted 0 bits):
    # its bytes crossed the network. An error reply carries none.
    faulty_bits = faulty.metrics(bad_round)["aq-wire-bits"]
    reference_bits = reference.metrics(bad_round)["aq-wire-bits"]
    carried = sum(carried_bits(faulty.grid, client, BAD_ROUND) for client in fault.lost)
    assert faulty_bits - reference_bits == carried
    assert (carried == 0) == (kind == "nan_loss_from_train_fn")
    assert faulty.strategy.policy.state_dict() == reference.strategy.policy.state_dict()
    # A rejected reply teaches the strategy nothing: the bad node keeps its client id.
    node = faulty.grid.node_of(BAD_CLIENT)
    assert faulty.node_clients[bad_round][node] == BAD_CLIENT
    # The exclusion is logged with the node, the round and the reason that caught it.
    lines = [r.getMessage() for r in flower_warnings.records if r.levelno >= logging.WARNING]
    assert any(
        f"round {bad_round}: rejected node" in line and str(node) in line and fault.reason in line
        for line in lines
    ), lines
    assert any(f"round {bad_round}: {NUM_NODES - n_bad} accepted, {n_bad} rejected" in line
               for line in lines)  # fmt: skip


def test_every_node_failing_leaves_the_model_and_the_schedule_unchanged(
    flower_warnings: pytest.LogCaptureFixture,
) -> None:
    # Prepare: every node sends garbage in the bad round.
    everyone = set(range(NUM_NODES))

    # Execute
    faulty = run(AdaQuantLevels(2), mods=[hostile_mod(garbage, everyone), adaquant_mod])

    # Assert: the round is recorded with no participants and no loss; nothing moved.
    bad_round = BAD_ROUND + 1
    metrics = faulty.metrics(bad_round)
    tally = (metrics["aq-participants"], metrics["aq-rejected"], metrics["aq-dropped"])
    assert tally == (0, NUM_NODES, 0)
    assert "aq-loss" not in metrics and metrics["aq-formula-bits"] == 0
    assert bad_round not in faulty.result.train_metrics_clientapp  # no client metrics at all
    assert faulty.strategy.rounds[BAD_ROUND].train_loss is None
    assert torch.equal(faulty.models[bad_round], faulty.models[bad_round - 1])
    assert metrics["aq-next-levels"] == metrics["aq-levels"]
    # The run goes on: the next round trains from the unchanged model at the same levels.
    after = faulty.metrics(bad_round + 1)
    assert after["aq-participants"] == NUM_NODES and after["aq-levels"] == metrics["aq-levels"]
    assert not torch.equal(faulty.models[bad_round + 1], faulty.models[bad_round])
    assert any(
        f"round {bad_round}: 0 accepted, {NUM_NODES} rejected" in r.getMessage()
        and "global model is unchanged" in r.getMessage()
        for r in flower_warnings.records
    )


# --------------------------------------------------------------------------- the size limit


def test_the_payload_limit_defaults_to_the_largest_honest_message() -> None:
    # Prepare: payloads of exactly the default limit and one byte more.
    limit = default_message_limit(NUMEL, None)

    def padded_to(size: int) -> Rewrite:
        return lambda msg, reply: _with_payload(reply, _payload(reply).ljust(size, b"\x00"))

    # Execute
    at_limit = run(AdaQuantLevels(2), mods=[hostile_mod(padded_to(limit), {BAD_CLIENT}),
                                           adaquant_mod])  # fmt: skip
    above = run(AdaQuantLevels(2), mods=[hostile_mod(padded_to(limit + 1), {BAD_CLIENT}),
                                         adaquant_mod])  # fmt: skip

    # Assert: both rejected, but only the larger one for its size (the other does not
    # decode); honest full-precision messages are well below the limit.
    assert at_limit.strategy.server is not None
    assert at_limit.strategy.server.max_message_bytes == limit
    (_, at_reason), = at_limit.strategy.rounds[BAD_ROUND].rejections  # fmt: skip
    (_, above_reason), = above.strategy.rounds[BAD_ROUND].rejections  # fmt: skip
    assert "exceeds the limit" not in at_reason
    assert above_reason == f"payload of {limit + 1} bytes exceeds the limit of {limit}"
    assert len(encode_dense(torch.zeros(NUMEL))) < limit


def test_an_explicit_payload_limit_is_enforced_and_validated() -> None:
    # Prepare: a limit below an honest message's size at the round's levels.
    honest = run(AdaQuantLevels(2))
    sizes = {len(_payload(r)) for r in honest.grid.replies}

    # Execute
    tight = run(AdaQuantLevels(2), max_message_bytes=min(sizes) - 1)

    # Assert: every reply is rejected for its size, in every round; the model never moves,
    # and the run ends with an error that says why.
    assert all(r.participants == 0 for r in tight.strategy.rounds)
    assert tight.error is not None and tight.result is None
    assert f"exceeds the limit of {min(sizes) - 1} ({ROUNDS * NUM_NODES}x)" in str(tight.error)
    assert all(
        reason.endswith(f"exceeds the limit of {min(sizes) - 1}")
        for r in tight.strategy.rounds
        for _, reason in r.rejections
    )
    assert torch.equal(tight.models[ROUNDS], tight.models[0])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_message_bytes"):
            AdaQuantFedAvg(AdaQuantLevels(2), seed=0, max_message_bytes=bad)  # type: ignore[arg-type]
