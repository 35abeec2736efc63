"""Part arithmetic: objects are cut into aligned parts of a fixed size.

Alignment makes parts shareable: a read, a read-ahead, a prefetch and a
resumable download of the same object version all name the same parts.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import UsageError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

#: The seed's range for resumable downloads: 100 KB to 5 GB.
MIN_PART_SIZE = 100 * KIB
MAX_PART_SIZE = 5 * GIB
#: Chosen by measurement (README, "Part size").
DEFAULT_PART_SIZE = 8 * MIB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024 * GIB}


def parse_size(text: str | int) -> int:
    """'8M', '8MiB', '100K', '1.5G' or a plain byte count; units are binary."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class PartRecord(NamedTuple):
    """A finished part, wherever it landed (the part cache, a download's checkpoint)."""

    length: int
    crc: int  # CRC-64/XZ of its bytes
    atime: float = 0.0  # the cache's last access, as of its last flush
    hits: int = 0  # the cache's count of access windows in which it was read


def check_threads(threads: object, maximum: int | None = None) -> int:
    """A thread (parallel part) count: an int from 1 (to `maximum`); the error quotes it."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"bad thread count {threads!r}: must be at least 1")
    if maximum is not None and threads > maximum:
        raise UsageError(f"bad thread count {threads}: must be at most {maximum}")
    return threads


def check_part_size(part_size: int | str) -> int:
    """Parse and range-check a part size; the error quotes what the user typed."""
    value = parse_size(part_size)
    if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
        raise UsageError(
            f"bad part size {part_size!r} ({value} bytes): it must be between "
            f"100K ({MIN_PART_SIZE}) and 5G ({MAX_PART_SIZE})"
        )
    return value


def part_count(size: int, part_size: int) -> int:
    return -(-size // part_size)


def part_bounds(size: int, part_size: int, number: int) -> tuple[int, int]:
    """(start, length) of part `number`."""
    start = number * part_size
    if not 0 <= start < size:
        raise IndexError(f"part {number} is outside an object of {size} bytes")
    return start, min(part_size, size - start)


def parts_covering(offset: int, length: int, size: int, part_size: int) -> range:
    """Part numbers that hold bytes [offset, offset+length) clipped to the object."""
    end = min(offset + length, size)
    if offset >= end:
        return range(0)
    return range(offset // part_size, (end - 1) // part_size + 1)
