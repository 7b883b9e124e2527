"""Drop-ins for TensorFlow's checkpoint utilities: ``tf.train.load_checkpoint``,
``tf.train.list_variables`` and ``tf.train.latest_checkpoint``, and a stand-in for ``tf.DType``."""

from __future__ import annotations

import numbers
import os
from typing import Any, ClassVar

import numpy as np

from .checkpoint import Checkpoint
from .checkpoint import open as open_checkpoint
from .dtypes import DTYPES, REFUSED, DataType, DTypeInfo, dtype_name
from .errors import UnsupportedError
from .format.bundle import encode_name
from .gcpause import gc_paused


def _tf_name(value: int) -> str:
    info = DTYPES.get(value)
    if info is not None:
        return info.name
    if value in REFUSED:  # "resource", "variant", as tf.resource.name and tf.variant.name
        return DataType(value).name[3:].lower()
    return dtype_name(value)


#: TF's Python names for the types, with the aliases ``tf.as_dtype`` also accepts.
_BY_NAME: dict[str, int] = {_tf_name(v): v for v in DataType if v != DataType.DT_INVALID}
_BY_NAME.update(half=DataType.DT_HALF, float=DataType.DT_FLOAT, double=DataType.DT_DOUBLE)
#: Every value ``tf.as_dtype`` takes as an enum: the types and their ``_ref`` twins.
_ENUM_VALUES = frozenset(v for t in DataType if t != DataType.DT_INVALID for v in (int(t), int(t) + 100))
#: Python types ``tf.as_dtype`` maps without numpy's help (``int`` is not one of them).
_BY_PYTHON_TYPE: dict[type, int] = {float: DataType.DT_FLOAT, bool: DataType.DT_BOOL, object: DataType.DT_STRING}
#: numpy's names for the types numpy (or ml_dtypes) has: TF's names, less strings and quantized types.
_BY_NUMPY_NAME: dict[str, int] = {
    info.name: value for value, info in DTYPES.items() if not info.is_string and not info.dtype.name.startswith("DT_Q")
}
#: How TF holds its quantized types in numpy (one-field structured dtypes).
_QUANTIZED = {
    "qint8": ("i1", DataType.DT_QINT8),
    "quint8": ("u1", DataType.DT_QUINT8),
    "qint16": ("<i2", DataType.DT_QINT16),
    "quint16": ("<u2", DataType.DT_QUINT16),
    "qint32": ("<i4", DataType.DT_QINT32),
}
_DATATYPE_VALUES = frozenset(int(t) for t in DataType)
_QUANTIZED_VALUES = frozenset(value for _, value in _QUANTIZED.values())


def _enum_of_numpy(dtype: np.dtype) -> int | None:
    """The TF type ``tf.as_dtype`` gives a numpy dtype (None where it has none). Works from the
    dtype's own name: nothing here resolves a :class:`DTypeInfo`'s numpy type."""
    if dtype.type in (np.object_, np.bytes_, np.str_) or dtype.kind == "T":  # "T": numpy's StringDType
        return DataType.DT_STRING
    if dtype.names is not None:
        if len(dtype.names) == 1 and dtype.names[0] in _QUANTIZED:
            fmt, value = _QUANTIZED[dtype.names[0]]
            if dtype == np.dtype([(dtype.names[0], fmt)]):
                return value
        return None
    return _BY_NUMPY_NAME.get(dtype.name)


def _enum_of(other: object) -> int | None:
    """What ``tf.as_dtype(other)`` would give, as an enum value; None where it raises."""
    if isinstance(other, DType):
        return other.as_datatype_enum
    if isinstance(other, DTypeInfo):  # what get_variable_to_dtype_map gave before DType
        return int(other.dtype)
    if isinstance(other, np.dtype):
        found = _enum_of_numpy(other)
        if found is not None:
            return found
    if isinstance(other, str):
        return _BY_NAME.get(other)
    enum_value = getattr(other, "as_datatype_enum", None)  # a tf.DType (or a _ref one)
    if isinstance(enum_value, int) and not isinstance(other, numbers.Number):
        return enum_value
    if isinstance(other, numbers.Number):
        try:
            if other in _ENUM_VALUES:  # TF looks numbers up by hash: 1, 1.0, True, np.float32(1)
                return int(other)  # type: ignore[call-overload]
        except TypeError:
            pass
    if isinstance(other, type):
        if other in _BY_PYTHON_TYPE:
            return _BY_PYTHON_TYPE[other]
        if issubclass(other, np.generic):  # np.float32, ml_dtypes.bfloat16, np.bytes_ ...
            return _enum_of_numpy(np.dtype(other))
        return None
    held = getattr(other, "dtype", None)  # arrays and numpy scalars: their dtype's type
    if held is not None:
        try:
            return _enum_of_numpy(np.dtype(held))
        except (TypeError, ValueError):  # a .dtype numpy cannot read: not a dtype TF would take
            return None
    return None


