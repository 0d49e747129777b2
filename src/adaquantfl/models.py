"""Reference models and the flat-parameter view the federated loop works on.

The federated algorithm treats a model as one flat float32 vector ``w``
(DESIGN §2: the update is "the whole flattened parameter vector"). A
:class:`FlatModel` pairs an ``nn.Module`` (the architecture, never mutated
during training) with the layout that maps ``w`` to its named parameters, so
the same code can evaluate any ``w`` through ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from adaquantfl.batched import (
    BatchedSGD,
    Conv1dNetSGD,
    DictSGD,
    batched_linear,
    cross_entropy_grad,
    linear_sgd_,
)
from adaquantfl.imports import call_factory, import_object, is_import_path
from adaquantfl.validation import check_choice

__all__ = ["CNN", "MLP", "MODELS", "CNN1d", "FlatModel", "LogisticRegression", "make_model"]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # type: ignore[no-any-return]

    @staticmethod
    def functional_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), p["linear.weight"], p["linear.bias"])

    @staticmethod
    def batched_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return batched_linear(x.flatten(2), p["linear.weight"], p["linear.bias"])

    @staticmethod
    def batched_sgd_step_(
        p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float
    ) -> None:
        """One SGD step on ``sum_j w_ij CE`` for every model, in place, gradients by hand."""
        x = x.flatten(2)
        g = cross_entropy_grad(batched_linear(x, p["linear.weight"], p["linear.bias"]), y, w)
        linear_sgd_(p["linear.weight"], p["linear.bias"], g, x, lr)


class MLP(nn.Module):
    """One hidden ReLU layer on the flattened input (64-200-10 on digits)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 200) -> None:
        super().__init__()
        self.hidden = nn.Linear(num_features, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))  # type: ignore[no-any-return]

    @staticmethod
    def functional_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x.flatten(1), p["hidden.weight"], p["hidden.bias"]))
        return F.linear(h, p["out.weight"], p["out.bias"])

    @staticmethod
    def batched_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(batched_linear(x.flatten(2), p["hidden.weight"], p["hidden.bias"]))
        return batched_linear(h, p["out.weight"], p["out.bias"])

    @staticmethod
    def batched_sgd_step_(
        p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float
    ) -> None:
        """One SGD step on ``sum_j w_ij CE`` for every model, in place, gradients by hand.

        Backpropagation through linear - ReLU - linear written out, so that
        each weight update is one fused GEMM (``W.baddbmm_(g^T, a, alpha=-lr)``)
        and no gradient tensor of the weights' size is ever materialised.
        """
        x = x.flatten(2)
        pre = batched_linear(x, p["hidden.weight"], p["hidden.bias"])
        h = torch.relu(pre)
        g_out = cross_entropy_grad(batched_linear(h, p["out.weight"], p["out.bias"]), y, w)
        g_hidden = torch.bmm(g_out, p["out.weight"]).mul_(pre > 0)  # before W_out changes
        linear_sgd_(p["out.weight"], p["out.bias"], g_out, h, lr)
        linear_sgd_(p["hidden.weight"], p["hidden.bias"], g_hidden, x, lr)


