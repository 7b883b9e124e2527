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
