"""Tests of the QSGD quantizer: exactness, unbiasedness, variance, determinism, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaquantfl.compression.qsgd import (
    MAX_LEVELS,
    Quantized,
    bits_per_level_index,
    bucket_norms,
    dequantize,
    draw_key,
    num_buckets,
    quantization_variance,
    quantize,
    rounding_uniforms,
)
from tests.reference import (
    GOLDEN,
    MIX1,
    MIX2,
    reference_dequantize,
    reference_norms,
    reference_quantize,
    uniform24,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- exact values


def test_hand_worked_vector_with_integral_ratios_is_deterministic() -> None:
    # ||v|| = 5 and s = 5, so r = s|v|/||v|| = (3, 4, 0) are integers: no rounding noise.
    q = quantize(torch.tensor([3.0, -4.0, 0.0]), 5, generator=gen())
    assert q.norms.tolist() == [5.0]
    assert q.magnitudes.tolist() == [3, 4, 0]
    assert q.signs.tolist() == [False, True, False]
    assert dequantize(q).tolist() == [3.0, -4.0, 0.0]


def test_hand_worked_vector_rounds_with_the_documented_stream() -> None:
    # v = (3, -4), s = 2: r = (1.2, 1.6); entry i rounds up iff u_i < frac_i, where
    # u_i is the stream's 24-bit integer / 2^24 for the key drawn from the generator.
    key = draw_key(gen(7))
    q = quantize(torch.tensor([3.0, -4.0]), 2, generator=gen(7))
    fracs = [np.float32(np.float32(3.0 / 5.0) * 2) - 1, np.float32(np.float32(4.0 / 5.0) * 2) - 1]
    expected = [1 + int(uniform24(key, i) / 2**24 < fracs[i]) for i in range(2)]
    assert q.magnitudes.tolist() == expected
    assert dequantize(q).tolist() == [
        m * 2.5 * sgn for m, sgn in zip(expected, (1, -1), strict=True)
    ]


def test_stream_matches_the_python_splitmix64() -> None:
    key = 0x1234_5678_9ABC_DEF
    fast = rounding_uniforms(key, 5, 200).tolist()
    assert fast == [uniform24(key, i) for i in range(5, 205)]
    # The stream is not trivially constant or sorted.
    assert len(set(fast)) > 190


@pytest.mark.parametrize("levels", [1, 2, 3, 7, 16, 255, 70_000])
@pytest.mark.parametrize("bucket_size", [None, 1, 13, 64])
@pytest.mark.parametrize("norm", ["l2", "max"])
def test_matches_reference_implementation(levels: int, bucket_size: int | None, norm: str) -> None:
    x = torch.randn(300, generator=gen(levels)) * torch.logspace(-3, 2, 300)
    q = quantize(x, levels, generator=gen(1), bucket_size=bucket_size, norm=norm)  # type: ignore[arg-type]
    v = x.numpy()
    ref_norms = reference_norms(v, bucket_size, norm)
    assert q.norms.tolist() == [float(n) for n in ref_norms]  # bit-exact, not just close
    mags, signs = reference_quantize(v, levels, draw_key(gen(1)), ref_norms, bucket_size)
    assert q.magnitudes.tolist() == mags
    assert q.signs.tolist() == signs
    ref = reference_dequantize(mags, signs, list(q.norms.numpy()), levels, bucket_size)
    assert np.array_equal(dequantize(q).numpy(), ref)


def test_blocked_kernel_matches_reference_across_block_boundary() -> None:
    from adaquantfl.compression._kernels import BLOCK

    d = 2 * BLOCK + 37
    x = torch.randn(d, generator=gen(3))
    q = quantize(x, 3, generator=gen(4), bucket_size=1000)
    key = draw_key(gen(4))
    norms = q.norms.numpy()
    for i in np.r_[0:20, BLOCK - 20 : BLOCK + 20, d - 20 : d]:
        r = np.float32(np.float32(abs(x[i].item()) / norms[i // 1000]) * np.float32(3))
        lo = math.floor(r)
        u = np.float32(uniform24(key, int(i))) * np.float32(2.0**-24)
        assert q.magnitudes[i].item() == lo + int(u < np.float32(r - np.float32(lo)))


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 129, 1000])
def test_l2_norm_follows_the_lane_definition_exactly(numel: int) -> None:
    # Entries spanning 12 orders of magnitude make float64 sums order-dependent.
    x = torch.randn(numel, generator=gen(numel)) * torch.logspace(-6, 6, numel)
    (norm,) = bucket_norms(x, None, "l2").tolist()
    assert norm == float(reference_norms(x.numpy(), None, "l2")[0])


def test_lane_order_is_what_the_norm_test_checks() -> None:
    # Negative control: the float64 sums of the 64-lane order and of the plain
    # left-to-right order differ for this vector, so the test above can tell
    # the definitions apart (at float64; float32 rounding hides it mostly).
    from adaquantfl.compression._kernels import fused

    x = (torch.randn(1000, generator=gen(1000)) * torch.logspace(-6, 6, 1000)).numpy()
    lanes = float(fused.block_squares(x, np.zeros(64)))
    plain = 0.0
    for v in x.astype(np.float64):
        plain += v * v
    assert lanes != plain
    assert lanes == pytest.approx(plain, rel=1e-12)


# --------------------------------------------------------------------------- statistics


LEVELS = 3


def _unbiasedness_statistic(quantizer, x: torch.Tensor, draws: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Chi-square statistic of the mean of ``draws`` quantizations against ``x``.

    Every entry's estimate error is (approximately) normal with variance
    var_i / draws, where var_i is the quantizer's exact per-entry variance; the
    sum of squared standardised errors is then chi-square with one degree of
    freedom per entry with var_i > 0.
    """
    d = x.numel()
    # Quantize `draws` independent copies at once: one bucket per copy.
    samples = quantizer(x.repeat(draws), d).view(draws, d).to(torch.float64)
    mean = samples.mean(dim=0)
    norm = float(torch.linalg.vector_norm(x.double()))
    levels = LEVELS
    r = x.abs().double() / norm * levels
    p = r - r.floor()
    var = (norm / levels) ** 2 * p * (1 - p)
    mask = var > 1e-12
    z2 = (mean - x.double())[mask] ** 2 / (var[mask] / draws)
    return float(z2.sum()), int(mask.sum())


