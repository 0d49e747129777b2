"""A model and a data set of your own, named by import path in own-model.toml.

``make_net`` and ``load_wine`` are what ``[model] name = "netlib:make_net"``
and ``[data] dataset = "netlib:load_wine"`` point at. adaquantfl calls each
with the arguments it takes by name: ``input_shape`` and ``num_classes`` for
a model factory, ``seed`` for a data factory.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_wine as sklearn_wine
from sklearn.model_selection import train_test_split
from torch import nn


class WineNet(nn.Module):
    """A small residual MLP with LayerNorm: not one of adaquantfl's shipped models."""

    def __init__(self, num_features: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(num_features, width)
        self.norm = nn.LayerNorm(width)
        self.block = nn.Linear(width, width)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + torch.relu(self.block(self.norm(h)))
        return self.out(h)


def make_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The factory of ``[model] name``: a fresh module for inputs of ``input_shape``."""
    return WineNet(input_shape[0], num_classes)


class CountingNet(WineNet):
    """The same net, with a Python branch on a tensor's value: torch.func cannot vmap it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 1e6:  # data-dependent control flow
            x = x / 1e6
        return super().forward(x)


def make_counting_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CountingNet(input_shape[0], num_classes)


def load_wine(
    seed: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The factory of ``[data] dataset``: scikit-learn's wine data, standardised, 75/25.

    Returns ``(train, test)``, each ``(x, y)``; a torch ``Dataset`` of
    ``(x, y)`` samples would do as well.
    """
    x, y = sklearn_wine(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed % 2**32, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return (as_x(x_train), as_y(y_train)), (as_x(x_test), as_y(y_test))
