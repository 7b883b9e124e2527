"""cupy.cuda.memory (cupy/cuda/memory.pyx): device pointers and the stream-ordered memory pool."""

from __future__ import annotations

import gc
import threading
from typing import Any

from .. import _machine
from .._machine import CUDARuntimeError, errorMemoryAllocation
from . import stream as stream_module

ALLOCATION_UNIT_SIZE = 512  # memory.pyx: _round_size rounds every request up to this


class OutOfMemoryError(MemoryError):
    """memory.pyx, OutOfMemoryError(size, total, limit)."""

    def __init__(self, size: int, total: int, limit: int = 0) -> None:
        if limit == 0:
            msg = f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes)."
        else:
            msg = (
                f"Out of memory allocating {size:,} bytes "
                f"(allocated so far: {total:,} bytes, limit set to: {limit:,} bytes)."
            )
        super().__init__(msg)


class _Chunk:
    """memory.pyx, _Chunk: a piece of one cudaMalloc block, in the arena of the stream that was
    current when the block was allocated (split pieces stay in that arena)."""

    __slots__ = ("block", "ptr", "size", "prev", "next", "in_use", "arena")

    def __init__(self, block: int, ptr: int, size: int, arena: int) -> None:
        self.block, self.ptr, self.size, self.arena = block, ptr, size, arena
        self.prev: _Chunk | None = None
        self.next: _Chunk | None = None
        self.in_use = False


class Memory:
    """A pooled allocation (memory.pyx, PooledMemory): its chunk goes back to the pool when the
    last reference goes (``__del__``), whatever work is still queued on it."""

    def __init__(self, pool: SingleDeviceMemoryPool | None, chunk: _Chunk | None, device_id: int) -> None:
        self.pool, self.chunk, self.device_id = pool, chunk, device_id
        self.ptr = chunk.ptr if chunk is not None else 0
        self.size = chunk.size if chunk is not None else 0

    def __del__(self) -> None:
        if self.pool is not None and self.chunk is not None:
            self.pool._free(self.chunk)
            self.chunk = None


class MemoryPointer:
    def __init__(self, mem: Memory, offset: int) -> None:
        self.mem = mem
        self.ptr = mem.ptr + offset if mem.ptr else 0
        self.device_id = mem.device_id

    def __add__(self, offset: int) -> MemoryPointer:
        return MemoryPointer(self.mem, self.ptr - self.mem.ptr + offset)

    def __int__(self) -> int:
        return self.ptr


