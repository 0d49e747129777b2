"""The client side of one round: loss on the received model, local SGD, compressed update.

One recipe for every engine: :func:`train_locally` (steps 1-2) is what the
simulator's per-client path and the Flower engine's train function run, and
:func:`compress_update` (step 3) is what the simulator, its batched path and the
Flower client mod run, so that all of them produce the same bytes for the
same inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaquantfl.compression import measure
from adaquantfl.compression.compressor import Compressor
from adaquantfl.compression.feedback import ClientCompressor, CompressedUpdate
from adaquantfl.models import FlatModel
from adaquantfl.rng import torch_generator
from adaquantfl.validation import check_int, check_real

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_DRAWS_PER_ROUND",
    "MAX_LOCAL_STEPS",
    "PROBE_BYTES",
    "PROBE_SAMPLES",
    "ClientError",
    "ClientReply",
    "LocalTraining",
    "all_finite",
    "client_update",
    "compress_update",
    "draw_minibatches",
    "evaluate",
    "local_sgd",
    "probe_noise",
    "train_locally",
]

logger = logging.getLogger(__name__)

_EVAL_CHUNK = 1024

# Stated limits of local training. A client draws all of a round's
# minibatch indices at once (local_steps x batch_size int64 values, 1 GiB at
# MAX_DRAWS_PER_ROUND), and materializes a minibatch of batch_size examples and
# its activations at every step. Beyond these, a round cannot fit in memory
# (or, for local_steps alone, finish in any reasonable time).
MAX_BATCH_SIZE = 2**16
MAX_LOCAL_STEPS = 2**20
MAX_DRAWS_PER_ROUND = 2**27
BATCH_SIZE_LIMIT = "a minibatch is built at every step; 2**16 exceeds every supported training set"
LOCAL_STEPS_LIMIT = "a round draws all its minibatch indices at once; 2**20 steps take hours"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a float tensor is finite, in one pass with no temporary.

    (:func:`adaquantfl.compression.measure.all_finite`: a float32 or float64
    CPU tensor is read in place; ``t.sum(dtype=torch.float64)`` makes a
    float64 copy of a float32 tensor first.)
    """
    return measure.all_finite(t)


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
    prox_mu : float
        FedProx's proximal weight ``mu`` (Li et al., "Federated optimization in
        heterogeneous networks", MLSys 2020, eq. 2): each step descends
        ``F_i(w) + (mu / 2) ||w - w_k||^2``. 0 (the default) is plain local SGD.
    """

    local_steps: int
    batch_size: int
    lr: float
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        for name, high, why in (
            ("local_steps", MAX_LOCAL_STEPS, LOCAL_STEPS_LIMIT),
            ("batch_size", MAX_BATCH_SIZE, BATCH_SIZE_LIMIT),
        ):
            value = check_int(name, getattr(self, name), 1)
            if value > high:
                raise ValueError(f"{name} = {value} exceeds {high} ({why})")
        draws = self.local_steps * self.batch_size
        if draws > MAX_DRAWS_PER_ROUND:
            raise ValueError(
                f"local_steps x batch_size = {draws} minibatch draws per round exceeds "
                f"2**27 = {MAX_DRAWS_PER_ROUND}: a client draws a round's indices at once "
                "(8 bytes each, 1 GiB at the limit)"
            )
        check_real("lr", self.lr, 0.0, low_open=True)
        check_real("prox_mu", self.prox_mu, 0.0)


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
    update_norm : float, optional
        ``||v||_2`` of the vector the client compressed (see
        :class:`~adaquantfl.compression.feedback.CompressedUpdate`).
    distortion : float, optional
        ``||C(v) - v||^2 / ||v||^2`` of that vector.
    probe : tuple of (levels, bits, cost)
        What the client measured for the levels the round asked it to probe
        (:func:`probe_noise`); empty when it was not asked. Each entry
        travels as three 4-byte numbers (:data:`PROBE_BYTES`).
    """

    client_id: int
    payload: bytes
    loss: float
    num_examples: int
    update_norm: float | None = None
    distortion: float | None = None
    probe: tuple[tuple[int, float, float], ...] = ()


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
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = 0
    chunk = model.eval_chunk or _EVAL_CHUNK
    with torch.no_grad():
        for start in range(0, n, chunk):
            logits = model(params, x[start : start + chunk])
            target = y[start : start + chunk]
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
    minibatch drawn by :func:`draw_minibatches`, plus FedProx's
    ``(mu / 2) ||w - w_k||^2`` when ``training.prox_mu`` is set.
    """
    batches = draw_minibatches(int(y.shape[0]), training, generator)
    start = params.detach()
    w = start.clone()
    for step in range(training.local_steps):
        idx = batches[step]
        w.requires_grad_(True)
        loss = F.cross_entropy(model(w, x[idx]), y[idx])
        if training.prox_mu:
            loss = loss + 0.5 * training.prox_mu * (w - start).square().sum()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w = w - training.lr * grad
    return w.detach()


def train_locally(
    model: FlatModel,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    training: LocalTraining,
    seed: int,
    round_idx: int,
    client_id: int,
) -> tuple[torch.Tensor, float]:
    """Steps 1-2 of a client's round: ``(w_i, F_i(w_k))``.

    1. ``F_i(w_k)``: mean loss of the received ``params`` on the local data.
    2. ``tau`` local SGD steps from ``w_k`` (minibatch stream: seed, round, client, "batch").
    """
    loss, _ = evaluate(model, params, x, y)
    batch_gen = torch_generator(seed, purpose="batch", round_idx=round_idx, client_id=client_id)
    local = local_sgd(model, params, x, y, training=training, generator=batch_gen)
    return local, loss


def compress_update(
    update: torch.Tensor,
    *,
    levels: int | None,
    compressor: ClientCompressor,
    seed: int,
    round_idx: int,
    client_id: int,
    consume: bool = False,
) -> CompressedUpdate:
    """Check and compress one client's update: step 3 of :func:`client_update`.

    The quantization noise comes from the (seed, round, client, "quantize")
    stream, so every engine that calls this produces the same bytes for the
    same update. ``compressor`` is the client's own end of the run's
    compressor, which keeps what the client carries between rounds (its
    error-feedback residual). ``consume=True`` hands ``update`` over to it:
    it may be overwritten (see :meth:`ClientCompressor.compress`).

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
    compressed = compressor.compress(update, levels, generator=noise_gen, consume=consume)
    if compressed.distortion > 1.0:
        _warn_noisy(compressor, levels, compressed.distortion, update.numel())
    return compressed


