"""Damaged and lying checkpoints: each ends in the exact typed error, naming the file and tensor,
before anything large is allocated. Built with tests/bundle_builder.py, then damaged."""

from __future__ import annotations

import os
import resource
import shutil

import numpy as np
import pytest
from bundle_builder import make_bundle
from conftest import fixture_path

import gpuckpt
from gpuckpt import ChecksumError, FormatError, MissingShardError, UnsupportedError
from gpuckpt._proto import tensor_bundle_pb2
from gpuckpt.format.crc import crc32c, mask
from gpuckpt.format.table import _decode_handle, build_table, iter_block, parse_footer

TENSORS = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "s": [b"ab", b"", b"x" * 200],
    "b": np.array([1, 2, 3], np.int64),
}


def build(tmp_path, edit=None, tensors=TENSORS, **kwargs):
    bundle = make_bundle(tensors, **kwargs)
    if edit is not None:
        edit(bundle)
    return bundle.write(str(tmp_path / "ck"))


def open_and_read_all(prefix):
    with gpuckpt.open(prefix) as ckpt:
        return ckpt.restore()


def set_field(name, **fields):
    def edit(bundle):
        entry = bundle.entries[name.encode()]
        for key, value in fields.items():
            if key == "dims":
                del entry.shape.dim[:]
                for d in value:
                    entry.shape.dim.add().size = d
            else:
                setattr(entry, key, value)

    return edit


def flip_data(name, delta=0):
    def edit(bundle):
        entry = bundle.entries[name.encode()]
        bundle.shards[entry.shard_id][entry.offset + delta] ^= 0x10

    return edit


def set_header(**fields):
    def edit(bundle):
        for key, value in fields.items():
            if key in ("producer", "min_consumer"):
                setattr(bundle.header.version, key, value)
            elif key == "bad_consumers":
                bundle.header.version.bad_consumers.extend(value)
            else:
                setattr(bundle.header, key, value)

    return edit


# (id, edit, expected error, tensor named in the message or None)
ENTRY_DAMAGES = [
    ("offset_past_end", set_field("w", offset=10**6), FormatError, "w"),
    ("size_past_end", set_field("s", size=10**6), FormatError, "s"),
    ("size_lie_numeric", set_field("w", size=44), FormatError, "w"),
    ("shape_lie_numeric", set_field("w", dims=[4, 4]), FormatError, "w"),
    ("negative_dim", set_field("w", dims=[-1, 12]), FormatError, "w"),
    ("huge_dims_overflow", set_field("w", dims=[2**62, 2**62]), FormatError, "w"),
    ("huge_string_tensor", set_field("s", dims=[2**40]), FormatError, "s"),
    ("too_many_dims", set_field("b", dims=[1] * 255), FormatError, "b"),
    ("negative_offset", set_field("b", offset=-8), FormatError, "b"),
    ("shard_out_of_range", set_field("b", shard_id=3), FormatError, "b"),
    ("negative_shard", set_field("b", shard_id=-1), FormatError, "b"),
    ("dtype_invalid", set_field("w", dtype=0), FormatError, "w"),
    ("dtype_ref", set_field("w", dtype=101), FormatError, "w"),
    ("dtype_lie_itemsize", set_field("w", dtype=2), FormatError, "w"),
    ("dtype_unknown", set_field("b", dtype=77), UnsupportedError, "b"),
    ("dtype_resource", set_field("b", dtype=20), UnsupportedError, "b"),
    ("dtype_variant", set_field("s", dtype=21), UnsupportedError, "s"),
    ("crc_wrong_numeric", set_field("w", crc32c=mask(1)), ChecksumError, "w"),
    ("crc_wrong_string", set_field("s", crc32c=mask(1)), ChecksumError, "s"),
    ("data_bit_flip_numeric", flip_data("w", 5), ChecksumError, "w"),
    ("data_bit_flip_string_body", flip_data("s", 10), ChecksumError, "s"),
    ("string_length_flip", flip_data("s", 0), ChecksumError, "s"),
    ("string_length_lie", set_field("s", size=60), FormatError, "s"),
    ("string_length_crc_flip", flip_data("s", 4), ChecksumError, "s"),
    ("version_min_consumer", set_header(min_consumer=2), UnsupportedError, None),
    ("version_bad_consumer", set_header(bad_consumers=[1]), UnsupportedError, None),
    ("version_negative_producer", set_header(producer=-1), UnsupportedError, None),
    ("zero_shards", set_header(num_shards=0), FormatError, None),
]