def _max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling of ``(n, C, H, W)`` with even ``H`` and ``W``.

    Without autograd (evaluation) it is two elementwise maxima: the same
    values, without the argmax indices that ``max_pool2d`` computes even under
    ``no_grad`` (about half the forward's time on mnist-5k; over 2x faster this way).
    """
    if torch.is_grad_enabled():
        return torch.max_pool2d(x, 2)
    n, c, h, w = x.shape
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return rows.view(n, c, h // 2, w // 2, 2).amax(dim=-1)


class CNN(nn.Module):
    """A small conv net for 28x28 (MNIST) and 32x32 (CIFAR-10) images.

    conv5x5(16) - ReLU - maxpool2 - conv5x5(32) - ReLU - maxpool2 - linear.
    No BatchNorm or dropout: the model is a pure function of its parameters,
    which keeps every client's computation deterministic and vectorizable.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)
        side = image_size // 4
        self.fc = nn.Linear(32 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional_forward(dict(self.named_parameters()), x)

    #: Clients per grouped convolution in :meth:`batched_forward` (measured on 2 cores:
    #: 2-8 clients per group ran 1.5x faster than one client at a time, and than 40).
    batched_chunk = 4
    #: Images per forward pass when evaluating: 128 MNIST images keep the first
    #: layer's output (6 MB) near the L2 cache; 8192 at a time ran 2.7x slower.
    eval_chunk = 128

    @staticmethod
    def functional_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # ReLU after the pooling: relu(maxpool(z)) = maxpool(relu(z)) bit for bit,
        # with the same argmax (the first of tied maxima; a window whose maximum
        # is <= 0 passes no gradient either way), on a quarter of the entries.
        x = F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2)
        x = torch.relu(_max_pool2(x))
        x = F.conv2d(x, p["conv2.weight"], p["conv2.bias"], padding=2)
        x = torch.relu(_max_pool2(x))
        return F.linear(x.flatten(1), p["fc.weight"], p["fc.bias"])

    @staticmethod
    def batched_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of ``m`` models on their own images ``(m, k, C, H, W)``: ``(m, k, classes)``.

        The ``m`` models' filters are the groups of one grouped convolution over
        ``(k, m * C, H, W)`` in channels-last layout (the per-model layers of
        :meth:`functional_forward` otherwise).
        """
        m, k = x.shape[:2]
        h = x.transpose(0, 1).reshape(k, m * x.shape[2], *x.shape[3:])
        h = h.contiguous(memory_format=torch.channels_last)
        for name in ("conv1", "conv2"):
            weight, bias = p[f"{name}.weight"], p[f"{name}.bias"]
            h = F.conv2d(h, weight.flatten(0, 1), bias.flatten(), padding=2, groups=m)
            h = torch.relu(torch.max_pool2d(h, 2))
        return batched_linear(h.reshape(k, m, -1).transpose(0, 1), p["fc.weight"], p["fc.bias"])


def _conv1d_length(length: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of ``F.conv1d`` on ``length`` samples (no dilation)."""
    return (length + 2 * padding - kernel_size) // stride + 1


class CNN1d(nn.Module):
    """The MNIST-1D paper's ``ConvBase``: three strided 1-D convolutions and a linear layer.

    conv(k5, s2, p1) - ReLU - conv(k3, s2, p1) - ReLU - conv(k3, s2, p1) -
    ReLU - linear, with 25 channels throughout (Greydanus, "Scaling down deep
    learning", 2020, arXiv:2011.14439; ``ConvBase`` in
    github.com/greydanus/mnist1d, notebooks/models.py). The input is a batch of
    1-D signals ``(n, length)``; the single input channel is added here.

    On MNIST-1D's 40 samples the lengths are 40 -> 19 -> 10 -> 5, so the
    linear layer reads 25 * 5 = 125 features and the model has
    (1*5 + 1)*25 + 2*(25*3 + 1)*25 + 125*10 + 10 = 5,210 parameters.

    Notes
    -----
    The paper's code assumes the linear layer reads 125 features; here its
    width is computed from ``length``, so the same architecture runs on any
    signal length the three convolutions accept (>= 3).
    """

    #: Clients per batched computation: 16 clients' activations stay near the L2
    #: cache (measured on 2 cores: 0.14 ms per client and step, 0.23 for 100 at once).
    batched_chunk = 16

    #: ``(kernel_size, stride, padding)`` of conv1..conv3, as in ``ConvBase``.
    LAYERS: tuple[tuple[int, int, int], ...] = ((5, 2, 1), (3, 2, 1), (3, 2, 1))

    def __init__(self, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        length_in = length
        (k1, s1, p1), (k2, s2, p2), (k3, s3, p3) = self.LAYERS
        self.conv1 = nn.Conv1d(1, channels, k1, stride=s1, padding=p1)
        self.conv2 = nn.Conv1d(channels, channels, k2, stride=s2, padding=p2)
        self.conv3 = nn.Conv1d(channels, channels, k3, stride=s3, padding=p3)
        for kernel_size, stride, padding in self.LAYERS:
            length = _conv1d_length(length, kernel_size, stride, padding)
        self.linear = nn.Linear(channels * length, num_classes)
        self.input_length = length_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional_forward(dict(self.named_parameters()), x)

    @staticmethod
    def functional_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, -1)
        for i, (_, stride, padding) in enumerate(CNN1d.LAYERS, start=1):
            h = F.conv1d(
                h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=stride, padding=padding
            )
            h = torch.relu(h)
        return F.linear(h.flatten(1), p["linear.weight"], p["linear.bias"])

    def batched_sgd(self, params: dict[str, torch.Tensor], batch: int) -> BatchedSGD:
        """Hand-written batched SGD steps (im2col GEMMs) for ``m`` stacked copies of this net."""
        return Conv1dNetSGD(params, self.LAYERS, length=self.input_length, batch=batch)


def _logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LogisticRegression(math.prod(input_shape), num_classes)


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes)


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2] or input_shape[1] % 4:
        raise ValueError(
            f"model 'cnn' needs square images (channels, side, side) with side divisible by 4, "
            f"e.g. (1, 28, 28) or (3, 32, 32); the data set has input shape {input_shape}"
        )
    return CNN(input_shape[0], input_shape[1], num_classes)


