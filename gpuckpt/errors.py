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


class DistributedRestoreError(CheckpointError, RuntimeError):
    """A restore over a process group failed on at least one rank (a damaged tensor, memory refused,
    a rank gone or too slow); every rank of the group raises it, naming the rank(s) and tensor(s).

    ``failures`` lists ``(rank, tensor, error type, message)`` for every rank that reported one;
    ``rank`` and ``tensor`` are the first of them (None when a rank never reported, e.g. it died)."""

    def __init__(
        self,
        message: str,
        failures: list[tuple[int, str | None, str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.failures = list(failures or [])
        self.rank: int | None = self.failures[0][0] if self.failures else None
        self.tensor: str | None = self.failures[0][1] if self.failures else None


def describe(path: object, tensor: str | None = None, offset: int | None = None) -> str:
    """Return the ``file ..., tensor ..., offset ...`` context that every message ends with."""
    parts = [f"file {str(path)!r}"]
    if tensor is not None:
        parts.append(f"tensor {tensor!r}")
    if offset is not None:
        parts.append(f"offset {offset}")
    return ", ".join(parts)
