"""Models of the DLPack consumers and producers gpuckpt meets on a GPU, over the CuPy double.

gpuckpt.torch and gpuckpt.jax hand CuPy arrays to ``torch.from_dlpack`` and
``jax.dlpack.from_dlpack``, and gpuckpt.torch hands torch CUDA tensors to ``cupy.from_dlpack``.
Without a GPU none of them can run; these models do what each library does with the producer,
in the same order and with the same arguments, and read the device bytes through the double, so
a test can check the protocol and compare the values bit for bit with the host path. The
tensors and arrays they return are host objects over (or copied from) the double's memory.

Sources, each rule cited where it is kept:

* torch 2.13.0 (the one installed here; the GPU machine has 2.11): torch/utils/dlpack.py
  ``from_dlpack``; torch/_tensor.py ``Tensor.__dlpack__`` / ``__dlpack_device__``;
  aten/src/ATen/DLConvertor.cpp (pytorch/pytorch@04c86e56ed42) ``getDLDataType``,
  ``toScalarType``, ``toDLPackImpl``, ``fromDLPackImpl``; c10/cuda/CUDAFunctions.cpp
  (pytorch/pytorch@01a6a16d9bb6) ``current_device`` (cudaGetDevice).
* JAX (jax-ml/jax, jax-v0.10.2 and cec06d116c05): jax/_src/dlpack.py ``from_dlpack``;
  jaxlib/dlpack.cc ``DLPackManagedTensorToBuffer``, ``StridesToLayout``, ``MakePjrtBuffer``;
  xla/python/dlpack_types.cc ``DLDataTypeToPrimitiveType``; openxla/xla 5a9e73cb (the XLA
  jax-v0.10.2 pins), xla/pjrt/se_raw_buffer.h ``PjRtStreamExecutorRawBuffer::DecrefAfter`` and
  xla/pjrt/tracked_device_buffer.cc ``~ForeignRawSEDeviceMemory`` (when the deleter runs).
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cupy import _dlpack, _machine
from cupy.cuda import runtime
from cupy.cuda import stream as cupy_stream

kDLCPU, kDLCUDA, kDLCUDAHost, kDLROCM = _dlpack.kDLCPU, _dlpack.kDLCUDA, _dlpack.kDLCUDAHost, _dlpack.kDLROCM


def _holder(ptr: int, nbytes: int, on_free: Any) -> Any:
    """A host buffer over ``nbytes`` at ``ptr`` that calls ``on_free`` once nothing uses it (the
    role of the deleter a consumer hands to ``at::from_blob`` / XLA's on_delete_callback)."""
    kind = type("DeviceBytes", (ctypes.c_uint8 * max(nbytes, 1),), {})
    buffer = kind.from_address(ptr) if nbytes else kind()
    weakref.finalize(buffer, on_free)
    return buffer


def _host_array(tensor: _dlpack.ManagedTensor, np_dtype: np.dtype, on_free: Any) -> np.ndarray:
    """A numpy array over the capsule's device bytes (shape and strides as the capsule gives
    them) whose memory keeps ``on_free`` from running while any view of it lives."""
    itemsize = tensor.dtype[1] // 8
    assert np.dtype(np_dtype).itemsize == itemsize
    view = _dlpack.device_bytes_view(tensor, np.dtype(np_dtype))
    if view.size == 0:
        on_free()
        return np.empty(view.shape, np_dtype)
    low = tensor.data + tensor.byte_offset
    nbytes = sum((n - 1) * s for n, s in zip(view.shape, view.strides, strict=True)) + itemsize
    raw = np.frombuffer(_holder(low, nbytes, on_free), np.uint8, nbytes)
    return np.ndarray(view.shape, np_dtype, buffer=raw, strides=view.strides)


# -- torch -----------------------------------------------------------------------------------------
@dataclass
class TorchModel:
    """torch as a DLPack consumer (``torch.from_dlpack``) and producer (:class:`CudaTensor`).

    ``current_streams``: torch's current stream per device (``torch.cuda.current_stream(d)
    .cuda_stream``), 0 for its default stream (the legacy NULL stream; torch does not use
    per-thread default streams: torch/utils/dlpack.py). ``calls``: what was called on producers.
    """

    current_streams: dict[int, int] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def current_stream(self, device: int) -> int:
        return self.current_streams.get(device, 0)

    # -- consumer
    def from_dlpack(self, ext_tensor: Any, *, device: Any = None, copy: Any = None) -> Any:
        """torch/utils/dlpack.py, from_dlpack: with ``__dlpack__``, ``kwargs = {"max_version":
        (1, 0)}`` (plus ``copy``/``dl_device`` when given), ``__dlpack_device__()`` first; for a
        kDLCUDA/kDLROCM producer ``stream`` is torch's current stream of that device, its
        ``cuda_stream`` pointer, or 1 for the default stream (``1 if is_cuda and
        stream.cuda_stream == 0``); ``__dlpack__(**kwargs)``, retried on TypeError without
        max_version, then without copy, then without dl_device; then ``_C._from_dlpack``.
        Without ``__dlpack__`` the object is taken as a capsule."""
        import torch

        if not hasattr(ext_tensor, "__dlpack__"):
            return self._from_dlpack(ext_tensor)
        if device is not None:
            raise NotImplementedError("the model does not take device=")
        kwargs: dict[str, Any] = {"max_version": (1, 0)}
        if copy is not None:
            kwargs["copy"] = copy
        ext_device = ext_tensor.__dlpack_device__()
        self.calls.append(("__dlpack_device__", {}))
        if ext_device[0] in (kDLCUDA, kDLROCM):
            stream = self.current_stream(ext_device[1])
            kwargs["stream"] = 1 if ext_device[0] == kDLCUDA and stream == 0 else stream
        capsule = None
        for drop in (None, "max_version", "copy", "dl_device"):
            if drop is not None:
                kwargs.pop(drop, None)
            try:
                self.calls.append(("__dlpack__", dict(kwargs)))
                capsule = ext_tensor.__dlpack__(**kwargs)
                break
            except TypeError:
                if drop == "dl_device":
                    raise
        tensor = self._from_dlpack(capsule)
        if copy is True:
            tensor = tensor.clone()
        assert isinstance(tensor, torch.Tensor)
        return tensor

    def _from_dlpack(self, capsule: Any) -> Any:
        """torch/csrc tensor_fromDLPack and DLConvertor.cpp, fromDLPackImpl: the capsule is taken
        ("dltensor_versioned" or "dltensor", renamed "used_..."), its dtype mapped by
        ``toScalarType`` (lanes 1 only; kDLUInt 8/16/32/64, kDLInt 8..64, kDLFloat 16/32/64,
        kDLBfloat 16, kDLComplex 32/64/128, kDLBool 8; anything else "Unsupported code"), and
        ``at::from_blob`` wraps the memory, the producer's deleter called when the tensor's
        storage goes. Here a host tensor over the double's bytes, which stands for the CUDA
        tensor on ``device`` (kept in ``self.devices`` by data pointer)."""
        import ml_dtypes
        import torch

        if not isinstance(capsule, _dlpack.Capsule):
            raise TypeError(f"expected a DLPack capsule, got {capsule!r}")
        tensor = capsule.take((_dlpack.CAPSULE_NAME_VER, _dlpack.CAPSULE_NAME))
        code, bits, lanes = tensor.dtype
        if lanes != 1:
            raise RuntimeError("ATen does not support lanes != 1")
        table: dict[int, dict[int, Any]] = {
            _dlpack.kDLUInt: {8: torch.uint8, 16: torch.uint16, 32: torch.uint32, 64: torch.uint64},
            _dlpack.kDLInt: {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64},
            _dlpack.kDLFloat: {16: torch.float16, 32: torch.float32, 64: torch.float64},
            _dlpack.kDLBfloat: {16: torch.bfloat16},
            _dlpack.kDLComplex: {32: torch.complex32, 64: torch.complex64, 128: torch.complex128},
            _dlpack.kDLBool: {8: torch.bool},
        }
        if code not in table:
            raise RuntimeError(f"Unsupported code {code}")
        if bits not in table[code]:
            raise RuntimeError(f"Unsupported bits {bits} of code {code}")
        scalar = table[code][bits]
        if tensor.device[0] != kDLCUDA:
            raise NotImplementedError(f"the model takes CUDA tensors only, not device type {tensor.device[0]}")
        # host stand-in: numpy has no bfloat16 torch can take, so those go through int16
        carrier = {torch.bfloat16: np.int16, torch.complex32: np.int32}.get(scalar)
        np_dtype = np.dtype(carrier) if carrier is not None else torch.empty(0, dtype=scalar).numpy().dtype
        del ml_dtypes
        array = _host_array(tensor, np_dtype, tensor.delete)
        result = torch.from_numpy(array)
        return result if carrier is None else result.view(scalar)

    # -- producer
    def empty(self, shape: tuple[int, ...], dtype: Any, device: int, requires_grad: bool = False) -> CudaTensor:
        """A CUDA tensor in memory of its own (torch's caching allocator: cudaMalloc, here on the
        double's heap of ``device``)."""
        import torch

        numel = int(np.prod(shape, dtype=np.int64))
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        heap = _machine.heap(device)
        ptr = heap.malloc(max(nbytes, 1))
        carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
        buffer = np.frombuffer(_holder(ptr, max(nbytes, 1), lambda: heap.free(ptr)), np.uint8, max(nbytes, 1))
        host = torch.from_numpy(buffer[:nbytes]).view(carrier[torch.empty(0, dtype=dtype).element_size()])
        host = host.view(dtype).reshape(shape)
        return CudaTensor(self, host, device, requires_grad)


class CudaTensor:
    """A torch CUDA tensor, as far as gpuckpt.torch (``load_into``) and ``cupy.from_dlpack``
    use one: shape, dtype, device, ``detach``, ``view(dtype)``, ``is_contiguous``, ``copy_`` and
    the DLPack producer methods of torch/_tensor.py. ``host`` is a CPU tensor over the same
    (double's device) memory, to read and write its values."""

    def __init__(self, torch_model: TorchModel, host: Any, device: int, requires_grad: bool = False) -> None:
        import torch

        self._torch, self.host, self.index, self.requires_grad = torch_model, host, device, requires_grad
        self.device = torch.device("cuda", device)

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)

    def dim(self) -> int:
        return int(self.host.dim())

    def numel(self) -> int:
        return int(self.host.numel())

    def element_size(self) -> int:
        return int(self.host.element_size())

    def is_contiguous(self) -> bool:
        return bool(self.host.is_contiguous())

    def data_ptr(self) -> int:
        return int(self.host.data_ptr())

    def detach(self) -> CudaTensor:
        return CudaTensor(self._torch, self.host, self.index)

    def view(self, dtype: Any) -> CudaTensor:
        return CudaTensor(self._torch, self.host.view(dtype), self.index, self.requires_grad)

    def reshape(self, *shape: Any) -> CudaTensor:
        return CudaTensor(self._torch, self.host.reshape(*shape), self.index, self.requires_grad)

    def copy_(self, source: Any) -> CudaTensor:
        """Tensor.copy_ from a tensor of the same device (the model's CUDA tensors are host
        tensors over device memory, so a plain copy)."""
        self.host.copy_(source.host if isinstance(source, CudaTensor) else source)
        return self

    def __dlpack_device__(self) -> tuple[int, int]:
        """torch/_tensor.py, __dlpack_device__: (kDLCUDA, index) for a CUDA tensor."""
        return (kDLCUDA, self.index)

    def __dlpack__(
        self, *, stream: Any = -1, max_version: Any = None, dl_device: Any = None, copy: Any = None
    ) -> _dlpack.Capsule:
        """torch/_tensor.py, Tensor.__dlpack__ (2.13.0):

        * a tensor that requires grad (or is conjugated, or not strided) is a BufferError;
        * a CUDA tensor whose index is not ``torch.cuda.current_device()`` (cudaGetDevice:
          c10/cuda/CUDAFunctions.cpp) is a BufferError "Can't export tensors on a different CUDA
          device index";
        * ``stream`` not an int (or None) is a TypeError; -1 (the default) syncs nothing; None or
          1 is the default stream; 2 is a BufferError "per-thread default stream is not
          supported."; 0 fails an assertion; another value is that stream
          (``torch.cuda.ExternalStream``). When it is not torch's current stream, it waits on an
          event recorded on the current stream;
        * ``max_version`` None or of major < 1 exports the unversioned struct
          (``_C._to_dlpack``), else the versioned one; DLConvertor.cpp, toDLPackImpl: strides
          of dimensions of size < 2 normalised to 1, ``getDLDataType`` ("float8 types are not
          supported by dlpack"), the deleter drops the ATen tensor it holds.
        """
        import torch

        self._torch.calls.append(("torch.__dlpack__", {"stream": stream, "max_version": max_version}))
        if self.requires_grad:
            raise BufferError("Can't export tensors that require gradient, use tensor.detach()")
        current_device = runtime.getDevice()
        if self.index != current_device:
            raise BufferError(
                "Can't export tensors on a different CUDA device index. "
                f"Expected: {self.index}. Current device: {current_device}."
            )
        if stream is not None and type(stream) is not int:
            raise TypeError("stream must be ``int`` or ``none``")
        if stream != -1:
            if stream is None or stream == 1:
                consumer = 0  # torch.cuda.default_stream(): the legacy NULL stream
            elif stream == 2:
                raise BufferError("per-thread default stream is not supported.")
            else:
                if stream == 0:
                    raise AssertionError("unsupported stream on CUDA: 0.")
                consumer = stream
            current = self._torch.current_stream(self.index)
            if consumer != current:
                marker = _machine.worker(current).mark()  # event.record(current_stream)
                _machine.worker(consumer).submit(marker.reached.wait)  # stream.wait_event(event)
        if dl_device is not None or copy:
            raise NotImplementedError("the model exports in place only")
        dtype = self.dtype
        float8 = {
            getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        }
        if dtype in float8:
            raise RuntimeError("float8 types are not supported by dlpack")
        if dtype == torch.bool:
            code = _dlpack.kDLBool
        elif dtype == torch.bfloat16:
            code = _dlpack.kDLBfloat
        elif dtype.is_complex:
            code = _dlpack.kDLComplex
        elif dtype.is_floating_point:
            code = _dlpack.kDLFloat
        elif dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
            code = _dlpack.kDLUInt
        else:
            code = _dlpack.kDLInt
        strides = tuple(1 if n < 2 else s for n, s in zip(self.host.shape, self.host.stride(), strict=True))
        versioned = max_version is not None and max_version[0] >= 1
        managed = _dlpack.ManagedTensor(
            self.data_ptr(),
            (kDLCUDA, self.index),
            (code, self.element_size() * 8, 1),
            tuple(self.host.shape),
            strides,
            self,  # ATenDLMTensor::handle: the tensor stays alive until the deleter
            None,
            (1, 0) if versioned else None,
        )
        return _dlpack.Capsule(_dlpack.CAPSULE_NAME_VER if versioned else _dlpack.CAPSULE_NAME, managed)


