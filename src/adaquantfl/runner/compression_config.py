"""``[compression]``: the level policy, the compressor, error feedback and the downlink."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from adaquantfl.compression.compressor import COMPRESSORS, compressor_from_config
from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.compression.qsgd import MAX_LEVELS, NORMS
from adaquantfl.compression.qsgd_compressor import MESSAGE_ENCODINGS
from adaquantfl.policy import POLICIES, LevelPolicy, make_policy
from adaquantfl.policy.registry import LEVELLESS
from adaquantfl.runner.fields import ConfigError, at_least, choice, validate

__all__ = ["QSGD_KEYS", "CompressionConfig"]


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
            except (Exception, SystemExit) as exc:  # a plugin's own code may raise anything
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError(
                    f"[compression] plugins: cannot import module {name!r}: "
                    f"{type(exc).__name__}" + (f": {first}" if first else "")
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
        base = self.method if self.method in LEVELLESS else f"{self.method}-s{self.levels}"
        if self.compressor != "qsgd" and self.method != "fp32":
            takes_levels = COMPRESSORS[self.compressor].takes_levels
            base = f"{self.compressor}-{base}" if takes_levels else self.compressor
        if self.error_feedback and self.method != "fp32":
            base += "-ef"
        if self.downlink != "none":
            base += "-dl"
        return base
