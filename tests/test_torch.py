"""gpuckpt.torch: native torch tensors (every dtype bit for bit against the numpy path, zero-copy on
the host, the DLPack path through numpy's own DLPack export) and load_into (in place, strict
refusals before any write, the report load_state_dict gives)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="gpuckpt.torch needs PyTorch (pip install torch==2.13.0)")
ml_dtypes = pytest.importorskip("ml_dtypes")

import gpuckpt  # noqa: E402
import gpuckpt.torch as gt  # noqa: E402
from gpuckpt.mapping import NameMap, rule, skip  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bits(tensor: torch.Tensor) -> bytes:
    """The bytes of a host tensor (through an integer view, for the types numpy lacks)."""
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    t = tensor.contiguous()
    if t.dtype.is_complex:
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t.numpy().tobytes()
    return t.view(carrier[t.element_size()]).numpy().tobytes()


TORCH_TYPES = {
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
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
}
REFUSED = ["int4", "uint4", "int2", "uint2", "float4_e2m1fn", "float8_e4m3b11fnuz"]


def _np_type(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) and not hasattr(np, name) else np.dtype(name)


def _values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = _np_type(name)
    if name == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    # every bit pattern of the narrow floats (NaNs included), random patterns for the wide ones
    width = dtype.itemsize
    count = int(np.prod(shape))
    raw = rng.integers(0, 256, count * width, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    rng = np.random.default_rng(11)
    tensors = {name: _values(name, (3, 257), rng) for name in TORCH_TYPES}
    tensors["scalar"] = np.float32(2.5)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    for name in REFUSED:
        tensors[name] = np.zeros(5, _np_type(name))
    tensors["words"] = np.array([b"a", b"bc"], dtype=object)
    prefix = gpuckpt.save(str(tmp_path_factory.mktemp("dtypes") / "ckpt"), tensors)
    return prefix, tensors


def test_import_gpuckpt_imports_neither_torch_nor_jax():
    code = (
        "import sys, gpuckpt, gpuckpt.mapping, gpuckpt.presets\n"
        "assert not {'torch', 'jax'} & set(sys.modules), sorted({'torch', 'jax'} & set(sys.modules))\n"
        "import gpuckpt.torch\n"
        "assert 'torch' in sys.modules and 'jax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_dtype_torch_holds_equals_the_numpy_result_bit_for_bit(every_dtype):
    prefix, tensors = every_dtype
    with gpuckpt.open(prefix) as ckpt:
        names = list(TORCH_TYPES) + ["scalar", "empty"]
        ours = gt.restore(ckpt, names)
        reference = ckpt.restore(names)
        for name in names:
            tensor = ours[name]
            assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu", name
            expected = reference[name]
            assert tensor.dtype == TORCH_TYPES.get(name, torch.float32), name
            assert tuple(tensor.shape) == expected.shape, name
            assert _bits(tensor) == expected.tobytes(), name
        one = gt.get_tensor(ckpt, "bfloat16")
        assert one.dtype == torch.bfloat16 and _bits(one) == tensors["bfloat16"].tobytes()


def test_host_tensors_share_the_restored_arrays_memory(every_dtype, monkeypatch):
    prefix, _ = every_dtype
    seen = {}
    original = gpuckpt.Checkpoint.restore

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen.update(result)
        return result

    monkeypatch.setattr(gpuckpt.Checkpoint, "restore", spy)
    with gpuckpt.open(prefix) as ckpt:
        tensors = gt.restore(ckpt, ["float32", "bfloat16", "float8_e4m3fn", "complex64", "bool"])
    for name, tensor in tensors.items():  # no copy: the tensor is the numpy array's memory
        assert tensor.data_ptr() == seen[name].ctypes.data, name
    # the checkpoint is closed; the tensors own (through their arrays) their memory
    seen.clear()  # the arrays are gone; the tensors keep their memory alive
    import gc

    gc.collect()
    assert _bits(tensors["float32"]) == every_dtype[1]["float32"].tobytes()


def test_dtype_conversion_then_torch(every_dtype):
    prefix, _ = every_dtype
    with gpuckpt.open(prefix) as ckpt:
        ours = gt.restore(ckpt, ["float32", "int32"], dtype="bfloat16")
        reference = ckpt.restore(["float32", "int32"], dtype="bfloat16")
    assert ours["float32"].dtype == torch.bfloat16 and ours["int32"].dtype == torch.int32
    assert _bits(ours["float32"]) == reference["float32"].tobytes()


@pytest.mark.parametrize("name", REFUSED + ["words"])
def test_what_torch_cannot_hold_is_refused_by_name_before_any_read(every_dtype, name, monkeypatch):
    prefix, _ = every_dtype

    def no_read(*args, **kwargs):
        raise AssertionError("read before the refusal")

    with gpuckpt.open(prefix) as ckpt:
        monkeypatch.setattr(ckpt, "restore", no_read)
        with pytest.raises(gpuckpt.UnsupportedError, match=name if name != "words" else "string") as info:
            gt.restore(ckpt, ["float32", name])
        assert repr(name) in str(info.value)  # the tensor is named


@pytest.mark.parametrize("name", list(TORCH_TYPES))
def test_the_dlpack_path_device_arrays_take(every_dtype, name):
    """The GPU path (CuPy arrays through DLPack, float8/bfloat16 arriving as unsigned bytes) run
    with numpy arrays, which export DLPack on the host: same bits, same memory."""
    prefix, tensors = every_dtype
    expected = tensors[name]
    dtype = expected.dtype
    held = dtype if dtype.name in gt._SHARED else np.dtype(f"u{dtype.itemsize}")  # what CuPy holds
    array = np.ascontiguousarray(expected).view(held)
    tensor = gt.from_dlpack(array, dtype)
    assert tensor.dtype == TORCH_TYPES[name]
    assert tensor.data_ptr() == array.ctypes.data
    assert _bits(tensor) == expected.tobytes()


def test_torch_device_arguments():
    assert gt._device_arg(torch.device("cpu")) == "cpu"
    assert gt._device_arg(torch.device("cuda", 1)) == "cuda:1"
    with pytest.raises(gpuckpt.UnsupportedError):
        gt._device_arg(torch.device("meta"))


def test_cuda_without_a_gpu_is_device_unavailable(every_dtype):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    prefix, _ = every_dtype
    with gpuckpt.open(prefix) as ckpt, pytest.raises(gpuckpt.DeviceUnavailableError):
        gt.restore(ckpt, ["float32"], device="cuda")


# -- load_into -------------------------------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.dense = torch.nn.Linear(4, 3, dtype=dtype)
        self.norm = torch.nn.LayerNorm(3, dtype=dtype)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.head = torch.nn.Linear(3, 4, bias=False, dtype=dtype)
        self.tied = self.dense  # tied: the same parameters under two names


SMALL_MAP = NameMap(
    [
        skip(kinds=gpuckpt.mapping.NOT_MODEL_KINDS),
        rule(r"dense/kernel", "dense.weight", transpose=True),
        rule(r"dense/bias", "dense.bias"),
        rule(r"norm/(gamma|beta)", "norm.weight", reshape=(3,)),
        rule(r"norm/beta_", "norm.bias"),
        rule(r"head/kernel", "head.weight", reshape="target"),
        rule(r"steps", "steps", dtype="int64"),
    ]
)


@pytest.fixture()
def small_ckpt(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32),
        "dense/bias": rng.standard_normal(3).astype(np.float32),
        "norm/gamma": rng.standard_normal((1, 3)).astype(np.float32),
        "norm/beta_": rng.standard_normal(3).astype(np.float32),
        "head/kernel": rng.standard_normal((3, 4)).astype(np.float32).reshape(12),
        "steps": np.int32(7),
        "global_step": np.int64(100),
        "dense/kernel/Adam": np.zeros((4, 3), np.float32),
    }
    return gpuckpt.save(str(tmp_path / "small"), tensors), tensors


def test_load_into_writes_in_place_and_reports(small_ckpt):
    prefix, tensors = small_ckpt
    model = Small()
    pointers = {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()}
    result = gt.load_into(model, prefix, SMALL_MAP)
    assert result.ok, result.describe()
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.mismatched_keys == []
    assert set(result.skipped) == {"global_step", "dense/kernel/Adam"}
    assert {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()} == pointers
    assert np.array_equal(model.dense.weight.detach().numpy(), tensors["dense/kernel"].T)
    assert np.array_equal(model.tied.bias.detach().numpy(), tensors["dense/bias"])
    assert np.array_equal(model.norm.weight.detach().numpy(), tensors["norm/gamma"][0])
    assert np.array_equal(model.head.weight.detach().numpy(), tensors["head/kernel"].reshape(4, 3))
    assert model.steps.dtype == torch.int64 and int(model.steps) == 7
    assert isinstance(model.dense.weight, torch.nn.Parameter) and model.dense.weight.requires_grad


def test_direct_tensors_go_through_out_with_views_of_the_parameters(small_ckpt, monkeypatch):
    prefix, _ = small_ckpt
    model = Small()
    calls = []
    original = gpuckpt.Checkpoint.restore

    def spy(self, names=None, **kwargs):
        calls.append((list(names), kwargs.get("out")))
        return original(self, names, **kwargs)

    monkeypatch.setattr(gpuckpt.Checkpoint, "restore", spy)
    gt.load_into(model, prefix, SMALL_MAP)
    direct = [c for c in calls if c[1]]
    assert len(direct) == 1
    names, out = direct[0]
    assert set(names) == {"dense/bias", "norm/gamma", "norm/beta_", "head/kernel"}
    assert out["dense/bias"].ctypes.data == model.dense.bias.data_ptr()
    assert out["head/kernel"].ctypes.data == model.head.weight.data_ptr() and out["head/kernel"].shape == (12,)
    transformed = [n for c in calls if not c[1] for n in c[0]]
    assert sorted(transformed) == ["dense/kernel", "steps"]  # transposed; int32 cast to int64 by torch


def test_float_parameters_of_another_type_convert_by_the_projects_rule(small_ckpt):
    prefix, tensors = small_ckpt
    model = Small(dtype=torch.bfloat16)
    pointer = model.dense.bias.data_ptr()
    gt.load_into(model, prefix, SMALL_MAP)
    with gpuckpt.open(prefix) as ckpt:
        expected = ckpt.get_tensor("dense/bias", dtype="bfloat16")
        kernel = ckpt.get_tensor("dense/kernel", dtype="bfloat16")
    assert model.dense.bias.data_ptr() == pointer
    assert _bits(model.dense.bias.detach()) == expected.tobytes()
    assert _bits(model.dense.weight.detach()) == np.ascontiguousarray(kernel.T).tobytes()


def test_strict_refuses_before_writing_and_names_each_problem(small_ckpt, tmp_path):
    prefix, tensors = small_ckpt
    bad = dict(tensors)
    bad["dense/bias"] = np.zeros(5, np.float32)  # wrong shape
    bad["extra/thing"] = np.zeros(2, np.float32)  # no rule
    del bad["norm/beta_"]  # norm.bias missing
    bad_prefix = gpuckpt.save(str(tmp_path / "bad"), bad)
    model = Small()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with pytest.raises(gt.LoadError) as info:
        gt.load_into(model, bad_prefix, SMALL_MAP)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    for needle in ("norm.bias", "dense.bias", "[5]", "[3]", "extra/thing"):
        assert needle in message, needle
    result = info.value.result
    assert result.missing_keys == ["norm.bias"]
    assert result.unmapped_keys == ["extra/thing"]
    assert [(m.target, m.checkpoint_shape, m.target_shape) for m in result.mismatched_keys] == [
        ("dense.bias", (5,), (3,))
    ]
    for name, value in model.state_dict().items():  # nothing written, not even what fitted
        assert torch.equal(value, before[name]), name

    loose = gt.load_into(model, bad_prefix, SMALL_MAP, strict=False)
    assert not loose.ok and "dense.bias" not in loose.loaded and "dense.weight" in loose.loaded
    assert torch.equal(model.dense.bias, before["dense.bias"])
    assert np.array_equal(model.dense.weight.detach().numpy(), tensors["dense/kernel"].T)


def test_unexpected_targets_and_the_default_mapping(tmp_path):
    model = torch.nn.Linear(2, 2)
    prefix = gpuckpt.save(
        str(tmp_path / "same_names"),
        {"weight": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32), "global_step": np.int64(3)},
    )
    result = gt.load_into(model, prefix)  # same names; counters skipped
    assert result.ok and result.skipped == {"global_step": "kind counter"}
    assert torch.equal(model.weight, torch.ones(2, 2))
    result = gt.load_into(model, prefix, {"weight": "weight", "bias": "other.bias"}, strict=False)
    assert result.unexpected_keys == ["other.bias"] and result.sources == {"other.bias": "bias"}
    assert result.missing_keys == ["bias"]


def test_two_sources_for_one_tied_tensor_are_refused(small_ckpt):
    prefix, _ = small_ckpt
    both = NameMap([rule("dense/bias", "dense.bias"), rule("norm/beta_", "tied.bias")])
    with pytest.raises(gpuckpt.InvalidArgumentError, match="same tensor"):
        gt.load_into(Small(), prefix, both, strict=False)


def test_parameters_on_a_device_gpuckpt_cannot_fill_are_refused(small_ckpt):
    prefix, _ = small_ckpt
    model = torch.nn.Linear(4, 3, device="meta")
    with pytest.raises(gpuckpt.UnsupportedError, match="meta"):
        gt.load_into(model, prefix, {"dense/kernel": "weight", "dense/bias": "bias"}, strict=False)


def test_load_into_peak_host_memory_stays_bounded(tmp_path):
    """128 MiB of parameters (one layer's kernel transposed): load_into's peak resident memory above
    the model is the transposed tensor's temporary and the reader's buffers, not a second model
    (measured in a fresh process whose only earlier allocation is the model)."""
    rng = np.random.default_rng(0)
    tensors = {
        f"l{i}/kernel" if i == 0 else f"layers.{i}.weight": rng.standard_normal((2048, 2048), np.float32)
        for i in range(8)
    }
    prefix = gpuckpt.save(str(tmp_path / "big"), tensors)
    del tensors
    code = f"""
import os, resource, torch, gpuckpt, gpuckpt.torch as gt
from gpuckpt.mapping import NameMap, rule
os.system("cat {prefix}.data-* > /dev/null")
layers = torch.nn.ModuleList(torch.nn.Linear(2048, 2048, bias=False) for _ in range(8))
model = torch.nn.ModuleDict({{"layers": layers}})
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
start = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
names = NameMap([rule("l0/kernel", "layers.0.weight", transpose=True)], fallback=lambda n: n)
assert gt.load_into(model, {prefix!r}, names).ok
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((peak - start) >> 20)
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    above = int(done.stdout.split()[-1])
    print(f"load_into: peak resident memory {above} MiB above the model's 128 MiB")
    assert above < 48, f"load_into's peak was {above} MiB above the model's (a second model would be 128)"


def test_restore_async_hands_out_torch_tensors(every_dtype):
    prefix, tensors = every_dtype
    with gpuckpt.open(prefix) as ckpt:
        future = gt.restore_async(ckpt, ["bfloat16", "int32"])
        one = future.wait("bfloat16")
        assert one.dtype == torch.bfloat16 and _bits(one) == tensors["bfloat16"].tobytes()
        everything = future.result()
        assert future.done() and future.ready("int32")
        assert _bits(everything["int32"]) == tensors["int32"].tobytes()
        with pytest.raises(gpuckpt.UnsupportedError, match="int4"):
            gt.restore_async(ckpt, ["int4"])


def test_load_into_a_partitioned_tensor_in_place(tmp_path):
    whole = np.arange(40, dtype=np.float32).reshape(10, 4)
    parts = [((slice(0, 6), slice(None)), whole[:6]), ((slice(6, 10), slice(None)), whole[6:])]
    prefix = gpuckpt.save(str(tmp_path / "parts"), {"weight": gpuckpt.Partitioned((10, 4), parts)})
    embedding = torch.nn.Embedding(10, 4)
    pointer = embedding.weight.data_ptr()
    assert gt.load_into(embedding, prefix).ok
    assert embedding.weight.data_ptr() == pointer and np.array_equal(embedding.weight.detach().numpy(), whole)


def test_state_dict_keeps_a_scalar_a_scalar(tmp_path):
    prefix = gpuckpt.save(str(tmp_path / "s"), {"logit_scale": np.float32(2.5), "w": np.ones((2, 2), np.float32)})
    with gpuckpt.open(prefix) as ckpt:
        tensors, _ = gt.state_dict(ckpt, {"logit_scale": "logit_scale", "w": "w"})
    assert tensors["logit_scale"].shape == () and float(tensors["logit_scale"]) == 2.5


@pytest.mark.parametrize("kind", ["read-only", "big-endian", "negative strides"])
def test_from_numpy_copies_what_torch_cannot_share_and_keeps_its_shape(kind):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    for array in (values, np.array(np.float32(2.5))):  # a 0-d array too
        if kind == "read-only":
            array = array.copy()
            array.flags.writeable = False
        elif kind == "big-endian":
            array = array.astype(">f4")
        elif array.ndim:
            array = array[:, ::-1]
        tensor = gt.from_numpy(array)
        assert tuple(tensor.shape) == array.shape and np.array_equal(tensor.numpy(), array)


def test_load_into_an_empty_parameter(tmp_path):
    prefix = gpuckpt.save(str(tmp_path / "e"), {"empty": np.zeros((0, 4), np.float32), "w": np.ones(3, np.float32)})
    model = torch.nn.Module()
    model.empty = torch.nn.Parameter(torch.zeros(0, 4))
    model.w = torch.nn.Parameter(torch.zeros(3))
    report = gt.load_into(model, prefix)
    assert sorted(report.loaded) == ["empty", "w"] and float(model.w.detach().sum()) == 3.0


def test_a_stored_type_torch_cannot_hold_is_refused_by_name_before_anything_is_written(tmp_path):
    import ml_dtypes

    values = {"a_float": np.ones(3, np.float32), "b_nibbles": np.arange(4).astype(ml_dtypes.int4)}
    prefix = gpuckpt.save(str(tmp_path / "i4"), values)
    model = torch.nn.Module()
    model.a_float = torch.nn.Parameter(torch.zeros(3))
    model.register_buffer("b_nibbles", torch.zeros(4, dtype=torch.int8))
    with pytest.raises(gpuckpt.UnsupportedError, match="b_nibbles"):
        gt.load_into(model, prefix, strict=False)
    assert float(model.a_float.detach().sum()) == 0.0  # nothing written


def test_a_rules_floating_type_rounds_once_into_a_wider_parameter(tmp_path):
    """float64 -> a rule's bfloat16 -> a float32 parameter: the project's rule rounds to bfloat16
    once (as restore(dtype=) does); rounding to float32 first and then to bfloat16 would not."""
    value = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)], np.float64)  # a tie only after float32
    prefix = gpuckpt.save(str(tmp_path / "r"), {"w": value})
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(2))
    gt.load_into(model, prefix, [rule("w", "w", dtype="bfloat16")])
    with gpuckpt.open(prefix) as ckpt:
        once = ckpt.get_tensor("w", dtype="bfloat16").astype(np.float32)
    assert model.w.detach().numpy().tobytes() == once.tobytes()
