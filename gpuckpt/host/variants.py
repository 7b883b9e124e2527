"""DT_VARIANT payloads (FORMAT.md 4.4): checked, never decoded.

Each element is a varint length ``L``, ``L`` bytes of a serialized ``VariantTensorDataProto``, and
the masked running crc32c so far. Only TensorFlow's C++ variant types can make sense of the
protos, so gpuckpt returns no array for them; but their bytes can be checked, which is what
``gpuckpt verify`` and a raw copy (``merge``) need.
"""

from __future__ import annotations

import struct

from ..errors import ChecksumError, FormatError, describe
from ..format.crc import crc32c, mask, unmask
from ..format.varint import VarintError, decode_varint


def check_variants(
    raw: bytes | bytearray | memoryview,
    count: int,
    big_endian: bool,
    masked_crc: int,
    where: tuple[str, str, int],
) -> None:
    """Raise unless ``raw`` (exactly the entry's ``size`` bytes) is ``count`` well-formed variant
    elements whose running and final checksums match. The running crc32c extends over each
    length as an 8-byte integer in the producer's byte order, then its proto bytes; the 4 stored
    bytes (the masked crc so far, in that order) are checked, then extend it too."""
    path, tensor, offset = where
    raw = bytes(raw)
    size = len(raw)
    u64 = struct.Struct(">Q" if big_endian else "<Q")
    u32 = struct.Struct(">I" if big_endian else "<I")
    crc = 0
    pos = 0
    for element in range(count):
        try:
            length, pos = decode_varint(raw, pos, size)
        except VarintError as exc:
            raise FormatError(
                f"variant element {element}: its length is corrupt ({exc}): " + describe(path, tensor, offset + pos)
            ) from None
        if length > size - pos - 4:  # the proto and its 4 checksum bytes must fit
            raise FormatError(
                f"variant element {element}: length {length} runs past the tensor's {size} bytes: "
                + describe(path, tensor, offset + pos)
            )
        crc = crc32c(raw[pos : pos + length], crc32c(u64.pack(length), crc))
        pos += length
        (stored,) = u32.unpack_from(raw, pos)
        if stored != mask(crc):
            raise ChecksumError(
                f"variant element {element}: checksum does not match (stored {unmask(stored):#010x}, "
                f"computed {crc:#010x}): " + describe(path, tensor, offset + pos)
            )
        crc = crc32c(raw[pos : pos + 4], crc)
        pos += 4
    if pos != size:
        raise FormatError(
            f"{count} variant elements end after {pos} bytes but the tensor has {size}: "
            + describe(path, tensor, offset)
        )
    if unmask(masked_crc) != crc:
        raise ChecksumError(
            f"checksum does not match (stored {unmask(masked_crc):#010x}, computed {crc:#010x}): "
            + describe(path, tensor, offset)
        )
