"""Executing a read plan on the host: data shard bytes into numpy arrays that own their memory.

Large pieces are read straight into their final array in chunks, each chunk checksummed while it is
still in cache, so verification costs no extra pass over memory and no extra copy. Small pieces
share one read and are copied out of it. A pool of threads runs the reads; ``os.preadv``, the copies
and ``crc32c`` all release the GIL.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Callable, Sequence

import numpy as np

from ..dtypes import DTYPES
from ..errors import ChecksumError, FormatError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry, refused_reason
from ..format.crc import PartChecksums, crc32c, unmask
from ..format.slices import coverage_problem
from ..gcpause import gc_paused
from ..plan import DEFAULT_PLAN, PlanOptions, ReadGroup, pieces_of, plan_reads
from .convert import fix_in_place
from .shards import ShardFiles
from .strings import decode_strings

CHUNK_BYTES = 4 << 20  # fits in L2/L3 so the crc pass reads what the copy just wrote
SPLIT_BYTES = 32 << 20  # tensors larger than two of these are read by several threads in parts

ProgressCallback = Callable[[int, int], None]


class _BulkRead:
    """One large fixed-size tensor read straight into its array, possibly in parts by several
    threads; the parts' CRCs are combined in order once all are in (crc32c_combine)."""

    def __init__(self, entry: TensorEntry, tensor: TensorEntry, split_bytes: int | None) -> None:
        info = entry.dtype_info
        assert info is not None and not info.is_string
        self.entry, self.tensor = entry, tensor
        self.array = np.empty(entry.shape, dtype=info.numpy)
        self.flat = memoryview(self.array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        size = entry.size
        step = split_bytes if split_bytes and size > 2 * split_bytes else max(size, 1)
        self.bounds = [(start, min(size, start + step)) for start in range(0, max(size, 1), step)]
        self.checksums = PartChecksums(self.bounds)


def _is_bulk(group: ReadGroup) -> bool:
    """A read of one whole fixed-size tensor, done straight into its array."""
    if len(group.pieces) != 1:
        return False
    piece = group.pieces[0]
    return piece.region is None and not DTYPES[piece.stored.dtype].is_string


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


def allocate(tensor: TensorEntry) -> np.ndarray:
    """The (uninitialised) output array of a partitioned tensor, filled slice by slice."""
    info = tensor.dtype_info
    assert info is not None  # check_readable ran first
    return np.empty(tensor.shape, dtype=object if info.is_string else info.numpy)


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

    def _read_part(self, bulk: _BulkRead, part: int, verify: bool, outputs: dict[str, np.ndarray]) -> int:
        """Read one part of a large fixed-size tensor straight into its array, checksumming it 4 MiB
        at a time while the bytes are in cache; the last part to finish combines the parts' CRCs,
        verifies the tensor and publishes it."""
        entry = bulk.entry
        start, end = bulk.bounds[part]
        crc = 0
        for offset in range(start, end, CHUNK_BYTES):
            chunk = bulk.flat[offset : min(end, offset + CHUNK_BYTES)]
            self.shards.read_into(entry.shard_id, entry.offset + offset, chunk, bulk.tensor.name)
            if verify:
                crc = crc32c(chunk, crc)
        if bulk.checksums.record(part, crc):
            if verify:
                self.verify_crc(bulk.checksums.combined(), entry, bulk.tensor)
            info = entry.dtype_info
            assert info is not None
            fix_in_place(bulk.array, info, self.index.header.big_endian)
            outputs[bulk.tensor.name] = bulk.array
        return end - start

    def read_raw(self, entry: TensorEntry) -> bytes:
        """The stored bytes of one (unpartitioned) entry, checked against its crc32c."""
        check_dtype(self.index, entry)
        raw = bytearray(entry.size)
        self.shards.read_into(entry.shard_id, entry.offset, memoryview(raw), entry.name)
        info = DTYPES.get(entry.dtype)
        if info is not None and info.is_string:  # the string crc is not over the raw bytes: decode to check
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

    def _read_shared(self, group: ReadGroup, outputs: dict[str, np.ndarray], verify: bool) -> None:
        """One read for many small pieces, then each piece copied out of it (the hot loop for
        checkpoints of many small tensors, hence the inlined fixed-size path)."""
        base = group.byte_range.offset
        buffer = bytearray(group.byte_range.length)
        view = memoryview(buffer)
        self.shards.read_into(group.byte_range.shard_id, base, view, group.pieces[0].tensor.name)
        big_endian = self.index.header.big_endian
        for piece in group.pieces:
            entry = piece.stored
            info = DTYPES[entry.dtype]
            start = entry.offset - base
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
            else:
                if verify:
                    self.verify_crc(crc32c(view[start : start + entry.size]), entry, piece.tensor)
                count = entry.size // info.itemsize
                value = np.frombuffer(buffer, info.numpy, count, start).reshape(entry.shape).copy()
                if info.narrow_bits or (big_endian and info.swap_bytes):
                    fix_in_place(value, info, big_endian)
            if piece.region is None:
                outputs[piece.tensor.name] = value
            else:
                outputs[piece.tensor.name][tuple(slice(a, b) for a, b in piece.region)] = value

    def read(
        self,
        tensors: Sequence[TensorEntry],
        *,
        verify: bool = True,
        threads: int = 1,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Read ``tensors`` into new arrays (keyed by name). On any error nothing is returned."""
        with gc_paused():  # one plan record per tensor, none in a cycle
            for tensor in tensors:
                check_readable(self.index, tensor)
            outputs: dict[str, np.ndarray] = {t.name: allocate(t) for t in tensors if t.slices}
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

        # Bulk reads (whole large tensors, cut into parts when threads can share one) release the
        # GIL in preadv and crc32c; copying out many small tensors holds it. So the pool takes the
        # bulk parts and this thread does the shared reads meanwhile.
        split = SPLIT_BYTES if threads > 1 else None
        bulk_tasks = [
            (bulk, part)
            for g in groups
            if _is_bulk(g)
            for bulk in [_BulkRead(g.pieces[0].stored, g.pieces[0].tensor, split)]
            for part in range(len(bulk.bounds))
        ]
        shared = [g for g in groups if not _is_bulk(g)]

        def run_bulk(task: tuple[_BulkRead, int]) -> None:
            report(self._read_part(task[0], task[1], verify, outputs))

        def run_shared(group: ReadGroup) -> None:
            self._read_shared(group, outputs, verify)
            report(group.byte_range.length)

        if threads <= 1 or len(bulk_tasks) <= 1:
            for task in bulk_tasks:
                run_bulk(task)
            for group in shared:
                run_shared(group)
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpuckpt-read") as pool:
                futures = [pool.submit(run_bulk, task) for task in bulk_tasks]
                try:
                    for group in shared:
                        run_shared(group)
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        if not verify:  # nothing checked the bytes: at least refuse those read while a file shrank
            for shard_id in sorted({g.byte_range.shard_id for g in groups}):
                self.shards.check_not_shrunk(shard_id)
        return {t.name: outputs[t.name] for t in tensors}
