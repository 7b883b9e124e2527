"""The staged device restore, run on the host stand-in device: ordering, slot reuse only after
its copy event, coalescing and splitting, checksums across chunks, conversion dispatch, out=,
async readiness, memory checks and cleanup on every error path."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import fixture_path

import gpuckpt
from gpuckpt import pipeline
from gpuckpt.device import HostDevice
from gpuckpt.options import RestoreOptions


def _restore(prefix, device, names=None, options=None, **kwargs):
    with gpuckpt.open(prefix) as ckpt:
        entries = [ckpt.index.tensors[n] for n in (names or ckpt.keys())]
        future = pipeline.restore_to_device(ckpt._reader, device, entries, options or RestoreOptions(), **kwargs)
        return future.result()


def _host(prefix, names=None):
    with gpuckpt.open(prefix) as ckpt:
        return ckpt.restore(names)


def _random_tensors(seed=0, count=40):
    rng = np.random.default_rng(seed)
    types = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.uint8, np.complex64, np.float64]
    tensors = {}
    for i in range(count):
        size = int(rng.choice([0, 1, 7, 100, 5000, 40000]))
        tensors[f"t{i:02d}"] = rng.standard_normal(size).astype(types[i % len(types)])
    return tensors


SMALL = RestoreOptions(staging_slots=3, staging_slot_bytes=4096, io_threads=2, copy_streams=2)


@pytest.mark.parametrize("single_allocation", [False, True], ids=["one_per_tensor", "single_allocation"])
@pytest.mark.parametrize("big_endian", [False, True])
def test_random_bundle_through_tiny_slots_matches_host(tmp_path, big_endian, single_allocation):
    prefix = make_bundle(_random_tensors(), big_endian=big_endian, num_shards=2).write(str(tmp_path / "r"))
    device = HostDevice(copy_delay_s=0.0005)
    ours = _restore(prefix, device, options=dataclasses.replace(SMALL, single_allocation=single_allocation))
    host = _host(prefix)
    for name, value in host.items():
        assert ours[name].dtype == value.dtype and ours[name].tobytes() == value.tobytes(), name
    assert device.pinned_live == 0 and device.streams == []


def test_single_allocation_makes_one_and_aligns_every_tensor(tmp_path, monkeypatch):
    tensors = _random_tensors(seed=4)
    prefix = make_bundle(tensors).write(str(tmp_path / "a"))
    device = HostDevice()
    sizes = []
    real_empty = device.empty

    def counting_empty(shape, dtype):
        sizes.append(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return real_empty(shape, dtype)

    monkeypatch.setattr(device, "empty", counting_empty)
    options = RestoreOptions(single_allocation=True)
    arrays = _restore(prefix, device, options=options, dtype_for=lambda name, stored: stored)
    assert len(sizes) == 1 and sizes[0] >= sum(t.nbytes for t in tensors.values())
    arena = next(iter(arrays.values()))
    while arena.base is not None:
        arena = arena.base
    for name, array in arrays.items():
        assert array.tobytes() == tensors[name].tobytes(), name
        if array.size:
            assert np.shares_memory(array, arena), name
            assert (array.ctypes.data - arena.ctypes.data) % pipeline.ARENA_ALIGNMENT == 0, name


def test_reusing_a_slot_before_its_event_would_corrupt_data(tmp_path, monkeypatch):
    """The test above can fail: skip the wait on a slot's event and data comes out wrong."""
    prefix = make_bundle(_random_tensors(seed=3), num_shards=1).write(str(tmp_path / "r"))
    monkeypatch.setattr(pipeline._Slot, "wait_until_free", lambda self: None)
    ours = _restore(prefix, HostDevice(copy_delay_s=0.002), options=SMALL, verify=False)
    host = _host(prefix)
    assert any(ours[n].tobytes() != host[n].tobytes() for n in host)


@pytest.mark.parametrize("fixture", ["tf1_partitioned", "sharded", "keras_adam"])
def test_tf_written_fixtures_match_host(fixture):
    with gpuckpt.open(fixture_path(fixture)) as ckpt:  # strings (the object graph) stay on the host
        names = [n for n in ckpt.keys() if ckpt.info(n).tf_dtype != "string"]
    ours = _restore(fixture_path(fixture), HostDevice(), names=names, options=SMALL)
    host = _host(fixture_path(fixture), names)
    for name, value in host.items():
        assert ours[name].tobytes() == value.tobytes(), name


