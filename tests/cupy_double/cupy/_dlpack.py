"""cupy/_core/dlpack.pyx and the DLPack half of core.pyx (CuPy v14.2.0), on the double's memory.

A capsule here is a :class:`Capsule` object standing for the ``PyCapsule``: it carries a
:class:`ManagedTensor` (``DLManagedTensor`` or ``DLManagedTensorVersioned``) with plain numbers
for the data pointer, shape and strides, as the C struct does, and the owner the producer keeps
alive until the consumer calls the deleter. Consumers (``cupy.from_dlpack`` here; torch's and
JAX's in ``tests/cupy_double/dlpack_consumers.py``) take it by renaming it ``used_...``.

Constants are dlpack.h's (DLPack v1.0, which CuPy 14 vendors as cupy/_core/include/cupy/_dlpack/
dlpack.h): ``DLDeviceType`` and ``DLDataTypeCode``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _machine

# dlpack.h, DLDeviceType
kDLCPU, kDLCUDA, kDLCUDAHost, kDLROCM, kDLCUDAManaged = 1, 2, 3, 10, 13
# dlpack.h, DLDataTypeCode
kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLComplex, kDLBool = 0, 1, 2, 4, 5, 6
kDLFloat8_e4m3fn, kDLFloat8_e5m2 = 10, 12  # what a producer holding float8 (JAX, newer torch) emits

CAPSULE_NAME, CAPSULE_NAME_VER = "dltensor", "dltensor_versioned"
USED_CAPSULE_NAME, USED_CAPSULE_NAME_VER = "used_dltensor", "used_dltensor_versioned"
IMPL_VER = (1, 0)  # dlpack.pyx: IMPL_VER_MAJOR, IMPL_VER_MINOR

streamLegacy = 1  # cupy_backends/cuda/api/runtime.pyx (cudaStreamLegacy)


class ManagedTensor:
    """DLManagedTensor(Versioned): ``dl_tensor`` (data, device, ndim, dtype, shape, strides in
    elements, byte_offset), ``manager_ctx`` (here: ``owner``, the object kept alive) and
    ``deleter``; ``version`` is None for the unversioned struct."""

    def __init__(
        self,
        data: int,
        device: tuple[int, int],
        dtype: tuple[int, int, int],
        shape: tuple[int, ...],
        strides: tuple[int, ...] | None,
        owner: Any,
        deleter: Callable[[ManagedTensor], None] | None,
        version: tuple[int, int] | None,
        byte_offset: int = 0,
        flags: int = 0,
    ) -> None:
        self.data, self.device, self.dtype = data, device, dtype  # dtype: (code, bits, lanes)
        self.shape, self.strides, self.byte_offset = tuple(shape), strides, byte_offset
        self.owner, self._deleter, self.version, self.flags = owner, deleter, version, flags
        self.deleted = False

    def delete(self) -> None:
        """The producer's deleter: called once, by whoever owns the tensor last."""
        if self.deleted:
            raise AssertionError("a DLManagedTensor's deleter was called twice")
        self.deleted = True
        if self._deleter is not None:
            self._deleter(self)
        self.owner = None


class Capsule:
    """A ``PyCapsule`` holding a ManagedTensor under ``name``. A consumer takes ownership by
    renaming it (``used_dltensor``/``used_dltensor_versioned``); an unconsumed capsule calls the
    deleter when collected (dlpack.pyx, pycapsule_deleter: "Do not invoke the deleter on a used
    capsule")."""

    def __init__(self, name: str, tensor: ManagedTensor) -> None:
        self.name, self.tensor = name, tensor

    def take(self, names: tuple[str, ...]) -> ManagedTensor:
        if self.name not in names:
            raise ValueError(
                f"A DLPack tensor object cannot be consumed multiple times (or object was not a DLPack capsule). "
                f"Got: capsule {self.name!r}"
            )
        self.name = "used_" + self.name
        return self.tensor

    def __del__(self) -> None:
        if getattr(self, "name", None) in (CAPSULE_NAME, CAPSULE_NAME_VER):
            self.tensor.delete()

    def __repr__(self) -> str:
        return f"<capsule object {self.name!r} (double)>"


def _decref_owner(tensor: ManagedTensor) -> None:
    """dlpack.pyx, deleter/deleter_ver: ``Py_DECREF(manager_ctx)``; then the owner (the exported
    ndarray) may go, and its memory back to the pool."""
    tensor.owner = None


def dtype_code(dtype: np.dtype) -> tuple[int, int, int]:
    """dlpack.pyx, get_dlpack_dtype_code_itemsize: by kind u, i, f, c, b; bfloat16 by name;
    anything else (float8, int4, ... whose kind is 'V') raises BufferError."""
    kind = dtype.kind
    code = {"u": kDLUInt, "i": kDLInt, "f": kDLFloat, "c": kDLComplex, "b": kDLBool}.get(kind)
    if code is None:
        if dtype.name != "bfloat16":
            raise BufferError("dtype is not supported for dlpack export")
        code = kDLBfloat
    return code, dtype.itemsize * 8, 1


