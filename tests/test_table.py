"""The sorted-table reader and writer: FORMAT.md's worked example byte for byte, and properties."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuckpt.errors import CheckpointError, ChecksumError, FormatError
from gpuckpt.format.crc import crc32c, mask, unmask
from gpuckpt.format.table import build_table, parse_table, short_successor, shortest_separator

# FORMAT.md 2.9: SaveV2(["a", "s"], [float32 [1, 2], string scalar b"hi"]) -> a 138-byte index.
WORKED_INDEX = bytes.fromhex(
    "000006 08011a020801"  # key "", header {num_shards 1, version {producer 1}}
    "00010f61 0801 120412020802 2808 35593ce535"  # key "a": float32 [2], size 8, crc
    "00010d73 0807 1200 2008 2807 3509eb4d15"  # key "s": string scalar, offset 8, size 7, crc
    "0000000001000000 006e02a3e7"  # restarts [0], count 1; trailer
    "0000000001000000 00c0f2a1b0"  # empty metaindex block; trailer
    "000102740035 0000000001000000 00374a802b"  # index: "t" -> handle(0, 53); trailer
    "3a08470e" + "00" * 36 + "57fb808b247547db"  # footer handles, padding, magic
)


def test_crc_primitives():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert mask(0) == 0xA282EAD8
    assert unmask(mask(0x12345678)) == 0x12345678
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


def test_worked_example_parses_and_rebuilds_byte_for_byte():
    assert len(WORKED_INDEX) == 138
    items = parse_table(WORKED_INDEX, "worked.index")
    assert [k for k, _ in items] == [b"", b"a", b"s"]
    assert items[0][1] == bytes.fromhex("08011a020801")
    assert build_table(items) == WORKED_INDEX


def test_separators():
    assert shortest_separator(b"abcd", b"abzz") == b"abd"
    assert shortest_separator(b"ab", b"abc") == b"ab"
    assert shortest_separator(b"a\xff", b"b") == b"a\xff"
    assert short_successor(b"s") == b"t"
    assert short_successor(b"\x00w") == b"\x01"
    assert short_successor(b"\xff\xff") == b"\xff\xff"


keys = st.lists(st.binary(min_size=0, max_size=40), min_size=0, max_size=200, unique=True).map(sorted)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=keys, value_size=st.integers(0, 300), block_size=st.sampled_from([64, 512, 4096, 262144]))
def test_round_trip_any_sorted_keys(keys, value_size, block_size):
    items = [(k, bytes([i % 251]) * (value_size % (i + 7))) for i, k in enumerate(keys)]
    data = build_table(items, block_size=block_size)
    assert parse_table(data, "t.index") == items


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=60, unique=True).map(sorted),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_damaged_tables_raise_only_checkpoint_errors(keys, flips, cut):
    data = bytearray(build_table([(k, k * 3) for k in keys], block_size=128))
    for position, xor in flips:
        data[position % len(data)] ^= xor
    if cut is not None:
        del data[cut % len(data) :]
    try:
        items = parse_table(bytes(data), "t.index")
    except CheckpointError:
        return
    # A damage that still parses must keep the keys strictly increasing.
    assert all(a[0] < b[0] for a, b in zip(items, items[1:], strict=False))


def test_specific_damages():
    good = bytearray(build_table([(b"", b"h"), (b"k", b"v")]))
    with pytest.raises(FormatError, match="too short"):
        parse_table(bytes(good[-20:]), "x.index")
    with pytest.raises(FormatError, match="bad magic"):
        parse_table(bytes(good[:-1]) + b"\x00", "x.index")
    damaged = bytearray(good)
    damaged[3] ^= 0x40
    with pytest.raises(ChecksumError, match="checksum"):
        parse_table(bytes(damaged), "x.index")
    with pytest.raises(CheckpointError):
        parse_table(bytes(good[:-48]) + b"\xff" * 48, "x.index")


def test_duplicate_and_unsorted_keys_are_refused():
    with pytest.raises(ValueError):
        build_table([(b"b", b""), (b"a", b"")])
    with pytest.raises(FormatError, match="out of order"):
        # Two blocks each holding "k": the writer cannot make this, so splice two tables' blocks by hand.
        one = build_table([(b"k", b"1")], block_size=1)
        block = one[: one.index(b"\x00\x00\x00\x00\x01\x00\x00\x00") + 8 + 5]
        from gpuckpt.format.table import _LE64, HANDLES_SIZE, MAGIC, BlockHandle, _BlockBuilder

        body = bytearray(block + block)
        index = _BlockBuilder(1)
        index.add(b"k", BlockHandle(0, len(block) - 5).encode())
        index.add(b"l", BlockHandle(len(block), len(block) - 5).encode())
        meta_handle = BlockHandle(len(body), 8)
        empty = _BlockBuilder(16).finish()
        body += empty + b"\x00" + struct.pack("<I", mask(crc32c(b"\x00", crc32c(empty))))
        index_bytes = index.finish()
        index_handle = BlockHandle(len(body), len(index_bytes))
        body += index_bytes + b"\x00" + struct.pack("<I", mask(crc32c(b"\x00", crc32c(index_bytes))))
        handles = meta_handle.encode() + index_handle.encode()
        body += handles + b"\x00" * (HANDLES_SIZE - len(handles)) + _LE64.pack(MAGIC)
        parse_table(bytes(body), "x.index")