@pytest.mark.parametrize("case", ENTRY_DAMAGES, ids=[c[0] for c in ENTRY_DAMAGES])
def test_entry_damages(tmp_path, case):
    _, edit, error, tensor = case
    prefix = build(tmp_path, edit)
    with pytest.raises(error) as info:
        open_and_read_all(prefix)
    message = str(info.value)
    assert "ck.index" in message or "ck.data-" in message, message
    if tensor is not None:
        assert f"tensor {tensor!r}" in message, message


def test_string_length_varint_lie_is_caught_even_without_verify(tmp_path):
    def edit(bundle):
        entry = bundle.entries[b"s"]
        bundle.shards[0][entry.offset + 2] = 0x7F  # third length claims 127 bytes

    prefix = build(tmp_path, edit)
    with gpuckpt.open(prefix) as ckpt, pytest.raises(FormatError, match="string lengths"):
        ckpt.get_tensor("s", verify=False)


def test_huge_declared_string_tensor_allocates_nothing(tmp_path):
    # A tiny index declaring 2**31 strings in a 500-byte file: refused at open from arithmetic alone.
    prefix = build(tmp_path, set_field("s", dims=[2**31]))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30 if hard == resource.RLIM_INFINITY else min(hard, 4 << 30), hard))
    try:
        with pytest.raises(FormatError, match="cannot fit"):
            gpuckpt.open(prefix)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


INDEX_DAMAGES = [
    ("empty_index", lambda b: b"", FormatError),
    ("index_47_bytes", lambda b: b[-47:], FormatError),
    ("index_truncated_by_one", lambda b: b[:-1], FormatError),
    ("index_truncated_to_half", lambda b: b[: len(b) // 2], FormatError),
    ("bad_magic", lambda b: b[:-8] + b"\x00" * 8, FormatError),
    ("footer_handles_garbage", lambda b: b[:-48] + b"\xff" * 40 + b[-8:], FormatError),
    ("block_bit_flip", lambda b: bytes([b[0] ^ 1]) + b[1:], ChecksumError),
    ("trailer_crc_flip", None, ChecksumError),
    ("snappy_block", None, UnsupportedError),
    ("bad_block_type", None, FormatError),
    ("handle_past_end", None, FormatError),
    ("no_header_entry", None, FormatError),
    ("unparseable_entry", None, FormatError),
]


def _rewrite_blocks(index: bytes, block_type: int | None = None, crc_xor: int = 0) -> bytes:
    data = bytearray(index)
    footer = parse_footer(index, "x")
    # The first data block's handle is the index block's first value.
    index_block = bytes(data[footer.index.offset : footer.index.offset + footer.index.size])
    handle, _ = _decode_handle(iter_block(index_block, "x", 0)[0][1], 0, 20)
    end = handle.offset + handle.size
    if block_type is not None:
        data[end] = block_type
        crc = crc32c(bytes([block_type]), crc32c(bytes(data[handle.offset : end])))
        data[end + 1 : end + 5] = mask(crc).to_bytes(4, "little")
    data[end + 1] ^= crc_xor
    return bytes(data)


@pytest.mark.parametrize("case", INDEX_DAMAGES, ids=[c[0] for c in INDEX_DAMAGES])
def test_index_damages(tmp_path, case):
    name, damage, error = case
    bundle = make_bundle(TENSORS)
    index = bundle.index_bytes()
    if name == "trailer_crc_flip":
        index = _rewrite_blocks(index, crc_xor=0x04)
    elif name == "snappy_block":
        index = _rewrite_blocks(index, block_type=1)
    elif name == "bad_block_type":
        index = _rewrite_blocks(index, block_type=7)
    elif name == "handle_past_end":
        index = build_table([(b"", bundle.header.SerializeToString())])
        index = index[:-48] + bytes([0, 8, 0xE8, 0x07]) + b"\x00" * 36 + index[-8:]  # index handle (0, 1000)
    elif name == "no_header_entry":
        index = build_table([(b"w", bundle.entries[b"w"].SerializeToString())])
    elif name == "unparseable_entry":
        index = build_table([(b"", bundle.header.SerializeToString()), (b"w", b"\xff\xff\xff")])
    else:
        index = damage(index)
    prefix = bundle.write(str(tmp_path / "ck"), index_bytes=index)
    with pytest.raises(error) as info:
        open_and_read_all(prefix)
    assert "ck.index" in str(info.value)


def test_missing_shard_is_file_not_found_and_checkpoint_error(tmp_path):
    prefix = build(tmp_path, num_shards=2)
    os.remove(prefix + ".data-00001-of-00002")
    with pytest.raises(MissingShardError) as info:
        gpuckpt.open(prefix)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, gpuckpt.CheckpointError)
    assert "data-00001-of-00002" in str(info.value)


def test_data_file_truncated_after_open_is_a_short_read(tmp_path):
    prefix = build(tmp_path)
    with gpuckpt.open(prefix) as ckpt:
        with open(prefix + ".data-00000-of-00001", "r+b") as f:
            f.truncate(10)
        with pytest.raises(FormatError, match="short"):
            ckpt.restore()
        with pytest.raises(FormatError, match="short") as info:
            ckpt.get_slice("w")[0]
        assert "tensor 'w'" in str(info.value)
        with pytest.raises(FormatError, match="shrank"):
            ckpt.get_tensor("w", copy=False)


def test_partitioned_lies(tmp_path):
    def edit_missing(bundle):
        full = tensor_bundle_pb2.BundleEntryProto(dtype=1)
        full.shape.dim.add().size = 4
        s = full.slices.add()
        s.extent.add(start=0, length=2)
        bundle.entries[b"pv"] = full

    prefix = build(tmp_path, edit_missing)
    with pytest.raises(FormatError, match="missing the data entry") as info:
        gpuckpt.open(prefix)
    assert "tensor 'pv'" in str(info.value)

    def edit_outside(bundle):
        full = tensor_bundle_pb2.BundleEntryProto(dtype=1)
        full.shape.dim.add().size = 4
        full.slices.add().extent.add(start=3, length=2)
        bundle.entries[b"pv"] = full

    with pytest.raises(FormatError, match="outside"):
        gpuckpt.open(build(tmp_path, edit_outside))


@pytest.mark.parametrize(
    "content",
    [
        "model_checkpoint_path: ",
        'model_checkpoint_path: "a" bogus_field: 1',
        "",
        '\xff\xfe"',
        'all_model_checkpoint_paths: "x"',
    ],
    ids=["no_value", "unknown_field", "empty", "not_utf8", "no_model_path"],
)
def test_broken_state_files(tmp_path, content):
    src = fixture_path("keras_adam")
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path / name)
    (tmp_path / "checkpoint").write_bytes(content.encode("latin-1"))
    with pytest.raises(FormatError) as info:
        gpuckpt.latest_checkpoint(tmp_path)
    assert "checkpoint" in str(info.value)
    with pytest.raises(FormatError):
        gpuckpt.open(tmp_path)


