"""A CUDA GPU behind the :class:`gpuckpt.device.Device` interface, with CuPy.

Pinned host memory from ``cupy.cuda.alloc_pinned_memory``; copies with ``cudaMemcpyAsync`` on
non-blocking streams; events from ``Stream.record``; the conversion kernels of kernels/convert.cu
loaded once per device by :func:`gpuckpt.cuda.kernels.load_kernels` (the shipped fatbin, NVRTC as
the visible fallback).

Every CUDA call runs with this device current (``with cupy.cuda.Device(index)``): the calling
thread may be a reader thread, whose current device is 0, and CUDA binds events, kernel
launches and module loads to the current device.
"""

from __future__ import annotations

import math
import threading
from typing import Any, ClassVar

import cupy
import numpy as np

from ..errors import DeviceUnavailableError, UnsupportedError
from .kernels import load_kernels

_BLOCK = 256
_MAX_GRID = 65535 * 4


_HELD: dict[np.dtype, np.dtype] = {}  # dtype -> the dtype a CuPy array of it has (array_dtype)
_NPY_USERDEF = 256  # numpy/ndarraytypes.h: the first type number of a type NumPy does not define
_HELD_LOCK = threading.Lock()


class CudaEvent:
    """A CUDA event with the interface the pipeline uses (``synchronize``, ``query``)."""

    __slots__ = ("event",)

    def __init__(self, event: Any) -> None:
        self.event = event

    def synchronize(self) -> None:
        self.event.synchronize()

    def query(self) -> bool:
        return bool(self.event.done)