def _qsgd(v: torch.Tensor, d: int) -> torch.Tensor:
    return dequantize(quantize(v, LEVELS, generator=gen(11), bucket_size=d))


def _round_to_nearest(v: torch.Tensor, d: int) -> torch.Tensor:
    # Negative control: the same grid, deterministic rounding (biased).
    rows = v.view(-1, d)
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return (torch.round(rows.abs() / norm * LEVELS) * norm / LEVELS * rows.sign()).reshape(-1)


def test_unbiased_chi_square_within_five_sigma() -> None:
    x = torch.randn(64, generator=gen(5))
    stat, dof = _unbiasedness_statistic(_qsgd, x, draws=20_000)
    assert dof > 50
    assert stat < dof + 5 * math.sqrt(2 * dof)


def test_negative_control_round_to_nearest_fails_the_same_test() -> None:
    x = torch.randn(64, generator=gen(5))
    stat, dof = _unbiasedness_statistic(_round_to_nearest, x, draws=20_000)
    assert stat > dof + 5 * math.sqrt(2 * dof)


# --------------------------------------------------------------------------- exact bias


def _key_for(index: int, j24: int) -> int:
    """A stream key (below 2**63 - 1, as ``draw_key`` gives) whose entry ``index`` has ``J = j24``.

    SplitMix64's output function is a bijection of 64-bit states, so it is
    inverted for an output with top 24 bits ``j24``, then the counter's offset
    is removed.
    """
    mask = 2**64 - 1

    def unshift(y: int, k: int) -> int:  # inverse of x ^ (x >> k)
        x, t = y, y >> k
        while t:
            x ^= t
            t >>= k
        return x

    for low in range(64):
        z = (j24 << 40) | low
        z = unshift(z, 31)
        z = (z * pow(MIX2, -1, 2**64)) & mask
        z = unshift(z, 27)
        z = (z * pow(MIX1, -1, 2**64)) & mask
        key = (unshift(z, 30) - (index + 1) * GOLDEN) & mask
        if key < 2**63 - 1:
            assert uniform24(key, index) == j24
            return key
    raise AssertionError("no key below 2**63 - 1")  # each try succeeds with probability 1/2


