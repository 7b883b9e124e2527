"""PyTorch and JAX on a real GPU: the checks issues 11 and 12 leave to a lent GPU. Every type
restored to a GPU equals the host path bit for bit, the tensors and arrays are the pipeline's own
memory (same data pointer: no second device copy), ``load_into`` fills CUDA parameters in place
and a pytree's GPU leaves with the host path's values, JAX shardings over the GPUs and
``gpuckpt.distributed`` on an NCCL group give the single-process restore's values.

Run by tools/gpu_session.sh on a lent GPU. Skipped everywhere else: the same paths are tested
without a GPU against models of torch's and JAX's DLPack import on the CuPy double
(tests/test_torch_gpu_double.py, tests/test_jax_gpu_double.py), which these tests confirm or
refute."""

from __future__ import annotations

import os

# JAX's GPU client takes 75% of the GPU's memory when it starts unless told not to
# (https://docs.jax.dev/en/latest/gpu_memory_allocation.html); CuPy restores share the GPU here.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gpuckpt  # noqa: E402
from gpuckpt.cuda import cuda_available  # noqa: E402

REAL_GPU = cuda_available()  # tools/gpu_preflight.py refuses a session where a module says False
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not REAL_GPU, reason="a real GPU only (the CuPy double has its own tests)"),
]


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        pytest.skip("JAX has no GPU here")
    return jax


def _values(dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, (5, 33)).astype(bool)
    if dtype.name in ("int4", "uint4", "int2", "uint2"):
        info = ml_dtypes.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max) + 1, (5, 33)).astype(dtype)
    if dtype.name == "float4_e2m1fn":
        return rng.integers(0, 16, (5, 33), dtype=np.uint8).view(dtype)
    return rng.integers(0, 256, 5 * 33 * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(5, 33)


TORCH_TYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
]  # fmt: skip
JAX_TYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16", "float32", "complex64",
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "int4", "uint4", "int2", "uint2", "float4_e2m1fn",
]  # fmt: skip
SPECIAL = ["scalar", "empty"]


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """One tensor of each type either framework holds, plus a scalar and an empty tensor. Each
    test below takes one name, so a type one framework's GPU build cannot handle fails alone."""
    rng = np.random.default_rng(11)
    names = sorted(set(TORCH_TYPES) | set(JAX_TYPES))
    types = {n: np.dtype(getattr(ml_dtypes, n)) if hasattr(ml_dtypes, n) else np.dtype(n) for n in names}
    tensors = {n: _values(t, rng) for n, t in types.items()}
    tensors["scalar"] = np.float32(1.5)
    tensors["empty"] = np.zeros((0, 3), np.float32)
    return gpuckpt.save(str(tmp_path_factory.mktemp("every") / "ckpt"), tensors)


# -- PyTorch -------------------------------------------------------------------------------------


