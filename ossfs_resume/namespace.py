"""The bucket as a directory tree, built from ListObjectsV2 pages.

Directories are common prefixes (implicit) and ``dir/`` marker objects; files
take size, mtime and ETag from the listing, so ``ls -l`` and ``find`` cost one
LIST per directory page and no HEAD per file. Listings are cached with a TTL.

A directory is first listed without a delimiter, one page deep: every
subdirectory whose keys all came in that page (keys are sorted, so all but the
ones holding the page's last key) gets its listing from it, and so does the
directory itself when the page is its whole subtree. A walk of a tree of
small directories costs a LIST per thousand keys, not one per directory; a
directory with more below it costs one LIST more than a plain listing.

When the store cannot be reached, a directory whose TTL has run out is answered
from its last successful listing (kept in a bounded LRU beyond the TTL), with one
warning per directory per outage: cached files stay readable offline. A store
that answers (NotFound, AccessDenied, ...) is not an outage: its answer stands.

Concurrency: ``_lock`` guards the caches and the warned sets only; it is
never held during a LIST. Two threads missing the same directory at once may
both list it; the later result simply replaces the earlier one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cachetools

from .errors import StoreUnavailableError
from .objectstore import ObjectMeta, ObjectStore

log = logging.getLogger(__name__)

#: TTL meaning "never expires", for immutable data.
FOREVER = math.inf
_MAX_NAME_BYTES = 255
#: Keys in the one page of a listing without a delimiter (see the module docstring).
SUBTREE_KEYS = 1000


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    key: str  # full object key, or the prefix ending in "/" for a directory
    size: int = 0
    mtime: float = 0.0
    etag: str = ""


def _file_entry(name: str, obj: ObjectMeta) -> Entry:
    return Entry(
        name=name,
        is_dir=False,
        key=obj.key,
        size=obj.size,
        mtime=obj.last_modified,
        etag=obj.etag,
    )


def bad_name_reason(name: str) -> str | None:
    """Why a key segment cannot be a POSIX file name, or None if it can."""
    if name == "":
        return "empty path segment"
    if name in (".", ".."):
        return f"{name!r} segment"
    if "\0" in name:
        return "NUL byte"
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        return f"name longer than {_MAX_NAME_BYTES} bytes"
    return None


class Namespace:
    """Maps mount paths ('a/b', '' for the root) to entries under a key prefix."""

    def __init__(
        self,
        client: ObjectStore,
        prefix: str = "",
        *,
        list_ttl: float = 10.0,
        max_dirs: int = 4096,
        max_stale_dirs: int = 4096,
        subtree_keys: int = SUBTREE_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.subtree_keys = subtree_keys  # 0: plain listings only
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.list_ttl = list_ttl
        self._clock = clock
        self._lock = threading.Lock()
        # Last successful listing of each directory, and when it was made: kept past
        # the TTL to answer from while the store is unreachable.
        self._last: cachetools.LRUCache[str, tuple[dict[str, Entry], float]] = cachetools.LRUCache(
            maxsize=max(1, max_stale_dirs)
        )
        # Directories being answered from their last listing: path -> when it was made.
        self._offline: dict[str, float] = {}
        self._dirs: cachetools.Cache[str, dict[str, Entry]]
        if list_ttl == FOREVER:
            self._dirs = cachetools.LRUCache(maxsize=max_dirs)
        else:
            self._dirs = cachetools.TTLCache(maxsize=max_dirs, ttl=list_ttl, timer=clock)
        self._warned: set[str] = set()

    def key_for(self, path: str) -> str:
        return self.prefix + path.strip("/")

    def listdir(self, path: str) -> dict[str, Entry]:
        """Entries of directory `path` (empty for a directory that does not exist)."""
        path = path.strip("/")
        if self.list_ttl > 0:
            with self._lock:
                cached = self._dirs.get(path)
            if cached is not None:
                return cached
        try:
            if self.list_ttl > 0 and self.subtree_keys > 0:
                entries = self._list_subtree(path)
            else:
                entries = self._list(path)
        except StoreUnavailableError as exc:
            return self._stale(path, exc)
        with self._lock:
            if self.list_ttl > 0:
                self._dirs[path] = entries
            self._last[path] = (entries, self._clock())
            self._offline.pop(path, None)  # back online: a later outage warns again
        return entries

    def _stale(self, path: str, exc: StoreUnavailableError) -> dict[str, Entry]:
        """The last listing of `path`, while the store is unreachable; else `exc` again."""
        with self._lock:
            last = self._last.get(path)
            if last is None:
                raise exc
            entries, listed_at = last
            first = path not in self._offline
            self._offline[path] = listed_at
        if first:
            log.warning(
                "store unreachable; serving the listing of /%s from %.0f s ago (%s)",
                path,
                self._clock() - listed_at,
                exc,
            )
        return entries

    def offline_age(self, path: str) -> float | None:
        """Seconds since the listing of directory `path` was made, if that listing is
        being served because the store is unreachable; None while it is fresh."""
        with self._lock:
            listed_at = self._offline.get(path.strip("/"))
        return None if listed_at is None else self._clock() - listed_at

    def lookup(self, path: str) -> Entry | None:
        """The entry at `path`, or None. The root always exists."""
        path = path.strip("/")
        if not path:
            return Entry(name="", is_dir=True, key=self.prefix)
        parent, _, name = path.rpartition("/")
        parent_entry = self.lookup(parent) if parent else None
        if parent and (parent_entry is None or not parent_entry.is_dir):
            return None
        return self.listdir(parent).get(name)

    def invalidate(self, path: str | None = None) -> None:
        with self._lock:
            if path is None:
                self._dirs.clear()
                self._last.clear()
                self._offline.clear()
            else:
                self._dirs.pop(path.strip("/"), None)
                self._last.pop(path.strip("/"), None)
                self._offline.pop(path.strip("/"), None)

    def _list_subtree(self, path: str) -> dict[str, Entry]:
        """`path`'s entries, caching the listings of the subdirectories that came with them."""
        list_prefix = self.prefix + path + "/" if path else self.prefix
        page = self.client.list_page(list_prefix, "", None, self.subtree_keys)
        last = page.objects[-1].key if page.next_token and page.objects else None
        listings: dict[str, tuple[dict[str, Entry], dict[str, Entry]]] = {}
        # Subdirectories holding names to warn about: not cached from here, so the
        # warning comes when someone lists them (a plain listing), not before.
        noisy: set[str] = set()
        for obj in page.objects:
            segments = obj.key[len(list_prefix) :].split("/")
            files, dirs = listings.setdefault(path, ({}, {}))
            where = path
            for depth, segment in enumerate(segments[:-1]):
                common = list_prefix + "/".join(segments[: depth + 1]) + "/"
                if segment not in dirs:
                    if not self._usable_in(where == path, common, segment):
                        noisy.add(where)
                        break  # nothing below it can be reached through the mount
                    dirs[segment] = Entry(name=segment, is_dir=True, key=common)
                where = f"{where}/{segment}" if where else segment
                files, dirs = listings.setdefault(where, ({}, {}))
            else:
                name = segments[-1]
                if name and not self._usable_in(where == path, obj.key, name):
                    noisy.add(where)
                elif name:  # "": the directory's own marker
                    files[name] = _file_entry(name, obj)
        complete = {}
        for where, (files, dirs) in listings.items():
            where_prefix = self.prefix + where + "/" if where else self.prefix
            # A truncated page: the directories holding its last key may have more keys.
            if last is not None and last.startswith(where_prefix):
                continue
            if where != path and (where in noisy or files.keys() & dirs.keys()):
                continue
            complete[where] = self._merge(files, dirs)
        if last is None and path not in complete:
            complete[path] = {}  # nothing under it at all
        now = self._clock()
        with self._lock:
            for where, entries in complete.items():
                if where != path:  # the caller caches `path`
                    self._dirs[where] = entries
                    self._last[where] = (entries, now)
                    self._offline.pop(where, None)
        if path in complete:
            return complete[path]
        return self._list(path)

    def _list(self, path: str) -> dict[str, Entry]:
        list_prefix = self.prefix + path + "/" if path else self.prefix
        dirs: dict[str, Entry] = {}
        files: dict[str, Entry] = {}
        for page in self.client.list(list_prefix, "/"):
            for common in page.prefixes:
                name = common[len(list_prefix) :].removesuffix("/")
                if self._usable(common, name):
                    dirs[name] = Entry(name=name, is_dir=True, key=common)
            for obj in page.objects:
                name = obj.key[len(list_prefix) :]
                if name == "":
                    continue  # this directory's own marker object
                if self._usable(obj.key, name):
                    files[name] = _file_entry(name, obj)
        return self._merge(files, dirs)

    def _merge(self, files: dict[str, Entry], dirs: dict[str, Entry]) -> dict[str, Entry]:
        """One directory's entries; a name that is both a file and a directory is the
        directory."""
        for name in files.keys() & dirs.keys():
            self._warn_once(
                files[name].key,
                f"key {files[name].key!r} is both an object and a prefix; showing the directory",
            )
            del files[name]
        return {**files, **dirs}

    def _usable_in(self, listed: bool, key: str, name: str) -> bool:
        """`_usable`, warning only for a directory being `listed` (not a subdirectory
        that came with it)."""
        return self._usable(key, name) if listed else bad_name_reason(name) is None

    def _usable(self, key: str, name: str) -> bool:
        reason = bad_name_reason(name)
        if reason is None:
            return True
        self._warn_once(key, f"skipping key {key!r}: {reason} cannot be a file name")
        return False

    def _warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning("%s", message)