def test_conversion_dispatch_matches_ml_dtypes(tmp_path):
    tensors = {
        "a": np.linspace(-3, 3, 999, dtype=np.float32),
        "b": np.arange(10, dtype=np.float64) / 3,
        "c": np.array([1.5, -2], ml_dtypes.bfloat16),
        "i": np.arange(5, dtype=np.int32),
    }
    prefix = make_bundle(tensors).write(str(tmp_path / "c"))

    def choose(name, stored):
        return {"a": ml_dtypes.bfloat16, "b": np.float16, "c": np.float32}.get(name, stored)

    ours = _restore(prefix, HostDevice(), options=SMALL, dtype_for=choose)
    assert (
        ours["a"].dtype == ml_dtypes.bfloat16
        and ours["a"].tobytes() == tensors["a"].astype(ml_dtypes.bfloat16).tobytes()
    )
    assert ours["b"].tobytes() == tensors["b"].astype(np.float16).tobytes()
    assert ours["c"].tobytes() == tensors["c"].astype(np.float32).tobytes()
    assert ours["i"].dtype == np.int32
    with pytest.raises(gpuckpt.UnsupportedError, match="no device conversion"):
        _restore(prefix, HostDevice(), names=["i"], options=SMALL, dtype_for=lambda n, s: np.float32)


def test_checksum_error_releases_everything(tmp_path):
    bundle = make_bundle(_random_tensors(seed=5))
    entry = bundle.entries[b"t10"]
    bundle.shards[0][entry.offset + entry.size - 1] ^= 1  # last byte: found after earlier chunks were copied
    prefix = bundle.write(str(tmp_path / "bad"))
    device = HostDevice(copy_delay_s=0.0002)
    with pytest.raises(gpuckpt.ChecksumError, match="t10"):
        _restore(prefix, device, options=SMALL)
    assert device.pinned_live == 0 and device.streams == []


def test_truncated_file_in_a_reader_thread(tmp_path):
    prefix = make_bundle(_random_tensors(seed=6)).write(str(tmp_path / "t"))
    device = HostDevice()
    with gpuckpt.open(prefix) as ckpt:
        with open(prefix + ".data-00000-of-00001", "r+b") as f:
            f.truncate(1000)
        entries = list(ckpt.index.tensors.values())
        future = pipeline.restore_to_device(ckpt._reader, device, entries, SMALL)
        with pytest.raises(gpuckpt.FormatError, match="short"):
            future.result()
    assert device.pinned_live == 0


