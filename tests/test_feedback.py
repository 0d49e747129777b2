"""Error feedback: the residual identity, its life with the client, and what it buys;
a client's compression at model scale."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import adaquantfl
from adaquantfl.compression import ErrorFeedback, QSGDCompressor, TopKCompressor
from adaquantfl.compression.codec import encode
from adaquantfl.compression.feedback import EXACT_SUMS_NUMEL, ClientCompressor
from adaquantfl.compression.qsgd import quantize
from adaquantfl.fl.client import compress_update
from adaquantfl.fl.server import select_clients
from adaquantfl.rng import torch_generator
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.checkpoint import load_checkpoint
from adaquantfl.runner.config import load_config

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits-mlp.toml"
TOPK = ["compression.method=qsgd", "compression.compressor=topk",
        "compression.options.fraction=0.01"]  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encode(update: torch.Tensor, client: ClientCompressor, round_idx: int):
    return compress_update(
        update, levels=3, compressor=client, seed=0, round_idx=round_idx, client_id=4
    )


@pytest.mark.parametrize("inner", [TopKCompressor(0.05), QSGDCompressor()], ids=repr)
def test_residual_is_what_the_server_did_not_receive(inner: object) -> None:
    # e_1 = D_1 - C(D_1); e_2 = (D_2 + e_1) - C(D_2 + e_1): exactly, in float32.
    ef = ErrorFeedback(inner)  # type: ignore[arg-type]
    state = ClientCompressor(ef)
    d1, d2 = torch.randn(200, generator=gen(1)), torch.randn(200, generator=gen(2))
    first = _encode(d1, state, 0)
    sent1 = ef.decompress(first.payload, numel=200, levels=3)  # what the server receives
    assert state.residual is not None and torch.equal(state.residual, d1 - sent1)
    e1 = state.residual.clone()
    second = _encode(d2, state, 1)
    v2 = d2 + e1
    sent2 = ef.decompress(second.payload, numel=200, levels=3)
    assert torch.equal(state.residual, v2 - sent2)
    # The payload is the inner compressor's message of D_2 + e_1 ...
    plain = _encode(v2, ClientCompressor(inner), 1)  # type: ignore[arg-type]
    assert second.payload == plain.payload
    # ... not of D_2 alone (the negative control).
    assert second.payload != _encode(d2, ClientCompressor(inner), 1).payload  # type: ignore[arg-type]
    # Norm and distortion describe the compressed vector v_2.
    assert second.update_norm == pytest.approx(float(v2.norm()), rel=1e-6)
    rel = float((sent2.double() - v2.double()).square().sum() / v2.double().square().sum())
    assert second.distortion == pytest.approx(rel, rel=1e-9)


def test_an_unbiased_compressor_is_scaled_to_contract() -> None:
    # QSGD at s = 3 on d = 200 has omega = min(200 / 9, sqrt(200) / 3) = 4.71 > 1:
    # unscaled, the residual would grow round after round. Both sides use C / (1 + omega).
    x = torch.randn(200, generator=gen(3))
    payload = QSGDCompressor().compress(x, 3, generator=gen())
    plain = QSGDCompressor().decompress(payload, numel=200, levels=3)
    scaled = ErrorFeedback(QSGDCompressor()).decompress(payload, numel=200, levels=3)
    omega = min(200 / 9, math.sqrt(200) / 3)
    assert torch.allclose(scaled, plain / (1 + omega), rtol=1e-6, atol=0)
    # Top-k contracts as it is: no scaling.
    top = TopKCompressor(0.1).compress(x, 1, generator=gen())
    assert torch.equal(
        ErrorFeedback(TopKCompressor(0.1)).decompress(top, numel=200, levels=1),
        TopKCompressor(0.1).decompress(top, numel=200, levels=1),
    )


def test_error_feedback_with_coarse_qsgd_stays_finite() -> None:
    # Unscaled, e_{k+1} = v - C(v) with omega ~ 14 grows by orders of magnitude a
    # round (measured: a final loss of 1.9e21 on this config); scaled, it trains.
    cfg = load_config(DIGITS, ["compression.method=qsgd", "compression.levels=1",
                               "compression.error_feedback=true", "train.rounds=30"])  # fmt: skip
    sim = build_simulator(cfg)
    rows = [sim.run_round() for _ in range(30)]
    assert rows[-1].train_loss < rows[0].train_loss  # type: ignore[operator]


def test_full_precision_sends_the_residual_and_clears_it() -> None:
    state = ClientCompressor(ErrorFeedback(TopKCompressor(0.1)))
    state.load_state_dict({"residual": torch.full((50,), 0.5)})
    d = torch.randn(50, generator=gen())
    out = compress_update(d, levels=None, compressor=state, seed=0, round_idx=0, client_id=0)
    assert torch.equal(TopKCompressor().decompress(out.payload, numel=50, levels=None), d + 0.5)
    assert state.residual is not None and not state.residual.any()


def test_only_error_feedback_keeps_a_residual() -> None:
    plain = ClientCompressor(TopKCompressor(0.2))
    fed = ClientCompressor(ErrorFeedback(TopKCompressor(0.2)))
    for client in (plain, fed):
        _encode(torch.randn(50, generator=gen()), client, 0)
    assert plain.residual is None and plain.state_dict() == {"residual": None}
    assert fed.residual is not None and fed.residual.any()
    with pytest.raises(ValueError, match="residual"):
        fed.load_state_dict({"residual": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="keys"):
        fed.load_state_dict({"residual": None, "other": 1})


def test_the_residual_survives_rounds_the_client_sits_out() -> None:
    cfg = load_config(DIGITS, [*TOPK, "compression.error_feedback=true",
                               "train.clients_per_round=3", "train.rounds=6"])  # fmt: skip
    sim = build_simulator(cfg)
    kept = changed = 0
    for round_idx in range(6):
        chosen = set(select_clients(10, 3, seed=0, round_idx=round_idx))
        before = {
            c: s.residual.clone()
            for c, s in sim.client_compressors.items()
            if s.residual is not None
        }
        sim.run_round()
        for cid, residual in before.items():
            after = sim.client_compressors[cid].residual
            if cid in chosen:
                changed += not torch.equal(after, residual)
            else:
                assert torch.equal(after, residual), f"client {cid} lost its residual"
                kept += 1
    assert kept and changed  # both cases happened
    assert len(sim.client_compressors) > 3  # residuals of clients beyond one round's sample


def test_error_feedback_rescues_top_k() -> None:
    # Top-1% alone loses 99% of every update for good; with error feedback the
    # lost mass is sent later. Measured: 0.43 vs 0.18 final loss at 100 rounds.
    def final_loss(error_feedback: bool) -> float:
        flag = f"compression.error_feedback={str(error_feedback).lower()}"
        cfg = load_config(DIGITS, [*TOPK, flag, "train.rounds=60"])
        sim = build_simulator(cfg)
        rows = [sim.run_round() for _ in range(60)]
        return sum(r.train_loss for r in rows[-6:]) / 6  # type: ignore[misc]

    without, with_ef = final_loss(False), final_loss(True)
    assert math.isfinite(without) and with_ef < 0.8 * without, (without, with_ef)


def test_residuals_are_checkpointed_and_a_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    overrides = [*TOPK, "compression.error_feedback=true", "train.clients_per_round=4",
                 "train.checkpoint_every=3", "compare.methods=[]"]  # fmt: skip
    reference = adaquantfl.run(DIGITS, tmp_path / "ref", overrides=[*overrides, "train.rounds=12"])
    out = tmp_path / "out"
    adaquantfl.run(DIGITS, out, overrides=[*overrides, "train.rounds=6"])
    state, _ = load_checkpoint(out / "topk-ef" / "checkpoint.pt")
    assert state["round"] == 6 and state["server"]["clients"]  # residuals are in it
    resumed = adaquantfl.run(DIGITS, out, overrides=[*overrides, "train.rounds=12"], resume=True)
    assert torch.equal(resumed.params, reference.params)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.metrics]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in reference.metrics]


# --------------------------------------------------------------------------- at model scale

LARGE = EXACT_SUMS_NUMEL + 4097  # above the size where the float64 tensor sums are kept


@pytest.mark.parametrize(
    "compressor",
    [
        QSGDCompressor("packed", 512),
        QSGDCompressor("entropy", None, "max"),
        ErrorFeedback(QSGDCompressor("packed")),
        ErrorFeedback(QSGDCompressor("entropy", 512)),
        ErrorFeedback(TopKCompressor(0.01)),
    ],
    ids=repr,
)
def test_at_scale_the_bytes_and_residual_are_unchanged_and_the_sums_within_1e_12(
    compressor: object,
) -> None:
    client = ClientCompressor(compressor)  # type: ignore[arg-type]
    inner = compressor.inner if isinstance(compressor, ErrorFeedback) else compressor
    for round_idx in range(2):
        update = torch.randn(LARGE, generator=gen(round_idx)) * 1e-3
        kept = update.clone()
        before = None if client.residual is None else client.residual.clone()
        out = compress_update(update, levels=7, compressor=client, seed=0, round_idx=round_idx,
                              client_id=4)  # fmt: skip
        assert torch.equal(update, kept)  # the caller's update is never written
        v = update if before is None else update + before
        noise = torch_generator(0, purpose="quantize", round_idx=round_idx, client_id=4)
        if isinstance(inner, QSGDCompressor):  # the two-step path's bytes
            q = quantize(v, 7, generator=noise, bucket_size=inner.bucket_size, norm=inner.norm)  # type: ignore[arg-type]
            assert out.payload == encode(q, inner.encoding)
        else:
            assert out.payload == inner.compress(v, 7, generator=noise)  # type: ignore[attr-defined]
        sent = compressor.decompress(out.payload, numel=LARGE, levels=7)  # type: ignore[attr-defined]
        if client.keeps_residual:
            assert torch.equal(client.residual, v - sent)
        norm_sq = math.fsum((v.double() ** 2).tolist())
        error_sq = math.fsum(((sent.double() - v.double()) ** 2).tolist())
        assert out.update_norm == pytest.approx(math.sqrt(norm_sq), rel=1e-12, abs=0)
        assert out.distortion == pytest.approx(error_sq / norm_sq, rel=1e-12, abs=0)


def test_up_to_the_exact_sums_size_the_reports_are_the_float64_tensor_sums() -> None:
    # Small runs (every test, the demo) report the bits they always did.
    client = ClientCompressor(ErrorFeedback(QSGDCompressor("entropy", 100)))
    for round_idx, numel in enumerate([1000, EXACT_SUMS_NUMEL]):
        client.residual = None
        update = torch.randn(numel, generator=gen(round_idx)) ** 3
        out = client.compress(update, 3, generator=gen())
        sent = client.compressor.decompress(out.payload, numel=numel, levels=3)
        norm_sq = float(update.to(torch.float64).square().sum())
        error_sq = float((sent.to(torch.float64) - update.to(torch.float64)).square().sum())
        assert out.update_norm == math.sqrt(norm_sq)
        assert out.distortion == error_sq / norm_sq


def test_a_compression_that_fails_leaves_the_residual_as_it_was() -> None:
    client = ClientCompressor(ErrorFeedback(QSGDCompressor("packed")))
    compress_update(torch.randn(LARGE, generator=gen()), levels=3, compressor=client, seed=0,
                    round_idx=0, client_id=0)  # fmt: skip
    assert client.residual is not None
    residual = client.residual.clone()
    huge = torch.full((LARGE,), 3e38)  # finite, but its norm overflows float32
    with pytest.raises(ValueError, match="norm"):
        client.compress(huge, 3, generator=gen())
    assert torch.equal(client.residual, residual)
