"""gpuckpt.save: TensorFlow reads back bit for bit what it writes; crashes leave old or new, never broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_bit_exact, tf_or_skip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuckpt
from gpuckpt import Partitioned
from gpuckpt import writer as writer_module

NUMPY_TYPES = [
    np.float32,
    np.float64,
    np.float16,
    ml_dtypes.bfloat16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
    ml_dtypes.float8_e5m2,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e4m3b11fnuz,
    ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.int4,
    ml_dtypes.uint4,
    ml_dtypes.int2,
    ml_dtypes.uint2,
    ml_dtypes.float4_e2m1fn,
]


def _random_array(rng, np_type, shape):
    if np_type is np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    dtype = np.dtype(np_type)
    raw = rng.integers(0, 256, int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if np_type is ml_dtypes.float4_e2m1fn:  # every value: the low 4 bits of a byte
        return rng.integers(0, 16, shape, dtype=np.uint8).view(dtype)
    if np_type in (ml_dtypes.int4, ml_dtypes.uint4, ml_dtypes.int2, ml_dtypes.uint2):  # every value, in range
        info = ml_dtypes.iinfo(dtype)
        return rng.integers(int(info.min), int(info.max) + 1, shape).astype(dtype)
    return raw.view(dtype).reshape(shape)  # every bit pattern, NaN payloads included


names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    names=st.lists(names, min_size=1, max_size=12, unique=True),
    max_shard_bytes=st.one_of(st.none(), st.integers(1, 400)),
)
def test_tensorflow_reads_back_what_we_write(tmp_path_factory, seed, names, max_shard_bytes):
    tf = tf_or_skip()
    rng = np.random.default_rng(seed)
    tensors = {}
    for name in names:
        shape = tuple(int(d) for d in rng.integers(0, 5, rng.integers(0, 4)))
        kind = int(rng.integers(0, len(NUMPY_TYPES) + 1))
        if kind == len(NUMPY_TYPES):
            count = int(np.prod(shape))
            tensors[name] = np.array(
                [rng.bytes(int(rng.choice([0, 3, 130]))) for _ in range(count)] + [b""], dtype=object
            )[:count].reshape(shape)
        else:
            tensors[name] = _random_array(rng, NUMPY_TYPES[kind], shape)
    prefix = gpuckpt.save(str(tmp_path_factory.mktemp("w") / "ck"), tensors, max_shard_bytes=max_shard_bytes)
    reader = tf.train.load_checkpoint(prefix)
    assert sorted(reader.get_variable_to_shape_map()) == sorted(tensors)
    with gpuckpt.open(prefix) as ckpt:
        for name, value in tensors.items():
            theirs = reader.get_tensor(name)
            assert_bit_exact(ckpt.get_tensor(name), theirs, name)
            assert_bit_exact(np.asarray(value), theirs, name)


def test_byte_layout_matches_tensorflow_writer(tmp_path):
    """The worked example of FORMAT.md 2.9: TF's exact 138-byte index and 15-byte data file."""
    prefix = gpuckpt.save(str(tmp_path / "ex"), {"a": np.array([1.0, 2.0], np.float32), "s": b"hi"})
    from test_table import WORKED_INDEX

    assert Path(prefix + ".index").read_bytes() == WORKED_INDEX
    assert Path(prefix + ".data-00000-of-00001").read_bytes() == bytes.fromhex("0000803f0000004002d8d810736869")


def test_partitioned_and_strings_read_by_tensorflow(tmp_path):
    tf = tf_or_skip()
    full = np.arange(30, dtype=np.float32).reshape(10, 3)
    tensors = {
        "pv": Partitioned((10, 3), [((slice(0, 4), slice(0, 3)), full[:4]), ((slice(4, 10), slice(None)), full[4:])]),
        "words": np.array(["caf\u00e9", "", "x" * 300]),
        "scalar": b"one",
    }
    prefix = gpuckpt.save(str(tmp_path / "p"), tensors, max_shard_bytes=64)
    reader = tf.train.load_checkpoint(prefix)
    np.testing.assert_array_equal(reader.get_tensor("pv"), full)
    assert list(reader.get_tensor("words")) == ["caf\u00e9".encode(), b"", b"x" * 300]
    assert reader.get_tensor("scalar") == b"one"
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.info("pv").partitioned and ckpt.num_shards > 1