#: Bytes one probed level adds to a reply: its levels, bits and cost, 4 bytes each.
PROBE_BYTES = 12
#: The most examples a client evaluates a probe on (drawn once per round).
PROBE_SAMPLES = 256


def probe_noise(
    model: FlatModel,
    params: torch.Tensor,
    update: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    levels: Sequence[int],
    compressor: Compressor,
    scale: float,
    seed: int,
    round_idx: int,
    client_id: int,
    samples: int = PROBE_SAMPLES,
) -> tuple[tuple[int, float, float], ...]:
    """What each of ``levels`` would cost: a message's bits, and the loss its noise adds.

    For each level ``s``, the client compresses its own update ``Delta`` at
    ``s`` (noise stream: seed, round, client, "probe"; the message is not
    sent) and measures, on up to ``samples`` of its examples, with
    ``w = params + Delta`` its new model and ``e = C_s(Delta) - Delta``::

        cost_s = (F(w + a e) + F(w - a e)) / 2 - F(w),   a = scale

    ``a`` is the share of one client's noise the aggregate carries (about
    ``1 / sqrt(K)`` for ``K`` clients of equal weight). The pair ``+e, -e``
    cancels the first-order term ``grad F . e``, whose sign is random and
    which swamps the second-order one on a single draw, and leaves
    ``a^2 e^T H e / 2``: the loss the noise adds along the loss's curvature,
    which is what decides whether a level has a floor (measured on the
    1-D CNN: one draw's cost has a spread ten times its mean; the pair's is
    within a few percent of it).

    Cost: ``2 len(levels) + 1`` forward passes over at most ``samples``
    examples, and one compression per level. Uplink: :data:`PROBE_BYTES` per level.
    """
    gen = torch_generator(seed, purpose="probe", round_idx=round_idx, client_id=client_id)
    n = int(y.shape[0])
    if n > samples:
        pick = torch.randperm(n, generator=gen)[:samples].to(x.device)
        x, y = x[pick], y[pick]
    v = update.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    w = params.detach().to(torch.float32) + update.detach()
    base, _ = evaluate(model, w, x, y)
    out = []
    for s in levels:
        payload = compressor.compress(v, s, generator=gen)
        noise = compressor.decompress(payload, numel=v.numel(), levels=s).sub_(v)
        step = noise.mul_(scale).to(w.device)  # in place: one less update-sized copy
        plus, _ = evaluate(model, w + step, x, y)
        minus, _ = evaluate(model, w - step, x, y)
        out.append((int(s), float(8 * len(payload)), 0.5 * (plus + minus) - base))
    return tuple(out)


