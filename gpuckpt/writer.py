"""``gpuckpt.save``: write a TensorBundle that TensorFlow reads back bit for bit, crash-safely.

Layout as TF's ``BundleWriter`` (FORMAT.md 2.8, 3, 4): tensors in the caller's order, densely
packed, little-endian; the data files and the index are written under temporary names and flushed
to disk, then renamed into place, the index last, so a checkpoint "exists" (its ``.index`` exists)
only once all its data is durable; then the ``checkpoint`` state file is replaced the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

from .download import contiguous_bytes, stream_to_host
from .dtypes import DTYPES, DataType
from .errors import CheckpointExistsError, DeviceUnavailableError, UnsupportedError, WriteError
from .format.bundle import TensorEntry, encode_entry, encode_header, encode_name
from .format.crc import crc32c, mask
from .format.slices import Extent, TensorSlice, check_extents, coverage_problem, slice_key, slice_shape
from .format.state import STATE_FILENAME, encode_state, read_state
from .format.table import build_table
from .host.shards import data_filename
from .host.strings import encode_strings


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """One file written whole or not at all: ``write`` fills a temporary file beside ``path``,
    which is synced and renamed over it; if anything fails the temporary goes and an existing
    ``path`` stays as it was (``convert``'s safetensors and ``.pt`` outputs)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# The types TensorFlow's reader can assemble from saved slices: BundleReader::GetSliceValue's
# HANDLE_COPY list (tensorflow/core/util/tensor_bundle/tensor_bundle.cc); any other is refused
# there ("Dtype half not supported."), so a partitioned tensor of one would be unreadable.
TF_SLICED_TYPES = frozenset(
    {
        DataType.DT_FLOAT,
        DataType.DT_DOUBLE,
        DataType.DT_INT32,
        DataType.DT_UINT8,
        DataType.DT_INT16,
        DataType.DT_INT8,
        DataType.DT_COMPLEX64,
        DataType.DT_COMPLEX128,
        DataType.DT_INT64,
        DataType.DT_BOOL,
        DataType.DT_QINT32,
        DataType.DT_QUINT8,
        DataType.DT_QINT8,
        DataType.DT_BFLOAT16,
        DataType.DT_INT4,
        DataType.DT_UINT4,
    }
)


@functools.cache
def _tf_dtypes() -> dict[np.dtype, int]:
    """numpy dtype -> TF DataType value: the plain types win where several TF types share a numpy
    dtype. Built on first use: it needs ml_dtypes, which ``import gpuckpt`` does not import."""
    quantized = {DataType.DT_QINT8, DataType.DT_QUINT8, DataType.DT_QINT16, DataType.DT_QUINT16, DataType.DT_QINT32}
    # quantized types first, so that the plain type sharing their numpy dtype overwrites them
    # (enum order does not do it: DT_QUINT16 = 16 comes before DT_UINT16 = 17)
    ordered = sorted(DTYPES.items(), key=lambda item: (item[0] not in quantized, item[0]))
    return {info.numpy: value for value, info in ordered if info.numpy is not None}


@dataclasses.dataclass(frozen=True)
class Partitioned:
    """A tensor given in parts, saved as TF saves a partitioned variable (FORMAT.md 5).

    ``parts`` pairs a region of the full tensor (a tuple of slices, one per dimension, ``slice(None)``
    for a whole dimension) with the array holding it. The parts must tile ``shape`` exactly.
    """

    shape: tuple[int, ...]
    parts: Sequence[tuple[tuple[slice, ...], Any]]


@dataclasses.dataclass
class Payload:
    """The bytes of one entry to write, under ``key``, with the entry that will describe them.

    ``data`` is a buffer, or a function returning one when the data file is written (so a merge
    holds one source tensor in memory at a time). ``entry.size`` must be its length.
    """

    key: bytes
    entry: TensorEntry
    data: Any

    def bytes(self) -> Any:
        data = self.data() if callable(self.data) else self.data
        if len(memoryview(data).cast("B")) != self.entry.size:
            raise ValueError(f"payload of {self.entry.name!r} changed size while being written")
        return data

    def chunks(self) -> Iterator[Any]:
        """The bytes to write, in order; ``entry`` is final once they have all been taken."""
        yield self.bytes()


@dataclasses.dataclass
class DevicePayload(Payload):
    """A device array's bytes, streamed through two pinned chunks as the data file is written;
    its crc32c is computed on the way and put into ``entry`` at the end."""

    device: Any = None

    def chunks(self) -> Iterator[Any]:
        crc = 0
        for chunk in stream_to_host(self.device, self.data, self.entry.size):
            crc = crc32c(chunk, crc)
            yield chunk
        self.entry = self.entry._replace(masked_crc32c=mask(crc))


@dataclasses.dataclass
class DeferredArrayPayload(Payload):
    """A fixed-size array made only when its data file is written (``data`` returns it), so that
    a merge that casts or byte-swaps holds one tensor at a time rather than all of them. Its size
    is known from the entry's shape and dtype; its crc32c is put into ``entry`` once its bytes
    are taken."""

    def chunks(self) -> Iterator[Any]:
        array = self.data()
        _, data, crc = _encode(self.entry.name, array)
        held = (array.dtype.newbyteorder("="), tuple(array.shape), len(memoryview(data)))
        if held != (DTYPES[self.entry.dtype].numpy, self.entry.shape, self.entry.size):
            raise ValueError(f"payload of {self.entry.name!r} is not the array its entry describes")
        self.entry = self.entry._replace(masked_crc32c=mask(crc))
        yield data


def tf_dtype_of(array: np.ndarray) -> int:
    """The TF DataType value for a numpy array's dtype (strings: object/bytes/str arrays)."""
    if array.dtype == object or array.dtype.kind in "SU":
        return DataType.DT_STRING
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder in "<>" else array.dtype
    value = _tf_dtypes().get(native)
    if value is None:
        raise UnsupportedError(f"cannot save numpy dtype {array.dtype} in a TensorFlow checkpoint")
    return value


def _device_of(value: Any) -> Any:
    """The :class:`~gpuckpt.device.Device` holding a CUDA array (CuPy's ``.device.id``)."""
    try:
        import cupy  # noqa: F401 - only ever imported for device arrays
    except ImportError:
        raise DeviceUnavailableError("saving a device (CUDA) array needs CuPy, which is not installed") from None
    from .cuda import cuda_device

    return cuda_device(int(value.device.id))


def _payload(key: bytes, name: str, value: Any) -> Payload:
    """The payload of one array: device arrays stream from the device as they are written."""
    if not hasattr(value, "__cuda_array_interface__"):
        return array_payload(key, name, _host_array(value))
    device = _device_of(value)
    if value.dtype.byteorder == ">":
        raise UnsupportedError(f"device array {name!r} is big-endian: save it from the host")
    entry = TensorEntry(name, tf_dtype_of(value), tuple(value.shape), 0, 0, int(value.nbytes), 0)
    return DevicePayload(key, entry, contiguous_bytes(device, value), device)


def _host_array(value: Any) -> np.ndarray:
    """numpy view of ``value`` (bytes and str become string scalars)."""
    if isinstance(value, (bytes, str)):
        return np.array(value, dtype=object)
    array = np.asarray(value)
    if array.dtype.kind in "SU":
        # from the Python objects again: numpy's fixed-width bytes drop trailing NULs (b"a\x00")
        return np.array(value, dtype=object) if isinstance(value, (list, tuple)) else array.astype(object)
    return array


def array_payload(key: bytes, name: str, array: np.ndarray) -> Payload:
    """One array's bytes, under ``key``, with its entry (shard and offset assigned later)."""
    dtype, data, crc = _encode(name, array)
    return Payload(key, TensorEntry(name, dtype, tuple(array.shape), 0, 0, len(memoryview(data)), mask(crc)), data)


def _encode(name: str, array: np.ndarray) -> tuple[int, Any, int]:
    """(TF dtype, payload buffer, crc32c) of one array."""
    dtype = tf_dtype_of(array)
    if dtype == 7:
        values = []
        for item in array.reshape(-1):
            if isinstance(item, str):
                item = item.encode("utf-8")
            if not isinstance(item, (bytes, bytearray, np.bytes_)):
                raise UnsupportedError(f"string tensor {name!r} holds a {type(item).__name__}, not bytes or str")
            values.append(bytes(item))
        payload, crc = encode_strings(values)
        return dtype, payload, crc
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and np.little_endian is False):
        array = array.astype(array.dtype.newbyteorder("<"))
    contiguous = np.ascontiguousarray(array)
    data = contiguous.reshape(-1).view(np.uint8)
    return dtype, data, crc32c(data)


