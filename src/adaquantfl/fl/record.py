"""The results row every engine emits for a round: :class:`RoundRecord`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adaquantfl.fl.server import RoundOutcome

__all__ = ["RoundRecord", "record_round"]


@dataclass(frozen=True)
class RoundRecord:
    """One row of ``metrics.jsonl`` (before the running totals are added).

    ``train_loss`` is ``F(w_{k-1})``, the participants' weighted loss on the
    model they received (the schedule's input); ``test_*`` evaluate the global
    model after this round's aggregation. Of the clients selected for the
    round, ``participants`` were aggregated, ``rejected`` replied with
    something unusable or failed, and ``dropped`` never replied.

    Named measurements: ``distortion`` is ``sum_i p_i ||C(v_i) - v_i||^2 /
    ||v_i||^2`` over the accepted replies (None if none reported it), and
    ``bits_per_coordinate`` is ``wire_bits / (messages received x d)`` (None
    if no message arrived).
    """

    round: int
    levels: int | None
    participants: int
    rejected: int
    wire_bits: int
    formula_bits: int
    downlink_bits: int
    train_loss: float | None
    test_loss: float
    test_accuracy: float
    time_s: float
    dropped: int = 0
    distortion: float | None = None
    bits_per_coordinate: float | None = None

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def record_round(
    round_number: int,
    outcome: RoundOutcome,
    *,
    downlink_bits: int,
    test_loss: float,
    test_accuracy: float,
    time_s: float,
    dropped: int = 0,
    numel: int | None = None,
) -> RoundRecord:
    """Combine the server's outcome with the engine's own measurements.

    ``numel`` (the model's size ``d``) gives ``bits_per_coordinate``.
    """
    per_coordinate = None
    if numel and outcome.received:
        per_coordinate = outcome.wire_bits / (outcome.received * numel)
    return RoundRecord(
        round=round_number,
        levels=outcome.levels,
        participants=outcome.participants,
        rejected=outcome.rejected,
        wire_bits=outcome.wire_bits,
        formula_bits=outcome.formula_bits,
        downlink_bits=downlink_bits,
        train_loss=outcome.train_loss,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        time_s=time_s,
        dropped=dropped,
        distortion=outcome.distortion,
        bits_per_coordinate=per_coordinate,
    )