#: Compressors already warned about in this process.
_NOISY: set[str] = set()


def _warn_noisy(
    compressor: ClientCompressor, levels: int | None, distortion: float, numel: int
) -> None:
    """Say once per compressor that updates arrive with more noise than signal, and the fix.

    A relative error ``||C(v) - v||^2 / ||v||^2`` above 1 means the server
    receives more noise than update; for QSGD with one norm per update it
    grows with ``sqrt(d)`` (thousands at 10^8 parameters).
    """
    key = repr(compressor.compressor)
    if key in _NOISY:
        return
    _NOISY.add(key)
    options = getattr(compressor.compressor, "options", None)
    if getattr(options, "bucket_size", 0) is None or getattr(options, "norm", "") == "l2":
        fix = (
            "QSGD's error grows with the bucket: use buckets with the max-norm (the default, "
            'QSGDCompressor(bucket_size=512, norm="max"); in a config: bucket_size = 512, '
            'norm = "max"), or more levels'
        )
    else:
        fix = "use more levels (or a compressor option that sends more)"
    logger.warning(
        "updates of %d entries arrive with relative error %.3g (||C(v) - v||^2 / ||v||^2 > 1: "
        "more noise than update) at levels %s with %r; %s. (Logged once per compressor.)",
        numel,
        distortion,
        levels,
        compressor.compressor,
        fix,
    )


def client_update(
    model: FlatModel,
    params: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    levels: int | None,
    compressor: ClientCompressor,
    training: LocalTraining,
    seed: int,
    round_idx: int,
    client_id: int,
) -> ClientReply:
    """One client's work in round ``round_idx`` (DESIGN §2, steps 2-3).

    1. ``F_i(w_k)``: mean loss of the received ``params`` on the local data.
    2. ``tau`` local SGD steps from ``w_k`` (minibatch stream: seed, round, client, "batch").
    3. ``Delta_i = w_i - w_k``, compressed at ``levels`` (noise stream: seed,
       round, client, "quantize") and encoded; ``levels=None`` sends float32.

    ``compressor`` is the client's end of the run's compressor; it keeps what
    the client carries between rounds (its error-feedback residual).

    Raises
    ------
    ClientError
        If local training produced a non-finite update.
    """
    local, loss = train_locally(
        model,
        params,
        x,
        y,
        training=training,
        seed=seed,
        round_idx=round_idx,
        client_id=client_id,
    )
    encoded = compress_update(
        local - params,
        levels=levels,
        compressor=compressor,
        seed=seed,
        round_idx=round_idx,
        client_id=client_id,
    )
    return ClientReply(
        client_id=client_id,
        payload=encoded.payload,
        loss=loss,
        num_examples=int(y.shape[0]),
        update_norm=encoded.update_norm,
        distortion=encoded.distortion,
    )
