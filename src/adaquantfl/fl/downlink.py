"""What the server sends the participants of a round: their levels and the model.

A round opens with a :class:`RoundPlan`: the levels of every participant (the
policy's :class:`~adaquantfl.policy.LevelPlan`) and the model they train from,
with what sending it costs. The model travels as raw float32, or as a
compressed change.

Without a downlink compressor every participant receives ``w_k`` as a raw
float32 message (the paper's setting); its size has a closed form, so nothing
is serialised to count it.

With one, server and clients share a reconstructed model ``x_k``:

1. round 0 sends ``x_0 = w_0`` in full (raw float32);
2. round ``k`` compresses the change ``w_k - x_{k-1}`` into one message
   ``m_k`` (noise stream: seed, round, "downlink") and sets
   ``x_k = x_{k-1} + C(w_k - x_{k-1})`` with :func:`apply_change`, which a
   client runs on the same bytes to reach the same bits;
3. the participants train from ``x_k``, and the server still aggregates
   into ``w_{k+1} = w_k + sum_i p_i C(Delta_i)``, so what the downlink
   loses in one round is part of the next round's change (it is error
   feedback on the server side, so an unbiased compressor is scaled by
   ``1 / (1 + omega)`` to contract, as in :mod:`adaquantfl.compression.feedback`).

A client that took part in the previous round receives ``m_k``. One that
missed rounds receives every message since it last took part, or the full
``x_k`` when that is smaller or the messages are no longer kept; it is
charged for what it receives. ``downlink_bits`` is 8 x those bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaquantfl.compression.codec import encode_dense, message_bytes
from adaquantfl.compression.compressor import Compressor
from adaquantfl.compression.feedback import feedback_scale
from adaquantfl.policy.base import LevelPlan
from adaquantfl.rng import torch_generator

__all__ = ["Downlink", "RoundPlan", "apply_change"]


def apply_change(
    replica: torch.Tensor,
    payload: bytes,
    compressor: Compressor,
    levels: int | None,
    *,
    in_place: bool = False,
) -> torch.Tensor:
    """``x_k = x_{k-1} + a C(change)``: what server and clients both compute from ``m_k``.

    ``a`` is :func:`~adaquantfl.compression.feedback.feedback_scale`: 1 for a
    contracting compressor, ``1 / (1 + omega)`` for an unbiased one, so that
    the replica's error does not grow (see the module docstring).
    ``in_place``: ``x_k`` is written over ``replica`` (the same bits; at
    model scale this saves a vector of the model's size).
    """
    change = compressor.decompress(payload, numel=replica.numel(), levels=levels)
    scale = feedback_scale(compressor, replica.numel(), levels)
    change = change if scale == 1.0 else change.mul_(scale)
    return replica.add_(change) if in_place else replica + change


@dataclass(frozen=True)
class RoundPlan:
    """What the participants of a round receive: their levels, and the model.

    Attributes
    ----------
    round_idx : int
        0-based index of the round.
    clients : tuple of int
        The participants' ids, sorted.
    levels : LevelPlan
        The levels each participant must use (``levels.levels_of(client_id)``).
    model : torch.Tensor
        The flat float32 model every participant trains from.
    bits : int
        8 x the bytes sent to all participants together.
    payload : bytes or None
        This round's compressed change ``m_k`` (None without compression, and in round 0).
    catch_up : dict of client id -> list of bytes
        Participants that missed rounds and receive the messages since
        they last took part (this round's included), oldest first.
    full : tuple of int
        Participants that receive the whole model as raw float32.
    """

    round_idx: int
    clients: tuple[int, ...]
    levels: LevelPlan
    model: torch.Tensor
    bits: int
    payload: bytes | None = None
    catch_up: Mapping[int, list[bytes]] = field(default_factory=dict)
    full: tuple[int, ...] = ()


class Downlink:
    """The server's side of the downlink, with what it must remember between rounds.

    Parameters
    ----------
    numel : int
        Entries of the model.
    compressor : Compressor, optional
        Compresses the change of the model; None sends raw float32 (the paper).
    levels : int, optional
        Levels of that compressor (None: a raw float32 change).
    seed : int
        Run seed of the "downlink" noise stream.
    """

    def __init__(
        self,
        numel: int,
        compressor: Compressor | None = None,
        levels: int | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self.numel = int(numel)
        self.compressor = compressor
        self.levels = levels
        self.seed = seed
        #: Bytes of the whole model as a raw float32 message.
        self.full_bytes = message_bytes(self.numel, None)
        self.replica: torch.Tensor | None = None
        self.synced: dict[int, int] = {}  # client id -> last round it received
        # (round, message) of the latest rounds, at most full_bytes in all: an
        # older message is never worth replaying instead of the full model.
        self._history: deque[tuple[int, bytes]] = deque()

    @property
    def compressed(self) -> bool:
        return self.compressor is not None

    def broadcast(
        self, params: torch.Tensor, round_idx: int, client_ids: Sequence[int], levels: LevelPlan
    ) -> RoundPlan:
        """Send round ``round_idx``'s model to ``client_ids`` (see the module docstring)."""
        clients = tuple(client_ids)
        if self.compressor is None:
            bits = 8 * self.full_bytes * len(clients)
            return RoundPlan(round_idx, clients, levels, model=params, bits=bits)
        if self.replica is None:
            self.replica = params.detach().clone()
            self._mark(client_ids, round_idx)
            return RoundPlan(
                round_idx,
                clients,
                levels,
                model=self.replica,
                bits=8 * self.full_bytes * len(clients),
                full=clients,
            )
        generator = torch_generator(self.seed, purpose="downlink", round_idx=round_idx)
        payload = self.compressor.compress(params - self.replica, self.levels, generator=generator)
        self.replica = apply_change(self.replica, payload, self.compressor, self.levels)
        self._remember(round_idx, payload)
        total = 0
        full: list[int] = []
        catch_up: dict[int, list[bytes]] = {}
        for cid in client_ids:
            messages = self._since(self.synced.get(cid), round_idx)
            if messages is None:
                full.append(cid)
                total += self.full_bytes
            else:
                if len(messages) > 1:
                    catch_up[cid] = messages
                total += sum(len(m) for m in messages)
        self._mark(client_ids, round_idx)
        return RoundPlan(
            round_idx,
            clients,
            levels,
            model=self.replica,
            bits=8 * total,
            payload=payload,
            catch_up=catch_up,
            full=tuple(full),
        )

    def full_model(self) -> bytes:
        """The replica as a raw float32 message (for a client that catches up in full)."""
        if self.replica is None:
            raise ValueError("nothing was sent yet")
        return encode_dense(self.replica)

    def _since(self, last: int | None, round_idx: int) -> list[bytes] | None:
        """Messages of rounds ``last + 1 .. round_idx``, or None if the full model is cheaper."""
        if last is None:
            return None
        messages = [m for r, m in self._history if r > last]
        first = round_idx - len(messages) + 1
        if first != last + 1 or sum(len(m) for m in messages) >= self.full_bytes:
            return None
        return messages

    def _remember(self, round_idx: int, payload: bytes) -> None:
        self._history.append((round_idx, payload))
        while sum(len(m) for _, m in self._history) > self.full_bytes:
            self._history.popleft()

    def _mark(self, client_ids: Sequence[int], round_idx: int) -> None:
        for cid in client_ids:
            self.synced[int(cid)] = round_idx

    def state_dict(self) -> dict[str, Any]:
        return {
            "replica": None if self.replica is None else self.replica.clone(),
            "synced": dict(self.synced),
            "history": [
                (r, torch.frombuffer(bytearray(m), dtype=torch.uint8)) for r, m in self._history
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"replica", "synced", "history"}:
            raise ValueError(
                f"Downlink state must have keys replica, synced, history; got {sorted(state)}"
            )
        replica = state["replica"]
        if replica is not None and (
            not isinstance(replica, torch.Tensor)
            or replica.dtype != torch.float32
            or replica.shape != (self.numel,)
        ):
            raise ValueError(f"the downlink replica must be float32 of shape ({self.numel},)")
        self.replica = None if replica is None else replica.clone()
        self.synced = {int(k): int(v) for k, v in state["synced"].items()}
        self._history = deque((int(r), bytes(t.numpy().tobytes())) for r, t in state["history"])
