"""The ``checkpoint`` state file and finding a checkpoint's prefix from a path (FORMAT.md 1.3, 1.5)."""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from ..errors import CheckpointNotFoundError, FormatError, UnsupportedError, describe
from .table import FOOTER_SIZE, MAGIC

STATE_FILENAME = "checkpoint"
INDEX_SUFFIX = ".index"
SAVED_MODEL_VARIABLES = os.path.join("variables", "variables")
RESOLVE_ATTEMPTS = 3  # state-file reads while a writer replaces the latest checkpoint
MAX_STATE_BYTES = 64 << 20  # a state file is a few lines; refuse to parse anything absurd
TABLE_MAGIC = MAGIC.to_bytes(8, "little")  # the last 8 bytes of every table file (FORMAT.md 2.2)
FILE_URI = "file://"
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(path: str | os.PathLike[str]) -> str:
    """The local path that ``path`` names: itself, or for a ``file://`` URI the path it holds, as
    TensorFlow's file system reads it (``file:///abs/ckpt`` is ``/abs/ckpt``; nothing is
    percent-decoded). A URI of another scheme (``gs://``, ``s3://``, ``hdfs://``...) raises
    :class:`UnsupportedError`: gpuckpt reads local files only."""
    text = os.fspath(path)
    match = _URI_SCHEME.match(text)
    if match is None:
        return text
    scheme = match.group(0)[:-3]
    if scheme.lower() != "file":
        raise UnsupportedError(
            f"gpuckpt reads local files only, not {scheme}:// URIs (copy the checkpoint to a local "
            f"directory first): {text!r}"
        )
    rest = text[len(FILE_URI) :]
    host, slash, tail = rest.partition("/")
    if host not in ("", "localhost"):
        raise UnsupportedError(
            f"a file:// URI names a local path (file:///abs/path), not host {host!r}; "
            f"did you mean {FILE_URI + '/' + rest!r}?: {text!r}"
        )
    return slash + tail


def is_v1_checkpoint(path: str) -> bool:
    """Whether ``path`` is a file ending like a table: the old V1 format (TensorSliceReader) keeps
    a checkpoint in one such file named by the prefix itself, with no ``.index`` (FORMAT.md 8)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < FOOTER_SIZE:
                return False
            f.seek(size - len(TABLE_MAGIC))
            return f.read(len(TABLE_MAGIC)) == TABLE_MAGIC
    except OSError:
        return False


def _v1_files(prefix: str) -> list[str]:
    """The V1 table files a prefix names: itself, or the shards a V1 pattern
    (``model.ckpt-?????-of-00002``, as TF's state file records it) matches."""
    if os.path.isfile(prefix):
        return [prefix] if is_v1_checkpoint(prefix) else []
    if any(c in prefix for c in "*?["):  # a pattern: TF globs the prefix
        return [p for p in sorted(glob.glob(prefix)) if is_v1_checkpoint(p)]
    return [p for p in sorted(glob.glob(glob.escape(prefix) + "-[0-9]*-of-[0-9]*")) if is_v1_checkpoint(p)]


def _refuse_v1(prefix: str, shown: str) -> None:
    files = _v1_files(prefix)
    if files:
        named = f"{shown!r} is" if shown != files[0] else "this is"
        more = f" (and {len(files) - 1} more shard(s))" if len(files) > 1 else ""
        raise UnsupportedError(
            f"{named} a TensorFlow V1 checkpoint (TensorSliceReader format: a table file with no .index), "
            "which gpuckpt does not read; convert it to V2 with TensorFlow (restore it with a "
            f"tf.compat.v1.train.Saver and save it with the default write_version){more}: " + describe(files[0])
        )


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointState:
    """The parsed state file, with every path resolved against its directory as TF does."""

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...]
    all_model_checkpoint_timestamps: tuple[float, ...]
    last_preserved_timestamp: float


