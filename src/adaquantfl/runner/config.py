"""Experiment configuration: TOML file + overrides, validated into frozen dataclasses.

Every key has a type and, where it is a choice, the list of allowed values, so
a bad key or value is reported with its section, name and what is allowed::

    [train] lr = -1.0: must be > 0
    unknown key 'train.roundz'; allowed keys in [train]: batch_size, ...
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaquantfl.compression.compressor import COMPRESSORS, compressor_from_config
from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.compression.qsgd import MAX_LEVELS, NORMS
from adaquantfl.compression.qsgd_compressor import MESSAGE_ENCODINGS
from adaquantfl.data import DATASETS, PARTITIONS
from adaquantfl.models import INITS, MODELS
from adaquantfl.policy import POLICIES, LevelPolicy, make_policy
from adaquantfl.runner.fields import (
    ConfigError,
    at_least,
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
    local_steps: int = field(default=10, metadata=at_least(1))
    batch_size: int = field(default=32, metadata=at_least(1))
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

    def __post_init__(self) -> None:
        validate(self, "train")


#: The QSGD options that ``[compression]`` also takes as keys of its own (the
#: keys of the paper's configs, kept working beside ``[compression.options]``).
QSGD_KEYS: tuple[str, ...] = ("encoding", "bucket_size", "norm")


@dataclass(frozen=True)
class CompressionConfig:
    """``[compression]``: the level policy (method), the compressor, and the downlink.

    ``method`` names a policy (:data:`adaquantfl.policy.POLICIES`), with
    ``levels`` (s for fixed levels, s0 for AdaQuantFL), ``min_levels``,
    ``max_levels`` and ``[compression.policy_options]``. ``compressor`` names
    a compressor (:data:`adaquantfl.compression.compressor.COMPRESSORS`) with
    ``[compression.options]``; QSGD's ``encoding``, ``bucket_size`` and
    ``norm`` may also be given as keys of ``[compression]``.
    ``error_feedback`` wraps the compressor in
    :class:`~adaquantfl.compression.feedback.ErrorFeedback`. ``downlink``
    names a compressor for the model the server sends (``"none"``: raw
    float32, the paper), at ``downlink_levels`` with ``[compression.downlink_options]``.
    ``plugins`` lists modules to import first: a compressor or policy of the
    user's own registers itself when its module is imported (the Flower
    engine imports them on every client too).
    """

    method: str = "adaquantfl"
    levels: int = field(default=2, metadata={"min": 1, "max": MAX_LEVELS})
    compressor: str = "qsgd"
    options: dict[str, Any] = field(default_factory=dict)
    encoding: str | None = field(default=None, metadata=choice(*MESSAGE_ENCODINGS))
    bucket_size: int | None = field(default=None, metadata=at_least(1))
    norm: str | None = field(default=None, metadata=choice(*NORMS))
    min_levels: int = field(default=1, metadata={"min": 1, "max": MAX_LEVELS})
    max_levels: int = field(default=2**16, metadata={"min": 1, "max": MAX_LEVELS})
    policy_options: dict[str, Any] = field(default_factory=dict)
    error_feedback: bool = False
    downlink: str = "none"
    downlink_levels: int = field(default=255, metadata={"min": 1, "max": MAX_LEVELS})
    downlink_options: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate(self, "compression")
        self.import_plugins()
        # Checked here, not by field metadata: a plugin registers its names on import.
        for key, value, allowed in (
            ("method", self.method, sorted(POLICIES)),
            ("compressor", self.compressor, sorted(COMPRESSORS)),
            ("downlink", self.downlink, ["none", *sorted(COMPRESSORS)]),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"[compression] {key} = {value!r} is not allowed; choose one of {allowed}"
                )
        if self.method == "adaquantfl" and not (self.min_levels <= self.levels <= self.max_levels):
            raise ConfigError(
                f"[compression] levels = {self.levels} must lie in [min_levels, max_levels] = "
                f"[{self.min_levels}, {self.max_levels}] for adaquantfl"
            )
        # Build both once now, so that a bad option is reported when the config
        # is loaded, not in the middle of a run.
        self.build_compressor()
        self.build_downlink_compressor()
        self.build_policy()

    def import_plugins(self) -> None:
        """Import the modules of ``plugins`` (each registers compressors or policies)."""
        for name in self.plugins:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"[compression] plugins must be module names, got {name!r}")
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(
                    f"[compression] plugins: cannot import module {name!r}: {exc}"
                ) from None

    def compressor_config(self) -> dict[str, Any]:
        """``{"compressor": name, "options": {...}}``; for qsgd with the QSGD keys merged in.

        ``encoding``, ``bucket_size`` and ``norm`` of ``[compression]`` are the
        qsgd compressor's options (so that a ``[compare]`` entry can switch to
        another compressor without unsetting them); other compressors take
        theirs from ``[compression.options]`` alone.
        """
        options = dict(self.options)
        if self.compressor != "qsgd":
            return {"compressor": self.compressor, "options": options}
        for key in QSGD_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if key in options and options[key] != value:
                raise ConfigError(
                    f"[compression] {key} = {value!r} contradicts [compression.options] "
                    f"{key} = {options[key]!r}"
                )
            options[key] = value
        return {"compressor": self.compressor, "options": options}

    def build_compressor(self) -> Any:
        """The clients' compressor (wrapped in error feedback when that is on)."""
        try:
            compressor = compressor_from_config(self.compressor_config())
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"[compression] {exc}") from None
        return ErrorFeedback(compressor) if self.error_feedback else compressor

    def build_downlink_compressor(self) -> Any:
        """The server's compressor of the model it sends, or None (raw float32)."""
        if self.downlink == "none":
            if self.downlink_options:
                raise ConfigError(
                    "[compression] downlink_options need a downlink compressor; set downlink"
                )
            return None
        try:
            return compressor_from_config(
                {"compressor": self.downlink, "options": self.downlink_options}
            )
        except ValueError as exc:
            raise ConfigError(f"[compression] downlink: {exc}") from None

    def build_policy(self, rounds: int = 100) -> LevelPolicy:
        """A fresh level policy of ``method`` for a run of ``rounds`` rounds."""
        try:
            return make_policy(
                self.method,
                levels=self.levels,
                min_levels=self.min_levels,
                max_levels=self.max_levels,
                rounds=rounds,
                options=dict(self.policy_options),
            )
        except ValueError as exc:
            raise ConfigError(f"[compression] method {self.method!r}: {exc}") from None

    @property
    def resolved_encoding(self) -> str | None:
        """The QSGD encoding in use (None for other compressors)."""
        if self.compressor != "qsgd":
            return None
        return str(self.compressor_config()["options"].get("encoding", "packed"))

    @property
    def label(self) -> str:
        """``fp32``, ``qsgd-s<levels>`` or ``adaquantfl-s<levels>`` (DESIGN §7).

        Other compressors prefix their name (``topk``, or ``topk-qsgd-s2`` for
        one that takes levels); ``-ef`` marks error feedback and ``-dl`` a
        compressed downlink.
        """
        base = "fp32" if self.method == "fp32" else f"{self.method}-s{self.levels}"
        if self.compressor != "qsgd" and self.method != "fp32":
            takes_levels = COMPRESSORS[self.compressor].takes_levels
            base = f"{self.compressor}-{base}" if takes_levels else self.compressor
        if self.error_feedback and self.method != "fp32":
            base += "-ef"
        if self.downlink != "none":
            base += "-dl"
        return base


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
