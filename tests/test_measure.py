"""What a client measures and the server adds, at model scale: exact enough, and no float64 copies.

The memory tests measure the resident set's peak in a fresh process
(``benchmarks.codec_scale``'s probe): torch's CPU allocator does not report
to ``tracemalloc``, so a float64 copy made by a torch expression would not
show there. Each bound sits between what the code needs now and what one
float64 copy of the update (2x its float32 bytes) would add.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from benchmarks import codec_scale

from adaquantfl.compression import QSGDCompressor, TopKCompressor, measure
from adaquantfl.fl.client import ClientReply, all_finite
from adaquantfl.fl.guard import aggregation_weights
from adaquantfl.fl.server import FedServer
from adaquantfl.policy import FixedLevels


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
    payload, norm_sq, error_sq = compressor.compress_measured(
        v, 3, generator=gen(5), scale=0.5, residual=target
    )
    assert payload == compressor.compress(x, 3, generator=gen(5))
    sent = compressor.decompress(payload, numel=x.numel(), levels=3).mul_(0.5)
    assert norm_sq == measure.sum_squares(x)
    assert error_sq == measure.squared_error(x, sent)
    if target is not None:
        assert torch.equal(target, x - sent)
    if residual != "in place":
        assert torch.equal(v, x)


@pytest.mark.parametrize("encoding", ["packed", "entropy"])
@pytest.mark.parametrize("bucket_size", [None, 512])
def test_qsgd_measures_while_encoding_what_decoding_would_measure(
    encoding: str, bucket_size: int | None
) -> None:
    compressor = QSGDCompressor(encoding, bucket_size)
    x = torch.randn(3 * 4096 + 11, generator=gen(6))
    fused = torch.empty_like(x)
    decoded = torch.empty_like(x)
    got = compressor.compress_measured(x, 7, generator=gen(7), scale=0.3, residual=fused)
    want = measure.compress_measured(
        compressor, x, 7, generator=gen(7), scale=0.3, residual=decoded
    )
    assert got == want and torch.equal(fused, decoded)
    # Full precision goes the default way: exact, nothing lost.
    _, norm_sq, error_sq = compressor.compress_measured(x, None, generator=gen(7))
    assert error_sq == 0.0 and norm_sq == measure.sum_squares(x)


# --------------------------------------------------------------------------- the server's sum


def test_the_server_adds_each_reply_in_slices_to_the_same_bits() -> None:
    # A share cap makes the weights fractional, so that w * x rounds.
    d = 3 * 2**16 + 5
    compressor = QSGDCompressor("packed", 512)
    params = torch.randn(d, generator=gen(8))
    server = FedServer(params, FixedLevels(15), compressor, max_weight_share=0.4)
    server.begin_round([0, 1, 2])
    counts = [10, 37, 1000]
    updates = [torch.randn(d, generator=gen(c)) for c in range(3)]
    payloads = [compressor.compress(u, 15, generator=gen()) for u in updates]
    replies = [ClientReply(c, payloads[c], 1.0, n) for c, n in enumerate(counts)]
    weights = aggregation_weights(counts, 0.4)
    assert any(w != int(w) for w in weights)
    accum = torch.zeros(d, dtype=torch.float64)
    for reply, weight in zip(replies, weights, strict=True):
        update = compressor.decompress(reply.payload, numel=d, levels=15)
        accum.add_(update.to(torch.float64), alpha=float(weight))  # the whole-vector form
    expected = (params.to(torch.float64) + accum / float(sum(weights))).to(torch.float32)
    server.aggregate(replies)
    assert torch.equal(server.params, expected)


# --------------------------------------------------------------------------- memory


def extra_peak(what: str, encoding: str, error_feedback: bool, numel: int = 4 * 10**6) -> dict:
    """Extra resident peak of one call (benchmarks.codec_scale's probe, in a fresh process)."""
    spec = dict(what=what, label=what, numel=numel, encoding=encoding, levels=15,
                bucket_size=512, error_feedback=error_feedback)  # fmt: skip
    return codec_scale.run_probe(spec)


def _peak_can_be_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


needs_peak_reset = pytest.mark.skipif(
    not _peak_can_be_reset(), reason="needs Linux's /proc/self/clear_refs to reset VmHWM"
)


@needs_peak_reset
@pytest.mark.parametrize(
    ("encoding", "error_feedback", "bound"),
    [("packed", False, 1.0), ("entropy", False, 1.0), ("packed", True, 2.0)],
    ids=["packed", "entropy", "packed-error-feedback"],
)
def test_compressing_needs_no_float64_copy_of_the_update(
    encoding: str, error_feedback: bool, bound: float
) -> None:
    # Measured at 4e6 entries: 0.40, 0.39 and 1.31 x the update's float32
    # bytes (the payload twice, the entropy coder's byte per entry, the new
    # residual); before, 7.2, 7.1 and 8.2 (float64 copies for the norm, the
    # distortion and the finiteness check).
    row = extra_peak("client", encoding, error_feedback)
    assert row["extra_x"] < bound, row


@needs_peak_reset
def test_the_server_accumulates_a_reply_without_a_float64_copy() -> None:
    # The float64 accumulator (2x) and the first touch of the decode buffer
    # (1x) are the whole of it (measured: 3.06); the float64 copy of each
    # reply made it 5.0.
    row = extra_peak("server", "packed", False)
    assert row["extra_x"] < 4.0, row