def test_bad_inputs_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="tile"):
        gpuckpt.save(str(tmp_path / "a"), {"p": Partitioned((4,), [((slice(0, 2),), np.ones(2))])})
    with pytest.raises(ValueError, match="shape"):
        gpuckpt.save(str(tmp_path / "a"), {"p": Partitioned((4,), [((slice(0, 4),), np.ones(3))])})
    with pytest.raises(gpuckpt.UnsupportedError):
        gpuckpt.save(str(tmp_path / "a"), {"x": np.array([object()], dtype=object)})
    with pytest.raises(ValueError):
        gpuckpt.save(str(tmp_path / "a"), {"": np.ones(1)})
    assert os.listdir(tmp_path) == []
    gpuckpt.save(str(tmp_path / "a"), {"x": np.ones(1)})
    with pytest.raises(FileExistsError):
        gpuckpt.save(str(tmp_path / "a"), {"x": np.zeros(1)})
    gpuckpt.save(str(tmp_path / "a"), {"x": np.zeros(1)}, overwrite=True)
    with gpuckpt.open(tmp_path / "a") as ckpt:
        assert ckpt.get_tensor("x")[0] == 0


def test_state_file_is_kept_like_checkpoint_manager(tmp_path):
    tf = tf_or_skip()
    for step in range(1, 5):
        gpuckpt.save(str(tmp_path / f"ckpt-{step}"), {"step": np.int64(step)}, update_state=True, max_to_keep=2)
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-3", "ckpt-4"]
    assert not os.path.exists(tmp_path / "ckpt-1.index") and not os.path.exists(tmp_path / "ckpt-2.data-00000-of-00001")
    assert gpuckpt.load_checkpoint(str(tmp_path)).get_tensor("step") == 4
    # A directory with a state file gets it updated by default; one without does not get one.
    gpuckpt.save(str(tmp_path / "ckpt-5"), {"step": np.int64(5)})
    assert gpuckpt.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-5")
    gpuckpt.save(str(tmp_path / "other" / "x"), {"a": np.ones(1)})
    assert not os.path.exists(tmp_path / "other" / "checkpoint")


def _count_steps(tmp_path, overwrite=False):
    steps = []
    original = writer_module._after_step
    probe = str(tmp_path / "probe" / "ck")
    if overwrite:
        gpuckpt.save(probe, {"a": np.ones(3)}, update_state=True)
    writer_module._after_step = steps.append
    try:
        gpuckpt.save(
            probe, {"a": np.ones(3), "b": np.zeros(2)}, max_shard_bytes=8, update_state=True, overwrite=overwrite
        )
    finally:
        writer_module._after_step = original
    return steps


def _old_and_new(tmp_path):
    old = {"a": np.full(3, 1.0), "b": np.full(2, 1.0)}
    new = {"a": np.full(3, 2.0), "b": np.full(2, 2.0)}
    gpuckpt.save(str(tmp_path / "ck"), old, max_shard_bytes=8, update_state=True)
    return old, new


def _assert_old_or_new(tmp_path, old, new):
    with gpuckpt.open(tmp_path) as ckpt:  # the directory's latest checkpoint
        got = ckpt.restore()
    assert any(all(np.array_equal(got[k], v[k]) for k in v) for v in (old, new)), got


