"""The server side of a round: client selection, decoding, weighted aggregation, schedule.

Shared by every engine. The math lives in small pure functions
(:func:`select_clients`, :func:`weighted_mean`); :class:`FedServer` holds the
state that must survive a restart (global model, round counter, schedule).
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

from adaquantfl.compression.codec import CodecError, encode_dense
from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.client import ClientReply, all_finite
from adaquantfl.policy import LevelSchedule
from adaquantfl.rng import torch_generator

__all__ = ["FedServer", "RoundOutcome", "select_clients", "weighted_mean"]

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
        Levels the clients were asked to use (None: full precision).
    participants : int
        Replies that were aggregated.
    rejected : int
        Replies excluded from the aggregate and the schedule (see ``rejections``).
    wire_bits : int
        8 x the bytes of every received payload, accepted or not.
    formula_bits : int
        Paper-style bits of the accepted messages.
    train_loss : float or None
        ``F(w_k)``, the accepted clients' sample-weighted pre-training loss;
        None if no reply was accepted.
    next_levels : int or None
        Levels the schedule chose for the next round.
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


class FedServer:
    """Global model, round counter and level schedule, with weighted aggregation.

    Parameters
    ----------
    params : torch.Tensor
        The initial global model ``w_0`` as a flat float32 vector.
    schedule : LevelSchedule
        Chooses the levels of each round.
    compressor : Compressor
        Decodes the clients' payloads.
    max_message_bytes : int, optional
        Payloads larger than this are rejected unread.
    record_digests : bool
        Record the SHA-256 of every payload in :attr:`RoundOutcome.digests`.

    Notes
    -----
    Replies are processed in client-id order and the weighted sum is
    accumulated in float64, so the new model does not depend on the order in
    which replies arrived (the Flower engine receives them in any order).
    A reply that cannot be decoded, is at the wrong size or levels, or reports
    a non-finite loss, is excluded from both the model and the schedule, so
    one bad client never stops a round or corrupts the global model.
    """

    def __init__(
        self,
        params: torch.Tensor,
        schedule: LevelSchedule,
        compressor: Compressor,
        *,
        max_message_bytes: int | None = None,
        record_digests: bool = False,
    ) -> None:
        if params.dtype != torch.float32 or params.dim() != 1:
            raise ValueError(
                f"params must be a flat float32 tensor, got {params.dtype} {tuple(params.shape)}"
            )
        if not bool(torch.isfinite(params).all()):
            raise ValueError("initial params contain non-finite values")
        self.params = params.detach().clone()
        self.schedule = schedule
        self.compressor = compressor
        self.max_message_bytes = max_message_bytes
        self.record_digests = record_digests
        self.round_idx = 0  # completed rounds

    @property
    def numel(self) -> int:
        return int(self.params.numel())

    @property
    def levels(self) -> int | None:
        """Levels for the coming round (None: full precision)."""
        return self.schedule.levels

    def downlink_payload(self) -> bytes:
        """The global model as the raw float32 message sent to each participant."""
        return encode_dense(self.params)

    def aggregate(self, replies: Sequence[ClientReply]) -> RoundOutcome:
        """Apply one round: ``w_{k+1} = w_k + sum_i p_i Q(Delta_i)``, then update the schedule.

        1. Each reply is checked and decoded; a bad one is rejected with a reason.
        2. ``p_i = n_i / sum_j n_j`` over the accepted replies.
        3. ``F(w_k) = sum_i p_i F_i(w_k)`` goes to the schedule, which returns
           the next round's levels. If nothing was accepted the model and the
           schedule are left unchanged.
        """
        levels = self.levels
        wire_bits = 0
        formula_bits = 0
        accum = torch.zeros(self.numel, dtype=torch.float64)
        buffer = torch.empty(self.numel, dtype=torch.float32)
        losses: list[float] = []
        weights: list[int] = []
        rejections: list[tuple[int, str]] = []
        accepted: list[int] = []
        digests: list[tuple[int, str]] = []
        # Two replies claiming one client id: neither can be trusted, and keeping
        # the first would let arrival order (a race on Flower) pick the winner.
        counts = Counter(reply.client_id for reply in replies)
        for reply in sorted(replies, key=lambda r: r.client_id):
            size = len(reply.payload) if isinstance(reply.payload, bytes | bytearray) else 0
            wire_bits += 8 * size
            if self.record_digests and size:
                digests.append((reply.client_id, hashlib.sha256(reply.payload).hexdigest()))
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
            losses.append(float(reply.loss))
            weights.append(int(reply.num_examples))
            accepted.append(reply.client_id)

        train_loss: float | None = None
        new_params = None
        if weights:
            new_params = (self.params.to(torch.float64) + accum / sum(weights)).to(torch.float32)
            if not all_finite(new_params):
                # Each update was finite, but together they overflow float32 (e.g.
                # valid raw values near 3e38): keep the old model and schedule.
                reason = "the weighted average of the accepted updates overflows float32"
                logger.warning("round %d: %s; all replies rejected", self.round_idx + 1, reason)
                rejections += [(cid, reason) for cid in accepted]
                weights, losses, formula_bits, new_params = [], [], 0, None
        if new_params is not None:
            self.params = new_params
            train_loss = weighted_mean(losses, weights)
            if train_loss > 0:
                self.schedule.update(train_loss)
            else:
                # A zero loss is a perfect fit; AdaQuantFL's sqrt(F_0 / F) is then
                # undefined, so the levels are kept.
                logger.warning("round %d: weighted loss is 0; levels unchanged", self.round_idx + 1)
        self.round_idx += 1
        return RoundOutcome(
            levels=levels,
            participants=len(weights),
            rejected=len(rejections),
            wire_bits=wire_bits,
            formula_bits=formula_bits,
            train_loss=train_loss,
            next_levels=self.levels,
            rejections=tuple(rejections),
            digests=tuple(digests),
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
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run: model, round counter, schedule state."""
        return {
            "params": self.params.clone(),
            "round_idx": self.round_idx,
            "schedule": self.schedule.state_dict(),
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
        self.schedule.load_state_dict(state["schedule"])
        self.params = params.detach().clone()
        self.round_idx = int(state["round_idx"])
