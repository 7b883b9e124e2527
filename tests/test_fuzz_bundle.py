"""Property tests: any damage to a bundle's index or data ends in a CheckpointError (or, when the
damage misses everything checked, in values equal to the originals), never another exception."""

from __future__ import annotations

import numpy as np
from bundle_builder import make_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuckpt

ORIGINAL = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([1, -2], np.int64),
    "s": [b"xy", b"", b"z" * 130],
    "scalar": np.float16(1.5),
}


def _as_array(value):
    return np.asarray(value, dtype=object) if isinstance(value, list) else np.asarray(value)


damage = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index_damage=damage, data_damage=st.one_of(st.none(), damage), cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_damaged_bundles_only_raise_checkpoint_errors(tmp_path, index_damage, data_damage, cut):
    bundle = make_bundle(ORIGINAL, num_shards=2)
    index = bytearray(bundle.index_bytes())
    for position, xor in index_damage:
        index[position % len(index)] ^= xor
    if cut is not None:
        del index[cut % len(index) :]
    for position, xor in data_damage or []:
        shard = bundle.shards[position % 2]
        if shard:
            shard[position % len(shard)] ^= xor
    prefix = bundle.write(str(tmp_path / "ck"), index_bytes=bytes(index))
    try:
        with gpuckpt.open(prefix) as ckpt:
            restored = ckpt.restore()
    except gpuckpt.CheckpointError:
        return
    # Every check passed, so every tensor read must be exactly what was saved.
    for name, value in restored.items():
        if name in ORIGINAL:
            expected = _as_array(ORIGINAL[name])
            assert value.dtype == expected.dtype and value.shape == expected.shape
            assert list(value.reshape(-1)) == list(expected.reshape(-1))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 10),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
    extra=st.binary(max_size=12),
    verify=st.booleans(),
)
def test_lying_entries_in_valid_tables_only_raise_checkpoint_errors(tmp_path, which, flips, extra, verify):
    """Entries damaged *before* the table is built, so every block crc is valid: the bundle layer's
    own checks must catch every lie (a lie they cannot see, like float32 <-> int32, reads as bytes)."""
    from gpuckpt.format.table import build_table

    bundle = make_bundle(ORIGINAL, num_shards=2)
    items = [(b"", bundle.header.SerializeToString())]
    items += [(k, bundle.entries[k].SerializeToString()) for k in sorted(bundle.entries)]
    key, value = items[which % len(items)]
    value = bytearray(value + extra)
    for position, xor in flips:
        value[position % len(value)] ^= xor
    items[which % len(items)] = (key, bytes(value))
    prefix = bundle.write(str(tmp_path / "ck"), index_bytes=build_table(items))
    try:
        with gpuckpt.open(prefix, verify=verify) as ckpt:
            ckpt.restore()
            for name in ckpt.keys():
                ckpt.get_slice(name)[...]
    except gpuckpt.CheckpointError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 10),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
    verify=st.booleans(),
)
def test_lying_entries_on_the_device_path_only_raise_checkpoint_errors(tmp_path, which, flips, verify):
    """The same lies, restored through the staged device pipeline (host stand-in device)."""
    from gpuckpt.device import HostDevice
    from gpuckpt.format.table import build_table
    from gpuckpt.options import RestoreOptions

    numeric = {k: v for k, v in ORIGINAL.items() if k != "s"}
    bundle = make_bundle(numeric, num_shards=2)
    items = [(b"", bundle.header.SerializeToString())]
    items += [(k, bundle.entries[k].SerializeToString()) for k in sorted(bundle.entries)]
    key, value = items[which % len(items)]
    value = bytearray(value)
    for position, xor in flips:
        value[position % len(value)] ^= xor
    items[which % len(items)] = (key, bytes(value))
    prefix = bundle.write(str(tmp_path / "ck"), index_bytes=build_table(items))
    device = HostDevice()
    options = RestoreOptions(staging_slots=2, staging_slot_bytes=16, io_threads=2, copy_streams=2)
    try:
        with gpuckpt.open(prefix, verify=verify, options=options) as ckpt:
            ckpt.restore(device=device)
    except gpuckpt.CheckpointError:
        pass
    assert device.pinned_live == 0
