"""The error hierarchy: one root, each class also the builtin it refines.

Every message names the file and, where one is involved, the tensor and the byte offset, so that a
log line alone says what was wrong and where. A missing file is also a ``FileNotFoundError``.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Root of every error gpuckpt raises about a checkpoint's content or use."""


class FormatError(CheckpointError, ValueError):
    """The bytes on disk do not follow the TensorBundle format (corrupt, truncated or lying)."""


class ChecksumError(FormatError):
    """A stored crc32c does not match the bytes it covers."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path given, or a file it needs is gone (the message lists what was tried)."""


class TensorNotFoundError(CheckpointError, KeyError):
    """The checkpoint has no tensor of that name."""

    def __str__(self) -> str:  # KeyError would show the message inside quotes
        return str(self.args[0]) if self.args else ""


class UnsupportedError(CheckpointError, NotImplementedError):
    """A well-formed feature this reader deliberately does not handle (named in the message)."""


class InvalidArgumentError(CheckpointError, TypeError, ValueError):
    """An argument cannot be used as given (a dtype that is not one, a bad regular expression, a
    malformed pair); raised before any file is read or written. Also a ``TypeError`` and a
    ``ValueError``, so code catching what numpy or ``re`` would raise still catches it."""


class DeviceUnavailableError(CheckpointError, RuntimeError):
    """The requested device cannot be used (no GPU, no CuPy, or a path not built yet)."""


class WriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, file size limit, permissions); every temporary file
    of the attempt was removed and any earlier checkpoint is intact."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where one was to be written (``overwrite=True`` replaces it)."""


class ClosedCheckpointError(CheckpointError, RuntimeError):
    """A method was called on a ``Checkpoint`` after it was closed."""


def describe(path: object, tensor: str | None = None, offset: int | None = None) -> str:
    """Return the ``file ..., tensor ..., offset ...`` context that every message ends with."""
    parts = [f"file {str(path)!r}"]
    if tensor is not None:
        parts.append(f"tensor {tensor!r}")
    if offset is not None:
        parts.append(f"offset {offset}")
    return ", ".join(parts)
