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
from typing import Any, NamedTuple

import torch

from adaquantfl.compression.codec import CodecError
from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.client import PROBE_BYTES, ClientReply, all_finite
from adaquantfl.fl.downlink import Downlink, RoundPlan
from adaquantfl.fl.guard import (
    aggregation_weights,
    check_weight_share,
    client_id_problem,
    policy_observation,
    probe_levels_problem,
    reply_problem,
)
from adaquantfl.fl.record import RoundRecord, rd_bits_per_coordinate
from adaquantfl.policy import (
    LevelPlan,
    LevelPolicy,
    LevelSchedule,
    RoundObservation,
)
from adaquantfl.policy.classic import as_policy
from adaquantfl.rng import torch_generator
from adaquantfl.validation import check_int

__all__ = ["FedServer", "as_policy", "select_clients", "weighted_mean"]

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


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """``sum_i p_i v_i`` with ``p_i = n_i / sum_j n_j``, in float64."""
    if len(values) != len(weights) or not values:
        raise ValueError("weighted_mean needs equally many values and weights, at least one")
    total = sum(weights)
    return math.fsum(v * (n / total) for v, n in zip(values, weights, strict=True))


#: Entries converted to float64 at a time: a 512 KiB copy, not 8 bytes per entry.
_CHUNK = 2**16


def accumulate64(accum: torch.Tensor, update: torch.Tensor, weight: float) -> None:
    """``accum += weight * update`` in float64, a slice at a time.

    Each entry is the same ``accum + w * x`` as a whole-vector ``add_``
    computes; the float64 copy of ``update`` is one slice, not the vector.
    """
    for start in range(0, accum.numel(), _CHUNK):
        part = update[start : start + _CHUNK].to(torch.float64)
        accum[start : start + _CHUNK].add_(part, alpha=weight)


