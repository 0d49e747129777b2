"""What the ServerApp and the ClientApp share: model, data and the loss, from adaquantfl."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from adaquantfl.data import ClientData, FederatedData, load_federated
from adaquantfl.models import MLP
from adaquantfl.rng import torch_generator


def make_model(data: FederatedData, seed: int) -> nn.Module:
    """The MLP of the paper's digits experiment, initialised from the run seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(data.input_shape[0], data.num_classes)


@functools.lru_cache(maxsize=2)
def load_data(dataset: str, num_partitions: int, seed: int) -> FederatedData:
    """The embedded data set split over ``num_partitions`` clients (same split on every node)."""
    return load_federated(dataset, num_clients=num_partitions, seed=seed)


def mean_loss(model: nn.Module, data: ClientData) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    with torch.no_grad():
        logits = model(data.x)
        loss = float(F.cross_entropy(logits, data.y))
        accuracy = float((logits.argmax(dim=1) == data.y).float().mean())
    return loss, accuracy


def train(
    model: nn.Module,
    data: ClientData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    server_round: int,
    partition_id: int,
    proximal_mu: float = 0.0,
) -> float:
    """Minibatch SGD; returns the mean loss over the steps.

    ``proximal_mu`` > 0 adds FedProx's proximal term ``mu/2 ||w - w_k||^2``
    (the FedProx strategy sends ``proximal-mu`` in the train config).
    """
    gen = torch_generator(seed, purpose="batch", round_idx=server_round, client_id=partition_id)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    received = [p.detach().clone() for p in model.parameters()]
    total = 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        total += float(loss.detach())
        if proximal_mu > 0:
            pairs = zip(model.parameters(), received, strict=True)
            loss = loss + proximal_mu / 2 * sum(((p - w) ** 2).sum() for p, w in pairs)
        loss.backward()
        opt.step()
    return total / steps
