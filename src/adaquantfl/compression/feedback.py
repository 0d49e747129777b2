"""Error feedback around any compressor: what compression loses is sent in later rounds.

Client ``i`` keeps a residual ``e_i`` (zero at first) and, each round it takes part,

1. compresses ``v = Delta_i + e_i`` instead of ``Delta_i``;
2. keeps ``e_i <- v - C(v)``, what the server will not see of ``v``.

(Seide et al., "1-bit SGD", Interspeech 2014; Stich, Cordonnier, Jaggi,
"Sparsified SGD with memory", NeurIPS 2018; Karimireddy et al., "Error
feedback fixes SignSGD", ICML 2019.) With a biased compressor (top-k, signs)
this restores convergence; with an unbiased one (QSGD) it trades variance for
memory. The residual is state of the client's end of the compressor, a
:class:`ClientCompressor`: one per client, it survives the rounds the client
sits out and is checkpointed (:meth:`ClientCompressor.state_dict`). Every
engine compresses a client's update through it, so error feedback is
nowhere else.

Error feedback needs a compressor that *contracts*:
``||C(v) - v||^2 <= (1 - delta) ||v||^2`` (top-k does, with ``delta = k / d``).
An unbiased compressor of relative variance ``omega`` may not (coarse QSGD has
``omega`` well above 1, and its residual then grows without bound), so it is
scaled: both sides use ``C(v) / (1 + omega)``, which contracts with
``1 - delta = omega / (1 + omega)`` (Stich and Karimireddy, "The error-feedback
framework", JMLR 2020, Remark 5). :func:`feedback_scale` gives the factor; the
bytes on the wire are the inner compressor's, and the server, which knows
``d``, ``s`` and the options, applies the same factor when it decodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adaquantfl.compression.compressor import BaseCompressor, Compressor
from adaquantfl.compression.measure import compress_measured, sum_squares
from adaquantfl.validation import check_keys

__all__ = [
    "EXACT_SUMS_NUMEL",
    "ClientCompressor",
    "CompressedUpdate",
    "ErrorFeedback",
    "feedback_scale",
]

#: Up to this many entries (2**20, 4 MiB of float32) a client's ``||v||^2`` and
#: ``||C(v) - v||^2`` are the float64 tensor sums of earlier versions, bit for
#: bit; above it, the fixed-order sums of :mod:`.measure`, which differ from
#: them in the last bits (the order of summation) and need no float64 copy.
EXACT_SUMS_NUMEL = 2**20


def feedback_scale(compressor: Compressor, numel: int, levels: int | None) -> float:
    """``1 / (1 + omega)`` for an unbiased compressor with a known variance bound, else 1."""
    omega = compressor.variance_bound(numel, levels)
    return 1.0 if not omega else 1.0 / (1.0 + omega)


class ErrorFeedback:
    """``ErrorFeedback(inner)``: ``inner``'s messages, with the client's residual added.

    Parameters
    ----------
    inner : Compressor
        Any registered compressor.
    """

    def __init__(self, inner: Compressor) -> None:
        if isinstance(inner, ErrorFeedback):
            raise ValueError(
                "ErrorFeedback(ErrorFeedback(...)) adds nothing; wrap the compressor once"
            )
        if not isinstance(inner, Compressor):
            raise ValueError(f"ErrorFeedback wraps a compressor, got {type(inner).__name__}")
        self.inner = inner
        self.name = inner.name
        self.takes_levels = inner.takes_levels

    @property
    def options(self) -> Any:
        return self.inner.options

    # The inner compressor's protocol ------------------------------------------

    def compress(
        self, update: torch.Tensor, levels: int | None, *, generator: torch.Generator
    ) -> bytes:
        return self.inner.compress(update, levels, generator=generator)

    def decompress(
        self,
        payload: bytes,
        *,
        numel: int,
        levels: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The inner compressor's decoding, times :func:`feedback_scale`."""
        update = self.inner.decompress(payload, numel=numel, levels=levels, out=out)
        scale = feedback_scale(self.inner, numel, levels)
        return update if scale == 1.0 else update.mul_(scale)

    def formula_bits(self, numel: int, levels: int | None) -> int:
        return self.inner.formula_bits(numel, levels)

    def max_message_bytes(self, numel: int) -> int:
        return self.inner.max_message_bytes(numel)

    def variance_bound(self, numel: int, levels: int | None) -> float | None:
        return None if levels is not None else 0.0  # the scaled compressor is biased

    def to_config(self) -> dict[str, Any]:
        """The inner compressor's config with ``"error_feedback": True``."""
        return {**self.inner.to_config(), "error_feedback": True}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ErrorFeedback):
            return NotImplemented
        return bool(self.inner == other.inner)

    def __hash__(self) -> int:
        return hash(("error-feedback", self.inner))

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.inner!r})"


@dataclass(frozen=True)
class CompressedUpdate:
    """What a client sends of one update, and two measurements of it.

    Attributes
    ----------
    payload : bytes
        ``C(v)`` as the compressor's message, where ``v`` is the update (plus
        the client's residual under error feedback).
    update_norm : float
        ``||v||_2``.
    distortion : float
        ``||C(v) - v||^2 / ||v||^2`` (0 for a zero vector and for full precision).
    """

    payload: bytes
    update_norm: float
    distortion: float


