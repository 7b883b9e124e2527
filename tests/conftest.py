from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "data")
sys.path.insert(0, HERE)  # for bundle_builder


class _Numpy1Unpickler(pickle.Unpickler):
    """expected.pkl was written under numpy 2, whose pickles name ``numpy._core``; numpy 1.x (the
    lowest-versions CI run) has the same functions as ``numpy.core``."""

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if module == "numpy._core" or module.startswith("numpy._core."):
            module = "numpy.core" + module[len("numpy._core") :]
        return super().find_class(module, name)


def _load_expected() -> dict:
    with open(os.path.join(FIXTURES, "expected.pkl"), "rb") as f:
        return (_Numpy1Unpickler if np.__version__.startswith("1.") else pickle.Unpickler)(f).load()


EXPECTED = _load_expected()
FIXTURE_PREFIXES = sorted(k for k in EXPECTED if not k.startswith("__"))


def fixture_path(*parts: str) -> str:
    return os.path.join(FIXTURES, *parts)


def assert_bit_exact(ours: np.ndarray, theirs: object, name: str = "") -> None:
    """Same dtype, shape and bytes (strings: same bytes objects). TF returns numpy scalars and
    ``bytes`` for scalars, so those are compared as 0-d arrays."""
    if isinstance(theirs, bytes):
        theirs = np.array(theirs, dtype=object)
    theirs = np.asarray(theirs)
    assert isinstance(ours, np.ndarray), name
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    if theirs.dtype == object or ours.dtype == object:
        assert ours.dtype == object and theirs.dtype == object, (name, ours.dtype, theirs.dtype)
        assert all(type(x) is bytes for x in ours.reshape(-1)), name
        assert list(ours.reshape(-1)) == list(theirs.reshape(-1)), name
        return
    if theirs.dtype.names:  # TF's quantized types come back as one-field structured arrays
        theirs = theirs.view(theirs.dtype.fields[theirs.dtype.names[0]][0])
    assert ours.dtype == theirs.dtype, (name, ours.dtype, theirs.dtype)
    assert ours.tobytes() == theirs.tobytes(), name


def tf_or_skip():
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf  # noqa: F401
    except ImportError:
        pytest.skip("tensorflow is not installed")
    return tf
