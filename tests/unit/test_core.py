"""BucketFS, the FUSE-free core: stat, readdir, open and read over a fake store."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ossfs_resume.cache import PartCache, object_id
from ossfs_resume.core import BucketFS, FsError, MountOptions
from ossfs_resume.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    StoreUnavailableError,
)
from ossfs_resume.objectstore import FaultyStore, MemoryStore

PART = 1000
MTIME = 1_700_000_123.5
BUCKET = "bkt"


# Fails a test that hangs (a deadlock) instead of stalling the run: see conftest.py.
pytestmark = pytest.mark.usefixtures("watchdog")


def _payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 11 + seed + (i >> 9)) % 256 for i in range(size))


Store = FaultyStore[MemoryStore]


def make_store(objects: dict[str, bytes]) -> Store:
    """The objects in a MemoryStore, behind a FaultyStore to fail its requests."""
    memory = MemoryStore(BUCKET, endpoint="http://fake")
    for key, data in objects.items():
        memory.put(key, data, mtime=MTIME)
    return FaultyStore(memory)


OBJECTS = {
    "readme.txt": b"hello, bucket\n",
    "data/big.bin": _payload(5 * PART + 17),
    "data/nested/deep.bin": _payload(2 * PART, seed=3),
    "data/empty": b"",
    "marker/": b"",
}


@pytest.fixture
def client() -> Store:
    return make_store(OBJECTS)


@pytest.fixture
def make_fs(client: Store, tmp_path: Path) -> Iterator[Callable[..., BucketFS]]:
    made: list[BucketFS] = []

    def make(**options: object) -> BucketFS:
        defaults: dict[str, object] = {
            "part_size": PART,
            "uid": 1234,
            "gid": 5678,
            "max_readahead_parts": 4,
        }
        defaults.update(options)
        cache = PartCache(tmp_path / f"cache{len(made)}")
        fs = BucketFS(client, cache, MountOptions(**defaults))  # type: ignore[arg-type]
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


@pytest.fixture
def fs(make_fs: Callable[..., BucketFS]) -> BucketFS:
    return make_fs()


def _errno(exc_info: pytest.ExceptionInfo[FsError]) -> int:
    return exc_info.value.errno


# -- metadata ----------------------------------------------------------------


def test_getattr_root_and_dirs(fs: BucketFS) -> None:
    for path in ("/", "", "/data", "/data/nested", "/marker"):
        st = fs.getattr(path)
        assert st["st_mode"] == stat.S_IFDIR | 0o555, path
        assert stat.S_ISDIR(int(st["st_mode"]))
        assert st["st_size"] == 0
        assert st["st_nlink"] == 2
        assert st["st_uid"] == 1234 and st["st_gid"] == 5678


def test_getattr_files(fs: BucketFS) -> None:
    st = fs.getattr("/data/big.bin")
    assert st["st_mode"] == stat.S_IFREG | 0o444
    assert stat.S_IMODE(int(st["st_mode"])) == 0o444
    assert st["st_size"] == 5 * PART + 17
    assert st["st_nlink"] == 1
    assert st["st_uid"] == 1234 and st["st_gid"] == 5678
    assert st["st_mtime"] == int(MTIME * 1e9)  # nanoseconds (the adapter uses use_ns)
    assert st["st_blocks"] == (5 * PART + 17 + 511) // 512
    assert fs.getattr("/readme.txt")["st_size"] == len(OBJECTS["readme.txt"])
    assert fs.getattr("/data/empty")["st_size"] == 0


def test_getattr_custom_modes(make_fs: Callable[..., BucketFS]) -> None:
    fs = make_fs(file_mode=0o400, dir_mode=0o500, uid=0, gid=0)
    assert fs.getattr("/readme.txt")["st_mode"] == stat.S_IFREG | 0o400
    assert fs.getattr("/data")["st_mode"] == stat.S_IFDIR | 0o500
    assert fs.getattr("/data")["st_uid"] == 0


def test_default_owner_is_current_user(make_fs: Callable[..., BucketFS]) -> None:
    fs = make_fs(uid=os.getuid(), gid=os.getgid())
    st = fs.getattr("/readme.txt")
    assert st["st_uid"] == os.getuid() and st["st_gid"] == os.getgid()
    assert MountOptions().uid == os.getuid()


@pytest.mark.parametrize("path", ["/nope", "/data/nope", "/readme.txt/x", "/nope/deeper"])
def test_getattr_missing_is_enoent(fs: BucketFS, path: str) -> None:
    with pytest.raises(FsError) as info:
        fs.getattr(path)
    assert _errno(info) == errno.ENOENT


def test_readdir(fs: BucketFS) -> None:
    assert sorted(fs.readdir("/")) == sorted([".", "..", "readme.txt", "data", "marker"])
    assert fs.readdir("/")[:2] == [".", ".."]
    assert sorted(fs.readdir("/data")) == sorted([".", "..", "big.bin", "nested", "empty"])
    assert fs.readdir("/marker") == [".", ".."]


def test_readdir_errors(fs: BucketFS) -> None:
    with pytest.raises(FsError) as info:
        fs.readdir("/readme.txt")
    assert _errno(info) == errno.ENOTDIR
    with pytest.raises(FsError) as info:
        fs.readdir("/nope")
    assert _errno(info) == errno.ENOENT


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (AccessDeniedError("denied", status=403), errno.EACCES),
        (NoSuchBucketError("no bucket", status=404), errno.ENOENT),
        (StoreUnavailableError("down", status=503), errno.EIO),
    ],
)
def test_listing_errors_map_to_errno(
    fs: BucketFS, client: Store, error: Exception, code: int
) -> None:
    client.fail("list_page", error)
    with pytest.raises(FsError) as info:
        fs.getattr("/readme.txt")
    assert _errno(info) == code
    with pytest.raises(FsError) as info:
        fs.readdir("/")
    assert _errno(info) == code


def test_prefix_mount(make_fs: Callable[..., BucketFS], client: Store) -> None:
    fs = make_fs(prefix="data")
    assert sorted(fs.readdir("/")) == sorted([".", "..", "big.bin", "nested", "empty"])
    assert fs.getattr("/nested/deep.bin")["st_size"] == 2 * PART
    fh = fs.open("/nested/deep.bin", os.O_RDONLY)
    assert fs.read(fh, 4 * PART, 0) == OBJECTS["data/nested/deep.bin"]
    assert {call.key for call in client.calls_to("get_range")} == {"data/nested/deep.bin"}


def test_statfs(fs: BucketFS) -> None:
    st = fs.statfs()
    assert st["f_namemax"] == 255
    assert st["f_bsize"] > 0


# -- open / read / release -------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY,
        os.O_RDWR,
        os.O_RDONLY | os.O_TRUNC,
        os.O_RDONLY | os.O_APPEND,
        os.O_WRONLY | os.O_CREAT,
    ],
)
def test_open_for_writing_is_erofs(fs: BucketFS, client: Store, flags: int) -> None:
    with pytest.raises(FsError) as info:
        fs.open("/readme.txt", flags)
    assert _errno(info) == errno.EROFS
    assert isinstance(info.value, OSError)
    assert client.count("get_range") == 0


def test_open_errors(fs: BucketFS) -> None:
    with pytest.raises(FsError) as info:
        fs.open("/nope", os.O_RDONLY)
    assert _errno(info) == errno.ENOENT
    with pytest.raises(FsError) as info:
        fs.open("/data", os.O_RDONLY)
    assert _errno(info) == errno.EISDIR


def test_read_whole_file_and_across_boundaries(fs: BucketFS, client: Store) -> None:
    data = OBJECTS["data/big.bin"]
    fh = fs.open("/data/big.bin", os.O_RDONLY)
    assert fs.read(fh, PART + 20, PART - 10) == data[PART - 10 : 2 * PART + 10]
    assert fs.read(fh, 10 * PART, 0) == data
    assert fs.read(fh, 100, 5 * PART + 10) == data[5 * PART + 10 :]
    assert fs.read(fh, 100, len(data)) == b""
    assert fs.read(fh, 100, len(data) + 1000) == b""
    fs.release(fh)
    # Every request pinned to the listed ETag. The first read, at an offset, is not
    # (yet) a stream: it fetched just its bytes, per part. Then each part once.
    assert {call.if_match for call in client.calls_to("get_range")} == {
        client.inner.meta("data/big.bin").etag
    }
    ranges = client.ranges()
    assert ranges[:3] == [(PART - 10, PART - 1), (PART, 2 * PART - 1), (2 * PART, 2 * PART + 9)]
    assert sorted(r[0] for r in ranges[3:]) == [n * PART for n in range(6)]


def test_read_in_small_sequential_chunks(fs: BucketFS) -> None:
    data = OBJECTS["data/big.bin"]
    fh = fs.open("/data/big.bin", os.O_RDONLY)
    out = bytearray()
    while chunk := fs.read(fh, 333, len(out)):
        out += chunk
    assert bytes(out) == data
    fs.release(fh)


def test_read_empty_file(fs: BucketFS, client: Store) -> None:
    fh = fs.open("/data/empty", os.O_RDONLY)
    assert fs.read(fh, 4096, 0) == b""
    assert client.count("get_range") == 0


def test_second_open_reads_from_cache(fs: BucketFS, client: Store) -> None:
    data = OBJECTS["data/nested/deep.bin"]
    fh = fs.open("/data/nested/deep.bin", os.O_RDONLY)
    assert fs.read(fh, 2 * PART, 0) == data
    fs.release(fh)
    calls = client.count("get_range")
    fh2 = fs.open("/data/nested/deep.bin", os.O_RDONLY)
    assert fh2 != fh
    assert fs.read(fh2, 2 * PART, 0) == data
    assert client.count("get_range") == calls


def test_open_without_listed_etag_uses_head(
    make_fs: Callable[..., BucketFS], client: Store
) -> None:
    client.inner.etags_in_listings = False
    fs = make_fs()
    fh = fs.open("/readme.txt", os.O_RDONLY)
    assert [call.key for call in client.calls_to("head")] == ["readme.txt"]
    assert fs.read(fh, 100, 0) == OBJECTS["readme.txt"]
    assert client.calls_to("get_range")[0].if_match == client.inner.meta("readme.txt").etag


def test_open_notes_the_version_in_the_cache(fs: BucketFS, client: Store) -> None:
    fh = fs.open("/data/big.bin", os.O_RDONLY)
    fs.read(fh, PART, 0)
    assert fs.fetcher.wait_idle(5)
    oid = object_id(
        "s3+http://fake", BUCKET, "data/big.bin", client.inner.meta("data/big.bin").etag
    )
    assert fs.cache.has(fs._open[fh].ref.part_id(0))
    assert fs._open[fh].ref.object_id == oid


def test_read_after_object_changed_is_eio(fs: BucketFS, client: Store) -> None:
    fh = fs.open("/data/big.bin", os.O_RDONLY)
    data = OBJECTS["data/big.bin"]
    assert fs.read(fh, 100, 0) == data[:100]
    fs.readdir("/data")  # listing now cached
    lists_before = client.count("list_page")
    client.inner.put("data/big.bin", _payload(5 * PART + 17, seed=99))
    with pytest.raises(FsError) as info:
        fs.read(fh, 100, 4 * PART + 5)  # a part not fetched yet
    assert _errno(info) == errno.EIO
    # Never the new version's bytes under the old handle.
    with pytest.raises(FsError):
        fs.read(fh, 100, 4 * PART + 5)
    # The parent listing was invalidated, so the change is seen.
    fs.readdir("/data")
    assert client.count("list_page") > lists_before
    fs.release(fh)
    # A fresh open pins the new version.
    fh2 = fs.open("/data/big.bin", os.O_RDONLY)
    assert (
        fs.read(fh2, 100, 4 * PART + 5) == client.inner.data("data/big.bin")[4 * PART + 5 :][:100]
    )


def test_store_errors_during_read_are_eio(fs: BucketFS, client: Store) -> None:
    fh = fs.open("/readme.txt", os.O_RDONLY)
    client.fail("get_range", StoreUnavailableError("store down", status=503))
    with pytest.raises(FsError) as info:
        fs.read(fh, 10, 0)
    assert _errno(info) == errno.EIO


def test_release_and_bad_handles(fs: BucketFS) -> None:
    fh = fs.open("/readme.txt", os.O_RDONLY)
    assert fs.read(fh, 5, 0) == b"hello"
    fs.release(fh)
    with pytest.raises(FsError) as info:
        fs.read(fh, 5, 0)
    assert _errno(info) == errno.EBADF
    fs.release(fh)  # releasing twice is harmless
    with pytest.raises(FsError) as info:
        fs.read(999_999, 5, 0)
    assert _errno(info) == errno.EBADF


def test_handles_are_independent(fs: BucketFS) -> None:
    a = fs.open("/readme.txt", os.O_RDONLY)
    b = fs.open("/data/nested/deep.bin", os.O_RDONLY)
    assert a != b
    assert fs.read(b, 10, 0) == OBJECTS["data/nested/deep.bin"][:10]
    assert fs.read(a, 5, 7) == b"bucke"
    fs.release(a)
    assert fs.read(b, 10, 10) == OBJECTS["data/nested/deep.bin"][10:20]


def test_close_closes_client(make_fs: Callable[..., BucketFS], client: Store) -> None:
    fs = make_fs()
    fh = fs.open("/readme.txt", os.O_RDONLY)
    fs.read(fh, 5, 0)
    fs.close()
    assert client.inner.closed


def test_page_cache_is_kept_only_while_the_etag_is_unchanged(fs: BucketFS, client: Store) -> None:
    first = fs.open("/data/big.bin", os.O_RDONLY)
    assert fs.keep_cache(first) is False  # first open: nothing cached to keep
    fs.release(first)
    second = fs.open("/data/big.bin", os.O_RDONLY)
    assert fs.keep_cache(second) is True  # same ETag: the kernel's pages are still right
    fs.release(second)
    client.inner.put("data/big.bin", _payload(5 * PART + 17, seed=7))
    fs.namespace.invalidate()
    third = fs.open("/data/big.bin", os.O_RDONLY)
    assert fs.keep_cache(third) is False  # new ETag: the kernel must drop the old pages
    assert fs.keep_cache(999_999) is False


# -- offline: the store unreachable ---------------------------------------------


def test_offline_cached_files_are_served_and_uncached_reads_fail(
    make_fs: Callable[..., BucketFS], client: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ossfs_resume")
    fs = make_fs(list_ttl=0)  # every lookup asks the store, as once the TTL has run out
    cached = OBJECTS["data/nested/deep.bin"]
    fh = fs.open("/data/nested/deep.bin", os.O_RDONLY)
    assert fs.read(fh, 10 * PART, 0) == cached
    fs.release(fh)
    assert fs.fetcher.wait_idle(5)
    assert fs.getattr("/data/big.bin")["st_size"] == len(OBJECTS["data/big.bin"])  # listed only
    gets = client.count("get_range")
    client.fail("list_page", StoreUnavailableError("cannot reach http://fake: connection refused"))
    client.fail("get_range", StoreUnavailableError("cannot reach http://fake: connection refused"))

    for _ in range(2):
        assert fs.getattr("/data/nested/deep.bin")["st_size"] == len(cached)
        fh = fs.open("/data/nested/deep.bin", os.O_RDONLY)
        assert fs.read(fh, 10 * PART, 0) == cached
        fs.release(fh)
    assert client.count("get_range") == gets  # all from the cache
    cold = fs.open("/data/big.bin", os.O_RDONLY)  # opens: its listing entry is known
    with pytest.raises(FsError) as info:
        fs.read(cold, 100, 0)
    assert _errno(info) == errno.EIO
    offline = [r.getMessage() for r in caplog.records if "offline" in r.getMessage()]
    assert len([m for m in offline if "/data/nested/deep.bin" in m]) == 1, offline
    assert len([m for m in offline if "/data/big.bin" in m]) == 1, offline
    assert len(offline) == 2

    # The store is back: the same handle reads, and opens are no longer offline.
    client.clear()
    assert fs.read(cold, 100, 0) == OBJECTS["data/big.bin"][:100]
    fs.release(cold)
    caplog.clear()
    fs.release(fs.open("/data/big.bin", os.O_RDONLY))
    assert not [r for r in caplog.records if "offline" in r.getMessage()]


def test_offline_without_a_last_listing_is_eio(
    make_fs: Callable[..., BucketFS], client: Store
) -> None:
    fs = make_fs(list_ttl=0)
    client.fail("list_page", StoreUnavailableError("cannot reach http://fake"))
    with pytest.raises(FsError) as info:
        fs.open("/readme.txt", os.O_RDONLY)
    assert _errno(info) == errno.EIO
