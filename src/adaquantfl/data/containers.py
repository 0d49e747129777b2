"""Containers for one client's samples and for a whole federated data set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["ArraySplit", "ClientData", "FederatedData"]


class ArraySplit(NamedTuple):
    """A centralised train/test split as NumPy arrays, before partitioning.

    ``x_*`` are ``float32`` of shape ``(n, *input_shape)``; ``y_*`` are
    ``int64`` of shape ``(n,)``.
    """

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]


@dataclass(frozen=True)
class ClientData:
    """The samples held by one client (or the global test set).

    Parameters
    ----------
    x : torch.Tensor
        Inputs, ``float32``, shape ``(n, *input_shape)``, contiguous.
    y : torch.Tensor
        Class labels, ``int64``, shape ``(n,)``.

    Raises
    ------
    ValueError
        If the dtypes, shapes or lengths do not match the above.
    """

    x: torch.Tensor = field(repr=False)
    y: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise ValueError(
                f"x and y must be torch tensors, got {type(self.x).__name__} and "
                f"{type(self.y).__name__}"
            )
        if self.x.dtype != torch.float32:
            raise ValueError(f"x must be float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64:
            raise ValueError(f"y must be int64, got {self.y.dtype}")
        if self.x.dim() < 2:
            raise ValueError(f"x must have shape (n, *input_shape), got {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"y must have shape (n,) with n = len(x) = {self.x.shape[0]}, "
                f"got {tuple(self.y.shape)}"
            )
        if not self.x.is_contiguous() or not self.y.is_contiguous():
            raise ValueError("x and y must be contiguous tensors")

    @classmethod
    def from_numpy(cls, x: NDArray[Any], y: NDArray[Any], *, copy: bool = True) -> ClientData:
        """Build from NumPy arrays.

        Parameters
        ----------
        x, y : ndarray
            Inputs (cast to ``float32``) and labels (cast to ``int64``).
        copy : bool, optional
            If true (default), the tensors share no memory with ``x`` and
            ``y``. That matters for cached data (MNIST-1D): a caller that edits
            its tensors in place must not change what the next caller gets.
            Pass false only for fresh arrays nobody else holds.
        """
        x_array = np.array(x, dtype=np.float32, order="C", copy=copy or None)
        y_array = np.array(y, dtype=np.int64, order="C", copy=copy or None)
        if not (x_array.flags.writeable and y_array.flags.writeable):
            # torch.from_numpy cannot honour read-only memory; copy instead.
            x_array, y_array = x_array.copy(), y_array.copy()
        return cls(x=torch.from_numpy(x_array), y=torch.from_numpy(y_array))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"ClientData(n={len(self)}, input_shape={tuple(self.x.shape[1:])})"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample, ``x.shape[1:]``."""
        return tuple(int(d) for d in self.x.shape[1:])


@dataclass(frozen=True)
class FederatedData:
    """A data set split over clients, plus a global test set.

    Parameters
    ----------
    name : str
        The data set's name, a key of :data:`adaquantfl.data.DATASETS`.
    clients : list of ClientData
        Training data, one entry per client; every client has at least one sample.
    test : ClientData
        The global test set.
    num_classes : int
        Number of classes; every label is in ``[0, num_classes)``.
    input_shape : tuple of int
        The shape of one sample, e.g. ``(40,)`` or ``(1, 28, 28)``.

    Raises
    ------
    ValueError
        If the parts disagree on the input shape, a client is empty or a label
        is out of range.
    """

    name: str
    clients: list[ClientData]
    test: ClientData
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("clients must not be empty")
        parts = [(f"client {i}", c) for i, c in enumerate(self.clients)] + [("test", self.test)]
        for label, part in parts:
            if part.input_shape != tuple(self.input_shape):
                raise ValueError(
                    f"{label} has input shape {part.input_shape}, "
                    f"expected {tuple(self.input_shape)}"
                )
            if label != "test" and len(part) == 0:
                raise ValueError(f"{label} has no samples; every client needs at least one")
            if len(part) and (int(part.y.min()) < 0 or int(part.y.max()) >= self.num_classes):
                raise ValueError(
                    f"{label} has labels outside [0, {self.num_classes}): "
                    f"min {int(part.y.min())}, max {int(part.y.max())}"
                )

    @property
    def num_clients(self) -> int:
        """The number of clients, ``len(clients)``."""
        return len(self.clients)

    @property
    def client_sizes(self) -> list[int]:
        """The number of training samples of each client."""
        return [len(c) for c in self.clients]
