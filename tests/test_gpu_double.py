"""The CuPy double (tests/cupy_double) itself, and the GPU defects that need its controls to show:
buffers freed under queued kernels, work the caller queued on its own stream, devices other than
the first. Each machine is fresh (three devices); nothing here needs a GPU."""

from __future__ import annotations

import threading
import time

import cupy_double
import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle

import gpuckpt
from gpuckpt.options import RestoreOptions


@pytest.fixture
def cupy():
    with cupy_double.installed(device_count=3, memory_bytes=64 << 20) as module:
        yield module


# -- the double keeps CuPy's and CUDA's rules ------------------------------------------------------
def test_dtypes_cupy_has_no_c_type_for_are_refused_but_views_are_not_checked(cupy):
    for dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.int4, ml_dtypes.uint4, ml_dtypes.int2, ml_dtypes.float4_e2m1fn):
        with pytest.raises(ValueError, match="Unsupported dtype"):
            cupy.empty(4, dtype)
    for dtype in ("S3", object, ">f4"):
        with pytest.raises(ValueError, match="Unsupported dtype"):
            cupy.ndarray((2,), dtype)
    if cupy._has_bfloat16():  # numpy >= 2.1.2 with ml_dtypes
        assert cupy.empty(2, ml_dtypes.bfloat16).dtype == ml_dtypes.bfloat16
    else:
        with pytest.raises(ValueError, match="Unsupported dtype"):
            cupy.empty(2, ml_dtypes.bfloat16)
    assert cupy.empty(4, cupy.uint8).view(ml_dtypes.float8_e4m3fn).dtype == ml_dtypes.float8_e4m3fn


def test_a_type_whose_character_cupy_takes_for_another_arrives_as_its_bytes(cupy, tmp_path):
    """CuPy v14.2.0 accepts float8_e4m3b11fnuz (its type character 'L' is uint64's:
    cupy/_core/_dtype.pyx, check_supported_dtype), as the double does; the device restores it as
    uint8 bytes, like every float8, not as an array CuPy's kernels would read as 8-byte integers."""
    from gpuckpt.cuda import cuda_device

    b11 = np.dtype(ml_dtypes.float8_e4m3b11fnuz)
    assert cupy.empty(4, b11).dtype == b11  # CuPy's own check lets it through
    assert cuda_device(0).array_dtype(b11) == np.uint8
    if cupy._has_bfloat16():
        assert cuda_device(0).array_dtype(ml_dtypes.bfloat16) == ml_dtypes.bfloat16
    values = np.arange(-20, 20, dtype=np.float32).astype(b11)
    prefix = gpuckpt.save(str(tmp_path / "b11"), {"w": values})
    with gpuckpt.open(prefix) as ckpt:
        got = ckpt.restore(device="cuda")["w"]
    with gpuckpt.open(prefix, options=RestoreOptions(single_allocation=True)) as ckpt:
        single = ckpt.restore(device="cuda")["w"]
    for array in (got, single):
        assert array.dtype == np.uint8 and array.get().tobytes() == values.tobytes()


def test_a_non_blocking_stream_runs_later_and_ignores_the_null_stream(cupy):
    source = np.frombuffer(cupy.cuda.alloc_pinned_memory(4), np.uint8, 4)
    source[:] = 1
    dst = cupy.zeros(4, cupy.uint8)
    dst.get()  # the zeros have landed
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy._stall(0.3, stream)
    cupy.cuda.runtime.memcpyAsync(dst.data.ptr, source.ctypes.data, 4, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
    source[:] = 2  # the copy reads its source when it runs
    cupy._stall(2.0)  # the null stream is busy too, and the stream does not wait for it
    start = time.monotonic()
    stream.synchronize()
    assert time.monotonic() - start < 1.5
    with stream:
        assert (dst.get() == 2).all()


def test_the_current_device_and_stream_belong_to_each_thread(cupy):
    seen = {}
    with cupy.cuda.Device(1):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:

            def other():
                seen["device"] = cupy.cuda.runtime.getDevice()
                seen["stream"] = cupy.cuda.get_current_stream().ptr

            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
            assert cupy.cuda.get_current_stream() == stream
    assert seen == {"device": 0, "stream": 0}


def test_an_event_belongs_to_the_device_current_at_its_creation(cupy):
    with cupy.cuda.Device(1):
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.record().synchronize()
    with pytest.raises(cupy.cuda.runtime.CUDARuntimeError, match="InvalidResourceHandle") as info:
        stream.record()  # Stream.record makes its Event on the current device, 0
    assert info.value.status == 400
    with pytest.raises(RuntimeError, match="does not match"):
        with stream:
            pass


def test_the_pool_hands_a_freed_chunk_straight_back_and_serves_it_under_any_limit(cupy):
    pool = cupy.get_default_memory_pool()
    first = cupy.empty(1000, cupy.uint8)
    ptr = first.data.ptr
    del first
    pool.set_limit(size=pool.total_bytes())
    again = cupy.empty(1000, cupy.uint8)
    assert again.data.ptr == ptr  # cached chunks come before the limit check
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError, match="limit set to"):
        cupy.empty(4096, cupy.uint8)
    pool.set_limit(size=0)
    del again
    pool.free_all_blocks()
    assert pool.total_bytes() == 0 and cupy.cuda.Device(0).mem_info[0] == 64 << 20
    assert cupy.cuda.Device(2).mem_info == (64 << 20, 64 << 20)


