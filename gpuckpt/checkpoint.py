"""The ``gpuckpt.open()`` facade: one object per checkpoint, with explicit lifetime."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

from .casting import DtypeChooser, dtype_chooser
from .devices import CPU, device_name, resolve_device
from .dtypes import dtype_name, numpy_dtype
from .errors import (
    CheckpointNotFoundError,
    ClosedCheckpointError,
    FormatError,
    InvalidArgumentError,
    TensorNotFoundError,
    describe,
)
from .format.bundle import BundleIndex, TensorEntry, parse_index
from .format.object_graph import OBJECT_GRAPH_KEY, ObjectAttribute, StateKind, classify_name, decode_object_graph
from .format.state import INDEX_SUFFIX, RESOLVE_ATTEMPTS, resolve_prefix
from .host.convert import check_conversion
from .host.lazy_slice import LazyTensor, restore_regions, zero_copy_view
from .host.reader import HostReader, ProgressCallback, check_dtype
from .host.reader import check_out as check_host_out
from .host.shards import ShardFiles, data_filename
from .options import RestoreOptions
from .pipeline import RestoreFuture, SpreadFuture, check_out_array, restore_to_device
from .regions import Region, region_of

MAX_INDEX_BYTES = 1 << 34  # 16 GiB: far beyond any real index; refuse to read more into memory

NameSelector = Union[None, str, "re.Pattern[str]", Iterable[str], Callable[[str], bool]]


@dataclasses.dataclass(frozen=True, slots=True)
class TensorInfo:
    """What the index says about one tensor; available without reading any data."""

    name: str
    tf_dtype: str  #: TensorFlow's name for the dtype, e.g. "float32", "bfloat16", "string"
    shape: tuple[int, ...]
    nbytes: int  #: bytes stored in the data files (all slices, for a partitioned tensor)
    shard_id: int | None  #: data file holding it (None when partitioned across slices)
    partitioned: bool
    numpy_name: str | None  #: what :attr:`dtype` resolves ("object" for strings; None if unreadable)

    @property
    def dtype(self) -> np.dtype | None:
        """numpy dtype of the restored array (object for strings; None if unreadable). Resolved
        when asked, so listing a checkpoint of bfloat16 tensors does not import ml_dtypes."""
        return None if self.numpy_name is None else numpy_dtype(self.numpy_name)


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Checkpoint:
    """An open TensorFlow checkpoint (a TensorBundle). Create with :func:`gpuckpt.open`.

    Use it as a context manager, or call :meth:`close`. Arrays it returned stay valid after close
    (they own their memory), except zero-copy views, which keep the file mapped while they live.
    """

    def __init__(
        self,
        prefix: str,
        index: BundleIndex,
        shards: ShardFiles,
        device: Any,
        verify: bool,
        threads: int,
        options: RestoreOptions,
    ):
        self.prefix = prefix
        self._device = device
        self.device = device_name(device)  #: the device chosen: "cpu", "cuda:N" ("auto" records its choice)
        self.options = options
        self.verify = verify
        self.threads = threads
        self._index = index
        self._shards = shards
        self._reader = HostReader(index, shards)
        self._closed = False
        self._objects: dict[str, ObjectAttribute] | None = None
        self._objects_lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the data files. Idempotent."""
        if not self._closed:
            self._closed = True
            self._shards.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._index.tensors)} tensors"
        return f"<gpuckpt.Checkpoint {self.prefix!r} ({state}, device={self.device!r})>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedCheckpointError("checkpoint is closed: " + describe(self.prefix + INDEX_SUFFIX))

    # -- metadata ----------------------------------------------------------------------------------
    @property
    def index(self) -> BundleIndex:
        """The parsed index: header, entries by name, slice entries (the low-level view)."""
        return self._index

    def read_raw(self, entry: TensorEntry) -> bytes:
        """The stored bytes of one unpartitioned entry, checked against its crc32c, not decoded."""
        self._check_open()
        return self._reader.read_raw(entry)

    @property
    def num_shards(self) -> int:
        return self._index.header.num_shards

    @property
    def big_endian(self) -> bool:
        return self._index.header.big_endian

    def data_files(self) -> list[str]:
        return [data_filename(self.prefix, i, self.num_shards) for i in range(self.num_shards)]

    def bytes_read(self) -> dict[str, int]:
        """Bytes read so far from each data file by this checkpoint (restores, slices and device
        restores alike; zero-copy views are not reads), by path: what a sharded restore can show
        was read once, or only in part."""
        return self._shards.bytes_read()

    def keys(self) -> list[str]:
        """Tensor names in key order, as TensorFlow's reader lists them (slice entries excluded)."""
        return list(self._index.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index.tensors)

    def __len__(self) -> int:
        return len(self._index.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._index.tensors

    def __getitem__(self, name: str) -> Any:
        """``ckpt[name]`` is ``ckpt.get_tensor(name)``: the whole tensor, read and verified
        (:class:`TensorNotFoundError`, a ``KeyError``, for a name the checkpoint lacks)."""
        return self.get_tensor(name)

    def _entry(self, name: str) -> TensorEntry:
        entry = self._index.tensors.get(name)
        if entry is None:
            close = difflib.get_close_matches(str(name), self._index.tensors, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise TensorNotFoundError(f"no tensor named {name!r}{hint}: " + describe(self._index.path))
        return entry

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, size and shard of a tensor, from the index alone (no I/O)."""
        entry = self._entry(name)
        info = entry.dtype_info
        if entry.slices:
            nbytes = sum(self._index.slice_entry(entry, s).size for s in entry.slices)
        else:
            nbytes = entry.size
        return TensorInfo(
            name=name,
            numpy_name=None if info is None else ("object" if info.is_string else info.numpy_name),
            tf_dtype=info.name if info is not None else dtype_name(entry.dtype),
            shape=entry.shape,
            nbytes=nbytes,
            shard_id=None if entry.slices else entry.shard_id,
            partitioned=bool(entry.slices),
        )

    # -- object-based names -------------------------------------------------------------------------
    def objects(self) -> dict[str, ObjectAttribute]:
        """For TF2 object-based checkpoints: each key's object path and kind (empty for TF1 ones)."""
        with self._objects_lock:
            if self._objects is None:
                if OBJECT_GRAPH_KEY in self._index.tensors:
                    graph = self.get_tensor(OBJECT_GRAPH_KEY)
                    if graph.dtype != object or graph.shape != ():
                        raise FormatError(
                            f"object graph entry is a {graph.dtype} tensor of shape {graph.shape}, not a string "
                            "scalar: " + describe(self._index.path, OBJECT_GRAPH_KEY)
                        )
                    self._objects = decode_object_graph(bytes(graph[()]), self._index.path)
                else:
                    self._objects = {}
            return self._objects

    def kind(self, name: str) -> StateKind:
        """What a key holds: model variable, optimizer slot, other optimizer state or a counter."""
        self._entry(name)
        if name == OBJECT_GRAPH_KEY:
            return StateKind.OBJECT_GRAPH
        attribute = self.objects().get(name)
        return attribute.kind if attribute is not None else classify_name(name)

    def model_keys(self) -> list[str]:
        """The keys holding model state: no optimizer slots or state, counters or object graph."""
        return [k for k in self._index.tensors if self.kind(k) == StateKind.MODEL]

    # -- reading ------------------------------------------------------------------------------------
    def _select(self, names: NameSelector) -> list[TensorEntry]:
        if names is None:
            return list(self._index.tensors.values())
        if isinstance(names, str) or isinstance(names, re.Pattern):
            try:
                pattern = re.compile(names)
            except re.error as exc:
                raise InvalidArgumentError(f"names={names!r} is not a valid regular expression: {exc}") from None
            return [e for n, e in self._index.tensors.items() if pattern.fullmatch(n)]
        if callable(names):
            return [e for n, e in self._index.tensors.items() if names(n)]
        return [self._entry(n) for n in dict.fromkeys(names)]

    def _resolve(self, device: Any) -> Any:
        return self._device if device is None else resolve_device(device)

    def get_tensor(
        self,
        name: str,
        *,
        device: Any = None,
        verify: bool | None = None,
        copy: bool = True,
        dtype: Any = None,
        region: Any = None,
    ) -> Any:
        """Read one tensor, or a region of it.

        Parameters
        ----------
        name : the tensor's key.
        device : "cpu", "cuda", "cuda:N", "auto" (default: the checkpoint's device).
        verify : check the stored crc32c (default: the checkpoint's setting).
        copy : False returns a read-only zero-copy view of the mapped file (host, fixed-size,
            unpartitioned, native-endian tensors only); the file stays mapped while it lives.
        dtype : restore a floating tensor as this dtype (converted on the device on a GPU).
        region : a basic index (``np.s_[0:512, ::2]``): only that region is read, as
            ``restore(regions={name: region})`` reads it (see there for what is checked).
        """
        self._check_open()
        target = self._resolve(device)
        entry = self._entry(name)
        if not copy:
            if target != CPU:
                raise ValueError("copy=False gives views of the mapped file: host only")
            if region is not None:
                raise InvalidArgumentError("copy=False gives a view of the whole tensor; region= reads a copy")
            return zero_copy_view(self._reader, entry)
        regions = None if region is None else {name: region}
        return self.restore([name], device=target, verify=verify, dtype=dtype, regions=regions)[name]

    def get_slice(self, name: str) -> LazyTensor:
        """A lazy handle: ``ckpt.get_slice(name)[2:4, :]`` reads the region into a host array.

        Notes
        -----
        Reads the region's runs, or where runs would be many and short, whatever stretches between
        them read fastest from a warm page cache (``restore(regions=)`` reads at most a page
        between two runs). Partial reads are not checked against the crc32c, which covers whole
        tensors; a saved slice of a partitioned tensor that the region holds whole is.
        """
        self._check_open()
        return LazyTensor(self._reader, self._entry(name))

    def restore(
        self,
        names: NameSelector = None,
        *,
        device: Any = None,
        verify: bool | None = None,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
        dtype: Any = None,
        out: dict[str, Any] | None = None,
        regions: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Read many tensors at once; returns ``{name: array}`` in key order.

        Parameters
        ----------
        names : None for every tensor; a list of names; a regular expression (str or compiled,
            matched against the whole name); or a predicate ``name -> bool``.
        device : "cpu" (numpy arrays), "cuda"/"cuda:N" (CuPy arrays), "auto"; or, to spread
            tensors over several GPUs, a mapping from name prefixes to devices (longest prefix
            wins; "" for the rest), or a list of devices to balance the bytes over (largest
            tensors first, each to the device holding the fewest bytes so far).
        verify : check crc32c (default: the checkpoint's setting).
        threads : host reader threads (default: the checkpoint's).
        progress : called as ``progress(bytes_done, bytes_total)`` as reads complete.
        dtype : restore floating tensors as this dtype, or a mapping ``{name regex: dtype}``.
        out : existing arrays to fill, by name (shape and dtype checked first; nothing is touched
            when a check fails).
        regions : ``{name: index}``: restore only a region of those tensors, any basic index
            (integers, slices with steps, ``...``, ``None``; ``np.s_[0:512, ::2]``), the result
            shaped as numpy shapes ``tensor[index]``; an ``out=`` array has the region's shape.
            Without ``names``, just these tensors are restored. Only the bytes the region needs
            are read, with at most a page between two of its runs read along
            (:func:`gpuckpt.regions.plan_stretches`). A region that is the whole tensor is
            a whole, verified read; so is a saved slice of a partitioned tensor the region holds
            whole (a region exactly one saved slice reads that slice alone). Other reads cannot be
            checked (the crc32c covers whole tensors and slices). A region of a string tensor
            reads the whole tensor (its elements vary in length). A bad region (out of bounds,
            too many indices, fancy indexing) is :class:`~gpuckpt.regions.RegionError` (an
            ``InvalidArgumentError`` and an ``IndexError``) naming the tensor, before any read.

        Notes
        -----
        Host: reads are planned together (sorted, small tensors coalesced, large ones read straight
        into their arrays with the crc32c computed chunk by chunk in cache). GPU: bytes stream
        through a ring of pinned buffers with overlapped asynchronous copies, and conversions run
        on the device (see :mod:`gpuckpt.pipeline`). Nothing partial is returned on an error.
        """
        future = self.restore_async(
            names,
            device=device,
            verify=verify,
            threads=threads,
            progress=progress,
            dtype=dtype,
            out=out,
            regions=regions,
            wait=True,
        )
        return future.result()

    def restore_async(
        self,
        names: NameSelector = None,
        *,
        device: Any = None,
        verify: bool | None = None,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
        dtype: Any = None,
        out: dict[str, Any] | None = None,
        regions: Mapping[str, Any] | None = None,
        wait: bool = False,
    ) -> RestoreFuture:
        """Start a restore and return at once: ``future.result()`` for everything,
        ``future.ready(name)`` / ``future.wait(name)`` per tensor as it arrives."""
        self._check_open()
        _check_threads(threads)
        if regions is not None and names is None:
            names = list(regions)
        entries = self._select(names)
        wanted_regions = self._regions(entries, regions)
        verify = self.verify if verify is None else verify
        chooser = dtype_chooser(dtype)
        if isinstance(device, Mapping):
            groups = place_by_prefix(entries, device)
            return self._restore_spread(groups, verify, chooser, out, wait, wanted_regions)
        if isinstance(device, (list, tuple)):
            groups = balance_by_bytes(entries, device)
            return self._restore_spread(groups, verify, chooser, out, wait, wanted_regions)
        target = self._resolve(device)
        if target == CPU:
            return self._restore_host(entries, verify, threads, progress, chooser, out, wait, wanted_regions)
        return restore_to_device(
            self._reader,
            target,
            entries,
            self.options,
            verify=verify,
            dtype_for=chooser,
            out=out,
            progress=progress,
            wait=wait,
            regions=wanted_regions,
        )

    def _regions(self, entries: list[TensorEntry], regions: Mapping[str, Any] | None) -> dict[str, Region]:
        """Each region normalized against its tensor's shape (:class:`RegionError` naming the
        tensor for a bad one), before anything is read; every name must be restored."""
        if not regions:
            return {}
        if not isinstance(regions, Mapping):
            raise InvalidArgumentError(f"regions= is a {type(regions).__name__}: give a mapping {{name: index}}")
        selected = {e.name: e for e in entries}
        normalized = {}
        for name, key in regions.items():
            entry = self._entry(name)
            if name not in selected:
                raise InvalidArgumentError(
                    f"regions= names {name!r}, which names= does not select: " + describe(self._index.path, name)
                )
            normalized[name] = region_of(key, entry.shape, describe(self._index.path, name))
        return normalized

    def _check_out(
        self,
        entries: list[TensorEntry],
        chooser: DtypeChooser | None,
        out: dict[str, Any],
        regions: Mapping[str, Region] | None = None,
    ) -> dict[str, np.dtype]:
        """Refuse, before anything is read, an ``out=`` array that does not fit (shape, dtype; on
        the host also a read-only or non-contiguous one) and a ``dtype=`` conversion that is not
        defined. Returns the restored dtype of each tensor that is converted."""
        converted: dict[str, np.dtype] = {}
        for entry in entries:
            check_dtype(self._index, entry)  # a type that cannot be read at all: its own error first
            stored = self.info(entry.name).dtype
            wanted = chooser(entry.name, stored) if chooser is not None and stored is not None else stored
            if stored is not None and wanted is not None:
                if check_conversion(stored, wanted, describe(self._index.path, entry.name)) is not None:
                    converted[entry.name] = np.dtype(wanted)
            if entry.name in out:
                check_host_out(out[entry.name], entry, self._index.path)
                region = (regions or {}).get(entry.name)
                shape = None if region is None else region.shape
                check_out_array(out[entry.name], entry, np.dtype(wanted), self._index.path, shape=shape)
        return converted

    def _restore_host(
        self,
        entries: list[TensorEntry],
        verify: bool,
        threads: int | None,
        progress: ProgressCallback | None,
        chooser: DtypeChooser | None,
        out: dict[str, Any] | None,
        wait: bool,
        regions: Mapping[str, Region] | None = None,
    ) -> RestoreFuture:
        """``out=`` arrays and converted tensors are read into in place, chunk by chunk
        (:meth:`HostReader.read`): no temporary the size of a tensor, no second pass. A region
        that is the whole tensor is read with them (``out=`` seen in the tensor's shape); other
        regions after them (:func:`~gpuckpt.host.lazy_slice.restore_region`)."""
        future = RestoreFuture([e.name for e in entries])
        mine = {e.name for e in entries}  # a spread restore hands each group every name's region and out=
        out = {n: a for n, a in (out or {}).items() if n in mine}
        regions = {n: r for n, r in (regions or {}).items() if n in mine}
        converted = self._check_out(entries, chooser, out, regions)
        partial = {n: r for n, r in regions.items() if not r.whole}
        whole = {n: r for n, r in regions.items() if r.whole and r.shape != r.tensor_shape}
        plain = [e for e in entries if e.name not in partial]
        plain_out = {n: (a.reshape(whole[n].tensor_shape) if n in whole else a) for n, a in out.items()}

        def run() -> None:
            try:
                arrays = self._reader.read(
                    plain,
                    verify=verify,
                    threads=self.threads if threads is None else threads,
                    progress=progress,
                    out=plain_out,
                    dtypes=converted,
                )
                for name, region in whole.items():
                    arrays[name] = out[name] if name in out else arrays[name].reshape(region.shape)
                arrays.update(
                    restore_regions(
                        self._reader,
                        [(e, partial[e.name]) for e in entries if e.name in partial],
                        verify=verify,
                        threads=self.threads if threads is None else threads,
                        dtypes=converted,
                        out=out,
                    )
                )
                future._arrive_all(arrays)
                future._finish(None)
            except BaseException as exc:  # noqa: B036 - reported through the future
                future._finish(exc)

        if wait:
            run()
        else:
            threading.Thread(target=run, name="gpuckpt-restore", daemon=True).start()
        return future

    def _restore_spread(
        self,
        groups: list[tuple[Any, list[TensorEntry]]],
        verify: bool,
        chooser: DtypeChooser | None,
        out: dict[str, Any] | None,
        wait: bool,
        regions: Mapping[str, Region] | None = None,
    ) -> RestoreFuture:
        """Each ``(device, entries)`` group restored on its device, all concurrently."""
        entries = [e for _, group in groups for e in group]
        parts: list[RestoreFuture] = []
        try:
            for device, group in groups:
                target = resolve_device(device)
                if target == CPU:
                    parts.append(self._restore_host(group, verify, None, None, chooser, out, False, regions))
                    continue
                part = restore_to_device(
                    self._reader,
                    target,
                    group,
                    self.options,
                    verify=verify,
                    dtype_for=chooser,
                    out=out,
                    wait=False,
                    regions=regions,
                )
                parts.append(part)
        except BaseException:
            for started in parts:  # nothing keeps running behind an error
                with contextlib.suppress(BaseException):
                    started.result()
            raise
        future = SpreadFuture(
            [e.name for e in entries],
            [(part, [e.name for e in group]) for part, (_, group) in zip(parts, groups, strict=True)],
        )
        if wait:
            future.result()
        return future


def place_by_prefix(entries: list[TensorEntry], placement: Mapping[str, Any]) -> list[tuple[Any, list[TensorEntry]]]:
    """``(device, entries)`` groups: each tensor goes where its longest matching name prefix says."""
    prefixes = sorted(placement, key=len, reverse=True)
    groups: dict[str, list[TensorEntry]] = {}
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"no device is given for {entry.name!r} (add a '' prefix for the rest)")
        groups.setdefault(prefix, []).append(entry)
    return [(placement[prefix], group) for prefix, group in groups.items()]


def balance_by_bytes(entries: list[TensorEntry], devices: Sequence[Any]) -> list[tuple[Any, list[TensorEntry]]]:
    """``(device, entries)`` groups with about equal bytes: largest tensors first, each to the
    device holding the fewest bytes so far (no device ends more than the largest tensor's bytes
    above another)."""
    if not devices:
        raise ValueError("device=[] names no device to balance the tensors over")
    loads = [0] * len(devices)
    groups: list[list[TensorEntry]] = [[] for _ in devices]
    for entry in sorted(entries, key=lambda e: e.stored_bytes, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(entry)
        loads[lightest] += entry.stored_bytes
    return [(device, group) for device, group in zip(devices, groups, strict=True) if group]


def _read_index(path: str) -> bytes:
    try:
        f = builtins.open(path, "rb")
    except FileNotFoundError:
        raise CheckpointNotFoundError("index file is gone (deleted by a writer?): " + describe(path)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_INDEX_BYTES:
            raise FormatError(f"index file of {size} bytes is implausibly large: " + describe(path))
        return f.read()


def _open_bundle(prefix: str) -> tuple[BundleIndex, ShardFiles]:
    index_path = prefix + INDEX_SUFFIX
    shards = ShardFiles(prefix)
    try:
        return parse_index(_read_index(index_path), index_path, shards.open_shard), shards
    except BaseException:
        shards.close()
        raise


def open(  # noqa: A001 - the name is the API
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    verify: bool = True,
    threads: int | None = None,
    options: RestoreOptions | None = None,
) -> Checkpoint:
    """Open a TensorFlow checkpoint for reading.

    Parameters
    ----------
    path : a prefix (``model.ckpt-200``), a path ending in ``.index``, a directory holding a
        ``checkpoint`` state file (opens the latest), or a SavedModel directory.
    device : "cpu"; "auto" picks the best available backend and records it in ``.device``;
        "cuda"/"cuda:N" return CuPy arrays (DeviceUnavailableError without CuPy or a GPU). The
        default for every read; ``restore(device=...)`` also takes a map by name prefix or a list
        of devices to balance over.
    verify : check crc32c of every tensor read (default True).
    threads : reader threads for :meth:`Checkpoint.restore` (default ``min(4, cpu_count)``).
    options : staging for device restores (default: :meth:`RestoreOptions.from_env`).

    A directory is resolved through its state file; when a writer deletes the checkpoint named
    there while this opens it, the state file is read again and the newer checkpoint opened.

    Raises
    ------
    CheckpointNotFoundError : (also a FileNotFoundError) nothing found (the message lists what
        was tried), or a file of the checkpoint is missing (``MissingShardError`` for data files).
    FormatError, UnsupportedError : the index is corrupt, or of a version or kind not supported.
    """
    chosen = resolve_device(device)
    _check_threads(threads)
    prefix = resolve_prefix(path)
    for attempt in range(1, RESOLVE_ATTEMPTS + 1):
        try:
            index, shards = _open_bundle(prefix)
            break
        except CheckpointNotFoundError:
            if attempt == RESOLVE_ATTEMPTS or (newer := resolve_prefix(path)) == prefix:
                raise
            prefix = newer  # the state file names another checkpoint now
    return Checkpoint(
        prefix, index, shards, chosen, verify, threads or _default_threads(), options or RestoreOptions.from_env()
    )


def _check_threads(threads: object) -> None:
    """``threads=`` is None (the default) or a positive integer; anything else is refused, never
    silently replaced by the default."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads={threads!r}: give a positive number of reader threads, or None")
