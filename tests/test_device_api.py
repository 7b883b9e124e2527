"""The device side of the public API, run with the host stand-in device (and with CPU arrays)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import fixture_path

import gpuckpt
from gpuckpt.device import HostDevice
from gpuckpt.options import RestoreOptions

TENSORS = {
    "enc/w": np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100),
    "enc/b": np.arange(7, dtype=np.float16),
    "dec/w": np.arange(12, dtype=np.float64).reshape(3, 4),
    "step": np.array(5, np.int64),
}


@pytest.fixture
def prefix(tmp_path):
    return make_bundle(TENSORS, num_shards=2).write(str(tmp_path / "ck"))


def test_restore_on_a_device_object_with_dtype(prefix):
    device = HostDevice()
    with gpuckpt.open(prefix, options=RestoreOptions(staging_slot_bytes=1024)) as ckpt:
        arrays = ckpt.restore(device=device, dtype=ml_dtypes.bfloat16)
        assert arrays["enc/w"].dtype == ml_dtypes.bfloat16 and arrays["step"].dtype == np.int64
        assert arrays["enc/w"].tobytes() == TENSORS["enc/w"].astype(ml_dtypes.bfloat16).tobytes()
        one = ckpt.get_tensor("dec/w", device=device, dtype={"dec/.*": np.float32})
        assert one.dtype == np.float32 and (one == TENSORS["dec/w"]).all()
    assert device.pinned_live == 0


def test_host_dtype_and_out_match_the_device_path(prefix):
    with gpuckpt.open(prefix) as ckpt:
        host = ckpt.restore(dtype={"enc/.*": np.float16})
        device = ckpt.restore(device=HostDevice(), dtype={"enc/.*": np.float16})
        for name in TENSORS:
            assert host[name].dtype == device[name].dtype and host[name].tobytes() == device[name].tobytes(), name
        out = {"enc/b": np.zeros(7, np.float16)}
        result = ckpt.restore(["enc/b"], out=out)
        assert result["enc/b"] is out["enc/b"] and (out["enc/b"] == TENSORS["enc/b"]).all()
        with pytest.raises(ValueError, match="nothing was written"):
            ckpt.restore(["enc/b"], out={"enc/b": np.zeros(8, np.float16)})


def test_async_restore_host_and_device(prefix):
    with gpuckpt.open(prefix) as ckpt:
        for device in ("cpu", HostDevice(copy_delay_s=0.001)):
            future = ckpt.restore_async(device=device)
            weights = future.wait("enc/w")
            assert future.ready("enc/w")
            assert (np.asarray(weights) == TENSORS["enc/w"]).all()
            assert set(future.result()) == set(TENSORS)


def test_device_map_places_tensors_by_prefix(prefix):
    first, second = HostDevice(name="fake0"), HostDevice(name="fake1")
    with gpuckpt.open(prefix) as ckpt:
        arrays = ckpt.restore(device={"enc/": first, "dec/": second, "": "cpu"})
    assert set(arrays) == set(TENSORS)
    assert first.allocated_bytes == TENSORS["enc/w"].nbytes + TENSORS["enc/b"].nbytes
    assert second.allocated_bytes == TENSORS["dec/w"].nbytes
    with gpuckpt.open(prefix) as ckpt, pytest.raises(ValueError, match="no device is given"):
        ckpt.restore(device={"enc/": first})


def test_a_list_of_devices_balances_the_bytes(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {f"t{i:02d}": rng.standard_normal(int(rng.integers(1, 20_000))).astype(np.float32) for i in range(40)}
    prefix = make_bundle(tensors).write(str(tmp_path / "b"))
    devices = [HostDevice(name=f"fake{i}") for i in range(3)]
    with gpuckpt.open(prefix) as ckpt:
        arrays = ckpt.restore(device=devices)
        host = ckpt.restore()
    assert set(arrays) == set(tensors)
    for name, value in host.items():
        assert np.asarray(arrays[name]).tobytes() == value.tobytes(), name
    loads = [d.allocated_bytes for d in devices]
    assert sum(loads) == sum(t.nbytes for t in tensors.values())
    assert max(loads) - min(loads) <= max(t.nbytes for t in tensors.values())  # greedy's bound
    with gpuckpt.open(prefix) as ckpt, pytest.raises(ValueError, match="no device"):
        ckpt.restore(device=[])


def test_partitioned_tensor_on_a_device():
    with gpuckpt.open(fixture_path("tf1_partitioned")) as ckpt:
        on_device = ckpt.get_tensor("pv", device=HostDevice(), dtype=np.float16)
        assert (on_device == ckpt.get_tensor("pv").astype(np.float16)).all()


def test_zero_copy_is_host_only(prefix):
    with gpuckpt.open(prefix) as ckpt, pytest.raises(ValueError, match="host only"):
        ckpt.get_tensor("enc/w", device=HostDevice(), copy=False)


def test_a_spread_restore_reports_each_tensor_as_its_device_has_it(prefix):
    slow, fast = HostDevice(name="slow", copy_delay_s=0.05), HostDevice(name="fast")
    with gpuckpt.open(prefix) as ckpt:
        future = ckpt.restore_async(device={"enc/": slow, "": fast})
        step = future.wait("step")  # from the fast device, while the slow one is still copying
        assert int(np.asarray(step)) == 5 and not future.done()
        assert future.ready("step") and not future.ready("no such tensor")
        arrays = future.result()
        assert future.done() and set(arrays) == set(TENSORS)
        with pytest.raises(KeyError):
            future.wait("no such tensor")


def test_a_spread_restore_that_fails_on_one_device_waits_for_the_others(tmp_path):
    bundle = make_bundle(TENSORS)
    entry = bundle.entries[b"dec/w"]
    bundle.shards[0][entry.offset] ^= 1
    prefix = bundle.write(str(tmp_path / "bad"))
    other = HostDevice(name="other", copy_delay_s=0.01)
    with gpuckpt.open(prefix) as ckpt, pytest.raises(gpuckpt.ChecksumError, match="dec/w"):
        ckpt.restore(device={"dec/": HostDevice(name="failing"), "": other})
    assert other.pinned_live == 0 and other.streams == []  # it finished before the error came out
