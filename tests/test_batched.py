"""The hand-written batched SGD steps of :mod:`adaquantfl.batched` against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaquantfl.batched import Conv1dNetSGD

#: (layers, length, channels): MNIST-1D's ConvBase, odd lengths, and strides
#: and kernels other than ConvBase's (a kernel shorter than its stride included).
GEOMETRIES = [
    pytest.param(((5, 2, 1), (3, 2, 1), (3, 2, 1)), 40, 25, marks=pytest.mark.slow),
    (((5, 2, 1), (3, 2, 1), (3, 2, 1)), 9, 3),
    (((3, 1, 1), (5, 3, 2)), 16, 4),
    (((2, 3, 0), (4, 2, 3)), 20, 2),
]


def init(layers: tuple[tuple[int, int, int], ...], length: int, channels: int, m: int) -> dict:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(0)
    params, cin = {}, 1
    for i, (kernel, stride, pad) in enumerate(layers, start=1):
        params[f"conv{i}.weight"] = torch.randn(m, channels, cin, kernel, generator=g) / kernel
        params[f"conv{i}.bias"] = 0.1 * torch.randn(m, channels, generator=g)
        length, cin = (length + 2 * pad - kernel) // stride + 1, channels
    params["linear.weight"] = torch.randn(m, 5, channels * length, generator=g) / length
    params["linear.bias"] = 0.1 * torch.randn(m, 5, generator=g)
    return params


def forward(p: dict, x: torch.Tensor, layers: tuple[tuple[int, int, int], ...]) -> torch.Tensor:  # type: ignore[type-arg]
    h = x.unsqueeze(1)
    for i, (_, stride, pad) in enumerate(layers, start=1):
        h = torch.relu(
            F.conv1d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=stride, padding=pad)
        )
    return F.linear(h.flatten(1), p["linear.weight"], p["linear.bias"])


@pytest.mark.parametrize(("layers", "length", "channels"), GEOMETRIES, ids=lambda v: str(v))
def test_conv1d_steps_equal_autograd_sgd_per_model(
    layers: tuple[tuple[int, int, int], ...], length: int, channels: int
) -> None:
    m, k, lr = 3, 6, 0.2
    params = init(layers, length, channels, m)
    g = torch.Generator().manual_seed(1)
    sgd = Conv1dNetSGD(params, layers, length=length, batch=k)
    steps = []
    for examples in (k, 3, 1, 5, k):  # distinct draws: fewer examples than the buffers hold
        x = torch.randn(m, examples, length, generator=g)
        y = torch.randint(0, 5, (m, examples), generator=g)
        weights = torch.rand(m, examples, generator=g) / k
        steps.append((x, y, weights))
        sgd.step_(x, y, weights, lr)
    got = sgd.named()
    for i in range(m):
        w = {name: t[i].clone() for name, t in params.items()}
        for x, y, weights in steps:
            for t in w.values():
                t.requires_grad_(True)
            loss = (
                F.cross_entropy(forward(w, x[i], layers), y[i], reduction="none") * weights[i]
            ).sum()
            grads = torch.autograd.grad(loss, list(w.values()))
            w = {
                name: (t - lr * gr).detach() for (name, t), gr in zip(w.items(), grads, strict=True)
            }
        for name, t in w.items():
            torch.testing.assert_close(got[name][i], t, rtol=1e-5, atol=1e-6)
            assert not torch.equal(t, params[name][i])  # every parameter moved


def test_conv1d_state_round_trips_and_leaves_the_input_alone() -> None:
    layers = ((5, 2, 1), (3, 2, 1), (3, 2, 1))
    params = init(layers, 40, 25, 2)
    before = {name: t.clone() for name, t in params.items()}
    sgd = Conv1dNetSGD(params, layers, length=40, batch=4)
    for name, t in sgd.named().items():
        assert torch.equal(t, before[name]) and t.shape == before[name].shape
    sgd.step_(torch.randn(2, 4, 40), torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4), 0.1)
    assert all(torch.equal(params[name], before[name]) for name in params)
    # FedProx's term is applied to `params`: the same numbers as the named view.
    assert sum(t.numel() for t in sgd.params) == sum(t.numel() for t in params.values())


def test_conv1d_state_refuses_more_examples_than_its_buffers() -> None:
    layers = ((3, 2, 1),)
    sgd = Conv1dNetSGD(init(layers, 8, 2, 1), layers, length=8, batch=4)
    with pytest.raises(
        ValueError, match="a step has 5 examples per model; the buffers hold 1 to 4"
    ):
        sgd.step_(torch.randn(1, 5, 8), torch.zeros(1, 5, dtype=torch.int64), torch.ones(1, 5), 0.1)
