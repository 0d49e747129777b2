"""What the server accepts from a client, and the bounds that protect the aggregate and the policy.

A reply comes from a machine the server does not control, so every field is
checked before it is used, and nothing in it may make the server raise.
The pure helpers here are what :class:`~adaquantfl.fl.server.FedServer`
applies to each reply:

- :func:`reply_problem`: the reason a reply's id, payload, ``n_i``, loss or
  measurements are unusable (None if they are usable);
- :func:`aggregation_weights`: the weights ``n_i`` of the accepted replies,
  with an optional cap on one client's share;
- :func:`policy_loss`: a loss clamped into the range every policy can use, and
  :func:`policy_observation`, what a policy is shown of a round.

Notes
-----
``n_i`` is bounded by :data:`MAX_NUM_EXAMPLES` = 2**53, the largest count that
float64 represents exactly, so that the weighted sum ``sum_i n_i v_i`` uses
exact weights (a larger claim is rejected: no data set has 9e15 examples on
one client). Losses are bounded by :data:`MAX_LOSS` = 2**64 (a cross-entropy
that large means local training diverged), and a policy sees losses of at
least :data:`MIN_POLICY_LOSS` = 2**-64, so a ratio of two losses stays within
2**128 and its square root, square or product with any level count is finite.
"""

from __future__ import annotations

from collections.abc import Sequence

from adaquantfl.fl.client import ClientReply
from adaquantfl.policy.base import ClientOutcome, RoundObservation
from adaquantfl.validation import as_int, as_real

__all__ = [
    "MAX_CLIENT_ID",
    "MAX_LOSS",
    "MAX_MEASUREMENT",
    "MAX_NUM_EXAMPLES",
    "MAX_PROBES",
    "MIN_POLICY_LOSS",
    "aggregation_weights",
    "check_weight_share",
    "client_id_problem",
    "policy_loss",
    "policy_observation",
    "probe_levels_problem",
    "probe_problem",
    "reply_problem",
]

#: Client ids are the non-negative int64 values the random streams and Flower carry.
MAX_CLIENT_ID = 2**63 - 1
#: The largest ``n_i`` accepted: 2**53, the largest integer float64 holds exactly.
MAX_NUM_EXAMPLES = 2**53
#: The largest loss a reply may report (larger: local training diverged).
MAX_LOSS = 2.0**64
#: The largest update norm or distortion a reply may report (an honest one is far smaller).
MAX_MEASUREMENT = 2.0**256
#: The smallest positive loss a policy is shown; smaller positive losses are raised to it.
MIN_POLICY_LOSS = 2.0**-64
#: The most levels one reply may report probe results for.
MAX_PROBES = 16


def client_id_problem(client_id: object) -> str | None:
    """Why ``client_id`` is not an acceptable id (None if it is)."""
    cid = as_int(client_id) if isinstance(client_id, int) else None
    if cid is None:
        return f"client_id must be an integer, got {type(client_id).__name__} {client_id!r:.60}"
    if not 0 <= cid <= MAX_CLIENT_ID:
        return f"client_id must be in [0, 2**63 - 1], got {client_id}"
    return None


def reply_problem(
    payload: object,
    num_examples: object,
    loss: object,
    measurements: Sequence[tuple[str, object]],
    *,
    max_message_bytes: int | None,
    probe: object = (),
) -> str | None:
    """Why a reply with these fields cannot be aggregated (None if it can).

    Parameters
    ----------
    payload : object
        Must be ``bytes`` or ``bytearray`` of at most ``max_message_bytes``.
    num_examples : object
        ``n_i``: an int in ``[1, MAX_NUM_EXAMPLES]`` (bool is not an int here).
    loss : object
        ``F_i(w_k)``: a real number in ``[0, MAX_LOSS]``.
    measurements : sequence of (name, value)
        Optional reported figures (update norm, distortion): None, or finite
        and non-negative.
    """
    if not isinstance(payload, bytes | bytearray):
        return f"payload must be bytes, got {type(payload).__name__}"
    if max_message_bytes is not None and len(payload) > max_message_bytes:
        return f"payload of {len(payload)} bytes exceeds the limit of {max_message_bytes}"
    n = as_int(num_examples) if isinstance(num_examples, int) else None
    if n is None or n < 1:
        return f"num_examples must be a positive integer, got {num_examples!r:.60}"
    if n > MAX_NUM_EXAMPLES:
        return (
            f"num_examples = {num_examples} exceeds 2**53, the largest count the server "
            "weights exactly"
        )
    value = as_real(loss)
    if value is None or value < 0:
        return f"loss must be finite and non-negative, got {loss!r:.60}"
    if value > MAX_LOSS:
        return f"loss {value!r} exceeds 2**64: the client's training diverged"
    for name, measured in measurements:
        if measured is None:
            continue
        number = as_real(measured)
        if number is None or not 0 <= number <= MAX_MEASUREMENT:
            return f"{name} must be finite, non-negative and at most 2**256, got {measured!r:.60}"
    return probe_problem(probe)


