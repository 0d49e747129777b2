"""Experiment configuration: TOML file + overrides, validated into frozen dataclasses.

Every key has a type and, where it is a choice, the list of allowed values, so
a bad key or value is reported with its section, name and what is allowed::

    [train] lr = -1.0: must be > 0
    unknown key 'train.roundz'; allowed keys in [train]: batch_size, ...
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaquantfl.data import DATASETS, PARTITIONS
from adaquantfl.fl.client import (
    BATCH_SIZE_LIMIT,
    LOCAL_STEPS_LIMIT,
    MAX_BATCH_SIZE,
    MAX_LOCAL_STEPS,
    LocalTraining,
)
from adaquantfl.models import INITS, MODELS
from adaquantfl.runner.compression_config import CompressionConfig
from adaquantfl.runner.fields import (
    ConfigError,
    at_least,
    at_most,
    build_section,
    choice,
    positive,
    validate,
)

__all__ = [
    "CompareConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
]

ENGINES: tuple[str, ...] = ("sim", "flower")
#: Where the simulator trains (``[train] device``); checked against the machine when built.
DEVICES: tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: which data set and how it is split over clients."""

    dataset: str = field(default="digits", metadata=choice(*DATASETS))
    partition: str | None = field(default=None, metadata=choice(*PARTITIONS))
    dirichlet_alpha: float = field(default=0.5, metadata=positive())
    shards_per_client: int = field(default=2, metadata=at_least(1))
    min_client_samples: int = field(default=10, metadata=at_least(1))
    synthetic_alpha: float = field(default=1.0, metadata=at_least(0))
    synthetic_beta: float = field(default=1.0, metadata=at_least(0))
    num_clients: int = field(default=10, metadata=at_least(1))
    data_dir: str | None = None

    def __post_init__(self) -> None:
        validate(self, "data")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: architecture and initialisation."""

    name: str = field(default="mlp", metadata=choice(*MODELS))
    init: str = field(default="default", metadata=choice(*INITS))

    def __post_init__(self) -> None:
        validate(self, "model")


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: rounds, local SGD, participation, seed and engine."""

    rounds: int = field(default=100, metadata=at_least(1))
    local_steps: int = field(default=10, metadata=at_most(MAX_LOCAL_STEPS, LOCAL_STEPS_LIMIT))
    batch_size: int = field(default=32, metadata=at_most(MAX_BATCH_SIZE, BATCH_SIZE_LIMIT))
    lr: float = field(default=0.05, metadata=positive())
    clients_per_round: int | None = field(default=None, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    engine: str = field(default="sim", metadata=choice(*ENGINES))
    vectorize: bool = True
    device: str = field(default="cpu", metadata=choice(*DEVICES))
    checkpoint_every: int = field(default=0, metadata=at_least(0))
    dropout: float = field(default=0.0, metadata={"min": 0, "max": 1})
    deadline_s: float | None = field(default=None, metadata=positive())
    client_time_s: float = field(default=1.0, metadata=positive())
    client_time_sigma: float = field(default=0.5, metadata=at_least(0))
    round_time_sigma: float = field(default=0.25, metadata=at_least(0))
    max_message_bytes: int | None = field(default=None, metadata=at_least(1))
    prox_mu: float = field(default=0.0, metadata=at_least(0))
    uplink_budget_bits: int | None = field(default=None, metadata=at_least(1))
    max_weight_share: float | None = field(default=None, metadata={**positive(), "max": 1})

    def __post_init__(self) -> None:
        validate(self, "train")
        try:  # the memory bounds of local training (their product, too)
            LocalTraining(self.local_steps, self.batch_size, self.lr)
        except ValueError as exc:
            raise ConfigError(f"[train] {exc}") from None


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``[compare] methods``: overrides of ``[compression]`` and a label."""

    compression: CompressionConfig
    label: str


@dataclass(frozen=True)
class CompareConfig:
    """``[compare]``: which methods to run side by side and how to score them."""

    methods: tuple[dict[str, Any], ...] = ()
    target_loss: float | None = field(default=None, metadata=positive())
    smooth_rounds: int = field(default=10, metadata=at_least(1))
    seeds: int = field(default=1, metadata=at_least(1))

    def __post_init__(self) -> None:
        validate(self, "compare")


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        cpr = self.train.clients_per_round
        if cpr is not None and cpr > self.data.num_clients:
            raise ConfigError(
                f"[train] clients_per_round = {cpr} exceeds [data] num_clients = "
                f"{self.data.num_clients}"
            )
        self.methods()  # validates every [compare] entry now, not mid-run

    @property
    def clients_per_round(self) -> int:
        return self.train.clients_per_round or self.data.num_clients

    def methods(self) -> list[MethodSpec]:
        """The methods of ``[compare]`` (or ``[compression]`` alone), with unique labels."""
        entries = self.compare.methods or ({},)
        specs = []
        counts: dict[str, int] = {}
        base = dataclasses.asdict(self.compression)
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"[compare] methods[{i}] must be a table, got {entry!r}")
            entry = dict(entry)
            label = entry.pop("label", None)
            if label is not None and (not isinstance(label, str) or not label or "/" in label):
                raise ConfigError(
                    f"[compare] methods[{i}].label must be a non-empty name, got {label!r}"
                )
            try:
                compression = build_section(
                    CompressionConfig, {**base, **entry}, "compression", strict_keys=entry
                )
            except ConfigError as exc:
                raise ConfigError(f"[compare] methods[{i}]: {exc}") from None
            label = label or compression.label
            counts[label] = counts.get(label, 0) + 1
            if counts[label] > 1:
                label = f"{label}-{counts[label]}"
            specs.append(MethodSpec(compression=compression, label=label))
        return specs

    def with_compression(self, compression: CompressionConfig) -> Config:
        return dataclasses.replace(self, compression=compression, compare=CompareConfig())

    def with_seed(self, seed: int) -> Config:
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seed=seed))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML-ready: None values dropped)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            section = {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items()}
            out[f.name] = {k: v for k, v in section.items() if v is not None}
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Config:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a config must be a table of sections, got {type(raw).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; allowed sections: {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        for name, section_cls in _SECTION_CLASSES.items():
            values = raw.get(name, {})
            if not isinstance(values, Mapping):
                raise ConfigError(f"[{name}] must be a table, got {values!r}")
            kwargs[name] = build_section(section_cls, values, name, strict_keys=values)
        return cls(**kwargs)


_SECTION_CLASSES: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "compression": CompressionConfig,
    "compare": CompareConfig,
}


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Load a config from a TOML file (or a dict), apply ``section.key=value`` overrides.

    Raises
    ------
    ConfigError
        For a missing or unparsable file, an unknown section or key, or a bad value.
    """
    if isinstance(source, Config):
        raw: dict[str, Any] = source.to_dict()
    elif source is None:
        raw = {}
    elif isinstance(source, Mapping):
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in source.items()}
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    for section, key, value in parse_overrides(overrides):
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        *parents, leaf = key.split(".")  # compression.options.fraction=0.1
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section}.{part} must be a table to set {section}.{key}")
        table[leaf] = value
    return Config.from_dict(raw)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str, Any]]:
    """Parse ``section.key=value`` strings; values are TOML, bare words are strings."""
    parsed = []
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. train.rounds=5"
            )
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        parsed.append((section, key, value))
    return parsed