def _rounds_up(x: np.float32, levels: int, j24: int) -> bool:
    """Whether entry 1 of ``(1, x)`` (max-norm 1, so ``r = fl(x * s)``) rounds up when its
    stream integer is ``j24``: the kernel's and the reference's answer (they must agree)."""
    from adaquantfl.compression._kernels import quantize_into

    v = np.array([1.0, x], dtype=np.float32)
    key = _key_for(1, j24)
    mags, signs = np.empty(2, np.int32), np.empty(2, np.bool_)
    quantize_into(v, np.ones(1, np.float32), 2, levels, np.uint64(key), mags, signs)
    ref, _ = reference_quantize(v, levels, key, [np.float32(1.0)], None)
    assert ref == mags.tolist()
    lo = math.floor(float(np.float32(x * np.float32(levels))))
    assert int(mags[1]) in (lo, lo + 1)
    return int(mags[1]) == lo + 1


BIAS_CASES = {
    # (x, s): r = x * s in float32, its fractional part p and the exact bias b.
    "grid point 3*2^-24": (np.float32(3 * 2.0**-24), 1),
    "just above 3*2^-24": (np.nextafter(np.float32(3 * 2.0**-24), np.float32(1)), 1),
    "tiny 2^-30": (np.float32(2.0**-30), 1),
    "smallest subnormal": (np.float32(1e-45), 1),
    "just below 1/2": (np.nextafter(np.float32(0.5), np.float32(0)), 1),
    "0.3, s=1": (np.float32(0.3), 1),
    "0.3, s=4 (r >= 1)": (np.float32(0.3), 4),
    "0.01, s=7": (np.float32(0.01), 7),
    "1/3, s=255": (np.float32(1 / 3), 255),
}


@pytest.mark.parametrize("name", sorted(BIAS_CASES))
def test_rounding_probability_is_the_24_bit_ceiling_and_the_bias_below_2_to_minus_24(
    name: str,
) -> None:
    from fractions import Fraction

    # Prepare: r and its fractional part p, exactly (as rationals).
    x, levels = BIAS_CASES[name]
    r = Fraction(float(np.float32(x * np.float32(levels))))
    p = r - math.floor(r)
    threshold = math.ceil(p * 2**24)  # the documented rule: up iff J < 2**24 p
    # Execute: the decision at both sides of the threshold and at the grid's ends.
    # The decision is u < p with u = J / 2**24 increasing in J, so these pin it.
    if threshold > 0:
        assert _rounds_up(x, levels, threshold - 1)
        assert _rounds_up(x, levels, 0)
    if threshold < 2**24:
        assert not _rounds_up(x, levels, threshold)
        assert not _rounds_up(x, levels, 2**24 - 1)
    # Assert: P(up) = threshold / 2**24 over the 2**24 values of J, so the bias
    # of xi is b = threshold / 2**24 - p, in [0, 2**-24), and 0 unless r < 1/2.
    bias = Fraction(threshold, 2**24) - p
    assert 0 <= bias < Fraction(1, 2**24)
    if r >= Fraction(1, 2) or (p * 2**24).denominator == 1:
        assert bias == 0
    expected = {
        "grid point 3*2^-24": Fraction(0),
        "just above 3*2^-24": Fraction(1, 2**24) - Fraction(1, 2**46),  # the bound, nearly
        "tiny 2^-30": Fraction(1, 2**24) - Fraction(1, 2**30),  # 64 times too likely
        "smallest subnormal": Fraction(1, 2**24) - Fraction(1, 2**149),
    }
    if name in expected:
        assert bias == expected[name]
    # And in the dequantized value (step = 1 / s): entries with r < 1/2 become
    # exactly 0 or step, so |E[Q]| - r * step = b * step exactly.
    step = Fraction(float(np.float32(np.float32(1.0) / np.float32(levels))))
    if r < Fraction(1, 2):
        q = quantize(torch.tensor([1.0, float(x)]), levels, generator=gen(), norm="max")
        assert float(dequantize(q)[1]) in (0.0, float(step))
        mean = Fraction(threshold, 2**24) * step
        assert mean - r * step == bias * step < step / 2**24