_CNN1D_MIN_LENGTH = 3  # conv1 (kernel 5, padding 1) needs length + 2 >= 5


def _cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 1 or input_shape[0] < _CNN1D_MIN_LENGTH:
        raise ValueError(
            f"model 'cnn1d' needs 1-D signals (length,) with length >= {_CNN1D_MIN_LENGTH}, "
            f"e.g. MNIST-1D's (40,); the data set has input shape {input_shape}"
        )
    return CNN1d(input_shape[0], num_classes)


#: Model constructors by name: ``(input_shape, num_classes) -> nn.Module``.
MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn1d": _cnn1d,
}

#: Initialisations by name.
INITS: tuple[str, ...] = ("default", "zero")


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class FlatModel:
    """An architecture plus the layout of its parameters in one flat vector.

    Parameters
    ----------
    module : nn.Module
        The architecture. Its own parameter values are only used by
        :meth:`initial_parameters` with ``init="default"``.
    """

    def __init__(self, module: nn.Module) -> None:
        if any(True for _ in module.buffers()):
            raise ValueError(
                "models with buffers (e.g. BatchNorm) are not supported here: the simulator "
                "averages parameters only (the Flower integration carries buffers beside the "
                "update, see docs/flower.md)"
            )
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError("the model has no trainable parameters")
        self.module = module
        slots = []
        offset = 0
        for name, p in module.named_parameters():
            slots.append(_Slot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        self._slots = tuple(slots)
        self.numel = offset
        # The reference models define a stateless forward on a dict of tensors;
        # it skips functional_call's module re-parametrisation, which costs more
        # than the whole forward pass of a small model.
        self._forward = getattr(module, "functional_forward", None)
        self._batched = getattr(module, "batched_forward", None)
        self._batched_step = getattr(module, "batched_sgd_step_", None)
        self._batched_sgd = getattr(module, "batched_sgd", None)
        #: Clients trained together in one batched computation (None: all at once).
        self.batched_chunk: int | None = getattr(module, "batched_chunk", None)
        #: Examples per forward pass in evaluation (None: the evaluator's default).
        self.eval_chunk: int | None = getattr(module, "eval_chunk", None)

    def initial_parameters(
        self, init: str = "default", *, generator: torch.Generator
    ) -> torch.Tensor:
        """A flat float32 initial vector.

        ``"default"`` re-runs each layer's PyTorch initialisation with
        ``generator``'s stream; ``"zero"`` is all zeros (the paper's logistic
        regression start).
        """
        check_choice("init", init, INITS)
        if init == "zero":
            return torch.zeros(self.numel, dtype=torch.float32)
        # PyTorch's reset_parameters draws from the global generator; run it
        # under a fork of the RNG seeded from ours so global state is untouched.
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.module.modules():
                reset = getattr(layer, "reset_parameters", None)
                if callable(reset):
                    reset()
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).to(
            torch.float32
        )

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of ``flat`` shaped like the module's parameters."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self._slots}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model with parameters ``flat`` on inputs ``x``."""
        if self._forward is not None:
            return self._forward(self.unflatten(flat), x)  # type: ignore[no-any-return]
        return functional_call(self.module, self.unflatten(flat), (x,))  # type: ignore[no-any-return]

    def unflatten_batched(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of ``m`` stacked flat vectors ``(m, d)``, each ``(m, *shape)``."""
        m = flat.shape[0]
        return {
            s.name: flat[:, s.offset : s.offset + s.numel].view(m, *s.shape) for s in self._slots
        }

    def batched(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``m`` models ``(m, d)`` on their own inputs ``(m, k, ...)``: ``(m, k, C)``."""
        return self.batched_named(self.unflatten_batched(flat), x)

    def batched_named(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of ``m`` models given as named stacked parameters ``(m, *shape)``.

        Uses the model's own batched forward (batched matrix products) where it
        has one, and ``torch.func.vmap`` over the stateless forward otherwise.
        """
        if self._batched is not None:
            return self._batched(params, x)  # type: ignore[no-any-return]
        out: torch.Tensor = vmap(self._named_forward)(params, x)
        return out

    @property
    def has_batched_sgd_step(self) -> bool:
        """Whether the model provides hand-written batched SGD steps (the reference models)."""
        return self._batched_step is not None or self._batched_sgd is not None

    def batched_sgd(self, params: dict[str, torch.Tensor], batch: int) -> BatchedSGD:
        """The model's hand-written SGD state for the stacked ``params`` ``(m, *shape)``.

        ``batch`` is the number of examples per model and step. ``params`` is
        updated in place by models that keep it as it is (logistic regression,
        the MLP) and copied by those that re-lay it out (the 1-D conv net).
        """
        if self._batched_sgd is not None:
            return self._batched_sgd(params, batch)  # type: ignore[no-any-return]
        if self._batched_step is None:
            raise ValueError("this model has no hand-written batched SGD step; use autograd")
        return DictSGD(params, self._batched_step)

    def batched_sgd_step_(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor,
        lr: float,
    ) -> None:
        """In-place SGD step of m models on ``sum_j weights_ij * CE(f(w_i; x_ij), y_ij)``."""
        if self._batched_step is None:
            raise ValueError("this model has no hand-written batched SGD step; use autograd")
        self._batched_step(params, x, y, weights, lr)

    def _named_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self._forward is not None:
            return self._forward(params, x)  # type: ignore[no-any-return]
        return functional_call(self.module, params, (x,))  # type: ignore[no-any-return]

    def flatten_named(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`unflatten_batched`: ``(m, d)`` from named ``(m, *shape)``."""
        m = next(iter(params.values())).shape[0]
        return torch.cat([params[s.name].reshape(m, s.numel) for s in self._slots], dim=1)

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A ``state_dict`` (cloned tensors) for ``flat``, loadable into the module."""
        return {name: t.clone() for name, t in self.unflatten(flat).items()}


def make_model(
    name: str | nn.Module | Callable[..., nn.Module],
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
) -> FlatModel:
    """Build model ``name`` as a :class:`FlatModel`.

    ``name`` is a key of :data:`MODELS`, or a user's own model: an import path
    ``"package.module:make_net"`` (or a ``"python:"`` name, see
    :mod:`adaquantfl.imports`) of a factory, the factory itself, or an
    ``nn.Module``. A factory is called with those of ``input_shape`` and
    ``num_classes`` that it takes by name and must return an ``nn.Module``
    whose forward maps a batch of inputs to class logits; an ``nn.Module``
    instance is copied, so the caller's stays as it is. A factory runs with
    PyTorch's global generator seeded from ``seed`` (and restored after), so
    that layers it initialises itself come out the same in every run.

    Raises
    ------
    ValueError
        For an unknown name, a path that does not import, a factory that
        fails or returns something else than an ``nn.Module``, or a module
        the federated loop cannot train (buffers, no parameters).
    """
    if isinstance(name, str) and name in MODELS:
        return FlatModel(MODELS[name](tuple(input_shape), num_classes))
    if isinstance(name, str) and not is_import_path(name):
        raise ValueError(
            f"unknown model {name!r}; allowed: {sorted(MODELS)} or an import path "
            "'package.module:factory' of your own (a callable returning an nn.Module)"
        )
    what = f"name {name!r}" if isinstance(name, str) else "model"
    obj = import_object(name, what) if isinstance(name, str) else name
    if isinstance(obj, nn.Module):
        module = copy.deepcopy(obj)
    elif callable(obj):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = call_factory(
                obj, what, input_shape=tuple(input_shape), num_classes=int(num_classes)
            )
    else:
        raise ValueError(f"{what} must be an nn.Module or a factory returning one, got {obj!r:.80}")
    if not isinstance(module, nn.Module):
        raise ValueError(f"{what}: the factory returned {type(module).__name__}, not an nn.Module")
    try:
        return FlatModel(module)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