def to_dlpack(array: Any, use_versioned: bool, to_cpu: bool, ensure_copy: bool) -> Capsule:
    """dlpack.pyx, _toDlpack: the dtype first (may raise BufferError), the device (kDLCUDA and
    the array's device id: the double has no managed memory), the owner kept alive (the array
    itself, or for a CPU export the NumPy copy ``array.get()``), strides in elements."""
    code = dtype_code(array.dtype)
    device = (kDLCUDA, array.data.device_id)
    owner: Any = array
    if to_cpu:
        owner = array.get()
        device = (kDLCPU, 0)
    data = array.data.ptr if owner is array else owner.ctypes.data
    strides = tuple(s // array.dtype.itemsize for s in (array.strides if owner is array else owner.strides))
    version = IMPL_VER if use_versioned else None
    flags = 2 if (use_versioned and owner is not array) else 0  # DLPACK_FLAG_BITMASK_IS_COPIED
    tensor = ManagedTensor(data, device, code, array.shape, strides, owner, _decref_owner, version, flags=flags)
    return Capsule(CAPSULE_NAME_VER if use_versioned else CAPSULE_NAME, tensor)


def ndarray_dlpack(
    array: Any, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None
) -> Capsule:
    """core.pyx, _ndarray_base.__dlpack__ (keyword-only arguments):

    * ``max_version`` with a major >= 1 exports the versioned struct, else the unversioned one;
    * ``dl_device`` None or the array's own device exports in place (``copy=True`` is then a
      BufferError); ``(kDLCPU, 0)`` exports a host copy (``copy=False`` is a ValueError);
      any other device is a BufferError;
    * ``stream`` (CUDA): None means the legacy default stream (1); 0 warns and is taken as 1;
      anything below -1 is a ValueError; -1 establishes no order; any other value that is not
      CuPy's current stream (0 counting as 1) is made to wait, with an event recorded on CuPy's
      current stream of the *current* device, for the work queued there
      (``stream_mod._BaseStream(consumer_stream, -1).wait_event(curr_stream.record())``).
    """
    from .cuda import stream as stream_module

    if max_version is not None and not isinstance(max_version, tuple):
        raise TypeError("Argument 'max_version' has incorrect type (expected tuple)")  # ``tuple max_version``
    use_versioned = max_version is not None and max_version[0] >= 1
    to_cpu = False
    if dl_device is None or tuple(dl_device) == array.__dlpack_device__():
        if copy is True:
            raise BufferError("copy=True only supported for copy to CPU.")
    elif tuple(dl_device) == (kDLCPU, 0):
        if copy is False:
            raise ValueError("GPU memory cannot be exported to CPU without copy.")
        to_cpu = True
    else:
        raise BufferError("unsupported device requested.")
    curr_stream = stream_module.get_current_stream()
    curr_stream_ptr = int(curr_stream.ptr)
    consumer_stream = -2
    if not to_cpu:
        if stream is None:
            consumer_stream = streamLegacy
        elif isinstance(stream, int):
            consumer_stream = stream
        if consumer_stream < -1:
            raise ValueError(
                f"On CUDA, the valid stream for the DLPack protocol is -1, 1, 2, or any larger value, "
                f"but {stream} was provided"
            )
        if consumer_stream == 0:
            warnings.warn(
                "Stream 0 is passed from a library that you are converting to; CuPy assumes 0 as a legacy "
                "default stream. Please report this problem to the library as this violates the DLPack protocol.",
                stacklevel=3,
            )
            consumer_stream = streamLegacy
        if curr_stream_ptr == 0:
            curr_stream_ptr = streamLegacy
    if consumer_stream >= 0 and consumer_stream != curr_stream_ptr:
        event = curr_stream.record()
        stream_module._BaseStream(consumer_stream, -1).wait_event(event)
    return to_dlpack(array, use_versioned, to_cpu, ensure_copy=copy is True)


class DLPackMemory:
    """dlpack.pyx, DLPackMemory: takes the capsule (versioned or not; a versioned one of a major
    above 1 is a BufferError), insists on a CUDA (or managed) device, points at ``data``, and
    calls the producer's deleter when collected (``__dealloc__``)."""

    def __init__(self, capsule: Any) -> None:
        if not isinstance(capsule, Capsule):
            raise ValueError(
                "A DLPack tensor object cannot be consumed multiple times (or object was not a DLPack capsule). "
                f"Got: {capsule!r}"
            )
        self.tensor: ManagedTensor | None = None
        tensor = capsule.take((CAPSULE_NAME, CAPSULE_NAME_VER))
        self.tensor = tensor
        if tensor.version is not None and tensor.version[0] > IMPL_VER[0]:
            raise BufferError("DLPack exported too new major version.")
        if tensor.device[0] not in (kDLCUDA, kDLCUDAManaged):
            raise RuntimeError(
                "CuPy is built against CUDA, different from the backend that backs the incoming DLPack tensor"
            )
        self.ptr = tensor.data
        self.device_id = tensor.device[1]
        self.size = tensor.dtype[1] * sum(tensor.shape) // 8  # (sic: dlpack.pyx sums the shape)

    def __del__(self) -> None:
        tensor = getattr(self, "tensor", None)
        if tensor is not None:
            tensor.delete()


def _cupy_dtype(code: int, bits: int, lanes: int) -> np.dtype:
    """dlpack.pyx, _dlpack_to_cupy_array: the dtype table. bfloat16 only where CuPy has it
    (ml_dtypes importable and NumPy >= 2.1.2, dlpack.pyx's module-level ``bfloat16``), else
    NotImplementedError; float8 and every other code are a TypeError."""
    from . import _has_bfloat16

    if lanes != 1:
        raise ValueError(f"vector dtypes (lanes={lanes}) is not supported")
    table = {
        kDLUInt: {8: "u1", 16: "u2", 32: "u4", 64: "u8"},
        kDLInt: {8: "i1", 16: "i2", 32: "i4", 64: "i8"},
        kDLFloat: {16: "f2", 32: "f4", 64: "f8"},
        kDLComplex: {64: "c8", 128: "c16"},
        kDLBool: {8: "?"},
    }
    if code == kDLBfloat:
        if bits == 16 and _has_bfloat16():
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        raise NotImplementedError("CuPy does not support bfloat16. Please install ml_dtypes to use bfloat16.")
    if code not in table:
        raise TypeError(f"Unsupported dtype. dtype code: {code}")
    if bits not in table[code]:
        raise TypeError(f"dtype code {code} of {bits} bits is not supported.")
    return np.dtype(table[code][bits])


def dlpack_to_cupy_array(capsule: Any) -> Any:
    """dlpack.pyx, _dlpack_to_cupy_array: a CuPy array over the capsule's memory (no copy),
    strides converted to bytes, which keeps the DLPackMemory (and so the producer's tensor)
    alive through its MemoryPointer."""
    from . import ndarray
    from .cuda import memory

    mem = DLPackMemory(capsule)
    tensor = mem.tensor
    assert tensor is not None
    dtype = _cupy_dtype(*tensor.dtype)
    pointer = memory.MemoryPointer(mem, tensor.byte_offset)  # type: ignore[arg-type]
    strides = None if tensor.strides is None else tuple(s * (tensor.dtype[1] // 8) for s in tensor.strides)
    return ndarray(tensor.shape, dtype, pointer, strides=strides)


def from_dlpack(array: Any, *, device: Any = None, copy: Any = None) -> Any:
    """dlpack.pyx, from_dlpack: an object without ``__dlpack_device__`` is taken as a capsule;
    ``device=`` is NotImplementedError; for a CUDA producer the device it names is made current
    (``runtime.setDevice(dev_id)``, the previous one restored after), and ``__dlpack__`` is called
    with CuPy's current stream of that device (the null stream passed as
    ``get_default_stream_ptr()``: 1, or 2 with per-thread default streams), ``max_version=(1, 0)``
    and ``copy``; on a TypeError (an older producer) once more with ``stream`` alone. A CPU
    producer is a TypeError."""
    from .cuda import runtime
    from .cuda import stream as stream_module

    if not hasattr(array, "__dlpack_device__"):
        return dlpack_to_cupy_array(array)
    dev_type, dev_id = array.__dlpack_device__()
    if device is not None:
        raise NotImplementedError("from_dlpack() does not support device yet.")
    if dev_type in (kDLCUDA, kDLCUDAManaged):
        previous = runtime.getDevice()
        try:
            runtime.setDevice(dev_id)
            stream = stream_module.get_current_stream_ptr()
            if stream == 0:
                stream = streamLegacy  # stream.pyx, get_default_stream_ptr (the double has no PTDS)
            try:
                capsule = array.__dlpack__(stream=stream, max_version=IMPL_VER, copy=copy)
            except TypeError:
                if copy is not None:
                    raise
                capsule = array.__dlpack__(stream=stream)
        finally:
            runtime.setDevice(previous)
    elif dev_type == kDLCPU:
        raise TypeError(
            "CPU arrays cannot be directly imported to CuPy. Use `cupy.array(numpy.from_dlpack(input))` instead."
        )
    else:
        raise TypeError(f"Unsupported array type: {dev_type}")
    return dlpack_to_cupy_array(capsule)


def device_bytes_view(tensor: ManagedTensor, np_dtype: np.dtype) -> np.ndarray:
    """A host view of a capsule's device memory with its shape and (element) strides, in
    ``np_dtype`` of the tensor's width: how the consumers' models read what they imported."""
    itemsize = tensor.dtype[1] // 8
    shape = tensor.shape
    strides = tensor.strides
    if strides is None:  # dlpack.h: NULL strides mean compact row-major
        strides, step = [], 1
        for extent in reversed(shape):
            strides.append(step)
            step *= max(extent, 1)
        strides = tuple(reversed(strides))
    byte_strides = tuple(s * itemsize for s in strides)
    if 0 in shape:
        return np.empty(shape, np_dtype)
    extent = sum((n - 1) * s for n, s in zip(shape, byte_strides, strict=True)) + itemsize
    raw = _machine.device_bytes(tensor.data + tensor.byte_offset, extent)
    return np.ndarray(shape, np_dtype, buffer=raw, strides=byte_strides)
