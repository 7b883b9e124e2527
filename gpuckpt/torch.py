"""PyTorch: checkpoints as ``torch.Tensor``s, and checkpoints restored into a live ``torch.nn.Module``.

``import gpuckpt`` never imports this module (nor torch); ``import gpuckpt.torch`` does::

    import gpuckpt, gpuckpt.torch
    with gpuckpt.open("bert_model.ckpt") as ckpt:
        tensors = gpuckpt.torch.restore(ckpt, ckpt.model_keys())          # {name: torch.Tensor} on the host
        kernel = gpuckpt.torch.get_tensor(ckpt, "dense/kernel", device="cuda:0")
        report = gpuckpt.torch.load_into(model, ckpt, mapping="bert")       # into the model's own storage

Dtypes
------
Every type a checkpoint holds that torch has: bool, the signed and unsigned integers (torch >= 2.3
has uint16/32/64), float16/32/64, complex64/128, bfloat16, float8_e4m3fn, float8_e5m2,
float8_e4m3fnuz and float8_e5m2fnuz (these five reinterpret the stored bytes: ``Tensor.view`` of
an integer tensor of the same width, no copy, no conversion). Quantized types arrive as their raw
integers, as from the numpy path. What torch cannot hold is refused by name, with
:class:`~gpuckpt.UnsupportedError`, before anything is read: strings, float8_e4m3b11fnuz, and
the sub-byte types int4, uint4, int2, uint2 and float4_e2m1fn (the checkpoint keeps one element
per byte; torch's ``int4``/``float4_e2m1fn_x2`` are packed or have no operations). ``dtype=``
converts floating tensors first, by the project's rule (see the README's "Conversions").

Lifetimes
---------
* Host: a tensor shares the memory of the numpy array the restore made (``torch.from_numpy``, no
  copy), which owns its memory; the tensor keeps that array alive, and closing the checkpoint
  does not touch it. (A numpy array torch cannot share, a read-only or byte-swapped one, is copied.)
* GPU: a tensor is the CuPy array the device pipeline filled, through DLPack
  (``torch.from_dlpack``): the same device memory, never a second device copy. torch calls the
  array's ``__dlpack_device__`` and then ``__dlpack__(max_version=(1, 0), stream=...)`` with its
  current stream of that device (1 for its default stream), which CuPy makes wait for CuPy's
  current stream; a restore returns once every tensor's copies and conversion have completed
  (its future waits on each tensor's event) anyway, so torch kernels on any stream see complete
  data. The memory stays CuPy's (its memory pool): the capsule holds a reference to the CuPy
  array until the last torch tensor over it (views included) is freed, and the memory then goes
  back to CuPy's pool, not torch's caching allocator. CuPy's pool hands a freed block to the
  next CuPy allocation at once, ordered only after work on the CuPy stream that was current
  when the restore ran (the null stream, torch's default stream, unless the caller set
  another): torch work still queued on another stream
  must be finished (``torch.cuda.current_stream().synchronize()``) before the last reference
  goes. Closing the checkpoint does not free device arrays already returned.
* ``load_into`` on a GPU writes into the parameters through CuPy views of them
  (``cupy.from_dlpack`` of the detached parameter): the view holds the parameter until it is
  dropped, once the restore is complete. ``cupy.from_dlpack`` makes the parameter's device
  current and passes CuPy's current stream (the null stream as 1), which torch orders after its
  own current stream, so the writes come after torch's queued work on the parameter. With
  CuPy's per-thread default stream (``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``) CuPy passes 2,
  which torch refuses (BufferError: "per-thread default stream is not supported").

The GPU code paths are tested on the CuPy double with models of torch's DLPack consumer and of
CUDA tensors (tests/test_torch_gpu_double.py), not yet on a GPU.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .casting import convertible, dtype_chooser, restored_dtype
from .checkpoint import Checkpoint, NameSelector
from .checkpoint import open as open_checkpoint
from .errors import InvalidArgumentError, UnsupportedError, describe
from .mapping import (
    ConvertResult,
    LoadError,
    LoadResult,
    MappingLike,
    MappingPlan,
    Rule,
    _transformed,
    as_name_map,
    batched,
    plan_load,
)

# numpy dtype name -> torch dtype, for the types torch.from_numpy / from_dlpack take as they are
_SHARED = {
    "bool": torch.bool,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
    "uint32": torch.uint32,
    "int64": torch.int64,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
# the ml_dtypes types torch has: their bytes go through as a signed integer of the same width,
# then Tensor.view(dtype) reinterprets them
_REINTERPRETED = {
    name: getattr(torch, name)
    for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
}
_REFUSED_WHY = {
    "int4": "stored one element per byte; torch.int4 is a packed type without operations",
    "uint4": "stored one element per byte; torch.uint4 is a packed type without operations",
    "int2": "stored one element per byte; torch.int2 is a packed type without operations",
    "uint2": "stored one element per byte; torch.uint2 is a packed type without operations",
    "float4_e2m1fn": "stored one element per byte; torch.float4_e2m1fn_x2 packs two per byte",
    "float8_e4m3b11fnuz": "torch has no float8_e4m3b11fnuz",
    "object": "string tensors have no torch type (restore them with Checkpoint.restore)",
}


def torch_dtype(dtype: Any, where: str = "") -> torch.dtype:
    """The torch dtype an array of numpy ``dtype`` becomes; UnsupportedError (naming the type and
    ``where``) for a type torch cannot hold."""
    np_dtype = np.dtype(dtype)
    name = np_dtype.name
    found = _SHARED.get(name) or _REINTERPRETED.get(name)
    if found is None:
        why = _REFUSED_WHY.get(name, "torch has no such type")
        raise UnsupportedError(f"{name} tensors cannot be torch tensors ({why})" + (f": {where}" if where else ""))
    return found


def numpy_dtype_of(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype (ml_dtypes for bfloat16 and float8) holding the values of torch ``dtype``."""
    for name, value in (*_SHARED.items(), *_REINTERPRETED.items()):
        if value == dtype:
            if name in _REINTERPRETED:
                import ml_dtypes

                return np.dtype(getattr(ml_dtypes, name))
            return np.dtype(name)
    raise UnsupportedError(f"{dtype} has no numpy counterpart in gpuckpt")


