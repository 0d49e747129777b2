"""The server side of a round: client selection, levels, decoding, weighted aggregation.

Shared by every engine. The math lives in small pure functions
(:func:`select_clients`, :func:`weighted_mean`); :class:`FedServer` holds the
state that must survive a restart (global model, round counter, level policy,
downlink replica).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaquantfl.compression.codec import CodecError
from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.client import ClientReply, all_finite
from adaquantfl.fl.downlink import Downlink, DownlinkRound
from adaquantfl.policy import (
    ClientOutcome,
    LevelPlan,
    LevelPolicy,
    LevelSchedule,
    RoundObservation,
    UniformLevels,
)
from adaquantfl.rng import torch_generator

__all__ = ["FedServer", "RoundOutcome", "as_policy", "select_clients", "weighted_mean"]

logger = logging.getLogger(__name__)


def select_clients(
    num_clients: int, clients_per_round: int, *, seed: int, round_idx: int
) -> list[int]:
    """The sorted ids of the clients that take part in round ``round_idx``.

    All clients when ``clients_per_round == num_clients`` (the paper's
    setting); otherwise a uniform sample without replacement from the stream
    (seed, round, "sample").
    """
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round must be in [1, num_clients={num_clients}], got {clients_per_round}"
        )
    if clients_per_round == num_clients:
        return list(range(num_clients))
    gen = torch_generator(seed, purpose="sample", round_idx=round_idx)
    chosen = torch.randperm(num_clients, generator=gen)[:clients_per_round]
    return sorted(int(i) for i in chosen)


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """``sum_i p_i v_i`` with ``p_i = n_i / sum_j n_j``, in float64."""
    if len(values) != len(weights) or not values:
        raise ValueError("weighted_mean needs equally many values and weights, at least one")
    total = sum(weights)
    return math.fsum(v * (n / total) for v, n in zip(values, weights, strict=True))


@dataclass(frozen=True)
class RoundOutcome:
    """What the server observed in one round.

    Attributes
    ----------
    levels : int or None
        The round's default levels (None: full precision); clients of a
        per-client plan may have been asked for others (``client_levels``).
    participants : int
        Replies that were aggregated.
    rejected : int
        Replies excluded from the aggregate and the schedule (see ``rejections``).
    wire_bits : int
        8 x the bytes of every received payload, accepted or not.
    received : int
        Payloads received (the messages ``wire_bits`` counts).
    formula_bits : int
        Paper-style bits of the accepted messages.
    train_loss : float or None
        ``F(w_k)``, the accepted clients' sample-weighted pre-training loss;
        None if no reply was accepted.
    next_levels : int or None
        The policy's default levels for the next round.
    distortion : float or None
        ``sum_i p_i ||C(v_i) - v_i||^2 / ||v_i||^2`` over the accepted replies
        that reported it (the clients compute it); None if none did.
    client_levels : tuple of (client_id, levels)
        The levels each accepted reply was asked for and used.
    rejections : tuple of (client_id, reason)
    digests : tuple of (client_id, sha256 hex)
        SHA-256 of every received payload, in client-id order, when the server
        was built with ``record_digests=True`` (used to check that two engines
        sent the same bytes); empty otherwise.
    """

    levels: int | None
    participants: int
    rejected: int
    wire_bits: int
    formula_bits: int
    train_loss: float | None
    next_levels: int | None
    rejections: tuple[tuple[int, str], ...] = field(default=())
    digests: tuple[tuple[int, str], ...] = field(default=())
    received: int = 0
    distortion: float | None = None
    client_levels: tuple[tuple[int, int | None], ...] = field(default=())


class _ScheduleAsPolicy(UniformLevels):
    """A schedule with only ``levels`` and ``update(loss)``, used as a policy."""

    def __init__(self, schedule: LevelSchedule) -> None:
        self.schedule = schedule

    @property
    def levels(self) -> int | None:
        return self.schedule.levels

    def update(self, loss: float) -> int | None:
        return self.schedule.update(loss)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self.schedule)


def as_policy(policy: LevelPolicy | LevelSchedule) -> LevelPolicy:
    """``policy`` itself, or a schedule (``levels`` / ``update``) adapted to the protocol."""
    if isinstance(policy, LevelPolicy):
        return policy
    if isinstance(policy, LevelSchedule):
        return _ScheduleAsPolicy(policy)
    raise ValueError(
        f"expected a level policy (levels_for, observe) or a schedule (levels, update), "
        f"got {type(policy).__name__}"
    )


class FedServer:
    """Global model, round counter, level policy and downlink, with weighted aggregation.

    Parameters
    ----------
    params : torch.Tensor
        The initial global model ``w_0`` as a flat float32 vector.
    policy : LevelPolicy or LevelSchedule
        Chooses the levels of each client, round by round.
    compressor : Compressor
        Decodes the clients' payloads.
    max_message_bytes : int, optional
        Payloads larger than this are rejected unread.
    record_digests : bool
        Record the SHA-256 of every payload in :attr:`RoundOutcome.digests`.
    downlink : Downlink, optional
        How the model reaches the clients; by default raw float32 to each participant.

    Notes
    -----
    A round is :meth:`begin_round` (the levels of each participant and the
    model they receive), then :meth:`aggregate` of their replies. Replies are
    processed in client-id order and the weighted sum is accumulated in
    float64, so the new model does not depend on the order in which replies
    arrived (the Flower engine receives them in any order). A reply that
    cannot be decoded, is at the wrong size or levels, or reports a
    non-finite loss, is excluded from both the model and the policy, so one
    bad client never stops a round or corrupts the global model.
    """

    def __init__(
        self,
        params: torch.Tensor,
        policy: LevelPolicy | LevelSchedule,
        compressor: Compressor,
        *,
        max_message_bytes: int | None = None,
        record_digests: bool = False,
        downlink: Downlink | None = None,
    ) -> None:
        if params.dtype != torch.float32 or params.dim() != 1:
            raise ValueError(
                f"params must be a flat float32 tensor, got {params.dtype} {tuple(params.shape)}"
            )
        if not bool(torch.isfinite(params).all()):
            raise ValueError("initial params contain non-finite values")
        self.params = params.detach().clone()
        self.policy = as_policy(policy)
        self.compressor = compressor
        self.max_message_bytes = max_message_bytes
        self.record_digests = record_digests
        self.downlink = downlink if downlink is not None else Downlink(self.numel)
        self.round_idx = 0  # completed rounds
        self._plan: tuple[int, LevelPlan] | None = None  # (round, plan) of the open round

    @property
    def schedule(self) -> LevelPolicy:
        """The level policy (the name of DESIGN §7's schedules)."""
        return self.policy

    @property
    def numel(self) -> int:
        return int(self.params.numel())

    @property
    def levels(self) -> int | None:
        """The coming round's default levels (None: full precision)."""
        return self.plan().default

    def plan(self, client_ids: Sequence[int] = ()) -> LevelPlan:
        """The levels of the coming round (the plan of :meth:`begin_round` once it ran)."""
        if self._plan is not None and self._plan[0] == self.round_idx:
            return self._plan[1]
        return self.policy.levels_for(self.round_idx, list(client_ids))

    def begin_round(self, client_ids: Sequence[int]) -> DownlinkRound:
        """Open the next round for ``client_ids``: fix their levels and send them the model.

        Returns the model the participants train from (the global model, or
        the downlink replica they all hold) and what sending it costs.
        """
        ids = sorted(int(c) for c in client_ids)
        self._plan = (self.round_idx, self.policy.levels_for(self.round_idx, ids))
        return self.downlink.broadcast(self.params, self.round_idx, ids)

    def aggregate(
        self,
        replies: Sequence[ClientReply],
        *,
        expected_levels: Mapping[int, int | None] | None = None,
    ) -> RoundOutcome:
        """Apply one round: ``w_{k+1} = w_k + sum_i p_i C(Delta_i)``, then feed the policy.

        1. Each reply is checked against the levels its client was asked for,
           and decoded; a bad one is rejected with a reason.
        2. ``p_i = n_i / sum_j n_j`` over the accepted replies.
        3. The policy observes ``F(w_k) = sum_i p_i F_i(w_k)`` and the accepted
           replies. If nothing was accepted the model and the policy are left
           unchanged.

        ``expected_levels`` overrides the round's plan for some client ids
        (the Flower strategy passes the levels it sent each reply's node).
        """
        plan = self.plan(sorted({r.client_id for r in replies if isinstance(r.client_id, int)}))
        wire_bits = 0
        formula_bits = 0
        accum = torch.zeros(self.numel, dtype=torch.float64)
        buffer = torch.empty(self.numel, dtype=torch.float32)
        rejections: list[tuple[int, str]] = []
        accepted: list[tuple[ClientReply, int | None, int]] = []  # reply, levels, wire bits
        digests: list[tuple[int, str]] = []
        # Two replies claiming one client id: neither can be trusted, and keeping
        # the first would let arrival order (a race on Flower) pick the winner.
        counts = Counter(reply.client_id for reply in replies)
        for reply in sorted(replies, key=lambda r: r.client_id):
            size = len(reply.payload) if isinstance(reply.payload, bytes | bytearray) else 0
            wire_bits += 8 * size
            if self.record_digests and size:
                digests.append((reply.client_id, hashlib.sha256(reply.payload).hexdigest()))
            levels = plan.levels_of(reply.client_id)
            if expected_levels is not None and reply.client_id in expected_levels:
                levels = expected_levels[reply.client_id]
            reason = self._check_reply(reply, counts)
            if reason is None:
                try:
                    update = self.compressor.decompress(
                        bytes(reply.payload), numel=self.numel, levels=levels, out=buffer
                    )
                    if not all_finite(update):
                        reason = "decoded update has non-finite values"
                except CodecError as exc:
                    reason = f"undecodable payload: {exc}"
            if reason is not None:
                logger.warning(
                    "round %d: rejected client %s: %s", self.round_idx + 1, reply.client_id, reason
                )
                rejections.append((reply.client_id, reason))
                continue
            accum.add_(update.to(torch.float64), alpha=float(reply.num_examples))
            formula_bits += self.compressor.formula_bits(self.numel, levels)
            accepted.append((reply, levels, 8 * size))

        weights = [int(r.num_examples) for r, _, _ in accepted]
        new_params = None
        if weights:
            new_params = (self.params.to(torch.float64) + accum / sum(weights)).to(torch.float32)
            if not all_finite(new_params):
                # Each update was finite, but together they overflow float32 (e.g.
                # valid raw values near 3e38): keep the old model and policy.
                reason = "the weighted average of the accepted updates overflows float32"
                logger.warning("round %d: %s; all replies rejected", self.round_idx + 1, reason)
                rejections += [(r.client_id, reason) for r, _, _ in accepted]
                accepted, weights, formula_bits, new_params = [], [], 0, None
        train_loss: float | None = None
        distortion: float | None = None
        if new_params is not None:
            self.params = new_params
            train_loss = weighted_mean([float(r.loss) for r, _, _ in accepted], weights)
            distortion = _weighted_distortion(accepted)
            if train_loss > 0:
                self.policy.observe(_observation(self.round_idx, train_loss, accepted))
            else:
                # A zero loss is a perfect fit; AdaQuantFL's sqrt(F_0 / F) is then
                # undefined, so the levels are kept.
                logger.warning("round %d: weighted loss is 0; levels unchanged", self.round_idx + 1)
        self.round_idx += 1
        return RoundOutcome(
            levels=plan.default,
            participants=len(accepted),
            rejected=len(rejections),
            wire_bits=wire_bits,
            formula_bits=formula_bits,
            train_loss=train_loss,
            next_levels=self.levels,
            rejections=tuple(rejections),
            digests=tuple(digests),
            received=sum(isinstance(r.payload, bytes | bytearray) for r in replies),
            distortion=distortion,
            client_levels=tuple((r.client_id, lv) for r, lv, _ in accepted),
        )

    def _check_reply(self, reply: ClientReply, counts: Counter[int]) -> str | None:
        if counts[reply.client_id] > 1:
            return f"{counts[reply.client_id]} replies claim this client id in the same round"
        if not isinstance(reply.payload, bytes | bytearray):
            return f"payload must be bytes, got {type(reply.payload).__name__}"
        if self.max_message_bytes is not None and len(reply.payload) > self.max_message_bytes:
            limit = self.max_message_bytes
            return f"payload of {len(reply.payload)} bytes exceeds the limit of {limit}"
        n = reply.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return f"num_examples must be a positive integer, got {n!r}"
        loss = reply.loss
        if (
            isinstance(loss, bool)
            or not isinstance(loss, int | float)
            or not math.isfinite(loss)
            or loss < 0
        ):
            return f"loss must be finite and non-negative, got {loss!r}"
        for name in ("update_norm", "distortion"):
            value = getattr(reply, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                return f"{name} must be finite and non-negative, got {value!r}"
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: model, round counter, policy and downlink."""
        return {
            "params": self.params.clone(),
            "round_idx": self.round_idx,
            "schedule": self.policy.state_dict(),
            "downlink": self.downlink.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = state["params"]
        if (
            not isinstance(params, torch.Tensor)
            or params.shape != self.params.shape
            or params.dtype != torch.float32
        ):
            raise ValueError(
                f"checkpoint params must be float32 of shape {tuple(self.params.shape)}"
            )
        self.policy.load_state_dict(state["schedule"])
        if "downlink" in state:
            self.downlink.load_state_dict(state["downlink"])
        self.params = params.detach().clone()
        self.round_idx = int(state["round_idx"])
        self._plan = None


def _observation(
    round_idx: int, train_loss: float, accepted: Sequence[tuple[ClientReply, int | None, int]]
) -> RoundObservation:
    return RoundObservation(
        round_idx=round_idx,
        train_loss=train_loss,
        clients=tuple(
            ClientOutcome(
                client_id=r.client_id,
                num_examples=int(r.num_examples),
                loss=float(r.loss),
                levels=levels,
                wire_bits=bits,
                update_norm=None if r.update_norm is None else float(r.update_norm),
                distortion=None if r.distortion is None else float(r.distortion),
            )
            for r, levels, bits in accepted
        ),
    )


def _weighted_distortion(
    accepted: Sequence[tuple[ClientReply, int | None, int]],
) -> float | None:
    """``sum_i p_i D_i`` over the accepted replies that reported a distortion ``D_i``."""
    reported = [
        (float(r.distortion), int(r.num_examples))
        for r, _, _ in accepted
        if r.distortion is not None
    ]
    if not reported:
        return None
    return weighted_mean([d for d, _ in reported], [n for _, n in reported])
