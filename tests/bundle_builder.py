"""A small TensorBundle writer for tests: builds well-formed bundles (little- or big-endian) whose
entries tests can then damage. It follows FORMAT.md 2.8, 3 and 4; TF reads its output (tested)."""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from gpuckpt._proto import tensor_bundle_pb2
from gpuckpt.dtypes import DTYPES
from gpuckpt.format.crc import crc32c, mask
from gpuckpt.format.table import build_table
from gpuckpt.format.varint import encode_varint

_BY_NUMPY = {info.numpy: value for value, info in DTYPES.items() if info.numpy is not None}
# Several TF types share a numpy dtype; prefer the plain ones.
for _value in (3, 4, 5, 6, 17, 1, 2, 9, 10):
    _BY_NUMPY[DTYPES[_value].numpy] = _value


def string_payload(values: list[bytes], big_endian: bool = False) -> tuple[bytes, int]:
    """The DT_STRING layout of FORMAT.md 4.3 and its entry crc32c (unmasked)."""
    order = ">" if big_endian else "<"
    lengths = b"".join(encode_varint(len(v)) for v in values)
    crc = 0
    for v in values:
        crc = crc32c(struct.pack(order + ("I" if len(v) <= 0xFFFFFFFF else "Q"), len(v)), crc)
    len_crc = struct.pack(order + "I", mask(crc))
    crc = crc32c(len_crc, crc)
    body = b"".join(values)
    crc = crc32c(body, crc)
    return lengths + len_crc + body, crc


@dataclasses.dataclass
class Bundle:
    """Entries (as protos, editable) plus the data bytes of each shard."""

    header: tensor_bundle_pb2.BundleHeaderProto
    entries: dict[bytes, tensor_bundle_pb2.BundleEntryProto]
    shards: list[bytearray]

    def write(self, prefix: str, index_bytes: bytes | None = None) -> str:
        os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
        n = self.header.num_shards
        for i, data in enumerate(self.shards):
            with open(f"{prefix}.data-{i:05d}-of-{n:05d}", "wb") as f:
                f.write(data)
        with open(prefix + ".index", "wb") as f:
            f.write(index_bytes if index_bytes is not None else self.index_bytes())
        return prefix

    def index_bytes(self) -> bytes:
        items = [(b"", self.header.SerializeToString())]
        items += [(k, self.entries[k].SerializeToString()) for k in sorted(self.entries)]
        return build_table(items)


def make_bundle(
    tensors: dict[str, object], big_endian: bool = False, num_shards: int = 1, dtypes: dict[str, int] | None = None
) -> Bundle:
    """A bundle holding ``tensors`` (numpy arrays, or lists/arrays of bytes for strings), assigned to
    shards round-robin in name order. ``dtypes`` overrides the TF dtype of a name."""
    header = tensor_bundle_pb2.BundleHeaderProto(num_shards=num_shards)
    header.version.producer = 1
    if big_endian:
        header.endianness = tensor_bundle_pb2.BundleHeaderProto.BIG
    shards = [bytearray() for _ in range(num_shards)]
    entries = {}
    for i, (name, value) in enumerate(sorted(tensors.items())):
        entry = tensor_bundle_pb2.BundleEntryProto()
        shard = i % num_shards
        array = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else np.asarray(value, dtype=object)
        if array.dtype == object:
            entry.dtype = 7
            payload, crc = string_payload([bytes(v) for v in array.reshape(-1)], big_endian)
        else:
            entry.dtype = (dtypes or {}).get(name, _BY_NUMPY[array.dtype])
            stored = array.astype(array.dtype.newbyteorder(">")) if big_endian and array.dtype.itemsize > 1 else array
            if big_endian and array.dtype.kind == "V":  # ml_dtypes 2-byte floats: swap the raw bits
                stored = array.view(f"u{array.dtype.itemsize}").byteswap()
            payload = np.ascontiguousarray(stored).tobytes()
            crc = crc32c(payload)
        for d in array.shape:
            entry.shape.dim.add().size = d
        entry.shape.SetInParent()
        entry.shard_id = shard
        entry.offset = len(shards[shard])
        entry.size = len(payload)
        entry.crc32c = mask(crc)
        shards[shard] += payload
        entries[name.encode()] = entry
    return Bundle(header, entries, shards)