def _torch_bits(tensor) -> bytes:
    torch = _torch()
    t = tensor.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        return t.numpy().tobytes()
    if t.dtype.is_complex:
        t = torch.view_as_real(t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().tobytes()


@pytest.mark.parametrize("name", TORCH_TYPES + SPECIAL)
def test_torch_every_type_on_the_gpu_is_the_host_paths_and_the_pipelines_own_memory(every_type, name):
    _torch()
    import gpuckpt.torch as gt

    with gpuckpt.open(every_type) as ckpt:
        host = gt.restore(ckpt, [name])[name]
        ours = gt.restore(ckpt, [name], device="cuda:0")[name]
        assert ours.device.type == "cuda" and ours.device.index == 0
        assert ours.dtype == host.dtype and ours.shape == host.shape
        assert _torch_bits(ours) == _torch_bits(host)
        array = ckpt.restore([name], device="cuda:0")[name]
        tensor = gt.to_torch(array, ckpt.info(name).dtype)
        if tensor.numel():
            assert tensor.data_ptr() == array.data.ptr  # no second device copy


def test_torch_load_into_fills_cuda_parameters_in_place_with_the_host_paths_values(tmp_path):
    torch = _torch()
    import gpuckpt.torch as gt
    from gpuckpt.mapping import LoadError, rule

    rng = np.random.default_rng(5)
    stored = {
        "dense/kernel": rng.standard_normal((6, 10)).astype(np.float32),  # transposed into (10, 6)
        "dense/bias": rng.standard_normal(10).astype(np.float32),
        "scale16": rng.standard_normal(33).astype(np.float32),  # converted to float16 (dtype=)
        "bf": rng.standard_normal((3, 7)).astype(ml_dtypes.bfloat16),
        "steps": np.arange(5, dtype=np.int64),
    }
    prefix = gpuckpt.save(str(tmp_path / "m"), stored)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = torch.nn.Linear(6, 10)
            self.scale16 = torch.nn.Parameter(torch.zeros(33, dtype=torch.float16))
            self.bf = torch.nn.Parameter(torch.zeros(3, 7, dtype=torch.bfloat16))
            self.register_buffer("steps", torch.zeros(5, dtype=torch.int64))

    mapping = [
        rule("dense/kernel", "dense.weight", transpose=True),
        rule("dense/bias", "dense.bias"),
        rule("(.*)", r"\1"),
    ]
    on_host, on_gpu = Model(), Model().cuda()
    pointers = {name: t.data_ptr() for name, t in on_gpu.state_dict().items()}
    gt.load_into(on_host, prefix, mapping)
    report = gt.load_into(on_gpu, prefix, mapping)
    assert sorted(report.loaded) == sorted(pointers)
    torch.cuda.synchronize()
    for name, tensor in on_gpu.state_dict().items():
        assert tensor.data_ptr() == pointers[name], name  # in place
        assert _torch_bits(tensor) == _torch_bits(on_host.state_dict()[name]), name
    untouched = _torch_bits(on_gpu.dense.weight)
    with pytest.raises(LoadError):  # strict: the kernel is not transposed, so its shape does not fit
        gt.load_into(on_gpu, prefix, [rule("dense/kernel", "dense.weight"), *mapping[1:]])
    assert _torch_bits(on_gpu.dense.weight) == untouched  # refused before anything was written


def test_torch_restore_under_a_side_stream_gives_tensors_work_on_it_can_use(tmp_path):
    """A restore while a torch side stream is current, and work queued on that stream: torch
    hands CuPy that stream (``__dlpack__(stream=)``, checked against a model of torch on the
    double). A restore has finished its copies before it returns, so this shows the path runs on
    a real torch, not the ordering itself."""
    torch = _torch()
    import gpuckpt.torch as gt

    values = np.arange(1 << 20, dtype=np.float32)
    prefix = gpuckpt.save(str(tmp_path / "s"), {"x": values})
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), gpuckpt.open(prefix) as ckpt:
        doubled = gt.restore(ckpt, ["x"], device="cuda:0")["x"] * 2
    stream.synchronize()
    assert np.array_equal(doubled.cpu().numpy(), values * 2)


# -- JAX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", JAX_TYPES + SPECIAL)
def test_jax_every_type_on_the_gpu_is_the_host_paths(every_type, name):
    _jax_gpu()
    import gpuckpt.jax as gj

    with gpuckpt.open(every_type) as ckpt:
        host = gj.restore(ckpt, [name], device="cpu")[name]
        ours = gj.restore(ckpt, [name], device="cuda:0")[name]
    assert ours.dtype == host.dtype and ours.shape == host.shape
    assert next(iter(ours.devices())).platform == "gpu"
    assert np.asarray(ours).tobytes() == np.asarray(host).tobytes()


def test_jax_takes_the_pipelines_own_memory(every_type):
    _jax_gpu()
    import gpuckpt.jax as gj

    with gpuckpt.open(every_type) as ckpt:
        array = ckpt.restore(["float32"], device="cuda:0")["float32"]
    view = gj.from_dlpack(array)
    assert view.unsafe_buffer_pointer() == array.data.ptr  # no second device copy
    view.block_until_ready()


