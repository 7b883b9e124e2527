"""Executing a read plan on the host: data shard bytes into numpy arrays that own their memory.

Large pieces are read straight into their final array in chunks, each chunk checksummed while it is
still in cache, so verification costs no extra pass over memory and no extra copy. Small pieces
share one read and are copied out of it. A pool of threads runs the reads; ``os.preadv``, the copies
and ``crc32c`` all release the GIL.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import ChecksumError, FormatError, UnsupportedError, describe
from ..format.bundle import BundleIndex, TensorEntry, refused_reason
from ..format.crc import crc32c, unmask
from ..format.slices import coverage_problem
from ..plan import PlanOptions, ReadGroup, pieces_of, plan_reads
from .convert import fix_in_place
from .shards import ShardFiles
from .strings import decode_strings

CHUNK_BYTES = 4 << 20  # fits in L2/L3 so the crc pass reads what the copy just wrote

ProgressCallback = Callable[[int, int], None]


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
    info = tensor.dtype_info
    assert info is not None  # check_readable ran first
    return np.empty(tensor.shape, dtype=object if info.is_string else info.numpy)


class HostReader:
    """Reads tensors of one bundle into numpy arrays."""

    def __init__(self, index: BundleIndex, shards: ShardFiles, plan_options: PlanOptions = PlanOptions()) -> None:
        self.index = index
        self.shards = shards
        self.plan_options = plan_options

    def _where(self, entry: TensorEntry, tensor: TensorEntry) -> tuple[str, str, int]:
        return self.shards.path(entry.shard_id), tensor.name, entry.offset

    def _verify(self, crc: int, entry: TensorEntry, tensor: TensorEntry) -> None:
        if crc != unmask(entry.masked_crc32c):
            path, name, offset = self._where(entry, tensor)
            part = "" if entry is tensor else f" (slice entry {entry.name!r})"
            raise ChecksumError(
                f"checksum does not match{part}: stored {unmask(entry.masked_crc32c):#010x}, "
                f"computed {crc:#010x}: " + describe(path, name, offset)
            )

    def _read_whole(self, entry: TensorEntry, tensor: TensorEntry, verify: bool) -> np.ndarray:
        """Read one fixed-size entry straight into a new array, checksumming chunk by chunk."""
        info = entry.dtype_info
        assert info is not None and not info.is_string
        array = np.empty(entry.shape, dtype=info.numpy)
        flat = memoryview(array.reshape(-1).view(np.uint8))
        crc = 0
        for start in range(0, entry.size, CHUNK_BYTES):
            chunk = flat[start : start + CHUNK_BYTES]
            self.shards.read_into(entry.shard_id, entry.offset + start, chunk, tensor.name)
            if verify:
                crc = crc32c(chunk, crc)
        if verify:
            self._verify(crc, entry, tensor)
        fix_in_place(array, info, self.index.header.big_endian)
        return array

    def _decode(self, raw: memoryview, entry: TensorEntry, tensor: TensorEntry, verify: bool) -> np.ndarray:
        """One entry's value from its bytes ``raw`` (already read)."""
        info = entry.dtype_info
        assert info is not None
        if info.is_string:
            return decode_strings(
                raw, entry.num_elements, entry.shape, self.index.header.big_endian,
                entry.masked_crc32c, verify, self._where(entry, tensor),
            )
        if verify:
            self._verify(crc32c(raw), entry, tensor)
        array = np.empty(entry.shape, dtype=info.numpy)
        if entry.size:
            memoryview(array.reshape(-1).view(np.uint8))[:] = raw  # one copy into memory the array owns
        if info.narrow_bits or (info.swap_bytes and self.index.header.big_endian):
            fix_in_place(array, info, self.index.header.big_endian)
        return array

    def _run_group(self, group: ReadGroup, outputs: dict[str, np.ndarray], verify: bool) -> int:
        pieces = group.pieces
        if len(pieces) == 1 and pieces[0].region is None and not pieces[0].stored.dtype_info.is_string:  # type: ignore[union-attr]
            piece = pieces[0]
            outputs[piece.tensor.name] = self._read_whole(piece.stored, piece.tensor, verify)
            return group.byte_range.length
        buffer = bytearray(group.byte_range.length)
        view = memoryview(buffer)
        self.shards.read_into(group.byte_range.shard_id, group.byte_range.offset, view, pieces[0].tensor.name)
        for piece in pieces:
            start = piece.stored.offset - group.byte_range.offset
            value = self._decode(view[start : start + piece.stored.size], piece.stored, piece.tensor, verify)
            if piece.region is None:
                outputs[piece.tensor.name] = value
            else:
                outputs[piece.tensor.name][tuple(slice(a, b) for a, b in piece.region)] = value
        return group.byte_range.length

    def read(
        self,
        tensors: Sequence[TensorEntry],
        *,
        verify: bool = True,
        threads: int = 1,
        progress: ProgressCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Read ``tensors`` into new arrays (keyed by name). On any error nothing is returned."""
        for tensor in tensors:
            check_readable(self.index, tensor)
        outputs: dict[str, np.ndarray] = {t.name: allocate(t) for t in tensors if t.slices}
        pieces = [p for t in tensors for p in pieces_of(self.index, t)]
        groups = plan_reads(pieces, self.plan_options)
        total = sum(g.byte_range.length for g in groups)
        done = 0
        lock = threading.Lock()

        def run(group: ReadGroup) -> None:
            nonlocal done
            n = self._run_group(group, outputs, verify)
            if progress is not None:
                with lock:
                    done += n
                    progress(done, total)

        if threads <= 1 or len(groups) <= 1:
            for group in groups:
                run(group)
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpuckpt-read") as pool:
                futures = [pool.submit(run, g) for g in groups]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        return {t.name: outputs[t.name] for t in tensors}