def _slice_of(region: tuple[slice, ...], shape: tuple[int, ...], name: str) -> TensorSlice:
    if len(region) != len(shape):
        raise ValueError(f"part of {name!r} has {len(region)} slices for a tensor of rank {len(shape)}")
    extents = []
    for item, dim in zip(region, shape, strict=True):
        if item == slice(None):
            extents.append(Extent(0, None))
            continue
        start, stop, step = item.indices(dim)
        if step != 1 or stop <= start:
            raise ValueError(f"part of {name!r} has slice {item}: parts must be non-empty, with step 1")
        extents.append(Extent(start, stop - start))
    return tuple(extents)


def _payloads(tensors: Mapping[str, Any]) -> tuple[list[Payload], list[TensorEntry]]:
    """Data payloads in the caller's order, and the full entries of partitioned tensors."""
    payloads: list[Payload] = []
    partitioned: list[TensorEntry] = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name.startswith("\x00"):
            raise ValueError(f"tensor names must be non-empty strings not starting with NUL, not {name!r}")
        if not isinstance(value, Partitioned):
            payloads.append(_payload(encode_name(name), name, value))
            continue
        shape = tuple(int(d) for d in value.shape)
        if not shape or 0 in shape:  # TensorFlow's reader refuses both (a size or checksum mismatch)
            raise ValueError(f"partitioned tensor {name!r} has shape {shape}: save a scalar or empty tensor whole")
        slices, dtypes = [], set()
        for region, part in value.parts:
            tensor_slice = _slice_of(tuple(region), shape, name)
            problem = check_extents(tensor_slice, shape)
            payload = _payload(slice_key(encode_name(name), tensor_slice), name, part)
            if problem is None and payload.entry.shape != slice_shape(tensor_slice, shape):
                problem = f"part has shape {payload.entry.shape}, its region {slice_shape(tensor_slice, shape)}"
            if problem:
                raise ValueError(f"bad part of partitioned tensor {name!r}: {problem}")
            payloads.append(payload)
            dtypes.add(payloads[-1].entry.dtype)
            slices.append(tensor_slice)
        problem = coverage_problem(tuple(slices), shape) if slices else "no parts given"
        if problem or len(dtypes) != 1:
            raise ValueError(f"parts of partitioned tensor {name!r} do not tile it: {problem or 'mixed dtypes'}")
        dtype = DataType(next(iter(dtypes)))
        if dtype not in TF_SLICED_TYPES:  # TensorFlow's reader: "Dtype half not supported."
            raise ValueError(
                f"partitioned tensor {name!r} holds {DTYPES[dtype].name if dtype in DTYPES else dtype.name}, which "
                "TensorFlow reads only whole (its reader assembles slices of "
                f"{', '.join(DTYPES[t].name for t in sorted(TF_SLICED_TYPES))} only): save it whole"
            )
        partitioned.append(TensorEntry(name, dtype, shape, 0, 0, 0, 0, tuple(slices)))
    return payloads, partitioned


