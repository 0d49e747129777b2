"""A model's arrays as Flower carries them, split into the compressed vector and the rest.

The federated loop compresses one flat float32 vector (DESIGN §2). A PyTorch
``state_dict`` holds more than that: BatchNorm's running statistics and
``num_batches_tracked`` counter, integer buffers, parameters in float16.
:class:`ArrayLayout` says, for every array of the model's ArrayRecord, whether
it is part of the compressed vector or travels beside it:

- floating arrays (float16, float32, float64) are parameters: they are
  flattened (as float32) into the vector whose change ``Delta_i`` is
  compressed; the model keeps each array's own dtype;
- arrays of another dtype (integers, bool), and arrays whose name matches
  ``uncompressed`` (by default BatchNorm's buffers), travel *beside* the
  update: uncompressed, as the .npy arrays Flower carries, counted in
  ``wire_bits``, and aggregated like the rest of the model.

Notes
-----
BatchNorm's running variance is float32, but it is a statistic, not a
parameter: a quantized change of it can be negative and larger than the
variance itself, which makes the normalisation NaN. So it travels beside the
update by name. bfloat16 cannot be carried at all: Flower's Array holds numpy
arrays and numpy has no bfloat16 (``ArrayRecord(model.state_dict())`` raises
``TypeError: Got unsupported ScalarType BFloat16`` for a bfloat16 model, with
or without adaquantfl); :func:`record_from_state_dict` sends such tensors as
float32, which is exact, and ``load_state_dict`` casts them back.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from adaquantfl.compression import measure

__all__ = [
    "BATCHNORM_BUFFERS",
    "MAX_JSON_DEPTH",
    "ArrayLayout",
    "RecordError",
    "read_json",
    "record_bytes",
    "record_from_state_dict",
]

#: The buffers torch's BatchNorm layers add to a state_dict (matched as a name
#: or a ``.``-separated suffix): they travel beside the compressed update.
BATCHNORM_BUFFERS: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")


class RecordError(ValueError):
    """A Flower record does not have the layout adaquantfl expects; the text says why.

    Raised for the model's arrays here and for every ``aq-*`` record in
    :mod:`adaquantfl.flower.messages`.
    """


#: The deepest JSON that :func:`read_json` parses. adaquantfl's own JSON is at most
#: 3 deep (a layout's shapes); Python's parser recurses once per level and raises
#: RecursionError near 1,000.
MAX_JSON_DEPTH = 32
#: The longest layout :meth:`ArrayLayout.from_json` reads (characters): about 100,000
#: arrays with long names.
MAX_LAYOUT_CHARS = 2**24

# A JSON string, escapes included; an unterminated one runs to the end of the text,
# as for json.loads. Possessive: no backtracking, so the scan is linear in the length.
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deep ``text`` nests arrays and objects, without parsing it (linear time, no recursion).

    Brackets inside strings do not count. For valid JSON this is the depth at
    which ``json.loads`` recurses; for invalid JSON it is at least the depth that
    ``json.loads`` reaches before it finds the error.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0)


def read_json(text: str, what: str, *, max_chars: int) -> Any:
    """``json.loads(text)`` for JSON from a message, refused first when it is too long or deep.

    ``json.loads`` recurses once per level of nesting: JSON nested 100,000 deep
    raises RecursionError, which says nothing of where it came from. The length
    is checked first, then the depth (:func:`json_depth`), then the text is parsed.

    Raises
    ------
    RecordError
        Naming ``what`` (e.g. ``"train config 'aq-layout'"``), when ``text`` is
        longer than ``max_chars``, nests deeper than :data:`MAX_JSON_DEPTH`, or
        is not JSON.
    """
    if len(text) > max_chars:
        raise RecordError(
            f"{what} is {len(text):,} characters of JSON, more than the {max_chars:,} allowed"
        )
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise RecordError(
            f"{what} nests JSON {depth} levels deep, deeper than the {MAX_JSON_DEPTH} allowed"
        )
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError, or an integer of over 4,300 digits
        raise RecordError(f"{what} is not valid JSON: {exc}") from None


_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
_NUMPY_STYPE = "numpy.ndarray"
#: Room for a .npy header beyond the array's bytes (numpy pads it to 64 bytes;
#: a version 2/3 header may be longer, never this long for a model array).
_NPY_HEADER_LIMIT = 65536


def _matches(name: str, patterns: Collection[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` or ends with ``.<pattern>``."""
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def record_bytes(record: ArrayRecord, names: Sequence[str] | None = None) -> int:
    """Bytes of the Arrays' data (what Flower carries), of ``names`` or of all of them."""
    keys = record.keys() if names is None else names
    return sum(len(record[k].data) for k in keys)