def _carrier(dtype: np.dtype) -> np.dtype:
    """What an array of ``dtype`` is viewed as before torch takes it: itself, or a signed integer of its width."""
    return dtype if dtype.name in _SHARED else np.dtype(f"i{dtype.itemsize}")


def from_numpy(array: np.ndarray, where: str = "") -> torch.Tensor:
    """A host tensor sharing ``array``'s memory (a copy only for an array torch cannot share:
    read-only, byte-swapped or with negative strides)."""
    wanted = torch_dtype(array.dtype, where)
    if not array.flags.writeable or not array.dtype.isnative or any(s < 0 for s in array.strides):
        array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)  # 0-d stays 0-d
    tensor = torch.from_numpy(array.view(_carrier(array.dtype)))
    return tensor if tensor.dtype == wanted else tensor.view(wanted)


def from_dlpack(array: Any, logical: Any = None, where: str = "") -> torch.Tensor:
    """A tensor over ``array``'s memory through DLPack (CuPy arrays on a GPU; anything with
    ``__dlpack__``), handed over as the array itself so that torch passes its stream. ``logical``:
    the dtype the array's bytes hold when it is not the array's own (float8, and bfloat16 where
    CuPy lacks it, arrive as uint8/uint16 bytes). The types torch reinterprets go as the signed
    integer of their width (CuPy exports no float8 code, and torch's DLPack import knows none:
    aten/src/ATen/DLConvertor.cpp, toScalarType), then ``Tensor.view(dtype)``, same width, no copy."""
    dtype = np.dtype(array.dtype)
    logical = dtype if logical is None else np.dtype(logical)
    wanted = torch_dtype(logical, where)
    if logical.itemsize != dtype.itemsize:
        raise InvalidArgumentError(f"a {dtype} array cannot hold {logical} values: {where}")
    carrier = _carrier(logical)
    tensor = torch.from_dlpack(array if dtype == carrier else array.view(carrier))
    return tensor if tensor.dtype == wanted else tensor.view(wanted)


