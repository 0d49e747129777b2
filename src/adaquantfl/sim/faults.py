"""Simulated client faults: dropout after selection and a round deadline with stragglers.

Both are seeded per (seed, round, client), like every other draw of a run, so a
fault pattern is reproducible and the same under resume.

Dropout: each selected client independently fails to reply with probability
``dropout`` (stream "dropout").

Deadline: a client's simulated time for a round is
``client_time_s * exp(client_time_sigma * z_c + round_time_sigma * z_{c,k})``,
a lognormal with a persistent per-client factor ``z_c`` (slow devices stay
slow) and per-round jitter ``z_{c,k}`` (stream "straggler"). Clients whose time
exceeds ``deadline_s`` miss the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaquantfl.rng import torch_generator
from adaquantfl.validation import check_real

__all__ = ["ClientFaults", "RoundAvailability"]


@dataclass(frozen=True)
class RoundAvailability:
    """Which selected clients reply in a round."""

    replying: list[int]
    dropped_out: list[int]
    missed_deadline: list[int]

    @property
    def dropped(self) -> int:
        return len(self.dropped_out) + len(self.missed_deadline)


@dataclass(frozen=True)
class ClientFaults:
    """Fault model of the simulator (all off by default).

    Parameters
    ----------
    dropout : float
        Probability in ``[0, 1]`` that a selected client does not reply.
    deadline_s : float or None
        Round deadline in simulated seconds; None waits for every client.
    client_time_s : float
        Median simulated time of a client's round.
    client_time_sigma, round_time_sigma : float
        Log-scale spread of the persistent per-client factor and of the per-round jitter.
    """

    dropout: float = 0.0
    deadline_s: float | None = None
    client_time_s: float = 1.0
    client_time_sigma: float = 0.5
    round_time_sigma: float = 0.25

    def __post_init__(self) -> None:
        check_real("dropout", self.dropout, 0.0, 1.0)
        if self.deadline_s is not None:
            check_real("deadline_s", self.deadline_s, 0.0, low_open=True)
        check_real("client_time_s", self.client_time_s, 0.0, low_open=True)
        check_real("client_time_sigma", self.client_time_sigma, 0.0)
        check_real("round_time_sigma", self.round_time_sigma, 0.0)

    def client_time_s_of(self, client_id: int, *, seed: int, round_idx: int) -> float:
        """Simulated time of ``client_id`` in round ``round_idx``."""
        device = _normal(torch_generator(seed, purpose="straggler", client_id=client_id))
        jitter = _normal(
            torch_generator(seed, purpose="straggler", round_idx=round_idx, client_id=client_id)
        )
        return self.client_time_s * math.exp(
            self.client_time_sigma * device + self.round_time_sigma * jitter
        )

    def availability(self, chosen: list[int], *, seed: int, round_idx: int) -> RoundAvailability:
        """Split the selected clients into those that reply and those that do not."""
        replying, dropped_out, late = [], [], []
        for cid in chosen:
            gen = torch_generator(seed, purpose="dropout", round_idx=round_idx, client_id=cid)
            if self.dropout > 0 and float(torch.rand((), generator=gen)) < self.dropout:
                dropped_out.append(cid)
            elif self.deadline_s is not None and (
                self.client_time_s_of(cid, seed=seed, round_idx=round_idx) > self.deadline_s
            ):
                late.append(cid)
            else:
                replying.append(cid)
        return RoundAvailability(replying, dropped_out, late)


def _normal(generator: torch.Generator) -> float:
    return float(torch.randn((), generator=generator))
