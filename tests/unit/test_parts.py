"""Part arithmetic: sizes from the command line and which parts hold which bytes."""

from __future__ import annotations

import random

import pytest

from ossfs_resume.errors import UsageError
from ossfs_resume.parts import (
    GIB,
    KIB,
    MAX_PART_SIZE,
    MIB,
    MIN_PART_SIZE,
    check_part_size,
    parse_size,
    part_bounds,
    part_count,
    parts_covering,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8M", 8 * MIB),
        ("8MiB", 8 * MIB),
        ("8mib", 8 * MIB),
        ("8MB", 8 * MIB),
        ("8m", 8 * MIB),
        ("100K", 100 * KIB),
        ("100k", 100 * KIB),
        ("1.5G", 3 * GIB // 2),
        ("2T", 2 * 1024 * GIB),
        ("0.5M", 512 * KIB),
        ("4096", 4096),
        (" 16 M ", 16 * MIB),
        ("0", 0),
        (12345, 12345),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "M",
        "abc",
        "8X",
        "8 MB B",
        "-1",
        "-8M",
        "1.5.5G",
        "1e6",
        "8MM",
        "inf",
        "nan",
        "8,5M",
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_check_part_size_bounds() -> None:
    assert check_part_size("100K") == MIN_PART_SIZE == 100 * KIB
    assert check_part_size(MIN_PART_SIZE) == MIN_PART_SIZE
    assert check_part_size("5G") == MAX_PART_SIZE == 5 * GIB
    assert check_part_size(MAX_PART_SIZE) == MAX_PART_SIZE
    assert check_part_size("8MiB") == 8 * MIB


@pytest.mark.parametrize(
    "text", ["99K", "0", str(MIN_PART_SIZE - 1), "5.001G", str(MAX_PART_SIZE + 1), "6G", "1T"]
)
def test_check_part_size_out_of_range_quotes_input(text: str) -> None:
    with pytest.raises(UsageError) as info:
        check_part_size(text)
    message = str(info.value)
    assert repr(text) in message
    assert "100K" in message and "5G" in message


def test_check_part_size_int_out_of_range() -> None:
    with pytest.raises(UsageError, match="between"):
        check_part_size(MIN_PART_SIZE - 1)
    with pytest.raises(UsageError, match="between"):
        check_part_size(MAX_PART_SIZE + 1)


def test_check_part_size_bad_text_is_usage_error() -> None:
    with pytest.raises(UsageError, match="'eight'"):
        check_part_size("eight")


@pytest.mark.parametrize(
    ("size", "part_size", "expected"),
    [(0, 10, 0), (1, 10, 1), (9, 10, 1), (10, 10, 1), (11, 10, 2), (20, 10, 2), (21, 10, 3)],
)
def test_part_count(size: int, part_size: int, expected: int) -> None:
    assert part_count(size, part_size) == expected


def test_part_bounds() -> None:
    assert part_bounds(25, 10, 0) == (0, 10)
    assert part_bounds(25, 10, 1) == (10, 10)
    assert part_bounds(25, 10, 2) == (20, 5)  # short last part
    assert part_bounds(20, 10, 1) == (10, 10)  # size a multiple of the part size
    with pytest.raises(IndexError):
        part_bounds(20, 10, 2)
    with pytest.raises(IndexError):
        part_bounds(25, 10, 3)
    with pytest.raises(IndexError):
        part_bounds(0, 10, 0)  # a 0-byte object has no parts
    with pytest.raises(IndexError):
        part_bounds(25, 10, -1)


def test_part_bounds_tile_the_object() -> None:
    for size in (1, 9, 10, 11, 99, 100, 101, 1000):
        for part_size in (1, 3, 10, 100):
            bounds = [part_bounds(size, part_size, n) for n in range(part_count(size, part_size))]
            position = 0
            for start, length in bounds:
                assert start == position
                assert 0 < length <= part_size
                position += length
            assert position == size


@pytest.mark.parametrize(
    ("offset", "length", "size", "part_size", "expected"),
    [
        (0, 10, 0, 10, []),  # 0-byte object
        (0, 0, 100, 10, []),  # empty read
        (100, 10, 100, 10, []),  # read exactly at the end
        (150, 10, 100, 10, []),  # read past the end
        (0, 10, 100, 10, [0]),  # exactly one part
        (10, 10, 100, 10, [1]),  # starts on a boundary
        (9, 2, 100, 10, [0, 1]),  # straddles a boundary
        (0, 11, 100, 10, [0, 1]),
        (0, 100, 100, 10, list(range(10))),  # whole object
        (95, 100, 100, 10, [9]),  # clipped at the end
        (99, 1, 100, 10, [9]),  # last byte
        (90, 10, 95, 10, [9]),  # short last part
        (19, 1, 100, 10, [1]),
        (20, 1, 100, 10, [2]),
    ],
)
def test_parts_covering_edges(
    offset: int, length: int, size: int, part_size: int, expected: list[int]
) -> None:
    assert list(parts_covering(offset, length, size, part_size)) == expected


def _brute_force(offset: int, length: int, size: int, part_size: int) -> list[int]:
    wanted = set(range(offset, min(offset + length, size)))
    return sorted({byte // part_size for byte in wanted})


def test_parts_covering_matches_brute_force() -> None:
    rng = random.Random(20240501)
    for _ in range(3000):
        part_size = rng.choice([1, 2, 3, 7, 10, 16, 64])
        size = rng.randrange(0, 400)
        offset = rng.randrange(0, 450)
        length = rng.randrange(0, 200)
        got = parts_covering(offset, length, size, part_size)
        assert list(got) == _brute_force(offset, length, size, part_size), (
            offset,
            length,
            size,
            part_size,
        )
        # Every part it names exists.
        for number in got:
            start, part_len = part_bounds(size, part_size, number)
            assert start < min(offset + length, size)
            assert start + part_len > offset
