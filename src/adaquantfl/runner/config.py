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
    INT64_MAX,
    ConfigError,
    at_least,
    at_most,
    build_section,
    choice,
    validate,
    within,
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

# The ranges of the numeric keys, each with the reason shown when a value is outside it.
STEP_MAX = 2.0**20
STEP_WHY = (
    "lr and prox_mu scale every local step in float32 arithmetic, whose largest value is "
    "3.4e38; at most 2**20 each, they and their product stay finite (a larger lr does not "
    "even convert to float32)"
)
ALPHA_RANGE = (1e-3, 1e6)
ALPHA_WHY = (
    "the Dirichlet label skew saturates outside it: below 0.001 most draws already give each "
    "class to a single client, above 1e6 the split is iid to 0.1%"
)
SYNTHETIC_MAX = 2.0**20
SYNTHETIC_WHY = (
    "Synthetic(alpha, beta) draws features of scale beta and logits of scale ~60 x alpha x "
    "beta; FedProx uses 0 to 1, and 2**20 keeps both finite in float32"
)
MAX_CLIENTS = 2**20
CLIENTS_WHY = "each client needs a training sample of its own; no data set here has 2**20"
#: Synthetic data are generated per client, about 100 kB each (10,000 clients: ~1 GB).
MAX_SYNTHETIC_CLIENTS = 2**16
SECONDS_MAX = 2.0**64
SECONDS_WHY = "simulated seconds; no deadline binds beyond 2**64 s: leave deadline_s unset"
SIGMA_MAX = 8.0
SIGMA_WHY = (
    "a log-scale spread: a client's time is client_time_s x exp(sigma x z + ...), z normal; "
    "e**8 = 3000x already covers any device mix, and exp() stays finite for every draw"
)
LOSS_MAX = 2.0**64
LOSS_WHY = "the server accepts no reported loss above 2**64, so no target beyond it means anything"
MAX_SEEDS = 1024
SEEDS_WHY = "each seed runs every method once more"


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: which data set and how it is split over clients."""

    dataset: str = field(default="digits", metadata=choice(*DATASETS))
    partition: str | None = field(default=None, metadata=choice(*PARTITIONS))
    dirichlet_alpha: float = field(default=0.5, metadata=within(*ALPHA_RANGE, ALPHA_WHY))
    shards_per_client: int = field(default=2, metadata=at_least(1))
    min_client_samples: int = field(default=10, metadata=at_least(1))
    synthetic_alpha: float = field(default=1.0, metadata=within(0, SYNTHETIC_MAX, SYNTHETIC_WHY))
    synthetic_beta: float = field(default=1.0, metadata=within(0, SYNTHETIC_MAX, SYNTHETIC_WHY))
    num_clients: int = field(default=10, metadata=at_most(MAX_CLIENTS, CLIENTS_WHY))
    data_dir: str | None = None

    def __post_init__(self) -> None:
        validate(self, "data")
        if self.dataset == "synthetic" and self.num_clients > MAX_SYNTHETIC_CLIENTS:
            raise ConfigError(
                f"[data] num_clients = {self.num_clients}: must be <= {MAX_SYNTHETIC_CLIENTS} "
                "for dataset 'synthetic' (it generates about 100 kB of data per client: "
                f"{MAX_SYNTHETIC_CLIENTS} clients are some 6.5 GB); allowed range "
                f"[1, {MAX_SYNTHETIC_CLIENTS}]"
            )


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
    lr: float = field(default=0.05, metadata=within(0, STEP_MAX, STEP_WHY, above=True))
    clients_per_round: int | None = field(default=None, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    engine: str = field(default="sim", metadata=choice(*ENGINES))
    vectorize: bool = True
    device: str = field(default="cpu", metadata=choice(*DEVICES))
    checkpoint_every: int = field(default=0, metadata=at_least(0))
    dropout: float = field(default=0.0, metadata=within(0, 1, "a probability"))
    deadline_s: float | None = field(
        default=None, metadata=within(0, SECONDS_MAX, SECONDS_WHY, above=True)
    )
    client_time_s: float = field(
        default=1.0, metadata=within(0, SECONDS_MAX, SECONDS_WHY, above=True)
    )
    client_time_sigma: float = field(default=0.5, metadata=within(0, SIGMA_MAX, SIGMA_WHY))
    round_time_sigma: float = field(default=0.25, metadata=within(0, SIGMA_MAX, SIGMA_WHY))
    max_message_bytes: int | None = field(default=None, metadata=at_least(1))
    prox_mu: float = field(default=0.0, metadata=within(0, STEP_MAX, STEP_WHY))
    uplink_budget_bits: int | None = field(default=None, metadata=at_least(1))
    max_weight_share: float | None = field(
        default=None, metadata=within(0, 1, "a share of the round's weight", above=True)
    )

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
    target_loss: float | None = field(
        default=None, metadata=within(0, LOSS_MAX, LOSS_WHY, above=True)
    )
    smooth_rounds: int = field(default=10, metadata=at_least(1))
    seeds: int = field(default=1, metadata=at_most(MAX_SEEDS, SEEDS_WHY))

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
        last_seed = self.train.seed + self.compare.seeds - 1
        if last_seed > INT64_MAX:
            raise ConfigError(
                f"[train] seed = {self.train.seed} with [compare] seeds = {self.compare.seeds} "
                f"runs seed {last_seed}: the last seed must be <= 2**63 - 1 (the random streams "
                "pack it as a signed 64-bit integer)"
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
        except RecursionError:
            raise ConfigError(
                f"config file {str(path)!r} nests arrays or tables deeper than the TOML "
                "parser can follow"
            ) from None
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
        except (tomllib.TOMLDecodeError, RecursionError):
            value = text.strip()
        parsed.append((section, key, value))
    return parsed