def test_the_bias_test_tells_a_wrong_threshold_apart() -> None:
    # Negative control: at a grid point p = 3 * 2**-24 the rule "J < 2**24 p"
    # rounds up for J = 0, 1, 2 only (probability exactly p); "J <= 2**24 p"
    # would also round up at J = 3, a bias of exactly 2**-24, outside the bound.
    x = np.float32(3 * 2.0**-24)
    assert [_rounds_up(x, 1, j) for j in range(5)] == [True, True, True, False, False]


def test_the_documented_guarantee_is_the_bound_the_tests_above_prove() -> None:
    # The kernel's 24-bit rounding grid was always there; what was wrong was a
    # docstring promising E[Q] = v exactly. The module now states the bound.
    import adaquantfl.compression.qsgd as qsgd

    doc = " ".join((qsgd.__doc__ or "").split())
    assert "``E[Q_s(v)] = v``, up to a bias below ``2**-24`` of a step" in doc


@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("levels", [1, 4])
def test_empirical_variance_equals_exact_variance(norm: str, levels: int) -> None:
    d, draws = 50, 20_000
    x = torch.randn(d, generator=gen(9))
    exact = quantization_variance(x, levels, norm=norm)  # type: ignore[arg-type]
    q = dequantize(quantize(x.repeat(draws), levels, generator=gen(10), bucket_size=d, norm=norm))  # type: ignore[arg-type]
    err2 = ((q.view(draws, d).double() - x.double()) ** 2).sum(dim=1)
    # The sample mean of the squared error is within 5 standard errors of its expectation.
    se = float(err2.std()) / math.sqrt(draws)
    assert abs(float(err2.mean()) - exact) < 5 * se
    assert exact > 0


@pytest.mark.parametrize("levels", [1, 2, 3, 8, 100])
@pytest.mark.parametrize("bucket_size", [None, 16])
@pytest.mark.parametrize("norm", ["l2", "max"])
def test_variance_within_qsgd_bound(levels: int, bucket_size: int | None, norm: str) -> None:
    for seed in range(5):
        x = torch.randn(200, generator=gen(seed)) ** 3  # heavy-tailed entries
        b = 200 if bucket_size is None else bucket_size
        total = quantization_variance(x, levels, bucket_size=bucket_size, norm=norm)  # type: ignore[arg-type]
        bound = 0.0
        for chunk in x.split(b):
            dd = chunk.numel()
            bound += min(dd / levels**2, math.sqrt(dd) / levels) * float(chunk.double().norm()) ** 2
        assert total <= bound * (1 + 1e-6)


def test_variance_bound_is_tight_enough_to_fail_a_coarser_quantizer() -> None:
    # Control for the bound test: the variance at s=1 exceeds the s=100 bound.
    x = torch.randn(200, generator=gen(0))
    assert (
        quantization_variance(x, 1) > min(200 / 100**2, math.sqrt(200) / 100) * float(x.norm()) ** 2
    )


# --------------------------------------------------------------------------- determinism, edges


def test_same_generator_state_gives_identical_output() -> None:
    x = torch.randn(1000, generator=gen(0))
    assert quantize(x, 4, generator=gen(42)) == quantize(x, 4, generator=gen(42))
    assert quantize(x, 4, generator=gen(42)) != quantize(x, 4, generator=gen(43))


def test_draws_exactly_one_value_from_the_generator() -> None:
    g = gen(3)
    quantize(torch.randn(5000), 2, generator=g)
    g2 = gen(3)
    draw_key(g2)
    # After one quantize and after one key draw, both generators are in the same state.
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=g2))


