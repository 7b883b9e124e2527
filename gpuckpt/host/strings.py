"""DT_STRING payloads (FORMAT.md 4.3): n varint lengths, a masked CRC of the lengths, the bytes.

Returned as a numpy object array of ``bytes``, exactly what TensorFlow's reader returns.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

from ..errors import ChecksumError, FormatError, describe
from ..format.crc import crc32c, mask, unmask
from ..format.varint import VarintError, decode_varint, encode_varint

_U32LE = struct.Struct("<I")
_U64LE = struct.Struct("<Q")


def decode_strings(
    raw: bytes | bytearray | memoryview,
    count: int,
    shape: tuple[int, ...],
    big_endian: bool,
    masked_crc: int,
    verify: bool,
    where: tuple[str, str, int],
) -> np.ndarray:
    """Decode one string tensor's payload ``raw`` (exactly its ``size`` bytes) into an object array.

    ``where`` is (file, tensor, offset) for messages. The caller has checked ``len(raw) >= count``,
    so the output array is bounded by the bytes on disk.
    """
    path, tensor, offset = where
    raw = bytes(raw)
    size = len(raw)
    order = ">" if big_endian else "<"
    u32 = struct.Struct(order + "I")
    u64 = struct.Struct(order + "Q")
    if size == 0 and count == 0:
        # TF's writer never emits this, but its reader accepts it when the CRC is that of nothing.
        if verify and unmask(masked_crc) != 0:
            raise ChecksumError("checksum does not match for an empty string tensor: " + describe(path, tensor, offset))
        return np.empty(shape, dtype=object)

    lengths = []
    crc = 0
    pos = 0
    try:
        for _ in range(count):
            length, pos = decode_varint(raw, pos, size)
            if length > size:  # also keeps every length below 2**64
                raise FormatError(
                    f"string length {length} exceeds the tensor's {size} bytes: " + describe(path, tensor, offset + pos)
                )
            lengths.append(length)
            if verify:
                crc = crc32c(u32.pack(length) if length <= 0xFFFFFFFF else u64.pack(length), crc)
    except VarintError as exc:
        raise FormatError(f"string lengths are corrupt ({exc}): " + describe(path, tensor, offset + pos)) from None
    if pos + 4 > size:
        raise FormatError("string lengths run past the tensor's size: " + describe(path, tensor, offset + pos))
    if verify:
        (stored_len_crc,) = u32.unpack_from(raw, pos)
        if unmask(stored_len_crc) != crc:
            raise ChecksumError("the string length checksum does not match: " + describe(path, tensor, offset + pos))
        crc = crc32c(raw[pos : pos + 4], crc)
    pos += 4
    if pos + sum(lengths) != size:
        raise FormatError(
            f"string lengths add up to {pos + sum(lengths)} bytes but the tensor has {size}: "
            + describe(path, tensor, offset)
        )
    if verify:
        crc = crc32c(raw[pos:], crc)
        if unmask(masked_crc) != crc:
            raise ChecksumError(
                f"checksum does not match (stored {unmask(masked_crc):#010x}, computed {crc:#010x}): "
                + describe(path, tensor, offset)
            )
    out = np.empty(shape, dtype=object)
    flat = out.reshape(-1)  # a view: filling it fills ``out``, which owns its memory
    for i, length in enumerate(lengths):
        flat[i] = raw[pos : pos + length]
        pos += length
    return out


def encode_strings(values: Iterable[bytes]) -> tuple[bytes, int]:
    """The little-endian DT_STRING payload of ``values`` and its crc32c (unmasked), as TF writes it."""
    values = list(values)
    lengths = b"".join(encode_varint(len(v)) for v in values)
    crc = 0
    for v in values:
        crc = crc32c(_U32LE.pack(len(v)) if len(v) <= 0xFFFFFFFF else _U64LE.pack(len(v)), crc)
    length_crc = _U32LE.pack(mask(crc))
    crc = crc32c(length_crc, crc)
    body = b"".join(values)
    crc = crc32c(body, crc)
    return lengths + length_crc + body, crc
