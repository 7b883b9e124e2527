"""Protobuf-style base-128 varints (FORMAT.md 0.1), decoded with bounds checks."""

from __future__ import annotations


class VarintError(ValueError):
    """A varint ran past its limit or past ``max_bytes``; callers turn this into a FormatError."""


def decode_varint(buf: bytes, pos: int, limit: int, max_bytes: int = 10) -> tuple[int, int]:
    """Decode one varint from ``buf[pos:limit]``; return ``(value, new_pos)``."""
    result = 0
    shift = 0
    end = min(limit, pos + max_bytes)
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise VarintError("varint runs past its end" if pos >= limit else "varint too long")


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as a varint."""
    if value < 0:
        raise ValueError("varints encode non-negative integers only")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
