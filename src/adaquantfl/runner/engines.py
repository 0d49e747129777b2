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
    """The in-process simulator; checkpoints every ``[train] checkpoint_every`` rounds."""
    sim = build_simulator(config)
    if resume_state is not None:
        sim.load_state_dict(resume_state)
    every = config.train.checkpoint_every
    while sim.server.round_idx < config.train.rounds:
        on_record(sim.run_round())
        done = sim.server.round_idx
        if (
            on_checkpoint is not None
            and every
            and (done % every == 0 or done == config.train.rounds)
        ):
            on_checkpoint(sim.state_dict(), done)
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
    if t.max_weight_share is not None:
        raise ConfigError(
            "[train] max_weight_share is supported by engine = 'sim' only (the Flower "
            "strategy does not take it yet)"
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
