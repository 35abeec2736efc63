"""write_all: O_DIRECT for the aligned bulk, the page cache for the rest, and fallbacks."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ossfs_resume import durable
from ossfs_resume.durable import DIRECT_ALIGN, BufferPool, aligned_buffer, write_all


def _filled(length: int) -> memoryview:
    buf = aligned_buffer(length)
    view = memoryview(buf)
    view[:] = bytes((i * 7 + i // 251) % 256 for i in range(length))
    return view


def _direct_opens(monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> list[bool]:
    """Record whether each os.open asked for O_DIRECT; with `refuse`, answer EINVAL to it."""
    seen: list[bool] = []
    real_open = os.open

    def fake_open(path, flags, mode=0o777):  # type: ignore[no-untyped-def]
        seen.append(bool(flags & os.O_DIRECT))
        if refuse and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(path, flags, mode)

    monkeypatch.setattr(durable.os, "open", fake_open)
    return seen


@pytest.mark.parametrize("length", [DIRECT_ALIGN * 3, DIRECT_ALIGN * 3 + 17, 100, 1])
def test_aligned_buffers_are_written_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int
) -> None:
    data = _filled(length)
    opens = _direct_opens(monkeypatch)
    target = tmp_path / "part"
    assert write_all(target, data, direct=True)
    assert target.read_bytes() == bytes(data)
    # O_DIRECT only when there is an aligned bulk to write.
    assert opens == [length >= DIRECT_ALIGN]


def test_unaligned_or_readonly_buffers_use_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = _direct_opens(monkeypatch)
    payload = bytes(range(256)) * 64
    for i, data in enumerate([memoryview(payload), memoryview(_filled(len(payload) + 1))[1:]]):
        target = tmp_path / f"part{i}"
        assert write_all(target, data, direct=True)
        assert target.read_bytes() == bytes(data)
    assert opens == [False, False]


def test_a_file_system_without_o_direct_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _filled(DIRECT_ALIGN * 2 + 5)
    opens = _direct_opens(monkeypatch, refuse=True)
    target = tmp_path / "part"
    assert not write_all(target, data, direct=True)  # tells the caller to stop trying
    assert target.read_bytes() == bytes(data)
    assert opens == [True, False]


def test_o_direct_refused_at_write_time_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _filled(DIRECT_ALIGN * 2 + 5)
    real_write = os.write
    calls: list[int] = []

    def fake_write(fd: int, buf: memoryview) -> int:
        calls.append(len(buf))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "not for this write")
        return real_write(fd, buf)

    monkeypatch.setattr(durable.os, "write", fake_write)
    target = tmp_path / "part"
    assert not write_all(target, data, direct=True)
    assert target.read_bytes() == bytes(data)


def test_other_write_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, buf: memoryview) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable.os, "write", full)
    with pytest.raises(OSError) as info:
        write_all(tmp_path / "part", _filled(DIRECT_ALIGN), direct=True)
    assert info.value.errno == errno.ENOSPC


def test_a_pooled_buffer_is_reused_only_when_nothing_refers_to_it() -> None:
    pool = BufferPool(3 * 4096, min_size=4096)
    first = pool.take(4096)
    first[:5] = b"first"
    view = memoryview(first)[100:200]  # a reader's slice: keeps the buffer busy
    del first
    second = pool.take(4096)
    assert second[:5] != b"first"  # not the busy one
    del view
    third = pool.take(4096)
    assert third[:5] == b"first"  # free again: reused, not zeroed
    held_by_tier = third  # any plain reference (a shared-tier put) keeps it busy too
    del third
    assert pool.take(4096)[:5] != b"first"
    del held_by_tier


def test_the_pool_keeps_at_most_its_capacity() -> None:
    pool = BufferPool(2 * 4096, min_size=4096)
    held = [pool.take(4096) for _ in range(5)]  # 2 pooled, 3 fresh
    assert len(pool._buffers) == 2
    del held
    assert len({id(pool.take(4096)) for _ in range(3)}) == 1  # one free buffer, again and again
    big = pool.take(8192)  # another size: the free 4 KiB buffers make room for it
    assert len(big) == 8192 and [len(b) for b in pool._buffers] == [8192]
    del big
    assert [len(b) for b in pool._buffers] == [8192]


def test_small_buffers_are_not_pooled() -> None:
    pool = BufferPool(1 << 30)
    assert len(pool.take(5000)) == 5000 and len(pool.take(1 << 20)) == 1 << 20
    assert [len(b) for b in pool._buffers] == [1 << 20]
