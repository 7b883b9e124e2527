"""Slice keys (TF's OrderedCode) and coverage of partitioned tensors (FORMAT.md 5)."""

from __future__ import annotations

import pytest

from gpuckpt.format.slices import Extent, _signed_num_increasing, coverage_problem, slice_key

FULL = Extent(0, None)


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "80"),
        (1, "81"),
        (5, "85"),
        (63, "bf"),
        (-1, "7f"),
        (-64, "40"),
        (64, "c040"),
        (8191, "dfff"),
        (8192, "e02000"),
        (-65, "3fbf"),
        (-8193, "1fdfff"),
        (0x424242, "f0424242"),
        (-0x800, "3800"),
        (2**63 - 1, "ffc07fffffffffffffff"),
        (-(2**63), "003f8000000000000000"),
    ],
)
def test_signed_num_increasing(value, encoded):
    assert _signed_num_increasing(value).hex() == encoded


def test_slice_keys_match_tensorflow_examples():
    assert slice_key(b"sl", (Extent(0, 2), FULL)).hex() == "00736c000101028082807f"
    assert slice_key(b"sl2", (FULL, Extent(1, 3))).hex() == "00736c3200010102807f8183"
    assert slice_key(b"pv", (Extent(7, 3), Extent(0, 3))).hex() == "0070760001010287838083"
    assert slice_key(b"w", (FULL, FULL)).hex() == "007700010102807f807f"
    assert slice_key(b"a\x00b\xff", (FULL,)).hex() == "006100ff62ff0000010101807f"


def test_coverage():
    shape = (4, 6)
    rows = (Extent(0, 2), FULL), (Extent(2, 2), FULL)
    assert coverage_problem(rows, shape) is None
    assert "cover" in coverage_problem(rows[:1], shape)
    assert "overlap" in coverage_problem((rows[0], (Extent(1, 3), FULL)), shape)
    many = tuple((Extent(i, 1),) for i in range(100))
    assert coverage_problem(many, (100,)) is None
    assert coverage_problem(many[:-1] + ((Extent(0, 1),),), (100,)) is not None
