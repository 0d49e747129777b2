"""The engines that run one method's rounds: ``sim`` and ``flower``.

An engine runs the rounds of one method and hands each round's
:class:`~adaquantfl.fl.record.RoundRecord` to a callback. ``sim`` is the
in-process simulator; ``flower`` runs the same client and server code on
Flower's simulation engine (needs the ``flower`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from adaquantfl.fl.record import RoundRecord
from adaquantfl.imports import PYTHON_PREFIX
from adaquantfl.runner.build import EngineRun, build_simulator
from adaquantfl.runner.config import Config, ConfigError

__all__ = ["ENGINES", "CheckpointFn", "Engine", "check_engine", "sim_engine"]

#: Called with the server's state and the number of completed rounds.
CheckpointFn = Callable[[dict[str, Any], int], None]


class Engine(Protocol):
    """Runs the rounds of ``config`` (from ``resume_state`` if given), calling ``on_record``."""

    def __call__(
        self,
        config: Config,
        on_record: Callable[[RoundRecord], None],
        *,
        resume_state: Mapping[str, Any] | None = None,
        on_checkpoint: CheckpointFn | None = None,
    ) -> EngineRun: ...


def sim_engine(
    config: Config,
    on_record: Callable[[RoundRecord], None],
    *,
    resume_state: Mapping[str, Any] | None = None,
    on_checkpoint: CheckpointFn | None = None,
) -> EngineRun:
    """The in-process simulator; checkpoints every ``[train] checkpoint_every`` rounds.

    With ``[train] uplink_budget_bits`` the run stops before the first round
    that would take the uplink past the budget: that round is computed, found
    to exceed it, and undone (model, policy, client states), so the run holds
    only whole rounds within the budget.
    """
    sim = build_simulator(config)
    spent = 0
    if resume_state is not None:
        sim.load_state_dict(resume_state)
        spent = int(resume_state.get("uplink_bits_spent", 0))
    budget = config.train.uplink_budget_bits
    every = config.train.checkpoint_every
    while sim.server.round_idx < config.train.rounds:
        before = sim.state_dict() if budget is not None else None
        coming = sim.server.round_idx + 1
        due = coming % config.train.eval_every == 0 or coming == config.train.rounds
        record = sim.run_round(evaluate=due or budget is not None)
        if budget is not None and before is not None and spent + record.wire_bits > budget:
            sim.load_state_dict(before)
            if on_checkpoint is not None and every:
                on_checkpoint({**before, "uplink_bits_spent": spent}, sim.server.round_idx)
            break
        spent += record.wire_bits
        on_record(record)
        done = sim.server.round_idx
        if (
            on_checkpoint is not None
            and every
            and (done % every == 0 or done == config.train.rounds)
        ):
            on_checkpoint({**sim.state_dict(), "uplink_bits_spent": spent}, done)
    return EngineRun(sim.server.params.clone(), sim.model)


def check_engine(config: Config) -> None:
    """Raise ConfigError if ``config`` asks its engine for something it does not do."""
    t = config.train
    if t.engine != "flower":
        return
    if t.checkpoint_every:
        raise ConfigError("[train] checkpoint_every is supported by engine = 'sim' only")
    if t.dropout or t.deadline_s is not None:
        raise ConfigError(
            "[train] dropout and deadline_s simulate faults in engine = 'sim'; on Flower, "
            "faults are real (see the node-failure test), so they cannot be set"
        )
    if t.uplink_budget_bits is not None:
        raise ConfigError(
            "[train] uplink_budget_bits is supported by engine = 'sim' only (it undoes the "
            "round that would exceed the budget)"
        )
    if t.device != "cpu":
        raise ConfigError(
            "[train] device chooses where engine = 'sim' trains; the Flower engine's "
            "clients train on the CPU"
        )
    for key, name in (("[model] name", config.model.name), ("[data] dataset", config.data.dataset)):
        if name.startswith(PYTHON_PREFIX):
            raise ConfigError(
                f"{key} is a Python object handed to adaquantfl.run; the Flower engine's "
                "nodes build the run in their own processes: name it by import path "
                "('package.module:name', importable on every node) or use engine = 'sim'"
            )


def flower_engine(
    config: Config,
    on_record: Callable[[RoundRecord], None],
    *,
    resume_state: Mapping[str, Any] | None = None,
    on_checkpoint: CheckpointFn | None = None,
) -> EngineRun:
    """Flower's simulation engine (Ray backend) running the shared client and server code."""
    if resume_state is not None:
        raise ConfigError("--resume is supported by engine = 'sim' only")
    check_engine(config)
    try:
        from adaquantfl.runner.flower_engine import run_flower
    except ImportError as exc:
        raise ConfigError(
            "[train] engine = 'flower' needs the Flower extra: pip install 'adaquantfl[flower]' "
            f"({exc})"
        ) from None
    result: EngineRun = run_flower(config, on_record)
    return result


#: Engines by ``[train] engine`` name.
ENGINES: dict[str, Engine] = {"sim": sim_engine, "flower": flower_engine}
