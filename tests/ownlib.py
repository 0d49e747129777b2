"""A user's own models and data sets, for tests/test_own_model.py (named by import path)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class TwoLayer(nn.Module):
    """A net whose weights are drawn in __init__ from PyTorch's global generator."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(features, 16) * 0.1)  # no reset_parameters
        self.w2 = nn.Parameter(torch.randn(16, classes) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


def make_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return TwoLayer(int(torch.tensor(input_shape).prod()), num_classes)


def make_item_net(num_classes: int) -> nn.Module:
    """Takes only ``num_classes``; its forward calls .item(), which torch.func cannot vmap."""

    class ItemNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = 1.0 if x.abs().max().item() < 1e6 else 1e-6
            return self.lin(x * scale)

    return ItemNet()


def make_batchnorm_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))


def make_nothing() -> object:
    return "not a module"


def make_failing() -> nn.Module:
    raise RuntimeError("the GPU driver is missing\nsecond line")


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 5)[:, :5].float()
    return x, y


def load_blobs(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Three Gaussian blobs in 5-D: (train, test) as (x, y) tensors."""
    return _blobs(300, seed), _blobs(90, seed + 1)


def load_blobs_dataset() -> dict[str, TensorDataset]:
    """The same data as torch Datasets, in a mapping, from a factory that takes no seed."""
    (xt, yt), (xv, yv) = load_blobs(0)
    return {"train": TensorDataset(xt, yt), "test": TensorDataset(xv, yv)}


def load_negative_labels() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    (xt, yt), test = load_blobs(0)
    return (xt, yt - 1), test


def load_nan() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    (xt, yt), test = load_blobs(0)
    xt[3, 2] = float("nan")
    return (xt, yt), test


def load_one_part() -> tuple[torch.Tensor, torch.Tensor]:
    return load_blobs(0)[0]
