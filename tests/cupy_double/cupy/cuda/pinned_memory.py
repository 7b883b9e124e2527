"""cupy.cuda.pinned_memory (cupy/cuda/pinned_memory.pyx): page-locked host memory and its pool."""

from __future__ import annotations

import ctypes
import threading
import weakref

from .. import _machine


class PinnedMemory:
    """A cudaHostAlloc block (here: a host buffer registered as page-locked with the machine)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._block = _machine.host_alloc(size)
        self.ptr = int(self._block.ctypes.data) if size else 0

    def __del__(self) -> None:  # cudaFreeHost
        _machine.host_free(getattr(self, "ptr", 0))


class PooledPinnedMemory:
    """pinned_memory.pyx, PooledPinnedMemory: goes back to its pool's free list when the last
    reference goes (``__del__ = free``)."""

    def __init__(self, mem: PinnedMemory, pool: PinnedMemoryPool) -> None:
        self.mem, self.ptr, self.size = mem, mem.ptr, mem.size
        self._pool = weakref.ref(pool)

    def __del__(self) -> None:
        pool = self._pool()
        if pool is not None and self.ptr:
            pool._free(self.mem)
        self.ptr = 0


_pointer_types: dict[int, type] = {}


def _pointer(mem: PooledPinnedMemory | PinnedMemory) -> PinnedMemoryPointer:
    """pinned_memory.pyx, PinnedMemoryPointer: exports the buffer protocol over the whole block
    (``__getbuffer__``, length ``size()``) and is kept alive by whoever holds the buffer, so a
    numpy array made with ``numpy.frombuffer`` keeps the pinned block out of the pool."""
    size = max(mem.size, 1)
    kind = _pointer_types.get(size)
    if kind is None:
        kind = _pointer_types[size] = type("PinnedMemoryPointer", (ctypes.c_uint8 * size,), {})
    pointer = kind.from_address(mem.ptr) if mem.ptr else kind()
    pointer.mem = mem
    pointer.ptr = mem.ptr
    return pointer  # type: ignore[no-any-return]


PinnedMemoryPointer = object  # the type of what alloc_pinned_memory returns (one class per size)


class PinnedMemoryPool:
    """pinned_memory.pyx, PinnedMemoryPool.malloc: the size is rounded up to 512 bytes, then to
    a power of two (``internal.clp2``); a free block of exactly that size is reused, else a new
    one is allocated. ``free`` puts a block back on the free list of its size."""

    def __init__(self) -> None:
        self._free_blocks: dict[int, list[PinnedMemory]] = {}
        self._in_use: set[int] = set()
        self._lock = threading.Lock()
        self._unit = 512

    def malloc(self, size: int) -> PinnedMemoryPointer:
        if size == 0:
            return _pointer(PinnedMemory(0))
        size = -(-size // self._unit) * self._unit
        size = 1 << (size - 1).bit_length()  # clp2: the next power of two
        with self._lock:
            free = self._free_blocks.get(size)
            mem = free.pop() if free else PinnedMemory(size)
            self._in_use.add(id(mem))
        return _pointer(PooledPinnedMemory(mem, self))

    def _free(self, mem: PinnedMemory) -> None:
        self._in_use.discard(id(mem))
        self._free_blocks.setdefault(mem.size, []).append(mem)

    def free_all_blocks(self) -> None:
        self._free_blocks.clear()

    def n_free_blocks(self) -> int:
        return sum(len(blocks) for blocks in list(self._free_blocks.values()))


_default_pool: PinnedMemoryPool | None = None


def default_pool() -> PinnedMemoryPool:
    global _default_pool
    if _default_pool is None:
        _default_pool = PinnedMemoryPool()
    return _default_pool


def alloc_pinned_memory(size: int) -> PinnedMemoryPointer:
    """pinned_memory.pyx, alloc_pinned_memory: the current allocator, CuPy's default pinned pool
    (cupy/__init__.py installs it)."""
    return default_pool().malloc(size)