def mean_into(
    accum: torch.Tensor, total: float, params: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out = params + accum / total`` in float64, rounded to ``out``'s float32.

    ``accum`` is divided in place and ``params`` added a slice at a time: the
    same bits as ``(params.double() + accum / total).float()`` without
    float64 copies of the model.
    """
    accum.div_(total)
    for start in range(0, accum.numel(), _CHUNK):
        accum[start : start + _CHUNK].add_(params[start : start + _CHUNK].to(torch.float64))
    return out.copy_(accum)


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
        Payloads larger than this are rejected unread; by default the
        compressor's largest message for the model (``compressor.max_message_bytes``).
    max_weight_share : float, optional
        Cap on one client's share ``p_i`` of a round's aggregate and loss, in
        ``(0, 1]`` (None, the default: ``p_i = n_i / sum_j n_j`` uncapped).
    record_digests : bool
        Record the SHA-256 of every payload in :attr:`RoundRecord.digests`.
    downlink : Downlink, optional
        How the model reaches the clients; by default raw float32 to each participant.

    Notes
    -----
    A round is :meth:`begin_round` (the levels of each participant and the
    model they receive), then :meth:`aggregate` of their replies. Replies are
    processed in client-id order and the weighted sum is accumulated in
    float64, so the new model does not depend on the order in which replies
    arrived (the Flower engine receives them in any order). A reply that
    cannot be decoded, is at the wrong size, levels or encoding, or reports an
    unusable id, ``n_i`` or loss (:mod:`.guard`), is excluded from both the
    model and the policy, so one bad client never stops a round or corrupts
    the global model.
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
        max_weight_share: float | None = None,
    ) -> None:
        if params.dtype != torch.float32 or params.dim() != 1:
            raise ValueError(
                f"params must be a flat float32 tensor, got {params.dtype} {tuple(params.shape)}"
            )
        if not all_finite(params):
            raise ValueError("initial params contain non-finite values")
        self.params = params.detach().clone()
        self.policy = as_policy(policy)
        self.compressor = compressor
        if max_message_bytes is None:
            max_message_bytes = compressor.max_message_bytes(self.numel)
        self.max_message_bytes = check_int("max_message_bytes", max_message_bytes, 1, 2**63 - 1)
        self.max_weight_share = check_weight_share(max_weight_share)
        self.record_digests = record_digests
        self.downlink = downlink if downlink is not None else Downlink(self.numel)
        self.round_idx = 0  # completed rounds
        self._open: RoundPlan | None = None  # the plan of the open round

    @property
    def numel(self) -> int:
        return int(self.params.numel())

    @property
    def levels(self) -> int | None:
        """The coming round's default levels (None: full precision)."""
        return self.plan().default

    def plan(self, client_ids: Sequence[int] = ()) -> LevelPlan:
        """The levels of the coming round (those of :meth:`begin_round` once it ran)."""
        if self._open is not None and self._open.round_idx == self.round_idx:
            return self._open.levels
        return self.policy.levels_for(self.round_idx, list(client_ids))

    def begin_round(self, client_ids: Sequence[int]) -> RoundPlan:
        """Open the next round for ``client_ids``: fix their levels and send them the model.

        Returns the round's :class:`~adaquantfl.fl.downlink.RoundPlan`: each
        participant's levels, the model they train from (the global model, or
        the downlink replica they all hold) and what sending it costs.
        """
        ids = sorted(int(c) for c in client_ids)
        levels = self.policy.levels_for(self.round_idx, ids)
        self._open = self.downlink.broadcast(self.params, self.round_idx, ids, levels)
        return self._open

    def aggregate(
        self,
        replies: Sequence[ClientReply],
        *,
        expected_levels: Mapping[int, int | None] | None = None,
    ) -> RoundRecord:
        """Apply one round: ``w_{k+1} = w_k + sum_i p_i C(Delta_i)``, then feed the policy.

        Three steps, none of which raises on anything a reply holds:

        1. **Check** each reply's id, payload size, ``n_i``, loss and reported
           measurements (:func:`.guard.reply_problem`); a bad one is rejected
           with a reason.
        2. **Combine** the checked replies: the weights ``p_i = n_i / sum_j
           n_j`` (with ``max_weight_share``, capped: :func:`.guard.aggregation_weights`),
           then each payload decoded once, at the levels its client was asked
           for, and added to a float64 accumulator in client-id order. A
           payload that does not decode is rejected.
        3. **Observe**: the policy is shown ``F(w_k) = sum_i p_i F_i(w_k)``
           and the accepted replies, with losses clamped into the range a
           policy can use (:func:`.guard.policy_observation`). If nothing was
           accepted the model and the policy are left unchanged.

        ``expected_levels`` overrides the round's plan for some client ids
        (the Flower strategy passes the levels it sent each reply's node).

        Returns the round's :class:`~adaquantfl.fl.record.RoundRecord` as the
        server saw it; the engine completes it (evaluation, time, the
        clients that failed or never replied).
        """
        valid = sorted({r.client_id for r in replies if client_id_problem(r.client_id) is None})
        plan = self.plan(valid)
        checked, rejections, digests = self._check(replies, plan, expected_levels)
        accepted, weights, new_params, failed, overflowed = self._combine(checked)
        # Rejections in client-id order, unusable ids (-1) last, as the replies were checked.
        rejections = sorted([*rejections, *failed], key=lambda r: (r[0] < 0, r[0])) + overflowed
        train_loss: float | None = None
        distortion: float | None = None
        if new_params is not None:
            self.params = new_params
            train_loss = weighted_mean([float(c.reply.loss) for c in accepted], weights)
            distortion = _weighted_distortion(accepted, weights)
            if train_loss > 0:
                self._observe(
                    policy_observation(
                        self.round_idx,
                        train_loss,
                        [(c.reply, c.levels, c.wire_bits) for c in accepted],
                    )
                )
            else:
                # A zero loss is a perfect fit; AdaQuantFL's sqrt(F_0 / F) is then
                # undefined, so the levels are kept.
                logger.warning("round %d: weighted loss is 0; levels unchanged", self.round_idx + 1)
        opened = self._open if self._open and self._open.round_idx == self.round_idx else None
        # A reply's probe results travel beside its payload and count as uplink too.
        wire_bits = sum(8 * (_size(r.payload) + _probe_bytes(r.probe)) for r in replies)
        received = sum(isinstance(r.payload, bytes | bytearray) for r in replies)
        self.round_idx += 1
        return RoundRecord(
            round=self.round_idx,
            levels=plan.default,
            participants=len(accepted),
            rejected=len(rejections),
            wire_bits=wire_bits,
            formula_bits=sum(self.compressor.formula_bits(self.numel, c.levels) for c in accepted),
            downlink_bits=0 if opened is None else opened.bits,
            train_loss=train_loss,
            distortion=distortion,
            bits_per_coordinate=wire_bits / (received * self.numel) if received else None,
            rd_bits_per_coordinate=rd_bits_per_coordinate(distortion),
            received=received,
            sent=0 if opened is None else len(opened.clients),
            client_levels=tuple((c.reply.client_id, c.levels) for c in accepted),
            rejections=tuple(rejections),
            digests=tuple(digests),
        )

    def _check(
        self,
        replies: Sequence[ClientReply],
        plan: LevelPlan,
        expected_levels: Mapping[int, int | None] | None,
    ) -> tuple[list[_Checked], list[tuple[int, str]], list[tuple[int, str]]]:
        """Step 1: the replies whose fields are usable, in client-id order, and the rejections.

        Replies with an unusable id are rejected last, under id -1 (the
        streams' "no client"), so that ids always sort and hash. Two replies
        claiming one client id are both rejected: keeping the first would let
        arrival order (a race on Flower) pick the winner.
        """
        valid = [r for r in replies if client_id_problem(r.client_id) is None]
        invalid = [r for r in replies if client_id_problem(r.client_id) is not None]
        counts = Counter(reply.client_id for reply in valid)
        ordered = [(r, int(r.client_id)) for r in sorted(valid, key=lambda r: r.client_id)]
        checked: list[_Checked] = []
        rejections: list[tuple[int, str]] = []
        digests: list[tuple[int, str]] = []
        for reply, cid in [*ordered, *((r, -1) for r in invalid)]:
            size = _size(reply.payload)
            if self.record_digests and size:
                digests.append((cid, hashlib.sha256(reply.payload).hexdigest()))
            levels = plan.levels_of(cid)
            if expected_levels is not None and cid in expected_levels:
                levels = expected_levels[cid]
            reason = self._reply_problem(reply, counts)
            if reason is None and reply.probe:
                reason = probe_levels_problem(reply.probe, plan.probe)
            if reason is not None:
                rejections.append(self._reject(cid, reason))
                continue
            checked.append(_Checked(reply, levels, 8 * size))
        return checked, rejections, digests

    def _combine(self, checked: list[_Checked]) -> tuple[
        list[_Checked],
        list[int] | list[float],
        torch.Tensor | None,
        list[tuple[int, str]],
        list[tuple[int, str]],
    ]:
        """Step 2: the accepted replies, their weights and the new model (None: unchanged).

        Also returns the replies whose payload did not decode, and, when the
        accepted updates together overflow float32, all of them (the model is
        then kept).

        Each payload is decoded once, into one reusable buffer, and added to
        one float64 accumulator: the work needs the model, the accumulator
        and one decoded update, however many replies there are. The weights
        are fixed before decoding, from the checked replies. If a payload
        then fails to decode (only a malformed body with a valid frame
        does), the weights of the others are recomputed without it; where
        the share cap makes them differ, the others are combined again.
        """
        buffer = torch.empty(self.numel, dtype=torch.float32)
        weights = self._weights(checked)
        accum, accepted, failed = self._accumulate(checked, weights, buffer)
        if len(accepted) < len(checked):
            kept = {id(c) for c in accepted}
            used = [w for c, w in zip(checked, weights, strict=True) if id(c) in kept]
            weights = self._weights(accepted)
            if weights != used:
                # Without the failed replies the share cap binds differently.
                accum, _, refailed = self._accumulate(accepted, weights, buffer)
                if refailed:
                    reason = "a payload did not decode the same way twice"
                    logger.warning("round %d: %s; all replies rejected", self.round_idx + 1, reason)
                    return [], [], None, failed, [(c.reply.client_id, reason) for c in accepted]
        if not accepted:
            return [], [], None, failed, []
        # w_{k+1} = w_k + accum / total, in place and a slice at a time: the round
        # needs the model, the float64 accumulator and the decode buffer (which
        # takes the new model), however many replies there are. The same bits
        # as (w_k.double() + accum / total).float().
        new_params = mean_into(accum, float(sum(weights)), self.params, buffer)
        del accum
        if not all_finite(new_params):
            # Each update was finite, but together they overflow float32 (e.g.
            # valid raw values near 3e38): keep the old model and policy.
            reason = "the weighted average of the accepted updates overflows float32"
            logger.warning("round %d: %s; all replies rejected", self.round_idx + 1, reason)
            return [], [], None, failed, [(c.reply.client_id, reason) for c in accepted]
        return accepted, weights, new_params, failed, []

    def _weights(self, checked: Sequence[_Checked]) -> list[int] | list[float]:
        return aggregation_weights(
            [int(c.reply.num_examples) for c in checked], self.max_weight_share
        )

    def _accumulate(
        self, checked: Sequence[_Checked], weights: Sequence[float], buffer: torch.Tensor
    ) -> tuple[torch.Tensor, list[_Checked], list[tuple[int, str]]]:
        """``sum_i w_i C(Delta_i)`` in float64, the replies it holds, and those that failed.

        Each update is added a slice of 2**16 entries at a time, so that its
        float64 copy is 512 KiB, not 8 bytes per entry; each entry is the
        same ``accum + w * x`` as a whole-vector ``add_`` computes.
        """
        accum = torch.zeros(self.numel, dtype=torch.float64)
        kept: list[_Checked] = []
        failed: list[tuple[int, str]] = []
        for item, weight in zip(checked, weights, strict=True):
            update, reason = self._decode(item.reply.payload, item.levels, buffer)
            if update is None:
                failed.append(self._reject(item.reply.client_id, reason))
                continue
            accumulate64(accum, update, float(weight))
            kept.append(item)
        return accum, kept, failed

    def _reject(self, cid: int, reason: str) -> tuple[int, str]:
        logger.warning("round %d: rejected client %s: %s", self.round_idx + 1, cid, reason)
        return cid, reason

    def _observe(self, observation: RoundObservation) -> None:
        """Feed the policy; one that cannot use the round's numbers keeps its levels."""
        try:
            self.policy.observe(observation)
        except (ValueError, ArithmeticError):
            # The losses are clamped (guard.policy_loss), so this is the policy's
            # own limit; the round's model update stands either way.
            logger.exception("round %d: the policy rejected the round", self.round_idx + 1)

    def _reply_problem(self, reply: ClientReply, counts: Counter[int]) -> str | None:
        problem = client_id_problem(reply.client_id)
        if problem is not None:
            return problem
        if counts[reply.client_id] > 1:
            return f"{counts[reply.client_id]} replies claim this client id in the same round"
        return reply_problem(
            reply.payload,
            reply.num_examples,
            reply.loss,
            [("update_norm", reply.update_norm), ("distortion", reply.distortion)],
            max_message_bytes=self.max_message_bytes,
            probe=reply.probe,
        )

    def _decode(
        self, payload: bytes | bytearray, levels: int | None, buffer: torch.Tensor
    ) -> tuple[torch.Tensor | None, str]:
        """The decoded update, or None and the reason it cannot be aggregated."""
        try:
            update = self.compressor.decompress(
                bytes(payload), numel=self.numel, levels=levels, out=buffer
            )
        except CodecError as exc:
            return None, f"undecodable payload: {exc}"
        except Exception as exc:  # a compressor's decoder must not stop the round
            logger.exception("the %s compressor failed on a payload", self.compressor.name)
            return None, f"the decoder failed on the payload: {type(exc).__name__}: {exc}"
        if (
            not isinstance(update, torch.Tensor)
            or update.dtype != torch.float32
            or update.numel() != self.numel
        ):
            return None, "the decoder returned no float32 vector of the model's size"
        if not all_finite(update):
            return None, "decoded update has non-finite values"
        return update, ""

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
        self._open = None


class _Checked(NamedTuple):
    """A reply whose fields passed step 1, the levels its client was asked for, its bits."""

    reply: ClientReply
    levels: int | None
    wire_bits: int


def _size(payload: object) -> int:
    """Bytes of a payload (0 for anything that is not bytes)."""
    return len(payload) if isinstance(payload, bytes | bytearray) else 0


def _probe_bytes(probe: object) -> int:
    """Bytes of a reply's probe results (:data:`~adaquantfl.fl.client.PROBE_BYTES` per level)."""
    return PROBE_BYTES * len(probe) if isinstance(probe, tuple) else 0


def _weighted_distortion(accepted: Sequence[_Checked], weights: Sequence[float]) -> float | None:
    """``sum_i p_i D_i`` over the accepted replies that reported a distortion ``D_i``."""
    reported = [
        (float(c.reply.distortion), w)
        for c, w in zip(accepted, weights, strict=True)
        if c.reply.distortion is not None
    ]
    if not reported:
        return None
    return weighted_mean([d for d, _ in reported], [n for _, n in reported])
