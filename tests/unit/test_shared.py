"""The shared part tier (SharedTier) on a MemoryStore, alone and under the engine."""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from ossfs_resume.cache import PartCache, object_id
from ossfs_resume.checksum import crc64
from ossfs_resume.cli import build_parser, make_shared_tier
from ossfs_resume.client import StoreClient, StoreConfig
from ossfs_resume.engine import ObjectRef, PartFetcher
from ossfs_resume.errors import AccessDeniedError, StoreUnavailableError, UsageError
from ossfs_resume.objectstore import FaultyStore, MemoryStore, ObjectMeta
from ossfs_resume.shared import PartIdentity, SharedTier
from ossfs_resume.signing import Credentials

from .conftest import serving

pytestmark = pytest.mark.usefixtures("watchdog")

PART = 1000
KEY = "dir/object.bin"
ETAG = "etag-v1"


def _ident(number: int = 0, **changes: object) -> PartIdentity:
    fields: dict[str, object] = {
        "store_id": "s3+http://origin",
        "bucket": "bkt",
        "key": KEY,
        "etag": ETAG,
        "part_size": PART,
        "number": number,
    }
    fields.update(changes)
    return PartIdentity(**fields)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tier_store() -> FaultyStore[MemoryStore]:
    return FaultyStore(MemoryStore("tier", endpoint="http://tier"))


@pytest.fixture
def tier(tier_store: FaultyStore[MemoryStore], clock: Clock) -> Iterator[SharedTier]:
    t = SharedTier(tier_store, "shared", retry_after=30.0, clock=clock)
    try:
        yield t
    finally:
        t.close()


def _tier_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "ossfs_resume.shared"
    ]


def test_tier_key_is_a_content_address_over_all_six_fields() -> None:
    ident = _ident(3)
    key = ident.tier_key("p/")
    assert key == f"p/parts/{ident.digest[:2]}/{ident.digest}"
    assert len(ident.digest) == 64
    others = [
        _ident(3, store_id="oss+http://origin"),
        _ident(3, bucket="other"),
        _ident(3, key=KEY + "x"),
        _ident(3, etag="etag-v2"),
        _ident(3, part_size=PART * 2),
        _ident(4),
    ]
    assert len({o.tier_key("p/") for o in others} | {key}) == 7
    # Keys that are not valid UTF-8 (surrogate-escaped bytes) still have an address.
    assert _ident(0, key="bad\udcff").tier_key("").startswith("parts/")


def test_put_then_get_is_a_hit(tier: SharedTier, tier_store: FaultyStore[MemoryStore]) -> None:
    data = random.Random(1).randbytes(PART)
    assert tier.put(_ident(), data)
    key = _ident().tier_key("shared/")
    meta = tier_store.inner.meta(key)
    assert meta.metadata == {
        "crc64": f"{crc64(data):016x}",
        "identity": _ident().digest,
        "length": str(PART),
    }
    out = bytearray(PART)
    assert tier.get_into(_ident(), memoryview(out))
    assert out == data
    assert tier.has(_ident())
    assert not tier.has(_ident(1))
    stats = tier.stats()
    assert (stats["gets"], stats["hits"], stats["puts"]) == (1, 1, 1)
    assert tier.name == "s3://tier/shared/"


def test_absent_part_is_a_miss(tier: SharedTier) -> None:
    assert not tier.get_into(_ident(), memoryview(bytearray(PART)))
    assert tier.stats()["misses"] == 1


