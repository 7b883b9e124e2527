"""Saving device arrays: streamed through two pinned chunks (on the host stand-in device), the
bytes and checksums TensorFlow expects, host memory bounded, nothing leaked on failure."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import gpuckpt
from gpuckpt import download, writer
from gpuckpt.device import HostDevice


class StandInDeviceArray:
    """A numpy array dressed as a CUDA array, living on a HostDevice."""

    def __init__(self, array):
        self.array = array
        self.dtype, self.shape, self.nbytes, self.flags = array.dtype, array.shape, array.nbytes, array.flags
        self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str, "version": 3}

    def copy(self, order="C"):
        return np.ascontiguousarray(self.array)


@pytest.fixture
def device(monkeypatch):
    device = HostDevice(copy_delay_s=0.0002)  # copies land late: reuse before the event would show
    monkeypatch.setattr(writer, "_device_of", lambda value: device)
    monkeypatch.setattr(device, "byte_view", lambda a: np.asarray(getattr(a, "array", a)).reshape(-1).view(np.uint8))
    yield device
    assert device.pinned_live == 0 and device.streams == []


@pytest.mark.parametrize("nbytes, chunk", [(0, 8), (5, 8), (8, 8), (100, 8), (1 << 20, 4096)])
def test_chunks_come_back_in_order_and_whole(nbytes, chunk):
    device = HostDevice(copy_delay_s=0.0001)
    source = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    got = b"".join(bytes(c) for c in download.stream_to_host(device, source, nbytes, chunk))
    assert got == source.tobytes()
    assert device.pinned_live == 0 and device.streams == []


def test_a_caller_stopping_early_waits_for_copies_and_leaks_nothing():
    device = HostDevice(copy_delay_s=0.001)
    chunks = download.stream_to_host(device, np.zeros(100, np.uint8), 100, 10)
    next(chunks)
    chunks.close()
    assert device.pinned_live == 0 and device.streams == []


def test_saved_device_arrays_read_back_bit_for_bit(tmp_path, device, monkeypatch):
    monkeypatch.setattr(download, "CHUNK_BYTES", 4096)
    rng = np.random.default_rng(0)
    host = {
        "f32": rng.standard_normal((300, 70)).astype(np.float32),
        "bf16": rng.standard_normal(5000).astype(ml_dtypes.bfloat16),
        "strided": np.arange(4000, dtype=np.int64).reshape(40, 100)[:, ::3],
        "empty": np.zeros((0, 3), np.float16),
    }
    full = np.arange(60, dtype=np.float64).reshape(10, 6)
    tensors = {name: StandInDeviceArray(value) for name, value in host.items()}
    tensors["part"] = gpuckpt.Partitioned(
        (10, 6), [((slice(0, 3), slice(None)), StandInDeviceArray(full[:3])), ((slice(3, 10), slice(None)), full[3:])]
    )
    gpuckpt.save(str(tmp_path / "d"), tensors, max_shard_bytes=50_000)
    with gpuckpt.open(str(tmp_path / "d")) as ckpt:
        got = ckpt.restore()  # crc32c verified: the streamed checksums are right
    for name, value in host.items():
        assert got[name].dtype == value.dtype and got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
    assert got["part"].tobytes() == full.tobytes()


def test_a_failed_device_copy_leaves_no_files_and_no_buffers(tmp_path, device, monkeypatch):
    def failing_copy(dst, src, src_offset, nbytes, stream):
        stream.submit(lambda: (_ for _ in ()).throw(RuntimeError("device fault")))

    monkeypatch.setattr(device, "copy_to_host", failing_copy)
    with pytest.raises(RuntimeError, match="device fault"):
        gpuckpt.save(str(tmp_path / "f"), {"x": StandInDeviceArray(np.ones(10_000, np.float32))})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_file_write_releases_the_pinned_buffers_at_once(tmp_path, device, monkeypatch):
    import builtins
    import errno

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(download, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(writer, "open", lambda path, mode: FullDisk(builtins.open(path, mode)), raising=False)
    with pytest.raises(gpuckpt.WriteError) as info:
        gpuckpt.save(str(tmp_path / "w"), {"x": StandInDeviceArray(np.ones(100_000, np.float32))})
    assert info.value.errno == errno.ENOSPC
    assert device.pinned_live == 0 and device.streams == []  # while the error is still held
    assert list(tmp_path.iterdir()) == []
