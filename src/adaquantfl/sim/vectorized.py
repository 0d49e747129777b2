"""Batched local SGD: all participating clients of a round in one computation.

Each client ``i`` runs the same ``tau`` steps as :func:`adaquantfl.fl.client.local_sgd`,
on the same minibatch indices (drawn from the same (seed, round, client, "batch")
stream), but the clients' parameters are stacked, and every step is one batched
computation for all of them: the model's hand-written batched SGD steps where it
has them (:mod:`adaquantfl.batched`: logistic regression, the MLP, ``cnn1d``),
otherwise one batched forward (:meth:`FlatModel.batched_named`: grouped
convolutions for ``cnn``, ``torch.func.vmap`` for a user's own module) and one
backward. Models that name a ``batched_chunk`` train in groups of that many
clients of similar size, on parallel threads when torch has more than one.

Notes
-----
The sum of the clients' losses has, for client ``i``, the gradient of client
``i``'s own loss (the clients share no parameters), so one backward pass gives
every client's gradient.

Deduplication: a minibatch of ``B`` draws with replacement from ``n < B``
examples repeats examples. The mean loss over the draws equals
``sum_j (c_j / B) * loss_j`` over the client's ``n`` examples with draw counts
``c_j``, so a client with ``n <= B`` examples is evaluated once per example
with weights instead of ``B`` times (and a grouped model evaluates each step's
distinct draws once, whatever ``n``). The result is the same gradient up to
float rounding (the summation order differs), not the same bits.

The batched path agrees with the per-client path to float tolerance, not bit
for bit: batched matrix products round differently. Engines that must produce
identical bytes (the simulator vs Flower comparison) use the per-client path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from adaquantfl.data import ClientData
from adaquantfl.fl.client import LocalTraining, draw_minibatches
from adaquantfl.models import FlatModel

__all__ = ["BatchedTrainer", "can_vectorize"]

_EVAL_CHUNK = 8192

logger = logging.getLogger(__name__)


def can_vectorize(model: FlatModel, input_shape: tuple[int, ...]) -> tuple[bool, str]:
    """Probe whether ``model``'s flat forward can be vmapped and differentiated.

    Returns ``(ok, reason)``; the reason is logged by the simulator when it
    falls back to the per-client path.
    """
    try:
        w = torch.zeros(2, model.numel, requires_grad=True)
        x = torch.zeros(2, 1, *input_shape)
        out = model.batched(w, x)
        torch.autograd.backward(out.sum())
    except Exception as exc:  # any failure means: use the per-client path
        return False, f"{type(exc).__name__}: {exc}"
    if w.grad is None:
        return False, "the forward does not depend on the flat parameters"
    return True, "vmap over the flat forward works"


@dataclass(frozen=True)
class _Plan:
    """How one round's minibatches are laid out for the batched steps."""

    x: torch.Tensor  # (tau, m, k, *shape): the examples of every step
    y: torch.Tensor  # (tau, m, k)
    weights: torch.Tensor  # (tau, m, k): per-example weight in the loss (sum 1 per client)
    deduplicated: int  # clients evaluated on their own examples with draw counts

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, weights)`` of local step ``step``, each ``(m, k, ...)``."""
        return self.x[step], self.y[step], self.weights[step]


#: ``(x, y, weights)`` of one local step, each ``(m, k, ...)``.
_Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _Group:
    """Clients trained together, each step on its own distinct draws (``k`` varies by step)."""

    rows: list[int]  # positions of the group's clients among the round's
    steps: list[_Step]


@dataclass(frozen=True)
class _GroupedPlan:
    """A round's minibatches for models trained in groups of clients (``batched_chunk``)."""

    m: int
    groups: list[_Group]


