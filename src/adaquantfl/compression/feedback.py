"""Error feedback around any compressor: what compression loses is sent in later rounds.

Client ``i`` keeps a residual ``e_i`` (zero at first) and, each round it takes part,

1. compresses ``v = Delta_i + e_i`` instead of ``Delta_i``;
2. keeps ``e_i <- v - C(v)``, what the server will not see of ``v``.

(Seide et al., "1-bit SGD", Interspeech 2014; Stich, Cordonnier, Jaggi,
"Sparsified SGD with memory", NeurIPS 2018; Karimireddy et al., "Error
feedback fixes SignSGD", ICML 2019.) With a biased compressor (top-k, signs)
this restores convergence; with an unbiased one (QSGD) it trades variance for
memory. The residual lives with the client (:class:`adaquantfl.fl.state.ClientState`),
survives the rounds it sits out, and is checkpointed.

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

from typing import Any

import torch

from adaquantfl.compression.compressor import Compressor

__all__ = ["ErrorFeedback", "feedback_scale"]


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

    # Client side --------------------------------------------------------------

    @staticmethod
    def add_residual(update: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``v = Delta_i + e_i`` (float32)."""
        if residual.shape != update.shape:
            raise ValueError(
                f"the residual has {residual.numel()} entries; the update has {update.numel()}"
            )
        return update + residual

    @staticmethod
    def residual(v: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """``e_i = v - C(v)``: what the server does not see of ``v``."""
        return (v - sent).detach().clone()

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