def _resolve(directory: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(directory, path)


def read_state(directory: str | os.PathLike[str], filename: str = STATE_FILENAME) -> CheckpointState | None:
    """Parse ``directory/checkpoint``; None when there is no such file (as TF returns)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, filename)
    try:
        with open(local_path(path), "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(raw) > MAX_STATE_BYTES:
        raise FormatError(f"checkpoint state file is larger than {MAX_STATE_BYTES} bytes: " + describe(path))
    return parse_state(raw, directory, path)


def parse_state(raw: bytes, directory: str, path: str) -> CheckpointState:
    """Parse the text of a state file found at ``path`` in ``directory``."""
    from google.protobuf import text_format  # protobuf is imported on first use, not by `import gpuckpt`

    from .._proto import checkpoint_state_pb2

    proto = checkpoint_state_pb2.CheckpointState()
    try:
        text_format.Parse(raw.decode("utf-8"), proto)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise FormatError(f"checkpoint state file is not a valid CheckpointState ({exc}): " + describe(path)) from None
    if not proto.model_checkpoint_path:
        raise FormatError("checkpoint state file has no model_checkpoint_path: " + describe(path))
    return CheckpointState(
        model_checkpoint_path=_resolve(directory, proto.model_checkpoint_path),
        all_model_checkpoint_paths=tuple(_resolve(directory, p) for p in proto.all_model_checkpoint_paths),
        all_model_checkpoint_timestamps=tuple(proto.all_model_checkpoint_timestamps),
        last_preserved_timestamp=proto.last_preserved_timestamp,
    )


def encode_state(
    directory: str,
    latest: str,
    all_paths: list[str],
    timestamps: list[float] | None,
    last_preserved_timestamp: float = 0.0,
) -> bytes:
    """The text of a ``checkpoint`` state file, as TF writes it: paths inside ``directory`` are
    stored relative to it, others absolute; non-ASCII bytes as octal escapes."""

    def stored(path: str) -> str:
        relative = os.path.relpath(path, directory)
        return path if relative.startswith(os.pardir) else relative

    from google.protobuf import text_format

    from .._proto import checkpoint_state_pb2

    proto = checkpoint_state_pb2.CheckpointState(
        model_checkpoint_path=stored(latest),
        all_model_checkpoint_paths=[stored(p) for p in all_paths],
        all_model_checkpoint_timestamps=timestamps or [],
        last_preserved_timestamp=last_preserved_timestamp,
    )
    return text_format.MessageToString(proto).encode("ascii")


def latest_checkpoint(directory: str | os.PathLike[str], latest_filename: str | None = None) -> str | None:
    """The prefix ``tf.train.latest_checkpoint(directory)`` returns, or None.

    Like TF: read the state file, resolve ``model_checkpoint_path`` against the directory, and return
    it only if its ``.index`` exists (or, for old V1 checkpoints, the path itself matches a file).
    Unlike TF, a state file that cannot be parsed raises :class:`FormatError` instead of logging a
    warning and returning None.
    """
    state = read_state(directory, latest_filename or STATE_FILENAME)
    if state is None:
        return None
    prefix = state.model_checkpoint_path
    local = local_path(prefix)  # relative paths in a file:// directory's state file are URIs too, as in TF
    if os.path.exists(local + INDEX_SUFFIX) or glob.glob(glob.escape(local) + INDEX_SUFFIX):
        return prefix
    if glob.glob(local):  # a V1 checkpoint (TF globs, so "model.ckpt-?????-of-00002" matches)
        return prefix
    return None


def resolve_prefix(path: str | os.PathLike[str]) -> str:
    """The bundle prefix that ``path`` names, as :func:`gpuckpt.open` accepts it.

    Accepted: a prefix (``model.ckpt-200``), a path ending in ``.index``, a directory holding a
    ``checkpoint`` state file (its latest checkpoint), or a SavedModel directory
    (``variables/variables``); any of them also as a ``file://`` URI. Raises
    :class:`CheckpointNotFoundError` listing every place tried, :class:`UnsupportedError` for a
    V1 checkpoint (a table file named by the prefix itself) and for URIs of other schemes.
    """
    shown = os.fspath(path)
    text = local_path(shown)
    tried: list[str] = []
    if text.endswith(INDEX_SUFFIX) and os.path.isfile(text):
        return text[: -len(INDEX_SUFFIX)]
    tried.append(text + INDEX_SUFFIX)
    if os.path.isfile(text + INDEX_SUFFIX):
        return text
    if os.path.isdir(text):
        saved_model = os.path.join(text, SAVED_MODEL_VARIABLES)
        tried.append(saved_model + INDEX_SUFFIX)
        if os.path.isfile(saved_model + INDEX_SUFFIX):
            return saved_model
        tried.append(os.path.join(text, STATE_FILENAME))
        named: list[str] = []
        # A writer keeping max_to_keep deletes the checkpoint the state file named a moment ago
        # only after naming the next one: read the state file again while it names another.
        while (state := read_state(text)) is not None and state.model_checkpoint_path not in named:
            latest = latest_checkpoint(text)
            if latest is not None and os.path.isfile(latest + INDEX_SUFFIX):
                return latest
            if latest is not None:
                _refuse_v1(latest, latest)
            named.append(state.model_checkpoint_path)
            tried.append(state.model_checkpoint_path + INDEX_SUFFIX + " (named by the state file)")
            if len(named) == RESOLVE_ATTEMPTS:
                break
    else:
        _refuse_v1(text, shown)
    raise CheckpointNotFoundError(f"no TensorFlow checkpoint found at {shown!r}; tried: " + ", ".join(tried))
