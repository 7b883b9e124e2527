"""Arguments and files the API refuses by name, before anything is read."""

from __future__ import annotations

import os

import numpy as np
import pytest
from bundle_builder import make_bundle

import gpuckpt


@pytest.fixture()
def small(tmp_path):
    tensors = {"w": np.arange(100, dtype=np.float32), "b": np.ones(7, np.float64)}
    return make_bundle(tensors).write(str(tmp_path / "ckpt")), tensors


@pytest.mark.parametrize("threads", [0, -3, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(small, threads):
    prefix, _ = small
    with pytest.raises(gpuckpt.InvalidArgumentError, match="threads"):
        gpuckpt.open(prefix, threads=threads)
    with gpuckpt.open(prefix) as ckpt, pytest.raises(gpuckpt.InvalidArgumentError, match="threads"):
        ckpt.restore(threads=threads)


def test_a_short_data_file_is_named_at_open(small, tmp_path):
    prefix, tensors = small
    copy = make_bundle(tensors).write(str(tmp_path / "short"))
    data = copy + ".data-00000-of-00001"
    os.truncate(data, os.path.getsize(data) - 1)
    with pytest.raises(gpuckpt.FormatError, match=r"data file '.*short\.data-00000-of-00001' is too short"):
        gpuckpt.open(copy)


def test_bytes_read_counts_what_each_read_asked_of_the_files(small):
    prefix, tensors = small
    data = prefix + ".data-00000-of-00001"
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.bytes_read() == {}
        ckpt.get_tensor("w")
        assert ckpt.bytes_read() == {data: tensors["w"].nbytes}
        ckpt.get_slice("w")[10:20]
        assert ckpt.bytes_read() == {data: tensors["w"].nbytes + 40}
        ckpt.restore()
        assert ckpt.bytes_read()[data] == 2 * tensors["w"].nbytes + 40 + tensors["b"].nbytes


@pytest.mark.parametrize("device", [{"w": "cpu", "b": "cpu"}, ["cpu", "cpu"]])
def test_regions_and_out_with_a_device_map_or_list(small, device):
    prefix, tensors = small
    out = {"w": np.empty(10, np.float32)}
    with gpuckpt.open(prefix) as ckpt:
        got = ckpt.restore(["w", "b"], device=device, regions={"b": np.s_[None, 2:5], "w": np.s_[::10]}, out=out)
    assert got["w"] is out["w"] and np.array_equal(out["w"], tensors["w"][::10])
    assert np.array_equal(got["b"], tensors["b"][None, 2:5])


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # numpy's note on np.matrix
def test_out_may_be_an_ndarray_subclass(tmp_path):
    """np.matrix reshapes to 2-D: the reader fills it through a plain view of its memory (a
    partitioned tensor once wrote one slice, then failed)."""
    full = np.arange(40, dtype=np.float32).reshape(4, 10)
    parts = [((slice(0, 2), slice(None)), full[:2]), ((slice(2, 4), slice(None)), full[2:])]
    prefix = str(tmp_path / "p")
    gpuckpt.save(prefix, {"pv": gpuckpt.Partitioned((4, 10), parts), "w": full})
    out = {"pv": np.asmatrix(np.zeros((4, 10), np.float32)), "w": np.asmatrix(np.zeros((4, 10), np.float32))}
    with gpuckpt.open(prefix) as ckpt:
        got = ckpt.restore(out=out)
    for name in out:
        assert got[name] is out[name] and np.array_equal(np.asarray(out[name]), full), name


def test_out_for_an_unreadable_tensor_says_why(tmp_path):
    prefix = make_bundle({"v": np.zeros(3, np.float32)}, dtypes={"v": 21}).write(str(tmp_path / "variant"))
    with gpuckpt.open(prefix) as ckpt, pytest.raises(gpuckpt.UnsupportedError, match="DT_VARIANT"):
        ckpt.restore(out={"v": np.zeros(3, np.float32)})


def test_an_out_array_of_the_wrong_shape_is_a_checkpoint_error(small):
    prefix, _ = small
    with gpuckpt.open(prefix) as ckpt, pytest.raises(gpuckpt.InvalidArgumentError, match="nothing was written"):
        ckpt.restore(out={"w": np.zeros(99, np.float32)})


def test_conversions_to_formats_without_infinity_are_not_defined():
    from gpuckpt.host.floats import convert_bits

    with pytest.raises(ValueError, match="no infinity"):
        convert_bits("f32", "f8e4m3fn", np.zeros(2, np.uint32))