class BatchedTrainer:
    """Runs local SGD for many clients at once.

    Parameters
    ----------
    model : FlatModel
    training : LocalTraining
    deduplicate : bool
        Evaluate clients with at most ``B`` examples once per example with
        draw-count weights (exact up to rounding) instead of once per draw.
        Models trained in groups of clients (``FlatModel.batched_chunk``)
        evaluate each step's distinct draws once, whatever the client's size.
    manual_gradients : bool
        Use the model's hand-written batched SGD step where it has one
        (logistic regression and the MLP): the same math as autograd, with each
        weight update fused into one GEMM. Other models use autograd.
    """

    def __init__(
        self,
        model: FlatModel,
        training: LocalTraining,
        *,
        deduplicate: bool = True,
        manual_gradients: bool = True,
    ):
        self.model = model
        self.training = training
        self.deduplicate = deduplicate
        self.manual_gradients = manual_gradients

    def _total_loss(
        self,
        w: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """``sum_i sum_j weights_ij * CE(f(w_i; x_ij), y_ij)``: every client's loss, summed."""
        logits = self.model.batched_named(w, x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return (losses * weights.flatten()).sum()

    @property
    def _manual(self) -> bool:
        return self.manual_gradients and self.model.has_batched_sgd_step

    def plan(
        self, shards: Sequence[ClientData], generators: Sequence[torch.Generator]
    ) -> _Plan | _GroupedPlan:
        """Draw every client's minibatches (same streams as the per-client path) and stack them."""
        t = self.training
        batches = [draw_minibatches(len(s), t, g) for s, g in zip(shards, generators, strict=True)]
        if self.model.batched_chunk is not None:
            return self._grouped_plan(shards, batches, self.model.batched_chunk)
        dedup = self.deduplicate and max(len(s) for s in shards) <= t.batch_size
        if not dedup:
            x = torch.stack([s.x[idx] for s, idx in zip(shards, batches, strict=True)], dim=1)
            y = torch.stack([s.y[idx] for s, idx in zip(shards, batches, strict=True)], dim=1)
            weights = torch.full(y.shape, 1.0 / t.batch_size, device=y.device)
            return _Plan(x, y, weights, 0)
        # Every client has at most B examples: each step evaluates a client's
        # examples once, weighted by how often that step's minibatch drew them.
        k = max(len(s) for s in shards)
        m = len(shards)
        shape = shards[0].x.shape[1:]
        device = shards[0].x.device
        xs = torch.zeros(m, k, *shape, dtype=shards[0].x.dtype, device=device)
        ys = torch.zeros(m, k, dtype=torch.int64, device=device)
        weights = torch.zeros(t.local_steps, m, k, device=device)
        for i, (s, idx) in enumerate(zip(shards, batches, strict=True)):
            n = len(s)
            xs[i, :n] = s.x
            ys[i, :n] = s.y
            counts = torch.zeros(t.local_steps, n)
            counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
            weights[:, i, :n] = counts / t.batch_size
        x = xs.unsqueeze(0).expand(t.local_steps, *xs.shape)
        y = ys.unsqueeze(0).expand(t.local_steps, *ys.shape)
        return _Plan(x, y, weights, m)

    def _grouped_plan(
        self, shards: Sequence[ClientData], batches: Sequence[torch.Tensor], size: int
    ) -> _GroupedPlan:
        """Groups of ``size`` clients of similar size; each step pads to the group's most draws.

        A minibatch of ``B`` draws from ``n`` examples holds about
        ``n (1 - exp(-B / n))`` distinct ones (20 of 32 for ``n = 32``); each is
        evaluated once, weighted by its draw count. Grouping clients by size
        keeps the padding small: on mnist-5k over 100 clients, groups of 4 do
        71% of the work of ``B`` draws per client.
        """
        t = self.training
        draws, counts = self._distinct(torch.stack(list(batches)))
        distinct = (counts > 0).sum(dim=2)  # (m, tau): distinct draws of each client and step
        # Every client's examples in one tensor: client i's example j is row offset[i] + j.
        sizes = torch.tensor([len(s) for s in shards])
        offsets = (torch.cumsum(sizes, 0) - sizes).unsqueeze(1)
        x_all = torch.cat([s.x for s in shards])
        y_all = torch.cat([s.y for s in shards])
        order = sorted(range(len(shards)), key=lambda i: len(shards[i]))
        groups = []
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            steps = []
            for step in range(t.local_steps):
                k = int(distinct[rows, step].max())
                idx = (offsets[rows] + draws[rows, step, :k]).to(x_all.device)
                weights = (counts[rows, step, :k] / t.batch_size).to(x_all.device)
                steps.append((x_all[idx], y_all[idx], weights))
            groups.append(_Group(rows, steps))
        return _GroupedPlan(len(shards), groups)

    def _distinct(self, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's distinct draws first, and their counts (0 after the last).

        ``draws`` is ``(..., B)``; so are both results. Without deduplication
        every draw counts once.
        """
        if not self.deduplicate:
            return draws, torch.ones(draws.shape)
        ordered, _ = torch.sort(draws, dim=-1)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
        slot = torch.cumsum(first, dim=-1) - 1  # the slot of each draw's distinct value
        counts = torch.zeros(draws.shape).scatter_add_(-1, slot, torch.ones(draws.shape))
        values = torch.zeros_like(draws).scatter_(-1, slot, ordered)
        return values, counts

    def initial_losses(self, params: torch.Tensor, shards: Sequence[ClientData]) -> list[float]:
        """Every client's mean loss ``F_i(w_k)`` on its own data, for the common model ``params``.

        All clients evaluate the same model, so this is one forward pass over
        their concatenated data (in chunks), with per-sample losses summed per
        client in float64, as :func:`adaquantfl.fl.client.evaluate` does.
        """
        sizes = [len(s) for s in shards]
        x = torch.cat([s.x for s in shards])
        owner = torch.repeat_interleave(
            torch.arange(len(shards), device=x.device), torch.tensor(sizes, device=x.device)
        )
        totals = torch.zeros(len(shards), dtype=torch.float64, device=x.device)
        y = torch.cat([s.y for s in shards])
        chunk = self.model.eval_chunk or _EVAL_CHUNK
        with torch.no_grad():
            for start in range(0, len(y), chunk):
                stop = start + chunk
                losses = F.cross_entropy(
                    self.model(params, x[start:stop]), y[start:stop], reduction="none"
                )
                totals.index_add_(0, owner[start:stop], losses.to(torch.float64))
        return [float(t) / n for t, n in zip(totals, sizes, strict=True)]

    def train(self, params: torch.Tensor, plan: _Plan | _GroupedPlan) -> torch.Tensor:
        """Local models of all clients, shape ``(m, d)``, from the common start ``params``."""
        train = self._train_manual if self._manual else self._train_autograd
        if isinstance(plan, _GroupedPlan):
            local = params.new_empty(plan.m, params.numel())
            trained = _in_parallel(lambda g: train(params, len(g.rows), g.steps), plan.groups)
            for group, rows in zip(plan.groups, trained, strict=True):
                local[group.rows] = rows
            return local
        steps = [plan.at(step) for step in range(self.training.local_steps)]
        return train(params, plan.y.shape[1], steps)

    def _train_manual(self, params: torch.Tensor, m: int, steps: Sequence[_Step]) -> torch.Tensor:
        """Local models of ``m`` clients by the model's hand-written steps, ``steps[t]`` at t."""
        lr = self.training.lr
        with torch.no_grad():
            sgd = self.model.batched_sgd(
                self._stacked(params, m), max(s[1].shape[1] for s in steps)
            )
            self._descend(sgd.params, lambda step: sgd.step_(*steps[step], lr))
            return self.model.flatten_named(sgd.named())

    def _stacked(self, params: torch.Tensor, m: int) -> dict[str, torch.Tensor]:
        # One stacked tensor per parameter, not views of one (m, d) tensor: the
        # backward of a slice allocates and fills a full (m, d) gradient, which
        # cost more than the whole forward and backward of a small model.
        return {
            name: view.detach().unsqueeze(0).expand(m, *view.shape).clone()
            for name, view in self.model.unflatten(params.detach()).items()
        }

    def _descend(self, leaves: list[torch.Tensor], step_: Callable[[int], None]) -> None:
        """``tau`` steps of ``step_``, each followed by FedProx's proximal step when ``mu > 0``.

        The term ``(mu / 2) ||w_i - w_k||^2`` has the gradient ``mu (w_i - w_k)``,
        taken at the step's starting point, as autograd does in
        :func:`adaquantfl.fl.client.local_sgd`.
        """
        lr, mu = self.training.lr, self.training.prox_mu
        starts = [leaf.detach().clone() for leaf in leaves] if mu else []
        for step in range(self.training.local_steps):
            prox = [mu * (leaf - s0) for leaf, s0 in zip(leaves, starts, strict=False)]
            step_(step)
            for leaf, grad in zip(leaves, prox, strict=False):
                leaf.sub_(grad, alpha=lr)

    def _train_autograd(
        self,
        params: torch.Tensor,
        m: int,
        steps: Sequence[_Step],
    ) -> torch.Tensor:
        """Local models of ``m`` clients: autograd over the batched forward, ``steps[t]`` at t."""
        w = self._stacked(params, m)
        leaves = [leaf.requires_grad_(True) for leaf in w.values()]
        lr = self.training.lr

        def step_(step: int) -> None:
            with torch.enable_grad():
                grads = torch.autograd.grad(self._total_loss(w, *steps[step]), leaves)
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.sub_(grad, alpha=lr)

        with torch.no_grad():
            self._descend(leaves, step_)
        return self.model.flatten_named({k: v.detach() for k, v in w.items()})


_T = TypeVar("_T")


def _in_parallel(fn: Callable[[_T], torch.Tensor], items: Sequence[_T]) -> list[torch.Tensor]:
    """``[fn(x) for x in items]``, on up to ``torch.get_num_threads()`` threads.

    Groups of clients are independent and sized to keep their work in cache,
    so their ops are small. With ``T > 1`` torch threads the groups train on
    ``T`` Python threads, each running single-threaded ops (torch's thread
    count is 1 meanwhile, even for a single group, and restored after):
    intra-op threads meet at a barrier after every op, and on a loaded 2-core
    machine their spin-waits made a 2-thread cnn1d round up to 50x slower than
    a 1-thread one. A group's own ops are the same either way.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        if len(items) == 1:
            return [fn(items[0])]
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