def test_object_graph_entry_of_the_wrong_kind(tmp_path):
    prefix = build(tmp_path, tensors={"_CHECKPOINTABLE_OBJECT_GRAPH": np.ones(3, np.float32), "w": np.ones(1)})
    with gpuckpt.open(prefix) as ckpt, pytest.raises(FormatError, match="object graph"):
        ckpt.objects()
    prefix = build(
        tmp_path / "b", tensors={"_CHECKPOINTABLE_OBJECT_GRAPH": np.array(b"\x0a\xff", dtype=object), "w": np.ones(1)}
    )
    with gpuckpt.open(prefix) as ckpt, pytest.raises(FormatError, match="object graph"):
        ckpt.kind("w")


def test_zero_copy_view_after_the_file_shrank_is_an_error_not_sigbus(tmp_path):
    prefix = build(tmp_path)
    with gpuckpt.open(prefix) as ckpt:
        assert ckpt.get_tensor("w", copy=False)[0].tolist() == [0, 1, 2, 3]  # mapped now
        with open(prefix + ".data-00000-of-00001", "r+b") as f:
            f.truncate(4)
        with pytest.raises(FormatError, match="shrank"):
            ckpt.get_tensor("w", copy=False)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_thousand_failed_opens_and_restores_leak_no_files(tmp_path):
    good = build(tmp_path / "good", num_shards=2)
    bad_index = build(tmp_path / "bad", set_field("w", offset=10**6), num_shards=2)
    corrupt_data = build(tmp_path / "crc", flip_data("w", 3), num_shards=2)
    before = _open_fds()
    for _ in range(1000):
        with pytest.raises(FormatError):
            gpuckpt.open(bad_index)
        with gpuckpt.open(corrupt_data) as ckpt, pytest.raises(ChecksumError):
            ckpt.restore(threads=2)
        with gpuckpt.open(good) as ckpt:
            ckpt.get_tensor("w", copy=False)  # maps a shard
    assert _open_fds() == before


