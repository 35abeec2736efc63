"""CRC-64/XZ, the checksum OSS reports as ``x-oss-hash-crc64ecma``.

Every cached part and every checkpointed part carries one, so per-part values
combine into the whole-object CRC that OSS reports, without re-reading data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import anycrc

_CRC64_XZ = anycrc.Model("CRC64-XZ")

Buffer = bytes | bytearray | memoryview


def crc64(data: Buffer, crc: int = 0) -> int:
    """CRC-64/XZ of `data`, continuing from `crc` (0 for a fresh start)."""
    return _CRC64_XZ.calc(data, crc) if crc else _CRC64_XZ.calc(data)


def crc64_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC of A+B from crc(A), crc(B) and len(B)."""
    if len2 == 0:
        return crc1
    return _CRC64_XZ.combine(crc1, crc2, len2)


def crc64_of_parts(parts: Iterable[tuple[int, int]]) -> int:
    """Whole-object CRC from (crc, length) pairs in order."""
    total = 0
    for crc, length in parts:
        total = crc64_combine(total, crc, length)
    return total


def crc64_file_range(fd: int, start: int, length: int, buf: memoryview) -> int | None:
    """CRC-64/XZ of `length` bytes of file `fd` from `start`, read into `buf` a slice at a
    time (bounded memory, no allocation per slice); None if the file ends before that."""
    crc = done = 0
    while done < length:
        view = buf[: min(len(buf), length - done)]
        got = os.preadv(fd, [view], start + done)
        if not got:
            return None
        crc = crc64(view[:got], crc)
        done += got
    return crc
