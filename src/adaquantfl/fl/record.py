"""What happened in a round, measured: :class:`RoundRecord`, the results row every engine emits.

:meth:`FedServer.aggregate <adaquantfl.fl.server.FedServer.aggregate>` measures
what the server saw (the replies it accepted or rejected, their bits, ``F(w_k)``);
the engine completes the record with what only it knows (the test set, the
clock, the clients that failed or never replied) through :meth:`RoundRecord.completed`.
Every engine (the simulator, the Flower wrapper and the runner's Flower
engine) hands on the same type, and :meth:`RoundRecord.as_row` is one line of
``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ROW_KEYS", "RoundRecord", "rd_bits_per_coordinate"]

#: The columns of a metrics row, in order (``metrics.jsonl``; the runner adds running totals).
ROW_KEYS: tuple[str, ...] = (
    "round",
    "levels",
    "participants",
    "rejected",
    "wire_bits",
    "formula_bits",
    "downlink_bits",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "time_s",
    "dropped",
    "distortion",
    "bits_per_coordinate",
    "rd_bits_per_coordinate",
    "test_loss_uncompressed",
)


def rd_bits_per_coordinate(distortion: float | None) -> float | None:
    """The fewest bits per entry any unbiased compressor with this distortion needs.

    An unbiased compressor with ``E||C(v) - v||^2 = omega ||v||^2`` sends at
    least ``d/2 log2(1 + 1/omega)`` bits for a Gaussian source (the Gaussian
    rate-distortion function at distortion ``omega / (1 + omega)``, rescaled
    for unbiasedness: an unbiased ``C`` is ``(1 + omega)`` times a biased
    estimate with that relative error). None for no distortion (full
    precision) or an unknown one.
    """
    if distortion is None or distortion <= 0:
        return None
    return 0.5 * math.log2(1.0 + 1.0 / distortion)

Reasons = tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class RoundRecord:
    """One round's measurements: the metrics row, and the details behind its counts.

    The row (:data:`ROW_KEYS`):

    - ``round``: 1-based; ``levels``: the round's default levels (None: full
      precision; clients of a per-client plan may have used others, see
      ``client_levels``);
    - of the clients selected for the round, ``participants`` were
      aggregated, ``rejected`` replied with something unusable or failed,
      and ``dropped`` never replied;
    - ``wire_bits``: 8 x the bytes of every received payload, accepted or not,
      and of the probe results that came with them;
      ``formula_bits``: the paper-style bits of the accepted messages;
      ``downlink_bits``: 8 x the bytes that carried the model to the participants;
    - ``train_loss``: ``F(w_k)``, the accepted clients' sample-weighted loss on
      the model they received, before training (the policy's input; None if
      no reply was accepted); ``test_*``: the global model after this
      round's aggregation (None until the engine evaluates it);
    - ``distortion``: ``sum_i p_i ||C(v_i) - v_i||^2 / ||v_i||^2`` over the
      accepted replies that reported it; ``bits_per_coordinate``:
      ``wire_bits / (messages received x d)``; ``rd_bits_per_coordinate``:
      the rate-distortion bound for that distortion
      (:func:`rd_bits_per_coordinate`), so ``bits_per_coordinate /
      rd_bits_per_coordinate`` is how far the compressor is from the limit;
    - ``test_loss_uncompressed``: in the rounds the simulator measures it, the
      test loss of ``w_k + sum_i p_i Delta_i``, the same round's aggregate
      without the compression noise; ``test_loss - test_loss_uncompressed``
      is what the noise cost (distortion alone does not predict it). None in
      the other rounds.

    The details (not in the row):

    - ``received``: payloads received (the messages ``wire_bits`` counts);
      ``sent``: clients the round's instruction went to;
    - ``client_levels``: ``(client id, levels)`` of each accepted reply;
    - ``rejections``: ``(client id, reason)`` of each reply the server
      checked and refused (-1: a reply whose id was unusable);
    - ``failures``: ``(id, reason)`` of each client that failed before the
      server could check its reply (its training diverged, or on Flower, a
      node's error or malformed reply, by node id); counted in ``rejected``;
    - ``dropouts``: ``(id, reason)`` of each selected client that never
      replied; counted in ``dropped``;
    - ``digests``: ``(client id, SHA-256 hex)`` of every received payload,
      when the server records them (to check that two engines sent the same bytes).
    """

    round: int
    levels: int | None
    participants: int
    rejected: int
    wire_bits: int
    formula_bits: int
    downlink_bits: int
    train_loss: float | None
    test_loss: float | None = None
    test_accuracy: float | None = None
    time_s: float = 0.0
    dropped: int = 0
    distortion: float | None = None
    bits_per_coordinate: float | None = None
    rd_bits_per_coordinate: float | None = None
    test_loss_uncompressed: float | None = None
    received: int = 0
    sent: int = 0
    client_levels: tuple[tuple[int, int | None], ...] = field(default=())
    rejections: Reasons = field(default=())
    failures: Reasons = field(default=())
    dropouts: Reasons = field(default=())
    digests: tuple[tuple[int, str], ...] = field(default=())

    def as_row(self) -> dict[str, Any]:
        """The round's line of ``metrics.jsonl`` (:data:`ROW_KEYS`, in order)."""
        return {key: getattr(self, key) for key in ROW_KEYS}

    def completed(
        self,
        *,
        test_loss: float | None,
        test_accuracy: float | None,
        time_s: float,
        failures: Sequence[tuple[int, str]] = (),
        dropouts: Sequence[tuple[int, str]] = (),
        sent: int | None = None,
        downlink_bits: int | None = None,
    ) -> RoundRecord:
        """This record with what only the engine knows: evaluation, time, failures, dropouts.

        ``failures`` add to ``rejected`` and ``dropouts`` to ``dropped``.
        """
        return replace(
            self,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            time_s=time_s,
            rejected=self.rejected + len(failures),
            failures=self.failures + tuple(failures),
            dropped=self.dropped + len(dropouts),
            dropouts=self.dropouts + tuple(dropouts),
            sent=self.sent if sent is None else sent,
            downlink_bits=self.downlink_bits if downlink_bits is None else downlink_bits,
        )