def _assign_shards(payloads: list[Payload], max_shard_bytes: int | None) -> int:
    """Give each payload its shard and offset, filling data files in order; returns the shard count."""
    shard, offset = 0, 0
    for payload in payloads:
        size = payload.entry.size
        if max_shard_bytes is not None and offset > 0 and offset + size > max_shard_bytes:
            shard, offset = shard + 1, 0
        payload.entry = payload.entry._replace(shard_id=shard, offset=offset)
        offset += size
    return shard + 1


def _after_step(step: str) -> None:
    """Called between the durable steps of a save; tests replace it to inject crashes."""


def _reporter(progress: Callable[[int, int], None], total: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """Wraps the chunks of each data file so that ``progress`` hears of every one written."""
    written = 0

    def report(chunks: Iterable[Any]) -> Iterator[Any]:
        nonlocal written
        for chunk in chunks:
            yield chunk  # back here once the chunk is written
            written += memoryview(chunk).nbytes
            progress(written, total)

    return report


def _write_durably(path: str, chunks: Iterable[Any]) -> None:
    iterator = iter(chunks)
    try:
        with open(path, "wb") as f:
            for chunk in iterator:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        # A write that failed leaves the producer suspended; closing it now releases what it holds
        # (a device payload's pinned buffers) instead of whenever the exception is dropped.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(final: str) -> str:
    return f"{final}.tempstate{secrets.randbits(63)}"  # the name TF's own writers use for temporaries


def save(
    prefix: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
    update_state: bool | None = None,
    max_to_keep: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write ``tensors`` as a TensorFlow checkpoint at ``prefix``; returns the prefix.

    Parameters
    ----------
    prefix : the checkpoint prefix (``dir/model.ckpt-100``); files are ``prefix.index`` and
        ``prefix.data-*``.
    tensors : name -> numpy array, CuPy array (streamed from the device in pinned chunks as the
        file is written), ``bytes``/``str`` or an object array of them for strings, or
        :class:`Partitioned` for a tensor given in parts. Written in this order.
    max_shard_bytes : start a new data file when the current one would grow past this (a tensor
        larger than it gets a file of its own); None writes one data file.
    update_state : record the new checkpoint in the directory's ``checkpoint`` file (None: only
        when the directory already has one).
    max_to_keep : with the state file, keep at most this many checkpoints listed and delete the
        files of older ones it drops, as ``tf.train.CheckpointManager`` does.
    overwrite : replace an existing checkpoint at ``prefix`` (otherwise ``CheckpointExistsError``,
        also a ``FileExistsError``). It is removed (index first) only once every new file is
        written, so a failed write (disk full) leaves it intact; a crash during the renames that
        follow leaves no checkpoint there, never a mixed one.
    progress : called as ``progress(bytes_written, bytes_total)`` as the data files are written.

    Notes
    -----
    Crash safety: data files and the index are written to temporary names and fsynced, then
    renamed, the index last; a crash at any point leaves either no new checkpoint or a complete
    one, and other checkpoints untouched. On an error every file this call created is removed.
    """
    payloads, partitioned = _payloads(tensors)
    return write_bundle(
        prefix,
        payloads,
        partitioned,
        max_shard_bytes=max_shard_bytes,
        update_state=update_state,
        max_to_keep=max_to_keep,
        overwrite=overwrite,
        progress=progress,
    )


def write_bundle(
    prefix: str | os.PathLike[str],
    payloads: list[Payload],
    partitioned: list[TensorEntry],
    *,
    max_shard_bytes: int | None = None,
    update_state: bool | None = None,
    max_to_keep: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write prepared payloads (in order) and partitioned tensors' full entries as a checkpoint.

    The durable part of :func:`save`, shared with :func:`gpuckpt.merge`: see :func:`save`.
    """
    prefix = os.fspath(prefix)
    directory = os.path.dirname(os.path.abspath(prefix))
    index_path = prefix + ".index"
    if os.path.exists(index_path) and not overwrite:
        raise CheckpointExistsError(f"a checkpoint already exists at {prefix!r} (pass overwrite=True to replace it)")
    record_state = update_state or (update_state is None and os.path.exists(os.path.join(directory, STATE_FILENAME)))
    if record_state:
        read_state(directory)  # a damaged state file is refused now, not once the checkpoint is written
    num_shards = _assign_shards(payloads, max_shard_bytes)
    keys = [p.key for p in payloads] + [encode_name(e.name) for e in partitioned]
    if len(set(keys)) != len(keys):
        raise ValueError("two tensors (or two parts of one tensor) have the same name and region")

    os.makedirs(directory, exist_ok=True)
    report = None if progress is None else _reporter(progress, sum(p.entry.size for p in payloads))
    created: list[str] = []  # removed again on any failure
    try:
        # Every byte goes to temporaries first: running out of space (or any write error) fails
        # here, while an existing checkpoint at this prefix is still untouched.
        for shard in range(num_shards):
            temporary = _temporary(data_filename(prefix, shard, num_shards))
            created.append(temporary)
            chunks = (c for p in payloads if p.entry.shard_id == shard for c in p.chunks())
            _write_durably(temporary, chunks if report is None else report(chunks))
            _after_step(f"data shard {shard} written")
        # Built only now: a device payload's checksum is known once its bytes have streamed by.
        entries = [(p.key, p.entry) for p in payloads] + [(encode_name(e.name), e) for e in partitioned]
        index_bytes = build_table(
            [(b"", encode_header(num_shards))] + sorted((key, encode_entry(entry)) for key, entry in entries)
        )
        index_temporary = _temporary(index_path)
        created.append(index_temporary)
        _write_durably(index_temporary, [index_bytes])
        _after_step("index written")
        if overwrite and os.path.exists(index_path):
            _remove_checkpoint_files(prefix)  # its index first, so it never pairs with new data
            _after_step("old checkpoint removed")
        for shard in range(num_shards):
            final = data_filename(prefix, shard, num_shards)
            os.replace(created[shard], final)
            created[shard] = final
            _after_step(f"data shard {shard} in place")
        _fsync_directory(directory)
        os.replace(index_temporary, index_path)  # from here on the checkpoint exists, complete
        created.clear()
        _fsync_directory(directory)
        _after_step("index in place")
    except BaseException as exc:
        for path in created:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"could not write checkpoint {prefix!r}: {exc.strerror or exc}") from exc
        raise
    if record_state:
        _record_in_state(directory, os.path.abspath(prefix), max_to_keep)
    return prefix


