"""A bundle's data shard files, each opened once (FORMAT.md 1.1, 4.1).

Bulk reads use ``os.preadv`` straight into the destination buffer: one kernel copy from the page
cache, the GIL released, no page faults on a source mapping, and a file that shrinks underneath
gives a short read (reported as :class:`FormatError`) instead of the SIGBUS a mapping would raise.
Every restore and slice reads this way. Only ``get_tensor(copy=False)``, which asks for a view of
the file itself, uses a read-only ``mmap`` of the same descriptor (created on first use); that view
is the one object a shrinking file can still turn into a SIGBUS (README: what gpuckpt promises).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator

from ..errors import CheckpointNotFoundError, ClosedCheckpointError, FormatError, describe


class MissingShardError(CheckpointNotFoundError):
    """A data shard that the index refers to does not exist."""


def data_filename(prefix: str, shard_id: int, num_shards: int) -> str:
    """``PREFIX.data-%05d-of-%05d`` (FORMAT.md 1.1): joined as strings, never through Path.with_suffix."""
    return f"{prefix}.data-{shard_id:05d}-of-{num_shards:05d}"


def drop_from_page_cache(paths: list[str]) -> bool:
    """Write back, then drop the files' pages from the page cache (``posix_fadvise`` DONTNEED),
    so the next read comes from storage (cold-cache measurements); False where the platform has
    no ``posix_fadvise``."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


class ShardFiles:
    """The open data files of one bundle, by shard id. Thread-safe; close() is idempotent.

    A close() while other threads are reading takes effect for every read that starts after it;
    the descriptors themselves are closed once the reads in progress are done, so a number is
    never reused by another file while a read still uses it.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.num_shards = 0  # known from the index header, given with the first shard opened
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._reading_now = 0  # reads in progress: their descriptors must stay open
        self._closed = False
        self._bytes_read: dict[int, int] = {}  # by shard id, every read since open

    def open_shard(self, shard_id: int, num_shards: int) -> int:
        """Open one shard (once) and return its size; only shards the index uses are opened."""
        with self._lock:
            self.num_shards = num_shards
            if shard_id in self._sizes:
                return self._sizes[shard_id]
            path = self.path(shard_id)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                raise MissingShardError(
                    f"data shard {shard_id} of {self.num_shards} is missing: " + describe(path)
                ) from None
            self._fds[shard_id] = fd
            self._sizes[shard_id] = os.fstat(fd).st_size
            return self._sizes[shard_id]

    def path(self, shard_id: int) -> str:
        return data_filename(self.prefix, shard_id, self.num_shards)

    def size(self, shard_id: int) -> int:
        return self._sizes[shard_id]

    def bytes_read(self) -> dict[str, int]:
        """Bytes read from each data file since it was opened (by path; files never read are absent)."""
        with self._lock:
            return {self.path(shard): count for shard, count in sorted(self._bytes_read.items())}

    @contextlib.contextmanager
    def _reading(self, shard_id: int, nbytes: int = 0) -> Iterator[int]:
        """The shard's descriptor, kept open until the block ends even if close() is called;
        ``nbytes`` (what the caller is about to read) is added to :meth:`bytes_read`."""
        with self._lock:
            if self._closed:
                raise ClosedCheckpointError("checkpoint is closed: " + describe(self.path(shard_id)))
            fd = self._fds[shard_id]
            self._reading_now += 1
            self._bytes_read[shard_id] = self._bytes_read.get(shard_id, 0) + nbytes
        try:
            yield fd
        finally:
            with self._lock:
                self._reading_now -= 1
                if self._closed and self._reading_now == 0:
                    self._close_files()

    def read_into(self, shard_id: int, offset: int, dst: memoryview, tensor: str | None = None) -> None:
        """Fill ``dst`` (a writable byte view) with the bytes at ``offset``; short reads are errors."""
        with self._reading(shard_id, len(dst)) as fd:
            done = 0
            total = len(dst)
            while done < total:
                got = os.preadv(fd, [dst[done:]], offset + done)
                if got <= 0:
                    raise FormatError(
                        f"data file ended after {offset + done} bytes, {total - done} bytes short "
                        "(truncated or replaced while open?): " + describe(self.path(shard_id), tensor, offset + done)
                    )
                done += got

    def read_runs(
        self, shard_id: int, offsets: list[int], length: int, dst: memoryview, tensor: str, spacing: int | None = None
    ) -> None:
        """Read ``length`` bytes from each of ``offsets`` in turn into ``dst``, the ``i``-th at
        ``i * spacing`` (default ``length``: back to back): many small reads in a tight loop, each
        falling back to :meth:`read_into` (retry, then error) if short."""
        spacing = length if spacing is None else spacing
        with self._reading(shard_id, len(offsets) * length) as fd:
            preadv = os.preadv
            for number, offset in enumerate(offsets):
                piece = dst[number * spacing : number * spacing + length]
                if preadv(fd, [piece], offset) != length:
                    self.read_into(shard_id, offset, piece, tensor)

    def check_not_shrunk(self, shard_id: int, tensor: str | None = None) -> None:
        """Raise if the file is now shorter than when it was opened.

        A read racing a truncation can copy the zeroed tail of the file's last page without seeing
        a short read (Linux does not order them). Checksummed reads catch that; unchecked ones
        (lazy slices, verify=False) call this after reading: it catches any truncation still in place.
        """
        with self._reading(shard_id) as fd:
            current = os.fstat(fd).st_size
        if current < self._sizes[shard_id]:
            raise FormatError(
                f"data file shrank from {self._sizes[shard_id]} to {current} bytes since it was opened: "
                + describe(self.path(shard_id), tensor)
            )

    def mapping(self, shard_id: int) -> memoryview:
        """A read-only view of the whole shard (memory-mapped on first use).

        The file's size is checked on every call: touching a mapped page past the end of a file
        that shrank would kill the process with SIGBUS. (A file truncated after this check, while
        a view is alive, can still do that; ``preadv`` reads cannot.)
        """
        if self._sizes[shard_id] == 0:
            return memoryview(b"")
        self.check_not_shrunk(shard_id)
        with self._reading(shard_id) as fd, self._lock:
            m = self._maps.get(shard_id)
            if m is None:
                m = mmap.mmap(fd, self._sizes[shard_id], prot=mmap.PROT_READ)
                self._maps[shard_id] = m
        return memoryview(m)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._reading_now == 0:
                self._close_files()

    def _close_files(self) -> None:
        """Unmap and close everything (the lock is held, and no read is in progress)."""
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # zero-copy views handed out still use it; it is unmapped when they are freed
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
