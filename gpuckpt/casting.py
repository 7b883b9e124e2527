"""The ``dtype=`` argument of restores: one dtype for every floating tensor, or a mapping from
names (regular expressions matched against whole names) to dtypes. Integer, boolean and string
tensors keep their type."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

DtypeChooser = Callable[[str, np.dtype], np.dtype]

FLOATING = {
    np.dtype(t)
    for t in (
        np.float16,
        np.float32,
        np.float64,
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
        ml_dtypes.float8_e4m3fnuz,
        ml_dtypes.float8_e4m3b11fnuz,
        ml_dtypes.float8_e5m2fnuz,
        ml_dtypes.float4_e2m1fn,
    )
}


def dtype_chooser(dtype: Any) -> DtypeChooser | None:
    """The function giving each tensor's restored dtype from its name and stored dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, Mapping):
        rules = [(re.compile(pattern), np.dtype(target)) for pattern, target in dtype.items()]

        def by_name(name: str, stored: np.dtype) -> np.dtype:
            if stored in FLOATING:
                for pattern, target in rules:
                    if pattern.fullmatch(name):
                        return target
            return stored

        return by_name
    target = np.dtype(dtype)

    def everywhere(name: str, stored: np.dtype) -> np.dtype:
        return target if stored in FLOATING else stored

    return everywhere