class SingleDeviceMemoryPool:
    """memory.pyx, SingleDeviceMemoryPool, kept to the rules gpuckpt meets:

    * ``_malloc``: the request is served best-fit from the arena of the current stream first
      (``arena.get_chunk``, splitting a larger chunk), and only when no cached chunk fits does it
      call ``_try_malloc``, which checks ``set_limit``: cached chunks are served whatever the limit.
    * ``free``: a chunk goes straight back to its arena (``arena.insert_chunk``, merged with free
      neighbours), ready for the next allocation on that stream; when the pool's lock is busy it
      is queued as a pending free (``add_pending_free_atomic``) and handled at the next malloc.
    * ``_try_malloc``: over the limit (or when cudaMalloc fails) it frees the cached blocks, runs
      ``gc.collect()``, frees them again, and raises OutOfMemoryError(size, total, limit).
    * ``free_all_blocks``: releases every cached chunk that is a whole cudaMalloc block.
    """

    def __init__(self, device_id: int) -> None:
        self._device_id = device_id
        self._arenas: dict[int, list[_Chunk]] = {}  # stream handle -> free chunks
        self._blocks: dict[int, int] = {}  # cudaMalloc'd block ptr -> size
        self._in_use_bytes = 0
        self._limit = 0
        self._lock = threading.Lock()
        self._pending: list[_Chunk] = []

    # -- allocation
    def malloc(self, size: int) -> MemoryPointer:
        rounded = -(-size // ALLOCATION_UNIT_SIZE) * ALLOCATION_UNIT_SIZE
        if rounded == 0:
            return MemoryPointer(Memory(None, None, self._device_id), 0)
        arena = stream_module.get_current_stream_ptr()  # memory.pyx: _get_stream_identifier
        with self._lock:
            self._free_pending()
            chunk = self._get_chunk(arena, rounded)
        if chunk is None:
            ptr = self._try_malloc(rounded)
            chunk = _Chunk(ptr, ptr, rounded, arena)
        chunk.in_use = True
        with self._lock:
            self._in_use_bytes += chunk.size
        return MemoryPointer(Memory(self, chunk, self._device_id), 0)

    def _get_chunk(self, arena: int, size: int) -> _Chunk | None:
        free = self._arenas.get(arena, [])
        fitting = [c for c in free if c.size >= size]
        if not fitting:
            return None
        chunk = min(fitting, key=lambda c: (c.size, c.ptr))
        free.remove(chunk)
        if chunk.size > size:  # _Arena.get_chunk: split, the rest stays cached
            rest = _Chunk(chunk.block, chunk.ptr + size, chunk.size - size, arena)
            rest.prev, rest.next = chunk, chunk.next
            if chunk.next is not None:
                chunk.next.prev = rest
            chunk.next, chunk.size = rest, size
            free.append(rest)
        return chunk

    def _try_malloc(self, size: int) -> int:
        if not self._within_limit(size):
            self.free_all_blocks()
            if not self._within_limit(size):
                gc.collect()
                self.free_all_blocks()
                if not self._within_limit(size):
                    raise OutOfMemoryError(size, self.total_bytes(), self._limit)
        heap = _machine.heap(self._device_id)
        try:
            ptr = heap.malloc(size)
        except CUDARuntimeError as exc:
            if exc.status != errorMemoryAllocation:
                raise
            self.free_all_blocks()
            gc.collect()
            gc.collect()
            self.free_all_blocks()
            try:
                ptr = heap.malloc(size)
            except CUDARuntimeError:
                raise OutOfMemoryError(size, self.total_bytes(), self._limit) from None
        with self._lock:
            self._blocks[ptr] = size
        return ptr

    def _within_limit(self, size: int) -> bool:
        return self._limit == 0 or self.total_bytes() + size <= self._limit

    # -- freeing
    def _free(self, chunk: _Chunk) -> None:
        if self._lock.acquire(blocking=False):
            try:
                self._free_pending()
                self._insert(chunk)
            finally:
                self._lock.release()
        else:
            self._pending.append(chunk)  # list.append is atomic

    def _free_pending(self) -> None:
        while self._pending:
            self._insert(self._pending.pop())

    def _insert(self, chunk: _Chunk) -> None:
        self._in_use_bytes -= chunk.size
        chunk.in_use = False
        free = self._arenas.setdefault(chunk.arena, [])
        for neighbour in (chunk.prev, chunk.next):
            if neighbour is not None and not neighbour.in_use and neighbour in free:
                free.remove(neighbour)
                first, second = (neighbour, chunk) if neighbour is chunk.prev else (chunk, neighbour)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                chunk = first
        free.append(chunk)

    def free_all_blocks(self, stream: Any = None) -> None:
        heap = _machine.heap(self._device_id)
        with self._lock:
            self._free_pending()
            for free in self._arenas.values():
                for chunk in [c for c in free if c.prev is None and c.next is None]:
                    free.remove(chunk)
                    del self._blocks[chunk.ptr]
                    heap.free(chunk.ptr)

    # -- accounting
    def used_bytes(self) -> int:
        with self._lock:
            self._free_pending()
            return self._in_use_bytes

    def total_bytes(self) -> int:
        return sum(self._blocks.values())

    def free_bytes(self) -> int:
        return self.total_bytes() - self.used_bytes()

    def n_free_blocks(self) -> int:
        with self._lock:
            self._free_pending()
            return sum(len(free) for free in self._arenas.values())

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        if fraction is not None:
            size = int(_machine.memory_bytes * fraction)
        self._limit = int(size or 0)

    def get_limit(self) -> int:
        return self._limit


class MemoryPool:
    """memory.pyx, MemoryPool: one SingleDeviceMemoryPool per device; every method acts on the
    pool of the calling thread's current device."""

    def __init__(self) -> None:
        self._pools = [SingleDeviceMemoryPool(i) for i in range(_machine.device_count)]

    def device_pool(self) -> SingleDeviceMemoryPool:
        return self._pools[_machine.current_device()]

    def malloc(self, size: int) -> MemoryPointer:
        return self.device_pool().malloc(size)

    def free_all_blocks(self, stream: Any = None) -> None:
        self.device_pool().free_all_blocks(stream)

    def n_free_blocks(self) -> int:
        return self.device_pool().n_free_blocks()

    def used_bytes(self) -> int:
        return self.device_pool().used_bytes()

    def free_bytes(self) -> int:
        return self.device_pool().free_bytes()

    def total_bytes(self) -> int:
        return self.device_pool().total_bytes()

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        self.device_pool().set_limit(size, fraction)

    def get_limit(self) -> int:
        return self.device_pool().get_limit()


_default_pool: MemoryPool | None = None


def default_pool() -> MemoryPool:
    global _default_pool
    if _default_pool is None:
        _default_pool = MemoryPool()
    return _default_pool


def alloc(size: int) -> MemoryPointer:
    """memory.pyx, alloc: the current allocator, CuPy's default memory pool."""
    return default_pool().malloc(size)