def test_string_length_beyond_the_tensor_is_refused_before_any_checksum(tmp_path):
    def edit(bundle):
        entry = bundle.entries[b"s"]
        bundle.shards[0][entry.offset : entry.offset + 1] = b"\xff" * 9 + b"\x01"  # a 64-bit length
        entry.size += 9

    prefix = build(tmp_path, edit)
    with gpuckpt.open(prefix) as ckpt, pytest.raises(FormatError, match="exceeds"):
        ckpt.get_tensor("s", verify=False)


def _structural_boundaries(index: bytes) -> list[int]:
    """Every place a part of the table ends or starts: each block's contents, its type byte and
    CRC, the index and metaindex blocks, and the footer."""
    footer = parse_footer(index, "x")
    handles = [footer.metaindex, footer.index]
    index_block = index[footer.index.offset : footer.index.offset + footer.index.size]
    handles += [_decode_handle(v, 0, len(v))[0] for _, v in iter_block(index_block, "x", 0)]
    cuts = {len(index) - 48, len(index) - 8}
    for handle in handles:
        end = handle.offset + handle.size
        cuts.update({handle.offset, end, end + 1, end + 5})
    return sorted(c for c in cuts if 0 < c < len(index))


def test_index_truncated_at_every_structural_boundary(tmp_path):
    bundle = make_bundle({f"layer_{i:03d}/kernel": np.full(2, i, np.float32) for i in range(60)})
    items = [(b"", bundle.header.SerializeToString())]
    items += [(k, bundle.entries[k].SerializeToString()) for k in sorted(bundle.entries)]
    index = build_table(items, block_size=256)  # several data blocks
    cuts = _structural_boundaries(index)
    assert len(cuts) > 20
    for cut in cuts:
        for at in (cut - 1, cut, cut + 1):
            prefix = bundle.write(str(tmp_path / f"cut{at}" / "ck"), index_bytes=index[:at])
            with pytest.raises(FormatError) as info:
                open_and_read_all(prefix)
            assert "ck.index" in str(info.value), (at, str(info.value))


def test_data_file_truncated_at_every_tensor_boundary(tmp_path):
    bundle = make_bundle(TENSORS)
    whole = bytes(bundle.shards[0])
    for name, entry in bundle.entries.items():
        for at in {entry.offset, entry.offset + entry.size - 1}:
            prefix = bundle.write(str(tmp_path / f"{name.decode()}{at}" / "ck"))
            with open(prefix + ".data-00000-of-00001", "wb") as f:
                f.write(whole[:at])
            with pytest.raises(FormatError) as info:
                gpuckpt.open(prefix)  # refused at open: the index claims bytes the file lacks
            assert "ck.data-00000-of-00001" in str(info.value) or "ck.index" in str(info.value)
            assert "tensor '" in str(info.value)


def test_a_bit_flip_in_each_part_of_the_index(tmp_path):
    """Every data block's contents, type byte and CRC, the index block, the footer's index handle
    and magic: each flip is refused. The metaindex block (always empty) and the footer padding are
    ignored by TF's reader and by this one (FORMAT.md 2.2, 2.6), so flips there are accepted."""
    bundle = make_bundle({f"layer_{i:03d}/kernel": np.full(2, i, np.float32) for i in range(60)})
    items = [(b"", bundle.header.SerializeToString())]
    items += [(k, bundle.entries[k].SerializeToString()) for k in sorted(bundle.entries)]
    index = build_table(items, block_size=256)
    footer = parse_footer(index, "x")
    index_block = index[footer.index.offset : footer.index.offset + footer.index.size]
    handles = [footer.index] + [_decode_handle(v, 0, len(v))[0] for _, v in iter_block(index_block, "x", 0)]
    _, index_handle_at = _decode_handle(index, len(index) - 48, len(index))  # after the metaindex handle
    places = [index_handle_at, len(index) - 1]
    for handle in handles:
        end = handle.offset + handle.size
        places += [handle.offset, handle.offset + handle.size // 2, end, end + 2]
    for place in places:
        for bit in (0, 7):
            damaged = bytearray(index)
            damaged[place] ^= 1 << bit
            prefix = bundle.write(str(tmp_path / f"flip{place}-{bit}" / "ck"), index_bytes=bytes(damaged))
            with pytest.raises(gpuckpt.CheckpointError) as info:
                open_and_read_all(prefix)
            assert "ck.index" in str(info.value), (place, bit, str(info.value))
