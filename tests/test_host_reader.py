"""Large tensors read in parts by several threads, their CRCs combined."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_builder import make_bundle
from hypothesis import given
from hypothesis import strategies as st

import gpuckpt
from gpuckpt.format.crc import crc32c, crc32c_combine
from gpuckpt.host import reader
from gpuckpt.host.arena import owner_of


@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32c_combine(a, b):
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


@pytest.fixture
def big(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "SPLIT_BYTES", 1 << 20)  # parts of 1 MiB: many parts, small test
    values = np.random.default_rng(0).standard_normal(5_000_000).astype(np.float32)  # 20 MB
    bundle = make_bundle({"big": values, "small": np.arange(3, dtype=np.int8)})
    return bundle, values, tmp_path


def test_parts_read_by_several_threads_match(big):
    bundle, values, tmp_path = big
    prefix = bundle.write(str(tmp_path / "ok"))
    with gpuckpt.open(prefix) as ckpt:
        seen = []
        got = ckpt.restore(threads=3, progress=lambda d, t: seen.append(d))
        assert got["big"].tobytes() == values.tobytes() and got["big"].flags.writeable
        assert isinstance(owner_of(got["big"]), memoryview)  # its own part of the restore's mapping
        assert seen[-1] == values.nbytes + 3


def test_damage_in_a_middle_part_is_caught(big):
    bundle, values, tmp_path = big
    entry = bundle.entries[b"big"]
    bundle.shards[0][entry.offset + 7 * (1 << 20) + 5] ^= 0x01
    prefix = bundle.write(str(tmp_path / "bad"))
    with gpuckpt.open(prefix) as ckpt:
        with pytest.raises(gpuckpt.ChecksumError, match="'big'"):
            ckpt.restore(threads=3)
        assert ckpt.restore(threads=3, verify=False)["small"].tolist() == [0, 1, 2]
