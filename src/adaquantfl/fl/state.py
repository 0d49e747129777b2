"""What a client keeps between the rounds it takes part in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["ClientState"]


class ClientState:
    """A client's own state: its error-feedback residual ``e_i`` (None until it has one).

    It lives with the client (the simulator keeps one per client id; a Flower
    node keeps it in its ``Context.state``), survives the rounds the client
    sits out, and is part of a checkpoint.
    """

    __slots__ = ("residual",)

    def __init__(self, residual: torch.Tensor | None = None) -> None:
        self.residual = residual

    def state_dict(self) -> dict[str, Any]:
        return {"residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"residual"}:
            raise ValueError(f"ClientState state must have key 'residual', got {sorted(state)}")
        residual = state["residual"]
        if residual is not None and (
            not isinstance(residual, torch.Tensor)
            or residual.dtype != torch.float32
            or residual.dim() != 1
        ):
            raise ValueError("a client's residual must be a flat float32 tensor or None")
        self.residual = None if residual is None else residual.clone()

    def __repr__(self) -> str:
        size = "none" if self.residual is None else f"{self.residual.numel()} entries"
        return f"ClientState(residual={size})"
