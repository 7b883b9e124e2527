"""``gpuckpt.open(mapped=True)``: every read copies from a standing read-only mapping of the data
files instead of calling ``preadv`` (gpuckpt/host/shards.py). The same results bit for bit (against
TensorFlow's own, on the TF-written fixtures), on every path (restore, out=, get_tensor, slices,
regions, the device pipeline on the CuPy double), with ``os.preadv`` made to fail so that nothing
reads the other way; a file that shrank is the same FormatError; and the documented price, a
truncation during a copy, is shown to be a SIGBUS (in a child process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import EXPECTED, FIXTURE_PREFIXES, assert_bit_exact, fixture_path

import gpuckpt
from gpuckpt.host import reader

RNG = np.random.default_rng(11)


@pytest.fixture
def no_preadv(monkeypatch):
    """Any preadv call fails the test: a mapped checkpoint must not read that way."""

    def refused(*args, **kwargs):
        raise AssertionError("preadv was called by a mapped checkpoint")

    monkeypatch.setattr(os, "preadv", refused)


def _unset_like(value, dtype):
    """An array of ``value``'s shape in ``dtype``, filled with 0xA5 bytes ("unset" for strings)."""
    shape, dtype = np.shape(value), np.dtype(dtype)
    if dtype.kind == "O":
        return np.full(shape, b"unset", dtype=object)
    return np.frombuffer(b"\xa5" * (int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape).copy()


@pytest.mark.parametrize("prefix", FIXTURE_PREFIXES)
def test_every_fixture_reads_as_tensorflow_wrote_it(prefix, no_preadv):
    """Every tensor of every TF-written fixture (all dtypes, strings, partitioned, sharded), by
    restore, restore(out=), get_tensor, get_slice and restore(regions=)."""
    expected = EXPECTED[prefix]["tensors"]
    with gpuckpt.open(fixture_path(prefix), mapped=True) as ckpt:
        assert ckpt.mapped
        fresh = ckpt.restore(list(expected), threads=2)
        out = {name: _unset_like(value, ckpt.info(name).dtype) for name, value in expected.items()}
        given = dict(out)
        into = ckpt.restore(list(expected), out=out, threads=2)
        for name, value in expected.items():
            assert_bit_exact(fresh[name], value, name)
            assert into[name] is given[name]
            assert_bit_exact(into[name], value, name)
            assert_bit_exact(ckpt.get_tensor(name), value, name)
            if np.ndim(value) and np.shape(value)[0] > 1:
                selection = np.s_[1::2]
                assert_bit_exact(ckpt.get_slice(name)[selection], np.asarray(value)[selection], name)
                region = ckpt.restore([name], regions={name: selection})[name]
                assert_bit_exact(region, np.asarray(value)[selection], name)


def test_large_tensors_in_parts_by_several_threads_fill_out_in_place(tmp_path, monkeypatch, no_preadv):
    monkeypatch.setattr(reader, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(reader, "SPLIT_BYTES", 256 << 10)
    values = {
        "f32": RNG.standard_normal((512, 1000)).astype(np.float32),
        "bf16": RNG.standard_normal(300_001).astype(ml_dtypes.bfloat16),
        "i8": RNG.integers(-128, 127, 300_001, dtype=np.int8),
        "tiny": np.arange(5, dtype=np.int32),
        "empty": np.zeros((0, 3), np.float32),
    }
    prefix = gpuckpt.save(str(tmp_path / "ck"), values)
    out = {name: np.zeros_like(value) for name, value in values.items()}
    addresses = {name: array.ctypes.data for name, array in out.items()}
    with gpuckpt.open(prefix, mapped=True) as ckpt:
        for threads in (1, 3):
            got = ckpt.restore(out=out, threads=threads)
            for name, value in values.items():
                assert got[name] is out[name] and got[name].ctypes.data == addresses[name]
                assert got[name].tobytes() == value.tobytes(), (name, threads)
        converted = ckpt.restore(["bf16"], dtype=np.float32)["bf16"]
    assert converted.tobytes() == values["bf16"].astype(np.float32).tobytes()


def test_big_endian_and_sharded_bundles_read_as_by_preadv(tmp_path):
    tensors = {
        "f64": RNG.standard_normal(1000),
        "i16": RNG.integers(-(1 << 15), 1 << 15, (40, 25), dtype=np.int16),
        "c64": (RNG.standard_normal(50) + 1j).astype(np.complex64),
        "s": [b"a", b"\x00bc\x00", b""],
    }
    for big_endian, shards in ((True, 1), (False, 3)):
        prefix = make_bundle(tensors, big_endian=big_endian, num_shards=shards).write(str(tmp_path / f"b{shards}"))
        with gpuckpt.open(prefix) as by_preadv, gpuckpt.open(prefix, mapped=True) as by_mapping:
            want, got = by_preadv.restore(), by_mapping.restore()
            assert by_mapping.bytes_read() == by_preadv.bytes_read()
        for name in tensors:
            assert_bit_exact(got[name], want[name], name)


def test_a_file_that_shrank_is_a_format_error_naming_the_file_and_tensor(tmp_path):
    """Checked before each copy, so the copy never touches a page past the file's end (run in a
    child: if it did, the SIGBUS would end the child, not the test run)."""
    prefix = gpuckpt.save(str(tmp_path / "ck"), {"w": np.ones(1 << 20, np.float32)})
    data = prefix + ".data-00000-of-00001"
    code = textwrap.dedent(
        f"""
        import gpuckpt
        ckpt = gpuckpt.open({prefix!r}, mapped=True)
        open({data!r}, "r+b").truncate(4096)
        for read in (lambda: ckpt.restore(), lambda: ckpt.get_slice("w")[5:9]):
            try:
                read()
            except gpuckpt.FormatError as exc:
                print("FormatError:", exc)
        """
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    errors = child.stdout.splitlines()
    assert len(errors) == 2, child.stdout
    for line in errors:
        assert "shrank from 4194304 to 4096 bytes" in line and "'w'" in line and data in line


def test_a_truncation_during_a_copy_is_the_documented_sigbus(tmp_path):
    """The price of mapped=True, as documented: the size check passes, the file is cut before the
    copy touches its pages, and the process dies (os.fstat wrapped in the child to cut it then)."""
    prefix = gpuckpt.save(str(tmp_path / "ck"), {"w": np.ones(1 << 20, np.float32)})
    data = prefix + ".data-00000-of-00001"
    code = textwrap.dedent(
        f"""
        import os
        import gpuckpt
        ckpt = gpuckpt.open({prefix!r}, mapped=True)
        ckpt.restore()  # the mapping is made
        real_fstat = os.fstat
        def fstat_then_truncate(fd):
            result = real_fstat(fd)
            os.truncate({data!r}, 0)
            return result
        os.fstat = fstat_then_truncate
        ckpt.restore()
        print("survived")
        """
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGBUS, (child.returncode, child.stdout, child.stderr)


def test_a_file_cut_before_its_mapping_is_made_is_a_format_error(tmp_path, monkeypatch):
    """The size check passes, then the file is cut before the first read maps it: mmap refuses,
    and that is the same FormatError (no page of it was touched)."""
    prefix = gpuckpt.save(str(tmp_path / "ck"), {"w": np.ones(1 << 16, np.float32)})
    data = prefix + ".data-00000-of-00001"
    real_fstat = os.fstat

    def fstat_then_truncate(fd):
        result = real_fstat(fd)
        os.truncate(data, 100)
        return result

    with gpuckpt.open(prefix, mapped=True) as ckpt:
        monkeypatch.setattr(os, "fstat", fstat_then_truncate)
        with pytest.raises(gpuckpt.FormatError, match="shrank below 262144 bytes.*'w'"):
            ckpt.restore()


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_mapped_takes_a_bool_only(value):
    with pytest.raises(gpuckpt.InvalidArgumentError, match=re.escape(f"mapped={value!r}")):
        gpuckpt.open(fixture_path("raw", "all_dtypes"), mapped=value)


def test_close_unmaps_the_files_and_a_zero_copy_view_outlives_it(tmp_path):
    values = {"w": np.arange(1 << 18, dtype=np.float32)}
    prefix = gpuckpt.save(str(tmp_path / "ck"), values)
    data = os.path.realpath(prefix + ".data-00000-of-00001")

    def mapped_now():
        with open("/proc/self/maps") as f:
            return sum(line.rstrip().endswith(data) for line in f)

    ckpt = gpuckpt.open(prefix, mapped=True)
    ckpt.restore()
    assert mapped_now() == 1
    view = ckpt.get_tensor("w", copy=False)  # the same standing mapping
    ckpt.close()
    with pytest.raises(gpuckpt.ClosedCheckpointError):
        ckpt.restore()
    assert view[-1] == values["w"][-1] and mapped_now() == 1
    del view
    assert mapped_now() == 0


def test_the_device_pipeline_reads_from_the_mapping(tmp_path, no_preadv):
    """Restores to a device (on the CuPy double where no GPU is) stage their bytes from the mapping."""
    import cupy_double

    from gpuckpt.cuda import cuda_available

    if cuda_available():
        pytest.skip("the real-GPU run of this path is tests/test_gpu.py's")
    values = {
        "f32": RNG.standard_normal((300, 1000)).astype(np.float32),
        "f16": RNG.standard_normal(70_001).astype(np.float16),
        "small": np.arange(7, dtype=np.int64),
    }
    prefix = gpuckpt.save(str(tmp_path / "ck"), values)
    with cupy_double.installed(device_count=1) as cupy, gpuckpt.open(prefix, mapped=True) as ckpt:
        got = ckpt.restore(device="cuda:0")
        for name, value in values.items():
            assert cupy.asnumpy(got[name]).tobytes() == value.tobytes(), name