def test_out_arrays_are_filled_or_left_untouched(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    prefix = make_bundle(tensors).write(str(tmp_path / "o"))
    out = {"a": np.full((2, 3), -1, np.float32), "b": np.zeros(4, np.float32)}
    ours = _restore(prefix, HostDevice(), options=SMALL, out=out, dtype_for=lambda n, s: np.float32)
    assert ours["a"] is out["a"] and ours["b"] is out["b"]
    np.testing.assert_array_equal(out["a"], tensors["a"])
    np.testing.assert_array_equal(out["b"], np.ones(4, np.float32))
    wrong = {"a": np.full((3, 2), -1, np.float32), "b": np.full(4, 7, np.float16)}
    with pytest.raises(ValueError, match="nothing was written"):
        _restore(prefix, HostDevice(), options=SMALL, out=wrong)
    assert (wrong["a"] == -1).all() and (wrong["b"] == 7).all()


def test_a_strided_out_array_is_refused_not_filled_through_a_copy(tmp_path):
    prefix = make_bundle({"a": np.arange(6, dtype=np.float32)}).write(str(tmp_path / "s"))
    backing = np.full(12, -1, np.float32)
    with pytest.raises(gpuckpt.InvalidArgumentError, match="not C-contiguous.*nothing was written"):
        _restore(prefix, HostDevice(), options=SMALL, out={"a": backing[::2]})
    assert (backing == -1).all()


def test_async_restore_reports_each_tensor(tmp_path):
    prefix = make_bundle(_random_tensors(seed=7)).write(str(tmp_path / "a"))
    with gpuckpt.open(prefix) as ckpt:
        entries = list(ckpt.index.tensors.values())
        future = pipeline.restore_to_device(ckpt._reader, HostDevice(copy_delay_s=0.0005), entries, SMALL, wait=False)
        first = future.wait("t00")
        assert future.ready("t00")
        result = future.result()
        assert future.done() and all(future.ready(n) for n in result)
        assert first is result["t00"]


def test_device_memory_is_checked_before_anything_is_allocated(tmp_path):
    prefix = make_bundle(_random_tensors(seed=8)).write(str(tmp_path / "m"))
    device = HostDevice(memory_bytes=10_000)
    with pytest.raises(pipeline.DeviceMemoryError, match=r"needs \d+ bytes .* 10000 are free"):
        _restore(prefix, device, options=SMALL)
    assert device.allocated_bytes == 0 and device.pinned_live == 0


def test_strings_are_refused_on_a_device():
    with pytest.raises(gpuckpt.UnsupportedError, match="device='cpu'"):
        _restore(fixture_path("raw", "all_dtypes"), HostDevice(), names=["strings"])


def test_options_from_environment():
    options = RestoreOptions.from_env({"GPUCKPT_STAGING_SLOTS": "4", "GPUCKPT_IO_THREADS": "2"}, copy_streams=3)
    assert (options.staging_slots, options.io_threads, options.copy_streams) == (4, 2, 3)
    assert options.staging_bytes == 4 * options.staging_slot_bytes
    with pytest.raises(ValueError, match="unknown setting"):
        RestoreOptions.from_env({"GPUCKPT_STAGING_SLOTZ": "4"})
    with pytest.raises(ValueError, match="whole number"):
        RestoreOptions.from_env({"GPUCKPT_IO_THREADS": "many"})
    with pytest.raises(ValueError):
        RestoreOptions(staging_slots=1, io_threads=2)


def test_a_fault_in_queued_device_work_is_reported(tmp_path, monkeypatch):
    prefix = make_bundle({"a": np.linspace(0, 1, 5000, dtype=np.float32)}).write(str(tmp_path / "f"))
    device = HostDevice()

    def broken(kernel, src, dst, stream):
        stream.submit(lambda: 1 / 0)

    monkeypatch.setattr(device, "convert", broken)
    with pytest.raises(ZeroDivisionError):
        _restore(prefix, device, options=SMALL, dtype_for=lambda n, s: np.float16)
    assert device.pinned_live == 0


def test_partitioned_tensors_are_assembled_on_the_device(tmp_path):
    full = np.arange(4 * 3000, dtype=np.float32).reshape(4, 3000)
    parts = [
        ((slice(0, 1), slice(None)), full[:1]),
        ((slice(1, 4), slice(0, 1000)), full[1:, :1000]),
        ((slice(1, 4), slice(1000, 3000)), full[1:, 1000:]),
    ]
    prefix = gpuckpt.save(
        str(tmp_path / "p"), {"pv": gpuckpt.Partitioned(full.shape, parts), "x": np.ones(3)}, max_shard_bytes=20_000
    )
    device = HostDevice(copy_delay_s=0.0002)
    ours = _restore(prefix, device, options=SMALL)  # 4 KiB slots: every slice spans several chunks
    assert ours["pv"].tobytes() == full.tobytes()
    halves = _restore(prefix, HostDevice(), options=SMALL, dtype_for=lambda n, s: np.float16)
    assert halves["pv"].tobytes() == full.astype(np.float16).tobytes()
    with gpuckpt.open(prefix) as ckpt:
        part = ckpt.index.slice_entry(ckpt.index.tensors["pv"], ckpt.index.tensors["pv"].slices[2])
        path = ckpt.data_files()[part.shard_id]
    with open(path, "r+b") as f:
        f.seek(part.offset + part.size - 2)
        f.write(b"\xff\xff")
    with pytest.raises(gpuckpt.ChecksumError, match="slice entry .*'pv'"):
        _restore(prefix, device, options=SMALL)
    assert device.pinned_live == 0


def test_a_large_tensor_is_staged_in_parts_by_several_threads(tmp_path, monkeypatch):
    values = np.random.default_rng(9).standard_normal(50_000).astype(np.float32)  # 200 KB: 12 parts of 16 KiB
    bundle = make_bundle({"big": values, "small": np.arange(3, dtype=np.int16)}, big_endian=True)
    prefix = bundle.write(str(tmp_path / "ok"))
    staged = []
    original = pipeline.StagedRestore._stage_part

    def spy(self, item, free, stream):
        staged.append(item.index)
        return original(self, item, free, stream)

    monkeypatch.setattr(pipeline.StagedRestore, "_stage_part", spy)
    options = RestoreOptions(staging_slots=4, staging_slot_bytes=4096, io_threads=3, copy_streams=3)
    ours = _restore(
        prefix, HostDevice(copy_delay_s=0.0002), options=options, dtype_for=lambda n, s: {"big": np.float64}.get(n, s)
    )
    assert sorted(staged) == list(range(13))
    assert ours["big"].tobytes() == values.astype(np.float64).tobytes()
    entry = bundle.entries[b"big"]
    bundle.shards[0][entry.offset + 7 * 16384 + 3] ^= 0x20  # inside part 7
    bad = bundle.write(str(tmp_path / "bad"))
    with pytest.raises(gpuckpt.ChecksumError, match="'big'"):
        _restore(bad, HostDevice(), options=options)


def test_allocator_running_out_is_a_typed_error(tmp_path, monkeypatch):
    prefix = make_bundle(_random_tensors(seed=10)).write(str(tmp_path / "o"))
    device = HostDevice()
    calls = []

    def failing_empty(shape, dtype):
        calls.append(shape)
        if len(calls) == 5:
            raise MemoryError("pool exhausted")
        return np.empty(shape, dtype)

    monkeypatch.setattr(device, "empty", failing_empty)
    with pytest.raises(pipeline.DeviceMemoryError, match=r"out of device memory .*\(pool exhausted\).*t04"):
        _restore(prefix, device, options=SMALL)
    assert device.pinned_live == 0


def test_a_thousand_failed_device_restores_leak_nothing(tmp_path, monkeypatch):
    """Checksum failures and allocator failures, alternating: no pinned buffer, stream, thread or
    file descriptor outlives its restore."""
    import os
    import threading
    import time

    bundle = make_bundle(_random_tensors(seed=11, count=12))
    entry = max(bundle.entries.values(), key=lambda e: e.size)
    bundle.shards[0][entry.offset] ^= 1
    prefix = bundle.write(str(tmp_path / "bad"))
    device = HostDevice()
    real_empty = device.empty
    allocations: list = []
    fail_at = [0]  # the allocation of this restore that fails; 0: none

    def sometimes_failing_empty(shape, dtype):
        allocations.append(shape)
        if len(allocations) == fail_at[0]:
            raise MemoryError("pool exhausted")
        return real_empty(shape, dtype)

    monkeypatch.setattr(device, "empty", sometimes_failing_empty)
    threads_before, fds_before = threading.active_count(), len(os.listdir("/proc/self/fd"))
    failures = set()
    with gpuckpt.open(prefix) as ckpt:
        for attempt in range(1000):
            allocations.clear()
            fail_at[0] = attempt % 12 if attempt % 2 else 0  # odd attempts run out part-way
            with pytest.raises((gpuckpt.ChecksumError, pipeline.DeviceMemoryError)) as info:
                ckpt.restore(device=device)
            failures.add(type(info.value))
    assert failures == {gpuckpt.ChecksumError, pipeline.DeviceMemoryError}
    assert device.pinned_live == 0 and device.streams == []
    deadline = time.monotonic() + 10  # worker threads finish their last task and exit
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads_before
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_failing_cleanup_step_still_finishes_the_restore(tmp_path, monkeypatch):
    prefix = make_bundle(_random_tensors(seed=12, count=6)).write(str(tmp_path / "c"))
    device = HostDevice()

    def broken_release(buffer):
        raise RuntimeError("driver refused to free")

    monkeypatch.setattr(device, "release_pinned", broken_release)
    with gpuckpt.open(prefix) as ckpt:
        future = ckpt.restore_async(device=device)
        with pytest.raises(RuntimeError, match="refused to free"):
            future.result()  # an error, never a future that no one finishes