def test_exception_at_every_step_leaves_old_or_new_and_no_litter(tmp_path, monkeypatch):
    steps = _count_steps(tmp_path, overwrite=True)
    assert "old checkpoint removed" in steps
    for fail_at in range(len(steps)):
        case = tmp_path / f"case{fail_at}"
        old, new = _old_and_new(case)
        calls = []

        def crash(step, calls=calls, fail_at=fail_at):
            calls.append(step)
            if len(calls) == fail_at + 1:
                raise KeyboardInterrupt(step)

        monkeypatch.setattr(writer_module, "_after_step", crash)
        with pytest.raises(KeyboardInterrupt):
            gpuckpt.save(str(case / "ck"), new, max_shard_bytes=8, overwrite=True)
        monkeypatch.setattr(writer_module, "_after_step", lambda step: None)
        assert not [n for n in os.listdir(case) if "tempstate" in n]
        if steps.index("old checkpoint removed") > fail_at:  # before it, the old one is untouched
            with gpuckpt.open(case / "ck") as ckpt:
                got = ckpt.restore()
            assert set(got) == set(old) and all(np.array_equal(got[k], old[k]) for k in old)
        try:
            _assert_old_or_new(case, old, new)
        except FileNotFoundError:
            # a failure during the renames after the old one was removed: no checkpoint at all is
            # allowed, a broken one is not
            assert not os.path.exists(case / "ck.index")


def test_hard_crash_at_every_step_never_breaks_a_second_checkpoint(tmp_path):
    """A process killed (os._exit) between steps of writing ckpt-2: ckpt-1 and the state file stay usable."""
    steps = _count_steps(tmp_path)
    for crash_at in range(len(steps)):
        case = tmp_path / f"hard{crash_at}"
        gpuckpt.save(str(case / "ckpt-1"), {"a": np.full(3, 1.0)}, update_state=True)
        code = (
            "import os, numpy as np, gpuckpt\n"
            "from gpuckpt import writer\n"
            "calls = []\n"
            "def crash(step):\n"
            "    calls.append(step)\n"
            f"    if len(calls) == {crash_at + 1}: os._exit(3)\n"
            "writer._after_step = crash\n"
            f"gpuckpt.save({str(case / 'ckpt-2')!r}, {{'a': np.full(3, 2.0), 'b': np.ones(2)}}, max_shard_bytes=8)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode in (0, 3), result.stderr
        latest = gpuckpt.latest_checkpoint(case)
        with gpuckpt.open(latest) as ckpt:
            value = ckpt.get_tensor("a")
        assert value[0] == (2.0 if latest.endswith("ckpt-2") else 1.0)
        if os.path.exists(case / "ckpt-2.index"):
            with gpuckpt.open(case / "ckpt-2") as ckpt:
                assert ckpt.restore()["b"].tolist() == [1.0, 1.0]


def test_device_arrays_without_cupy_are_refused_clearly(tmp_path, monkeypatch):
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (0, False), "version": 3}

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(gpuckpt.DeviceUnavailableError, match="CuPy"):
        gpuckpt.save(str(tmp_path / "d"), {"x": FakeDeviceArray()})
    assert os.listdir(tmp_path) == []


def test_python_scalars_and_strings(tmp_path):
    prefix = gpuckpt.save(str(tmp_path / "s"), {"f": 1.5, "i": 7, "b": True, "text": "h\u00e9", "raw": b"\x00"})
    with gpuckpt.open(prefix) as ckpt:
        assert [ckpt.info(n).tf_dtype for n in ["f", "i", "b", "text", "raw"]] == [
            "float64",
            "int64",
            "bool",
            "string",
            "string",
        ]
        assert ckpt.get_tensor("text")[()] == "h\u00e9".encode()


