"""The memory-copy floors the host benchmarks time beside gpuckpt, in the same run."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable

import numpy as np

from gpuckpt.format.crc import crc32c
from gpuckpt.host import reader


class CopyFloors:
    """The floors for reading a page-cached data file into memory already faulted in, as named
    timings: ``floor_memcpy_prefaulted_s``, one single-threaded memcpy of the mapped file;
    ``floor_preadv_prefaulted_1thread_s``, the same by ``preadv`` in gpuckpt's chunk size (how the
    reader copies); ``floor_preadv_crc32c_prefaulted_{N}threads_s``, the verified reader's
    own method with nothing else: the file cut in ``threads`` equal parts, each read by its own
    thread in that chunk size, each chunk checksummed right after it is read; and
    ``floor_mmap_crc32c_prefaulted_{N}threads_s``, the one other way to read the file, by
    mapping it: each thread maps its part anew (the page cache's pages are mapped in as they are
    touched, which the memcpy floor's standing mapping never pays), checksums each chunk from the
    mapping and copies it out. A context manager: the mapping and the file are closed at its
    end."""

    def __init__(self, data_path: str, threads: int = 2) -> None:
        self.threads = threads
        self.size = os.path.getsize(data_path)
        self._fd = os.open(data_path, os.O_RDONLY)
        self._mapped = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
        self._source: np.ndarray | None = np.frombuffer(self._mapped, np.uint8)
        self._prefaulted = np.ones(self.size, np.uint8)
        self.memcpy()  # map every page of the file once, so only the copy is timed

    def memcpy(self) -> None:
        np.copyto(self._prefaulted, self._source)

    def pread(self) -> None:
        view = memoryview(self._prefaulted)
        for start in range(0, self.size, reader.CHUNK_BYTES):
            os.preadv(self._fd, [view[start : start + reader.CHUNK_BYTES]], start)

    def _pread_crc(self, start: int, stop: int) -> None:
        view = memoryview(self._prefaulted)
        crc = 0
        for offset in range(start, stop, reader.CHUNK_BYTES):
            chunk = view[offset : min(stop, offset + reader.CHUNK_BYTES)]
            os.preadv(self._fd, [chunk], offset)
            crc = crc32c(chunk, crc)

    def pread_crc_threads(self) -> None:
        self._in_threads(self._pread_crc)

    def _mmap_crc(self, start: int, stop: int) -> None:
        # mmap offsets must be page-aligned: each part starts on a page boundary (see _parts)
        mapped = mmap.mmap(self._fd, stop - start, prot=mmap.PROT_READ, offset=start)
        source = np.frombuffer(mapped, np.uint8)
        crc = 0
        for offset in range(0, stop - start, reader.CHUNK_BYTES):
            chunk = source[offset : offset + reader.CHUNK_BYTES]
            crc = crc32c(chunk, crc)
            np.copyto(self._prefaulted[start + offset : start + offset + chunk.size], chunk)
        del source, chunk  # the exports of the mapping, so it can close
        mapped.close()

    def _parts(self) -> list[tuple[int, int]]:
        share = -(-self.size // self.threads)
        share = -(-share // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        return [(start, min(self.size, start + share)) for start in range(0, self.size, share)]

    def _in_threads(self, work: Callable[[int, int], None]) -> None:
        workers = [threading.Thread(target=work, args=part) for part in self._parts()]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def mmap_crc_threads(self) -> None:
        self._in_threads(self._mmap_crc)

    def timings(self) -> dict[str, Callable[[], None]]:
        return {
            "floor_memcpy_prefaulted_s": self.memcpy,
            "floor_preadv_prefaulted_1thread_s": self.pread,
            f"floor_preadv_crc32c_prefaulted_{self.threads}threads_s": self.pread_crc_threads,
            f"floor_mmap_crc32c_prefaulted_{self.threads}threads_s": self.mmap_crc_threads,
        }

    def __enter__(self) -> CopyFloors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._source = None  # drop the export of the mapping so it can close
        self._mapped.close()
        os.close(self._fd)
