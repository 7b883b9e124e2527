"""Executing a read plan on the host: data shard bytes into numpy arrays.

Every large piece is read straight into its destination (a new array, or the ``out=`` array the
caller gave, or the region of it a saved slice covers) in chunks, each chunk checksummed while it
is still in cache, so verification costs no extra pass over memory and no extra copy. Where the
restored dtype differs from the stored one (``dtype=``), each chunk is read into a per-thread
staging buffer and converted from there into the destination: no temporary the size of the
tensor. Small pieces share one read and are copied (and converted) out of it. A pool of threads
runs the reads; ``os.preadv``, the copies and ``crc32c`` all release the GIL.

New arrays of 1 MiB and more come from one mapping per restore with huge pages advised (see
:mod:`gpuckpt.host.arena`), faulted in by the reader threads as they copy.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from types import EllipsisType

import numpy as np

from ..dtypes import DTYPES, DataType, DTypeInfo
from ..errors import ChecksumError, FormatError, InvalidArgumentError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry, refused_reason
from ..format.crc import PartChecksums, crc32c, unmask
from ..format.slices import coverage_problem
from ..gcpause import gc_paused
from ..plan import DEFAULT_PLAN, Piece, PlanOptions, ReadGroup, contiguous_range, pieces_of, plan_reads
from .arena import MIN_BYTES, new_arrays
from .convert import check_conversion, fix_in_place, reference_convert
from .shards import ShardFiles
from .strings import decode_strings
from .variants import check_variants

CHUNK_BYTES = 1 << 20  # fits in L2, so the crc pass reads what the copy just wrote (see warm_start.py)
SPLIT_BYTES = 32 << 20  # tensors larger than two of these are read by several threads in parts

ProgressCallback = Callable[[int, int], None]


class _BulkRead:
    """One large fixed-size piece read straight into the contiguous run of its destination that
    it fills, possibly in parts by several threads; the parts' CRCs are combined in order once all
    are in (crc32c_combine). With a conversion, each chunk is staged and converted into place."""

    def __init__(self, piece: Piece, destination: np.ndarray, kernel: str | None, split_bytes: int | None) -> None:
        entry = piece.stored
        info = entry.dtype_info
        assert info is not None and not info.is_string
        self.entry, self.tensor, self.kernel = entry, piece.tensor, kernel
        span = contiguous_range(piece.tensor.shape, piece.region)
        assert span is not None
        self.elements = destination.reshape(-1)[span[0] : span[1]]  # a view: C-contiguous destination
        self.flat = memoryview(self.elements.view(np.uint8)) if kernel is None else None  # type: ignore[arg-type]
        size = entry.size
        step = split_bytes if split_bytes and size > 2 * split_bytes else max(size, 1)
        self.bounds = [(start, min(size, start + step)) for start in range(0, max(size, 1), step)]
        self.checksums = PartChecksums(self.bounds)


def _is_bulk(group: ReadGroup) -> bool:
    """A read of one fixed-size piece whose destination bytes are contiguous: done in place."""
    if len(group.pieces) != 1:
        return False
    piece = group.pieces[0]
    if DTYPES[piece.stored.dtype].is_string:
        return False
    return piece.region is None or contiguous_range(piece.tensor.shape, piece.region) is not None


def _needs_fix(info: DTypeInfo, big_endian: bool) -> bool:
    return bool(info.narrow_bits or (big_endian and info.swap_bytes))


def check_out(given: object, tensor: TensorEntry, path: str) -> None:
    """Refuse an ``out=`` array the host cannot read into in place: it must be a writeable numpy
    array, C-contiguous unless it holds strings (those are assigned element by element)."""
    problem = None
    if not isinstance(given, np.ndarray):
        problem = f"is a {type(given).__name__}, not a numpy array"
    elif not given.flags.writeable:
        problem = "is read-only"
    elif given.dtype.kind != "O" and not given.flags.c_contiguous:
        problem = "is not C-contiguous (the host reads into it in place)"
    if problem is not None:
        raise InvalidArgumentError(
            f"out[{tensor.name!r}] {problem}: nothing was written: " + describe(path, tensor.name)
        )


def check_dtype(index: BundleIndex, tensor: TensorEntry) -> None:
    """Raise the typed error for a tensor whose dtype cannot be returned at all."""
    reason = refused_reason(tensor)
    if reason is not None:
        raise UnsupportedError(f"cannot read this tensor: {reason}: " + describe(index.path, tensor.name))


def check_readable(index: BundleIndex, tensor: TensorEntry) -> None:
    """Raise the typed error for a tensor that cannot be read whole."""
    check_dtype(index, tensor)
    if tensor.slices:
        problem = coverage_problem(tensor.slices, tensor.shape)
        if problem:
            raise FormatError(
                f"does not have sufficient slices for partitioned tensor ({problem}): "
                + describe(index.path, tensor.name)
            )


def _restored_dtype(tensor: TensorEntry, dtypes: Mapping[str, np.dtype]) -> np.dtype:
    info = tensor.dtype_info
    assert info is not None  # check_readable ran first
    if info.is_string:
        return np.dtype(object)
    return np.dtype(dtypes.get(tensor.name, info.numpy))


class HostReader:
    """Reads tensors of one bundle into numpy arrays."""

    def __init__(self, index: BundleIndex, shards: ShardFiles, plan_options: PlanOptions = DEFAULT_PLAN) -> None:
        self.index = index
        self.shards = shards
        self.plan_options = plan_options

    def _where(self, entry: TensorEntry, tensor: TensorEntry) -> tuple[str, str, int]:
        return self.shards.path(entry.shard_id), tensor.name, entry.offset

    def verify_crc(self, crc: int, entry: TensorEntry, tensor: TensorEntry) -> None:
        """Raise ChecksumError naming the file, tensor (and slice entry) and offset unless ``crc`` matches."""
        if crc != unmask(entry.masked_crc32c):
            path, name, offset = self._where(entry, tensor)
            part = "" if entry is tensor else f" (slice entry {entry.name!r})"
            raise ChecksumError(
                f"checksum does not match{part}: stored {unmask(entry.masked_crc32c):#010x}, "
                f"computed {crc:#010x}: " + describe(path, name, offset)
            )

    def _read_part(self, bulk: _BulkRead, part: int, verify: bool, stage: Callable[[], memoryview]) -> int:
        """Read one part of a large fixed-size piece into its place, checksumming it 1 MiB at a
        time while the bytes are in cache (and fixing or converting them there); the last part to
        finish combines the parts' CRCs and verifies the piece."""
        entry = bulk.entry
        info = entry.dtype_info
        assert info is not None
        big_endian = self.index.header.big_endian
        fix = _needs_fix(info, big_endian)
        start, end = bulk.bounds[part]
        crc = 0
        for offset in range(start, end, CHUNK_BYTES):
            length = min(end, offset + CHUNK_BYTES) - offset
            chunk = bulk.flat[offset : offset + length] if bulk.flat is not None else stage()[:length]
            self.shards.read_into(entry.shard_id, entry.offset + offset, chunk, bulk.tensor.name)
            if verify:
                crc = crc32c(chunk, crc)
            if fix or bulk.kernel is not None:
                values = np.frombuffer(chunk, info.numpy)  # offsets are multiples of every itemsize
                if fix:
                    fix_in_place(values, info, big_endian)
                if bulk.kernel is not None:
                    first = offset // info.itemsize
                    bulk.elements[first : first + values.size] = reference_convert(bulk.kernel, values)
        if bulk.checksums.record(part, crc) and verify:
            self.verify_crc(bulk.checksums.combined(), entry, bulk.tensor)
        return end - start

    def read_raw(self, entry: TensorEntry) -> bytes:
        """The stored bytes of one (unpartitioned) entry, checked against its crc32c. DT_VARIANT
        entries too: never decoded, but their element checksums are checked (FORMAT.md 4.4)."""
        variant = entry.dtype == DataType.DT_VARIANT
        if not variant:
            check_dtype(self.index, entry)
        raw = bytearray(entry.size)
        self.shards.read_into(entry.shard_id, entry.offset, memoryview(raw), entry.name)
        info = DTYPES.get(entry.dtype)
        if variant:
            count = math.prod(entry.shape)
            check_variants(raw, count, self.index.header.big_endian, entry.masked_crc32c, self._where(entry, entry))
        elif info is not None and info.is_string:  # the string crc is not over the raw bytes: decode to check
            decode_strings(
                raw,
                math.prod(entry.shape),
                entry.shape,
                self.index.header.big_endian,
                entry.masked_crc32c,
                True,
                self._where(entry, entry),
            )
        else:
            self.verify_crc(crc32c(raw), entry, entry)
        return bytes(raw)

    def _read_shared(
        self,
        group: ReadGroup,
        outputs: dict[str, np.ndarray],
        kernels: Mapping[str, str | None],
        verify: bool,
    ) -> None:
        """One read for many small pieces, then each piece copied out of it into its destination
        (the hot loop for checkpoints of many small tensors, hence the inlined fixed-size path)."""
        base = group.byte_range.offset
        buffer = bytearray(group.byte_range.length)
        view = memoryview(buffer)
        self.shards.read_into(group.byte_range.shard_id, base, view, group.pieces[0].tensor.name)
        big_endian = self.index.header.big_endian
        for piece in group.pieces:
            entry = piece.stored
            info = DTYPES[entry.dtype]
            start = entry.offset - base
            name = piece.tensor.name
            if info.is_string:
                value = decode_strings(
                    view[start : start + entry.size],
                    math.prod(entry.shape),
                    entry.shape,
                    big_endian,
                    entry.masked_crc32c,
                    verify,
                    self._where(entry, piece.tensor),
                )
                destination = outputs.get(name)
                if destination is None:
                    outputs[name] = value
                else:
                    destination[_box(piece.region)] = value
                continue
            if verify:
                self.verify_crc(crc32c(view[start : start + entry.size]), entry, piece.tensor)
            count = entry.size // info.itemsize
            stored = np.frombuffer(buffer, info.numpy, count, start).reshape(entry.shape)
            fix = info.narrow_bits or (big_endian and info.swap_bytes)
            kernel = kernels.get(name)
            destination = outputs.get(name)
            if destination is None:  # a new array of its own
                value = stored.copy()
                if fix:
                    fix_in_place(value, info, big_endian)
                outputs[name] = value if kernel is None else reference_convert(kernel, value).reshape(value.shape)
                continue
            span = contiguous_range(piece.tensor.shape, piece.region) if kernel is None else None
            if span is not None:  # copied straight into place, fixed there
                run = destination.reshape(-1)[span[0] : span[1]]
                run[...] = stored.reshape(-1)
                if fix:
                    fix_in_place(run, info, big_endian)
                continue
            if fix:  # never in the shared buffer: a lying index may overlap two pieces' bytes
                stored = stored.copy()
                fix_in_place(stored, info, big_endian)
            if kernel is not None:
                stored = reference_convert(kernel, stored).reshape(stored.shape)
            destination[_box(piece.region)] = stored

    def read(
        self,
        tensors: Sequence[TensorEntry],
        *,
        verify: bool = True,
        threads: int = 1,
        progress: ProgressCallback | None = None,
        out: Mapping[str, np.ndarray] | None = None,
        dtypes: Mapping[str, np.dtype] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read ``tensors`` (keyed by name) into new arrays, or into the arrays ``out`` gives.

        ``out`` arrays must already have the shape and restored dtype (the caller checks); they
        are filled in place, and returned. ``dtypes`` gives the restored dtype of the tensors
        converted (``dtype=``), each converted chunk by chunk as it is read. Everything is checked
        before anything is read or written; on any error nothing is returned (``out`` arrays
        may then hold part of the data).
        """
        out = out or {}
        dtypes = dtypes or {}
        with gc_paused():  # one plan record per tensor, none in a cycle
            kernels: dict[str, str | None] = {}
            for tensor in tensors:
                check_readable(self.index, tensor)
                if tensor.name in dtypes:
                    info = tensor.dtype_info
                    stored = None if info is None else info.numpy
                    if stored is not None:
                        where = describe(self.index.path, tensor.name)
                        kernels[tensor.name] = check_conversion(stored, np.dtype(dtypes[tensor.name]), where)
                if tensor.name in out:
                    check_out(out[tensor.name], tensor, self.index.path)
            outputs = self._destinations(tensors, out, dtypes)
            pieces = [p for t in tensors for p in pieces_of(self.index, t)]
            groups = plan_reads(pieces, self.plan_options)
        total = sum(g.byte_range.length for g in groups)
        done = 0
        lock = threading.Lock()

        def report(n: int) -> None:
            nonlocal done
            if progress is not None:
                with lock:
                    done += n
                    progress(done, total)

        # Bulk reads (large pieces, cut into parts when threads can share one) release the GIL in
        # preadv and crc32c; copying out many small tensors holds it. So the pool takes the bulk
        # parts and this thread does the shared reads meanwhile.
        split = SPLIT_BYTES if threads > 1 else None
        bulk_tasks: list[tuple[_BulkRead, int]] = []
        shared: list[ReadGroup] = []
        for group in groups:
            if not _is_bulk(group):
                shared.append(group)
                continue
            piece = group.pieces[0]
            name = piece.tensor.name
            if name not in outputs:  # a small tensor alone in its read
                outputs[name] = np.empty(piece.tensor.shape, _restored_dtype(piece.tensor, dtypes))
            bulk = _BulkRead(piece, outputs[name], kernels.get(name), split)
            bulk_tasks.extend((bulk, part) for part in range(len(bulk.bounds)))

        staging = threading.local()  # one chunk buffer per thread, for the conversions

        def stage() -> memoryview:
            buffer = getattr(staging, "buffer", None)
            if buffer is None:
                buffer = staging.buffer = memoryview(np.empty(CHUNK_BYTES, np.uint8))  # type: ignore[arg-type]
            return buffer

        def run_bulk(task: tuple[_BulkRead, int]) -> None:
            report(self._read_part(task[0], task[1], verify, stage))

        def run_shared(group: ReadGroup) -> None:
            self._read_shared(group, outputs, kernels, verify)
            report(group.byte_range.length)

        if threads <= 1 or len(bulk_tasks) <= 1:
            for task in bulk_tasks:
                run_bulk(task)
            for group in shared:
                run_shared(group)
        else:
            # Each worker takes the next task until none is left (one future per worker, not per
            # task: a future and its condition cost about as much as reading 100 KB); the first
            # error stops every worker after its current task.
            pending = iter(bulk_tasks)
            taking = threading.Lock()
            failed = threading.Event()

            def worker() -> None:
                while not failed.is_set():
                    with taking:
                        task = next(pending, None)
                    if task is None:
                        return
                    try:
                        run_bulk(task)
                    except BaseException:
                        failed.set()
                        raise

            workers = min(threads, len(bulk_tasks))
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpuckpt-read") as pool:
                futures = [pool.submit(worker) for _ in range(workers)]
                try:
                    for group in shared:
                        run_shared(group)
                    for future in futures:
                        future.result()
                except BaseException:
                    failed.set()
                    raise
        if not verify:  # nothing checked the bytes: at least refuse those read while a file shrank
            for shard_id in sorted({g.byte_range.shard_id for g in groups}):
                self.shards.check_not_shrunk(shard_id)
        return {t.name: out[t.name] if t.name in out else outputs[t.name] for t in tensors}  # the given arrays

    def _destinations(
        self, tensors: Sequence[TensorEntry], out: Mapping[str, np.ndarray], dtypes: Mapping[str, np.dtype]
    ) -> dict[str, np.ndarray]:
        """The arrays known before reading: those given, and new ones for partitioned tensors and
        for every fixed-size tensor of :data:`~gpuckpt.host.arena.MIN_BYTES` or more (from one
        mapping, :mod:`gpuckpt.host.arena`). Small unpartitioned tensors get theirs as they are read."""
        # a subclass (np.matrix reshapes to 2-D) is read into as a plain view of its memory
        outputs = {t.name: np.asarray(out[t.name]) for t in tensors if t.name in out}
        large = []
        for tensor in tensors:
            if tensor.name in outputs or (not tensor.slices and tensor.name not in dtypes and tensor.size < MIN_BYTES):
                continue  # (the common case of many small tensors, decided without a dtype lookup)
            dtype = _restored_dtype(tensor, dtypes)
            if dtype.kind != "O" and math.prod(tensor.shape) * dtype.itemsize >= MIN_BYTES:
                large.append((tensor, dtype))
            elif tensor.slices:
                outputs[tensor.name] = np.empty(tensor.shape, dtype)
        arrays = new_arrays([(t.shape, dtype) for t, dtype in large])
        outputs.update((t.name, array) for (t, _), array in zip(large, arrays, strict=True))
        return outputs


def _box(region: tuple[tuple[int, int], ...] | None) -> tuple[slice, ...] | EllipsisType:
    """The index of a piece's region in its tensor (``...``: the whole, at any rank)."""
    return ... if region is None else tuple(slice(a, b) for a, b in region)