def to_torch(array: Any, logical: Any = None, where: str = "") -> torch.Tensor:
    """A torch tensor over what a restore returned: numpy arrays through :func:`from_numpy`, device
    (CuPy) arrays through :func:`from_dlpack`; no copy either way."""
    if isinstance(array, np.ndarray):
        if logical is not None and np.dtype(logical) != array.dtype:
            array = array.view(np.dtype(logical))
        return from_numpy(array, where)
    return from_dlpack(array, logical, where)


def _device_arg(device: Any) -> Any:
    """A gpuckpt device for a torch device (``torch.device("cuda", 1)`` is ``"cuda:1"``)."""
    if isinstance(device, torch.device):
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
        raise UnsupportedError(f"device {device}: gpuckpt restores to the host or to CUDA devices")
    return device


def _restored_dtypes(ckpt: Checkpoint, names: list[str], dtype: Any) -> dict[str, np.dtype]:
    """Each tensor's restored numpy dtype, every one checked for a torch type before any read."""
    chooser = dtype_chooser(dtype)
    result = {}
    for name in names:
        stored = ckpt.info(name).dtype
        where = describe(ckpt.index.path, name)
        if stored is None:
            raise UnsupportedError(f"{ckpt.info(name).tf_dtype} tensors cannot be read: {where}")
        wanted = restored_dtype(chooser, name, stored)
        torch_dtype(wanted, where)
        result[name] = wanted
    return result


def restore(
    ckpt: Checkpoint,
    names: NameSelector = None,
    *,
    device: Any = None,
    dtype: Any = None,
    verify: bool | None = None,
    threads: int | None = None,
    progress: Any = None,
) -> dict[str, torch.Tensor]:
    """:meth:`Checkpoint.restore` as ``{name: torch.Tensor}``.

    ``device``: as for the checkpoint ("cpu", "cuda", "cuda:N", "auto", a map by prefix, a list)
    or a ``torch.device``. A tensor torch cannot hold is refused by name before anything is read.
    See the module docs for the lifetimes of the memory.
    """
    selected = [e.name for e in ckpt._select(names)]
    logical = _restored_dtypes(ckpt, selected, dtype)
    arrays = ckpt.restore(
        selected, device=_device_arg(device), dtype=dtype, verify=verify, threads=threads, progress=progress
    )
    return {n: to_torch(a, logical[n], describe(ckpt.index.path, n)) for n, a in arrays.items()}


class TorchFuture:
    """:meth:`Checkpoint.restore_async`'s future, handing out torch tensors: ``result()`` for all,
    ``wait(name)`` for one as soon as it is complete, ``ready(name)``, ``done()``."""

    def __init__(self, future: Any, logical: dict[str, np.dtype], path: str) -> None:
        self._future = future
        self._logical = logical
        self._path = path

    def _tensor(self, name: str, array: Any) -> torch.Tensor:
        return to_torch(array, self._logical[name], describe(self._path, name))

    def result(self) -> dict[str, torch.Tensor]:
        return {name: self._tensor(name, array) for name, array in self._future.result().items()}

    def wait(self, name: str) -> torch.Tensor:
        return self._tensor(name, self._future.wait(name))

    def ready(self, name: str) -> bool:
        return bool(self._future.ready(name))

    def done(self) -> bool:
        return bool(self._future.done())


def restore_async(
    ckpt: Checkpoint,
    names: NameSelector = None,
    *,
    device: Any = None,
    dtype: Any = None,
    verify: bool | None = None,
    threads: int | None = None,
    progress: Any = None,
) -> TorchFuture:
    """:func:`restore` started in the background (every refusal is raised here, before any read)."""
    selected = [e.name for e in ckpt._select(names)]
    logical = _restored_dtypes(ckpt, selected, dtype)
    future = ckpt.restore_async(
        selected, device=_device_arg(device), dtype=dtype, verify=verify, threads=threads, progress=progress
    )
    return TorchFuture(future, logical, ckpt.index.path)


