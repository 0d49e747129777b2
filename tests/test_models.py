"""Tests of the reference models and the flat-parameter view."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaquantfl.models import MODELS, CNN1d, FlatModel, make_model

# conv1 (1 -> 25, kernel 5), conv2 and conv3 (25 -> 25, kernel 3), linear (25 * 5 -> 10)
CNN1D_MNIST1D_NUMEL = (1 * 5 + 1) * 25 + 2 * (25 * 3 + 1) * 25 + 25 * 5 * 10 + 10


@pytest.mark.parametrize(
    ("name", "shape", "numel"),
    [
        ("logreg", (40,), 40 * 10 + 10),
        ("mlp", (64,), 64 * 200 + 200 + 200 * 10 + 10),
        ("cnn", (1, 28, 28), 1 * 16 * 25 + 16 + 16 * 32 * 25 + 32 + 32 * 7 * 7 * 10 + 10),
        ("cnn", (3, 32, 32), 3 * 16 * 25 + 16 + 16 * 32 * 25 + 32 + 32 * 8 * 8 * 10 + 10),
        ("cnn1d", (40,), CNN1D_MNIST1D_NUMEL),
    ],
    ids=["logreg", "mlp", "cnn-mnist", "cnn-cifar", "cnn1d-mnist1d"],
)
def test_shapes_and_parameter_counts(name: str, shape: tuple[int, ...], numel: int) -> None:
    model = make_model(name, shape, 10)
    assert model.numel == numel
    params = model.initial_parameters(generator=torch.Generator().manual_seed(0))
    assert params.shape == (numel,) and params.dtype == torch.float32
    logits = model(params, torch.randn(4, *shape))
    assert logits.shape == (4, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flat_forward_equals_the_module_forward(name: str) -> None:
    shape = (1, 28, 28) if name == "cnn" else (12,)
    model = make_model(name, shape, 5)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(1))
    model.module.load_state_dict(model.state_dict(params))
    x = torch.randn(3, *shape)
    torch.testing.assert_close(model(params, x), model.module(x))


def test_flat_forward_is_differentiable_in_the_flat_vector() -> None:
    model = make_model("mlp", (6,), 3)
    w = model.initial_parameters(generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    model(w, torch.randn(2, 6)).sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_initialisation_is_seeded_and_leaves_global_rng_alone() -> None:
    model = make_model("mlp", (6,), 3)
    state = torch.random.get_rng_state()
    a = model.initial_parameters(generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = model.initial_parameters(generator=torch.Generator().manual_seed(5))
    c = model.initial_parameters(generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(
        model.initial_parameters("zero", generator=torch.Generator()), torch.zeros(model.numel)
    )


def test_bad_names_and_shapes() -> None:
    with pytest.raises(ValueError, match="allowed"):
        make_model("resnet", (4,), 2)
    with pytest.raises(ValueError, match="square images"):
        make_model("cnn", (64,), 10)
    with pytest.raises(ValueError, match="1-D signals"):
        make_model("cnn1d", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="length >= 3"):
        make_model("cnn1d", (2,), 10)
    with pytest.raises(ValueError, match="init"):
        make_model("logreg", (4,), 2).initial_parameters("he", generator=torch.Generator())
    with pytest.raises(ValueError, match="buffers"):
        FlatModel(torch.nn.BatchNorm1d(3))


# ---------------------------------------------------------------------------
# cnn1d: the MNIST-1D paper's ConvBase


def _convbase_forward(module: CNN1d, x: torch.Tensor) -> torch.Tensor:
    """``ConvBase.forward`` of the MNIST-1D repository, on the module's own layers."""
    x = x.view(-1, 1, x.shape[-1])
    h1 = module.conv1(x).relu()
    h2 = module.conv2(h1).relu()
    h3 = module.conv3(h2).relu()
    return module.linear(h3.view(h3.shape[0], -1))  # type: ignore[no-any-return]


