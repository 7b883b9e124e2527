"""gpuckpt: restore TensorFlow checkpoints without TensorFlow.

Quick start::

    import gpuckpt
    with gpuckpt.open("train_dir") as ckpt:          # prefix, .index, checkpoint dir or SavedModel
        arrays = ckpt.restore()                      # {name: numpy array}, crc32c verified
"""

from __future__ import annotations

from .checkpoint import Checkpoint, TensorInfo, open
from .compat import CheckpointReader, list_variables, load_checkpoint
from .dtypes import DataType, DTypeInfo
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    ClosedCheckpointError,
    DeviceUnavailableError,
    DistributedRestoreError,
    FormatError,
    InvalidArgumentError,
    TensorNotFoundError,
    UnsupportedError,
    WriteError,
)
from .format.object_graph import ObjectAttribute, StateKind
from .format.state import latest_checkpoint
from .host.lazy_slice import LazyTensor
from .host.shards import MissingShardError
from .merge import merge, restore_many
from .options import RestoreOptions
from .pipeline import DeviceMemoryError, RestoreFuture
from .writer import Partitioned, save

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "ChecksumError",
    "ClosedCheckpointError",
    "DTypeInfo",
    "DataType",
    "DeviceUnavailableError",
    "DistributedRestoreError",
    "FormatError",
    "InvalidArgumentError",
    "LazyTensor",
    "MissingShardError",
    "ObjectAttribute",
    "StateKind",
    "TensorInfo",
    "TensorNotFoundError",
    "UnsupportedError",
    "WriteError",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "open",
    "Partitioned",
    "save",
    "merge",
    "restore_many",
    "RestoreOptions",
    "RestoreFuture",
    "DeviceMemoryError",
]
