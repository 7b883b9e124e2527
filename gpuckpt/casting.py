"""The ``dtype=`` argument of restores: one dtype for every floating tensor, or a mapping from
names (regular expressions matched against whole names) to dtypes. Integer, boolean and string
tensors keep their type. Conversions follow the project's rule (gpuckpt/host/floats.py): rounded
once to nearest even, subnormals kept, the same bits on the host and on a GPU."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .dtypes import numpy_dtype
from .errors import InvalidArgumentError

DtypeChooser = Callable[[str, np.dtype], np.dtype]

#: The floating types a checkpoint may hold (by numpy name, so this module needs no ml_dtypes).
FLOATING = frozenset(
    ["float16", "float32", "float64", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz"]
    + ["float8_e4m3b11fnuz", "float8_e5m2fnuz", "float4_e2m1fn"]
)
#: The types ``dtype=`` converts to.
TARGETS = ("float16", "bfloat16", "float32", "float64")


def target_dtype(value: Any) -> np.dtype:
    """The numpy dtype a ``dtype=`` value names (``np.float16``, ``"bfloat16"``, ``ml_dtypes.bfloat16``);
    InvalidArgumentError for anything that is not one of :data:`TARGETS`."""
    if isinstance(value, str) and value.removeprefix("ml_dtypes.") in FLOATING - {"float16", "float32", "float64"}:
        dtype = numpy_dtype("ml_dtypes." + value.removeprefix("ml_dtypes."))
    else:
        try:
            dtype = np.dtype(value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"dtype={value!r} is not a dtype ({exc}); use one of {', '.join(TARGETS)}"
            ) from None
    if dtype.name not in TARGETS:
        raise InvalidArgumentError(f"dtype={value!r}: floating tensors convert to {', '.join(TARGETS)}, not {dtype}")
    return dtype


def dtype_chooser(dtype: Any) -> DtypeChooser | None:
    """The function giving each tensor's restored dtype from its name and stored dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, Mapping):
        rules = []
        for pattern, target in dtype.items():
            try:
                compiled = re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise InvalidArgumentError(f"dtype= key {pattern!r} is not a regular expression: {exc}") from None
            rules.append((compiled, target_dtype(target)))

        def by_name(name: str, stored: np.dtype) -> np.dtype:
            if stored.name in FLOATING:
                for pattern, target in rules:
                    if pattern.fullmatch(name):
                        return target
            return stored

        return by_name
    target = target_dtype(dtype)

    def everywhere(name: str, stored: np.dtype) -> np.dtype:
        return target if stored.name in FLOATING else stored

    return everywhere


def restored_dtype(chooser: DtypeChooser | None, name: str, stored: np.dtype) -> np.dtype:
    """What a restore gives the tensor ``name`` stored as ``stored``: the chooser's target for
    floating types, else (and without a chooser) ``stored``."""
    if chooser is None or stored.name not in FLOATING:
        return stored
    return np.dtype(chooser(name, stored))


def convertible(stored: np.dtype, wanted: np.dtype) -> bool:
    """Whether a restore converts ``stored`` to a different ``wanted`` itself (``dtype=``, the
    project's rule): a conversion of kernels/conversions.def, the single list of them."""
    from .host.convert import kernel_for  # the host layer sits above this one

    try:
        return kernel_for(stored, wanted) is not None
    except KeyError:
        return False