def test_an_allocation_over_the_limit_collects_garbage_before_it_fails(cupy):
    import gc

    pool = cupy.get_default_memory_pool()
    cycle = [cupy.empty(1 << 20, cupy.uint8)]
    cycle.append(cycle)  # only the garbage collector frees it
    del cycle
    gc.disable()
    try:
        pool.set_limit(size=(1 << 20) + (1 << 19))
        cupy.empty((1 << 20) + 512, cupy.uint8)  # fits only once the cycle is collected and freed
    finally:
        gc.enable()
        pool.set_limit(size=0)


def test_the_pinned_pool_rounds_up_to_a_power_of_two(cupy):
    pool = cupy.get_default_pinned_memory_pool()
    memory = cupy.cuda.alloc_pinned_memory(1000)
    assert len(memoryview(memory)) == 1024
    buffer = np.frombuffer(memory, np.uint8, 1000)
    del memory
    assert pool.n_free_blocks() == 0  # the numpy array keeps the block
    del buffer
    assert pool.n_free_blocks() == 1


def test_kernels_run_their_host_twins_on_the_current_stream(cupy):
    from gpuckpt.cuda.device import CudaDevice

    device = CudaDevice.get(0)
    values = np.linspace(-3, 3, 1001, dtype=np.float32)
    src = cupy.asarray(values).view(cupy.uint8)
    dst = cupy.empty(values.size, cupy.float16)
    cupy.cuda.get_current_stream().synchronize()  # the upload ran on the null stream, unordered with ours
    stream = device.new_stream()
    device.convert("f32_to_f16", src, dst, stream)
    device.record(stream).synchronize()
    assert dst.get().tobytes() == values.astype(np.float16).tobytes()


# -- the defects of issue 10 that need the double's controls ----------------------------------------
SLOTS = RestoreOptions(staging_slots=4, staging_slot_bytes=4096, io_threads=2, copy_streams=2)


def _partitioned_bundle(tmp_path):
    big = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)  # staged in parts
    full = np.arange(4 * 3000, dtype=np.float32).reshape(4, 3000)
    parts = [((slice(0, 1), slice(None)), full[:1]), ((slice(1, 4), slice(None)), full[1:])]
    prefix = gpuckpt.save(str(tmp_path / "p"), {"big": big, "pv": gpuckpt.Partitioned(full.shape, parts)})
    return prefix, {"big": big, "pv": full}


def test_the_restores_own_buffers_outlive_the_kernels_reading_them(cupy, tmp_path):
    prefix, values = _partitioned_bundle(tmp_path)
    cupy._machine.stream_delay_s = 0.005  # the copy streams lag: kernels run well after they are queued
    with gpuckpt.open(prefix, options=SLOTS) as ckpt:
        sizes = [ckpt.index.tensors["big"].size, ckpt.index.tensors["pv"].stored_bytes]
        sizes += [ckpt.index.slice_entry(ckpt.index.tensors["pv"], s).size for s in ckpt.index.tensors["pv"].slices]
        future = ckpt.restore_async(device="cuda", dtype=np.float16)
        while not future.done():
            time.sleep(0.001)
        # Whatever the restore freed is handed to the next allocations of its size on this stream.
        reused = [cupy.full(size, 0x7F, cupy.uint8) for size in sizes]
        arrays = future.result()
    for name, value in values.items():
        assert arrays[name].get().tobytes() == value.astype(np.float16).tobytes(), name
    del reused


@pytest.mark.parametrize("callers_stream", ["null", "own"])
def test_out_arrays_are_written_after_the_work_the_caller_queued_on_them(cupy, tmp_path, callers_stream):
    values = np.linspace(0, 1, 20_000, dtype=np.float32)
    prefix = make_bundle({"a": values}).write(str(tmp_path / "o"))
    stream = cupy.cuda.Stream.null if callers_stream == "null" else cupy.cuda.Stream(non_blocking=True)
    with gpuckpt.open(prefix, options=SLOTS) as ckpt, stream:
        out = cupy.empty(values.size, cupy.float32)
        cupy._stall(0.2)  # the caller's current stream is busy...
        out.fill(0)  # ...and clears ``out`` after that
        ckpt.restore(["a"], device="cuda", out={"a": out})
        assert out.get().tobytes() == values.tobytes()


