"""Compressors: a client's update to bytes, and bytes back to an update, by name.

A compressor turns a flat float32 update into the bytes a client sends, and
those bytes back into a tensor on the server. It carries a ``name`` (its key in
:data:`COMPRESSORS`) and a frozen, validated options dataclass, so that it can
be written into a config or a Flower message (:meth:`~Compressor.to_config`)
and rebuilt from one (:func:`compressor_from_config`).

``levels`` is the rate a level policy chooses for a client each round.
``levels=None`` means full precision for every compressor: the update is sent
as raw float32 in the v1 container (:func:`.codec.encode_dense`), so every message, compressed
or not, is counted from the bytes actually produced. A compressor whose rate is
not a number of levels (``takes_levels = False``, e.g. top-k) ignores any
other value.

Adding a compressor is one module::

    @register_compressor
    class MyCompressor(BaseCompressor):
        name = "mine"
        options_type = MyOptions          # a frozen dataclass that validates itself
        takes_levels = False

        def _compress(self, update, levels, *, generator): ...          # -> bytes
        def _decompress(self, payload, *, numel, levels, out): ...      # -> tensor
        def _max_compressed_bytes(self, numel): ...                     # -> int

The public verbs are ``compress`` and ``decompress``; the base class handles
full precision (``levels=None``) and calls the ``_``-prefixed hooks for the rest.
A client's end (:class:`.feedback.ClientCompressor`) calls
``compress_measured``, which also returns what the client reports of the
message; by default it decodes the payload once to measure it
(:func:`.measure.compress_measured`), and a compressor that can measure while
it encodes overrides it.

Notes
-----
The server decodes with the compressor it asked for, never with one named in
the payload, so a client cannot choose how its bytes are interpreted, and a
compressor checks its own messages (size, levels, canonical form) before it
allocates anything sized by them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from adaquantfl.compression.codec import decode_dense, encode_dense, message_bytes, peek_header
from adaquantfl.compression.codec import formula_bits as _formula_bits
from adaquantfl.compression.container import CodecError
from adaquantfl.compression.measure import compress_measured

__all__ = [
    "COMPRESSORS",
    "BaseCompressor",
    "Compressor",
    "compressor_from_config",
    "default_message_limit",
    "make_compressor",
    "options_from_mapping",
    "register_compressor",
]

#: Bytes allowed beyond a compressor's largest message, for an entropy coder's
#: model description and other data-dependent framing.
MESSAGE_SLACK_BYTES = 1024


@runtime_checkable
class Compressor(Protocol):
    """What clients, the server and the Flower integration need from a compressor."""

    @property
    def name(self) -> str:
        """The compressor's key in :data:`COMPRESSORS`."""

    @property
    def takes_levels(self) -> bool:
        """Whether the levels a policy chooses set the rate (else only None matters)."""

    @property
    def options(self) -> Any:
        """The frozen options dataclass."""

    def compress(
        self, update: torch.Tensor, levels: int | None, *, generator: torch.Generator
    ) -> bytes: ...

    def decompress(
        self,
        payload: bytes,
        *,
        numel: int,
        levels: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def formula_bits(self, numel: int, levels: int | None) -> int: ...

    def max_message_bytes(self, numel: int) -> int: ...

    def variance_bound(self, numel: int, levels: int | None) -> float | None: ...

    def to_config(self) -> dict[str, Any]: ...


_Options = TypeVar("_Options")


def options_from_mapping(
    options_type: type[_Options], values: Mapping[str, Any], what: str
) -> _Options:
    """Build an options dataclass from plain data; unknown keys name the allowed ones.

    Raises
    ------
    ValueError
        For an unknown key (listing the allowed keys) or a value the dataclass rejects.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} options must be a table, got {values!r}")
    allowed = [f.name for f in dataclasses.fields(options_type)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; allowed: {allowed or 'none'}")
    try:
        return options_type(**values)
    except ValueError as exc:
        raise ValueError(f"{what} options: {exc}") from None


class BaseCompressor:
    """The shared part of every compressor: options, full precision, config, equality.

    Subclasses set ``name``, ``options_type`` and ``takes_levels`` and implement
    :meth:`_compress`, :meth:`_decompress` and :meth:`_max_compressed_bytes` for non-None
    levels; ``levels=None`` (full precision) is handled here.

    Parameters
    ----------
    options : options_type, optional
        The validated options (defaults when omitted).
    """

    name: ClassVar[str] = ""
    options_type: ClassVar[type] = type(None)
    takes_levels: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        if options is None:
            options = self.options_type()
        if not isinstance(options, self.options_type):
            raise ValueError(
                f"{type(self).__name__} needs {self.options_type.__name__} options, got "
                f"{type(options).__name__}"
            )
        self._options: Any = options

    @property
    def options(self) -> Any:
        """The frozen options dataclass."""
        return self._options

    @classmethod
    def from_config(cls, options: Mapping[str, Any] | None = None) -> BaseCompressor:
        """Rebuild from :meth:`to_config`'s ``options`` (plain data)."""
        what = f"compressor {cls.name!r}"
        opts: Any = options_from_mapping(cls.options_type, options or {}, what)
        return cls(options=opts)

    def to_config(self) -> dict[str, Any]:
        """``{"compressor": name, "options": {...}}``, for :func:`compressor_from_config`."""
        options = dataclasses.asdict(self._options)
        return {"compressor": self.name, "options": options}

    # ------------------------------------------------------------------ the protocol

    def compress(
        self, update: torch.Tensor, levels: int | None, *, generator: torch.Generator
    ) -> bytes:
        """The bytes of ``update`` at ``levels``; raw float32 when ``levels`` is None."""
        if levels is None:
            return encode_dense(update)
        return self._compress(update, levels, generator=generator)

    def decompress(
        self,
        payload: bytes,
        *,
        numel: int,
        levels: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode ``payload`` to a flat float32 tensor of ``numel`` entries.

        Raises
        ------
        CodecError
            If the payload is malformed, or is not what ``numel`` and ``levels`` ask for.
        """
        if levels is None:
            # The encoding is checked from the header alone, before the CRC or
            # the body is read: a reply the round did not ask for costs nothing.
            encoding = peek_header(payload).encoding
            if encoding != "raw":
                raise CodecError(f"expected a raw full-precision message, got {encoding}")
            dense = decode_dense(payload, expected_numel=numel)
            if out is not None:
                out.copy_(dense)
                return out
            return dense
        return self._decompress(payload, numel=numel, levels=levels, out=out)

    def compress_measured(
        self,
        update: torch.Tensor,
        levels: int | None,
        *,
        generator: torch.Generator,
        scale: float = 1.0,
        residual: torch.Tensor | None = None,
    ) -> tuple[bytes, float, float]:
        """``compress``, and what the client reports: ``(payload, ||v||^2, ||scale C(v) - v||^2)``.

        ``update`` is a flat contiguous float32 CPU vector ``v``; ``scale``
        multiplies the decoded message as error feedback does (float32);
        ``residual``, if given (``update`` itself allowed), receives
        ``v - scale C(v)``. The payload is :meth:`compress`'s. This default
        decodes the payload into one float32 buffer to measure it
        (:func:`.measure.compress_measured`).
        """
        return compress_measured(
            self, update, levels, generator=generator, scale=scale, residual=residual
        )

    def formula_bits(self, numel: int, levels: int | None) -> int:
        """Paper-style bits of one message; ``32 d`` for full precision."""
        if levels is None:
            return _formula_bits(numel, None)
        return self._compressed_formula_bits(numel, levels)

    def max_message_bytes(self, numel: int) -> int:
        """The largest message a well-behaved client sends for ``numel`` entries, at any levels.

        The larger of a raw float32 message and :meth:`_max_compressed_bytes`, plus
        :data:`MESSAGE_SLACK_BYTES`; the server rejects anything bigger unread.
        """
        largest = max(message_bytes(numel, None), self._max_compressed_bytes(numel))
        return largest + MESSAGE_SLACK_BYTES

    # ------------------------------------------------------------------ for subclasses

    def _compress(self, update: torch.Tensor, levels: int, *, generator: torch.Generator) -> bytes:
        raise NotImplementedError

    def _decompress(
        self, payload: bytes, *, numel: int, levels: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _max_compressed_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def _compressed_formula_bits(self, numel: int, levels: int) -> int:
        """Paper-style bits of a compressed message; by default 8 x its largest size."""
        return 8 * self._max_compressed_bytes(numel)

    def variance_bound(self, numel: int, levels: int | None) -> float | None:
        """``omega`` with ``E||C(v) - v||^2 <= omega ||v||^2`` for an unbiased compressor.

        None when the compressor is not unbiased (or the bound is unknown);
        0 for full precision. Error feedback and the compressed downlink
        scale an unbiased compressor by ``1 / (1 + omega)`` so that it
        contracts (see :func:`.feedback.feedback_scale`).
        """
        return 0.0 if levels is None else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseCompressor):
            return NotImplemented
        return type(self) is type(other) and self._options == other._options

    def __hash__(self) -> int:
        return hash((type(self), self._options))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self._options).items())
        return f"{type(self).__name__}({fields})"


#: Compressor classes by name (the config's ``[compression] compressor`` choices).
COMPRESSORS: dict[str, type[BaseCompressor]] = {}

_C = TypeVar("_C", bound=type[BaseCompressor])


def register_compressor(cls: _C) -> _C:
    """Class decorator: add ``cls`` to :data:`COMPRESSORS` under ``cls.name``."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if name in COMPRESSORS and COMPRESSORS[name] is not cls:
        raise ValueError(f"a compressor named {name!r} is already registered")
    COMPRESSORS[name] = cls
    return cls


def compressor_from_config(config: Mapping[str, Any]) -> BaseCompressor:
    """Rebuild a compressor from :meth:`BaseCompressor.to_config`'s plain data.

    Only ``compressor`` and ``options`` are read; wrapping in
    :class:`~adaquantfl.compression.feedback.ErrorFeedback` is the caller's.

    Raises
    ------
    ValueError
        For an unknown compressor (listing the registered ones) or bad options.
    """
    name = config.get("compressor")
    options = config.get("options", {})
    if not isinstance(name, str) or name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; allowed: {sorted(COMPRESSORS)}")
    return COMPRESSORS[name].from_config(options)


def make_compressor(name: str = "qsgd", **options: Any) -> BaseCompressor:
    """Build compressor ``name`` (a key of :data:`COMPRESSORS`) with keyword options."""
    return compressor_from_config({"compressor": name, "options": options})


def default_message_limit(numel: int, compressor: Compressor | None = None) -> int:
    """The largest payload a well-behaved client can send for a model of ``numel`` entries.

    ``compressor.max_message_bytes(numel)`` (QSGD by default); anything bigger
    is rejected unread.
    """
    if compressor is None:
        compressor = make_compressor()
    return compressor.max_message_bytes(numel)
