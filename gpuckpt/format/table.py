"""TensorFlow's sorted string table, the container of every ``.index`` file (FORMAT.md 2).

:func:`parse_table` takes the whole file as bytes and returns its (key, value) pairs in order, after
checking the footer, every block handle, every block's crc32c and every entry's bounds, and that
keys strictly increase. :class:`TableBuilder` writes the same layout byte for byte as TF's writer.
"""

from __future__ import annotations

import dataclasses
import struct

from ..errors import ChecksumError, FormatError, UnsupportedError, describe
from .crc import crc32c, mask, unmask
from .varint import VarintError, decode_varint, encode_varint

FOOTER_SIZE = 48
HANDLES_SIZE = 40  # two BlockHandles of at most 20 bytes each, zero-padded
MAGIC = 0xDB4775248B80FB57
BLOCK_TRAILER_SIZE = 5
BLOCK_TYPE_RAW = 0
BLOCK_TYPE_SNAPPY = 1

_LE32 = struct.Struct("<I")
_LE64 = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True, slots=True)
class BlockHandle:
    """Where a block lies in the file: ``size`` excludes the 5-byte trailer."""

    offset: int
    size: int

    def encode(self) -> bytes:
        return encode_varint(self.offset) + encode_varint(self.size)


@dataclasses.dataclass(frozen=True, slots=True)
class Footer:
    metaindex: BlockHandle
    index: BlockHandle


def _decode_handle(buf: bytes, pos: int, limit: int) -> tuple[BlockHandle, int]:
    offset, pos = decode_varint(buf, pos, limit)
    size, pos = decode_varint(buf, pos, limit)
    return BlockHandle(offset, size), pos


def parse_footer(data: bytes, path: object) -> Footer:
    """Check the magic number and decode the two handles of the last 48 bytes."""
    if len(data) < FOOTER_SIZE:
        raise FormatError(
            f"index is too short to be a sorted table ({len(data)} bytes, at least {FOOTER_SIZE}): " + describe(path)
        )
    start = len(data) - FOOTER_SIZE
    (magic,) = _LE64.unpack_from(data, start + HANDLES_SIZE)
    if magic != MAGIC:
        raise FormatError(
            f"not a sorted table (bad magic number {magic:#018x}): " + describe(path, offset=start + HANDLES_SIZE)
        )
    try:
        metaindex, pos = _decode_handle(data, start, start + HANDLES_SIZE)
        index, _ = _decode_handle(data, pos, start + HANDLES_SIZE)
    except VarintError as exc:
        raise FormatError(f"undecodable block handle in footer ({exc}): " + describe(path, offset=start)) from None
    return Footer(metaindex, index)


def read_block(data: bytes, handle: BlockHandle, path: object, what: str) -> bytes:
    """Return the contents of one block after checking its bounds, type byte and crc32c."""
    body_end = len(data) - FOOTER_SIZE
    end = handle.offset + handle.size
    if end + BLOCK_TRAILER_SIZE > body_end:
        raise FormatError(
            f"{what} block handle (offset {handle.offset}, size {handle.size}) runs past the table body "
            f"({body_end} bytes; truncated file?): " + describe(path, offset=handle.offset)
        )
    block = data[handle.offset : end]
    block_type = data[end]
    (stored,) = _LE32.unpack_from(data, end + 1)
    actual = crc32c(data[end : end + 1], crc32c(block))
    if unmask(stored) != actual:
        raise ChecksumError(
            f"{what} block checksum mismatch (stored {unmask(stored):#010x}, computed {actual:#010x}): "
            + describe(path, offset=handle.offset)
        )
    if block_type == BLOCK_TYPE_SNAPPY:
        raise UnsupportedError(
            f"{what} block is Snappy-compressed (written by TensorFlow before 1.2); gpuckpt reads "
            "uncompressed tables only: " + describe(path, offset=handle.offset)
        )
    if block_type != BLOCK_TYPE_RAW:
        raise FormatError(f"bad block type {block_type} in {what} block: " + describe(path, offset=end))
    return block


def iter_block(block: bytes, path: object, block_offset: int) -> list[tuple[bytes, bytes]]:
    """Decode every entry of one block (FORMAT.md 2.5), checking each against the block's bounds."""
    size = len(block)
    if size < 4:
        raise FormatError(f"block of {size} bytes is too short: " + describe(path, offset=block_offset))
    (num_restarts,) = _LE32.unpack_from(block, size - 4)
    if num_restarts > (size - 4) // 4:
        raise FormatError(
            f"block declares {num_restarts} restarts, more than its {size} bytes can hold: "
            + describe(path, offset=block_offset)
        )
    limit = size - 4 * (num_restarts + 1)
    entries = []
    whole_keys = set()  # offsets of entries storing their key whole: where restarts may point
    key = b""
    pos = 0
    try:
        while pos < limit:
            entry_start = pos
            # One-byte varints are by far the most common; decode them inline.
            shared = block[pos]
            if shared < 0x80:
                pos += 1
            else:
                shared, pos = decode_varint(block, pos, limit, 5)
            if shared == 0:
                whole_keys.add(entry_start)
            non_shared = block[pos] if pos < limit else 0x80
            if non_shared < 0x80:
                pos += 1
            else:
                non_shared, pos = decode_varint(block, pos, limit, 5)
            value_len = block[pos] if pos < limit else 0x80
            if value_len < 0x80:
                pos += 1
            else:
                value_len, pos = decode_varint(block, pos, limit, 5)
            if shared > len(key) or pos + non_shared + value_len > limit:
                raise FormatError(
                    "bad entry in block (shared prefix or length out of range): "
                    + describe(path, offset=block_offset + entry_start)
                )
            key = key[:shared] + block[pos : pos + non_shared]
            pos += non_shared
            entries.append((key, block[pos : pos + value_len]))
            pos += value_len
    except VarintError as exc:
        raise FormatError(f"bad entry in block ({exc}): " + describe(path, offset=block_offset + pos)) from None
    # TF's lookups binary-search the restart array, so a restart that does not point at an entry
    # holding its whole key would make TF and this reader disagree: refuse it.
    restarts = struct.unpack_from(f"<{num_restarts}I", block, limit)
    if entries and not all(r in whole_keys for r in restarts):
        raise FormatError(
            "block restart array does not point at entry boundaries: " + describe(path, offset=block_offset + limit)
        )
    return entries


