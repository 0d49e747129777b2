"""The level-policy protocol: a policy observes each round and chooses the next round's levels.

Every round the server asks its policy for a :class:`LevelPlan` (the levels of
each participating client; one value for all, or one per client), checks
every reply against the levels it asked that client for, and hands the policy
a :class:`RoundObservation` of what happened: ``F(w_k)`` and, per accepted
participant, its id, ``n_i``, loss, levels, wire bits, update norm and
quantization distortion. ``None`` levels mean full precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.validation import check_int, check_real

__all__ = [
    "ClientOutcome",
    "LevelPlan",
    "LevelPolicy",
    "RoundObservation",
    "check_loss",
    "rounded_levels",
]

#: How a policy may round the levels its rule gives: ``"none"`` (as the rule
#: says) or ``"pow2m1"`` (up to the next ``2^k - 1``: under the packed encoding
#: an index costs ``ceil(log2(s + 1))`` bits, so s = 2^k - 1 levels cost what
#: any s above 2^(k-1) - 1 costs, and the extra levels are free).
ROUNDINGS: tuple[str, ...] = ("none", "pow2m1")


@dataclass(frozen=True)
class ClientOutcome:
    """One accepted participant of a round, as the server saw it.

    Attributes
    ----------
    client_id : int
    num_examples : int
        ``n_i``, the client's aggregation weight.
    loss : float
        ``F_i(w_k)``: the client's loss on the model it received, before training.
    levels : int or None
        The levels the client was asked for and used (None: full precision).
    wire_bits : int
        8 x the bytes of the client's message.
    update_norm : float or None
        ``||v||_2`` of the vector the client compressed (its update, plus its
        error-feedback residual when that is on), as the client reported it.
    distortion : float or None
        ``||C(v) - v||^2 / ||v||^2`` of that vector, as the client reported it.
    probe : tuple of (levels, bits, cost)
        What the client measured of the levels the plan asked it to probe
        (:func:`adaquantfl.fl.client.probe_noise`): a message's bits at those
        levels, and the loss the aggregate's share of their noise would add.
    """

    client_id: int
    num_examples: int
    loss: float
    levels: int | None
    wire_bits: int
    update_norm: float | None = None
    distortion: float | None = None
    probe: tuple[tuple[int, float, float], ...] = ()


@dataclass(frozen=True)
class RoundObservation:
    """What a policy observes after round ``round_idx``.

    Attributes
    ----------
    round_idx : int
        0-based index of the round that just ended.
    train_loss : float
        ``F(w_k) = sum_i p_i F_i(w_k)`` over the accepted participants (> 0).
    clients : tuple of ClientOutcome
        The accepted participants, in client-id order.
    """

    round_idx: int
    train_loss: float
    clients: tuple[ClientOutcome, ...] = field(default=())


class LevelPlan(Mapping[int, "int | None"]):
    """The levels of one round: a default, and optionally other levels for some clients.

    ``plan.levels_of(cid)`` is the levels client ``cid`` must use; as a
    mapping, the plan holds only the clients with their own levels.

    ``probe`` asks the clients to measure, on their own data, what the noise
    of other levels would cost (:func:`adaquantfl.fl.client.probe_noise`):
    the levels to measure, and ``probe_scale``, the share of a client's own
    noise the aggregate carries (about ``1 / sqrt(clients)``). Empty: no probe.
    """

    __slots__ = ("_per_client", "default", "probe", "probe_scale")

    def __init__(
        self,
        default: int | None,
        per_client: Mapping[int, int | None] | None = None,
        *,
        probe: Sequence[int] = (),
        probe_scale: float = 1.0,
    ) -> None:
        self.default = _check_levels(default, "levels")
        self._per_client = {
            int(cid): _check_levels(value, f"levels of client {cid}")
            for cid, value in (per_client or {}).items()
        }
        self.probe = tuple(check_int("probe levels", v, 1, MAX_LEVELS) for v in probe)
        self.probe_scale = check_real("probe_scale", probe_scale, 0.0, 1.0, low_open=True)

    def levels_of(self, client_id: int) -> int | None:
        return self._per_client.get(client_id, self.default)

    def __getitem__(self, client_id: int) -> int | None:
        return self._per_client[client_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._per_client)

    def __len__(self) -> int:
        return len(self._per_client)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LevelPlan):
            return NotImplemented
        return (
            self.default == other.default
            and self._per_client == other._per_client
            and self.probe == other.probe
            and self.probe_scale == other.probe_scale
        )

    def __hash__(self) -> int:
        return hash((self.default, tuple(sorted(self._per_client.items())), self.probe))

    def __repr__(self) -> str:
        extra = f", {self._per_client}" if self._per_client else ""
        probe = f", probe={self.probe}, probe_scale={self.probe_scale:g}" if self.probe else ""
        return f"LevelPlan({self.default}{extra}{probe})"


@runtime_checkable
class LevelPolicy(Protocol):
    """What the server needs from a level policy.

    ``levels_for`` must not change the policy's state (the server and the
    Flower strategy may ask more than once); only ``observe`` does.
    """

    def levels_for(self, round_idx: int, client_ids: Sequence[int]) -> LevelPlan: ...

    def observe(self, observation: RoundObservation) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _check_levels(value: object, name: str) -> int | None:
    if value is None:
        return None
    return check_int(name, value, 1, MAX_LEVELS)


def rounded_levels(levels: int, mode: str, max_levels: int) -> int:
    """``levels`` rounded by ``mode`` (see :data:`ROUNDINGS`), at most ``max_levels``.

    ``"pow2m1"``: the smallest ``2^k - 1 >= levels`` (1 -> 1, 2 -> 3, 4 -> 7,
    8 -> 15), or ``max_levels`` when that is smaller.
    """
    if mode == "none":
        return levels
    if mode != "pow2m1":
        raise ValueError(f"round_levels must be one of {list(ROUNDINGS)}, got {mode!r}")
    return min(max_levels, (1 << int(levels).bit_length()) - 1)


def check_loss(loss: float) -> float:
    """``loss`` as a finite positive float, or a ValueError naming it."""
    if isinstance(loss, bool | str | bytes):
        raise ValueError(f"loss must be a real number, got {loss!r}")
    try:
        value = float(loss)  # also accepts NumPy and 0-d torch scalars
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"loss must be a real number, got {loss!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"loss must be finite and positive, got {value!r}")
    return value
