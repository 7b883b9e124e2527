"""TensorFlow ``DataType`` enum values and how each is stored and held in numpy (FORMAT.md 3.7)."""

from __future__ import annotations

import dataclasses
import enum
import functools

import numpy as np


class DataType(enum.IntEnum):
    """Values of ``tensorflow.DataType`` that can appear in a bundle entry."""

    DT_INVALID = 0
    DT_FLOAT = 1
    DT_DOUBLE = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 5
    DT_INT8 = 6
    DT_STRING = 7
    DT_COMPLEX64 = 8
    DT_INT64 = 9
    DT_BOOL = 10
    DT_QINT8 = 11
    DT_QUINT8 = 12
    DT_QINT32 = 13
    DT_BFLOAT16 = 14
    DT_QINT16 = 15
    DT_QUINT16 = 16
    DT_UINT16 = 17
    DT_COMPLEX128 = 18
    DT_HALF = 19
    DT_RESOURCE = 20
    DT_VARIANT = 21
    DT_UINT32 = 22
    DT_UINT64 = 23
    DT_FLOAT8_E5M2 = 24
    DT_FLOAT8_E4M3FN = 25
    DT_FLOAT8_E4M3FNUZ = 26
    DT_FLOAT8_E4M3B11FNUZ = 27
    DT_FLOAT8_E5M2FNUZ = 28
    DT_INT4 = 29
    DT_UINT4 = 30
    DT_INT2 = 31
    DT_UINT2 = 32
    DT_FLOAT4_E2M1FN = 33


@dataclasses.dataclass(frozen=True, slots=True)
class DTypeInfo:
    """How one TF dtype is stored in a data file and held in memory.

    ``swap_bytes`` is the unit that is byte-swapped for a bundle of the other endianness (0: none);
    complex types swap each component. ``narrow_bits`` is set for the 4- and 2-bit types, which are
    stored one element per byte with only the low bits meaningful. ``numpy_name`` names the numpy
    type (``ml_dtypes.NAME`` for the types numpy lacks); :attr:`numpy` resolves it, importing
    ml_dtypes only then, so that opening and listing a checkpoint never pays for that import.
    """

    dtype: DataType
    numpy_name: str | None  # None for strings (object arrays of bytes)
    swap_bytes: int
    itemsize: int  #: bytes per element in the data file (0 for strings, whose elements vary)
    narrow_bits: int = 0
    is_string: bool = False

    @property
    def numpy(self) -> np.dtype | None:
        """The numpy dtype arrays of this type have (None for strings)."""
        return None if self.numpy_name is None else numpy_dtype(self.numpy_name)

    @property
    def name(self) -> str:
        """TensorFlow's Python name for the type (``tf.float32.name`` is ``"float32"``)."""
        return _TF_NAMES.get(self.dtype, self.dtype.name[3:].lower())

    @property
    def as_numpy_dtype(self) -> type:
        """The numpy scalar type arrays of this dtype hold (``object`` for strings), as TF's DType has."""
        numpy = self.numpy
        return object if numpy is None else numpy.type


@functools.cache
def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype called ``name``: a numpy type (``"float32"``) or ``"ml_dtypes.bfloat16"``."""
    if name.startswith("ml_dtypes."):
        import ml_dtypes  # costs ~0.4 s: only when an array of one of its types is made

        return np.dtype(getattr(ml_dtypes, name.removeprefix("ml_dtypes.")))
    return np.dtype(name)


def _info(dt: DataType, numpy_name: str | None, itemsize: int, swap: int, narrow: int = 0) -> DTypeInfo:
    return DTypeInfo(dt, numpy_name, swap, itemsize, narrow, dt == DataType.DT_STRING)


D = DataType
_TF_NAMES = {
    D.DT_FLOAT: "float32",
    D.DT_DOUBLE: "float64",
    D.DT_HALF: "float16",
    D.DT_COMPLEX64: "complex64",
    D.DT_COMPLEX128: "complex128",
}
_INFOS = [
    _info(D.DT_FLOAT, "float32", 4, 4),
    _info(D.DT_DOUBLE, "float64", 8, 8),
    _info(D.DT_INT32, "int32", 4, 4),
    _info(D.DT_UINT8, "uint8", 1, 0),
    _info(D.DT_INT16, "int16", 2, 2),
    _info(D.DT_INT8, "int8", 1, 0),
    _info(D.DT_STRING, None, 0, 0),
    _info(D.DT_COMPLEX64, "complex64", 8, 4),
    _info(D.DT_INT64, "int64", 8, 8),
    _info(D.DT_BOOL, "bool", 1, 0),
    # Quantized types: TF's Python reader returns their raw integer values.
    _info(D.DT_QINT8, "int8", 1, 0),
    _info(D.DT_QUINT8, "uint8", 1, 0),
    _info(D.DT_QINT32, "int32", 4, 4),
    _info(D.DT_BFLOAT16, "ml_dtypes.bfloat16", 2, 2),
    _info(D.DT_QINT16, "int16", 2, 2),
    _info(D.DT_QUINT16, "uint16", 2, 2),
    _info(D.DT_UINT16, "uint16", 2, 2),
    _info(D.DT_COMPLEX128, "complex128", 16, 8),
    _info(D.DT_HALF, "float16", 2, 2),
    _info(D.DT_UINT32, "uint32", 4, 4),
    _info(D.DT_UINT64, "uint64", 8, 8),
    _info(D.DT_FLOAT8_E5M2, "ml_dtypes.float8_e5m2", 1, 0),
    _info(D.DT_FLOAT8_E4M3FN, "ml_dtypes.float8_e4m3fn", 1, 0),
    _info(D.DT_FLOAT8_E4M3FNUZ, "ml_dtypes.float8_e4m3fnuz", 1, 0),
    _info(D.DT_FLOAT8_E4M3B11FNUZ, "ml_dtypes.float8_e4m3b11fnuz", 1, 0),
    _info(D.DT_FLOAT8_E5M2FNUZ, "ml_dtypes.float8_e5m2fnuz", 1, 0),
    _info(D.DT_INT4, "ml_dtypes.int4", 1, 0, 4),
    _info(D.DT_UINT4, "ml_dtypes.uint4", 1, 0, 4),
    _info(D.DT_INT2, "ml_dtypes.int2", 1, 0, 2),
    _info(D.DT_UINT2, "ml_dtypes.uint2", 1, 0, 2),
    _info(D.DT_FLOAT4_E2M1FN, "ml_dtypes.float4_e2m1fn", 1, 0, 4),
]
del D

#: Every dtype a bundle entry may hold, by enum value.
DTYPES: dict[int, DTypeInfo] = {info.dtype.value: info for info in _INFOS}

#: Enum values that are valid TF types but can never be read from a bundle, with the reason.
REFUSED: dict[int, str] = {
    DataType.DT_RESOURCE: "DT_RESOURCE tensors cannot be saved in a checkpoint",
    DataType.DT_VARIANT: "DT_VARIANT tensors hold C++ objects that only TensorFlow can decode",
}


def dtype_name(value: int) -> str:
    """A readable name for any enum value, known or not (for error messages)."""
    try:
        return DataType(value).name
    except ValueError:
        if 101 <= value <= 133:
            try:
                return DataType(value - 100).name + "_REF"
            except ValueError:
                pass
        return f"unknown DataType {value}"
