"""Tests of the reference models and the flat-parameter view."""

from __future__ import annotations

import pytest
import torch

from adaquantfl.models import MODELS, FlatModel, make_model


@pytest.mark.parametrize(
    ("name", "shape", "numel"),
    [
        ("logreg", (40,), 40 * 10 + 10),
        ("mlp", (64,), 64 * 200 + 200 + 200 * 10 + 10),
        ("cnn", (1, 28, 28), 1 * 16 * 25 + 16 + 16 * 32 * 25 + 32 + 32 * 7 * 7 * 10 + 10),
        ("cnn", (3, 32, 32), 3 * 16 * 25 + 16 + 16 * 32 * 25 + 32 + 32 * 8 * 8 * 10 + 10),
    ],
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
    with pytest.raises(ValueError, match="init"):
        make_model("logreg", (4,), 2).initial_parameters("he", generator=torch.Generator())
    with pytest.raises(ValueError, match="buffers"):
        FlatModel(torch.nn.BatchNorm1d(3))
