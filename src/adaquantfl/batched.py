"""Hand-written batched SGD: ``m`` models, each on its own minibatch, in one computation.

The simulator trains all participants of a round at once (:mod:`adaquantfl.sim.vectorized`).
For the reference models whose gradients are simple to write out, the steps here
do it by hand with batched matrix products (one GEMM per layer and per pass for all
``m`` models) instead of autograd over ``torch.func.vmap``:

- :func:`linear_sgd_`, :func:`cross_entropy_grad`: the pieces of the logistic
  regression and MLP steps (:class:`adaquantfl.models.MLP`);
- :class:`Conv1dNetSGD`: strided 1-D convolutions with ReLU and a linear head
  (the MNIST-1D ``ConvBase``, :class:`adaquantfl.models.CNN1d`), as im2col GEMMs.

Every step minimises, for each model ``i`` independently,
``sum_j weights_ij * CE(f(w_i; x_ij), y_ij)`` with one SGD step of size ``lr``;
the weights carry the ``1/B`` of a minibatch mean (and the draw counts of a
deduplicated minibatch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

__all__ = [
    "BatchedSGD",
    "Conv1dNetSGD",
    "DictSGD",
    "batched_linear",
    "cross_entropy_grad",
    "linear_sgd_",
]


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x[i] @ weight[i].T + bias[i]`` for every model ``i``: (m, k, f) -> (m, k, out)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def cross_entropy_grad(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """d/dlogits of ``sum_j weights_j * CE(logits_j, y_j)``: ``(softmax - onehot) * weights``."""
    grad = torch.softmax(logits, dim=-1)
    grad.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(y, -1, dtype=grad.dtype).unsqueeze(-1))
    return grad.mul_(weights.unsqueeze(-1))


def linear_sgd_(
    weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, lr: float
) -> None:
    """``W -= lr * grad_out^T x`` and ``b -= lr * sum grad_out``, fused into one GEMM per model."""
    weight.baddbmm_(grad_out.transpose(1, 2), x, alpha=-lr)
    bias.sub_(grad_out.sum(dim=1), alpha=lr)


class BatchedSGD(Protocol):
    """Local SGD state of ``m`` models for one round, as a model's hand-written steps keep it.

    ``params`` are the tensors the steps update, in whatever layout the steps
    prefer (FedProx's proximal term is applied to them elementwise, so any
    permutation of the parameters will do); :meth:`named` gives them back in
    the module's own shapes.
    """

    params: list[torch.Tensor]

    def step_(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lr: float) -> None:
        """One SGD step of every model on its own examples ``x[i]`` (in place)."""

    def named(self) -> dict[str, torch.Tensor]:
        """The current parameters as ``{name: (m, *shape)}``."""


StepFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class DictSGD:
    """:class:`BatchedSGD` over named stacked parameters and a step function on them."""

    def __init__(self, params: dict[str, torch.Tensor], step: StepFn) -> None:
        self._named = params
        self._step = step
        self.params = list(params.values())

    def step_(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lr: float) -> None:
        self._step(self._named, x, y, weights, lr)

    def named(self) -> dict[str, torch.Tensor]:
        return self._named


class Conv1dNetSGD:
    """Batched SGD for ``[conv1d - ReLU] x n - linear`` on single-channel 1-D signals.

    Parameters
    ----------
    params : dict of str to Tensor
        ``conv{i}.weight`` ``(m, C_out, C_in, K)``, ``conv{i}.bias``, ``linear.weight``
        ``(m, classes, C * L)`` and ``linear.bias``, stacked over ``m`` models
        (the layout of :class:`adaquantfl.models.CNN1d`). Copied, not modified.
    layers : sequence of (kernel_size, stride, padding)
    length : int
        Signal length of the input.
    batch : int
        The most examples per model in a step; buffers are sized for it, and a
        step may have fewer (a deduplicated minibatch's distinct draws).

    Notes
    -----
    Activations are channels-last ``(m, k, L, C)``, so a strided convolution's
    patches (im2col) are one strided view of the zero-padded input, copied once
    per layer into a buffer whose last column is 1: ``z = P @ [W | b]^T`` is the
    convolution and its bias in one batched GEMM, and the weight update
    ``[W | b] -= lr * dz^T P`` is one fused ``baddbmm_``, as in the MLP step.
    The input gradient ``dP = dz @ W`` is folded back (col2im) by grouping the
    kernel taps by stride phase, one copy and ``ceil(K / s) - 1`` adds.
    All buffers are allocated once per round, not every step: a fresh buffer of
    a few megabytes is new pages, and touching them the first time is a page
    fault each.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        layers: Sequence[tuple[int, int, int]],
        *,
        length: int,
        batch: int,
    ) -> None:
        first = params["conv1.weight"]
        m = first.shape[0]
        self.m, self.k, self._capacity = m, 0, batch
        dtype, device = first.dtype, first.device
        self._geometry: list[tuple[int, int, int, int, int, int, int]] = []
        self._weights: list[torch.Tensor] = []  # (m, C_out, K * C_in + 1): taps major, bias last
        # Storage for `batch` examples per model, viewed as the buffers for `k <= batch`
        # (see _layout): zero-padded channels-last inputs (m, k, Lp, C_in), patches
        # (m, k, L_out, K * C_in + 1) whose last column is 1, pre-activations
        # (m, k * L_out, C_out) and input gradients (m, k, rows, stride, C_in).
        self._storage: list[dict[str, torch.Tensor]] = []
        lin, cin = length, 1
        for i, (kernel, stride, pad) in enumerate(layers, start=1):
            w, b = params[f"conv{i}.weight"], params[f"conv{i}.bias"]
            cout = w.shape[1]
            lout = (lin + 2 * pad - kernel) // stride + 1
            self._weights.append(
                torch.cat([w.permute(0, 1, 3, 2).reshape(m, cout, -1), b.unsqueeze(-1)], dim=2)
            )
            # Rows of `stride` positions: every tap's contribution is a slice of whole rows.
            rows = max(-(-(lin + pad) // stride), lout + -(-kernel // stride) - 1)
            sizes = {
                "inputs": (lin + 2 * pad) * cin,
                "patches": lout * (kernel * cin + 1),
                "pre": lout * cout,
                "grads": rows * stride * cin if i > 1 else 0,
            }
            self._storage.append(
                {
                    key: torch.zeros(m * batch * size, dtype=dtype, device=device)
                    for key, size in sizes.items()
                }
            )
            self._geometry.append((kernel, stride, pad, cin, cout, lin, lout))
            lin, cin = lout, cout
        self._channels, self._length = cin, lin
        classes = params["linear.weight"].shape[1]
        # The linear layer reads (L, C) order here, (C, L) in the module.
        linear = params["linear.weight"].view(m, classes, cin, lin)
        self._linear = linear.transpose(2, 3).reshape(m, classes, -1).clone()
        self._linear_bias = params["linear.bias"].clone()
        self._feature_storage = torch.empty(m * batch * lin * cin, dtype=dtype, device=device)
        self.params = [*self._weights, self._linear, self._linear_bias]
        self._layout(batch)

    def _layout(self, k: int) -> None:
        """View the storage as the buffers for ``k`` examples per model and step.

        A deduplicated step evaluates only its distinct draws, so ``k`` varies
        from step to step; the views are contiguous for any ``k``, and the
        entries that must hold a constant (the patches' column of ones, the
        inputs' zero padding) are set again whenever ``k`` changes.
        """
        if not 1 <= k <= self._capacity:
            raise ValueError(
                f"a step has {k} examples per model; the buffers hold 1 to {self._capacity}"
            )
        m = self.m
        self._inputs: list[torch.Tensor] = []
        self._patches: list[torch.Tensor] = []
        self._pre: list[torch.Tensor] = []
        self._grads: list[torch.Tensor | None] = []
        for store, (kernel, stride, pad, cin, cout, lin, lout) in zip(
            self._storage, self._geometry, strict=True
        ):
            inputs = store["inputs"][: m * k * (lin + 2 * pad) * cin].view(m, k, -1, cin)
            inputs[:, :, :pad].zero_()
            inputs[:, :, pad + lin :].zero_()
            patches = store["patches"][: m * k * lout * (kernel * cin + 1)].view(m, k, lout, -1)
            patches[..., -1] = 1.0
            grads = store["grads"]
            self._inputs.append(inputs)
            self._patches.append(patches)
            self._pre.append(store["pre"][: m * k * lout * cout].view(m, k * lout, cout))
            if grads.numel():
                self._grads.append(
                    grads[: grads.numel() // self._capacity * k].view(m, k, -1, stride, cin)
                )
            else:
                self._grads.append(None)
        features = self._feature_storage[: m * k * self._length * self._channels]
        self._features = features.view(m, k, -1)
        self.k = k

    def named(self) -> dict[str, torch.Tensor]:
        m = self.m
        out: dict[str, torch.Tensor] = {}
        for i, (w, (kernel, _, _, cin, cout, _, _)) in enumerate(
            zip(self._weights, self._geometry, strict=True), start=1
        ):
            out[f"conv{i}.weight"] = (
                w[:, :, :-1].reshape(m, cout, kernel, cin).permute(0, 1, 3, 2).contiguous()
            )
            out[f"conv{i}.bias"] = w[:, :, -1].contiguous()
        c, length = self._channels, self._length
        classes = self._linear.shape[1]
        out["linear.weight"] = (
            self._linear.view(m, classes, length, c).transpose(2, 3).reshape(m, classes, -1)
        ).contiguous()
        out["linear.bias"] = self._linear_bias.clone()
        return out

    def step_(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lr: float) -> None:
        if x.shape[1] != self.k:
            self._layout(x.shape[1])
        m, k, n = self.m, self.k, len(self._geometry)
        _, _, pad, _, _, lin, _ = self._geometry[0]
        self._inputs[0][:, :, pad : pad + lin, 0] = x.reshape(m, k, lin)
        for i, (kernel, stride, _, cin, cout, _, lout) in enumerate(self._geometry):
            patches = self._patches[i]
            windows = self._inputs[i].unfold(2, kernel, stride).transpose(3, 4)
            patches[..., :-1].view(m, k, lout, kernel, cin).copy_(windows)
            pre = self._pre[i]
            torch.bmm(patches.view(m, k * lout, -1), self._weights[i].transpose(1, 2), out=pre)
            if i + 1 < n:
                nxt = self._geometry[i + 1][2]
                out = self._inputs[i + 1][:, :, nxt : nxt + lout]
            else:
                out = self._features.view(m, k, lout, cout)
            torch.clamp_min(pre.view(m, k, lout, cout), 0.0, out=out)
        features = self._features
        grad_out = cross_entropy_grad(
            batched_linear(features, self._linear, self._linear_bias), y, weights
        )
        grad = torch.bmm(grad_out, self._linear)  # before the linear layer changes
        linear_sgd_(self._linear, self._linear_bias, grad_out, features, lr)
        for i in range(n - 1, -1, -1):
            kernel, stride, pad, cin, cout, lin, lout = self._geometry[i]
            weight = self._weights[i]
            # ReLU's gradient: pre-activation > 0 exactly where the output is.
            grad_pre = torch.ops.aten.threshold_backward(
                grad.view(m, k, lout, cout), self._pre[i].view(m, k, lout, cout), 0.0
            ).view(m, k * lout, cout)
            if i > 0:
                # A contiguous copy of the weights (without the bias column): bmm on
                # the strided slice took twice as long as on a copy.
                grad = self._col2im(i, torch.bmm(grad_pre, weight[:, :, :-1].contiguous()))
            weight.baddbmm_(
                grad_pre.transpose(1, 2), self._patches[i].view(m, k * lout, -1), alpha=-lr
            )

    def _col2im(self, i: int, grad_patches: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. layer ``i``'s unpadded input ``(m, k, L_in, C_in)`` from its patches'."""
        kernel, stride, pad, cin, _, lin, lout = self._geometry[i]
        m, k = self.m, self.k
        buf = self._grads[i]
        if buf is None:  # pragma: no cover - only the first layer has none, and needs none
            raise RuntimeError("the first layer's input needs no gradient")
        taps = grad_patches.view(m, k, lout, kernel, cin)
        # Tap j = q * stride + r lands on position (l + q) * stride + r.
        first = min(stride, kernel)
        if first < stride:
            buf.zero_()
        else:
            buf[:, :, lout:].zero_()
        buf[:, :, :lout, :first].copy_(taps[:, :, :, :first])
        for q in range(1, -(-kernel // stride)):
            width = min(stride, kernel - q * stride)
            buf[:, :, q : q + lout, :width] += taps[:, :, :, q * stride : q * stride + width]
        return buf.view(m, k, -1, cin)[:, :, pad : pad + lin]