def get_tensor(
    ckpt: Checkpoint, name: str, *, device: Any = None, dtype: Any = None, verify: bool | None = None
) -> torch.Tensor:
    """One tensor as a ``torch.Tensor`` (see :func:`restore`)."""
    ckpt._entry(name)
    return restore(ckpt, [name], device=device, dtype=dtype, verify=verify)[name]


def state_dict(
    ckpt: Checkpoint, mapping: MappingLike = None, *, allow_unmapped: bool = False, verify: bool | None = None
) -> tuple[dict[str, torch.Tensor], ConvertResult]:
    """The checkpoint as a torch state dict under ``mapping``'s target names, transforms applied
    (host tensors; what :func:`gpuckpt.mapping.convert` writes, for ``torch.save``). Names no
    rule maps are refused (InvalidArgumentError) unless ``allow_unmapped``."""
    path = ckpt.index.path
    plan = as_name_map(mapping).plan(ckpt.keys(), kind=ckpt.kind, where=describe(path))
    if plan.unmapped and not allow_unmapped:
        raise InvalidArgumentError(f"no rule maps {', '.join(plan.unmapped)}: " + describe(path))
    sources = sorted(plan.mapped, key=lambda n: plan.mapped[n].target)
    _restored_dtypes(ckpt, sources, None)
    arrays = ckpt.restore(sources, device="cpu", verify=verify)
    tensors = {}
    for source in sources:
        mapped = plan.mapped[source]
        where = describe(path, source)
        tensors[mapped.target] = from_numpy(_transformed(arrays.pop(source), mapped.rule, where), where)
    return tensors, ConvertResult({plan.mapped[s].target: s for s in sources}, dict(plan.skipped), list(plan.unmapped))


# -- restoring into a module ---------------------------------------------------------------------


@dataclasses.dataclass
class _Write:
    source: str
    target: str
    tensor: torch.Tensor
    rule: Rule | None
    stored: np.dtype  #: the checkpoint's dtype
    restored: np.dtype  #: what the read gives (dtype= converts floating types by the project's rule)
    shape: tuple[int, ...]  #: the checkpoint's shape

    @property
    def direct(self) -> bool:
        """Read straight into the target's memory: same type, no transpose or cast, contiguous."""
        changed = self.rule is not None and self.rule.has_transform
        return not changed and self.tensor.is_contiguous() and torch_dtype(self.restored) == self.tensor.dtype


def _restored_for(stored: np.dtype, target: torch.dtype) -> np.dtype:
    """What to read a tensor stored as ``stored`` as, for a target of type ``target``: the
    target's type when ``dtype=`` converts to it (floating types, the project's rule), else as stored
    (and torch casts after the read, as ``load_state_dict``'s ``copy_`` does)."""
    try:
        wanted = numpy_dtype_of(target)
    except UnsupportedError:
        return stored
    return wanted if convertible(stored, wanted) else stored


def _read_as(stored: np.dtype, rule: Rule | None, target: torch.dtype) -> np.dtype:
    """What to read a tensor as: a rule's floating type when ``dtype=`` converts to it (so the
    value is rounded once, by the project's rule, and then widened exactly into the target if
    need be), else :func:`_restored_for` the target."""
    wanted = None if rule is None else rule.numpy_dtype
    if wanted is not None:
        return wanted if convertible(stored, wanted) else stored
    return _restored_for(stored, target)


def _state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, list[str]]]:
    """The module's state dict entries (the Parameter and buffer objects themselves) and, for
    each tensor, every name it has (tied weights have several)."""
    state = module.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    return state, aliases