class CudaDevice:
    """One GPU. Use :meth:`get`: one instance, and one compiled kernel module, per device."""

    _instances: ClassVar[dict[int, CudaDevice]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, index: int) -> None:
        count = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= index < count:
            raise DeviceUnavailableError(f"device 'cuda:{index}': this machine has {count} CUDA device(s)")
        self.index = index
        self.name = f"cuda:{index}"
        self._module: Any = None
        self.kernels_from: str | None = None  #: "fatbin" or "nvrtc" once the kernels are loaded
        self._functions: dict[str, Any] = {}  # kernel name -> RawKernel (it caches per device)
        self._pinned: dict[int, Any] = {}  # id(buffer) -> the PinnedMemoryPointer keeping it alive

    @classmethod
    def get(cls, index: int) -> CudaDevice:
        with cls._lock:
            if index not in cls._instances:
                cls._instances[index] = cls(index)
            return cls._instances[index]

    def _device(self) -> Any:
        return cupy.cuda.Device(self.index)

    def array_dtype(self, dtype: np.dtype) -> np.dtype:
        """``dtype`` if CuPy can make arrays of it and knows it for what it is, else ``uint8``
        (``uint16``, ...) of its width.

        CuPy makes new arrays only of types it has a C type for (cupy/_core/_dtype.pyx,
        check_supported_dtype): not float8, int4, int2, float4. Such a tensor arrives as its bytes,
        which a framework holding the type reinterprets (``torch.from_dlpack(a).view(...)``);
        ``dtype=`` converts float8 on the device instead. Asked of CuPy itself, with an empty
        array (no memory is allocated for it), so the rule is CuPy's whatever its version. But
        CuPy's check passes any type whose type character is one of NumPy's sixteen basic ones
        (v14.2.0, check_supported_dtype: ``dtype.type in all_type_chars_b``), and the characters
        of ml_dtypes' own types are arbitrary: float8_e4m3b11fnuz's is ``'L'``, uint64's, which
        CuPy's kernels would take for an 8-byte integer. So a type NumPy does not define itself
        (a type number of NPY_USERDEF, 256, or more) is held only where CuPy names a C type for
        it (cupy/_core/_scalar.pyx, get_typename: bfloat16 alone)."""
        dtype = np.dtype(dtype)
        with _HELD_LOCK:
            held = _HELD.get(dtype)
        if held is None:
            held = dtype
            try:
                if dtype.num >= _NPY_USERDEF and dtype.name != "bfloat16":
                    raise TypeError(f"CuPy would take {dtype} for the type of its character {dtype.char!r}")
                with self._device():
                    cupy.empty((0,), dtype=dtype)
            except (TypeError, ValueError):
                held = np.dtype(f"u{dtype.itemsize}")
            with _HELD_LOCK:
                _HELD[dtype] = held
        return held

    def _check_holds(self, dtype: np.dtype) -> None:
        """One rule for both allocation modes: ``carve`` makes its arrays with ``view``, which CuPy
        does not check (core.pyx, view: check_support=False), so both ask array_dtype."""
        if self.array_dtype(dtype) != dtype:
            raise UnsupportedError(
                f"CuPy cannot hold {dtype} arrays: such tensors arrive as {self.array_dtype(dtype)} arrays of "
                "their bytes, or restore them with dtype= (float16, bfloat16, float32, float64)"
            )

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        self._check_holds(dtype)
        with self._device():
            return cupy.empty(shape, dtype=dtype)

    def holds(self, array: Any) -> bool:
        return isinstance(array, cupy.ndarray) and int(array.device.id) == self.index

    def byte_view(self, array: Any) -> Any:
        if not array.flags.c_contiguous:  # reshape would copy: the bytes would land in a temporary
            raise UnsupportedError("only C-contiguous device arrays can be filled or read as bytes")
        return array.reshape(-1).view(cupy.uint8)

    def carve(self, arena: Any, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        self._check_holds(dtype)
        return arena[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def pinned(self, nbytes: int) -> np.ndarray:
        memory = cupy.cuda.alloc_pinned_memory(nbytes)
        buffer = np.frombuffer(memory, np.uint8, nbytes)
        self._pinned[id(buffer)] = memory  # LIFETIME: the pinned block lives until release_pinned
        return buffer

    def release_pinned(self, buffer: np.ndarray) -> None:
        self._pinned.pop(id(buffer), None)

    @property
    def pinned_live(self) -> int:
        """Pinned buffers handed out and not released: zero whenever no restore runs (leak checks)."""
        return len(self._pinned)

    def new_stream(self) -> Any:
        with self._device():
            return cupy.cuda.Stream(non_blocking=True)

    def close_stream(self, stream: Any) -> None:
        pass  # CuPy destroys a stream when its last reference goes

    def copy_to_device(self, dst: Any, dst_offset: int, src: np.ndarray, nbytes: int, stream: Any) -> None:
        if nbytes:
            with self._device():
                cupy.cuda.runtime.memcpyAsync(
                    dst.data.ptr + dst_offset, src.ctypes.data, nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
                )

    def copy_to_host(self, dst: np.ndarray, src: Any, src_offset: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            with self._device():
                cupy.cuda.runtime.memcpyAsync(
                    dst.ctypes.data, src.data.ptr + src_offset, nbytes, cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr
                )

    def record(self, stream: Any) -> CudaEvent:
        # Stream.record makes its Event on the calling thread's current device, and an event
        # recorded on another device's stream fails (cudaErrorInvalidResourceHandle): reader
        # threads start on device 0, so the event is made inside this device.
        with self._device():
            return CudaEvent(stream.record())

    def record_current(self) -> CudaEvent:
        """An event on the calling thread's current stream of this device (CuPy keeps a current
        stream per thread and per device; the null stream unless the caller is in ``with s:``)."""
        with self._device():
            return CudaEvent(cupy.cuda.get_current_stream().record())

    def wait_event(self, stream: Any, event: CudaEvent) -> None:
        with self._device():
            stream.wait_event(event.event)

    def _function(self, name: str) -> Any:
        """Kernel ``name``, looked up with this device current: RawModule loads its module on the
        device current at the lookup (once per device), so a lookup elsewhere would load it on
        whatever device the calling thread has (GPU 0 for a reader thread)."""
        function = self._functions.get(name)
        if function is not None:  # every launch after the first: no lock
            return function
        with self._lock, self._device():  # load_kernels loads on the current device
            if self._module is None:
                self._module, self.kernels_from = load_kernels(cupy)
            function = self._functions.get(name)
            if function is None:
                function = self._functions[name] = self._module.get_function(f"gpuckpt_{name}")
            return function

    def _launch(self, name: str, args: tuple[Any, ...], n: int, stream: Any) -> None:
        if n == 0:
            return
        grid = min(_MAX_GRID, (n + _BLOCK - 1) // _BLOCK)
        kernel = self._function(name)
        with self._device(), stream:  # a RawKernel launches on the current stream
            kernel((grid,), (_BLOCK,), args + (np.uint64(n),))

    def convert(self, kernel: str, src: Any, dst: Any, stream: Any) -> None:
        source_width = src.size // max(dst.size, 1) if dst.size else 1
        typed = src.view(f"u{source_width}") if source_width > 1 else src
        self._launch(kernel, (typed, self.byte_view(dst)), dst.size, stream)

    def byteswap(self, width: int, array: Any, stream: Any) -> None:
        typed = array.view(f"u{width}")
        self._launch(f"swap{width}", (typed,), typed.size, stream)

    def clear_high_bits(self, array: Any, bits: int, stream: Any) -> None:
        if array.size:
            with self._device(), stream:  # an element-wise kernel: it runs on the current stream
                array &= (1 << bits) - 1

    def place(
        self, full: Any, region: tuple[tuple[int, int], ...], part: Any, shape: tuple[int, ...], stream: Any
    ) -> None:
        with self._device(), stream:  # the strided copy kernel runs on the current stream
            full[tuple(slice(a, b) for a, b in region)] = part.view(full.dtype).reshape(shape)

    def free_bytes(self) -> int:
        with self._device():
            free, _total = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            available = int(free) + int(pool.free_bytes())
            limit = int(pool.get_limit())  # 0: no limit set
        return min(available, limit - int(pool.used_bytes())) if limit else available
