"""MemoryStore and FaultyStore, the stores the unit tests run the engine against.

The first tests run the same assertions against MemoryStore and against the
real StoreClient talking to the fake HTTP store of test_client.py, so the
in-memory store provably answers as the client does.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator

import pytest

from ossfs_resume.checksum import crc64
from ossfs_resume.client import StoreClient
from ossfs_resume.errors import (
    AccessDeniedError,
    InvalidRangeError,
    NotFoundError,
    PreconditionFailedError,
    ProtocolError,
    StoreUnavailableError,
)
from ossfs_resume.objectstore import (
    Call,
    FaultyStore,
    ListPage,
    MemoryStore,
    ObjectMeta,
    ObjectStore,
)

from .conftest import serving
from .test_client import MTIME, FakeStore, FakeStoreServer, _config

pytestmark = pytest.mark.usefixtures("watchdog")

DATA = bytes(range(256)) * 40  # 10240 bytes
PAGE = 2  # entries per listing page, in both stores

Put = Callable[[str, bytes, str], None]


@pytest.fixture(params=["memory", "http"])
def bucket(request: pytest.FixtureRequest) -> Iterator[tuple[ObjectStore, Put]]:
    """(store, put(key, data, etag)): a MemoryStore, or a StoreClient on the fake HTTP store."""
    if request.param == "memory":
        memory = MemoryStore("bkt", max_page=PAGE)

        def put_memory(key: str, data: bytes, etag: str) -> None:
            memory.put(key, data, etag=etag, mtime=MTIME)

        yield memory, put_memory
        return
    fake = FakeStore(page_size=PAGE)
    with serving(FakeStoreServer(fake)) as server:
        client = StoreClient(_config(server.endpoint))
        try:
            yield client, fake.put
        finally:
            client.close()


@pytest.fixture
def store(bucket: tuple[ObjectStore, Put]) -> ObjectStore:
    store, put = bucket
    put("data.bin", DATA, "etag-data")
    for key in ("dir/a", "dir/b", "dir/sub/c", "dir/sub/d", "dir/z/e", "dir/zz", "top"):
        put(key, key.encode(), f"etag-{key}")
    return store


# -- MemoryStore answers as the client does ---------------------------------------


def test_every_store_is_an_object_store() -> None:
    assert isinstance(MemoryStore(), ObjectStore)
    assert isinstance(FaultyStore(MemoryStore()), ObjectStore)
    assert isinstance(StoreClient(_config("http://127.0.0.1:9")), ObjectStore)
    assert not isinstance(object(), ObjectStore)


@pytest.mark.parametrize(("start", "end"), [(0, 0), (0, len(DATA) - 1), (100, 5000)])
def test_get_range_is_exact(store: ObjectStore, start: int, end: int) -> None:
    assert bytes(store.get_range("data.bin", start, end)) == DATA[start : end + 1]
    buf = bytearray(end - start + 1)
    assert store.get_range("data.bin", start, end, into=buf, if_match="etag-data") is buf
    assert bytes(buf) == DATA[start : end + 1]


def test_get_range_into_a_view_of_a_larger_buffer(store: ObjectStore) -> None:
    buf = bytearray(b"-" * 20)
    store.get_range("data.bin", 10, 19, into=memoryview(buf)[5:])
    assert bytes(buf) == b"-" * 5 + DATA[10:20] + b"-" * 5


def test_range_checks(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        store.get_range("data.bin", 10, 9)
    with pytest.raises(ValueError):
        store.get_range("data.bin", 0, 9, into=bytearray(5))
    with pytest.raises(InvalidRangeError):
        store.get_range("data.bin", len(DATA), len(DATA) + 10)
    # Starts inside, ends past the end: the store answers a shorter range, which the
    # client refuses rather than hand back fewer bytes than asked for.
    with pytest.raises(ProtocolError, match="Content-Range"):
        store.get_range("data.bin", len(DATA) - 5, len(DATA) + 5)


def test_if_match(store: ObjectStore) -> None:
    with pytest.raises(PreconditionFailedError) as info:
        store.get_range("data.bin", 0, 9, if_match="etag-old")
    assert info.value.status == 412
    # If-Match is checked before the range.
    with pytest.raises(PreconditionFailedError):
        store.get_range("data.bin", len(DATA), len(DATA) + 1, if_match="etag-old")
    assert bytes(store.get_range("data.bin", 0, 9, if_match="etag-data")) == DATA[:10]


def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(NotFoundError) as info:
        store.get_range("nope", 0, 9, if_match="etag-data")
    assert info.value.status == 404 and info.value.code == "NoSuchKey"
    with pytest.raises(NotFoundError):
        store.head("nope")


def test_head(store: ObjectStore) -> None:
    assert store.head("data.bin") == ObjectMeta(
        "data.bin", len(DATA), "etag-data", MTIME, crc64(DATA)
    )
    assert store.describe("a/b") == "s3://bkt/a/b"


def _pages(store: ObjectStore, prefix: str, delimiter: str) -> list[ListPage]:
    pages = list(store.list(prefix, delimiter))
    assert all(p.next_token for p in pages[:-1]) and pages[-1].next_token is None
    return pages


def test_listing_with_delimiter_pages_like_list_objects_v2(store: ObjectStore) -> None:
    pages = _pages(store, "dir/", "/")
    # dir/a, dir/b, dir/sub/, dir/z/, dir/zz: 2 a page, files and prefixes in one order.
    assert [(sorted(o.key for o in p.objects), p.prefixes) for p in pages] == [
        (["dir/a", "dir/b"], []),
        ([], ["dir/sub/", "dir/z/"]),
        (["dir/zz"], []),
    ]
    listed = pages[0].objects[0]
    assert listed == ObjectMeta("dir/a", 5, "etag-dir/a", MTIME)  # no CRC-64 in listings
    assert [p.prefixes for p in _pages(store, "dir/sub/", "/")] == [[]]
    assert [o.key for p in _pages(store, "dir/sub/", "/") for o in p.objects] == [
        "dir/sub/c",
        "dir/sub/d",
    ]


def test_listing_without_delimiter_is_flat(store: ObjectStore) -> None:
    pages = _pages(store, "dir/", "")
    assert [o.key for p in pages for o in p.objects] == [
        "dir/a",
        "dir/b",
        "dir/sub/c",
        "dir/sub/d",
        "dir/z/e",
        "dir/zz",
    ]
    assert not any(p.prefixes for p in pages)


def test_listing_of_nothing_is_one_empty_page(store: ObjectStore) -> None:
    assert _pages(store, "nothing/", "/") == [ListPage([], [], None)]
    store.check_access()
    store.check_access("dir/")


def test_list_page_max_keys(store: ObjectStore) -> None:
    page = store.list_page("dir/", "/", max_keys=1)
    assert [o.key for o in page.objects] == ["dir/a"] and page.next_token
    rest = store.list_page("dir/", "/", token=page.next_token, max_keys=1)
    assert [o.key for o in rest.objects] == ["dir/b"]


# -- MemoryStore ------------------------------------------------------------------


def test_put_gives_the_md5_etag_and_a_new_one_on_overwrite() -> None:
    store = MemoryStore()
    first = store.put("k", b"one")
    assert first.etag == hashlib.md5(b"one").hexdigest()
    assert store.head("k") == first
    second = store.put("k", b"two", mtime=5.0)
    assert second.etag != first.etag and second.last_modified == 5.0
    with pytest.raises(PreconditionFailedError):
        store.get_range("k", 0, 2, if_match=first.etag)  # a read pinned to the old version
    assert store.put("n", b"", crc64=False).crc64 is None
    assert store.put("n", b"x", crc64=7).crc64 == 7
    store.delete("k")
    store.delete("k")  # as DeleteObject: no error
    with pytest.raises(NotFoundError):
        store.head("k")
    assert store.keys() == ["n"]


def test_memory_store_records_every_request() -> None:
    store = MemoryStore()
    store.put("a", b"abc")
    store.meta("a")  # not requests: nothing recorded
    store.data("a")
    assert store.calls == []
    store.head("a")
    store.get_range("a", 0, 1, if_match=store.meta("a").etag)
    with pytest.raises(InvalidRangeError):
        store.get_range("a", 5, 6)  # failed, but the store saw it
    list(store.list("", "/"))
    assert store.calls == [
        Call("head", "a"),
        Call("get_range", "a", 0, 1, hashlib.md5(b"abc").hexdigest()),
        Call("get_range", "a", 5, 6),
        Call("list_page", "", delimiter="/"),
    ]
    assert store.counts() == {"head": 1, "get_range": 2, "list_page": 1}
    assert store.count("get_range") == 2 and store.count() == 4
    assert store.ranges() == [(0, 1), (5, 6)]
    assert store.calls_to("head", "b") == []


def test_listing_continues_after_the_last_name_returned() -> None:
    store = MemoryStore(max_page=2)
    for key in ("a", "c", "e"):
        store.put(key, b"")
    first = store.list_page("", "")
    store.put("b", b"")  # sorts before the token: not seen
    store.put("d", b"")  # after it: seen
    rest = store.list_page("", "", token=first.next_token)
    assert [o.key for o in first.objects + rest.objects] == ["a", "c", "d", "e"]


def test_listings_without_etags() -> None:
    store = MemoryStore(etags_in_listings=False)
    store.put("a", b"abc")
    assert [o.etag for p in store.list("") for o in p.objects] == [""]
    assert store.head("a").etag  # HEAD still has it


def test_close_is_noted_and_the_store_still_answers() -> None:
    store = MemoryStore()
    store.put("a", b"abc")
    store.close()
    assert store.closed
    assert store.head("a").size == 3  # like the client's closed session


# -- FaultyStore ------------------------------------------------------------------


@pytest.fixture
def faulty() -> FaultyStore[MemoryStore]:
    memory = MemoryStore()
    memory.put("a", DATA, etag="etag-a")
    memory.put("d/b", b"b")
    return FaultyStore(memory)


def test_fail_the_next_calls(faulty: FaultyStore[MemoryStore]) -> None:
    faulty.fail("get_range", StoreUnavailableError("down", status=503), times=2)
    for _ in range(2):
        with pytest.raises(StoreUnavailableError) as info:
            faulty.get_range("a", 0, 9)
        assert info.value.status == 503  # a copy, attributes and all
    assert bytes(faulty.get_range("a", 0, 9)) == DATA[:10]
    # Every call is recorded by the wrapper; only the last one reached the store.
    assert faulty.count("get_range") == 3
    assert faulty.inner.count("get_range") == 1


def test_fail_by_predicate_until_removed(faulty: FaultyStore[MemoryStore]) -> None:
    rule = faulty.fail("get_range", ConnectionResetError(104, "reset"), when=lambda c: c.start == 0)
    faulty.fail("head", AccessDeniedError("denied", status=403), when=lambda c: c.key == "d/b")
    for _ in range(3):
        with pytest.raises(ConnectionResetError):
            faulty.get_range("a", 0, 9)
    assert bytes(faulty.get_range("a", 10, 19)) == DATA[10:20]
    rule.remove()
    assert bytes(faulty.get_range("a", 0, 9)) == DATA[:10]
    assert faulty.head("a").etag == "etag-a"
    with pytest.raises(AccessDeniedError):
        faulty.head("d/b")
    faulty.clear()
    assert faulty.head("d/b").size == 1


def test_listings_fail_page_by_page(faulty: FaultyStore[MemoryStore]) -> None:
    faulty.inner.max_page = 1
    faulty.fail("list_page", StoreUnavailableError("down"), when=lambda c: c.token is not None)
    pages = faulty.list("", "/")
    assert next(pages).objects[0].key == "a"
    with pytest.raises(StoreUnavailableError):
        next(pages)
    faulty.check_access()  # one page: passes
    with pytest.raises(StoreUnavailableError):
        list(faulty.list(""))
    faulty.clear()
    assert len(list(faulty.list(""))) == 2


def test_before_runs_an_action_first(faulty: FaultyStore[MemoryStore]) -> None:
    # The object changes just before the request for byte 1000: that read is refused.
    faulty.before(
        "get_range",
        lambda call: faulty.inner.put("a", b"new" * 1000),
        when=lambda c: c.start == 1000,
    )
    etag = faulty.head("a").etag
    assert bytes(faulty.get_range("a", 0, 9, if_match=etag)) == DATA[:10]
    with pytest.raises(PreconditionFailedError):
        faulty.get_range("a", 1000, 1009, if_match=etag)


def test_corrupt_flips_a_byte_in_every_answer_covering_it(faulty: FaultyStore[MemoryStore]) -> None:
    rule = faulty.corrupt(105, key="a")
    got = bytes(faulty.get_range("a", 100, 109))
    assert got[5] == DATA[105] ^ 0xFF and got[:5] + got[6:] == DATA[100:105] + DATA[106:110]
    buf = bytearray(10)
    faulty.get_range("a", 100, 109, into=memoryview(buf))
    assert buf[5] == DATA[105] ^ 0xFF
    assert bytes(faulty.get_range("a", 0, 99)) == DATA[:100]  # not covering it
    rule.remove()
    assert bytes(faulty.get_range("a", 100, 109)) == DATA[100:110]


def test_a_gate_holds_calls_until_released(faulty: FaultyStore[MemoryStore]) -> None:
    gate = faulty.hold("get_range", when=lambda c: c.start != 0)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(bytes(faulty.get_range("a", n, n))))
        for n in (1, 2, 3)
    ]
    for t in threads:
        t.start()
    assert gate.wait_held(3)
    assert faulty.active("get_range") == 3 and results == []
    assert bytes(faulty.get_range("a", 0, 0)) == DATA[:1]  # not matched: not held
    gate.release()
    for t in threads:
        t.join(5)
    assert sorted(results) == [DATA[1:2], DATA[2:3], DATA[3:4]]
    assert gate.held == 0 and gate.arrived == 3
    # Three held and the one let through, at once.
    assert faulty.max_active("get_range") == 4 and faulty.active("get_range") == 0
    assert bytes(faulty.get_range("a", 5, 5)) == DATA[5:6]  # the gate is gone


def test_a_gate_for_the_next_call_only(faulty: FaultyStore[MemoryStore]) -> None:
    gate = faulty.hold("head", times=1)
    held = threading.Thread(target=faulty.head, args=("a",))
    held.start()
    assert gate.wait_held(1)
    assert faulty.head("d/b").size == 1  # the second call passes
    gate.release()
    held.join(5)
    assert not held.is_alive()


def test_a_forgotten_gate_times_out(faulty: FaultyStore[MemoryStore]) -> None:
    faulty.hold("head", timeout=0.01)
    with pytest.raises(TimeoutError, match="never released"):
        faulty.head("a")


def test_close_releases_every_gate(faulty: FaultyStore[MemoryStore]) -> None:
    gate = faulty.hold("get_range", times=1)
    held = threading.Thread(target=faulty.get_range, args=("a", 0, 0))
    held.start()
    assert gate.wait_held(1)
    faulty.close()
    held.join(5)
    assert not held.is_alive() and faulty.inner.closed


def test_rules_name_real_methods(faulty: FaultyStore[MemoryStore]) -> None:
    with pytest.raises(ValueError, match="list_page"):
        faulty.fail("list", StoreUnavailableError("down"))
    assert faulty.config is faulty.inner.config
    assert faulty.config.store_id == "s3+http://memory.invalid"
    assert faulty.describe("x") == "s3://bkt/x"
