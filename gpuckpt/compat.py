"""Drop-ins for TensorFlow's checkpoint utilities: ``tf.train.load_checkpoint``,
``tf.train.list_variables`` and ``tf.train.latest_checkpoint``."""

from __future__ import annotations

import os
from typing import Any

from .checkpoint import Checkpoint
from .checkpoint import open as open_checkpoint
from .dtypes import DTYPES, DTypeInfo
from .gcpause import gc_paused


class CheckpointReader:
    """The reader ``tf.train.load_checkpoint`` returns, without TensorFlow.

    Dtype maps give :class:`~gpuckpt.dtypes.DTypeInfo` values, whose ``name`` matches
    ``tf.DType.name`` and which have ``as_numpy_dtype`` like it.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        with gc_paused():
            return {name: list(entry.shape) for name, entry in self._checkpoint.index.tensors.items()}

    def get_variable_to_dtype_map(self) -> dict[str, DTypeInfo | int]:
        return {name: DTYPES.get(entry.dtype, entry.dtype) for name, entry in self._checkpoint.index.tensors.items()}

    def has_tensor(self, name: str) -> bool:
        return name in self._checkpoint

    def get_tensor(self, name: str) -> Any:
        """The tensor as TensorFlow's reader returns it: an array, or for a scalar a numpy scalar
        (``bytes`` for a string scalar)."""
        value = self._checkpoint.get_tensor(name)
        return value[()] if value.ndim == 0 else value

    def close(self) -> None:
        self._checkpoint.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Like ``tf.train.load_checkpoint``: a directory (latest checkpoint) or a prefix."""
    return CheckpointReader(open_checkpoint(path))


def list_variables(path: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """Like ``tf.train.list_variables``: sorted ``(name, shape)`` pairs."""
    with open_checkpoint(path) as checkpoint:
        return sorted((name, list(checkpoint.info(name).shape)) for name in checkpoint.keys())
