"""FuseAdapter, driven without a mount: every callback answers an errno, logged once.

A failing store (unreachable, a bare ConnectionError, access denied) and a
failing cache (SQLite or disk errors) are injected under a real BucketFS; each
entry point must answer the right errno (never mfusepy's catch-all EINVAL),
with exactly one log line naming the operation and the path, and no traceback
unless debugging.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mfusepy
import pytest

from ossfs_resume.cache import PartCache
from ossfs_resume.core import BucketFS, MountOptions
from ossfs_resume.errors import AccessDeniedError, StoreUnavailableError
from ossfs_resume.fuse_ops import FuseAdapter
from ossfs_resume.prefetch import SOURCE_XATTR

from .test_core import OBJECTS, PART, Store, make_store

pytestmark = pytest.mark.usefixtures("watchdog")

FILE = "/data/big.bin"
DATA = OBJECTS["data/big.bin"]


class FailingCache:
    """The part cache's interface over a real cache; the methods named in `fail` (all of
    them if None) raise a fresh `error()` instead."""

    def __init__(
        self, real: PartCache, error: Callable[[], Exception], fail: set[str] | None = None
    ) -> None:
        self.real = real
        self.root = real.root
        self.error = error
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr) or (self.fail is not None and name not in self.fail):
            return attr

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise self.error()

        return failing


CACHE_ERRORS: list[Callable[[], Exception]] = [
    lambda: sqlite3.OperationalError("disk I/O error"),
    lambda: OSError(errno.EIO, "Input/output error"),
]
CACHE_ERROR_IDS = ["sqlite", "oserror"]


@pytest.fixture
def client() -> Store:
    return make_store(OBJECTS)


@pytest.fixture
def make_adapter(client: Store, tmp_path: Path) -> Iterator[Callable[..., FuseAdapter]]:
    made: list[FuseAdapter] = []

    def make(wrap_cache: Callable[[PartCache], Any] = lambda c: c) -> FuseAdapter:
        def make_core() -> BucketFS:
            cache = wrap_cache(PartCache(tmp_path / f"cache{len(made)}"))
            options = MountOptions(part_size=PART, max_readahead_parts=2)
            return BucketFS(client, cache, options)  # type: ignore[arg-type]

        adapter = FuseAdapter(
            make_core, mountpoint=str(tmp_path / "mnt"), metadata_ttl=1.0, read_ahead_kb=0
        )
        adapter.init_with_config(None, None)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.destroy("/")


def _fi(fh: int = 0) -> SimpleNamespace:
    return SimpleNamespace(flags=os.O_RDONLY, fh=fh, keep_cache=0)


def _open(adapter: FuseAdapter, path: str = FILE) -> SimpleNamespace:
    fi = _fi()
    assert adapter.open(path, fi) == 0
    return fi


def _read_into(adapter: FuseAdapter, fi: SimpleNamespace, offset: int, size: int) -> bytes:
    buf = bytearray(size)
    n = adapter.read_into(fi, offset, memoryview(buf))
    return bytes(buf[:n])


def _naming(caplog: pytest.LogCaptureFixture, path: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if path in r.getMessage()]


def _fails(caplog: pytest.LogCaptureFixture, code: int, op: str, path: str, call: Any) -> None:
    """`call` raises FuseOSError(code), logged in one line naming `op` and `path`."""
    caplog.clear()
    with pytest.raises(mfusepy.FuseOSError) as info:
        call()
    assert info.value.errno == code, (op, info.value)
    records = _naming(caplog, path)
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert records[0].getMessage().startswith(f"{op} {path}: ")
    assert records[0].levelno >= logging.WARNING
    assert records[0].exc_info is None  # a traceback only at debug level


# -- a failing store ------------------------------------------------------------

STORE_ERRORS = [
    pytest.param(
        lambda: StoreUnavailableError("cannot reach http://fake: connection refused"),
        errno.EIO,
        id="unreachable",
    ),
    pytest.param(lambda: ConnectionError("connection reset by peer"), errno.EIO, id="generic"),
    pytest.param(
        lambda: AccessDeniedError("LIST s3://bkt/: 403 AccessDenied", status=403),
        errno.EACCES,
        id="denied",
    ),
]


@pytest.mark.parametrize(("error", "code"), STORE_ERRORS)
def test_metadata_callbacks_with_a_failing_store(
    make_adapter: Callable[..., FuseAdapter],
    client: Store,
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], Exception],
    code: int,
) -> None:
    caplog.set_level(logging.INFO)
    adapter = make_adapter()
    client.fail("list_page", error())
    _fails(caplog, code, "getattr", FILE, lambda: adapter.getattr(FILE))
    _fails(caplog, code, "readdir", "/data", lambda: adapter.readdir("/data", 0))
    _fails(caplog, code, "open", FILE, lambda: adapter.open(FILE, _fi()))
    _fails(caplog, code, "getxattr", FILE, lambda: adapter.getxattr(FILE, SOURCE_XATTR))
    _fails(caplog, code, "listxattr", FILE, lambda: adapter.listxattr(FILE))
    # Callbacks that do not need the store still answer.
    assert adapter.statfs("/")["f_namemax"] == 255
    assert adapter.release(FILE, _fi(12345)) == 0


@pytest.mark.parametrize(("error", "code"), STORE_ERRORS)
def test_reads_with_a_failing_store_are_eio(
    make_adapter: Callable[..., FuseAdapter],
    client: Store,
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], Exception],
    code: int,
) -> None:
    caplog.set_level(logging.INFO)
    adapter = make_adapter()
    fi = _open(adapter)
    assert _read_into(adapter, fi, 0, 10) == DATA[:10]
    client.fail("get_range", error())
    # A read that fails part way is EIO whatever the store said (EACCES mid-file is no answer).
    _fails(caplog, errno.EIO, "read", FILE, lambda: _read_into(adapter, fi, 3 * PART, 100))
    _fails(caplog, errno.EIO, "read", FILE, lambda: adapter.read(FILE, 100, 4 * PART, fi))
    assert adapter.release(FILE, fi) == 0


def test_missing_names_and_read_only_answers_are_not_logged(
    make_adapter: Callable[..., FuseAdapter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ossfs_resume")
    adapter = make_adapter()
    caplog.clear()
    for call, code in [
        (lambda: adapter.getattr("/nope"), errno.ENOENT),
        (lambda: adapter.open("/data", _fi()), errno.EISDIR),
        (lambda: adapter.readdir("/readme.txt", 0), errno.ENOTDIR),
        (lambda: adapter.getxattr("/readme.txt", "user.other"), errno.ENODATA),
        (lambda: adapter.open("/readme.txt", SimpleNamespace(flags=os.O_WRONLY)), errno.EROFS),
        (lambda: adapter.write("/readme.txt", b"x", 0, _fi()), errno.EROFS),
        (lambda: adapter.unlink("/readme.txt"), errno.EROFS),
    ]:
        with pytest.raises(mfusepy.FuseOSError) as info:
            call()
        assert info.value.errno == code
    assert [r for r in caplog.records if r.name == "ossfs_resume.fuse_ops"] == []


def test_traceback_only_when_debugging(
    make_adapter: Callable[..., FuseAdapter],
    client: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = make_adapter()
    client.fail("list_page", ConnectionError("connection reset by peer"))
    caplog.set_level(logging.DEBUG, logger="ossfs_resume")
    with pytest.raises(mfusepy.FuseOSError):
        adapter.getattr(FILE)
    (record,) = _naming(caplog, FILE)
    assert record.exc_info is not None and record.exc_info[0] is ConnectionError


def test_a_core_that_cannot_be_built_fails_init_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def make_core() -> BucketFS:
        raise sqlite3.OperationalError("disk I/O error")

    mountpoint = str(tmp_path / "mnt")
    adapter = FuseAdapter(make_core, mountpoint=mountpoint, metadata_ttl=1.0, read_ahead_kb=0)
    _fails(caplog, errno.EIO, "init", mountpoint, lambda: adapter.init_with_config(None, None))
    # Nothing was built: callbacks answer EIO, not an AttributeError turned EINVAL.
    _fails(caplog, errno.EIO, "getattr", "/nothing", lambda: adapter.getattr("/nothing"))
    adapter.destroy("/")


# -- a failing cache -----------------------------------------------------------


@pytest.mark.parametrize("error", CACHE_ERRORS, ids=CACHE_ERROR_IDS)
def test_a_failing_cache_still_serves_every_callback_from_the_store(
    make_adapter: Callable[..., FuseAdapter],
    client: Store,
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], Exception],
) -> None:
    caplog.set_level(logging.INFO)
    adapter = make_adapter(lambda real: FailingCache(real, error))
    assert adapter.getattr(FILE)["st_size"] == len(DATA)
    assert "big.bin" in adapter.readdir("/data", 0)
    assert adapter.listxattr(FILE) == [SOURCE_XATTR]
    assert json.loads(adapter.getxattr(FILE, SOURCE_XATTR))["key"] == "data/big.bin"
    assert adapter.statfs("/")["f_namemax"] == 255
    caplog.clear()
    # The cache cannot note the version: the file still opens, and reads come from the store.
    fi = _open(adapter)
    assert _read_into(adapter, fi, 0, len(DATA) + 10) == DATA
    assert adapter.read(FILE, 100, PART - 50, fi) == DATA[PART - 50 : PART + 50]
    assert adapter.release(FILE, fi) == 0
    records = _naming(caplog, FILE)
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert records[0].levelno == logging.WARNING
    assert "straight from the store" in records[0].getMessage()
    assert client.calls_to("get_range")  # really from the store


@pytest.mark.parametrize("error", CACHE_ERRORS, ids=CACHE_ERROR_IDS)
def test_cache_failures_during_reads_are_eio(
    make_adapter: Callable[..., FuseAdapter],
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], Exception],
) -> None:
    caplog.set_level(logging.INFO)
    fail = {"read_into", "open_verified", "has", "is_verified"}
    adapter = make_adapter(lambda real: FailingCache(real, error, fail))
    fi = _open(adapter)
    assert not _naming(caplog, FILE)
    _fails(caplog, errno.EIO, "read", FILE, lambda: _read_into(adapter, fi, 0, 100))
    _fails(caplog, errno.EIO, "read", FILE, lambda: adapter.read(FILE, 100, 0, fi))
    assert adapter.release(FILE, fi) == 0


@pytest.mark.parametrize("error", CACHE_ERRORS, ids=CACHE_ERROR_IDS)
def test_a_failing_cache_at_unmount_still_closes_the_client(
    make_adapter: Callable[..., FuseAdapter],
    client: Store,
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], Exception],
) -> None:
    adapter = make_adapter(lambda real: FailingCache(real, error, {"close"}))
    adapter.destroy("/")
    assert client.inner.closed
    assert any("closing the mount" in r.getMessage() for r in caplog.records)