def _remove_checkpoint_files(prefix: str) -> None:
    """Remove a checkpoint's index first (so it stops existing), then its data files."""
    os.remove(prefix + ".index")
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"\.data-\d{5,}-of-\d{5,}$")
    directory = os.path.dirname(os.path.abspath(prefix))
    for name in os.listdir(directory):
        if pattern.match(name):
            os.remove(os.path.join(directory, name))


def _record_in_state(directory: str, prefix: str, max_to_keep: int | None) -> None:
    """Make ``prefix`` the latest checkpoint in the directory's state file (temp file + rename)."""
    state = read_state(directory)
    paths = [p for p in (state.all_model_checkpoint_paths if state else ()) if p != prefix]
    timestamps = list(state.all_model_checkpoint_timestamps) if state else []
    if len(timestamps) != len(paths) + (1 if state and prefix in state.all_model_checkpoint_paths else 0):
        timestamps = []  # older files have no timestamps, or they no longer line up: drop them
    elif state and prefix in state.all_model_checkpoint_paths:
        del timestamps[state.all_model_checkpoint_paths.index(prefix)]
    paths.append(prefix)
    timestamps = timestamps + [time.time()] if timestamps or not state else []
    dropped: list[str] = []
    if max_to_keep is not None and max_to_keep > 0 and len(paths) > max_to_keep:
        dropped, paths = paths[:-max_to_keep], paths[-max_to_keep:]
        timestamps = timestamps[-max_to_keep:] if timestamps else []
    text = encode_state(directory, prefix, paths, timestamps, state.last_preserved_timestamp if state else 0.0)
    final = os.path.join(directory, STATE_FILENAME)
    temporary = _temporary(final)
    try:
        _write_durably(temporary, [text])
        os.replace(temporary, final)
    except BaseException as exc:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(exc, OSError):
            raise WriteError(exc.errno, f"could not update {final!r}: {exc.strerror or exc}") from exc
        raise
    for old in dropped:  # after the state no longer names them, as CheckpointManager does
        if os.path.exists(old + ".index"):
            _remove_checkpoint_files(old)
