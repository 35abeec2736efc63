"""FuseAdapter, driven without a mount: every callback answers an errno, logged once.

A failing store (unreachable, a bare ConnectionError, access denied) and a
failing cache (SQLite or disk errors) are injected under a real BucketFS; each
entry point must answer the right errno (never mfusepy's catch-all EINVAL),
with exactly one log line naming the operation and the path, and no traceback
unless debugging.
"""

from __future__ import annotations

import ast
import ctypes
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

from ossfs_resume import fuse_ops
from ossfs_resume.cache import PartCache
from ossfs_resume.core import BucketFS, MountOptions
from ossfs_resume.errors import AccessDeniedError, StoreUnavailableError
from ossfs_resume.fuse_ops import FuseAdapter, FuseBuf, FuseBufvec
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


# -- read_buf: the buffers libfuse replies from and frees ------------------------


LIBC_MALLOC = fuse_ops._malloc
LIBC_FREE = fuse_ops._free


class CountingAlloc:
    """libc malloc/free behind fuse_ops, recording each address; `fail_size` makes a
    malloc of that many bytes answer NULL."""

    def __init__(self, fail_size: int | None = None) -> None:
        self.malloced: list[int] = []
        self.freed: list[int | None] = []
        self.fail_size = fail_size

    def malloc(self, size: int) -> int | None:
        if size == self.fail_size:
            return None
        addr = LIBC_MALLOC(size)
        self.malloced.append(addr)
        return addr

    def free(self, addr: int | None) -> None:
        self.freed.append(addr)
        LIBC_FREE(addr)


@pytest.fixture
def alloc(monkeypatch: pytest.MonkeyPatch) -> CountingAlloc:
    counting = CountingAlloc()
    monkeypatch.setattr(fuse_ops, "_malloc", counting.malloc)
    monkeypatch.setattr(fuse_ops, "_free", counting.free)
    return counting


def _bufpp() -> Any:
    # What libfuse passes (fuse_lib_read's `struct fuse_bufvec *buf = NULL`), typed as
    # mfusepy types it.
    return ctypes.pointer(mfusepy.fuse_bufvec_p())


def _bufvec_at(bufpp: Any) -> int:
    return ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] or 0


def test_bufvec_layout_is_libfuses() -> None:
    # struct fuse_buf as mfusepy declares it (that one is right), inline in the bufvec.
    for name, *_ in mfusepy.fuse_buf._fields_:
        assert getattr(FuseBuf, name).offset == getattr(mfusepy.fuse_buf, name).offset, name
    assert ctypes.sizeof(FuseBuf) == ctypes.sizeof(mfusepy.fuse_buf)
    assert FuseBufvec.buf.offset == 3 * ctypes.sizeof(ctypes.c_size_t)
    assert ctypes.sizeof(FuseBufvec) == FuseBufvec.buf.offset + ctypes.sizeof(FuseBuf)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 10), (PART - 50, 100), (0, len(DATA)), (len(DATA) - 7, 4096), (len(DATA) + 5, 10)],
    ids=["head", "across-parts", "whole", "tail", "past-end"],
)
def test_read_buf_fills_a_malloced_bufvec_that_libc_frees(
    make_adapter: Callable[..., FuseAdapter],
    alloc: CountingAlloc,
    monkeypatch: pytest.MonkeyPatch,
    offset: int,
    size: int,
) -> None:
    adapter = make_adapter()
    fi = _open(adapter)
    core = adapter.core
    assert core is not None

    def no_bytes_copy(*args: Any) -> bytes:
        raise AssertionError("read_buf must fill the buffer, not copy a bytes object into it")

    monkeypatch.setattr(core, "read", no_bytes_copy)
    for _ in range(2):  # the second time from the cache
        bufpp = _bufpp()
        assert adapter.read_buf(FILE, bufpp, size, offset, fi) == 0
        vec_addr = _bufvec_at(bufpp)
        vec = FuseBufvec.from_address(vec_addr)
        want = DATA[offset : offset + size]
        assert (vec.count, vec.idx, vec.off) == (1, 0, 0)
        buf = vec.buf[0]
        assert (buf.size, buf.flags, buf.fd, buf.pos) == (len(want), 0, -1, 0)
        assert ctypes.string_at(buf.mem, buf.size) == want
        # Both from malloc, nothing freed yet: libfuse frees them after replying.
        assert alloc.malloced[-2:] == [vec_addr, buf.mem] and alloc.freed == []
        # fuse_free_buf: free(buf[0].mem), then free(bufvec); libc aborts on a bad pointer.
        LIBC_FREE(buf.mem)
        LIBC_FREE(vec_addr)
    assert adapter.release(FILE, fi) == 0


