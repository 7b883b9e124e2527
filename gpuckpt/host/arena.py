"""Memory for a restore's large new arrays: one anonymous mapping per restore, huge pages advised.

Why not ``numpy.empty``: what a fresh array costs depends on where malloc finds it. glibc serves
blocks above its mmap threshold with a new mapping, but that threshold grows (up to 32 MiB) each
time a mapped block is freed, and below it the block comes from the heap, whose state depends on
everything the process did before. Faulting memory in is the expensive part, and on this project's
machine (a 2-core VM, transparent huge pages on ``madvise``) it costs 0.40 to 0.59 s per GiB in
4 KiB pages against 0.05 to 0.08 s in 2 MiB pages (``benchmarks/warm_start.py`` measures both;
memory the VM's host has not backed yet costs far more, either way). numpy advises huge pages only
for blocks it gets from malloc at 4 MiB and over, and only on the part that happens to be aligned;
a heap block is often not. Issue 13 saw a 1 GiB restore take 2 to 3 times as long in a process
that had first built 100,000 small objects. (The benchmark's ten runs since, on a busy machine:
0.74 to 1.27 times with numpy's allocator, 0.85 to 1.93 with this one, eight of them under 1.22;
the effect did not reproduce, and noise of that size hides any smaller one.)

What this does instead: the tensors at or above :data:`MIN_BYTES` that one restore creates share one
private anonymous mapping, its start aligned to 2 MiB and ``MADV_HUGEPAGE`` advised, each tensor at
its own 4 KiB-aligned offset. Nothing touches it beforehand: the reader threads fault it in, huge
page by huge page, as their ``preadv`` copies land, so the kernel's zeroing is spread over them.

Why one mapping and not one per tensor: a tensor's own mapping ends in a partial huge page, which
the kernel faults in 4 KiB pages; over the 185 tensors of the benchmark's 1 GiB checkpoint that is
about 90 MiB in 4 KiB faults, some 0.035 s at 0.4 s per GiB: half the time of the whole copy.
Rounding each mapping up to 2 MiB instead would keep up to 2 MiB of memory per tensor that holds
nothing.

The price, and when memory goes back to the system:

* each array is a view (``flags.owndata`` is False) whose base keeps the mapping alive; it is
  writeable and outlives the checkpoint, like any array;
* when the last view of one tensor dies its pages are handed back (``MADV_DONTNEED``) at once,
  whatever its neighbours do; when the last tensor of the restore dies the mapping is unmapped.
  So memory returns tensor by tensor, as with separate allocations; what stays reserved until the
  last tensor dies is address space only (about 2 MiB more than the tensors);
* up to 4 KiB of padding per tensor (under 0.4% at the 1 MiB minimum), and a partly used huge
  page at the mapping's end (up to 2 MiB of memory per restore while its last tensor lives);
* with the kernel's ``defrag`` setting on ``madvise`` (the default), a fault may compact memory
  when no free huge page is left, which is slower for that fault; with transparent huge pages
  ``never`` the mapping gets 4 KiB pages and a restore pays for every one of them.

Smaller tensors, strings, and every platform without ``mmap.madvise`` use ``numpy.empty``.
"""

from __future__ import annotations

import math
import mmap
import weakref
from collections.abc import Sequence

import numpy as np

MIN_BYTES = 1 << 20  #: tensors at least this large come from the mapping
PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
_HAVE_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _release(mapping: mmap.mmap, offset: int, length: int) -> None:
    """The last view of one tensor died: give its pages back (the mapping stays while others live)."""
    try:
        mapping.madvise(mmap.MADV_DONTNEED, offset, length)
    except (OSError, ValueError):
        pass  # the mapping is being torn down (interpreter exit): munmap frees it anyway


def new_arrays(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Uninitialised C-contiguous writeable arrays of the given shapes and dtypes, in one mapping.

    Pages are faulted in by whoever writes them first (the reader threads). Each array's base is
    a per-tensor ``memoryview`` of the mapping; see the module's notes for when memory is freed.
    """
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    if not _HAVE_MADVISE or not any(sizes):
        return [np.empty(shape, dtype) for shape, dtype in specs]
    offsets = []
    total = 0
    for size in sizes:
        offsets.append(total)
        total += _round_up(size, PAGE)
    # A huge page more than needed, so the first tensor can start on a 2 MiB boundary: the kernel
    # does not align anonymous mappings itself here, and an unaligned start would put every
    # boundary huge page partly outside the mapping (4 KiB faults). The slack is never touched.
    length = _round_up(total, HUGE_PAGE) + HUGE_PAGE
    try:
        mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # address space or overcommit limits: numpy's allocator says MemoryError if it must
        return [np.empty(shape, dtype) for shape, dtype in specs]
    if _HUGEPAGE is not None:
        try:
            mapping.madvise(_HUGEPAGE)
        except OSError:
            pass  # a kernel without transparent huge pages: 4 KiB pages it is
    whole = memoryview(mapping)
    probe = np.frombuffer(whole, np.uint8, 1)
    head = -probe.ctypes.data % HUGE_PAGE
    del probe
    arrays = []
    for (shape, dtype), offset, size in zip(specs, offsets, sizes, strict=True):
        if size == 0:
            arrays.append(np.empty(shape, dtype))
            continue
        flat = np.frombuffer(whole[head + offset : head + offset + size], dtype)
        # LIFETIME: numpy keeps the buffer it took from the slice (a memoryview of its own) as
        # the base of ``flat`` and of every view of it; the finalizer, holding the mapping, runs
        # when that base is freed. The mapping is unmapped once the last finalizer has run.
        weakref.finalize(flat.base, _release, mapping, head + offset, _round_up(size, PAGE)).atexit = False
        arrays.append(flat.reshape(shape))
    whole.release()
    return arrays


def owner_of(array: np.ndarray) -> object:
    """The object that owns ``array``'s memory: itself, a base array that owns it, or the
    per-tensor view of a restore's mapping (for tests and the curious)."""
    base: object = array
    while isinstance(base, np.ndarray) and not base.flags.owndata and base.base is not None:
        base = base.base
    return base