def test_corrupted_object_is_refused_with_one_warning_and_healed_by_the_next_put(
    tier: SharedTier, tier_store: FaultyStore[MemoryStore], caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(2).randbytes(PART)
    assert tier.put(_ident(), data)
    key = _ident().tier_key("shared/")
    stored = tier_store.inner.meta(key)
    flipped = bytearray(data)
    flipped[17] ^= 0xFF
    tier_store.inner.put(key, bytes(flipped), metadata=stored.metadata)  # same metadata
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert not tier.get_into(_ident(), memoryview(bytearray(PART)))
    warnings = _tier_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "CRC-64" in warnings[0] and KEY in warnings[0]
    assert tier.stats()["mismatches"] == 3
    # The next put of that part overwrites the bad object (not write-if-absent).
    assert tier.put(_ident(), data)
    out = bytearray(PART)
    assert tier.get_into(_ident(), memoryview(out)) and out == data


def test_identity_and_length_mismatches_are_refused(
    tier: SharedTier, tier_store: FaultyStore[MemoryStore], caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(3).randbytes(PART)
    assert tier.put(_ident(0), data)
    # Another part's object (valid CRC, its own identity) copied under part 1's address.
    stored = tier_store.inner.meta(_ident(0).tier_key("shared/"))
    tier_store.inner.put(_ident(1).tier_key("shared/"), data, metadata=stored.metadata)
    caplog.set_level(logging.WARNING)
    assert not tier.get_into(_ident(1), memoryview(bytearray(PART)))
    assert "identity" in _tier_warnings(caplog)[0]
    # A part of another length than asked for.
    assert not tier.get_into(_ident(0), memoryview(bytearray(PART - 1)))
    assert tier.stats()["mismatches"] == 2
    assert len(_tier_warnings(caplog)) == 2


def test_unreachable_tier_is_marked_down_then_tried_again(
    tier: SharedTier,
    tier_store: FaultyStore[MemoryStore],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = random.Random(4).randbytes(PART)
    tier_store.inner.put_object(
        _ident().tier_key("shared/"),
        data,
        metadata={"crc64": f"{crc64(data):016x}", "identity": _ident().digest, "length": "1000"},
    )
    rule = tier_store.fail("get_object", StoreUnavailableError("connection refused"))
    caplog.set_level(logging.WARNING)
    assert not tier.get_into(_ident(), memoryview(bytearray(PART)))
    calls = tier_store.count()
    # Down: every call returns False at once, without asking the store.
    clock.now += 29.0
    assert not tier.get_into(_ident(), memoryview(bytearray(PART)))
    assert not tier.put(_ident(1), data)
    assert not tier.has(_ident())
    tier.put_async(_ident(2), data)
    assert tier_store.count() == calls
    warnings = _tier_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "30 s" in warnings[0]
    assert tier.stats()["skipped"] == 4
    # After retry_after, tried again: it answers now.
    rule.remove()
    clock.now += 1.5
    out = bytearray(PART)
    assert tier.get_into(_ident(), memoryview(out)) and out == data


def test_a_tier_that_refuses_puts_is_left_alone(
    tier: SharedTier, tier_store: FaultyStore[MemoryStore]
) -> None:
    tier_store.fail("put_object", AccessDeniedError("403 AccessDenied", status=403))
    assert not tier.put(_ident(0), b"x" * PART)
    assert not tier.put(_ident(1), b"x" * PART)
    assert tier_store.count("put_object") == 1
    assert tier.stats()["put_errors"] == 1


def test_put_async_is_bounded_by_pending_bytes(
    tier_store: FaultyStore[MemoryStore], clock: Clock
) -> None:
    tier = SharedTier(tier_store, "", put_workers=1, max_pending_bytes=3 * PART, clock=clock)
    gate = tier_store.hold("put_object", timeout=5.0)
    try:
        for number in range(10):
            tier.put_async(_ident(number), bytes([number]) * PART)  # returns at once
        assert gate.wait_held(1)
        assert tier.pending() == (3, 3 * PART)
        assert tier.stats()["skipped"] == 7
    finally:
        gate.release()
    assert tier.flush(5.0)
    assert tier.pending() == (0, 0)
    assert len(tier_store.inner.keys()) == 3
    assert tier.stats()["puts"] == 3
    tier.close()


def test_past_the_memory_allowance_parts_are_read_back_from_the_local_copy(
    tier_store: FaultyStore[MemoryStore], clock: Clock
) -> None:
    """A node reading faster than the tier takes writes: nothing is lost, no memory held."""
    tier = SharedTier(tier_store, "", put_workers=1, max_pending_bytes=2 * PART, clock=clock)
    local = {n: bytes([n]) * PART for n in range(8)}  # the node's local cache
    reloads: list[int] = []

    def reload(n: int) -> bytes | None:
        reloads.append(n)
        return None if n == 7 else local[n]  # part 7 was evicted locally meanwhile

    gate = tier_store.hold("put_object", timeout=5.0)
    try:
        for n in range(8):
            tier.put_async(_ident(n), local[n], reload=lambda n=n: reload(n))
        assert gate.wait_held(1)
        parts, nbytes = tier.pending()
        assert parts == 8 and nbytes <= 2 * PART  # six of them hold no memory while queued
    finally:
        gate.release()
    assert tier.flush(5.0)
    assert sorted(reloads) == [2, 3, 4, 5, 6, 7]
    assert len(tier_store.inner.keys()) == 7  # all but the part gone from the local cache
    for n in range(7):
        buf = bytearray(PART)
        assert tier.get_into(_ident(n), memoryview(buf)) and bytes(buf) == local[n]
    tier.close()


def test_put_is_write_if_absent(tier: SharedTier, tier_store: FaultyStore[MemoryStore]) -> None:
    first = b"a" * PART
    assert tier.put(_ident(), first)
    key = _ident().tier_key("shared/")
    etag = tier_store.inner.meta(key).etag
    assert tier.put(_ident(), b"b" * PART)  # the tier holds the part: True, not rewritten
    assert tier_store.inner.meta(key).etag == etag
    assert tier_store.inner.data(key) == first


def test_memory_store_keeps_metadata_and_answers_get_object() -> None:
    store = MemoryStore()
    assert store.put_object("k", b"abc", metadata={"Crc64": "x"}, if_none_match=True)
    assert not store.put_object("k", b"xyz", if_none_match=True)
    meta = store.head("k")
    assert meta.metadata == {"crc64": "x"}
    assert meta == ObjectMeta("k", meta.size, meta.etag, meta.last_modified, meta.crc64)
    buf = bytearray(3)
    assert store.get_object("k", buf)[1] == 3 and buf == b"abc"
    assert store.get_object("k", bytearray(4))[1] == 0  # another size: nothing read
    store.delete_object("k")
    store.delete_object("k")
    assert store.keys() == []


# -- under the engine -----------------------------------------------------------------


def _origin(data: bytes) -> FaultyStore[MemoryStore]:
    memory = MemoryStore("bkt", endpoint="http://origin")
    memory.put(KEY, data, etag=ETAG, mtime=1_700_000_000.0)
    return FaultyStore(memory)


def _ref(size: int) -> ObjectRef:
    meta = ObjectMeta(KEY, size, ETAG, 1_700_000_000.0)
    return ObjectRef(meta, object_id("s3+http://origin", "bkt", KEY, ETAG), PART)


def _read_all(fetcher: PartFetcher, ref: ObjectRef) -> bytes:
    return b"".join(fetcher.read(ref, n, 0, PART) for n in range(ref.parts))


def test_a_second_node_reads_from_the_tier_not_the_origin(
    tmp_path: Path, tier: SharedTier, caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(5).randbytes(5 * PART + 123)
    ref = _ref(len(data))
    nodes = []
    try:
        origin_a = _origin(data)
        node_a = PartFetcher(origin_a, PartCache(tmp_path / "a"), shared=tier)  # type: ignore[arg-type]
        nodes.append(node_a)
        assert _read_all(node_a, ref) == data
        assert origin_a.count("get_range") == ref.parts
        assert tier.flush(5.0)
        assert tier.stats()["puts"] == ref.parts

        # Node B: its own cache, the same tier; one part corrupted there.
        bad_key = PartIdentity("s3+http://origin", "bkt", KEY, ETAG, PART, 2).tier_key("shared/")
        inner = tier.store.inner  # type: ignore[attr-defined]
        stored = inner.meta(bad_key)
        inner.put(bad_key, b"\0" * PART, metadata=stored.metadata)
        origin_b = _origin(data)
        node_b = PartFetcher(origin_b, PartCache(tmp_path / "b"), shared=tier)  # type: ignore[arg-type]
        nodes.append(node_b)
        caplog.set_level(logging.WARNING)
        assert _read_all(node_b, ref) == data
        assert origin_b.ranges() == [(2 * PART, 3 * PART - 1)]  # only the bad part
        assert len(_tier_warnings(caplog)) == 1
        assert node_b.wait_idle(5.0)
        assert all(node_b.cache.has(ref.part_id(n)) for n in range(ref.parts))
    finally:
        for node in nodes:
            node.shutdown()
            node.cache.close()


def test_headers_of_its_own_keep_a_fetch_off_the_tier(tmp_path: Path, tier: SharedTier) -> None:
    cache = PartCache(tmp_path / "c")
    fetcher = PartFetcher(
        _origin(b"x"),  # type: ignore[arg-type]
        cache,
        headers={"x-oss-server-side-encryption-customer-key": "k"},
        shared=tier,
    )
    assert fetcher.shared is None
    fetcher.shutdown()
    cache.close()


# -- the client's writes, against a tiny HTTP store -------------------------------------


class _PutStore(BaseHTTPRequestHandler):
    """Keeps PUT bodies and their headers; answers write-if-absent as S3 and OSS do."""

    protocol_version = "HTTP/1.1"
    objects: ClassVar[dict[str, tuple[bytes, dict[str, str]]]] = {}

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path in self.objects and self.headers.get("If-None-Match") == "*":
            return self._reply(412)
        if self.path in self.objects and self.headers.get("x-oss-forbid-overwrite") == "true":
            return self._reply(409)
        self.objects[self.path] = (body, {k.lower(): v for k, v in self.headers.items()})
        self._reply(200, {"ETag": '"e1"'})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.path not in self.objects:
            return self._reply(404)
        body, headers = self.objects[self.path]
        meta = {k: v for k, v in headers.items() if "-meta-" in k}
        self._reply(200, {"ETag": '"e1"', **meta}, body)

    def do_DELETE(self) -> None:
        self.objects.pop(self.path, None)
        self._reply(204)


@pytest.mark.parametrize("protocol", ["s3", "oss"])
def test_client_puts_with_metadata_and_write_if_absent(protocol: str) -> None:
    _PutStore.objects = {}
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), _PutStore)) as srv:
        endpoint = f"http://127.0.0.1:{srv.server_address[1]}"
        creds = Credentials("AKID", "secret")
        client = StoreClient(StoreConfig(protocol, endpoint, "bkt", credentials=creds))  # type: ignore[arg-type]
        try:
            assert client.put_object(
                "a/b", b"hello", metadata={"CRC64": "00ff"}, if_none_match=True
            )
            assert not client.put_object("a/b", b"other", if_none_match=True)  # kept
            body, headers = _PutStore.objects["/bkt/a/b"]
            assert body == b"hello" and headers["content-length"] == "5"
            meta_header = f"x-{'oss' if protocol == 'oss' else 'amz'}-meta-crc64"
            assert headers[meta_header] == "00ff"
            assert meta_header in headers["authorization"].lower() or protocol == "oss"
            assert client.head("a/b").metadata == {"crc64": "00ff"}
            buf = bytearray(5)
            meta, n = client.get_object("a/b", buf)
            assert (n, bytes(buf), meta.metadata) == (5, b"hello", {"crc64": "00ff"})
            assert client.get_object("a/b", bytearray(6))[1] == 0
            client.delete_object("a/b")
            client.delete_object("a/b")
            assert _PutStore.objects == {}
        finally:
            client.close()


# -- the command line -------------------------------------------------------------------


def _mount_args(*extra: str) -> argparse.Namespace:
    base = ["mount", "s3://bkt/data", "/mnt/x", "--endpoint", "http://127.0.0.1:9"]
    return build_parser().parse_args([*base, *extra])


def test_mount_builds_the_tier_from_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ORIGINKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "originsecret")
    assert make_shared_tier(_mount_args()) is None
    tier = make_shared_tier(_mount_args("--shared-cache", "s3://tier/p"))
    assert tier is not None
    try:
        config = tier.store.config
        assert tier.name == "s3://tier/p/"
        assert config.endpoint == "http://127.0.0.1:9"  # the origin's by default
        assert (config.read_timeout, config.connect_timeout, config.max_attempts) == (2, 2, 2)
        assert config.current_credentials().access_key_id == "ORIGINKEY"
    finally:
        tier.close()
    passwd = tmp_path / "tier.passwd"
    passwd.write_text("TIERKEY:tiersecret\n")
    passwd.chmod(0o600)
    args = _mount_args(
        "--shared-cache",
        "s3://tier",
        "--shared-endpoint",
        "http://127.0.0.1:10",
        "--shared-credentials-file",
        str(passwd),
    )
    tier = make_shared_tier(args)
    assert tier is not None
    try:
        assert tier.store.config.endpoint == "http://127.0.0.1:10"
        # Named for the tier: wins over the origin's keys in the environment.
        assert tier.store.config.current_credentials().access_key_id == "TIERKEY"
    finally:
        tier.close()
    with pytest.raises(UsageError):
        make_shared_tier(_mount_args("--shared-cache", "http://tier/p"))