# -- jax -------------------------------------------------------------------------------------------
@dataclass
class GpuDevice:
    """What jax/_src/dlpack.py and gpuckpt.jax use of a jax GPU device."""

    id: int
    local_hardware_id: int
    platform: str = "gpu"
    ready_stream: int = 0  #: get_stream_for_external_ready_events (XLA's stream of that device)

    def get_stream_for_external_ready_events(self) -> int:
        return self.ready_stream

    def __hash__(self) -> int:
        return hash(("gpu", self.id))


@dataclass
class JaxModel:
    """``jax.dlpack.from_dlpack`` (jax/_src/dlpack.py) over the double. ``devices``: the GPU
    devices by local hardware id, each with its own non-blocking stream as XLA's; ``calls``:
    what was called on producers. The arrays returned are CPU jax arrays holding the bytes.
    ``events``: ``("on_delete_callback", data pointer)`` each time a view's deleter runs, for a
    test to order other events (appended there) against."""

    devices: dict[int, GpuDevice] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[str, Any]] = field(default_factory=list)
    keepalive: list[Any] = field(default_factory=list)

    @classmethod
    def over(cls, device_count: int) -> JaxModel:
        devices = {}
        for index in range(device_count):
            with runtime_device(index):
                stream = cupy_stream.Stream(non_blocking=True)
            devices[index] = GpuDevice(index, index, ready_stream=int(stream.ptr))
            devices[index]._stream = stream  # type: ignore[attr-defined]
        return cls(devices)

    def from_dlpack(self, external_array: Any, device: Any = None, copy: Any = None) -> Any:
        """jax/_src/dlpack.py, from_dlpack: the producer must have both ``__dlpack__`` and
        ``__dlpack_device__`` (else TypeError); ``__dlpack_device__()`` names the platform
        (kDLCUDA -> "cuda") and the device (``backend.device_from_local_hardware_id(id)``);
        ``stream = dlpack_device.get_stream_for_external_ready_events()``; ``__dlpack__(stream=
        stream)``, with no max_version, so the capsule is the unversioned "dltensor"; then
        ``_jax.dlpack_managed_tensor_to_buffer`` and ``jnp.asarray(arr, dtype=
        canonicalize_dtype(arr.dtype))`` (64-bit types narrowed without x64)."""
        import jax.numpy as jnp
        from jax._src import dtypes

        if not hasattr(external_array, "__dlpack__") or not hasattr(external_array, "__dlpack_device__"):
            raise TypeError("The array passed to from_dlpack must have __dlpack__ and __dlpack_device__ methods.")
        if device is not None or copy is not None:
            raise NotImplementedError("the model does not take device= or copy=")
        dl_device_type, device_id = external_array.__dlpack_device__()
        self.calls.append(("__dlpack_device__", {}))
        if dl_device_type != kDLCUDA:
            raise NotImplementedError(f"the model takes CUDA arrays only, not device type {dl_device_type}")
        dlpack_device = self.devices[device_id]
        stream = dlpack_device.get_stream_for_external_ready_events()
        self.calls.append(("__dlpack__", {"stream": stream}))
        capsule = external_array.__dlpack__(stream=stream)
        arr = self._to_buffer(capsule, dlpack_device, stream)
        return jnp.asarray(arr, dtype=dtypes.canonicalize_dtype(arr.dtype))

    def _to_buffer(self, capsule: Any, device: GpuDevice, stream: int) -> Any:
        """jaxlib/dlpack.cc, DLPackManagedTensorToBuffer: the capsule must be named "dltensor"
        ("DLPack tensor must be a capsule with name \\"dltensor\\""), the dtype one of
        xla/python/dlpack_types.cc's (bool 8; int and uint 8..64; float 16/32/64; bfloat16 16;
        complex 64/128; float8 codes in newer XLA), the strides compact (StridesToLayout:
        "Only DLPack tensors with trivial (compact) striding are supported"); a view of the
        device buffer (CreateViewOfDeviceBuffer), ready once ``stream`` has reached this point,
        the producer's deleter called when the buffer goes; the capsule renamed
        "used_dltensor". The deleter runs as soon as the view is dropped, whatever kernels
        reading it are still queued (XLA's GPU client: AbstractTrackedDeviceBuffer::Delete hands
        the usage events to PjRtStreamExecutorRawBuffer::DecrefAfter, which ignores them and
        drops the buffer; the last reference is ~ForeignRawSEDeviceMemory, which calls
        on_delete_callback). Here the bytes are copied into a CPU jax array once the stream has
        drained, and the deleter runs (logged in ``events``) when that array is collected."""
        import jax
        import ml_dtypes

        if not isinstance(capsule, _dlpack.Capsule) or capsule.name != _dlpack.CAPSULE_NAME:
            name = capsule.name if isinstance(capsule, _dlpack.Capsule) else type(capsule).__name__
            raise ValueError(f'DLPack tensor must be a capsule with name "dltensor", got "{name}".')
        tensor = capsule.tensor
        code, bits, lanes = tensor.dtype
        if lanes != 1:
            raise ValueError(f"DLPack types with lanes != 1 not implemented, got {lanes}")
        table: dict[int, dict[int, Any]] = {
            _dlpack.kDLBool: {8: np.bool_},
            _dlpack.kDLInt: {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64},
            _dlpack.kDLUInt: {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64},
            _dlpack.kDLFloat: {16: np.float16, 32: np.float32, 64: np.float64},
            _dlpack.kDLBfloat: {16: ml_dtypes.bfloat16},
            _dlpack.kDLComplex: {64: np.complex64, 128: np.complex128},
            _dlpack.kDLFloat8_e4m3fn: {8: ml_dtypes.float8_e4m3fn},
            _dlpack.kDLFloat8_e5m2: {8: ml_dtypes.float8_e5m2},
        }
        if code not in table or bits not in table[code]:
            raise ValueError(f"Invalid or unsupported DLPack type: code {code}, {bits} bits")
        np_dtype = np.dtype(table[code][bits])
        shape = tensor.shape
        if tensor.strides is not None and 0 not in shape:
            order = sorted(range(len(shape)), key=lambda d: (tensor.strides[d], -d))
            step = 1
            for d in order:
                if shape[d] > 1 and tensor.strides[d] != step:
                    raise ValueError("Only DLPack tensors with trivial (compact) striding are supported")
                step *= shape[d]
        capsule.take((_dlpack.CAPSULE_NAME,))
        _machine.worker(stream).drain()  # the buffer is defined once the stream reached here
        host = _dlpack.device_bytes_view(tensor, np_dtype).copy()
        result = jax.device_put(host, jax.devices("cpu")[0])
        weakref.finalize(result, self._on_delete, tensor)
        return result

    def _on_delete(self, tensor: _dlpack.ManagedTensor) -> None:
        self.events.append(("on_delete_callback", tensor.data))
        tensor.delete()


class runtime_device:
    """``with runtime_device(i)``: GPU i current for the calling thread (cudaSetDevice), the
    previous one restored after."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __enter__(self) -> None:
        self.previous = runtime.getDevice()
        runtime.setDevice(self.index)

    def __exit__(self, *exc: object) -> None:
        runtime.setDevice(self.previous)
