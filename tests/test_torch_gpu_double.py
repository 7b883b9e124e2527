"""gpuckpt.torch's GPU paths on the CuPy double: CuPy arrays handed to ``torch.from_dlpack``, and
CUDA parameters filled through ``cupy.from_dlpack`` views, with models of torch's DLPack consumer
and of a torch CUDA tensor (tests/cupy_double/dlpack_consumers.py) patched in for these tests
only. Values are compared bit for bit with the host path; no GPU needed."""

from __future__ import annotations

import gc

import cupy_double
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import gpuckpt  # noqa: E402
import gpuckpt.torch as gt  # noqa: E402
from gpuckpt.mapping import rule  # noqa: E402

TYPES = list(gt._SHARED) + list(gt._REINTERPRETED)


def _np_type(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name in gt._REINTERPRETED else np.dtype(name)


def _bits(tensor) -> bytes:
    t = tensor.contiguous()
    if t.dtype == torch.bool:
        return t.numpy().tobytes()
    if t.dtype.is_complex:
        t = torch.view_as_real(t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().tobytes()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    rng = np.random.default_rng(3)
    tensors = {}
    for name in TYPES:
        dtype = _np_type(name)
        raw = rng.integers(0, 256, 4 * 65 * dtype.itemsize, dtype=np.uint8)
        tensors[name] = (raw % 2).astype(bool).reshape(4, 65) if name == "bool" else raw.view(dtype).reshape(4, 65)
    tensors["scalar"] = np.float32(2.5)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    return gpuckpt.save(str(tmp_path_factory.mktemp("torchgpu") / "ckpt"), tensors), tensors


@pytest.fixture
def torch_gpu(monkeypatch):
    """The CuPy double with two devices, and torch's DLPack import the model's."""
    with cupy_double.installed(device_count=2, memory_bytes=64 << 20) as cupy:
        import dlpack_consumers

        model = dlpack_consumers.TorchModel()
        monkeypatch.setattr(torch, "from_dlpack", model.from_dlpack)
        model.cupy = cupy
        yield model


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_every_type_torch_holds_arrives_with_the_host_paths_bits_in_the_device_memory(bundle, torch_gpu, device):
    from cupy import _machine

    prefix, _ = bundle
    names = TYPES + ["scalar", "empty"]
    with gpuckpt.open(prefix) as ckpt:
        host = gt.restore(ckpt, names)
        ours = gt.restore(ckpt, names, device=device)
    index = int(device[-1])
    for name in names:
        assert ours[name].dtype == host[name].dtype and ours[name].shape == host[name].shape, name
        assert _bits(ours[name]) == _bits(host[name]), name
        if ours[name].numel():
            assert _machine.device_of_pointer(ours[name].data_ptr()) == index, name  # no copy: CuPy's memory


def test_torch_is_handed_the_cupy_array_and_passes_its_current_stream(bundle, torch_gpu):
    """torch/utils/dlpack.py, from_dlpack: ``__dlpack_device__`` first, then ``__dlpack__(
    max_version=(1, 0), stream=...)``: 1 for torch's default stream, else its current stream's
    pointer. gpuckpt must hand over the array (a capsule would get no stream at all)."""
    import cupy

    prefix, _ = bundle
    with gpuckpt.open(prefix) as ckpt:
        gt.restore(ckpt, ["float32"], device="cuda:0")
        with cupy.cuda.Device(1):
            stream = cupy.cuda.Stream(non_blocking=True)  # stands for torch's current stream on GPU 1
        torch_gpu.current_streams[1] = stream.ptr
        gt.restore(ckpt, ["bfloat16"], device="cuda:1")
    assert torch_gpu.calls == [
        ("__dlpack_device__", {}),
        ("__dlpack__", {"max_version": (1, 0), "stream": 1}),
        ("__dlpack_device__", {}),
        ("__dlpack__", {"max_version": (1, 0), "stream": stream.ptr}),
    ]


def test_a_tensor_keeps_cupys_memory_until_it_is_freed_and_then_cupys_pool_has_it(bundle, torch_gpu):
    """dlpack.pyx, _toDlpack: the capsule holds the exported array (Py_INCREF of
    ``manager_ctx``) until torch's tensor calls the deleter (DLConvertor.cpp, fromDLPackImpl:
    ``at::from_blob`` with the producer's deleter)."""
    import cupy

    prefix, values = bundle
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    with gpuckpt.open(prefix) as ckpt:
        tensor = gt.restore(ckpt, ["float32"], device="cuda:0")["float32"]
    gc.collect()
    assert pool.used_bytes() > before
    reused = [cupy.full(values["float32"].size, 7.0, cupy.float32) for _ in range(4)]  # the pool must not hand it out
    assert _bits(tensor) == values["float32"].tobytes()
    view = tensor.view(torch.int32)[1:]
    del tensor, reused
    gc.collect()
    assert pool.used_bytes() > before  # a view of the tensor still holds it
    del view
    gc.collect()
    assert pool.used_bytes() == before


# -- load_into a module on a GPU --------------------------------------------------------------------


def _cuda_module(torch_gpu, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: int):
    """CUDA parameters (requiring grad, as a module's do) of the model, zeroed."""
    tensors = {
        name: torch_gpu.empty(shape, dtype, device, requires_grad=True) for name, (shape, dtype) in shapes.items()
    }
    for tensor in tensors.values():
        tensor.host.zero_()
    return tensors


@pytest.fixture
def parameters(tmp_path):
    rng = np.random.default_rng(9)
    stored = {
        "dense/kernel": rng.standard_normal((6, 10)).astype(np.float32),  # transposed into a (10, 6) weight
        "dense/bias": rng.standard_normal(10).astype(np.float32),
        "half": rng.standard_normal(33).astype(np.float32),  # read as float16 (dtype=)
        "bf": rng.standard_normal((3, 7)).astype(ml_dtypes.bfloat16),
        "f8": rng.integers(0, 256, 40, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
        "steps": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }
    return gpuckpt.save(str(tmp_path / "m"), stored), stored


@pytest.mark.parametrize("device", [0, 1])
def test_load_into_cuda_parameters_writes_their_own_memory_through_cupy_views(
    torch_gpu, parameters, monkeypatch, device
):
    """``_device_view`` (cupy.from_dlpack of the detached parameter, viewed as CuPy holds the
    type) and the transformed path (a temporary through torch.from_dlpack, copied in): every
    parameter holds the host path's values and keeps its memory. cupy.from_dlpack makes the
    tensor's device current before ``__dlpack__`` (torch refuses to export a tensor of another
    device than the current one) and passes CuPy's current stream (the null stream as 1)."""
    prefix, stored = parameters
    targets = {
        "dense.weight": ((10, 6), torch.float32),
        "dense.bias": ((10,), torch.float32),
        "half": ((33,), torch.float16),
        "bf": ((3, 7), torch.bfloat16),
        "f8": ((40,), torch.float8_e4m3fn),
        "steps": ((5,), torch.int64),
        "mask": ((3,), torch.bool),
    }
    state = _cuda_module(torch_gpu, targets, device)
    pointers = {name: t.data_ptr() for name, t in state.items()}
    monkeypatch.setattr(gt, "_state", lambda module: (state, {id(t): [n] for n, t in state.items()}))
    mapping = [
        rule(r"dense/kernel", "dense.weight", transpose=True),
        rule(r"dense/bias", "dense.bias"),
        rule(r"(.*)", r"\1"),
    ]
    report = gt.load_into(torch.nn.Module(), prefix, mapping)
    assert sorted(report.loaded) == sorted(targets)
    expected = {
        "dense.weight": torch.from_numpy(stored["dense/kernel"].T.copy()),
        "dense.bias": torch.from_numpy(stored["dense/bias"]),
        "half": torch.from_numpy(stored["half"].astype(np.float16)),
        "bf": torch.from_numpy(stored["bf"].view(np.int16)).view(torch.bfloat16),
        "f8": torch.from_numpy(stored["f8"].view(np.uint8)).view(torch.float8_e4m3fn),
        "steps": torch.from_numpy(stored["steps"]),
        "mask": torch.from_numpy(stored["mask"]),
    }
    for name, tensor in state.items():
        assert tensor.data_ptr() == pointers[name], name
        assert _bits(tensor.host) == _bits(expected[name]), name
    exports = [kwargs for call, kwargs in torch_gpu.calls if call == "torch.__dlpack__"]
    assert len(exports) == 6 and all(kwargs == {"stream": 1, "max_version": (1, 0)} for kwargs in exports)
    imports = [kwargs for call, kwargs in torch_gpu.calls if call == "__dlpack__"]
    assert imports == [{"max_version": (1, 0), "stream": 1}]  # the transposed kernel's temporary
