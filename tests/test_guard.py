"""A hostile client never makes the server raise: ids, n_i, losses, payloads, encodings.

Each case is a reply a client controls. The server must reject it with a
reason or accept it within documented bounds, and the round must go on with
exactly the model the good replies give.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from adaquantfl.compression import QSGDCompressor, TopKCompressor
from adaquantfl.compression.codec import CodecError, encode_dense
from adaquantfl.compression.container import ENCODINGS, build_message
from adaquantfl.fl.client import ClientReply
from adaquantfl.fl.guard import (
    MAX_LOSS,
    MAX_NUM_EXAMPLES,
    MIN_POLICY_LOSS,
    aggregation_weights,
    check_weight_share,
)
from adaquantfl.fl.server import FedServer
from adaquantfl.policy import (
    AdaQuantLevels,
    FixedLevels,
    FullPrecision,
    LevelPlan,
    RoundObservation,
    adaquant_levels,
)

D = 6


def payload(cid: int, levels: int | None = 2, compressor: Any = None) -> bytes:
    compressor = compressor or QSGDCompressor()
    update = torch.linspace(-1, 1, D) * (cid + 1)
    result: bytes = compressor.compress(
        update, levels, generator=torch.Generator().manual_seed(cid)
    )
    return result


def good(cid: int, levels: int | None = 2, loss: float = 1.0, n: int = 5) -> ClientReply:
    return ClientReply(cid, payload(cid, levels), loss, n)


class RecordingPolicy:
    """A policy that keeps every observation (to check what a policy is shown)."""

    def __init__(self, levels: int | None = 2) -> None:
        self.levels = levels
        self.seen: list[RoundObservation] = []

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        return LevelPlan(self.levels)

    def observe(self, observation: RoundObservation) -> None:
        self.seen.append(observation)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass


def reference_params(levels: int | None = 2) -> torch.Tensor:
    """The model after a round with only the good replies 0 and 1."""
    ref = FedServer(torch.zeros(D), FixedLevels(2) if levels else FullPrecision(), QSGDCompressor())
    ref.aggregate([good(0, levels), good(1, levels)])
    return ref.params


# --------------------------------------------------------------------------- n_i


@pytest.mark.parametrize(
    "n",
    [2**64, 2**63 - 1, 10**18, MAX_NUM_EXAMPLES + 1, 0, -3, True, 1.5, float("nan"), "7", None],
    ids=lambda v: repr(v)[:24],
)
def test_an_absurd_num_examples_is_rejected_and_the_round_goes_on(n: Any) -> None:
    server = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    out = server.aggregate([good(0), good(1), ClientReply(2, payload(2), 1.0, n)])
    assert out.participants == 2 and out.rejections[0][0] == 2
    assert "num_examples" in out.rejections[0][1]
    assert torch.equal(server.params, reference_params())


def test_three_clients_at_int64_max_do_not_crash_the_round() -> None:
    # Once, sum(weights) overflowed torch's int64 and raised OverflowError.
    server = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    out = server.aggregate([ClientReply(i, payload(i), 1.0, 2**63 - 1) for i in range(3)])
    assert out.participants == 0 and out.rejected == 3
    assert torch.equal(server.params, torch.zeros(D))


def test_the_largest_accepted_num_examples_weights_exactly() -> None:
    big = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    small = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    big.aggregate([ClientReply(i, payload(i), 1.0, MAX_NUM_EXAMPLES) for i in range(3)])
    small.aggregate([ClientReply(i, payload(i), 1.0, 1) for i in range(3)])
    assert torch.equal(big.params, small.params)  # equal claims: equal weights, exactly


# --------------------------------------------------------------------------- weight share


def test_aggregation_weights_cap_every_share_and_keep_the_rest_proportional() -> None:
    ns = [10**15, 40, 30, 20, 10]
    w = aggregation_weights(ns, 0.4)
    shares = [x / sum(w) for x in w]
    assert shares[0] == pytest.approx(0.4)
    assert shares[1:] == pytest.approx([0.6 * n / 100 for n in ns[1:]])
    # Two large claims share the cap; a cap no claim reaches changes nothing (ints kept).
    w2 = aggregation_weights([1000, 900, 5, 5], 0.3)
    assert [x / sum(w2) for x in w2] == pytest.approx([0.3, 0.3, 0.2, 0.2])
    assert aggregation_weights([3, 3, 4], 0.5) == [3, 3, 4]
    assert aggregation_weights([3, 3, 4], None) == [3, 3, 4]
    # A cap below 1/k cannot hold for k clients: all get the same share.
    assert aggregation_weights([1, 2, 100], 0.2) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="max_weight_share"):
        check_weight_share(0.0)
    with pytest.raises(ValueError, match="max_weight_share"):
        FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor(), max_weight_share=1.5)


def test_weight_share_cap_bounds_one_clients_pull_on_model_and_loss() -> None:
    # Client 2 claims 10**15 examples and sends a huge update and loss.
    replies = [
        ClientReply(0, encode_dense(torch.zeros(D)), 1.0, 10),
        ClientReply(1, encode_dense(torch.zeros(D)), 1.0, 30),
        ClientReply(2, encode_dense(torch.full((D,), 100.0)), 9.0, 10**15),
    ]
    uncapped = FedServer(torch.zeros(D), RecordingPolicy(None), QSGDCompressor())
    out = uncapped.aggregate(replies)
    assert out.train_loss == pytest.approx(9.0) and uncapped.params[0] == pytest.approx(100.0)

    policy = RecordingPolicy(None)
    capped = FedServer(torch.zeros(D), policy, QSGDCompressor(), max_weight_share=0.5)
    out = capped.aggregate(replies)
    assert out.participants == 3
    assert capped.params.tolist() == pytest.approx([50.0] * D)  # 0.5 x 100
    assert out.train_loss == pytest.approx(0.5 * 1.0 + 0.5 * 9.0)
    assert policy.seen[0].train_loss == out.train_loss


class CountingDecoder(QSGDCompressor):
    """QSGD that counts its decodes and fails on the payloads of ``bad`` client ids."""

    def __init__(self, bad: Sequence[int] = (), flaky_after: int | None = None) -> None:
        super().__init__()
        self.bad = {payload(cid) for cid in bad}
        self.flaky_after = flaky_after
        self.calls: list[bytes] = []

    def decompress(self, payload, *, numel, levels, out=None):  # type: ignore[no-untyped-def]
        self.calls.append(payload)
        if payload in self.bad:
            raise CodecError("a malformed body behind a valid frame")
        if self.flaky_after is not None and len(self.calls) > self.flaky_after:
            raise CodecError("different the second time")
        return super().decompress(payload, numel=numel, levels=levels, out=out)


@pytest.mark.parametrize("share", [None, 0.5], ids=["uncapped", "capped"])
def test_each_payload_is_decoded_once(share: float | None) -> None:
    decoder = CountingDecoder()
    server = FedServer(torch.zeros(D), FixedLevels(2), decoder, max_weight_share=share)
    out = server.aggregate([good(0, n=1), good(1, n=1), good(2, n=1000)])
    assert out.participants == 3
    assert sorted(decoder.calls) == sorted(payload(c) for c in range(3))  # once each
    weights = [1, 1, 1000] if share is None else [1, 1, 2]  # 2 = half of the total 4
    updates = [QSGDCompressor().decompress(payload(c), numel=D, levels=2) for c in range(3)]
    expected = sum(w * u.double() for w, u in zip(weights, updates, strict=True)) / sum(weights)
    assert torch.equal(server.params, expected.float())


@pytest.mark.parametrize("share", [None, 0.5], ids=["uncapped", "capped"])
def test_a_payload_that_fails_to_decode_leaves_the_others_weighted_as_without_it(
    share: float | None,
) -> None:
    # Client 3's claim of 1000 examples binds the cap; once its payload fails,
    # the cap binds on client 2 instead, and the others are combined again.
    replies = [good(0, n=1), good(1, n=1), good(2, n=50), good(3, n=1000)]
    decoder = CountingDecoder(bad=[3])
    server = FedServer(torch.zeros(D), FixedLevels(2), decoder, max_weight_share=share)
    out = server.aggregate(replies)
    assert out.participants == 3 and [cid for cid, _ in out.rejections] == [3]
    assert "malformed body" in out.rejections[0][1]
    alone = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor(), max_weight_share=share)
    alone.aggregate(replies[:3])
    assert torch.equal(server.params, alone.params)
    assert decoder.calls.count(payload(3)) == 1
    again = 2 if share is not None else 1  # combined a second time only where the cap moved
    assert all(decoder.calls.count(payload(c)) == again for c in range(3))


def test_a_decoder_that_changes_its_mind_rejects_the_round() -> None:
    # The second combination (after client 3 failed under a binding cap) meets a
    # payload that decoded the first time and no longer does: nothing is trusted.
    decoder = CountingDecoder(bad=[3], flaky_after=4)
    server = FedServer(torch.zeros(D), FixedLevels(2), decoder, max_weight_share=0.5)
    out = server.aggregate([good(0, n=1), good(1, n=1), good(2, n=50), good(3, n=1000)])
    assert out.participants == 0 and out.rejected == 4
    assert "did not decode the same way twice" in out.rejections[-1][1]
    assert torch.equal(server.params, torch.zeros(D))


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize(
    "loss",
    [10**400, float("nan"), float("inf"), -1.0, True, "1.0", None, 1e308, MAX_LOSS * 2],
    ids=lambda v: repr(v)[:24],
)
def test_an_unusable_loss_is_rejected(loss: Any) -> None:
    policy = RecordingPolicy()
    server = FedServer(torch.zeros(D), policy, QSGDCompressor())
    out = server.aggregate([good(0), good(1), ClientReply(2, payload(2), loss, 5)])
    assert out.participants == 2 and "loss" in out.rejections[0][1]
    assert policy.seen[0].train_loss == 1.0


@pytest.mark.parametrize(
    "policy_factory",
    [lambda: AdaQuantLevels(2), lambda: FixedLevels(3), FullPrecision],
    ids=["adaquantfl", "qsgd", "fp32"],
)
@pytest.mark.parametrize(
    "losses",
    [(1.0, 5e-324), (1e308, 1e-10), (MAX_LOSS, 5e-324), (5e-324, 1.0), (1e-300, 1e300)],
    ids=lambda v: repr(v)[:24],
)
def test_a_steered_loss_never_makes_a_policy_overflow(
    policy_factory: Any, losses: tuple[float, float]
) -> None:
    # Once, 5e-324 in round 2 (or 1e308 then 1e-10) raised OverflowError in
    # adaquant_levels. Every round must complete with levels in range.
    policy = policy_factory()
    server = FedServer(torch.zeros(D), policy, QSGDCompressor())
    for loss in losses:
        levels = server.levels
        server.begin_round([0])
        out = server.aggregate([ClientReply(0, payload(0, levels), loss, 5)])
        assert out.participants + out.rejected == 1
        assert server.levels is None or 1 <= server.levels <= 2**16


def test_a_policy_sees_losses_clamped_into_its_safe_range() -> None:
    policy = RecordingPolicy()
    server = FedServer(torch.zeros(D), policy, QSGDCompressor())
    server.aggregate([good(0, loss=1e-300), good(1, loss=0.0)])
    server.aggregate([good(0, loss=MAX_LOSS), good(1, loss=MAX_LOSS)])
    tiny, huge = policy.seen
    assert tiny.train_loss == MIN_POLICY_LOSS
    assert [c.loss for c in tiny.clients] == [MIN_POLICY_LOSS, 0.0]
    assert huge.train_loss == MAX_LOSS
    assert math.isfinite((huge.train_loss / tiny.train_loss) ** 2)


def test_classic_policies_refuse_unusable_losses_themselves() -> None:
    sched = AdaQuantLevels(2)
    assert sched.update(1e308) == 2 and sched.update(1e-10) == 2**16  # clamped, no overflow
    assert AdaQuantLevels(2).update(5e-324) == 2
    for bad in (10**400, 0.0, -1.0, float("nan"), float("inf"), "1.0", True):
        for policy in (AdaQuantLevels(2), FixedLevels(2), FullPrecision()):
            with pytest.raises(ValueError, match="loss"):
                policy.update(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss"):
        adaquant_levels(1.0, 0.0, 2, 1, 16)  # was ZeroDivisionError
    assert adaquant_levels(1e308, 5e-324, 2, 1, 16) == 16


def test_a_policy_that_raises_on_a_round_does_not_stop_it() -> None:
    class Fussy(RecordingPolicy):
        def observe(self, observation: RoundObservation) -> None:
            raise ValueError("cannot use this loss")

    server = FedServer(torch.zeros(D), Fussy(), QSGDCompressor())
    out = server.aggregate([good(0), good(1)])
    assert out.participants == 2 and torch.equal(server.params, reference_params())


# --------------------------------------------------------------------------- client ids


@pytest.mark.parametrize(
    "cid", [None, "a", 2**100, -3, 2**63, [1], 1.0, True], ids=lambda c: repr(c)[:20]
)
def test_an_unusable_client_id_is_rejected_beside_int_ids(cid: Any) -> None:
    # Once, None or a str beside ints raised TypeError in sorted().
    server = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    out = server.aggregate([good(0), ClientReply(cid, payload(2), 1.0, 5), good(1)])
    assert out.participants == 2 and out.rejected == 1
    assert "client_id" in out.rejections[0][1]
    assert torch.equal(server.params, reference_params())


def test_large_valid_client_ids_are_accepted() -> None:
    server = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor(), record_digests=True)
    out = server.aggregate([good(2**63 - 1), good(0)])
    assert out.participants == 2 and [c for c, _ in out.digests] == [0, 2**63 - 1]


# --------------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    "data",
    [None, "text", [1, 2], memoryview(b"abc"), 12, b"", b"\x00" * 10_000_000],
    ids=["None", "str", "list", "memoryview", "int", "empty", "10MB"],
)
def test_an_unusable_payload_is_rejected(data: Any) -> None:
    server = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    out = server.aggregate([good(0), good(1), ClientReply(2, data, 1.0, 5)])
    assert out.participants == 2 and out.rejections[0][0] == 2
    assert torch.equal(server.params, reference_params())


def test_a_decoder_that_crashes_rejects_the_reply() -> None:
    class Broken(QSGDCompressor):
        def _decompress(self, payload, *, numel, levels, out):  # type: ignore[no-untyped-def]
            raise IndexError("bug in a plugin decoder")

    server = FedServer(torch.zeros(D), FixedLevels(2), Broken())
    out = server.aggregate([good(0)])
    assert out.rejected == 1 and "IndexError" in out.rejections[0][1]


# --------------------------------------------------------------------------- encodings


SERVERS = {
    "qsgd-packed": (QSGDCompressor(), 2),
    "qsgd-entropy": (QSGDCompressor("entropy"), 2),
    "topk": (TopKCompressor(0.5), 1),
    "fp32": (QSGDCompressor(), None),
}
MESSAGES = {
    "raw": lambda: encode_dense(torch.linspace(-1, 1, D)),
    "packed": lambda: payload(0, 2),
    "entropy": lambda: payload(0, 2, QSGDCompressor("entropy")),
    "sparse": lambda: payload(0, 1, TopKCompressor(0.5)),
}
ASKS = {"qsgd-packed": "packed", "qsgd-entropy": "entropy", "topk": "sparse", "fp32": "raw"}


@pytest.mark.parametrize("server_kind", list(SERVERS))
@pytest.mark.parametrize("message_kind", list(MESSAGES))
def test_a_reply_in_another_encoding_is_rejected_from_its_header_alone(
    server_kind: str, message_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    compressor, levels = SERVERS[server_kind]
    data = MESSAGES[message_kind]()
    if ASKS[server_kind] == message_kind:
        out = compressor.decompress(data, numel=D, levels=levels)
        assert out.shape == (D,)
        return
    # Reading past the header (the CRC, then the body) would call this.
    import adaquantfl.compression.codec as header

    def no_crc(buf: Any) -> None:
        raise AssertionError("the CRC was read before the encoding was checked")

    monkeypatch.setattr(header, "verify_crc", no_crc)
    with pytest.raises(CodecError, match=message_kind):
        compressor.decompress(data, numel=D, levels=levels)


def test_a_tiny_entropy_message_claiming_a_huge_vector_costs_nothing() -> None:
    # Once, 25 bytes claiming 10**7 entries cost 0.55 s and 114 MiB before rejection.
    numel = 10**7
    norms = np.ones(1, dtype=np.float32)
    message = build_message(ENCODINGS["entropy"], numel, 3, 0, norms, 5, lambda out: None)
    assert len(message) < 32
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="entropy"):
            QSGDCompressor().decompress(message, numel=numel, levels=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
