"""JAX: checkpoints as ``jax.Array``\\ s, a nested-dict view by scope (the shape Flax parameters
have), and a checkpoint restored into a pytree of arrays.

``import gpuckpt`` never imports this module (nor jax); ``import gpuckpt.jax`` does::

    import gpuckpt, gpuckpt.jax, jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    with gpuckpt.open("train_dir") as ckpt:
        arrays = gpuckpt.jax.restore(ckpt, ckpt.model_keys())    # {name: jax.Array} on JAX's default device
        params = gpuckpt.jax.restore_tree(ckpt, ckpt.model_keys())  # {"dense": {"kernel": ...}}
        params, report = gpuckpt.jax.load_into(params, ckpt)      # a new pytree, each leaf where the old one was
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        sharded = gpuckpt.jax.restore(ckpt, shardings={r".*/kernel": NamedSharding(mesh, P(None, "model"))})

Dtypes
------
JAX holds every numeric type a checkpoint has (bfloat16, the float8 types, int4/uint4, int2/uint2,
float4_e2m1fn, complex, bool). The 64-bit types (float64, int64, uint64, complex128) only with
``jax_enable_x64`` on: without it JAX would silently narrow them, so they are refused by name
(:class:`~gpuckpt.UnsupportedError`) before anything is read; ``dtype="float32"`` converts
float64 tensors instead. Strings are refused by name.

Lifetimes
---------
* Host (a CPU device): the restore reads into numpy arrays aligned to 64 bytes (``out=``), which
  ``jax.device_put(..., may_alias=True)`` hands to XLA without a copy (every type but the
  sub-byte ones, which XLA packs). Nobody else holds those numpy arrays; the jax.Array keeps its
  buffer alive, and closing the checkpoint does not touch it.
* GPU: the device pipeline fills CuPy arrays, which ``jax.dlpack.from_dlpack`` takes without a
  copy: JAX calls the array's ``__dlpack_device__`` and ``__dlpack__(stream=...)`` with the
  stream XLA waits on for external buffers, which CuPy orders after its current stream (a
  restore has completed every tensor's copies before it returns anyway). The capsule holds a
  reference to the CuPy array, which JAX drops when it frees the buffer; the memory then goes
  back to CuPy's pool (it stays CuPy's, never XLA's allocator's), even while kernels reading it
  are queued: see the rule for users below. Types a CuPy array does not
  hold, or cannot export (float8 types, the sub-byte types, and bfloat16 where CuPy lacks it:
  NumPy < 2.1.2 or no ml_dtypes), arrive as unsigned integers of their width and are made
  typed on the device: float8 and bfloat16 by ``jax.lax.bitcast_convert_type``, int4, uint4,
  int2, uint2 and float4_e2m1fn (one element per byte) by a conversion to the unsigned type of
  their width and a bit-cast (see :func:`from_dlpack`): one device copy for those types only,
  the byte array freed after. Not yet run on a GPU; tested on the CuPy double with a model of
  JAX's DLPack import (tests/test_jax_gpu_double.py).
* GPU, the rule for users: **before a restored array goes** (``del``, rebinding as in
  ``params = step(params)``, ``.delete()``, leaving scope) **while work reading it may still be
  queued, wait for that work when anything may allocate from CuPy meanwhile** (another GPU
  restore, any CuPy code in the process)::

      new = step(params)
      jax.block_until_ready(new)  # step's kernels have read params
      params = new                # only now does params' memory go back to CuPy's pool

  (or keep the restored arrays referenced until results computed from them are ready). The
  arrays JAX takes as they are are views of CuPy pool memory, and XLA's GPU client runs a view's
  DLPack deleter as soon as the jax.Array goes, not once the kernels queued to read it are done
  (see :func:`from_dlpack`, Notes); the deleter drops the CuPy array (cupy/_core/dlpack.pyx,
  ``deleter``: Py_DECREF of ``manager_ctx``), whose block is at once free in the pool for the
  next allocation on its stream's arena (cupy/cuda/memory.pyx, SingleDeviceMemoryPool.free:
  ``arena.insert_chunk``), which can overwrite it while XLA still reads it. Nothing is needed
  for the arrays made typed on the device (float8 types, sub-byte types, bfloat16 where CuPy
  lacks it): they are XLA's own, and their CuPy bytes were waited for before being dropped; nor
  for sharded arrays (``shardings=``) and ``load_into``'s leaves, which reach the GPU by
  ``device_put`` into XLA's own memory; nor when no CuPy allocation can happen until that work is
  done (XLA never allocates from CuPy's pool).

  Why no fix: the zero-copy candidate, restoring into memory outside CuPy's pool
  (``cupy.cuda.using_allocator()``: CuPy's ``memory._malloc``, a ``Memory`` that is one
  cudaMalloc, given back by cudaFree in ``Memory.__dealloc__``; CuPy v14.2.0,
  cupy/cuda/__init__.py and memory.pyx), is only safe if cudaFree waits for the queued kernels
  reading the block, and NVIDIA does not promise that: the CUDA Runtime API reference,
  cudaFree (https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__MEMORY.html), says
  that for pointers not from the stream-ordered allocator "this API may perform implicit
  synchronization" (cuMemFree in the Driver API says the same; for stream-ordered pointers
  "Callers must ensure that all accesses to these pointer have completed"). The Programming
  Guide's "Implicit Synchronization" list (Asynchronous Concurrent Execution, Streams) names
  device memory allocation, not freeing, and only the introduction to the Stream-Ordered Memory
  Allocator (4.3.1) says in passing that cudaMalloc and cudaFree "cause the GPU to synchronize
  across all executing CUDA streams". An allocator swap would also route the pipeline's scratch
  buffers through cudaMalloc (``using_allocator`` is per thread, and the restore allocates
  outputs and scratch alike on the caller's thread: pipeline.py, StagedRestore._start and
  _allocate). A documented wait, ``cudaDeviceSynchronize`` ("Blocks until the device has
  completed all preceding requested tasks") run before the CuPy array is dropped, would be the
  sound zero-copy variant, at one device-wide stall per array dropped (it, like any fix here,
  relies on XLA having launched the kernels before the deleter runs: an execution holds its
  inputs until their launch); it is not done yet.
* Shardings (``restore(..., shardings={name or regex: jax.sharding.Sharding})``): global arrays
  (``jax.make_array_from_single_device_arrays``). The devices this process addresses are grouped
  by their index in ``sharding.addressable_devices_indices_map(shape)``: each distinct index (a
  region) comes to the host once, into an aligned array, converted by ``dtype=`` as it is read.
  When the process's regions tile a box (always on a process holding every shard: the box is
  the whole tensor), the box is read once, by ``Checkpoint.restore(regions=)`` (the whole tensor
  verified against its crc32c), and the regions cut from it on the host (one copy each, none for
  a single region); the region reader would otherwise read across the gaps of column shards of
  small rows. Else (a process holding scattered shards) each region is read by itself, by
  ``restore(regions=)``: its runs, and a gap of at most a page between two runs read across
  rather than skipped, unchecked (the crc32c covers whole tensors). A region goes onto the first
  device of its group in one batched ``device_put`` and is copied device to device to the others; on CPU
  devices, whose memory is the host's, every device of the group aliases the one host array
  instead (``jax.device_put`` of a numpy array onto a replicated sharding does the same). In a
  multi-process program each process reads only the regions its own devices hold (tested with
  two processes of 4 CPU devices): a tensor split over the processes is read once in all, a
  replicated one once per process. The host holds one tensor's regions at a time (on a GPU; on
  CPU devices they become the shards). A sharding that does not fit the shape (JAX's checks:
  rank, an axis that does not divide) is refused by name before anything is read. GPU devices
  get the host region by ``device_put`` (the staged pipeline is not used for shards yet); not
  yet run on a GPU.
* ``load_into`` builds new arrays (JAX arrays are immutable): each tensor is read on the host
  (one at a time, so the host holds one tensor beyond the new leaves) and ``device_put`` onto the
  old leaf's sharding, one host-to-device copy per leaf (the staged GPU pipeline is not used for
  pytrees yet); the old leaves are untouched and stay valid. The new leaves are XLA's own memory,
  never views of CuPy's pool, so the rule for users above does not apply to them. Each new leaf
  is what the old one was: a numpy array stays numpy (64-bit ones too, without
  ``jax_enable_x64``), a Python or numpy number the same kind of number, a 0-d leaf 0-d, and a leaf JAX
  placed by default (uncommitted) stays uncommitted.
* A sharding with a ``memory_kind`` (``"pinned_host"`` for host offload) gets each shard in that
  memory of its device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from .casting import convertible, dtype_chooser, restored_dtype
from .checkpoint import Checkpoint, NameSelector
from .checkpoint import open as open_checkpoint
from .errors import InvalidArgumentError, UnsupportedError, describe
from .mapping import LoadError, LoadResult, MappingLike, _cast, _transformed, plan_load
from .naming import NameRules

ALIGNMENT = 64  #: bytes; XLA's CPU client aliases host buffers aligned to this, and copies others
_WIDE = {"float64", "int64", "uint64", "complex128"}
_ATTRIBUTES = "/.ATTRIBUTES/VARIABLE_VALUE"


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def check_dtype(dtype: Any, where: str = "") -> np.dtype:
    """``dtype`` if JAX holds it as it is (now), else UnsupportedError naming it and ``where``."""
    np_dtype = np.dtype(dtype)
    suffix = f": {where}" if where else ""
    if np_dtype.kind == "O":
        raise UnsupportedError("string tensors have no JAX type (restore them with Checkpoint.restore)" + suffix)
    if np_dtype.name in _WIDE and not x64_enabled():
        hint = "; or restore with dtype='float32'" if np_dtype.name == "float64" else ""
        raise UnsupportedError(
            f"{np_dtype.name} needs jax_enable_x64 (without it JAX narrows it to 32 bits): "
            f"jax.config.update('jax_enable_x64', True){hint}" + suffix
        )
    return np_dtype


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an :data:`ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _jax_device(device: Any) -> Any:
    """The jax Device a ``device`` argument names: None (JAX's default), a jax Device, "cpu",
    "cuda"/"cuda:N" (the GPU of that CUDA ordinal)."""
    if device is None:
        return jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    if device == "cpu":
        return jax.devices("cpu")[0]
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        ordinal = int(device.partition(":")[2] or 0)
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        for candidate in gpus:
            if getattr(candidate, "local_hardware_id", candidate.id) == ordinal:
                return candidate
        from .errors import DeviceUnavailableError

        raise DeviceUnavailableError(f"JAX has no GPU with CUDA ordinal {ordinal} (devices: {jax.devices()})")
    raise InvalidArgumentError(f"device={device!r}: a jax Device, 'cpu', 'cuda' or 'cuda:N'")


def _gpuckpt_device(device: Any) -> str:
    if device.platform == "cpu":
        return "cpu"
    if device.platform in ("gpu", "cuda"):
        return f"cuda:{getattr(device, 'local_hardware_id', device.id)}"
    raise UnsupportedError(f"JAX device {device} ({device.platform}): gpuckpt restores to the host or to CUDA GPUs")


def _put(array: np.ndarray, where: Any) -> jax.Array:
    """A host array onto a device or sharding, aliasing its memory where XLA can."""
    try:
        return jax.device_put(array, where, may_alias=True)
    except TypeError:  # a JAX without may_alias
        return jax.device_put(array, where)


def _put_each(arrays: list[np.ndarray], devices: list[Any]) -> list[jax.Array]:
    """Each host array onto its device (or single-device sharding) in one batched call, aliasing
    where XLA can (an array given for several CPU devices is aliased by each, as ``device_put`` of
    a numpy array onto a replicated sharding does)."""
    if not arrays:
        return []
    try:
        return list(jax.device_put(arrays, devices, may_alias=True))
    except TypeError:  # a JAX without may_alias
        return list(jax.device_put(arrays, devices))


#: The sub-byte types and their width in bits: the checkpoint (and so the device array) keeps one
#: element per byte, in its low bits (the host path clears the others), while XLA's types are
#: this narrow, so a bit-cast from the byte would split it (see :func:`from_dlpack`).
_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}


def _dlpack_exportable(dtype: np.dtype) -> bool:
    """Whether CuPy exports arrays of ``dtype`` through DLPack (cupy/_core/dlpack.pyx,
    get_dlpack_dtype_code_itemsize: kinds u, i, f, c, b and bfloat16; anything else is a
    BufferError, even a type CuPy lets an array have, such as float8_e4m3b11fnuz, whose type
    character 'L' passes _dtype.pyx's check_supported_dtype)."""
    return dtype.kind in "uifcb" or dtype.name == "bfloat16"


def from_dlpack(array: Any, logical: Any = None) -> jax.Array:
    """A jax.Array over a device (CuPy) array's memory through DLPack, with no copy for the
    types both hold. ``logical``: the type its bytes hold when it is not the array's own.

    An array of a type CuPy cannot export is viewed as the unsigned integer of its width first
    (``ndarray.view``, unchecked). JAX is handed the array itself, not a capsule:
    ``jax.dlpack.from_dlpack`` calls ``__dlpack_device__`` and then ``__dlpack__(stream=<the
    device's stream for external ready events>)``, so CuPy orders XLA's stream after its own
    (jax/_src/dlpack.py, from_dlpack). A ``logical`` type of the same width (bfloat16 where CuPy
    lacks it, the float8 types) is made with ``bitcast_convert_type``; a sub-byte one (int4,
    uint4, int2, uint2, float4_e2m1fn: one element per byte) by converting the byte to the
    unsigned type of that width, then bit-casting (a bit-cast from a wider type would add a
    trailing axis: jax/_src/lax/lax.py, _bitcast_convert_type_shape_rule). Either is one device
    copy, for those types only.

    Notes
    -----
    The view's memory goes back to CuPy's pool as soon as the view is dropped, even while a
    kernel that reads it is still queued: in XLA's GPU client (jax-v0.10.2 pins openxla/xla
    5a9e73cb, whose GPU plugin makes a StreamExecutorGpuClient: xla/pjrt/plugin/xla_gpu/
    xla_gpu_pjrt_client.cc, GetXlaPjrtGpuClient) deleting the view's buffer
    (xla/pjrt/abstract_tracked_device_buffer.cc, AbstractTrackedDeviceBuffer::Delete) hands its
    usage events to ``DecrefAfter``, which xla/pjrt/se_raw_buffer.h,
    PjRtStreamExecutorRawBuffer overrides to drop the buffer at once (GPU memory is
    kComputeSynchronized: freeing once the last use is enqueued is safe for XLA's own
    allocator, whose next users are on the same compute stream; xla/pjrt/local_device_state.h),
    and the last reference runs the DLPack deleter (xla/pjrt/tracked_device_buffer.cc,
    ~ForeignRawSEDeviceMemory; the view from PjRtStreamExecutorClient::CreateViewOfDeviceBuffer).
    Nor does an execution hold its inputs past their launch on GPUs
    (xla/pjrt/pjrt_stream_executor_client.cc: only kSynchronous devices keep them until the
    execution's event). CuPy could then give the block to its next allocation, on a stream not
    ordered after XLA's. So a converted array is waited for (``block_until_ready``) before the
    view goes: one host wait per converted tensor. An array JAX takes as it is comes back as the
    view itself, not waited for: its memory lives as long as it does, so the kernels reading it
    must be waited for before it goes when CuPy may allocate meanwhile (the rule in the module
    docs, "Lifetimes")."""
    held = np.dtype(array.dtype)
    logical = held if logical is None else np.dtype(logical)
    if not _dlpack_exportable(held):
        held = np.dtype(f"u{held.itemsize}")
        array = array.view(held)
    view = jax.dlpack.from_dlpack(array)
    if logical == held:
        return view
    bits = _SUB_BYTE_BITS.get(logical.name)
    if bits is None:
        result = jax.lax.bitcast_convert_type(view, logical)
    else:
        import ml_dtypes

        unsigned = np.dtype(getattr(ml_dtypes, f"uint{bits}"))
        result = (view & ((1 << bits) - 1)).astype(unsigned)  # the low bits, exactly (values < 2**bits)
        if unsigned != logical:
            result = jax.lax.bitcast_convert_type(result, logical)
    # LIFETIME: the view's CuPy memory is freed when ``view`` goes (see Notes), so only once the
    # kernels reading it are done; the arrays between them are XLA's, freed in stream order.
    return result.block_until_ready()


def _logical(ckpt: Checkpoint, names: list[str], dtype: Any) -> dict[str, np.dtype]:
    chooser = dtype_chooser(dtype)
    result = {}
    for name in names:
        info = ckpt.info(name)
        where = describe(ckpt.index.path, name)
        if info.dtype is None:
            raise UnsupportedError(f"{info.tf_dtype} tensors cannot be read: {where}")
        result[name] = check_dtype(restored_dtype(chooser, name, info.dtype), where)
    return result


def restore(
    ckpt: Checkpoint,
    names: NameSelector = None,
    *,
    device: Any = None,
    dtype: Any = None,
    verify: bool | None = None,
    threads: int | None = None,
    shardings: ShardingsLike = None,
) -> dict[str, jax.Array]:
    """:meth:`Checkpoint.restore` as ``{name: jax.Array}`` on ``device`` (JAX's default device
    when None; a jax Device, "cpu", "cuda:N"). Types JAX cannot hold now are refused by name
    before anything is read. See the module docs for where the memory comes from.

    Parameters
    ----------
    shardings : ``{name or regex: jax.sharding.Sharding or None}``: the tensors a key names (the
        exact name first, then the regular expressions, matched against whole names, in the
        order given; the first match decides) come back as global arrays laid out by that
        sharding, each distinct shard this process's devices hold read once and nothing else
        (the box its shards tile in one read, else each region by itself; see "Shardings" in
        the module docs); a None value, or no matching key, restores the tensor on ``device``
        as without ``shardings``. ``dtype=`` converts sharded tensors by the same rule, as they
        are read.
    """
    selected = [e.name for e in ckpt._select(names)]
    logical = _logical(ckpt, selected, dtype)
    if shardings is not None:
        chosen = sharding_for(selected, shardings)
        plans = {
            name: _plan_shards(ckpt, name, sharding, logical[name])
            for name, sharding in chosen.items()
            if sharding is not None
        }
        if plans:
            rest = [name for name in selected if name not in plans]
            unsharded = restore(ckpt, rest, device=device, dtype=dtype, verify=verify, threads=threads) if rest else {}
            placed = {name: _restore_planned(ckpt, plan, dtype, verify, threads) for name, plan in plans.items()}
            return {name: unsharded[name] if name in unsharded else placed[name] for name in selected}
    target = _jax_device(device)
    where = _gpuckpt_device(target)
    if where == "cpu":
        out = {name: aligned_empty(ckpt.info(name).shape, logical[name]) for name in selected}
        arrays = ckpt.restore(selected, device="cpu", out=out, dtype=dtype, verify=verify, threads=threads)
        return {name: _put(array, target) for name, array in arrays.items()}
    arrays = ckpt.restore(selected, device=where, dtype=dtype, verify=verify, threads=threads)
    return {name: from_dlpack(array, logical[name]) for name, array in arrays.items()}


# -- shardings -----------------------------------------------------------------------------------

ShardingsLike = Mapping[str | re.Pattern[str], jax.sharding.Sharding | None] | None


def sharding_for(names: Iterable[str], shardings: ShardingsLike) -> dict[str, jax.sharding.Sharding | None]:
    """Each name's sharding from a ``shardings=`` mapping: the key equal to the name, else the
    first key (a regular expression) matching the whole name, else None. Bad keys and values
    are InvalidArgumentErrors."""
    if shardings is None:
        return dict.fromkeys(names)
    if not isinstance(shardings, Mapping):
        raise InvalidArgumentError(f"shardings={shardings!r}: give a mapping {{name or regex: jax.sharding.Sharding}}")
    for key, value in shardings.items():
        if value is not None and not isinstance(value, jax.sharding.Sharding):
            raise InvalidArgumentError(f"shardings[{key!r}] is {value!r}, not a jax.sharding.Sharding (or None)")
    rules = NameRules(shardings.items(), "shardings")
    return {name: rules.lookup(name) for name in names}


Bounds = tuple[tuple[int, int, int], ...]  # (start, stop, step) per axis, as slice.indices gives them


@dataclasses.dataclass(frozen=True, slots=True)
class ShardGroup:
    """One distinct region of a tensor this process holds, and the local devices holding it."""

    region: tuple[slice, ...]  #: ``slice(start, stop, step)`` on every axis
    devices: tuple[Any, ...]  #: the first gets the host bytes, the others a device copy of them


@dataclasses.dataclass(frozen=True, slots=True)
class ShardPlan:
    """What one process reads of a sharded tensor: ``box`` (one read) when the distinct regions
    tile it, else each region by itself (``box`` None)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  #: the restored dtype
    sharding: jax.sharding.Sharding
    groups: tuple[ShardGroup, ...]
    box: tuple[slice, ...] | None  #: the regions' bounding box, when they tile it exactly


def _full(shape: tuple[int, ...]) -> Bounds:
    return tuple((0, dim, 1) for dim in shape)


def _bounds(region: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
    return tuple(s.indices(dim) for s, dim in zip(region, shape, strict=True))


def _plan_shards(ckpt: Checkpoint, name: str, sharding: jax.sharding.Sharding, dtype: np.dtype) -> ShardPlan:
    """The distinct regions of ``name`` that ``sharding`` puts on this process's devices, each
    with the devices holding it (devices grouped by their index in
    ``addressable_devices_indices_map``), and their bounding box when they tile it (always, on
    a process holding every shard: the box is then the whole tensor). Refuses, before anything
    is read, a sharding that does not fit the shape and devices gpuckpt cannot fill."""
    shape = ckpt.info(name).shape
    try:
        groups, box = _layout(sharding, shape)
    except (InvalidArgumentError, UnsupportedError) as exc:
        raise type(exc)(f"{exc}: {describe(ckpt.index.path, name)}") from None
    return ShardPlan(name, shape, dtype, sharding, groups, box)


@functools.lru_cache(maxsize=1024)
def _layout(
    sharding: jax.sharding.Sharding, shape: tuple[int, ...]
) -> tuple[tuple[ShardGroup, ...], tuple[slice, ...] | None]:
    """:func:`_plan_shards` for a sharding and a shape (the same for every layer of a model)."""
    try:
        check = getattr(sharding, "check_compatible_aval", None)  # JAX's own check of the rank
        if check is not None:
            check(shape)
        sharding.shard_shape(shape)  # and of the divisibility
        indices = sharding.addressable_devices_indices_map(shape)
    except (ValueError, TypeError, IndexError) as exc:
        raise InvalidArgumentError(f"{sharding} does not fit shape {shape} ({exc})") from None
    devices_by_region: dict[Bounds, list[Any]] = {}
    for device, index in indices.items():
        _gpuckpt_device(device)  # a host or CUDA device, else UnsupportedError
        devices_by_region.setdefault(_region_key(index, shape), []).append(device)
    groups = tuple(
        ShardGroup(tuple(slice(*b) for b in key), tuple(devices)) for key, devices in devices_by_region.items()
    )
    return groups, _tiled_box(list(devices_by_region), shape)


def _region_key(index: Any, shape: tuple[int, ...]) -> Bounds:
    """A device's index (a tuple of slices, None for the whole) as hashable bounds per axis."""
    if index is None:
        index = (slice(None),) * len(shape)
    if not isinstance(index, tuple) or len(index) != len(shape) or not all(isinstance(s, slice) for s in index):
        raise UnsupportedError(f"a shard index {index!r} that is not one slice per axis of {shape}")
    bounds = _bounds(index, shape)
    if any(step != 1 for _, _, step in bounds):
        raise UnsupportedError(f"a shard index {index!r} with a step")
    return bounds


def _tiled_box(regions: list[Bounds], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The bounding box of distinct regions when they tile it (a sharding's shards never
    overlap, so equal element counts mean no gaps), else None."""
    if not regions:
        return None
    box = tuple((min(r[axis][0] for r in regions), max(r[axis][1] for r in regions)) for axis in range(len(shape)))
    covered = sum(math.prod(stop - start for start, stop, _ in region) for region in regions)
    if covered != math.prod(stop - start for start, stop in box):
        return None
    return tuple(slice(start, stop, 1) for start, stop in box)


def _read_region(
    ckpt: Checkpoint,
    plan: ShardPlan,
    region: tuple[slice, ...],
    dtype: Any,
    verify: bool | None,
    threads: int | None,
) -> np.ndarray:
    """One region on the host, read into an :data:`ALIGNMENT`-aligned array of the restored
    dtype by ``Checkpoint.restore(regions=)``: only its bytes, converted as they are read; the
    whole tensor verified, a part not (the crc32c covers whole tensors)."""
    name = plan.name
    bounds = _bounds(region, plan.shape)
    out = {name: aligned_empty(tuple(stop - start for start, stop, _ in bounds), plan.dtype)}
    regions = None if bounds == _full(plan.shape) else {name: region}
    arrays = ckpt.restore([name], device="cpu", out=out, regions=regions, dtype=dtype, verify=verify, threads=threads)
    return arrays[name]


def _host_shards(
    ckpt: Checkpoint, plan: ShardPlan, dtype: Any, verify: bool | None, threads: int | None
) -> Iterator[tuple[ShardGroup, np.ndarray]]:
    """Each group's region on the host, aligned: cut from one read of the box when the regions
    tile it (one copy per region, none when the box is the one region), else read by itself."""
    if plan.box is None:
        for group in plan.groups:
            yield group, _read_region(ckpt, plan, group.region, dtype, verify, threads)
        return
    box = _read_region(ckpt, plan, plan.box, dtype, verify, threads)
    if len(plan.groups) == 1:
        yield plan.groups[0], box
        return
    origin = [start for start, _, _ in _bounds(plan.box, plan.shape)]
    for group in plan.groups:
        bounds = _bounds(group.region, plan.shape)
        within = tuple(slice(start - at, stop - at) for (start, stop, _), at in zip(bounds, origin, strict=True))
        piece = aligned_empty(box[within].shape, box.dtype)
        piece[...] = box[within]
        yield group, piece


def _shares_host_memory(device: Any) -> bool:
    """A device whose buffers are host memory (a CPU device): replicas there alias one host
    buffer, as ``jax.device_put`` of a numpy array onto a replicated sharding does."""
    return bool(device.platform == "cpu")


def _restore_planned(
    ckpt: Checkpoint, plan: ShardPlan, dtype: Any, verify: bool | None, threads: int | None
) -> jax.Array:
    """The global array of one planned tensor: each distinct region on the host once, put on the
    first of its devices, then copied device to device to the others (on CPU devices, which hold
    host memory, every device of the group aliases the one host array instead, as JAX's own
    ``device_put`` does)."""
    # LIFETIME: one tensor's box and regions on the host at a time (on CPU devices the regions
    # become the shards; the box is dropped once the regions are cut from it)
    hosts: list[np.ndarray] = []
    targets: list[Any] = []
    copies: list[tuple[int, Any]] = []  # (position in hosts of the region's first put, device)
    for group, host in _host_shards(ckpt, plan, dtype, verify, threads):
        first = len(hosts)
        for device in group.devices:
            if len(hosts) == first or _shares_host_memory(device):
                hosts.append(host)
                targets.append(device)
            else:
                copies.append((first, device))
    place = functools.partial(_in_memory_of, plan.sharding)
    shards = _put_each(hosts, [place(device) for device in targets])  # one batched call
    if copies:  # device to device, in one batched call: no region is read twice
        shards += jax.device_put([shards[at] for at, _ in copies], [place(device) for _, device in copies])
    return jax.make_array_from_single_device_arrays(plan.shape, plan.sharding, shards, dtype=plan.dtype)


def _in_memory_of(sharding: jax.sharding.Sharding, device: Any) -> Any:
    """Where a shard of ``sharding`` on ``device`` goes: the device itself, or its memory of the
    sharding's kind (``memory_kind="pinned_host"`` and the like, for host offload), so that the
    global array can be made of the shards."""
    kind = getattr(sharding, "memory_kind", None)
    return device if kind is None else jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def get_tensor(
    ckpt: Checkpoint,
    name: str,
    *,
    device: Any = None,
    dtype: Any = None,
    verify: bool | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> Any:
    """One tensor as a jax.Array (see :func:`restore`); with ``sharding``, the global array laid
    out by it, each of this process's distinct shards read once."""
    ckpt._entry(name)
    shardings: ShardingsLike = None if sharding is None else {name: sharding}
    return restore(ckpt, [name], device=device, dtype=dtype, verify=verify, shardings=shardings)[name]


# -- trees ----------------------------------------------------------------------------------------


def tree(flat: Mapping[str, Any], sep: str = "/", strip_attributes: bool = True) -> dict[str, Any]:
    """A nested dict by scope: ``{"encoder/layer_0/kernel": a}`` -> ``{"encoder": {"layer_0":
    {"kernel": a}}}`` (Flax's parameter shape). ``strip_attributes``: TF2 object-based keys lose
    their ``/.ATTRIBUTES/VARIABLE_VALUE``. A name that is also a scope of another
    (``"a"`` and ``"a/b"``) is an InvalidArgumentError naming both."""
    root: dict[str, Any] = {}
    owners: dict[tuple[str, ...], str] = {}
    for name, value in flat.items():
        key = name.removesuffix(_ATTRIBUTES) if strip_attributes else name
        parts = tuple(key.split(sep))
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidArgumentError(
                    f"{owners[parts[: depth + 1]]!r} is a tensor and {name!r} is under it: no tree holds both"
                )
            node = child
        if parts[-1] in node:
            other = owners.get(parts) or next(n for n, p in _names_under(owners, parts))
            raise InvalidArgumentError(f"{other!r} and {name!r} are both at {sep.join(parts)!r}: no tree holds both")
        node[parts[-1]] = value
        owners[parts] = name
    return root


def _names_under(owners: dict[tuple[str, ...], str], prefix: tuple[str, ...]) -> Iterable[tuple[str, tuple[str, ...]]]:
    return ((name, parts) for parts, name in owners.items() if parts[: len(prefix)] == prefix)


def restore_tree(ckpt: Checkpoint, names: NameSelector = None, *, sep: str = "/", **kwargs: Any) -> dict[str, Any]:
    """:func:`restore`, as a nested dict by scope (:func:`tree`)."""
    return tree(restore(ckpt, names, **kwargs), sep=sep)


def _path_name(path: tuple[Any, ...], sep: str) -> str:
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return sep.join(parts)


def flatten(params: Any, sep: str = "/") -> dict[str, Any]:
    """A pytree's leaves by their path joined with ``sep`` (``{"dense": {"kernel": a}}`` ->
    ``{"dense/kernel": a}``), the names :func:`load_into` maps checkpoint names onto."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_path_name(path, sep): leaf for path, leaf in leaves}


def _restored_for(stored: np.dtype, wanted: np.dtype) -> np.dtype:
    """Read floating tensors as the leaf's floating type (the project's rule, ``dtype=``)."""
    return wanted if convertible(stored, wanted) else stored


def load_into(
    params: Any,
    checkpoint: Checkpoint | str,
    mapping: MappingLike = None,
    *,
    strict: bool = True,
    sep: str = "/",
    verify: bool | None = None,
    threads: int | None = None,
) -> tuple[Any, LoadResult]:
    """A checkpoint into a pytree of arrays: returns ``(new_params, report)``.

    The targets are the leaves' paths joined with ``sep`` (:func:`flatten`), so a TF checkpoint's
    ``dense/kernel`` fills ``params["dense"]["kernel"]`` with no mapping at all. Each new leaf has
    the old leaf's shape and dtype (floating types converted by the project's rule as they are
    read, others cast) and is placed on the old leaf's sharding (a numpy leaf stays numpy); leaves
    nothing maps are kept as they are. ``strict=True`` refuses, before anything is read, when
    anything is missing, unexpected, unmapped or of the wrong shape (:class:`LoadError`); the
    report is :func:`gpuckpt.torch.load_into`'s.
    """
    if not isinstance(checkpoint, Checkpoint):
        with open_checkpoint(checkpoint) as ckpt:
            return load_into(params, ckpt, mapping, strict=strict, sep=sep, verify=verify, threads=threads)
    ckpt = checkpoint
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_path_name(path, sep) for path, _ in leaves]
    by_name = {name: leaf for name, (_, leaf) in zip(names, leaves, strict=True)}
    if len(by_name) != len(names):
        raise InvalidArgumentError(f"two leaves have the same path joined with {sep!r}")
    shapes = {name: tuple(np.shape(leaf)) for name, leaf in by_name.items()}
    result, matches, _ = plan_load(ckpt, mapping, shapes)
    path = ckpt.index.path
    if strict and not result.ok:
        raise LoadError(f"checkpoint does not fit the pytree: {result.describe()}: " + describe(path), result)
    for match in matches:
        leaf = by_name[match.target]
        if not _stays_on_host(leaf):  # JAX will hold it: refuse what JAX would narrow
            check_dtype(_leaf_dtype(leaf), describe(path, match.source))
    new = dict(by_name)
    # LIFETIME: one tensor's host copy at a time beyond the new leaves themselves
    for match in matches:
        leaf = by_name[match.target]
        wanted = _leaf_dtype(leaf)
        rule_type = None if match.rule is None else match.rule.numpy_dtype
        # a rule's floating type is read as such (rounded once, by the project's rule), else the leaf's
        restored = _restored_for(match.stored, rule_type if rule_type is not None else wanted)
        where = describe(path, match.source)
        array = ckpt.restore(
            [match.source],
            device="cpu",
            dtype={_escape(match.source): restored} if restored != match.stored else None,
            verify=verify,
            threads=threads,
        )[match.source]
        array = _transformed(array, match.rule, where)
        if array.dtype != wanted:
            array = _cast(array, wanted.name, where)
        if isinstance(leaf, np.ndarray):
            new[match.target] = array
        elif _stays_on_host(leaf):  # a number: the same kind of number
            new[match.target] = array[()] if isinstance(leaf, np.generic) else type(leaf)(array.item())
        else:
            host = aligned_empty(array.shape, array.dtype)
            host[...] = array
            # an uncommitted leaf (placed by JAX's default) stays uncommitted, free to follow
            # the arrays it meets; a committed one stays where it was put
            committed = getattr(leaf, "committed", True)
            new[match.target] = _put(host, leaf.sharding if committed else None)
    return jax.tree_util.tree_unflatten(treedef, [new[name] for name in names]), result


_NUMBERS = (bool, int, float, complex, np.generic)


def _stays_on_host(leaf: Any) -> bool:
    """A numpy array, a numpy scalar or a Python number: :func:`load_into` gives back the same
    kind, never a jax.Array, so JAX's limits on types do not apply to it."""
    return isinstance(leaf, (np.ndarray, *_NUMBERS))


def _leaf_dtype(leaf: Any) -> np.dtype:
    """A leaf's type: its ``dtype``, or numpy's for a Python number (int64, float64, ...)."""
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _escape(name: str) -> str:
    return re.escape(name)