@pytest.mark.parametrize(("error", "code"), STORE_ERRORS)
def test_a_failed_read_buf_frees_its_buffers_and_answers_eio(
    make_adapter: Callable[..., FuseAdapter],
    client: Store,
    alloc: CountingAlloc,
    caplog: pytest.LogCaptureFixture,
    error: Callable[[], Exception],
    code: int,
) -> None:
    caplog.set_level(logging.INFO)
    adapter = make_adapter()
    fi = _open(adapter)
    client.fail("get_range", error())
    bufpp = _bufpp()
    # EIO whatever the store said, as for any read that fails (one line naming the file).
    _fails(caplog, errno.EIO, "read", FILE, lambda: adapter.read_buf(FILE, bufpp, 100, 0, fi))
    assert _bufvec_at(bufpp) == 0  # libfuse's fuse_free_buf(NULL) frees nothing
    assert len(alloc.malloced) == 2 and sorted(alloc.freed) == sorted(alloc.malloced)
    assert adapter.release(FILE, fi) == 0


def test_read_buf_on_a_closed_handle_frees_its_buffers(
    make_adapter: Callable[..., FuseAdapter], alloc: CountingAlloc
) -> None:
    adapter = make_adapter()
    bufpp = _bufpp()
    with pytest.raises(mfusepy.FuseOSError) as info:
        adapter.read_buf(FILE, bufpp, 100, 0, _fi(12345))
    assert info.value.errno == errno.EBADF
    assert _bufvec_at(bufpp) == 0
    assert len(alloc.malloced) == 2 and sorted(alloc.freed) == sorted(alloc.malloced)


def test_read_buf_out_of_memory_is_enomem(
    make_adapter: Callable[..., FuseAdapter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = make_adapter()
    fi = _open(adapter)
    alloc = CountingAlloc(fail_size=1 << 20)
    monkeypatch.setattr(fuse_ops, "_malloc", alloc.malloc)
    monkeypatch.setattr(fuse_ops, "_free", alloc.free)
    bufpp = _bufpp()
    _fails(
        caplog, errno.ENOMEM, "read", FILE, lambda: adapter.read_buf(FILE, bufpp, 1 << 20, 0, fi)
    )
    assert _bufvec_at(bufpp) == 0
    # The bufvec was allocated, the data buffer was not: the bufvec is freed (free(NULL) is fine).
    assert len(alloc.malloced) == 1 and alloc.malloced[0] in alloc.freed
    assert adapter.release(FILE, fi) == 0


# -- mfusepy through its public interface only -----------------------------------


def _mfusepy_names(tree: ast.AST) -> set[str]:
    """Names bound to the mfusepy module: imports, and ``x = _load_mfusepy()``."""
    names = {"mfusepy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "mfusepy"}
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Name) and func.id == "_load_mfusepy":
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _mfusepy_misuse(text: str, name: str) -> list[str]:
    """Where source `text` subclasses mfusepy's classes, overrides FUSE's read callback or
    assigns to (monkeypatches) anything of mfusepy's."""
    tree = ast.parse(text, name)
    mod = _mfusepy_names(tree)
    mod |= {
        a.asname or a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "mfusepy"
        for a in node.names
    }

    def of_mfusepy(expr: ast.expr) -> bool:
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in mod

    problems = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            bases = [
                ast.unparse(b) for b in node.bases if of_mfusepy(b) or "FUSE" in ast.unparse(b)
            ]
            problems += [f"{where}: class {node.name}({b})" for b in bases]
        elif isinstance(node, ast.FunctionDef) and node.name == "read":
            path = node.args.args[1:2]
            if path and path[0].annotation and "bytes" in ast.unparse(path[0].annotation):
                problems.append(f"{where}: an override of FUSE.read (path: bytes)")
        elif isinstance(node, (ast.Assign, ast.Delete)):
            for target in node.targets:
                if isinstance(target, (ast.Attribute, ast.Subscript)) and of_mfusepy(target):
                    problems.append(f"{where}: assigns {ast.unparse(target)}")
        elif isinstance(node, ast.AugAssign) and of_mfusepy(node.target):
            problems.append(f"{where}: assigns {ast.unparse(node.target)}")
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("setattr", "delattr")
            and node.args
            and of_mfusepy(node.args[0])
        ):
            problems.append(f"{where}: {ast.unparse(node)}")
    return problems


def test_no_subclass_or_patch_of_mfusepy_in_the_package() -> None:
    """mfusepy's FUSE says it is not to be subclassed; its callbacks and module stay as
    shipped, so an mfusepy upgrade cannot silently break a private override."""
    package = Path(fuse_ops.__file__).parent
    problems = [
        problem
        for source in sorted(package.glob("*.py"))
        for problem in _mfusepy_misuse(source.read_text(), source.name)
    ]
    assert problems == []
    # The operations object is a plain class: nothing of mfusepy's in its ancestry.
    assert all(cls.__module__ != "mfusepy" for cls in FuseAdapter.__mro__)


def test_the_misuse_check_sees_a_subclass_an_override_and_a_patch() -> None:
    old = """
def run_mount():
    fuse = _load_mfusepy()

    class ZeroCopyFUSE(fuse.FUSE):
        def read(self, path: bytes | None, buf, size, offset, fip) -> int:
            return 0

    fuse.FUSE.read_buf = None
    setattr(fuse, "fuse_bufvec", None)
"""
    problems = _mfusepy_misuse(old, "old.py")
    assert len(problems) == 4, problems