def test_zero_vector_and_one_level() -> None:
    q = quantize(torch.zeros(10), 1, generator=gen())
    assert q.norms.tolist() == [0.0]
    assert q.magnitudes.tolist() == [0] * 10
    assert not q.signs.any()
    assert dequantize(q).tolist() == [0.0] * 10
    q1 = quantize(torch.tensor([1.0, -1.0, 0.5]), 1, generator=gen())
    assert set(q1.magnitudes.tolist()) <= {0, 1}


def test_any_shape_is_flattened_and_float64_is_accepted() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen())
    q = quantize(x, 7, generator=gen())
    assert q.numel == 60
    assert dequantize(q).shape == (60,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("bucket_size", [None, 3])
def test_non_finite_input_raises(bad: float, norm: str, bucket_size: int | None) -> None:
    x = torch.ones(200)
    x[150] = bad  # past the first 64-entry row and in the last bucket
    with pytest.raises(ValueError, match="1 non-finite"):
        quantize(x, 2, generator=gen(), norm=norm, bucket_size=bucket_size)  # type: ignore[arg-type]


def test_largest_allowed_norm_dequantizes_finitely() -> None:
    from adaquantfl.compression.qsgd import MAX_NORM

    just_below = float(np.nextafter(MAX_NORM, np.float32(0)))
    for levels in (1, 100, 65535):
        y = dequantize(quantize(torch.tensor([just_below, 0.0]), levels, generator=gen()))
        assert torch.isfinite(y).all()
    # Negative control: the same arithmetic at float32's maximum overflows.
    step = np.float32(3.4028235e38) / np.float32(100)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float32(100) * step)
    with pytest.raises(ValueError, match="exceeds"):
        quantize(torch.tensor([3.4028235e38]), 100, generator=gen())


def test_norm_overflow_raises() -> None:
    with pytest.raises(ValueError, match="overflows"):
        quantize(torch.full((4,), 3e38), 2, generator=gen())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": 0}, "levels"),
        ({"levels": MAX_LEVELS + 1}, "levels"),
        ({"levels": 2.5}, "levels"),
        ({"levels": 2, "bucket_size": 0}, "bucket_size"),
        ({"levels": 2, "norm": "l1"}, "norm"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        quantize(torch.ones(4), generator=gen(), **kwargs)


def test_integer_tensor_and_missing_generator_raise() -> None:
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(4, dtype=torch.int64), 2, generator=gen())
    with pytest.raises(ValueError, match="generator"):
        quantize(torch.ones(4), 2, generator=None)  # type: ignore[arg-type]


def test_tiny_subnormal_norm_still_quantizes_finitely() -> None:
    x = torch.tensor([1e-44, -2e-44, 0.0])
    y = dequantize(quantize(x, 3, generator=gen()))
    assert torch.isfinite(y).all()


def test_helpers() -> None:
    assert [bits_per_level_index(s) for s in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]
    assert num_buckets(10, None) == 1 and num_buckets(10, 3) == 4 and num_buckets(0, 3) == 1
    assert bucket_norms(torch.tensor([3.0, 4.0, 1.0]), 2, "l2").tolist() == [5.0, 1.0]
    assert bucket_norms(torch.tensor([3.0, -4.0, 1.0]), 2, "max").tolist() == [4.0, 1.0]


def test_quantized_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="magnitudes"):
        Quantized(
            2,
            3,
            None,
            "l2",
            torch.zeros(1),
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="norms"):
        Quantized(
            2,
            3,
            2,
            "l2",
            torch.zeros(1),
            torch.zeros(3, dtype=torch.int32),
            torch.zeros(3, dtype=torch.bool),
        )


def test_dequantize_into_caller_buffer() -> None:
    q = quantize(torch.randn(100), 3, generator=gen())
    buf = torch.empty(100)
    out = dequantize(q, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, dequantize(q))
    with pytest.raises(ValueError, match="out"):
        dequantize(q, out=torch.empty(99))