def probe_problem(probe: object) -> str | None:
    """Why a reply's probe results are unusable (None if they are usable).

    A probe is a tuple of at most :data:`MAX_PROBES` ``(levels, bits, cost)``:
    levels an integer in ``[1, 2**24 - 1]``, bits in ``[0, 2**64]``, cost a
    finite number of at most :data:`MAX_LOSS` in size (it may be negative:
    a level's noise can lower the loss on a client's data).
    """
    if not isinstance(probe, tuple) or len(probe) > MAX_PROBES:
        return f"probe must be at most {MAX_PROBES} (levels, bits, cost), got {probe!r:.60}"
    for entry in probe:
        if not isinstance(entry, tuple) or len(entry) != 3:
            return f"a probe entry must be (levels, bits, cost), got {entry!r:.60}"
        levels, bits, cost = as_int(entry[0]), as_real(entry[1]), as_real(entry[2])
        if levels is None or not 1 <= levels <= 2**24 - 1:
            return f"a probe's levels must be an integer in [1, 2**24 - 1], got {entry[0]!r:.40}"
        if bits is None or not 0 <= bits <= MAX_LOSS:
            return f"a probe's bits must be in [0, 2**64], got {entry[1]!r:.40}"
        if cost is None or abs(cost) > MAX_LOSS:
            return f"a probe's cost must be finite and at most 2**64 in size, got {entry[2]!r:.40}"
    return None


def probe_levels_problem(
    probe: Sequence[tuple[int, float, float]], asked: Sequence[int]
) -> str | None:
    """Why a usable probe does not answer the round's question (None if it does).

    Its levels must be distinct and among those the round asked for: a
    level reported twice would count twice in the policy's average, and one
    never asked for would let any client steer the level.
    """
    levels = [int(entry[0]) for entry in probe]
    if len(set(levels)) != len(levels):
        return f"the probe reports a level twice: {levels}"
    extra = sorted(set(levels) - set(asked))
    if extra:
        return f"the probe reports levels {extra} the round did not ask for (asked: {list(asked)})"
    return None


def check_weight_share(max_weight_share: object) -> float | None:
    """``max_weight_share`` as a float in ``(0, 1]`` or None, else a ValueError naming it."""
    if max_weight_share is None:
        return None
    share = as_real(max_weight_share)
    if share is None or not 0 < share <= 1:
        raise ValueError(f"max_weight_share must be in (0, 1] or None, got {max_weight_share!r}")
    return share


def aggregation_weights(
    num_examples: Sequence[int], max_share: float | None = None
) -> list[int] | list[float]:
    """The weights of the accepted replies: ``n_i``, or ``min(n_i, t)`` under a share cap.

    Without a cap the weights are the integers ``n_i`` themselves, so that
    ``p_i = n_i / sum_j n_j`` (DESIGN §2) is exact. With ``max_share = c``,
    no client's share may exceed ``c``: the largest claims are lowered to a
    common ``t`` and the others keep their ``n_i`` (water-filling), where
    ``t = c * S / (1 - c * j)`` for the ``j`` capped clients and the sum ``S``
    of the others' ``n_i``. If ``c * k <= 1`` for ``k`` replies, no share can
    be below ``1 / k``, and every reply gets the same weight.

    Returns the ``n_i`` unchanged (as ints) when no claim exceeds the cap.
    """
    weights = list(num_examples)
    k = len(weights)
    if max_share is None or k == 0:
        return weights
    if max_share * k <= 1:
        return [1.0] * k
    order = sorted(range(k), key=lambda i: weights[i], reverse=True)
    rest = sum(weights)
    for capped, i in enumerate(order):
        t = max_share * rest / (1 - max_share * capped)
        if weights[i] <= t:
            break
        rest -= weights[i]
    else:  # pragma: no cover - unreachable when max_share * k > 1
        return [1.0] * k
    if capped == 0:
        return weights
    return [min(float(n), t) for n in weights]


def policy_loss(loss: float) -> float:
    """``loss`` clamped into ``[MIN_POLICY_LOSS, MAX_LOSS]`` (0 stays 0: a perfect fit)."""
    if loss == 0:
        return 0.0
    return min(MAX_LOSS, max(MIN_POLICY_LOSS, loss))


def policy_observation(
    round_idx: int, train_loss: float, accepted: Sequence[tuple[ClientReply, int | None, int]]
) -> RoundObservation:
    """What a policy is shown of a round, every loss clamped by :func:`policy_loss`.

    ``accepted`` holds ``(reply, levels, wire bits)`` of each accepted reply, in client-id order.
    """
    return RoundObservation(
        round_idx=round_idx,
        train_loss=policy_loss(train_loss),
        clients=tuple(
            ClientOutcome(
                client_id=r.client_id,
                num_examples=int(r.num_examples),
                loss=policy_loss(float(r.loss)),
                levels=levels,
                wire_bits=bits,
                update_norm=None if r.update_norm is None else float(r.update_norm),
                distortion=None if r.distortion is None else float(r.distortion),
                probe=tuple((int(s), float(b), float(c)) for s, b, c in r.probe),
            )
            for r, levels, bits in accepted
        ),
    )
