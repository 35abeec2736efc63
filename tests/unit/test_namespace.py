"""Namespace: the directory tree built from ListObjectsV2 pages, with a listing TTL."""

from __future__ import annotations

import logging

import pytest

from ossfs_resume.errors import AccessDeniedError, NoSuchBucketError, StoreUnavailableError
from ossfs_resume.namespace import FOREVER, Entry, Namespace, bad_name_reason
from ossfs_resume.objectstore import FaultyStore, MemoryStore

Store = FaultyStore[MemoryStore]


def _store(keys: dict[str, int] | list[str], page_size: int = 1000) -> Store:
    """The keys in a MemoryStore listing `page_size` entries a page, behind a FaultyStore.

    Sizes as given (else the key's length), ETag "etag-KEY", mtime growing with the key's length.
    """
    memory = MemoryStore(max_page=page_size)
    sizes = dict(keys) if isinstance(keys, dict) else {k: len(k) for k in keys}
    for key, size in sizes.items():
        memory.put(key, b"x" * size, etag=f"etag-{key}", mtime=1_700_000_000.0 + len(key))
    return FaultyStore(memory)


def _listings(store: Store) -> list[tuple[str, str | None]]:
    """(prefix, delimiter) of each listing asked for (its first page), in order."""
    return [(c.key, c.delimiter) for c in store.calls_to("list_page") if c.token is None]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ns(client: Store, prefix: str = "", **kwargs: object) -> Namespace:
    """A namespace of plain (delimited) listings unless `subtree_keys` is given: most tests
    here are about what one directory's listing holds and how long it is kept."""
    kwargs.setdefault("subtree_keys", 0)
    return Namespace(client, prefix, **kwargs)  # type: ignore[arg-type]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_root_listing_files_and_implicit_dirs() -> None:
    client = _store({"a.txt": 5, "b/c.txt": 7, "b/d/e.txt": 9, "z": 1})
    ns = _ns(client)
    entries = ns.listdir("")
    assert set(entries) == {"a.txt", "b", "z"}
    assert entries["a.txt"] == Entry(
        name="a.txt", is_dir=False, key="a.txt", size=5, mtime=1_700_000_005.0, etag="etag-a.txt"
    )
    assert entries["b"] == Entry(name="b", is_dir=True, key="b/")
    assert _listings(client) == [("", "/")]
    sub = ns.listdir("b")
    assert set(sub) == {"c.txt", "d"}
    assert sub["c.txt"].key == "b/c.txt" and sub["c.txt"].size == 7
    assert sub["d"].is_dir and sub["d"].key == "b/d/"
    assert _listings(client)[-1] == ("b/", "/")
    assert ns.listdir("/b/d/") == {
        "e.txt": Entry("e.txt", False, "b/d/e.txt", 9, 1_700_000_009.0, "etag-b/d/e.txt")
    }


def test_marker_object_is_a_directory_not_a_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    client = _store({"dir/": 0, "empty/": 0, "dir/f": 3})
    ns = _ns(client)
    root = ns.listdir("")
    assert root["dir"].is_dir and root["empty"].is_dir
    # Inside, the marker (key == the listed prefix) is not an entry.
    assert set(ns.listdir("dir")) == {"f"}
    assert ns.listdir("empty") == {}
    assert ns.lookup("empty") == Entry("empty", True, "empty/")
    assert _warnings(caplog) == []  # a marker is normal, not a bad key


def test_missing_directory_is_empty() -> None:
    ns = _ns(_store(["a"]))
    assert ns.listdir("nope") == {}
    assert ns.lookup("nope") is None
    assert ns.lookup("nope/deeper") is None


def test_empty_segment_skipped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    client = _store(["a//b", "a/ok", "/lead"])
    ns = _ns(client, list_ttl=0)
    assert set(ns.listdir("")) == {"a"}  # "/lead" gives an empty name at the root
    assert set(ns.listdir("a")) == {"ok"}
    assert set(ns.listdir("a")) == {"ok"}  # listed again (TTL 0): no second warning
    assert set(ns.listdir("")) == {"a"}
    warnings = _warnings(caplog)
    assert len([w for w in warnings if "'a//'" in w]) == 1
    assert len([w for w in warnings if "'/'" in w]) == 1
    assert all("empty path segment" in w for w in warnings)
    assert len(warnings) == 2


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("d/.", "'.'"),
        ("d/..", "'..'"),
        ("d/./x", "'.'"),
        ("d/../x", "'..'"),
        ("d/nul\0byte", "NUL"),
        ("d/" + "n" * 256, "255"),
        ("d/" + "é" * 128, "255"),  # 128 characters but 256 bytes
    ],
)
def test_bad_names_skipped(caplog: pytest.LogCaptureFixture, key: str, reason: str) -> None:
    caplog.set_level(logging.WARNING)
    client = _store([key, "d/good"])
    ns = _ns(client)
    assert set(ns.listdir("d")) == {"good"}
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert reason in warnings[0]


