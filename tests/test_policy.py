"""The level-policy protocol at the server: plans per client, checks per client, observations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from adaquantfl.compression import QSGDCompressor
from adaquantfl.compression.feedback import ClientCompressor
from adaquantfl.fl.client import ClientReply, compress_update
from adaquantfl.fl.server import FedServer, as_policy
from adaquantfl.policy import (
    POLICIES,
    AdaQuantLevels,
    FixedLevels,
    LevelPlan,
    LevelPolicy,
    RoundObservation,
    make_policy,
)

D = 64


class Recorder:
    """Gives client c levels 1 + c (others 5) and keeps what it observes."""

    def __init__(self) -> None:
        self.seen: list[RoundObservation] = []
        self.asked: list[tuple[int, tuple[int, ...]]] = []

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan:
        self.asked.append((round_idx, tuple(client_ids)))
        return LevelPlan(5, {c: 1 + c for c in client_ids})

    def observe(self, observation: RoundObservation) -> None:
        self.seen.append(observation)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def reply(cid: int, levels: int | None, *, loss: float = 1.0, n: int = 10) -> ClientReply:
    update = torch.randn(D, generator=torch.Generator().manual_seed(cid))
    encoded = compress_update(
        update,
        levels=levels,
        compressor=ClientCompressor(QSGDCompressor()),
        seed=0,
        round_idx=0,
        client_id=cid,
    )
    return ClientReply(cid, encoded.payload, loss, n, encoded.update_norm, encoded.distortion)


def test_level_plan_gives_each_client_its_levels() -> None:
    plan = LevelPlan(3, {1: 7, 2: None})
    assert [plan.levels_of(c) for c in (0, 1, 2)] == [3, 7, None]
    assert dict(plan) == {1: 7, 2: None} and LevelPlan(3).levels_of(9) == 3
    for bad in (0, -1, 2**24, 1.5, True):
        with pytest.raises(ValueError, match="levels"):
            LevelPlan(bad)  # type: ignore[arg-type]


def test_the_server_checks_each_reply_against_its_own_clients_levels() -> None:
    policy = Recorder()
    server = FedServer(torch.zeros(D), policy, QSGDCompressor())
    server.begin_round([0, 1, 2])
    assert policy.asked == [(0, (0, 1, 2))]
    out = server.aggregate([reply(0, 1), reply(1, 2), reply(2, 1), reply(7, 5)])
    # Client 2 was asked for 3 levels and sent 1; client 7 was not in the plan: default 5.
    assert out.participants == 3 and [c for c, _ in out.rejections] == [2]
    assert "levels 1; expected 3" in out.rejections[0][1]
    assert out.client_levels == ((0, 1), (1, 2), (7, 5))
    assert out.levels == 5  # the plan's default


def test_the_policy_observes_the_accepted_replies_with_their_measurements() -> None:
    policy = Recorder()
    server = FedServer(torch.zeros(D), policy, QSGDCompressor())
    server.begin_round([0, 1])
    replies = [reply(0, 1, loss=2.0, n=1), reply(1, 2, loss=1.0, n=3), reply(2, 9)]
    out = server.aggregate(replies)
    (obs,) = policy.seen
    assert obs.round_idx == 0 and obs.train_loss == pytest.approx((2.0 + 3 * 1.0) / 4)
    assert [c.client_id for c in obs.clients] == [0, 1]
    for seen, sent in zip(obs.clients, replies, strict=False):
        assert (seen.num_examples, seen.loss) == (sent.num_examples, sent.loss)
        assert seen.wire_bits == 8 * len(sent.payload)
        assert seen.update_norm == sent.update_norm and seen.distortion == sent.distortion
    assert out.distortion == pytest.approx(
        (replies[0].distortion + 3 * replies[1].distortion) / 4  # type: ignore[operator]
    )


def test_nothing_accepted_nothing_observed() -> None:
    policy = Recorder()
    server = FedServer(torch.zeros(D), policy, QSGDCompressor())
    server.begin_round([0])
    out = server.aggregate([reply(0, 3)])  # asked for 1
    assert (
        out.participants == 0 and policy.seen == [] and torch.equal(server.params, torch.zeros(D))
    )


def test_expected_levels_override_the_plan() -> None:
    # The Flower strategy checks a reply against what it sent that reply's node.
    server = FedServer(torch.zeros(D), Recorder(), QSGDCompressor())
    server.begin_round([0])
    out = server.aggregate([reply(0, 4)], expected_levels={0: 4})
    assert out.participants == 1 and out.client_levels == ((0, 4),)


@pytest.mark.parametrize("measure", ["update_norm", "distortion"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_bad_measurements_are_rejected(measure: str, value: float) -> None:
    server = FedServer(torch.zeros(D), FixedLevels(2), QSGDCompressor())
    good = reply(0, 2)
    bad = ClientReply(1, reply(1, 2).payload, 1.0, 10, **{"update_norm": 1.0, "distortion": 0.1,
                                                            measure: value})  # fmt: skip
    out = server.aggregate([good, bad])
    assert out.participants == 1 and measure in out.rejections[0][1]


def test_a_schedule_with_only_levels_and_update_is_a_policy() -> None:
    class Halving:
        levels = 8

        def update(self, loss: float) -> int:
            self.levels = max(1, self.levels // 2)
            return self.levels

        def state_dict(self) -> dict[str, Any]:
            return {"levels": self.levels}

        def load_state_dict(self, state: Mapping[str, Any]) -> None:
            self.levels = state["levels"]

    policy = as_policy(Halving())
    assert isinstance(policy, LevelPolicy)
    assert policy.levels_for(0, [3]).levels_of(3) == 8
    server = FedServer(torch.zeros(D), Halving(), QSGDCompressor())
    server.aggregate([reply(0, 8)])
    assert server.levels == 4
    with pytest.raises(ValueError, match="expected a level policy"):
        as_policy(object())  # type: ignore[arg-type]


def test_classic_policies_keep_their_schedule_interface() -> None:
    ada = make_policy("adaquantfl", levels=2, options={})
    assert isinstance(ada, AdaQuantLevels) and set(POLICIES) >= {"fp32", "qsgd", "adaquantfl"}
    ada.observe(RoundObservation(0, 4.0))
    ada.observe(RoundObservation(1, 1.0))
    assert ada.levels == 4 and ada.levels_for(2, [0, 9]) == LevelPlan(4)
    with pytest.raises(ValueError, match="takes no policy options"):
        make_policy("qsgd", levels=2, options={"round_levels": "pow2m1"})


def test_adaquantfl_clamps_instead_of_overflowing() -> None:
    ada = AdaQuantLevels(2, max_levels=1000)
    ada.update(1e308)
    assert ada.update(5e-324) == 1000  # sqrt(F_0 / F) overflows: the clamp's value
