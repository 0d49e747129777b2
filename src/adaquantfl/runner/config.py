"""Experiment configuration: TOML file + overrides, validated into frozen dataclasses.

Every key has a type and, where it is a choice, the list of allowed values, so
a bad key or value is reported with its section, name and what is allowed::

    [train] lr = -1.0: must be > 0
    unknown key 'train.roundz'; allowed keys in [train]: batch_size, ...

This module is the whole config: the typed fields and their checks (each
number with a range and the reason for it), the ``[compression]`` section (the
level policy, the compressor, error feedback, the downlink), the other
sections, and loading a file with overrides.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaquantfl.compression.compressor import COMPRESSORS, compressor_from_config
from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.compression.qsgd import MAX_LEVELS, NORMS
from adaquantfl.compression.qsgd_compressor import MESSAGE_ENCODINGS
from adaquantfl.data import DATASETS, PARTITIONS
from adaquantfl.fl.client import (
    BATCH_SIZE_LIMIT,
    LOCAL_STEPS_LIMIT,
    MAX_BATCH_SIZE,
    MAX_LOCAL_STEPS,
    LocalTraining,
)
from adaquantfl.imports import import_module, is_import_path
from adaquantfl.models import INITS, MODELS
from adaquantfl.policy import POLICIES, LevelPolicy, make_policy
from adaquantfl.policy.registry import LEVELLESS
from adaquantfl.validation import as_int, as_real, is_real

__all__ = [
    "INT64_MAX",
    "QSGD_KEYS",
    "CompareConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "at_least",
    "at_most",
    "build_section",
    "choice",
    "load_config",
    "parse_overrides",
    "positive",
    "validate",
    "within",
]


#: The largest value of an integer field without a bound of its own.
INT64_MAX = 2**63 - 1
_INT64_WHY = "a signed 64-bit integer, the largest TOML and the random streams hold"


class ConfigError(ValueError):
    """A configuration key or value is not allowed; the text names it."""


def choice(*choices: str, or_own: bool = False) -> dict[str, Any]:
    """One of ``choices``; with ``or_own``, also a user's own ``"package.module:name"``."""
    return {"choices": tuple(choices), "or_own": or_own}


def positive() -> dict[str, Any]:
    return {"min": 0, "exclusive": True}


def at_least(low: float) -> dict[str, Any]:
    return {"min": low}


def at_most(high: float, why: str, low: float = 1) -> dict[str, Any]:
    """At least ``low`` and at most ``high``; ``why`` is the reason for ``high``, shown with it."""
    return {"min": low, "max": high, "why": why}


def within(low: float, high: float, why: str, *, above: bool = False) -> dict[str, Any]:
    """In ``[low, high]`` (``(low, high]`` with ``above``); ``why`` is the reason, shown with it."""
    return {"min": low, "max": high, "why": why, "exclusive": above}


def _range(meta: Mapping[str, Any], high: float) -> str:
    opening = "(" if meta.get("exclusive") else "["
    return f"{opening}{_number(meta.get('min', '-inf'))}, {_number(high)}]"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**64:
        value = int(value)
    if isinstance(value, int) and value > 2**32 and (value & (value - 1)) == 0:
        return f"2**{value.bit_length() - 1}"
    if isinstance(value, int) and value > 2**32 and ((value + 1) & value) == 0:
        return f"2**{value.bit_length()} - 1"
    return str(value)


def build_section(
    cls: type, values: Mapping[str, Any], section: str, *, strict_keys: Mapping[str, Any]
) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(strict_keys) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key {section}.{unknown[0]!s}; allowed keys in [{section}]: {', '.join(names)}"
        )
    kwargs = {k: v for k, v in values.items() if k in names}
    for key, value in kwargs.items():  # TOML arrays -> the tuples the dataclasses hold
        if isinstance(value, list):
            kwargs[key] = tuple(value)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"[{section}]: {exc}") from None


def validate(obj: Any, section: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        shown = repr(value)
        if len(shown) > 80:
            shown = f"{shown[:60]}... ({len(shown)} characters)"
        where = f"[{section}] {f.name} = {shown}"
        _check_type(value, hints[f.name], where)
        if isinstance(value, int) and _is_float_hint(hints[f.name]):
            value = float(value)  # TOML writes 1 for 1.0; store the float
            object.__setattr__(obj, f.name, value)
        meta = f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            if meta.get("or_own") and is_import_path(value):
                continue
            own = " or your own, 'package.module:name'" if meta.get("or_own") else ""
            raise ConfigError(
                f"{where} is not allowed; choose one of {list(meta['choices'])}{own}"
            )
        if not is_real(value):
            continue
        high, why = meta.get("max"), meta.get("why")
        if high is None and isinstance(value, int):
            high, why = INT64_MAX, _INT64_WHY
        reason = f" ({why})" if why else ""
        allowed = f"; allowed range {_range(meta, high)}" if high is not None else ""
        if "min" in meta:
            low = meta["min"]
            if meta.get("exclusive") and not value > low:
                raise ConfigError(f"{where}: must be > {_number(low)}{reason}{allowed}")
            if not meta.get("exclusive") and value < low:
                raise ConfigError(f"{where}: must be >= {_number(low)}{reason}{allowed}")
        if high is not None and value > high:
            raise ConfigError(f"{where}: must be <= {_number(high)}{reason}{allowed}")


def _is_float_hint(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{where}: must be a list")
        return
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a table")
        return
    if hint is float:
        if as_real(value) is None:  # also an integer too large for a float
            raise ConfigError(f"{where}: must be a finite number")
        return
    if hint is int:
        if as_int(value) is None:
            raise ConfigError(f"{where}: must be an integer")
        return
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
        return
    if not isinstance(value, hint):  # pragma: no cover - every field type is handled above
        raise ConfigError(f"{where}: must be of type {hint}")


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
    bucket_size: int | None = field(default=None, metadata=at_least(0))
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
            import_module(name, "[compression] plugins", error=ConfigError)

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
        base = self.method if self.method in LEVELLESS else f"{self.method}-s{self.levels}"
        if self.compressor != "qsgd" and self.method != "fp32":
            takes_levels = COMPRESSORS[self.compressor].takes_levels
            base = f"{self.compressor}-{base}" if takes_levels else self.compressor
        if self.error_feedback and self.method != "fp32":
            base += "-ef"
        if self.downlink != "none":
            base += "-dl"
        return base


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

    dataset: str = field(default="digits", metadata=choice(*DATASETS, or_own=True))
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

    name: str = field(default="mlp", metadata=choice(*MODELS, or_own=True))
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
    noise_cost_every: int = field(default=0, metadata=at_least(0))
    eval_every: int = field(default=1, metadata=at_least(1))

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
