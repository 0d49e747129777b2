"""What the strategy asks of a node in a round: the ``aq-*`` keys of the train instruction.

Train instruction (server -> node): the inner strategy's message, with these
keys added to a per-node copy of its ConfigRecord::

    aq-levels               int   this node's levels s_k; 0 means full precision (raw float32)
    aq-seed                 int   run seed of every derived random stream
    aq-round                int   0-based round index (FedServer.round_idx)
    aq-compressor           str   the compressor's registry name (COMPRESSORS), e.g. "qsgd"
    aq-compressor-options   str   its options as JSON (Compressor.to_config()["options"])
    aq-error-feedback       int   1: the node adds its residual and keeps the new one
    aq-uncompressed         str   JSON list of the arrays that travel beside the update
    aq-probe                int   1: only report the client id, do not train

With a compressed downlink (:mod:`adaquantfl.flower.downlink`) also::

    aq-downlink             str   the downlink compressor's registry name
    aq-downlink-options     str   its options as JSON
    aq-downlink-levels      int   its levels; 0: a raw float32 change
    aq-downlink-base        int   the round of the model the node must hold before it
                                  applies the changes; -1: the full model is sent
    aq-layout               str   with the full model: the model's arrays (ArrayLayout JSON)

The node rebuilds a compressor from the registry by name, so a compressor
of the user's own must be registered (its module imported) in the ClientApp
too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from adaquantfl.compression.compressor import Compressor, compressor_from_config
from adaquantfl.compression.feedback import ErrorFeedback
from adaquantfl.compression.qsgd import MAX_LEVELS
from adaquantfl.flower.layout import ArrayLayout
from adaquantfl.flower.records import RecordError

__all__ = [
    "COMPRESSOR_KEY",
    "COMPRESSOR_OPTIONS_KEY",
    "DOWNLINK_BASE_KEY",
    "DOWNLINK_KEY",
    "DOWNLINK_LEVELS_KEY",
    "DOWNLINK_OPTIONS_KEY",
    "ERROR_FEEDBACK_KEY",
    "LAYOUT_KEY",
    "LEVELS_KEY",
    "PROBE_KEY",
    "ROUND_KEY",
    "SEED_KEY",
    "UNCOMPRESSED_KEY",
    "DownlinkPlan",
    "RoundPlan",
    "add_plans",
    "describe_compressor",
    "plan_config",
]

LEVELS_KEY = "aq-levels"
SEED_KEY = "aq-seed"
ROUND_KEY = "aq-round"
COMPRESSOR_KEY = "aq-compressor"
COMPRESSOR_OPTIONS_KEY = "aq-compressor-options"
ERROR_FEEDBACK_KEY = "aq-error-feedback"
UNCOMPRESSED_KEY = "aq-uncompressed"
PROBE_KEY = "aq-probe"
DOWNLINK_KEY = "aq-downlink"
DOWNLINK_OPTIONS_KEY = "aq-downlink-options"
DOWNLINK_LEVELS_KEY = "aq-downlink-levels"
DOWNLINK_BASE_KEY = "aq-downlink-base"
LAYOUT_KEY = "aq-layout"

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class DownlinkPlan:
    """How a node gets the model in a round with a compressed downlink.

    Attributes
    ----------
    compressor : Compressor
        Decodes the change messages (:func:`adaquantfl.fl.downlink.apply_change`).
    levels : int or None
        Their levels (None: raw float32 changes).
    base : int or None
        The round of the model the node must hold before it applies the
        change messages; None: the message carries the full model instead.
    layout : ArrayLayout or None
        The model's arrays, sent with the full model (the node keeps it).
    """

    compressor: Compressor
    levels: int | None
    base: int | None
    layout: ArrayLayout | None = None


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a node in one round (the ``aq-*`` config keys)."""

    levels: int | None
    seed: int
    round_idx: int
    compressor: Compressor
    probe: bool = False
    uncompressed: tuple[str, ...] = ()
    downlink: DownlinkPlan | None = None

    def to_config(self) -> dict[str, int | str]:
        """The ``aq-*`` entries of a train instruction's ConfigRecord."""
        config = describe_compressor(self.compressor)
        out: dict[str, int | str] = {
            LEVELS_KEY: 0 if self.levels is None else self.levels,
            SEED_KEY: self.seed,
            ROUND_KEY: self.round_idx,
            COMPRESSOR_KEY: config["compressor"],
            COMPRESSOR_OPTIONS_KEY: json.dumps(config["options"], sort_keys=True),
            ERROR_FEEDBACK_KEY: int(bool(config.get("error_feedback"))),
            UNCOMPRESSED_KEY: json.dumps(list(self.uncompressed)),
            PROBE_KEY: int(self.probe),
        }
        if self.downlink is not None:
            down = describe_compressor(self.downlink.compressor)
            out[DOWNLINK_KEY] = down["compressor"]
            out[DOWNLINK_OPTIONS_KEY] = json.dumps(down["options"], sort_keys=True)
            out[DOWNLINK_LEVELS_KEY] = self.downlink.levels or 0
            out[DOWNLINK_BASE_KEY] = -1 if self.downlink.base is None else self.downlink.base
            if self.downlink.layout is not None:
                out[LAYOUT_KEY] = self.downlink.layout.to_json()
        return out

    @staticmethod
    def present(config: Mapping[str, object]) -> bool:
        """Whether ``config`` carries an AdaQuantFL plan (else the mod stays out of the way)."""
        return LEVELS_KEY in config

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RoundPlan:
        """Read and validate the plan; raises :class:`RecordError` naming the bad key."""
        levels = _int(config, LEVELS_KEY, 0, MAX_LEVELS)
        downlink = None
        if DOWNLINK_KEY in config:
            base = _int(config, DOWNLINK_BASE_KEY, -1, _INT64_MAX)
            layout = _str(config, LAYOUT_KEY) if LAYOUT_KEY in config else None
            downlink = DownlinkPlan(
                compressor=_compressor(
                    _str(config, DOWNLINK_KEY), _str(config, DOWNLINK_OPTIONS_KEY), 0
                ),
                levels=_int(config, DOWNLINK_LEVELS_KEY, 0, MAX_LEVELS) or None,
                base=None if base < 0 else base,
                layout=None if layout is None else ArrayLayout.from_json(layout),
            )
        return cls(
            levels=levels or None,
            seed=_int(config, SEED_KEY, -_INT64_MAX - 1, _INT64_MAX),
            round_idx=_int(config, ROUND_KEY, 0, _INT64_MAX),
            compressor=_compressor(
                _str(config, COMPRESSOR_KEY),
                _str(config, COMPRESSOR_OPTIONS_KEY),
                _int(config, ERROR_FEEDBACK_KEY, 0, 1),
            ),
            probe=bool(config.get(PROBE_KEY, 0)),
            uncompressed=_names(config.get(UNCOMPRESSED_KEY, "[]")),
            downlink=downlink,
        )


