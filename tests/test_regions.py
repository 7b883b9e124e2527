"""``restore(regions={name: index})``: a region of a tensor equals numpy's indexing of the whole,
on the host and on the device path, reading only the bytes the region needs."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_builder import make_bundle

import gpuckpt
from gpuckpt.regions import RegionError


@pytest.fixture
def bundle(tmp_path):
    a = np.arange(2000 * 300, dtype=np.float32).reshape(2000, 300)
    return make_bundle({"a": a, "s": np.array([b"x", b"yy", b"zzz"], dtype=object)}).write(str(tmp_path / "ck")), a


def test_host_regions_equal_numpy_indexing(bundle):
    prefix, a = bundle
    with gpuckpt.open(prefix) as ckpt:
        for key in [np.s_[10:20], np.s_[:, 5:9], np.s_[::7, ::-3], np.s_[5], np.s_[..., 3], np.s_[None, 4:1:-1, ...]]:
            got = ckpt.restore(regions={"a": key})["a"]
            assert got.shape == a[key].shape
            np.testing.assert_array_equal(got, a[key])
        assert list(ckpt.restore(regions={"s": np.s_[1:]})["s"]) == [b"yy", b"zzz"]
        with pytest.raises(RegionError, match="tensor 'a'"):
            ckpt.restore(regions={"a": np.s_[5000]})
