"""A CuPy-faithful test double: the part of CuPy 14 that gpuckpt/cuda uses, on the host.

Installed by ``cupy_double.install()`` for the GPU tests when no GPU is present, so that the real
``gpuckpt.cuda.device.CudaDevice`` runs in CI. Each rule it keeps names where CuPy (v14.2.0
sources) or the CUDA documentation states it. What the machine underneath does (device memory,
stream workers, knobs for the tests) is in ``_machine``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from . import _dlpack, _machine, cuda
from .cuda import memory as _memory
from .cuda import runtime as _runtime
from .cuda import stream as _stream

__version__ = "14.2.0+double"

bool_, int8, int16, int32, int64 = np.bool_, np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
float16, float32, float64, complex64, complex128 = np.float16, np.float32, np.float64, np.complex64, np.complex128

_ALWAYS = "?bhilqBHILQefdFD"  # cupy/_core/_dtype.pyx: all_type_chars


def _has_bfloat16() -> bool:
    """cupy/_core/_scalar.pyx, _setup_type_dict: ml_dtypes' bfloat16 gets a C type name only with
    NumPy >= 2.1.2 and ml_dtypes importable."""
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return tuple(int(p) for p in re.findall(r"\d+", np.__version__)[:3]) >= (2, 1, 2)


def _check_supported_dtype(dtype: np.dtype) -> None:
    """cupy/_core/_dtype.pyx, check_supported_dtype: big-endian is refused; the 16 basic types
    pass; so does a plain void or structured type without object fields; anything else needs a C
    type name (_scalar.pyx, get_typename: only bfloat16 among ml_dtypes' types has one), else
    ``ValueError('Unsupported dtype ...')``. So float8, int4/uint4, int2/uint2, float4, strings and
    objects are refused."""
    if dtype.byteorder == ">":
        raise ValueError(f"Unsupported dtype {dtype} with big-endian byte-order")
    if dtype.char in _ALWAYS:
        return
    if dtype.type is np.void and dtype.subdtype is None and dtype.itemsize != 0:
        if dtype.hasobject:
            raise ValueError(
                f"Unsupported dtype {dtype} because it contains references which cannot be supported by CuPy."
            )
        return
    if dtype.name == "bfloat16" and _has_bfloat16():
        return
    raise ValueError(f"Unsupported dtype {dtype}")


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


class _Flags:
    def __init__(self, c: bool, f: bool) -> None:
        self.c_contiguous, self.f_contiguous = c, f

    def __getitem__(self, key: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous}[key]


def _spec_view(spec: tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]) -> np.ndarray:
    """A host view of device memory described by plain numbers (what queued work holds)."""
    ptr, shape, strides, dtype = spec
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    extent = sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + dtype.itemsize
    raw = _machine.device_bytes(ptr, extent)
    return np.ndarray(shape, dtype, buffer=raw, offset=0, strides=strides)


def _current_worker() -> _machine.Worker:
    """Kernels and CuPy's element-wise operations run on the calling thread's current stream
    (cupy/cuda/function.pyx, _launch: ``stream_module.get_current_stream_ptr()``). A launch on a
    stream of another device fails (CUDA C++ Programming Guide, "Stream and Event Behavior": "A
    kernel launch will fail if it is issued to a stream that is not associated to the current
    device")."""
    worker = _machine.worker(_stream.get_current_stream_ptr())
    if worker.device != _machine.current_device():
        raise _runtime.CUDARuntimeError(_runtime.errorInvalidResourceHandle, "kernel launch on another device's stream")
    return worker


class ndarray:
    """cupy/_core/core.pyx, ndarray (the part gpuckpt and its tests use)."""

    def __init__(
        self, shape: Any, dtype: Any = float, memptr: Any = None, strides: Any = None, order: str = "C"
    ) -> None:
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        # core.pyx, _ndarray_base._init: get_dtype_with_itemsize(dtype, check_support=(memptr is None)):
        # new memory is only made for supported dtypes; wrapping existing memory is not checked.
        if memptr is None:
            _check_supported_dtype(dtype)
        self._shape = shape
        self.dtype = dtype
        self._strides = tuple(strides) if strides is not None else _c_strides(shape, dtype.itemsize)
        self.data = memptr if memptr is not None else _memory.alloc(math.prod(shape) * dtype.itemsize)
        self.base: ndarray | None = None

    @classmethod
    def _make_view(
        cls, base: ndarray, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: np.dtype
    ) -> ndarray:
        view = cls.__new__(cls)
        view._shape, view._strides, view.dtype = shape, strides, dtype
        view.data = _memory.MemoryPointer(base.data.mem, base.data.ptr - base.data.mem.ptr + offset)
        view.base = base if base.base is None else base.base
        return view

    # -- attributes
    shape = property(lambda self: self._shape)
    strides = property(lambda self: self._strides)
    ndim = property(lambda self: len(self._shape))
    size = property(lambda self: math.prod(self._shape))
    itemsize = property(lambda self: self.dtype.itemsize)
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    @property
    def device(self) -> cuda.Device:
        return cuda.Device(self.data.device_id)

    @property
    def flags(self) -> _Flags:
        return _Flags(
            self._contiguous(self._shape, self._strides), self._contiguous(self._shape[::-1], self._strides[::-1])
        )

    def _contiguous(self, shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
        if math.prod(shape) == 0:
            return True
        step = self.dtype.itemsize
        for extent, stride in zip(reversed(shape), reversed(strides), strict=True):
            if extent != 1 and stride != step:
                return False
            step *= extent
        return True

    def _spec(self) -> tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]:
        return (self.data.ptr, self._shape, self._strides, self.dtype)

    def __len__(self) -> int:
        return self._shape[0]

    def __repr__(self) -> str:
        return f"<cupy double ndarray {self.dtype}{list(self._shape)} on device {self.data.device_id}>"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        # core.pyx, __array__: implicit conversion to NumPy is refused.
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        stream_ptr = _stream.get_current_stream_ptr()
        return {
            "shape": self._shape,
            "typestr": self.dtype.str,
            "descr": [("", self.dtype.str)],
            "data": (self.data.ptr, False),
            "strides": None if self.flags.c_contiguous else self._strides,
            "version": 3,
            "stream": stream_ptr or 1,  # core.pyx: 0 is disallowed by CAI v3, the legacy stream is 1
        }

    def __dlpack__(
        self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None
    ) -> _dlpack.Capsule:
        """core.pyx, _ndarray_base.__dlpack__: see ``_dlpack.ndarray_dlpack`` for the rules (the
        stream order it establishes, the versioned struct, the dtypes it exports)."""
        return _dlpack.ndarray_dlpack(self, stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        """core.pyx, __dlpack_device__ (dlpack.pyx, get_dlpack_device): kDLCUDA (2) and the
        array's device id (kDLCUDAManaged for managed memory, which the double has none of)."""
        return (_dlpack.kDLCUDA, self.data.device_id)

    # -- views
    def view(self, dtype: Any = None) -> ndarray:
        """core.pyx, _ndarray_base.view: ``get_dtype_with_itemsize(dtype, check_support=False)``,
        so any dtype is accepted; a different item size needs a contiguous last axis whose bytes
        it divides."""
        if dtype is None:
            return ndarray._make_view(self, 0, self._shape, self._strides, self.dtype)
        dtype = np.dtype(dtype)
        if dtype.itemsize == self.dtype.itemsize:
            return ndarray._make_view(self, 0, self._shape, self._strides, dtype)
        if not self._shape:
            raise ValueError("Changing the dtype of a 0d array is only supported if the itemsize is unchanged")
        if self._shape[-1] != 1 and self.size != 0 and self._strides[-1] != self.dtype.itemsize:
            raise ValueError("To change to a dtype of a different size, the last axis must be contiguous")
        last = self._shape[-1] * self.dtype.itemsize
        if last % dtype.itemsize:
            raise ValueError(
                "When changing to a larger dtype, its size must be a divisor of the total size in bytes "
                "of the last axis of the array."
            )
        shape = self._shape[:-1] + (last // dtype.itemsize,)
        return ndarray._make_view(self, 0, shape, self._strides[:-1] + (dtype.itemsize,), dtype)

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        """core.pyx, reshape: a view when the new shape can share the memory (here: when the array
        is C-contiguous), else a C-contiguous copy made on the current stream."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape {shape}")
        source = self if self.flags.c_contiguous else self.copy()
        return ndarray._make_view(source, 0, shape, _c_strides(shape, self.dtype.itemsize), self.dtype)

    def __getitem__(self, key: Any) -> ndarray:
        """Basic indexing (integers and slices with positive steps): a view."""
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (len(self._shape) - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (len(self._shape) - len(key))
        offset, shape, strides = 0, [], []
        for k, extent, stride in zip(key, self._shape, self._strides, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(extent)
                if step <= 0:
                    raise NotImplementedError("the CuPy double takes positive slice steps only")
                offset += start * stride
                shape.append(max(0, -(-(stop - start) // step)))
                strides.append(stride * step)
            else:
                index = int(k) + (extent if int(k) < 0 else 0)
                if not 0 <= index < extent:
                    raise IndexError(f"index {k} is out of bounds for axis with size {extent}")
                offset += index * stride
        return ndarray._make_view(self, offset, tuple(shape), tuple(strides), self.dtype)

    def __setitem__(self, key: Any, value: Any) -> None:
        """An element-wise copy, queued on the current stream. An array on another device is
        refused (cupy/_core/_kernel.pyx, _check_peer_access: the double has no peer access)."""
        target = self[key]
        worker = _current_worker()
        dst = target._spec()
        if isinstance(value, ndarray):
            if value.data.device_id != _machine.current_device():
                raise ValueError(
                    f"The device where the array resides ({value.data.device_id}) is different from the current "
                    f"device ({_machine.current_device()}). Peer access is unavailable between these devices."
                )
            src = value._spec()

            def copy() -> None:
                out = _spec_view(dst)
                out[...] = np.broadcast_to(_spec_view(src), out.shape).astype(out.dtype, copy=False)

            worker.submit(copy)
        else:
            scalar = np.asarray(value).astype(self.dtype)

            def fill() -> None:
                _spec_view(dst)[...] = scalar

            worker.submit(fill)

    def fill(self, value: Any) -> None:
        self[...] = value

    def __iand__(self, other: Any) -> ndarray:
        """``a &= x``: cupy.bitwise_and, an element-wise kernel on the current stream."""
        worker = _current_worker()
        dst = self._spec()
        mask = np.asarray(other).astype(self.dtype)

        def run() -> None:
            view = _spec_view(dst)
            np.bitwise_and(view, mask, out=view)

        worker.submit(run)
        return self

    def copy(self, order: str = "C") -> ndarray:
        """core.pyx, copy: a new C-contiguous array on the current device, filled on the current stream."""
        result = ndarray(self._shape, self.dtype)
        if self.size:
            worker = _current_worker()
            dst, src = result._spec(), self._spec()
            worker.submit(lambda: _spec_view(dst).__setitem__(..., _spec_view(src)))
        return result

    def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
        """core.pyx, get: a D2H copy on ``stream`` or the current stream, waited for (pageable)."""
        source = self if self.flags.c_contiguous else self.copy()
        result = np.empty(self._shape, self.dtype)
        ptr = stream.ptr if stream is not None else _stream.get_current_stream_ptr()
        _runtime.memcpyAsync(result.ctypes.data, source.data.ptr, self.nbytes, _runtime.memcpyDeviceToHost, ptr)
        return result

    def set(self, array: np.ndarray, stream: Any = None) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        ptr = stream.ptr if stream is not None else _stream.get_current_stream_ptr()
        _runtime.memcpyAsync(self.data.ptr, array.ctypes.data, array.nbytes, _runtime.memcpyHostToDevice, ptr)


# -- creation ------------------------------------------------------------------------------------
def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(shape, dtype)


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    """cupy/_creation/basic.py, zeros: ``a.data.memset_async(0, a.nbytes)`` on the current stream."""
    array = ndarray(shape, dtype)
    if array.nbytes:
        worker = _current_worker()
        ptr, nbytes = array.data.ptr, array.nbytes
        worker.submit(lambda: _machine.device_bytes(ptr, nbytes).fill(0))
    return array


def full(shape: Any, fill_value: Any, dtype: Any = None) -> ndarray:
    array = ndarray(shape, np.asarray(fill_value).dtype if dtype is None else dtype)
    array.fill(fill_value)
    return array


def asarray(a: Any, dtype: Any = None) -> ndarray:
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    host = np.ascontiguousarray(a, dtype=dtype)
    array = ndarray(host.shape, host.dtype)
    array.set(host)
    return array


array = asarray


def from_dlpack(array: Any, *, device: Any = None, copy: Any = None) -> ndarray:
    """cupy/_core/dlpack.pyx, from_dlpack (see ``_dlpack.from_dlpack``)."""
    return _dlpack.from_dlpack(array, device=device, copy=copy)  # type: ignore[no-any-return]


def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
    return a.get(stream=stream) if isinstance(a, ndarray) else np.asarray(a)


def get_default_memory_pool() -> _memory.MemoryPool:
    return _memory.default_pool()


def get_default_pinned_memory_pool() -> cuda.pinned_memory.PinnedMemoryPool:
    return cuda.pinned_memory.default_pool()


# -- kernels ---------------------------------------------------------------------------------------
class RawModule:
    """cupy/_core/raw.pyx, RawModule. Its kernels run as their host twins: a conversion
    ``gpuckpt_<name>`` declared by an ``X(name, src_t, dst_t, fn)`` line of conversions.def is
    ``gpuckpt.host.convert.reference_convert(name, bytes)``, and ``gpuckpt_swap<w>`` is numpy's
    byteswap. What a module declares is read from its source: the code itself (headers inlined),
    conversions.def found through an ``-I`` option as the compiler finds it, or, for a binary
    loaded with ``path=``, the sources beside it. The module is loaded per device, on the device
    current when it is compiled, a kernel is looked up or launched (raw.pyx: ``_get_raw_module``
    is memoized ``for_each_device``; RawKernel._kernel uses ``runtime.getDevice()``)."""

    def __init__(
        self, code: str | None = None, *, path: str | None = None, options: tuple[str, ...] = (), **kwargs: Any
    ) -> None:
        self.code, self.path, self.options = code, path, tuple(options)
        self._loaded: set[int] = set()
        self._kernels = self._declared()

    def _declared(self) -> dict[str, tuple[str, int, int]]:
        """What the source declares: name -> (kind, source width, destination width)."""
        import os

        widths = {"uint8_t": 1, "uint16_t": 2, "uint32_t": 4, "uint64_t": 8}
        texts = [self.code or ""]
        folders = [option[2:] for option in self.options if option.startswith("-I")]
        if self.path is not None:
            folders.append(os.path.dirname(self.path))
            texts[0] = open(os.path.join(os.path.dirname(self.path), "convert.cu")).read()
        if '#include "conversions.def"' in texts[0] or '#include "convert.cuh"' in texts[0]:
            for folder in folders:
                path = os.path.join(folder, "conversions.def")
                if os.path.exists(path):
                    texts.append(open(path).read())
        kernels: dict[str, tuple[str, int, int]] = {}
        for text in texts:
            for match in re.finditer(r"^X\((\w+),\s*(\w+),\s*(\w+),", text, re.M):
                kernels["gpuckpt_" + match[1]] = ("convert", widths[match[2]], widths[match[3]])
            for match in re.finditer(r"^SWAP\((\d+),", text, re.M):
                kernels[f"gpuckpt_swap{match[1]}"] = ("swap", int(match[1]), int(match[1]))
        return kernels

    def _load_here(self) -> None:
        device = _machine.current_device()
        if device not in self._loaded:
            self._loaded.add(device)
            _machine.modules_loaded[device] = _machine.modules_loaded.get(device, 0) + 1

    def compile(self, log_stream: Any = None) -> None:
        """raw.pyx, RawModule.compile: loads the module on the current device now."""
        self._load_here()

    def get_function(self, name: str) -> RawKernel:
        if name not in self._kernels:
            raise cuda.driver.CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        self._load_here()  # raw.pyx, get_function: ``func = ker.kernel`` registers it on this device
        return RawKernel(self, name)


class RawKernel:
    def __init__(self, module: RawModule, name: str) -> None:
        self.module, self.name = module, name

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int = 0
    ) -> None:
        self.module._load_here()
        worker = _current_worker()
        kind, source_width, dest_width = self.module._kernels[self.name]
        pointers = [a.data.ptr if isinstance(a, ndarray) else int(a) for a in args]
        n = pointers[-1]
        if kind == "swap":
            ptr = pointers[0]
            worker.submit(
                lambda: _machine.device_bytes(ptr, n * source_width).view(f"u{source_width}").byteswap(inplace=True)
            )
            return
        from gpuckpt.host.convert import reference_convert

        conversion = self.name.removeprefix("gpuckpt_")
        src, dst = pointers[0], pointers[1]

        def convert() -> None:
            raw = _machine.device_bytes(src, n * source_width).copy()
            converted = np.ascontiguousarray(reference_convert(conversion, raw)).reshape(-1).view(np.uint8)
            _machine.device_bytes(dst, n * dest_width)[...] = converted

        worker.submit(convert)


# -- test controls (not CuPy's API) ----------------------------------------------------------------
def _stall(seconds: float, stream: Any = None) -> None:
    """Queue ``seconds`` of "work" on ``stream`` (default: the current stream), like a long kernel."""
    import time

    ptr = _stream.get_current_stream_ptr() if stream is None else stream.ptr
    _machine.worker(ptr).submit(lambda: time.sleep(seconds))
