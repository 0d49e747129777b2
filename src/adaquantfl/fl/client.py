"""The client side of one round: loss on the received model, local SGD, compressed update.

Shared by every engine (the in-process simulator and the Flower client mod),
so that all of them produce the same bytes for the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaquantfl.compression.compressor import Compressor
from adaquantfl.models import FlatModel
from adaquantfl.rng import torch_generator

__all__ = [
    "ClientError",
    "ClientReply",
    "LocalTraining",
    "all_finite",
    "client_update",
    "draw_minibatches",
    "encode_update",
    "evaluate",
    "local_sgd",
]

_EVAL_CHUNK = 1024


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a float tensor is finite, in one pass with no temporary.

    The float64 sum of float32 values cannot overflow, and it is NaN or
    infinite exactly when some entry is.
    """
    return math.isfinite(float(t.sum(dtype=torch.float64)))


class ClientError(ValueError):
    """A client could not produce a valid update this round (e.g. training diverged)."""


@dataclass(frozen=True)
class LocalTraining:
    """Hyper-parameters of a client's local training.

    Parameters
    ----------
    local_steps : int
        Number of SGD steps ``tau`` per round.
    batch_size : int
        Minibatch size ``B``; minibatches are drawn with replacement.
    lr : float
        Step size ``eta`` (plain SGD, no momentum or weight decay).
    """

    local_steps: int
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        for name in ("local_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")


@dataclass(frozen=True)
class ClientReply:
    """What a client sends back after a round.

    Attributes
    ----------
    client_id : int
    payload : bytes
        The encoded update (a v1 message from :mod:`adaquantfl.compression.codec`).
    loss : float
        ``F_i(w_k)``: the mean training loss on the client's data, evaluated on
        the received model before local training.
    num_examples : int
        ``n_i``, the client's number of training examples (its aggregation weight).
    """

    client_id: int
    payload: bytes
    loss: float
    num_examples: int


def evaluate(
    model: FlatModel, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``params`` on ``(x, y)``.

    Evaluated in chunks; per-sample losses are summed in float64 so that the
    result does not depend on the chunking.
    """
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    total = torch.zeros((), dtype=torch.float64)
    correct = 0
    with torch.no_grad():
        for start in range(0, n, _EVAL_CHUNK):
            logits = model(params, x[start : start + _EVAL_CHUNK])
            target = y[start : start + _EVAL_CHUNK]
            losses = F.cross_entropy(logits, target, reduction="none")
            total += losses.to(torch.float64).sum()
            correct += int((logits.argmax(dim=1) == target).sum())
    return float(total) / n, correct / n


def draw_minibatches(
    num_examples: int, training: LocalTraining, generator: torch.Generator
) -> torch.Tensor:
    """Indices of all minibatches of a round, shape ``(local_steps, batch_size)``.

    Drawn uniformly with replacement, so a client with fewer than ``B``
    examples still trains, and the draw does not depend on the data order.
    """
    if num_examples < 1:
        raise ValueError("a client needs at least one example to train")
    return torch.randint(
        0, num_examples, (training.local_steps, training.batch_size), generator=generator
    )


def local_sgd(
    model: FlatModel,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    training: LocalTraining,
    generator: torch.Generator,
) -> torch.Tensor:
    """Run ``tau`` steps of minibatch SGD from ``params``; returns the local model.

    ``w <- w - eta * grad F(w; batch)`` with the mean cross-entropy of a
    minibatch drawn by :func:`draw_minibatches`.
    """
    batches = draw_minibatches(int(y.shape[0]), training, generator)
    w = params.detach().clone()
    for step in range(training.local_steps):
        idx = batches[step]
        w.requires_grad_(True)
        loss = F.cross_entropy(model(w, x[idx]), y[idx])
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w = w - training.lr * grad
    return w.detach()


def encode_update(
    update: torch.Tensor,
    *,
    levels: int | None,
    compressor: Compressor,
    seed: int,
    round_idx: int,
    client_id: int,
) -> bytes:
    """Check and encode one client's update: step 3 of :func:`client_update`.

    The quantization noise comes from the (seed, round, client, "quantize")
    stream, so every engine that calls this produces the same bytes for the
    same update.

    Raises
    ------
    ClientError
        If the update has non-finite entries (local training diverged).
    """
    if not all_finite(update):
        bad = int((~torch.isfinite(update)).sum())
        raise ClientError(
            f"client {client_id}: local training diverged in round {round_idx} "
            f"({bad} non-finite entries in the update; lower lr?)"
        )
    noise_gen = torch_generator(seed, purpose="quantize", round_idx=round_idx, client_id=client_id)
    return compressor.compress(update, levels, generator=noise_gen)


def client_update(
    model: FlatModel,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    levels: int | None,
    compressor: Compressor,
    training: LocalTraining,
    seed: int,
    round_idx: int,
    client_id: int,
) -> ClientReply:
    """One client's work in round ``round_idx`` (DESIGN §2, steps 2-3).

    1. ``F_i(w_k)``: mean loss of the received ``params`` on the local data.
    2. ``tau`` local SGD steps from ``w_k`` (minibatch stream: seed, round, client, "batch").
    3. ``Delta_i = w_i - w_k``, quantized at ``levels`` (noise stream: seed,
       round, client, "quantize") and encoded; ``levels=None`` sends float32.

    Raises
    ------
    ClientError
        If local training produced a non-finite update.
    """
    loss, _ = evaluate(model, params, x, y)
    batch_gen = torch_generator(seed, purpose="batch", round_idx=round_idx, client_id=client_id)
    local = local_sgd(model, params, x, y, training=training, generator=batch_gen)
    payload = encode_update(
        local - params,
        levels=levels,
        compressor=compressor,
        seed=seed,
        round_idx=round_idx,
        client_id=client_id,
    )
    return ClientReply(
        client_id=client_id, payload=payload, loss=loss, num_examples=int(y.shape[0])
    )