def test_recycled_pool_blocks_are_written_after_their_last_use(cupy, tmp_path):
    values = np.linspace(0, 1, 20_000, dtype=np.float32)
    prefix = make_bundle({"a": values}).write(str(tmp_path / "r"))
    with gpuckpt.open(prefix, options=SLOTS) as ckpt:
        scratch = cupy.empty(values.nbytes, cupy.uint8)
        cupy._stall(0.2)
        scratch.fill(0xFF)  # pending when the block goes back to the pool
        del scratch
        arrays = ckpt.restore(["a"], device="cuda")
        assert arrays["a"].get().tobytes() == values.tobytes()


def test_save_copies_an_array_after_the_work_computing_it(cupy, tmp_path):
    values = np.linspace(0, 1, 50_000, dtype=np.float32)
    source = cupy.asarray(values)
    array = cupy.zeros(values.size, cupy.float32)
    cupy._stall(0.2)
    array[...] = source  # still to run when save() starts
    gpuckpt.save(str(tmp_path / "s"), {"a": array})
    with gpuckpt.open(str(tmp_path / "s")) as ckpt:
        assert ckpt.get_tensor("a").tobytes() == values.tobytes()


def test_a_restore_to_another_device_runs_every_call_inside_it(cupy, tmp_path):
    tensors = {"f": np.linspace(-2, 2, 30_000, dtype=np.float32), "h": np.arange(9, dtype=np.float16)}
    prefix = make_bundle(tensors, big_endian=True).write(str(tmp_path / "be"))  # byte swaps and conversions
    with gpuckpt.open(prefix, options=SLOTS) as ckpt:
        arrays = ckpt.restore(device="cuda:2", dtype=np.float32)
    for name, value in tensors.items():
        assert arrays[name].device.id == 2
        assert arrays[name].get().tobytes() == value.astype(np.float32).tobytes(), name
    assert cupy._machine.modules_loaded == {2: 1}  # the kernels were never loaded on GPU 0
    from gpuckpt.cuda.device import CudaDevice
    from gpuckpt.kernel_sources import fatbin_path

    assert CudaDevice.get(2).kernels_from == ("fatbin" if fatbin_path() else "nvrtc")


def test_save_copies_a_strided_array_on_its_own_device_after_its_work(cupy, tmp_path):
    values = np.arange(30_000, dtype=np.int64).reshape(300, 100)
    with cupy.cuda.Device(1):
        source = cupy.asarray(values)
        array = cupy.zeros(values.shape, cupy.int64)
        cupy._stall(0.2)
        array[...] = source  # still to run on GPU 1's null stream when save() starts
    gpuckpt.save(str(tmp_path / "s"), {"a": array[:, ::7]})  # from GPU 0: the copy is made on GPU 1
    with gpuckpt.open(str(tmp_path / "s")) as ckpt:
        assert ckpt.get_tensor("a").tobytes() == np.ascontiguousarray(values[:, ::7]).tobytes()


def test_reusing_a_staging_slot_before_its_event_would_corrupt_data(cupy, tmp_path, monkeypatch):
    """Copies from pinned memory read their source when they run: skip the wait on a slot's event
    and the real CudaDevice restores wrong bytes here, as it would on a GPU."""
    from gpuckpt import pipeline

    rng = np.random.default_rng(4)
    tensors = {f"t{i}": rng.standard_normal(3000).astype(np.float32) for i in range(8)}
    prefix = make_bundle(tensors).write(str(tmp_path / "r"))
    cupy._machine.stream_delay_s = 0.002
    monkeypatch.setattr(pipeline._Slot, "wait_until_free", lambda self: None)
    with gpuckpt.open(prefix, options=SLOTS) as ckpt:
        arrays = ckpt.restore(device="cuda", verify=False)
    assert any(arrays[name].get().tobytes() != value.tobytes() for name, value in tensors.items())


def test_an_out_array_elsewhere_than_the_restores_device_is_refused(cupy, tmp_path):
    values = np.linspace(0, 1, 1000, dtype=np.float32)
    prefix = make_bundle({"a": values}).write(str(tmp_path / "o"))
    with cupy.cuda.Device(1):
        on_one = cupy.full(values.size, -1.0, cupy.float32)
    on_host = np.full(values.size, -1.0, np.float32)
    with gpuckpt.open(prefix) as ckpt:
        for out in (on_one, on_host):
            with pytest.raises(gpuckpt.InvalidArgumentError, match="not an array on cuda:0.*nothing was written"):
                ckpt.restore(device="cuda:0", out={"a": out})
        ckpt.restore(device="cuda:1", out={"a": on_one})
    assert (on_host == -1).all() and on_one.get().tobytes() == values.tobytes()
