"""DT_VARIANT payloads (gpuckpt/host/variants.py) against an encoder written here from FORMAT.md
4.4, in both byte orders, and every way the bytes can lie. (TensorFlow-written variants:
tests/test_tf_compat.py.)"""

from __future__ import annotations

import struct

import pytest

from gpuckpt.errors import ChecksumError, FormatError
from gpuckpt.format.crc import crc32c, mask
from gpuckpt.format.varint import encode_varint
from gpuckpt.host.variants import check_variants

WHERE = ("ckpt.data-00000-of-00001", "it", 100)


def encode(protos: list[bytes], big_endian: bool = False) -> tuple[bytes, int]:
    """FORMAT.md 4.4: per element a varint length, the bytes, the masked running crc; the running
    crc takes the length as 8 bytes, the bytes, then the 4 stored bytes. Returns (payload, masked crc)."""
    order = ">" if big_endian else "<"
    out, crc = bytearray(), 0
    for proto in protos:
        crc = crc32c(proto, crc32c(struct.pack(order + "Q", len(proto)), crc))
        stored = struct.pack(order + "I", mask(crc))
        out += encode_varint(len(proto)) + proto + stored
        crc = crc32c(stored, crc)
    return bytes(out), mask(crc)


PROTOS = [b"", b"\x0a\x03abc", bytes(range(256)) * 2]


@pytest.mark.parametrize("big_endian", [False, True])
def test_well_formed_payloads_pass_in_either_byte_order(big_endian):
    payload, crc = encode(PROTOS, big_endian)
    check_variants(payload, len(PROTOS), big_endian, crc, WHERE)
    check_variants(b"", 0, big_endian, mask(0), WHERE)
    with pytest.raises(ChecksumError, match="variant element 0"):  # the other order's running crc
        check_variants(payload, len(PROTOS), not big_endian, crc, WHERE)


def test_a_flipped_byte_in_an_element_names_that_element():
    payload, crc = encode(PROTOS)
    damaged = bytearray(payload)
    damaged[len(payload) - 20] ^= 1  # inside the last proto
    with pytest.raises(ChecksumError, match=r"variant element 2: .*tensor 'it'"):
        check_variants(damaged, len(PROTOS), False, crc, WHERE)


def test_the_entry_crc_is_checked_too():
    payload, crc = encode(PROTOS)
    with pytest.raises(ChecksumError, match="checksum does not match"):
        check_variants(payload, len(PROTOS), False, crc ^ 1, WHERE)


@pytest.mark.parametrize(
    "payload_of, count, match",
    [
        (lambda p: p[:-1], 3, "runs past"),  # cut short: the last checksum does not fit
        (lambda p: p + b"\x00", 3, "end after"),  # a byte left over
        (lambda p: p, 2, "end after"),  # fewer elements than the shape says
        (lambda p: p, 4, "length is corrupt"),  # more elements than there are bytes
        (lambda p: b"\xff" * 11, 1, "length is corrupt"),  # a varint that never ends
        (lambda p: encode_varint(1 << 62) + b"\x00" * 8, 1, "runs past"),  # a huge length
    ],
)
def test_lying_lengths_and_counts_are_format_errors(payload_of, count, match):
    payload, crc = encode(PROTOS)
    with pytest.raises(FormatError, match=match):
        check_variants(payload_of(payload), count, False, crc, WHERE)