class ClientCompressor:
    """One client's end of a compressor: it compresses the client's updates, round after round.

    It holds what the client must keep between the rounds it takes part in:
    under :class:`ErrorFeedback`, the residual ``e_i`` (None until the first
    round); for any other compressor, nothing. The simulator keeps one per
    client id, a Flower node one in its ``Context.state``; both call
    :meth:`compress`.

    Parameters
    ----------
    compressor : Compressor
        The run's compressor (possibly an :class:`ErrorFeedback`).
    """

    __slots__ = ("compressor", "residual")

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.residual: torch.Tensor | None = None

    @property
    def keeps_residual(self) -> bool:
        """Whether this compressor carries what it loses into the next round (error feedback)."""
        return isinstance(self.compressor, ErrorFeedback)

    def compress(
        self, update: torch.Tensor, levels: int | None, *, generator: torch.Generator
    ) -> CompressedUpdate:
        """Compress ``update`` at ``levels`` and measure what was lost.

        1. ``v = Delta_i`` (flattened, float32, on the CPU: the compressors'
           kernels are CPU code), plus ``e_i`` under error feedback;
        2. the payload ``C(v)``, with the quantizer's noise from ``generator``;
        3. ``||v||`` and ``||C(v) - v||^2 / ||v||^2``, of what the server will
           decode; under error feedback ``e_i <- v - C(v)``.

        Above :data:`EXACT_SUMS_NUMEL` entries this needs little memory
        beyond the payload: ``v`` is ``update`` itself when that is a flat
        float32 CPU tensor (else one float32 copy); the sums are single float64
        passes (:mod:`.measure`); QSGD measures while it encodes, other
        compressors decode into one float32 buffer; the new residual takes
        the place of ``v`` when ``v`` is this object's own (the sum with the
        old residual), else one float32 vector. Up to that size the sums are
        the float64 tensor expressions they always were, so small runs
        report the same bits as before.
        """
        v = update.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        owned = False
        if self.keeps_residual and self.residual is not None:
            if self.residual.shape != v.shape:
                raise ValueError(
                    f"the residual has {self.residual.numel()} entries; the update has {v.numel()}"
                )
            v = v + self.residual  # a new vector, which becomes the next residual
            owned = True
        if v.numel() <= EXACT_SUMS_NUMEL:
            return self._compress_exactly(v.contiguous(), levels, generator)
        v = v.contiguous()
        owned = owned or v.untyped_storage().data_ptr() != update.untyped_storage().data_ptr()
        if levels is None and not self.keeps_residual:
            payload = self.compressor.compress(v, None, generator=generator)
            return CompressedUpdate(payload, math.sqrt(sum_squares(v)), 0.0)  # raw is exact
        inner, scale, residual = self.compressor, 1.0, None
        if isinstance(inner, ErrorFeedback):
            inner = inner.inner
            scale = feedback_scale(inner, v.numel(), levels)
            residual = v if owned else torch.empty_like(v)
        if isinstance(inner, BaseCompressor):
            payload, norm_sq, error_sq = inner.compress_measured(
                v, levels, generator=generator, scale=scale, residual=residual
            )
        else:
            payload, norm_sq, error_sq = compress_measured(
                inner, v, levels, generator=generator, scale=scale, residual=residual
            )
        if residual is not None:
            self.residual = residual
        distortion = error_sq / norm_sq if norm_sq > 0 else 0.0
        return CompressedUpdate(payload, math.sqrt(norm_sq), distortion)

    def _compress_exactly(
        self, v: torch.Tensor, levels: int | None, generator: torch.Generator
    ) -> CompressedUpdate:
        # The float64 tensor expressions of earlier versions (each float64
        # copy is at most 8 MiB at this size): the same bits as ever.
        payload = self.compressor.compress(v, levels, generator=generator)
        norm_sq = float(v.to(torch.float64).square().sum())
        if levels is None and not self.keeps_residual:
            distortion = 0.0  # raw float32 is exact
        else:
            sent = self.compressor.decompress(payload, numel=v.numel(), levels=levels)
            if self.keeps_residual:
                self.residual = (v - sent).detach().clone()
            error_sq = float((sent.to(torch.float64) - v.to(torch.float64)).square().sum())
            distortion = error_sq / norm_sq if norm_sq > 0 else 0.0
        return CompressedUpdate(payload, math.sqrt(norm_sq), distortion)

    def state_dict(self) -> dict[str, Any]:
        """``{"residual": e_i or None}``: what must survive a restart."""
        return {"residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        residual = check_keys("ClientCompressor", state, {"residual"})["residual"]
        if residual is not None and (
            not isinstance(residual, torch.Tensor)
            or residual.dtype != torch.float32
            or residual.dim() != 1
        ):
            raise ValueError("a client's residual must be a flat float32 tensor or None")
        self.residual = None if residual is None else residual.clone()

    def __repr__(self) -> str:
        size = "none" if self.residual is None else f"{self.residual.numel()} entries"
        return f"ClientCompressor({self.compressor!r}, residual={size})"