def test_jax_load_into_gpu_leaves_gives_the_host_paths_values_on_their_devices(tmp_path):
    jax = _jax_gpu()
    import gpuckpt.jax as gj

    rng = np.random.default_rng(2)
    stored = {
        "dense/kernel": rng.standard_normal((6, 10)).astype(np.float32),
        "dense/bias": rng.standard_normal(10).astype(ml_dtypes.bfloat16),
    }
    prefix = gpuckpt.save(str(tmp_path / "p"), stored)
    gpu = jax.devices("gpu")[0]
    params = {"dense": {"kernel": np.zeros((6, 10), np.float32), "bias": np.zeros(10, ml_dtypes.bfloat16)}}
    on_gpu = jax.device_put(params, gpu)
    new, report = gj.load_into(on_gpu, prefix)
    assert sorted(report.loaded) == ["dense/bias", "dense/kernel"]
    for key, value in stored.items():
        leaf = new["dense"][key.split("/")[1]]
        assert leaf.devices() == {gpu}, key
        assert np.asarray(leaf).tobytes() == value.tobytes(), key


def test_jax_sharded_restore_on_the_gpus_equals_the_host_restore_and_its_conversion(tmp_path):
    """Issue 12's JAX check on GPUs: global arrays over a mesh of every GPU (one on the lent
    machine), split and replicated, each equal to the host restore; with ``dtype=``, to the
    host's conversion."""
    jax = _jax_gpu()
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import gpuckpt.jax as gj

    rng = np.random.default_rng(8)
    stored = {
        "kernel": rng.standard_normal((16, 24)).astype(np.float32),
        "table": rng.standard_normal((32, 8)).astype(np.float32),
    }
    prefix = gpuckpt.save(str(tmp_path / "sh"), stored)
    gpus = jax.devices("gpu")
    mesh = Mesh(np.array(gpus), ("x",))
    shardings = {"kernel": NamedSharding(mesh, P(None, "x")), "table": NamedSharding(mesh, P())}
    with gpuckpt.open(prefix) as ckpt:
        for dtype in (None, "bfloat16"):
            host = gj.restore(ckpt, device="cpu", dtype=dtype)
            ours = gj.restore(ckpt, shardings=shardings, dtype=dtype)
            for name, sharding in shardings.items():
                assert ours[name].sharding == sharding, (name, dtype)
                assert ours[name].dtype == host[name].dtype, (name, dtype)
                assert np.asarray(ours[name]).tobytes() == np.asarray(host[name]).tobytes(), (name, dtype)


# -- torch.distributed on NCCL -------------------------------------------------------------------


def test_distributed_restore_on_an_nccl_group_of_one_rank_on_the_gpu(tmp_path):
    """Issue 12's GPU check: what is shared travels between CUDA tensors on an NCCL group (one
    rank on the one GPU: NCCL takes one rank per device). Each mode's tensors equal a
    single-process read of their regions bit for bit."""
    torch = _torch()
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch has no NCCL here")
    import gpuckpt.distributed as gd

    rng = np.random.default_rng(4)
    stored = {
        "dense/kernel": rng.standard_normal((64, 96)).astype(np.float32),
        "embed": rng.standard_normal((100, 8)).astype(ml_dtypes.bfloat16),
        "bias": rng.standard_normal(7).astype(np.float16),
    }
    prefix = gpuckpt.save(str(tmp_path / "d"), stored)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        runs = {
            "own": dict(shardings={"dense/kernel": gd.Split(1)}),
            "own, replicated once": dict(shardings={"dense/kernel": gd.Split(1)}, replicated="once"),
            "once": dict(mode="once"),
            "once, as pieces": dict(shardings={"embed": gd.Split(0)}, mode="once"),
        }
        with gpuckpt.open(prefix) as ckpt:
            for label, kwargs in runs.items():
                got = gd.restore(prefix, timeout=60, **kwargs)
                assert sorted(got.tensors) == sorted(stored), label
                for name, tensor in got.tensors.items():
                    region = got.regions[name]
                    expected = ckpt.get_tensor(name, region=region) if region is not None else ckpt[name]
                    assert _torch_bits(tensor) == np.ascontiguousarray(expected).tobytes(), (label, name)
    finally:
        dist.destroy_process_group()