class DType:
    """A TensorFlow dtype as ``get_variable_to_dtype_map`` gives it, for every type a checkpoint
    can hold, including those gpuckpt does not read (``variant``, ``resource``).

    Like ``tf.DType``: ``name`` (``"float32"``), ``as_datatype_enum``, ``as_numpy_dtype``, and
    equality with what ``tf.as_dtype`` accepts: another dtype (this class or ``tf.DType``), the
    name or an alias (``"float32"``, ``"float"``), the enum value (``1``), a numpy type or dtype
    (``np.float32``, ``np.dtype("float32")``), or ``float``/``bool``/``object``. The hash is the
    enum value, as TensorFlow's, so a dict keyed by these dtypes is looked up by ``tf.DType``s
    and enum values (by names only with ``==``, as in TensorFlow). Instances are interned.
    """

    __slots__ = ("_value",)
    _value: int
    _interned: ClassVar[dict[int, DType]] = {}

    def __new__(cls, value: int) -> DType:
        value = int(value)
        found = cls._interned.get(value)
        if found is None:
            found = super().__new__(cls)
            object.__setattr__(found, "_value", value)
            found = cls._interned.setdefault(value, found)
        return found

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("DType is immutable")

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return DType, (self._value,)

    @property
    def as_datatype_enum(self) -> int:
        """The ``tensorflow.DataType`` enum value."""
        return self._value

    @property
    def name(self) -> str:
        """TensorFlow's Python name (``tf.float32.name``: ``"float32"``)."""
        return _tf_name(self._value)

    @property
    def info(self) -> DTypeInfo | None:
        """How gpuckpt stores and holds the type; None for the types it does not read."""
        return DTYPES.get(self._value)

    @property
    def base_dtype(self) -> DType:
        return self

    @property
    def is_numpy_compatible(self) -> bool:
        return self._value in DTYPES

    @property
    def size(self) -> int:
        """Bytes per element as TF counts them (0 for strings, variant and resource)."""
        info = DTYPES.get(self._value)
        return 0 if info is None else info.itemsize

    @property
    def is_quantized(self) -> bool:
        return self._value in _QUANTIZED_VALUES

    @property
    def is_floating(self) -> bool:
        return self.name.startswith(("float", "bfloat")) and self._value in DTYPES

    @property
    def is_complex(self) -> bool:
        return self.name.startswith("complex") and self._value in DTYPES

    @property
    def is_integer(self) -> bool:
        return self.name.startswith(("int", "uint")) and self._value in DTYPES

    @property
    def is_unsigned(self) -> bool:
        return self.name.startswith("uint") and self._value in DTYPES

    @property
    def is_bool(self) -> bool:
        return self._value == DataType.DT_BOOL

    @property
    def as_numpy_dtype(self) -> type:
        """The numpy type arrays of this dtype hold, as gpuckpt returns them (``object`` for
        strings; the raw integer type for the quantized types). Raises
        :class:`~gpuckpt.UnsupportedError` for ``variant`` and ``resource``, which have none."""
        info = DTYPES.get(self._value)
        if info is None:
            reason = REFUSED.get(self._value, f"{dtype_name(self._value)} is not a type gpuckpt knows")
            raise UnsupportedError(f"{self.name} has no numpy type: {reason}")
        return info.as_numpy_dtype

    def __eq__(self, other: object) -> bool:
        if other is None:
            return False
        return _enum_of(other) == self._value

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"gpuckpt.compat.DType({self.name!r})"

    def __str__(self) -> str:
        return f"<dtype: {self.name!r}>"


class CheckpointReader:
    """The reader ``tf.train.load_checkpoint`` returns, without TensorFlow.

    Dtype maps give :class:`DType` values: ``name``, ``as_numpy_dtype`` and equality as
    ``tf.DType`` has them.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        with gc_paused():
            return {name: list(entry.shape) for name, entry in self._checkpoint.index.tensors.items()}

    def get_variable_to_dtype_map(self) -> dict[str, DType]:
        return {name: DType(entry.dtype) for name, entry in self._checkpoint.index.tensors.items()}

    def has_tensor(self, name: str) -> bool:
        return name in self._checkpoint

    def get_tensor(self, name: str) -> Any:
        """The tensor as TensorFlow's reader returns it: an array, or for a scalar a numpy scalar
        (``bytes`` for a string scalar)."""
        value = self._checkpoint.get_tensor(name)
        return value[()] if value.ndim == 0 else value

    def debug_string(self) -> bytes:
        """What TensorFlow's ``debug_string()`` gives: one line ``key (DT_FLOAT) [2,3]`` per index
        entry, in key order (bytes). As in TensorFlow, a partitioned variable appears as its saved
        slices, under their raw slice keys (a NUL byte, the name, the extents) with each slice's
        shape, and not under its own name."""
        index = self._checkpoint.index
        entries = [(encode_name(name), e) for name, e in index.tensors.items() if not e.slices]
        entries += index.slice_entries.items()
        lines = []
        for key, entry in sorted(entries, key=lambda item: item[0]):
            shape = ",".join(str(d) for d in entry.shape)
            enum_name = DataType(entry.dtype).name if entry.dtype in _DATATYPE_VALUES else ""  # as TF's DataType_Name
            lines.append(b"%s (%s) [%s]\n" % (key, enum_name.encode(), shape.encode()))
        return b"".join(lines)

    def close(self) -> None:
        self._checkpoint.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Like ``tf.train.load_checkpoint``: a directory (latest checkpoint) or a prefix; also a
    ``file://`` URI of one."""
    return CheckpointReader(open_checkpoint(path))


def list_variables(path: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """Like ``tf.train.list_variables``: sorted ``(name, shape)`` pairs."""
    with open_checkpoint(path) as checkpoint:
        return sorted((name, list(checkpoint.info(name).shape)) for name in checkpoint.keys())
