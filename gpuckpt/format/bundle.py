"""The bundle layer: the ``.index`` table's header and entries as frozen records (FORMAT.md 3).

:func:`parse_index` turns the bytes of a ``.index`` file into a :class:`BundleIndex` after checking
everything that can be checked without the data files: header and version, every entry's dtype,
shape, shard id, byte range arithmetic and size, and every partitioned tensor's slices. Protobuf
objects never leave this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

from google.protobuf.message import DecodeError

from .._proto import tensor_bundle_pb2, tensor_shape_pb2
from ..dtypes import DTYPES, REFUSED, DTypeInfo, dtype_name
from ..errors import FormatError, UnsupportedError, describe
from .slices import Extent, TensorSlice, check_extents, slice_key, slice_shape
from .table import parse_table

ShardSize = Callable[[int, int], int]  # (shard_id, num_shards) -> bytes in that data file

#: The bundle format version this reader implements, as a consumer (FORMAT.md 3.3).
CONSUMER_VERSION = 1
MIN_PRODUCER = 0
MAX_RANK = 254
_INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class BundleHeader:
    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int
    bad_consumers: tuple[int, ...]


class TensorEntry(NamedTuple):
    """One tensor (or one saved slice) as the index describes it.

    For a partitioned tensor ``slices`` is non-empty and the byte-range fields are unused: its data
    lives in the entries found under :func:`~gpuckpt.format.slices.slice_key`.
    ``dtype_info`` is None for dtypes that cannot be read (the reason is raised on read).
    A NamedTuple rather than a frozen dataclass: as immutable, and built 30x faster, which matters
    for indexes of 100,000 entries.
    """

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc32c: int
    slices: tuple[TensorSlice, ...] = ()

    @property
    def dtype_info(self) -> DTypeInfo | None:
        return DTYPES.get(self.dtype)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_partitioned(self) -> bool:
        return bool(self.slices)


@dataclasses.dataclass(frozen=True)
class BundleIndex:
    """A parsed, validated ``.index``: the header, the tensors by name, and the slice entries by key."""

    path: str
    header: BundleHeader
    tensors: dict[str, TensorEntry]
    slice_entries: dict[bytes, TensorEntry]

    def slice_entry(self, tensor: TensorEntry, tensor_slice: TensorSlice) -> TensorEntry:
        return self.slice_entries[slice_key(encode_name(tensor.name), tensor_slice)]


def decode_name(key: bytes) -> str:
    """Table keys are bytes; names are UTF-8 in practice, and any other byte survives a round trip."""
    return key.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _parse_header(key: bytes, value: bytes, path: str) -> BundleHeader:
    if key != b"":
        raise FormatError(f"index has no bundle header (first key is {key!r}, expected ''): " + describe(path))
    proto = tensor_bundle_pb2.BundleHeaderProto()
    try:
        proto.ParseFromString(value)
    except DecodeError as exc:
        raise FormatError(f"bundle header is not parseable ({exc}): " + describe(path)) from None
    version = proto.version
    header = BundleHeader(
        num_shards=proto.num_shards,
        big_endian=proto.endianness == tensor_bundle_pb2.BundleHeaderProto.BIG,
        producer=version.producer,
        min_consumer=version.min_consumer,
        bad_consumers=tuple(version.bad_consumers),
    )
    if proto.endianness not in (0, 1):
        raise FormatError(f"bundle header has unknown endianness {proto.endianness}: " + describe(path))
    if header.num_shards < 1:
        raise FormatError(f"bundle header declares {header.num_shards} data shards (at least 1): " + describe(path))
    if header.producer < MIN_PRODUCER:
        raise UnsupportedError(
            f"checkpoint producer version {header.producer} is below the minimum {MIN_PRODUCER}: " + describe(path)
        )
    if header.min_consumer > CONSUMER_VERSION:
        raise UnsupportedError(
            f"checkpoint needs reader version {header.min_consumer}; gpuckpt reads version "
            f"{CONSUMER_VERSION}: " + describe(path)
        )
    if CONSUMER_VERSION in header.bad_consumers:
        raise UnsupportedError(
            f"checkpoint disallows reader version {CONSUMER_VERSION}: " + describe(path)
        )
    return header


def _parse_shape(serialized: bytes, name: str, path: str) -> tuple[int, ...]:
    """Decode and check one serialized TensorShapeProto (FORMAT.md 3.5)."""
    proto = tensor_shape_pb2.TensorShapeProto()
    try:
        proto.ParseFromString(serialized)
    except DecodeError as exc:
        raise FormatError(f"index entry has an unparseable shape ({exc}): " + describe(path, name)) from None
    if proto.unknown_rank:
        raise FormatError("index entry has a shape of unknown rank: " + describe(path, name))
    shape = tuple([d.size for d in proto.dim])
    if len(shape) > MAX_RANK:
        raise FormatError(f"index entry has rank {len(shape)}, more than {MAX_RANK}: " + describe(path, name))
    if any(d < 0 for d in shape):
        raise FormatError(f"index entry has a negative dimension in shape {list(shape)}: " + describe(path, name))
    if math.prod(shape) > _INT64_MAX:
        raise FormatError(f"index entry shape {list(shape)} has more than 2**63-1 elements: " + describe(path, name))
    return shape


class _EntryParser:
    """Parses and checks entries of one index, decoding each distinct serialized shape once."""

    def __init__(self, header: BundleHeader, path: str, shard_size: ShardSize) -> None:
        self.shard_size = shard_size
        self.sizes: dict[int, int] = {}
        self.num_shards = header.num_shards
        self.path = path
        self.shapes: dict[bytes, tuple[tuple[int, ...], int]] = {}  # serialized -> (shape, element count)

    def parse(self, key: bytes, value: bytes) -> TensorEntry:
        # The hot loop of opening a checkpoint: one call per entry, so lookups are cached per shape.
        path = self.path
        proto = tensor_bundle_pb2.BundleEntryProtoLazyShape()
        try:
            proto.ParseFromString(value)
        except DecodeError as exc:
            raise FormatError(f"index entry is not parseable ({exc}): " + describe(path, decode_name(key))) from None

        dtype = proto.dtype
        if dtype == 0 or dtype > 100:
            raise FormatError(
                f"index entry has invalid dtype {dtype_name(dtype)}: " + describe(path, decode_name(key))
            )
        shape_bytes = proto.shape
        known = self.shapes.get(shape_bytes)
        if known is None:
            shape = _parse_shape(shape_bytes, decode_name(key), path)
            known = self.shapes[shape_bytes] = (shape, math.prod(shape))
        shape, num_elements = known
        if proto.slices:
            return self._partitioned(decode_name(key), dtype, shape, proto)

        name = decode_name(key)
        shard_id, offset, size = proto.shard_id, proto.offset, proto.size
        if not 0 <= shard_id < self.num_shards:
            raise FormatError(
                f"index entry names data shard {shard_id}, outside [0, {self.num_shards}): " + describe(path, name)
            )
        if offset < 0 or size < 0:
            raise FormatError(
                f"index entry has a negative byte range (offset {offset}, size {size}): " + describe(path, name)
            )
        shard_bytes = self.sizes.get(shard_id)
        if shard_bytes is None:
            shard_bytes = self.sizes[shard_id] = self.shard_size(shard_id, self.num_shards)
        if offset + size > shard_bytes:
            raise FormatError(
                f"tensor bytes [{offset}, {offset + size}) run past the end of data shard {shard_id} "
                f"({shard_bytes} bytes): " + describe(path, name, offset)
            )
        info = DTYPES.get(dtype)
        if info is not None:
            if not info.is_string:
                if size != num_elements * info.itemsize:
                    raise FormatError(
                        f"index entry size {size} does not match shape {list(shape)} of {info.name} "
                        f"({num_elements * info.itemsize} bytes): " + describe(path, name, offset)
                    )
            elif size < num_elements:
                # Each string takes at least one length byte (FORMAT.md 4.3): this bounds what a read allocates.
                raise FormatError(
                    f"string tensor of {num_elements} elements cannot fit in {size} bytes: "
                    + describe(path, name, offset)
                )
        return TensorEntry(name, dtype, shape, shard_id, offset, size, proto.crc32c)

    def _partitioned(self, name: str, dtype: int, shape: tuple[int, ...], proto: object) -> TensorEntry:
        slices = tuple(
            tuple(Extent(e.start, e.length if e.WhichOneof("has_length") else None) for e in s.extent)
            for s in proto.slices  # type: ignore[attr-defined]
        )
        for tensor_slice in slices:
            problem = check_extents(tensor_slice, shape)
            if problem:
                raise FormatError(f"partitioned tensor has a bad slice: {problem}: " + describe(self.path, name))
        return TensorEntry(name, dtype, shape, 0, 0, 0, 0, slices)


def _check_partitioned(index: BundleIndex, partitioned: list[TensorEntry]) -> None:
    for entry in partitioned:
        for tensor_slice in entry.slices:
            key = slice_key(encode_name(entry.name), tensor_slice)
            part = index.slice_entries.get(key)
            if part is None:
                raise FormatError(
                    f"partitioned tensor is missing the data entry of slice "
                    f"{[(e.start, e.length) for e in tensor_slice]}: " + describe(index.path, entry.name)
                )
            if part.dtype != entry.dtype or part.shape != slice_shape(tensor_slice, entry.shape):
                raise FormatError(
                    f"slice entry has dtype {dtype_name(part.dtype)} and shape {list(part.shape)}, but the "
                    f"slice implies {dtype_name(entry.dtype)} {list(slice_shape(tensor_slice, entry.shape))}: "
                    + describe(index.path, entry.name)
                )


def parse_index(data: bytes, path: str, shard_size: ShardSize) -> BundleIndex:
    """Parse and validate the bytes of a whole ``.index`` file.

    ``shard_size(shard_id, num_shards)`` gives the size of a data shard (called once per shard an
    entry uses; it raises if the shard is missing), so every byte range is checked against its file.
    """
    with _gc_paused():
        return _parse_index(data, path, shard_size)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing allocates one tuple per entry and nothing cyclic: the cycle collector would only
    rescan them over and over (a fifth of the time of opening a 100,000-entry index)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_index(data: bytes, path: str, shard_size: ShardSize) -> BundleIndex:
    items = parse_table(data, path)
    if not items:
        raise FormatError("index is an empty table (no bundle header): " + describe(path))
    header = _parse_header(items[0][0], items[0][1], path)
    tensors: dict[str, TensorEntry] = {}
    slice_entries: dict[bytes, TensorEntry] = {}
    partitioned: list[TensorEntry] = []
    parse_entry = _EntryParser(header, path, shard_size).parse
    for i in range(1, len(items)):
        key, value = items[i]
        entry = parse_entry(key, value)
        if key[0] == 0:  # slice keys start with a NUL byte; no tensor name does (FORMAT.md 3.1)
            if entry.slices:
                raise FormatError("slice entry is itself partitioned: " + describe(path, entry.name))
            slice_entries[key] = entry
        else:
            tensors[entry.name] = entry
        if entry.slices:
            partitioned.append(entry)
    index = BundleIndex(path, header, tensors, slice_entries)
    _check_partitioned(index, partitioned)
    return index


def refused_reason(entry: TensorEntry) -> str | None:
    """Why this entry's data cannot be returned (None when it can)."""
    if entry.dtype in REFUSED:
        return REFUSED[entry.dtype]
    if entry.dtype not in DTYPES:
        return f"{dtype_name(entry.dtype)} is not a type this version of gpuckpt knows"
    return None