def plan_config(base: ConfigRecord, plan: RoundPlan) -> ConfigRecord:
    """A fresh ConfigRecord: the inner strategy's train config plus the node's plan."""
    config = ConfigRecord(dict(base))
    for key, value in plan.to_config().items():
        config[key] = value
    return config


def add_plans(
    messages: Sequence[Message],
    strategy: object,
    plans: Mapping[int, RoundPlan],
    downlinks: Mapping[int, Any],
) -> None:
    """Give each of the inner strategy's train messages its node's plan (and downlink arrays).

    The plan goes into a copy of the message's ConfigRecord (the strategy's
    ``configrecord_key``, or its only one); with a compressed downlink the
    ArrayRecord (``arrayrecord_key``, or the only one) is replaced by the
    node's :class:`~adaquantfl.flower.downlink.NodeDownlink` record. Flower's
    FedAvg gives all its messages one RecordDict, so each gets a new one.
    """
    for msg in messages:
        node = msg.metadata.dst_node_id
        content = RecordDict(dict(msg.content.items()))
        plan = plans[node]
        if node in downlinks:
            plan = replace(plan, downlink=downlinks[node].plan)
            arrays_name = _record_name(strategy, content.array_records, "arrayrecord_key", None)
            content[arrays_name] = downlinks[node].record
        config_name = _record_name(strategy, content.config_records, "configrecord_key", "config")
        base = content.config_records.get(config_name, ConfigRecord())
        content[config_name] = plan_config(base, plan)
        msg.content = content


def _record_name(
    strategy: object, records: Mapping[str, object], attribute: str, default: str | None
) -> str:
    """The name of the strategy's record of a kind: its ``*_key`` setting, or the only one."""
    name = getattr(strategy, attribute, None)
    if isinstance(name, str) and (name in records or default is not None):
        return name
    if len(records) == 1:
        return str(next(iter(records)))
    if default is not None and not records:
        return default
    kind = "ArrayRecord" if attribute.startswith("array") else "ConfigRecord"
    raise RuntimeError(
        f"the inner strategy's train message must carry one {kind}, found {sorted(records)}"
    )


_COMPRESSOR_CACHE: dict[tuple[str, str, int], Compressor] = {}


def _compressor(name: str, options_json: str, error_feedback: int) -> Compressor:
    """The compressor a plan names, rebuilt from the registry (cached per process)."""
    key = (name, options_json, error_feedback)
    cached = _COMPRESSOR_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        options = json.loads(options_json)
        compressor: Compressor = compressor_from_config({"compressor": name, "options": options})
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise RecordError(f"bad compressor settings in the train config: {exc}") from None
    if error_feedback:
        compressor = ErrorFeedback(compressor)
    if len(_COMPRESSOR_CACHE) > 64:
        _COMPRESSOR_CACHE.clear()
    _COMPRESSOR_CACHE[key] = compressor
    return compressor


def describe_compressor(compressor: Compressor) -> dict[str, Any]:
    """The compressor as plain data a node can rebuild it from (its ``to_config()``).

    Raises
    ------
    ValueError
        If the registry does not rebuild an equal compressor from it (the
        compressor is not registered, or its options do not round-trip).
    """
    to_config = getattr(compressor, "to_config", None)
    if not callable(to_config):
        raise ValueError(
            f"compressor must be a compressor of adaquantfl.compression (e.g. QSGDCompressor()) "
            f"with to_config(), got {type(compressor).__name__} {compressor!r}"
        )
    config: dict[str, Any] = to_config()
    rebuilt: Compressor = compressor_from_config(config)
    if config.get("error_feedback"):
        rebuilt = ErrorFeedback(rebuilt)
    if rebuilt != compressor:
        raise ValueError(
            f"{compressor!r} does not round-trip through the compressor registry "
            f"(rebuilt {rebuilt!r}); register its class with @register_compressor"
        )
    return config


def _int(config: Mapping[str, object], key: str, low: int, high: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(
            f"train config {key!r} must be an integer in [{low}, {high}], got {value!r}"
        )
    return value


def _str(config: Mapping[str, object], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str):
        raise RecordError(f"train config {key!r} must be a string, got {value!r}")
    return value


def _names(value: object) -> tuple[str, ...]:
    try:
        names = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecordError(f"train config {UNCOMPRESSED_KEY!r} must be a JSON list of names")
    return tuple(names)