def test_file_size_limit_during_save_is_a_typed_error_and_leaves_no_litter(tmp_path):
    """RLIMIT_FSIZE makes the data file write fail mid-way (Python ignores SIGXFSZ, so it is EFBIG)."""
    gpuckpt.save(str(tmp_path / "ckpt-1"), {"a": np.ones(10)}, update_state=True)
    code = (
        "import resource, numpy as np, gpuckpt\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    gpuckpt.save({str(tmp_path / 'ckpt-2')!r}, {{'big': np.ones(1 << 20)}})\n"
        "except gpuckpt.WriteError as e:\n"
        "    assert isinstance(e, OSError) and isinstance(e, gpuckpt.CheckpointError)\n"
        "    print('typed:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "typed: " in result.stdout and "ckpt-2" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]
    assert gpuckpt.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")


DISK_FULL_CHILD = """
import json, os, sys
import numpy as np
import gpuckpt

folder = sys.argv[1]
prefix = os.path.join(folder, "ckpt")
small = {"w": np.arange(1000, dtype=np.float32)}
gpuckpt.save(prefix, small, update_state=True)
report = {}
for name, kwargs in [("overwrite", {"overwrite": True}), ("new", {})]:
    target = prefix if name == "overwrite" else os.path.join(folder, "ckpt-2")
    try:
        gpuckpt.save(target, {"w": np.ones(3 << 20, np.float32)}, **kwargs)  # 12 MiB into 8 MiB
        report[name] = "saved"
    except gpuckpt.WriteError as error:
        report[name] = [error.errno, isinstance(error, OSError)]
report["files"] = sorted(os.listdir(folder))
with gpuckpt.open(folder) as ckpt:
    report["intact"] = bool(np.array_equal(ckpt.get_tensor("w"), small["w"]))
print(json.dumps(report))
"""


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC: an 8 MiB tmpfs mounted in a private user and mount namespace."""
    import errno
    import json
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    folder = tmp_path / "small_disk"
    folder.mkdir()
    script = tmp_path / "child.py"
    script.write_text(DISK_FULL_CHILD)
    shell = f'mount -t tmpfs -o size=8m none "{folder}" && exec "{sys.executable}" "{script}" "{folder}"'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "mount" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["overwrite"] == [errno.ENOSPC, True] and report["new"] == [errno.ENOSPC, True]
    assert report["files"] == ["checkpoint", "ckpt.data-00000-of-00001", "ckpt.index"]  # no temporaries left
    assert report["intact"]


def test_progress_hears_of_every_chunk_and_ends_at_the_total(tmp_path, monkeypatch):
    from gpuckpt import download
    from gpuckpt.device import HostDevice
    from gpuckpt.host.strings import encode_strings

    class OnStandIn:  # a device array on the host stand-in, streamed in 4 KiB chunks
        def __init__(self, array):
            self.array, self.dtype, self.shape, self.nbytes = array, array.dtype, array.shape, array.nbytes
            self.flags = array.flags
            self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str, "version": 3}

    device = HostDevice()
    monkeypatch.setattr(writer_module, "_device_of", lambda value: device)
    monkeypatch.setattr(device, "byte_view", lambda a: np.asarray(getattr(a, "array", a)).reshape(-1).view(np.uint8))
    monkeypatch.setattr(download, "CHUNK_BYTES", 4096)
    tensors = {"a": np.ones(3000, np.float32), "dev": OnStandIn(np.arange(5000, dtype=np.float64)), "s": [b"x", b"yz"]}
    calls = []

    def progress(done, total):
        calls.append((done, total))

    gpuckpt.save(str(tmp_path / "p"), tensors, max_shard_bytes=20_000, progress=progress)
    total = 3000 * 4 + 5000 * 8 + len(encode_strings([b"x", b"yz"])[0])
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(calls) == 1 + 10 + 1  # one host array, 10 device chunks, strings
    with gpuckpt.open(str(tmp_path / "p")) as ckpt:
        assert ckpt.get_tensor("dev").tolist() == list(range(5000))


def test_a_list_of_bytes_keeps_trailing_nuls(tmp_path):
    prefix = gpuckpt.save(str(tmp_path / "s"), {"strings": [b"a\x00", b"b"], "nested": [[b"\x00", b"c\x00\x00"]]})
    with gpuckpt.open(prefix) as ckpt:
        assert list(ckpt["strings"]) == [b"a\x00", b"b"]
        assert ckpt["nested"].tolist() == [[b"\x00", b"c\x00\x00"]]


@pytest.mark.parametrize(
    "shape, parts",
    [
        ((), [((), np.float32(1))]),
        ((0, 3), [((slice(0, 0), slice(0, 3)), np.zeros((0, 3), np.float32))]),
        ((2,), [((slice(0, 1),), np.array([b"a"], dtype=object)), ((slice(1, 2),), np.array([b"b"], dtype=object))]),
    ],
    ids=["scalar", "empty", "strings"],
)
def test_partitioned_tensors_tensorflow_cannot_read_are_refused(tmp_path, shape, parts):
    with pytest.raises(ValueError, match="partitioned tensor"):
        gpuckpt.save(str(tmp_path / "p"), {"p": gpuckpt.Partitioned(shape, parts)})
    assert os.listdir(tmp_path) == []


def test_a_damaged_state_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "checkpoint").write_bytes(b"model_checkpoint_path: \xff\xfe not a state file {")
    with pytest.raises(gpuckpt.FormatError):
        gpuckpt.save(str(tmp_path / "ck"), {"w": np.ones(2, np.float32)})
    assert os.listdir(tmp_path) == ["checkpoint"]


_QUANTIZED = {"DT_QINT8", "DT_QUINT8", "DT_QINT16", "DT_QINT32", "DT_QUINT16"}


def test_each_numpy_type_is_saved_as_its_plain_tf_type(tmp_path):
    """Where a quantized TF type shares a numpy dtype with a plain one, the plain one is written:
    uint16 is DT_UINT16 (17), not DT_QUINT16 (16), which comes first in enum order."""
    from gpuckpt.dtypes import DTYPES, DataType

    plain = {DataType(d).name: info for d, info in DTYPES.items() if DataType(d).name not in _QUANTIZED}
    arrays = {name: np.zeros(3, info.numpy) for name, info in plain.items() if info.numpy is not None}
    assert "DT_UINT16" in arrays and "DT_INT8" in arrays
    prefix = gpuckpt.save(str(tmp_path / "ck"), arrays)
    with gpuckpt.open(prefix) as ckpt:
        written = {name: DataType(ckpt.index.tensors[name].dtype).name for name in arrays}
    assert written == {name: name for name in arrays}


@pytest.mark.tf
def test_tensorflow_reads_a_saved_uint16_as_uint16(tmp_path):
    tf = tf_or_skip()
    prefix = gpuckpt.save(str(tmp_path / "ck"), {"u": np.arange(3, dtype=np.uint16)})
    reader = tf.train.load_checkpoint(prefix)
    assert reader.get_variable_to_dtype_map()["u"] == tf.uint16
    assert reader.get_tensor("u").tolist() == [0, 1, 2]


def _every_savable_type():
    from gpuckpt.dtypes import DTYPES, DataType

    return [
        DataType(d)
        for d, info in DTYPES.items()
        if info.numpy is not None and DataType(d).name not in _QUANTIZED  # quantized: saved as plain ints
    ]


@pytest.mark.tf
@pytest.mark.parametrize("dtype", _every_savable_type(), ids=lambda d: d.name)
def test_a_partitioned_tensor_is_saved_exactly_when_tensorflow_can_read_it(tmp_path, monkeypatch, dtype):
    """Every type gpuckpt saves in slices TensorFlow reads back whole, bit for bit; every other
    type is refused before anything is written, and written anyway (the refusal lifted), TF's
    reader refuses it: the set is TensorFlow's, neither wider nor narrower."""
    tf = tf_or_skip()
    from gpuckpt.dtypes import DTYPES
    from gpuckpt.writer import TF_SLICED_TYPES

    full = np.arange(6, dtype=np.uint8).reshape(2, 3).astype(DTYPES[dtype].numpy)
    value = Partitioned((2, 3), [((slice(0, 1), slice(None)), full[:1]), ((slice(1, 2), slice(None)), full[1:])])
    prefix = str(tmp_path / "ck")
    if dtype not in TF_SLICED_TYPES:
        with pytest.raises(ValueError, match=f"partitioned tensor 't' holds {DTYPES[dtype].name}, which TensorFlow"):
            gpuckpt.save(prefix, {"t": value})
        assert os.listdir(tmp_path) == []
        monkeypatch.setattr(writer_module, "TF_SLICED_TYPES", frozenset(_every_savable_type()))
        gpuckpt.save(prefix, {"t": value})
        with pytest.raises(Exception, match="not supported"):
            tf.train.load_checkpoint(prefix).get_tensor("t")
        return
    gpuckpt.save(prefix, {"t": value})
    theirs = np.asarray(tf.train.load_checkpoint(prefix).get_tensor("t"))
    assert theirs.shape == (2, 3) and theirs.tobytes() == full.tobytes()