def test_longest_allowed_names_are_kept() -> None:
    ascii_name = "n" * 255
    wide_name = "é" * 127 + "x"  # 255 bytes
    ns = _ns(_store([f"d/{ascii_name}", f"d/{wide_name}", f"{ascii_name}/f"]))
    assert set(ns.listdir("d")) == {ascii_name, wide_name}
    assert ns.lookup(f"{ascii_name}/f") is not None


def test_bad_name_reason() -> None:
    assert bad_name_reason("ok.txt") is None
    assert bad_name_reason("with space") is None
    assert bad_name_reason("...") is None
    assert bad_name_reason(".hidden") is None
    assert bad_name_reason("") is not None
    assert bad_name_reason(".") is not None
    assert bad_name_reason("..") is not None
    assert bad_name_reason("a\0") is not None
    assert bad_name_reason("x" * 256) is not None
    assert bad_name_reason("x" * 255) is None


def test_file_prefix_clash_directory_wins(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    client = _store({"x": 10, "x/inner": 3, "y": 1})
    ns = _ns(client, list_ttl=0)
    entries = ns.listdir("")
    assert entries["x"] == Entry("x", True, "x/")
    assert not entries["y"].is_dir
    assert set(ns.listdir("x")) == {"inner"}
    ns.listdir("")
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "'x'" in warnings[0] and "directory" in warnings[0]
    assert ns.lookup("x/inner") is not None


def test_clash_across_pages(caplog: pytest.LogCaptureFixture) -> None:
    # "x" and "x/" arrive on different pages.
    caplog.set_level(logging.WARNING)
    client = _store(["w", "x", "x/inner"], page_size=2)
    ns = _ns(client)
    entries = ns.listdir("")
    assert client.count("list_page") == 2
    assert entries["x"].is_dir
    assert len(_warnings(caplog)) == 1


def test_listing_pagination_merges_pages() -> None:
    keys = [f"d/file{i:03d}" for i in range(25)] + [f"d/sub{i}/f" for i in range(5)]
    client = _store(keys, page_size=4)
    ns = _ns(client)
    entries = ns.listdir("d")
    assert client.count("list_page") == 8  # 30 entries, 4 per page
    assert len(_listings(client)) == 1
    assert set(entries) == {f"file{i:03d}" for i in range(25)} | {f"sub{i}" for i in range(5)}
    assert sum(e.is_dir for e in entries.values()) == 5


def test_ttl_caches_then_expires() -> None:
    clock = FakeClock()
    client = _store(["a", "d/b"])
    ns = _ns(client, list_ttl=10.0, clock=clock)
    ns.listdir("")
    ns.listdir("/")
    ns.lookup("a")
    clock.now += 9.9
    ns.listdir("")
    assert _listings(client) == [("", "/")]
    clock.now += 0.2
    ns.listdir("")
    assert _listings(client) == [("", "/"), ("", "/")]
    ns.listdir("")
    assert len(_listings(client)) == 2


def test_ttl_sees_new_keys_after_expiry() -> None:
    clock = FakeClock()
    client = _store(["a"])
    ns = _ns(client, list_ttl=5.0, clock=clock)
    assert set(ns.listdir("")) == {"a"}
    client.inner.put("new", b"xxx")
    assert set(ns.listdir("")) == {"a"}  # cached
    clock.now += 6
    assert set(ns.listdir("")) == {"a", "new"}


def test_ttl_zero_lists_every_time() -> None:
    client = _store(["a", "d/b"])
    ns = _ns(client, list_ttl=0)
    for _ in range(3):
        ns.listdir("")
    assert _listings(client) == [("", "/")] * 3


def test_ttl_forever_never_relists() -> None:
    clock = FakeClock()
    client = _store(["a"])
    ns = _ns(client, list_ttl=FOREVER, clock=clock)
    ns.listdir("")
    clock.now += 1e9
    ns.listdir("")
    assert len(_listings(client)) == 1


def test_invalidate() -> None:
    client = _store(["a", "d/b"])
    ns = _ns(client, list_ttl=100.0)
    ns.listdir("")
    ns.listdir("d")
    ns.invalidate("/d/")
    ns.listdir("")
    ns.listdir("d")
    assert _listings(client) == [("", "/"), ("d/", "/"), ("d/", "/")]
    ns.invalidate()
    ns.listdir("")
    ns.listdir("d")
    assert len(_listings(client)) == 5


@pytest.mark.parametrize("prefix", ["data", "data/"])
def test_prefix_mount(prefix: str) -> None:
    client = _store(["data/a.txt", "data/sub/b.txt", "database/x", "other/y"])
    ns = _ns(client, prefix)
    assert ns.prefix == "data/"
    root = ns.listdir("")
    assert set(root) == {"a.txt", "sub"}
    assert root["a.txt"].key == "data/a.txt"
    assert root["sub"].key == "data/sub/"
    assert _listings(client) == [("data/", "/")]
    assert set(ns.listdir("sub")) == {"b.txt"}
    assert _listings(client)[-1] == ("data/sub/", "/")
    entry = ns.lookup("sub/b.txt")
    assert entry is not None and entry.key == "data/sub/b.txt"
    assert ns.lookup("") == Entry("", True, "data/")
    assert ns.key_for("/sub/b.txt") == "data/sub/b.txt"
    assert ns.lookup("x") is None  # "database/x" is not under the mount


def test_lookup_nested_paths() -> None:
    client = _store({"a/b/c/d.txt": 42, "a/b/e": 1, "top": 2})
    ns = _ns(client)
    entry = ns.lookup("a/b/c/d.txt")
    assert entry is not None
    assert entry.key == "a/b/c/d.txt" and entry.size == 42 and not entry.is_dir
    assert ns.lookup("/a/b/c/d.txt/") == entry
    assert ns.lookup("a/b/c") == Entry("c", True, "a/b/c/")
    assert ns.lookup("a/b/nope") is None
    assert ns.lookup("") == Entry("", True, "")
    # A path through a file does not exist.
    assert ns.lookup("top/x") is None
    assert ns.lookup("a/b/e/x") is None
    # Each directory was listed once.
    assert sorted(_listings(client)) == [("", "/"), ("a/", "/"), ("a/b/", "/"), ("a/b/c/", "/")]


def test_list_errors_propagate_and_are_not_cached() -> None:
    client = _store(["a"])
    client.fail("list_page", AccessDeniedError("denied", status=403))
    ns = _ns(client)
    with pytest.raises(AccessDeniedError):
        ns.listdir("")
    client.clear()
    assert set(ns.listdir("")) == {"a"}


# -- offline: the last listing outlives its TTL while the store is unreachable --


def test_unreachable_store_is_answered_from_the_last_listing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    clock = FakeClock()
    client = _store({"a": 1, "d/b": 2, "d/c": 3})
    ns = _ns(client, list_ttl=5.0, clock=clock)
    before = {path: ns.listdir(path) for path in ("", "d")}
    assert ns.offline_age("d") is None
    clock.now += 60
    client.fail("list_page", StoreUnavailableError("cannot reach the store"))
    for _ in range(3):
        assert ns.listdir("d") == before["d"]
        assert ns.lookup("d/b") == before["d"]["b"]
    assert ns.offline_age("d") == 60
    # It tried the store each time (the client's latch keeps that cheap), and said so
    # once per directory.
    assert _listings(client).count(("d/", "/")) == 1 + 3 + 3
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert "store unreachable; serving the listing of /d from 60 s ago" in warnings[0]
    assert "listing of / from 60 s ago" in warnings[1]
    # Back online: fresh listings again, and a later outage warns again.
    client.clear()
    client.inner.put("d/new", b"xxxx")
    assert "new" in ns.listdir("d")
    assert ns.offline_age("d") is None
    clock.now += 60
    client.fail("list_page", StoreUnavailableError("down again"))
    assert "new" in ns.listdir("d")
    assert len(_warnings(caplog)) == 3


def test_unreachable_store_without_a_listing_is_an_error() -> None:
    client = _store(["a", "d/b"])
    ns = _ns(client, list_ttl=5.0)
    ns.listdir("")
    client.fail("list_page", StoreUnavailableError("cannot reach the store"))
    with pytest.raises(StoreUnavailableError):
        ns.listdir("d")
    with pytest.raises(StoreUnavailableError):
        ns.lookup("d/b")


@pytest.mark.parametrize(
    "error",
    [AccessDeniedError("denied", status=403), NoSuchBucketError("gone", status=404)],
)
def test_a_store_that_answers_is_not_an_outage(error: Exception) -> None:
    clock = FakeClock()
    client = _store(["a"])
    ns = _ns(client, list_ttl=5.0, clock=clock)
    ns.listdir("")
    clock.now += 10
    client.fail("list_page", error)
    with pytest.raises(type(error)):
        ns.listdir("")
    assert ns.offline_age("") is None


def test_ttl_zero_still_keeps_the_last_listing_for_outages() -> None:
    client = _store(["a"])
    ns = _ns(client, list_ttl=0)
    ns.listdir("")
    client.fail("list_page", StoreUnavailableError("down"))
    assert set(ns.listdir("")) == {"a"}


def test_stale_listings_are_bounded_and_invalidated() -> None:
    client = _store(["d1/a", "d2/b", "d3/c"])
    ns = _ns(client, list_ttl=0, max_stale_dirs=2)
    for path in ("d1", "d2", "d3"):
        ns.listdir(path)
    client.fail("list_page", StoreUnavailableError("down"))
    with pytest.raises(StoreUnavailableError):
        ns.listdir("d1")  # the least recently listed was pushed out
    assert set(ns.listdir("d3")) == {"c"}
    ns.invalidate("d3")  # e.g. the object changed: its old listing must not come back
    with pytest.raises(StoreUnavailableError):
        ns.listdir("d3")
    assert set(ns.listdir("d2")) == {"b"}


# -- subtree listings: one page without a delimiter lists the subdirectories it covers ----------


def _walk(ns: Namespace, path: str = "") -> dict[str, dict[str, Entry]]:
    """Every directory's listing, reached from `path` as a walk would."""
    out = {path: ns.listdir(path)}
    for name, entry in sorted(out[path].items()):
        if entry.is_dir:
            out.update(_walk(ns, f"{path}/{name}" if path else name))
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("subtree_keys", [3, 7, 1000])
def test_subtree_listings_equal_plain_listings(seed: int, subtree_keys: int) -> None:
    import random

    rng = random.Random(seed)
    segments = ["a", "b", "c", "a.b", "a-b", "é", "", ".", "x y"]
    keys = set()
    for _ in range(rng.randrange(1, 40)):
        depth = rng.randrange(1, 5)
        key = "/".join(rng.choice(segments) for _ in range(depth))
        keys.add(key + rng.choice(["", "", "/"]))  # some directory markers
    keys.discard("")
    plain_store, subtree_store = _store(sorted(keys), page_size=4), _store(sorted(keys), 4)
    plain = _walk(_ns(plain_store))
    subtree = _walk(_ns(subtree_store, subtree_keys=subtree_keys))
    assert subtree == plain, sorted(keys)
    # Never more listings than the plain walk, plus one per directory at most.
    assert len(_listings(subtree_store)) <= 2 * len(_listings(plain_store))


def test_a_tree_of_small_directories_is_walked_with_a_few_listings() -> None:
    keys = [f"t/a{i}/b{j}/f{k}" for i in range(4) for j in range(5) for k in range(10)]  # 200
    client = _store(keys)
    tree = _walk(_ns(client, subtree_keys=60), "t")
    assert len(tree) == 1 + 4 + 20 and all(len(tree[f"t/a{i}"]) == 5 for i in range(4))
    # t/ (truncated: a0 complete, a1 not), t/ plainly, then a1, a2, a3 one page each.
    assert _listings(client) == [
        ("t/", ""),
        ("t/", "/"),
        ("t/a1/", ""),
        ("t/a2/", ""),
        ("t/a3/", ""),
    ]


def test_subtree_listings_expire_and_serve_offline_like_any_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    client = _store(["d/e/f.txt", "d/g.txt"])
    clock = FakeClock()
    ns = _ns(client, subtree_keys=1000, list_ttl=10, clock=clock)
    assert set(ns.listdir("d")) == {"e", "g.txt"}
    assert set(ns.listdir("d/e")) == {"f.txt"}
    assert _listings(client) == [("d/", "")]  # d/e came with d
    clock.now += 11
    client.fail("list_page", StoreUnavailableError("down"))
    assert set(ns.listdir("d/e")) == {"f.txt"}  # expired, store down: the last listing
    assert any("serving the listing of /d/e" in w for w in _warnings(caplog))


def test_a_subtree_listing_warns_only_about_the_directory_listed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    client = _store(["top.txt", "odd/clash", "odd/clash/x", "odd/a//b", "fine/f.txt"])
    ns = _ns(client, subtree_keys=1000)
    assert set(ns.listdir("")) == {"top.txt", "odd", "fine"}
    assert _warnings(caplog) == []  # odd/ was not listed: nothing said about it yet
    assert set(ns.listdir("fine")) == {"f.txt"}  # came with the root's page
    assert set(ns.listdir("odd")) == {"clash", "a"}  # listed now, and warned about
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "'odd/clash' is both an object and a prefix" in warnings[0]
    assert ns.listdir("odd/a") == {}
    assert "skipping key 'odd/a//'" in _warnings(caplog)[-1]
    assert _listings(client) == [("", ""), ("odd/", ""), ("odd/a/", "")]