def test_cnn1d_is_the_papers_convbase() -> None:
    model = make_model("cnn1d", (40,), 10)
    module = model.module
    assert isinstance(module, CNN1d)
    layers = [
        (m.kernel_size[0], m.stride[0], m.padding[0])
        for m in (module.conv1, module.conv2, module.conv3)
    ]
    assert layers == [(5, 2, 1), (3, 2, 1), (3, 2, 1)]
    assert module.linear.in_features == 125  # ConvBase's linear_in on 40-sample signals
    assert model.numel == CNN1D_MNIST1D_NUMEL == 5210


def test_cnn1d_functional_forward_equals_the_layer_by_layer_forward() -> None:
    model = make_model("cnn1d", (40,), 10)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(3))
    model.module.load_state_dict(model.state_dict(params))
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(4))

    flat = model(params, x)
    static = CNN1d.functional_forward(model.unflatten(params), x)
    reference = _convbase_forward(model.module, x)  # type: ignore[arg-type]

    torch.testing.assert_close(flat, reference)
    torch.testing.assert_close(static, reference)


def test_cnn1d_flat_vector_round_trips() -> None:
    model = make_model("cnn1d", (40,), 10)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(5))

    model.module.load_state_dict(model.state_dict(params))
    back = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    stacked = torch.stack([params, 2 * params])
    again = model.flatten_named(model.unflatten_batched(stacked))

    assert torch.equal(back, params)
    assert torch.equal(again, stacked)
    assert {name for name, _ in model.module.named_parameters()} == set(model.unflatten(params))


def test_cnn1d_trains() -> None:
    """Full-batch SGD on bumps whose position is the class: the loss must fall."""
    g = torch.Generator().manual_seed(0)
    model = make_model("cnn1d", (40,), 10)
    w = model.initial_parameters(generator=g)
    y = torch.arange(64) % 10
    t = torch.arange(40.0)
    x = torch.exp(-0.5 * ((t - (2 + 4 * y[:, None])) / 1.5) ** 2)
    x = x + 0.1 * torch.randn(64, 40, generator=g)
    first = float(F.cross_entropy(model(w, x), y))

    for _ in range(40):
        w.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(w, x), y), w)
        w = (w - 0.5 * grad).detach()
    last = float(F.cross_entropy(model(w, x), y))

    assert first == pytest.approx(2.3, abs=0.1)  # near log(10) at initialisation
    assert last < 0.1 * first


def test_cnn_pools_before_its_relu_with_the_same_values_and_gradients() -> None:
    """relu(maxpool(z)) is maxpool(relu(z)) bit for bit, and so are the gradients.

    Blank image regions make exactly tied windows, positive (bias > 0) and not.
    """
    model = make_model("cnn", (1, 12, 12), 3)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(6))
    x = torch.zeros(4, 1, 12, 12)
    x[:, :, 3:7, 2:9] = torch.rand(4, 1, 4, 7, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 1, 2, 1])

    def relu_then_pool(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(
            torch.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2)), 2
        )
        h = torch.max_pool2d(
            torch.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=2)), 2
        )
        return F.linear(h.flatten(1), p["fc.weight"], p["fc.bias"])

    results = []
    for forward in (lambda w: model(w, x), lambda w: relu_then_pool(model.unflatten(w), x)):
        w = params.clone().requires_grad_(True)
        logits = forward(w)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), w)
        results.append((logits.detach(), grad))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert float(ga.abs().sum()) > 0


def test_cnn_evaluates_without_autograd_to_the_same_bits() -> None:
    model = make_model("cnn", (1, 12, 12), 3)
    params = model.initial_parameters(generator=torch.Generator().manual_seed(8))
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(9))
    x[:, :, :4] = 0.0  # tied windows
    with torch.no_grad():
        fast = model(params, x)
    assert torch.equal(fast, model(params, x).detach())  # grad mode: max_pool2d