def parse_table(data: bytes, path: object) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a sorted table, in order; keys checked to strictly increase.

    Data blocks must follow one another without overlap (as TF's writer lays them out), which also
    bounds the work a hostile index block can cause to one pass over the file.
    """
    footer = parse_footer(data, path)
    index_block = read_block(data, footer.index, path, "index")
    items: list[tuple[bytes, bytes]] = []
    next_free = 0
    for _, handle_bytes in iter_block(index_block, path, footer.index.offset):
        try:
            handle, _ = _decode_handle(handle_bytes, 0, len(handle_bytes))
        except VarintError as exc:
            raise FormatError(
                f"undecodable data block handle in index block ({exc}): " + describe(path, offset=footer.index.offset)
            ) from None
        if handle.offset < next_free:
            raise FormatError(
                f"data block at offset {handle.offset} overlaps or precedes the previous block "
                f"(ends at {next_free}): " + describe(path, offset=handle.offset)
            )
        block = read_block(data, handle, path, "data")
        next_free = handle.offset + handle.size + BLOCK_TRAILER_SIZE
        block_items = iter_block(block, path, handle.offset)
        if block_items and items and block_items[0][0] <= items[-1][0]:
            raise FormatError(
                f"keys out of order across blocks ({items[-1][0]!r} then {block_items[0][0]!r}): "
                + describe(path, offset=handle.offset)
            )
        for i in range(1, len(block_items)):
            if block_items[i][0] <= block_items[i - 1][0]:
                raise FormatError(
                    f"keys out of order or duplicated ({block_items[i - 1][0]!r} then {block_items[i][0]!r}): "
                    + describe(path, offset=handle.offset)
                )
        items.extend(block_items)
    return items


# ------------------------------------------------------------------------------------------------
# Writing (FORMAT.md 2.8): used by tests to build fixtures and by the writer.

BLOCK_SIZE = 262144
RESTART_INTERVAL = 16


class _BlockBuilder:
    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""
        self.empty = True

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.restart_interval:
            limit = min(len(self.last_key), len(key))
            while shared < limit and self.last_key[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.counter += 1
        self.empty = False

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + b"".join(_LE32.pack(r) for r in self.restarts) + _LE32.pack(len(self.restarts))


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    d = 0
    while d < n and start[d] == limit[d]:
        d += 1
    if d < n and start[d] < 0xFF and start[d] + 1 < limit[d]:
        return start[:d] + bytes([start[d] + 1])
    return start


def short_successor(key: bytes) -> bytes:
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def build_table(items: list[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE) -> bytes:
    """Serialize strictly increasing (key, value) pairs exactly as TF's table writer does."""
    out = bytearray()
    index = _BlockBuilder(1)
    data = _BlockBuilder(RESTART_INTERVAL)
    pending: BlockHandle | None = None
    last_key: bytes | None = None

    def write_block(contents: bytes) -> BlockHandle:
        handle = BlockHandle(len(out), len(contents))
        out.extend(contents)
        out.append(BLOCK_TYPE_RAW)
        out.extend(_LE32.pack(mask(crc32c(b"\x00", crc32c(contents)))))
        return handle

    def flush() -> None:
        nonlocal data, pending
        if not data.empty:
            pending = write_block(data.finish())
            data = _BlockBuilder(RESTART_INTERVAL)

    for key, value in items:
        if last_key is not None and key <= last_key:
            raise ValueError(f"table keys must strictly increase: {last_key!r} then {key!r}")
        if last_key is not None and len(key) + len(value) >= 2 * block_size:
            flush()
        if pending is not None:
            index.add(shortest_separator(last_key or b"", key), pending.encode())
            pending = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            flush()
    flush()
    metaindex = write_block(_BlockBuilder(RESTART_INTERVAL).finish())
    if pending is not None:
        index.add(short_successor(last_key or b""), pending.encode())
    index_handle = write_block(index.finish())
    handles = metaindex.encode() + index_handle.encode()
    out += handles + b"\x00" * (HANDLES_SIZE - len(handles)) + _LE64.pack(MAGIC)
    return bytes(out)
