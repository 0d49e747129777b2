"""FedProx's local objective, and the uplink bits budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adaquantfl
from adaquantfl.fl.client import LocalTraining, draw_minibatches, local_sgd
from adaquantfl.models import make_model
from adaquantfl.runner.config import ConfigError, load_config
from adaquantfl.runner.report import final_mean
from adaquantfl.sim.vectorized import BatchedTrainer
from tests.test_fl import tiny_data

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits-mlp.toml"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist1d-floor.toml"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_prox_step_by_hand() -> None:
    # One step: w1 = w0 - lr (grad CE(w0) + mu (w0 - w0)) = plain SGD; the second
    # step adds lr * mu * (w1 - w0).
    data = tiny_data()
    shard = data.clients[0]
    model = make_model("logreg", data.input_shape, data.num_classes)
    w0 = model.initial_parameters(generator=gen())
    training = LocalTraining(2, 4, 0.5, prox_mu=3.0)
    batches = draw_minibatches(len(shard), training, gen(1))
    w = w0.clone()
    for step in range(2):
        idx = batches[step]
        wg = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(wg, shard.x[idx]), shard.y[idx]), wg)
        w = w - 0.5 * (g + 3.0 * (w - w0))
    got = local_sgd(model, w0, shard.x, shard.y, training=training, generator=gen(1))
    assert torch.allclose(got, w, rtol=1e-6, atol=1e-7)
    plain = local_sgd(model, w0, shard.x, shard.y, training=LocalTraining(2, 4, 0.5),
                      generator=gen(1))  # fmt: skip
    assert not torch.allclose(got, plain)  # the term did something


def test_a_strong_prox_term_keeps_clients_near_the_global_model() -> None:
    data = tiny_data()
    shard = data.clients[1]
    model = make_model("mlp", data.input_shape, data.num_classes)
    w0 = model.initial_parameters(generator=gen())
    drift = {}
    for mu in (0.0, 1.0, 5.0):
        training = LocalTraining(20, 8, 0.1, mu)
        local = local_sgd(model, w0, shard.x, shard.y, training=training, generator=gen(2))
        drift[mu] = float((local - w0).norm())
    assert drift[0.0] > drift[1.0] > drift[5.0]


@pytest.mark.parametrize("name", ["logreg", "mlp"])
@pytest.mark.parametrize("manual", [True, False], ids=["hand-written", "autograd"])
def test_batched_prox_equals_the_per_client_path(name: str, manual: bool) -> None:
    data = tiny_data()
    model = make_model(name, data.input_shape, data.num_classes)
    w0 = model.initial_parameters(generator=gen())
    training = LocalTraining(6, 8, 0.3, prox_mu=0.7)
    trainer = BatchedTrainer(model, training, manual_gradients=manual)
    shards = data.clients[:3]
    batched = trainer.train(w0, trainer.plan(shards, [gen(10 + i) for i in range(3)]))
    for i, shard in enumerate(shards):
        single = local_sgd(model, w0, shard.x, shard.y, training=training, generator=gen(10 + i))
        assert torch.allclose(batched[i], single, rtol=1e-4, atol=1e-6)


def test_prox_mu_is_validated() -> None:
    with pytest.raises(ValueError, match="prox_mu"):
        LocalTraining(1, 1, 0.1, prox_mu=-1.0)
    with pytest.raises(ConfigError, match="prox_mu"):
        load_config(CONFIG, ["train.prox_mu=-0.5"])


# --------------------------------------------------------------------------- budget


def test_the_budget_stops_before_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    base = ["compression.method=adaquantfl", "compression.levels=2", "train.rounds=40",
            "compare.methods=[]"]  # fmt: skip
    full = adaquantfl.run(CONFIG, None, overrides=base)
    cum = [r["cum_wire_bits"] for r in full.metrics]
    budget = (cum[16] + cum[17]) // 2  # between the 17th and the 18th round's total
    capped = adaquantfl.run(
        CONFIG, tmp_path, overrides=[*base, f"train.uplink_budget_bits={budget}"]
    )
    assert [r["round"] for r in capped.metrics] == list(range(1, 18))
    assert capped.metrics[-1]["cum_wire_bits"] <= budget < cum[17]
    # The undone 18th round left nothing behind: the model is the 17-round model.
    seventeen = adaquantfl.run(CONFIG, None, overrides=[*base[:2], "train.rounds=17",
                                                        "compare.methods=[]"])  # fmt: skip
    assert torch.equal(capped.params, seventeen.params)
    summary = (tmp_path / "summary.json").read_text()
    assert f'"uplink_budget_bits": {budget}' in summary and '"rounds_run": 17' in summary
    # The regime suite reads a method's figures at a budget off its full run's
    # rows: the capped run's rows are exactly their prefix.
    keys = ("train_loss", "test_accuracy", "cum_wire_bits", "levels")
    assert [{k: r[k] for k in keys} for r in capped.metrics] == [
        {k: r[k] for k in keys} for r in full.metrics[:17]
    ]
    from benchmarks.regimes import at_budget

    assert at_budget(full.metrics, budget) == (
        final_mean(capped.metrics, "train_loss"),
        final_mean(capped.metrics, "test_accuracy"),
    )
    assert at_budget(full.metrics, cum[0] - 1) == (None, None)


def test_the_budget_is_refused_where_a_round_cannot_be_undone() -> None:
    cfg = load_config(CONFIG, ["train.engine=flower", "train.uplink_budget_bits=1000"])
    from adaquantfl.runner.engines import flower_engine

    with pytest.raises(ConfigError, match="uplink_budget_bits is supported by engine = 'sim'"):
        flower_engine(cfg, lambda record: None)


def test_rounds_under_a_budget_resume_identically(tmp_path: Path) -> None:
    base = [
        "compression.method=qsgd",
        "compression.levels=3",
        "train.rounds=30",
        "train.checkpoint_every=4",
        "compare.methods=[]",
        "train.uplink_budget_bits=120000",
    ]
    ref = adaquantfl.run(CONFIG, tmp_path / "ref", overrides=base)
    out = tmp_path / "out"
    adaquantfl.run(CONFIG, out, overrides=[*base[:-1], "train.uplink_budget_bits=120000",
                                           "train.rounds=8"])  # fmt: skip
    resumed = adaquantfl.run(CONFIG, out, overrides=base, resume=True)
    assert len(resumed.metrics) == len(ref.metrics) < 30
    assert torch.equal(resumed.params, ref.params)