def _numpy_view(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A numpy array over a host tensor's own memory, of the numpy ``dtype`` matching its type."""
    carrier = torch_dtype(_carrier(dtype))
    data = tensor.detach()
    view = (data if data.dtype == carrier else data.view(carrier)).numpy()
    view = view if view.dtype == dtype else view.view(dtype)
    if tensor.numel() and view.ctypes.data != tensor.data_ptr():  # an empty tensor's data_ptr() is 0
        raise RuntimeError(f"gpuckpt: a numpy view of a {tensor.dtype} tensor is not its storage")
    return view


def _device_view(tensor: torch.Tensor, dtype: np.dtype, device: Any) -> Any:
    """A CuPy array over a CUDA tensor's own memory (DLPack), of the dtype the device pipeline
    restores ``dtype`` into (CuPy holds float8, and bfloat16 where it lacks it, as unsigned
    integers of their width). The tensor is exported detached (torch refuses one that requires
    grad) and, for bfloat16 and float8, as the signed integer of its width: torch exports no
    float8 (DLConvertor.cpp, getDLDataType) and CuPy imports bfloat16 only with ml_dtypes and
    NumPy >= 2.1.2 (cupy/_core/dlpack.pyx, _dlpack_to_cupy_array); ``ndarray.view`` (unchecked)
    then makes the held type. The CuPy array keeps the tensor alive (torch's capsule deleter)."""
    import cupy

    from .devices import resolve_device

    held = resolve_device(device).array_dtype(dtype)
    carrier = torch_dtype(_carrier(dtype))
    data = tensor.detach()
    array = cupy.from_dlpack(data if data.dtype == carrier else data.view(carrier))
    return array if array.dtype == held else array.view(held)


def _apply(rule: Rule | None, tensor: torch.Tensor, target_shape: tuple[int, ...]) -> torch.Tensor:
    """The rule's transforms, in order (reshape, transpose, dtype), on the tensor's device."""
    if rule is None:
        return tensor
    if rule.reshape is not None:
        tensor = tensor.reshape(rule.reshaped_shape(tuple(tensor.shape), target_shape))
    axes = rule.axes(tensor.dim())
    if axes is not None:
        tensor = tensor.permute(axes)
    if rule.numpy_dtype is not None:
        tensor = tensor.to(torch_dtype(rule.numpy_dtype))
    return tensor


def plan_into(
    module: torch.nn.Module, ckpt: Checkpoint, mapping: MappingLike = None
) -> tuple[LoadResult, list[_Write], MappingPlan]:
    """What :func:`load_into` would do, without reading or writing anything."""
    state, _ = _state(module)
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    result, matches, plan = plan_load(ckpt, mapping, shapes, identity=lambda name: id(state[name]))
    writes = [
        _Write(
            m.source,
            m.target,
            state[m.target],
            m.rule,
            m.stored,
            _read_as(m.stored, m.rule, state[m.target].dtype),
            m.shape,
        )
        for m in matches
    ]
    return result, writes, plan


#: Tensors read into a temporary before a transform (transpose, cast) are read in groups of at most
#: this many bytes, so host memory beyond the model stays bounded whatever the checkpoint holds.
TRANSFORM_BATCH_BYTES = 64 << 20


def load_into(
    module: torch.nn.Module,
    checkpoint: Checkpoint | str,
    mapping: MappingLike = None,
    *,
    strict: bool = True,
    verify: bool | None = None,
    threads: int | None = None,
) -> LoadResult:
    """Restore a checkpoint into ``module``'s existing parameters and buffers, in place.

    Parameters
    ----------
    module : a ``torch.nn.Module``; its ``state_dict()`` names are the targets (tied weights are
        filled once, through any of their names).
    checkpoint : an open :class:`~gpuckpt.Checkpoint` or a path (opened and closed here).
    mapping : how checkpoint names become the module's names: None (the same names; optimizer
        state and counters skipped), a preset ("bert", "gpt2"), a JSON rules file, a dict of names,
        a list of :func:`gpuckpt.mapping.rule`\\ s, or a :class:`gpuckpt.mapping.NameMap`.
    strict : refuse, before anything is written, when anything is missing, unexpected, unmapped
        or of the wrong shape (:class:`LoadError`, a RuntimeError, naming each); False loads
        what fits and reports the rest.

    Returns
    -------
    LoadResult : missing, unexpected and mismatched names (as ``load_state_dict`` reports them),
        unmapped and skipped checkpoint names, and what was loaded from where.

    Notes
    -----
    A tensor that needs no transform is read straight into the parameter's storage: on the host
    through ``restore(out={name: numpy view of the parameter})``, on a GPU through the device
    ``out=`` path with a CuPy view of the parameter (DLPack), so the parameter's ``data_ptr()`` is
    unchanged and no second copy of the model exists. Floating tensors stored in another floating
    type are converted by the project's rule as they are read (``dtype=``). A tensor a rule
    transposes or casts to a type ``dtype=`` cannot produce is read into a temporary on the
    parameter's device, transformed there, and copied into the parameter (``Tensor.copy_``);
    these are read in groups of at most :data:`TRANSFORM_BATCH_BYTES`, so the host holds at most
    that much beyond the model (and, on a GPU, the device holds that much more). A rule's
    floating ``dtype`` is read as that type (rounded once, by the project's rule) and widened
    exactly into a wider parameter. A read that fails part-way (a damaged tensor:
    ChecksumError, naming it) leaves the parameters filled before it, and the damaged one, as
    written: load again from a good checkpoint.
    """
    if isinstance(checkpoint, Checkpoint):
        return _load(module, checkpoint, mapping, strict, verify, threads)
    with open_checkpoint(checkpoint) as ckpt:
        return _load(module, ckpt, mapping, strict, verify, threads)


def _load(
    module: torch.nn.Module,
    ckpt: Checkpoint,
    mapping: MappingLike,
    strict: bool,
    verify: bool | None,
    threads: int | None,
) -> LoadResult:
    result, writes, _ = plan_into(module, ckpt, mapping)
    path = ckpt.index.path
    if strict and not result.ok:
        raise LoadError(
            f"checkpoint does not fit {type(module).__name__}: {result.describe()}: " + describe(path), result
        )
    for write in writes:
        torch_dtype(write.restored, describe(path, write.source))  # int4 and the like, by name, before any write
        if write.tensor.device.type not in ("cpu", "cuda"):
            raise UnsupportedError(
                f"{write.target} is on device {write.tensor.device}; gpuckpt fills host and CUDA tensors: "
                + describe(path, write.source)
            )
    by_device: dict[str, list[_Write]] = {}
    for write in writes:
        by_device.setdefault(_device_arg(write.tensor.device), []).append(write)
    with torch.no_grad():
        for device, group in by_device.items():
            _fill_direct(ckpt, device, [w for w in group if w.direct], verify, threads)
            _fill_transformed(ckpt, device, [w for w in group if not w.direct], verify, threads)
    return result


def _dtype_arg(writes: Iterable[_Write]) -> dict[str, np.dtype] | None:
    casts = {re.escape(w.source): w.restored for w in writes if w.restored != w.stored}
    return casts or None


def _fill_direct(ckpt: Checkpoint, device: str, writes: list[_Write], verify: bool | None, threads: int | None) -> None:
    """One restore, straight into the targets' memory (``out=``)."""
    if not writes:
        return
    if device == "cpu":
        out = {w.source: _numpy_view(w.tensor, w.restored).reshape(w.shape) for w in writes}
    else:
        out = {w.source: _device_view(w.tensor, w.restored, device).reshape(w.shape) for w in writes}
    ckpt.restore(
        [w.source for w in writes], device=device, out=out, dtype=_dtype_arg(writes), verify=verify, threads=threads
    )


def _fill_transformed(
    ckpt: Checkpoint, device: str, writes: list[_Write], verify: bool | None, threads: int | None
) -> None:
    """Read into temporaries on the targets' device, transform there, copy into the targets."""
    for batch in batched(writes, lambda write: ckpt.info(write.source).nbytes, TRANSFORM_BATCH_BYTES):
        arrays = ckpt.restore(
            [w.source for w in batch], device=device, dtype=_dtype_arg(batch), verify=verify, threads=threads
        )
        for w in batch:
            value = to_torch(arrays.pop(w.source), w.restored, describe(ckpt.index.path, w.source))
            w.tensor.copy_(_apply(w.rule, value, tuple(w.tensor.shape)))
            del value  # LIFETIME: each temporary goes as soon as its target holds the values