def record_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state_dict)``, with bfloat16 tensors sent as float32 (exactly).

    Flower cannot carry bfloat16 (numpy has no such dtype). ``model.load_state_dict``
    casts the float32 values back to the model's bfloat16 parameters.
    """
    arrays = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu()
        arrays[name] = npy_array(t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    return ArrayRecord(arrays)


def npy_array(values: np.ndarray) -> Array:
    """``Array(values)``, byte for byte, with one copy of the data and nothing else.

    Flower's ``Array(ndarray)`` writes the ``.npy`` file into a growing
    ``BytesIO`` and copies it out; this joins the header and the array's own
    buffer into the one ``bytes`` object an Array holds.
    """
    if not (values.flags.c_contiguous or values.flags.f_contiguous):
        values = np.ascontiguousarray(values)
    header_data = np.lib.format.header_data_from_array_1_0(values)
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, header_data)
    except ValueError:  # a header of over 64 KiB (never a model's): numpy's own writer
        return Array(values)
    flat = (values.T if header_data["fortran_order"] else values).reshape(-1)
    data = flat.data.cast("B") if flat.size else b""
    return Array(
        dtype=str(values.dtype),
        shape=tuple(int(d) for d in values.shape),
        stype=_NUMPY_STYPE,
        data=b"".join((header.getvalue(), data)),
    )


def npy_values(array: Array, name: str, shape: tuple[int, ...], dtype: str | None) -> np.ndarray:
    """The values of a ``.npy`` Array, read in place: a read-only view of its bytes.

    ``Array.numpy()`` copies the data (``np.load`` of a ``BytesIO``, in 256 KiB
    reads); this parses the header and looks at the data where it is. The
    Array must be ``dtype`` (None: any float dtype) of ``shape``, by its own
    fields and by its header, which is read before anything is allocated.

    Raises
    ------
    RecordError
        If it is another dtype or shape, its header says otherwise or is not
        a ``.npy`` header, or its data is shorter than the header claims.
    """
    dtype_ok = array.dtype in _FLOAT_DTYPES if dtype is None else array.dtype == dtype
    if array.stype != _NUMPY_STYPE or not dtype_ok or tuple(array.shape) != shape:
        raise RecordError(
            f"array {name!r} is {array.stype} {array.dtype} {tuple(array.shape)}, "
            f"expected {dtype or 'float'} {shape}"
        )
    data = array.data
    try:
        head = io.BytesIO(memoryview(data)[:_NPY_HEADER_LIMIT])
        version = np.lib.format.read_magic(head)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        header_shape, fortran, header_dtype = read_header(head)
    except (ValueError, OSError, TypeError) as exc:
        raise RecordError(f"array {name!r} is not a .npy array: {exc}") from None
    if tuple(header_shape) != shape or str(header_dtype) != array.dtype:
        raise RecordError(
            f"array {name!r}'s .npy header says {header_dtype} {tuple(header_shape)}, "
            f"not {array.dtype} {shape}"
        )
    count = math.prod(shape)
    offset = head.tell()
    nbytes = count * header_dtype.itemsize
    if len(data) < offset + nbytes or len(data) > offset + nbytes + _NPY_HEADER_LIMIT:
        raise RecordError(f"array {name!r} carries {len(data) - offset} bytes of data for {nbytes}")
    values = np.frombuffer(data, dtype=header_dtype, count=count, offset=offset)
    return values.reshape(shape[::-1]).T if fortran else values.reshape(shape)


def all_finite(values: np.ndarray) -> bool:
    """Whether every entry of a numeric array is finite, read in place (no big temporary)."""
    if values.dtype.kind not in "fc":
        return True
    flat = values.reshape(-1) if values.flags.c_contiguous else values.T.reshape(-1)
    if not (flat.flags.c_contiguous or flat.size == 0):  # pragma: no cover - npy_values' views
        flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype in (np.float32, np.float64):
        return measure.all_finite(flat)  # one compiled pass
    chunk = 2**18  # float16, complex: numpy, a slice at a time
    return all(bool(np.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.size, chunk))


@dataclass(frozen=True)
class ArrayLayout:
    """Names, shapes and dtypes of a model's arrays, and which of them travel beside.

    Attributes
    ----------
    names, shapes : tuple
        Every array of the model, in record order.
    dtypes : tuple of str
        Their numpy dtypes (default: all float32).
    side : tuple of str
        The arrays that travel beside the compressed update, in record order;
        every other array is part of the flat float32 vector.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...] = ()
    side: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.dtypes:
            object.__setattr__(self, "dtypes", ("float32",) * len(self.names))
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise ValueError("a layout needs one shape and one dtype per array name")
        if len(set(self.names)) != len(self.names) or not set(self.side) <= set(self.names):
            raise ValueError("layout names must be unique and include every side array")
        for name, dtype in zip(self.names, self.dtypes, strict=True):
            if name not in self.side and dtype not in _FLOAT_DTYPES:
                raise ValueError(f"array {name!r} of dtype {dtype} cannot be compressed")

    @classmethod
    def of(
        cls, record: ArrayRecord, uncompressed: Collection[str] = BATCHNORM_BUFFERS
    ) -> ArrayLayout:
        """The layout of ``record``: floats are compressed, unless their name is ``uncompressed``.

        Raises
        ------
        RecordError
            If the record is empty, or an array is not a numpy array of a
            floating, integer or bool dtype.
        """
        names, shapes, dtypes, side = [], [], [], []
        for name, array in record.items():
            if array.stype != _NUMPY_STYPE:
                raise RecordError(
                    f"array {name!r} has stype {array.stype!r}; the model must be numpy arrays "
                    "(ArrayRecord(model.state_dict()))"
                )
            kind = np.dtype(array.dtype).kind if _known_dtype(array.dtype) else "?"
            if array.dtype not in _FLOAT_DTYPES and kind not in "iub":
                raise RecordError(
                    f"array {name!r} has dtype {array.dtype}; a model's arrays must be "
                    "float16/32/64 parameters or integer/bool buffers"
                )
            names.append(name)
            shapes.append(tuple(int(d) for d in array.shape))
            dtypes.append(array.dtype)
            if array.dtype not in _FLOAT_DTYPES or _matches(name, uncompressed):
                side.append(name)
        if not names:
            raise RecordError("the model's ArrayRecord is empty")
        if len(side) == len(names):
            raise RecordError(
                "the model has no floating-point parameters to compress (every array travels "
                "uncompressed)"
            )
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(side))

    # ------------------------------------------------------------------ sizes

    @property
    def numel(self) -> int:
        """Entries of the compressed vector ``d``."""
        return sum(
            math.prod(s) for n, s in zip(self.names, self.shapes, strict=True) if n not in self.side
        )

    def _compressed(self) -> list[tuple[str, tuple[int, ...], str]]:
        side = set(self.side)
        return [
            (n, s, d)
            for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)
            if n not in side
        ]

    def _spec(self, name: str) -> tuple[tuple[int, ...], str]:
        i = self.names.index(name)
        return self.shapes[i], self.dtypes[i]

    # ------------------------------------------------------------------ conversions

    def check_names(self, record: ArrayRecord, what: str = "ArrayRecord") -> None:
        if set(record.keys()) != set(self.names):
            raise RecordError(
                f"{what} keys {sorted(record.keys())} differ from the model's {sorted(self.names)}"
            )

    def flatten(self, record: ArrayRecord) -> torch.Tensor:
        """The compressed arrays of ``record`` as one flat float32 tensor, in layout order.

        One new vector of ``d`` float32 entries; each array is read in place
        (:func:`npy_values`) and cast into it. ``record`` holds the model's
        arrays, or only its compressed ones (a :meth:`float32_record`).
        """
        if set(record.keys()) != {n for n, _ in self._float_arrays()}:
            self.check_names(record)
        out = torch.empty(self.numel, dtype=torch.float32)
        for (name, shape), target in zip(self._float_arrays(), self._slices(out), strict=True):
            # Any float dtype: a train function may hand back float64 or float32
            # arrays of a float16 model; the values are what counts.
            np.copyto(target, npy_values(record[name], name, shape, None), casting="same_kind")
        return out

    def difference(
        self, record: ArrayRecord, base: Mapping[str, Array], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``flatten(record) - flatten(base)``, the same float32 bits, in one new vector.

        Each array of both is read in place and subtracted into ``out`` (a new
        vector of ``d`` float32 entries when None): a node's update costs the
        update and nothing else. ``base`` holds the compressed arrays (any
        float dtype; the model's side arrays need not be there).
        """
        self.check_names(record)
        if out is None:
            out = torch.empty(self.numel, dtype=torch.float32)
        for (name, shape), target in zip(self._float_arrays(), self._slices(out), strict=True):
            if name not in base:
                raise RecordError(f"the model to subtract lacks the array {name!r}")
            # dtype=float32: each operand is cast to float32 first (numpy would
            # subtract float64 arrays in float64), as flatten(...) - flatten(...) does.
            np.subtract(
                npy_values(record[name], name, shape, None),
                npy_values(base[name], name, shape, None),
                out=target,
                dtype=np.float32,
                casting="same_kind",
            )
        return out

    def _float_arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, s) for n, s, _ in self._compressed()]

    def _slices(self, flat: torch.Tensor) -> list[np.ndarray]:
        """Numpy views of ``flat`` (float32, ``d`` entries), one per compressed array, shaped."""
        if flat.dtype != torch.float32 or flat.numel() != self.numel or not flat.is_contiguous():
            raise ValueError(
                f"expected a contiguous float32 tensor of {self.numel} entries, "
                f"got {flat.dtype} with {flat.numel()}"
            )
        values = flat.detach().reshape(-1).numpy()
        views, offset = [], 0
        for _, shape, _ in self._compressed():
            size = math.prod(shape)
            views.append(values[offset : offset + size].reshape(shape))
            offset += size
        return views

    def to_record(self, flat: torch.Tensor, side: Mapping[str, Array] | None = None) -> ArrayRecord:
        """``flat`` in the model's arrays and dtypes, plus the ``side`` arrays, in layout order."""
        if flat.dtype != torch.float32 or flat.numel() != self.numel:
            raise ValueError(
                f"expected a flat float32 tensor of {self.numel} entries, "
                f"got {flat.dtype} with {flat.numel()}"
            )
        side = side or {}
        if set(side) != set(self.side):
            raise ValueError(f"expected the side arrays {list(self.side)}, got {sorted(side)}")
        views = dict(zip((n for n, _ in self._float_arrays()), self._slices(flat), strict=True))
        arrays: dict[str, Array] = {}
        for name, dtype in zip(self.names, self.dtypes, strict=True):
            arrays[name] = (
                side[name] if name in side else npy_array(views[name].astype(dtype, copy=False))
            )
        return ArrayRecord(arrays)

    def float32_record(self, flat: torch.Tensor) -> ArrayRecord:
        """The compressed arrays of ``flat``, each as a float32 ``.npy`` Array of its shape.

        What a node keeps of the downlink's model: the values exactly, in one
        copy of ``flat``'s bytes.
        """
        names = [n for n, _ in self._float_arrays()]
        return ArrayRecord(
            {n: npy_array(v) for n, v in zip(names, self._slices(flat), strict=True)}
        )

    def with_dtypes(self, arrays: Mapping[str, Array], side: Mapping[str, Array]) -> ArrayRecord:
        """The model's record from a :meth:`float32_record` and the ``side`` arrays.

        A float32 array of the model is the same bytes (a new Array object, so
        that the two records stay independent); another float dtype is cast.
        """
        out: dict[str, Array] = {}
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            if name in self.side:
                out[name] = side[name]
            elif dtype == "float32":
                a = arrays[name]
                out[name] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
            else:
                values = npy_values(arrays[name], name, shape, "float32")
                out[name] = npy_array(values.astype(dtype))
        return ArrayRecord(out)

    def side_arrays(self, record: Mapping[str, Array], *, trusted: bool = True) -> dict[str, Array]:
        """The side arrays of ``record``, checked against the layout.

        With ``trusted=False`` (a node's reply) every array's .npy header is read
        before its data (no allocation sized by a claim), and float arrays
        must be finite.
        """
        out = {}
        for name in self.side:
            if name not in record:
                raise RecordError(f"the reply lacks the model's array {name!r}")
            shape, dtype = self._spec(name)
            array = record[name]
            if trusted:
                if array.dtype != dtype or tuple(array.shape) != shape:
                    raise RecordError(
                        f"array {name!r} is {array.dtype} {tuple(array.shape)}, "
                        f"expected {dtype} {shape}"
                    )
            elif not all_finite(npy_values(array, name, shape, dtype)):
                raise RecordError(f"array {name!r} has non-finite values")
            out[name] = array
        return out

    def mean_side(
        self, sides: Sequence[Mapping[str, Array]], weights: Sequence[float]
    ) -> dict[str, Array]:
        """FedAvg of the side arrays: ``sum_i p_i a_i`` in float64, cast back to each dtype.

        Integer arrays (``num_batches_tracked``) get the weighted mean rounded
        to the nearest integer (half to even), bool arrays the weighted majority.
        """
        total = float(sum(weights))
        out: dict[str, Array] = {}
        for name in self.side:
            shape, dtype = self._spec(name)
            acc = np.zeros(shape, dtype=np.float64)
            for arrays, n in zip(sides, weights, strict=True):
                acc += npy_values(arrays[name], name, shape, dtype).astype(np.float64) * (n / total)
            out[name] = npy_array(_cast_values(acc, dtype))
        return out

    def adopt(self, record: ArrayRecord) -> ArrayRecord:
        """An inner strategy's aggregate in the model's dtypes (FedAdam returns float64).

        Raises
        ------
        RecordError
            If the names or shapes differ from the model's, or a value is not finite.
        """
        self.check_names(record, "the inner strategy's aggregate")
        arrays: dict[str, Array] = {}
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            array = record[name]
            if tuple(array.shape) != shape:
                raise RecordError(
                    f"the inner strategy's array {name!r} has shape {tuple(array.shape)}, "
                    f"not {shape}"
                )
            values = npy_values(array, name, shape, array.dtype)
            if not all_finite(values):
                raise RecordError(f"the inner strategy's array {name!r} has non-finite values")
            same = str(values.dtype) == dtype
            arrays[name] = array if same else npy_array(_cast_values(values, dtype))
        return ArrayRecord(arrays)

    # ------------------------------------------------------------------ to a node

    def to_json(self) -> str:
        return json.dumps(
            {"names": self.names, "shapes": self.shapes, "dtypes": self.dtypes, "side": self.side}
        )

    @classmethod
    def from_json(cls, text: str, what: str = "the model layout") -> ArrayLayout:
        """The layout :meth:`to_json` wrote; raises :class:`RecordError` naming ``what``."""
        spec = read_json(text, what, max_chars=MAX_LAYOUT_CHARS)
        try:
            return cls(
                tuple(str(n) for n in spec["names"]),
                tuple(tuple(int(d) for d in s) for s in spec["shapes"]),
                tuple(str(d) for d in spec["dtypes"]),
                tuple(str(n) for n in spec["side"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(f"{what} is not a model layout: {exc}") from None


def _cast_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` in ``dtype``: integers rounded half to even, bools by ``>= 0.5``."""
    # np.asarray throughout: numpy turns 0-d results into scalars, which Array refuses
    # (num_batches_tracked is 0-d).
    target = np.dtype(dtype)
    if target.kind == "b":
        return np.asarray(values >= 0.5)
    if target.kind in "iu" and values.dtype.kind not in "iub":
        info = np.iinfo(target)
        return np.asarray(np.clip(np.rint(values), info.min, info.max), dtype=target)
    return np.asarray(values, dtype=target)


def _known_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True
