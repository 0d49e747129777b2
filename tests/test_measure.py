"""What a client measures of its update at model scale: close to exact, no float64 copies."""

from __future__ import annotations

import math

import pytest
import torch

from adaquantfl.compression import TopKCompressor, measure
from adaquantfl.fl.client import all_finite


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- sums and checks


def test_sums_agree_with_exact_float64_sums() -> None:
    x = torch.randn(300_001, generator=gen(1)) * torch.rand(300_001, generator=gen(2)) ** 4
    y = x + torch.randn(300_001, generator=gen(3)) * 1e-3
    squares = (x.double() ** 2).tolist()
    errors = ((y.double() - x.double()) ** 2).tolist()
    assert measure.sum_squares(x) == pytest.approx(math.fsum(squares), rel=1e-14)
    assert measure.squared_error(x, y) == pytest.approx(math.fsum(errors), rel=1e-14)
    with pytest.raises(ValueError, match="entries"):
        measure.squared_error(x, y[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_all_finite_reads_every_entry_of_any_float_tensor(dtype: torch.dtype) -> None:
    x = torch.randn(5, 4099, generator=gen()).to(dtype)
    assert all_finite(x) and all_finite(x.t()) and all_finite(x[:, ::3])
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[4, 4098] = bad
        assert not all_finite(y) and not all_finite(y.t()) and not measure.all_finite(y)


# --------------------------------------------------------------------------- any compressor


@pytest.mark.parametrize("residual", ["none", "own buffer", "in place"])
def test_compress_measured_decodes_once_for_any_compressor(residual: str) -> None:
    # Top-k has no measuring encoder: the default decodes the payload.
    compressor = TopKCompressor(0.01)
    x = torch.randn(50_000, generator=gen(4))
    v = x.clone()
    target = {"none": None, "own buffer": torch.full_like(v, float("nan")), "in place": v}[residual]
    payload, norm_sq, error_sq = measure.compress_measured(
        compressor, v, 3, generator=gen(5), scale=0.5, residual=target
    )
    assert payload == compressor.compress(x, 3, generator=gen(5))
    sent = compressor.decompress(payload, numel=x.numel(), levels=3).mul_(0.5)
    assert norm_sq == measure.sum_squares(x)
    assert error_sq == measure.squared_error(x, sent)
    if target is not None:
        assert torch.equal(target, x - sent)
    if residual != "in place":
        assert torch.equal(v, x)
