"""Prefetch whole objects into the part cache: parallel, resumable, with progress.

The cache's part index is the checkpoint: a part is recorded only once its
data is durable, so after a crash (even ``kill -9``) a rerun fetches only the
parts that are missing. The index is shared safely with a running mount, which
serves the parts fetched here without remounting.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from .cache import PartStore, UncachedParts, object_id
from .engine import ObjectRef, PartFetcher, PartSink
from .errors import CacheWriteError, OssfsError, UsageError
from .objectstore import ObjectMeta, ObjectStore
from .parts import check_threads, part_bounds, part_count
from .progress import AggregateProgress, ProgressTracker, format_bytes
from .shared import PartIdentity

log = logging.getLogger(__name__)

#: Extended attribute a mount exposes on every file, naming its source and cache.
SOURCE_XATTR = "user.ossfs_resume.source"

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class PrefetchResult:
    meta: ObjectMeta
    parts_total: int
    parts_fetched: int
    bytes_fetched: int


class CacheSink:
    """A transfer into the part cache: the engine stores each part; the index is the ledger."""

    into_cache = True

    def __init__(self, cache: PartStore, ref: ObjectRef, name: str) -> None:
        self.cache = cache
        self.ref = ref
        self.name = name

    def accept(self, number: int, data: memoryview) -> None:
        # A part evicted again by a concurrent eviction is not a fault (the cache is
        # smaller than what is being put in it); a disk or index that refuses is.
        if self.cache.has(self.ref.part_id(number)):
            return
        refused = self.cache.writes_refused()
        if refused:
            raise CacheWriteError(
                f"cannot write to the cache at {self.cache.root} ({refused}); "
                f"prefetch of {self.name} stopped"
            )

    def commit(self) -> None:
        return None  # each part was recorded by the cache when it became durable


def prefetch_object(
    client: ObjectStore,
    cache: PartStore,
    meta: ObjectMeta,
    part_size: int,
    *,
    threads: int = 8,
    progress: ProgressCallback | None = None,
) -> PrefetchResult:
    """Fetch every part of `meta` that the cache lacks, `threads` at a time."""
    threads = check_threads(threads)
    oid = cache.note_version(
        client.config.store_id, client.config.bucket, meta.key, meta.etag, meta.size, part_size
    )
    ref = ObjectRef(meta, oid, part_size)
    missing = [n for n in range(ref.parts) if not cache.has(ref.part_id(n))]
    name = client.describe(meta.key)
    log.info(
        "prefetch %s: %d of %d parts cached, fetching %d with %d threads",
        name,
        ref.parts - len(missing),
        ref.parts,
        len(missing),
        threads,
    )
    tracker = ProgressTracker(meta.size, progress)
    tracker.start(meta.size - sum(part_bounds(meta.size, part_size, n)[1] for n in missing))
    engine = PartFetcher(
        client,
        cache,
        max_parallel=threads,
        max_inflight_bytes=2 * threads * part_size,
        max_recent_bytes=0,
    )
    try:
        result = engine.transfer(
            ref, missing, CacheSink(cache, ref, name), threads=threads, progress=tracker.add
        )
    finally:
        engine.shutdown()
    tracker.finish()
    return PrefetchResult(meta, ref.parts, result.parts, result.bytes)


# -- sets of files: directories, prefixes, lists ----------------------------------


def list_prefix(client: ObjectStore, prefix: str) -> list[ObjectMeta]:
    """Every object under `prefix` (recursively, in key order), without directory markers."""
    found: list[ObjectMeta] = []
    for page in client.list(prefix, delimiter=""):
        found.extend(meta for meta in page.objects if not meta.key.endswith("/"))
    return found


def walk_files(root: str) -> list[str]:
    """The files under directory `root`, recursively, sorted as a listing would be.

    Like ``find -xdev``: directories on another file system (a mount inside a
    local directory, or a local directory inside a mount) are not entered.
    """
    device = os.stat(root).st_dev
    found: list[str] = []

    def onerror(exc: OSError) -> None:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror or exc}")

    for top, dirs, files in os.walk(root, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == device)
        found.extend(os.path.join(top, name) for name in sorted(files))
    return found


def read_list_file(path: str) -> list[str]:
    """Entries of a --from-file list: one a line, in order; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UsageError(f"--from-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"--from-file {path}: cannot read it ({reason})") from None
    entries = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            entries.append(entry)
    return entries


def join_key(prefix: str, entry: str) -> str:
    """`entry` of a list resolved against a URL's key `prefix` (taken as a directory)."""
    entry = entry.lstrip("/")
    if not prefix:
        return entry
    return prefix + entry if prefix.endswith("/") else f"{prefix}/{entry}"


@dataclass
class FilePlan:
    """One file of a set: its version, and which of its parts are not where they go yet."""

    client: ObjectStore
    meta: ObjectMeta
    part_size: int
    ref: ObjectRef
    missing: list[int]
    name: str

    @property
    def missing_bytes(self) -> int:
        size, part = self.meta.size, self.part_size
        return sum(part_bounds(size, part, n)[1] for n in self.missing)

    @property
    def cached_bytes(self) -> int:
        return self.meta.size - self.missing_bytes

    @property
    def complete(self) -> bool:
        return not self.missing


def plan_file(
    client: ObjectStore,
    meta: ObjectMeta,
    part_size: int,
    *,
    cache: PartStore | None = None,
    tier: SharedTierLike | None = None,
    record: bool = True,
) -> FilePlan:
    """Which parts of `meta` the cache (or the shared `tier`) lacks.

    With `record`, the version is noted in the cache (dropping an older one's parts);
    without (``--check``), nothing is written.
    """
    cfg = client.config
    if cache is not None and record:
        oid = cache.note_version(
            cfg.store_id, cfg.bucket, meta.key, meta.etag, meta.size, part_size
        )
    else:
        oid = object_id(cfg.store_id, cfg.bucket, meta.key, meta.etag)
    ref = ObjectRef(meta, oid, part_size)
    numbers = range(part_count(meta.size, part_size))
    if tier is not None:
        missing = [n for n in numbers if not tier.has(part_identity(client, meta, part_size, n))]
    elif cache is not None:
        missing = [n for n in numbers if not cache.has(ref.part_id(n))]
    else:
        raise ValueError("plan_file needs a cache or a tier")
    return FilePlan(client, meta, part_size, ref, missing, client.describe(meta.key))


@dataclass(frozen=True)
class SetTotals:
    files: int
    files_complete: int
    size: int
    cached: int

    @classmethod
    def of(cls, plans: Sequence[FilePlan]) -> SetTotals:
        return cls(
            len(plans),
            sum(p.complete for p in plans),
            sum(p.meta.size for p in plans),
            sum(p.cached_bytes for p in plans),
        )

    def text(self, where: str = "cached") -> str:
        """``7 of 9 files complete, 1.2 GiB of 1.5 GiB cached (80%)``."""
        percent = self.cached / self.size if self.size else 1.0
        return (
            f"{self.files_complete} of {self.files} files complete, "
            f"{format_bytes(self.cached)} of {format_bytes(self.size)} {where} ({percent:.0%})"
        )


def check_lines(plans: Sequence[FilePlan], where: str = "cached") -> list[str]:
    """``--check``: a line per file (percent and bytes), then the total."""
    lines = []
    for plan in plans:
        size = plan.meta.size
        percent = plan.cached_bytes / size if size else 1.0
        lines.append(f"{percent:4.0%}  {plan.cached_bytes} of {size} bytes {where}  {plan.name}")
    lines.append(f"total: {SetTotals.of(plans).text(where)}")
    return lines


def check_fits(plans: Sequence[FilePlan], limit: int) -> None:
    """Refuse a set the cache cannot hold at once: it would evict itself while filling."""
    total = sum(p.meta.size for p in plans)
    if total > limit:
        raise UsageError(
            f"the set is {format_bytes(total)}, the cache limit {format_bytes(limit)}: "
            "raise --cache-size or prefetch less"
        )


@dataclass
class SetResult:
    files_fetched: int = 0
    parts_fetched: int = 0
    bytes_fetched: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, one-line reason)


def start_progress(progress: AggregateProgress, plans: Sequence[FilePlan]) -> None:
    """Start the display from what `plans` hold and what is already there."""
    totals = SetTotals.of(plans)
    progress.start(
        files_total=totals.files,
        files_done=totals.files_complete,
        bytes_total=totals.size,
        bytes_done=totals.cached,
    )


def prefetch_set(
    plans: Sequence[FilePlan],
    cache: PartStore,
    *,
    files: int = 4,
    threads: int = 8,
    progress: AggregateProgress | None = None,
    make_sink: Callable[[FilePlan], PartSink] | None = None,
    stop: threading.Event | None = None,
) -> SetResult:
    """Fetch the missing parts of every file in `plans`, `files` files at a time.

    One engine per store client (all files of one bucket share it) with `threads`
    fetch workers, so `threads` bounds the GETs in flight however many files run;
    files start in the order given (access order). A file that fails (it changed,
    it vanished) is reported in the result and the others go on; a sink that
    refuses (a full cache, a tier that says no) stops the whole set. The cache
    index is the checkpoint: a rerun plans again and fetches only what is missing.
    """
    threads = check_threads(threads)
    files = check_threads(files)
    stop = stop or threading.Event()
    sink_for = make_sink or (lambda plan: CacheSink(cache, plan.ref, plan.name))
    engines: dict[int, PartFetcher] = {}
    result = SetResult()
    lock = threading.Lock()
    fatal: list[BaseException] = []
    if progress is not None and not progress.started:  # else: the caller's set is larger
        start_progress(progress, plans)
    todo = [p for p in plans if p.missing]
    for plan in todo:
        if id(plan.client) not in engines:
            engines[id(plan.client)] = PartFetcher(
                plan.client,
                cache,
                max_parallel=threads,
                max_inflight_bytes=2 * threads * plan.part_size,
                max_recent_bytes=0,
            )

    def numbers(plan: FilePlan) -> Iterator[int]:
        for n in plan.missing:
            if stop.is_set():
                return
            yield n

    def run(plan: FilePlan) -> None:
        if stop.is_set():
            return
        engine = engines[id(plan.client)]
        add = progress.add if progress is not None else None
        try:
            moved = engine.transfer(
                plan.ref, numbers(plan), sink_for(plan), threads=threads, progress=add
            )
        except CacheWriteError as exc:
            stop.set()
            with lock:
                fatal.append(exc)
            return
        except OssfsError as exc:
            log.warning("prefetch of %s failed: %s", plan.name, exc)
            with lock:
                result.failed.append((plan.name, str(exc)))
            return
        with lock:
            result.parts_fetched += moved.parts
            result.bytes_fetched += moved.bytes
            if moved.parts == len(plan.missing):
                result.files_fetched += 1
        if moved.parts == len(plan.missing) and progress is not None:
            progress.file_done()

    pool = ThreadPoolExecutor(max_workers=files, thread_name_prefix="prefetch-file")
    futures: list[Future[None]] = []
    try:
        futures = [pool.submit(run, plan) for plan in todo]
        for fut in futures:
            fut.result()
    except BaseException:
        stop.set()  # Ctrl-C: no new parts or files; parts being fetched are kept
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for engine in engines.values():
            engine.shutdown()
    if fatal:
        raise fatal[0]
    return result


# -- the shared tier ---------------------------------------------------------------


class SharedTierLike(Protocol):
    """What prefetch needs of ``ossfs_resume.shared.SharedTier``."""

    name: str

    def put(self, ident: Any, data: Any) -> bool: ...
    def has(self, ident: Any) -> bool: ...


def part_identity(
    client: ObjectStore, meta: ObjectMeta, part_size: int, number: int
) -> PartIdentity:
    cfg = client.config
    return PartIdentity(
        store_id=cfg.store_id,
        bucket=cfg.bucket,
        key=meta.key,
        etag=meta.etag,
        part_size=part_size,
        number=number,
    )


class SharedTierSink:
    """A transfer into the shared part tier instead of the local disk.

    The engine fetches each part from the origin (``into_cache`` is False: nothing
    is written locally) and `accept` puts it in the tier, synchronously: the tier
    itself is the ledger, so a rerun skips the parts ``tier.has`` already has.
    """

    into_cache = False

    def __init__(self, tier: SharedTierLike, plan: FilePlan) -> None:
        self.tier = tier
        self.plan = plan

    def accept(self, number: int, data: memoryview) -> None:
        plan = self.plan
        ident = part_identity(plan.client, plan.meta, plan.part_size, number)
        try:
            stored = self.tier.put(ident, data)
        except (OSError, OssfsError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CacheWriteError(
                f"the shared tier {self.tier.name} refused part {number} of {plan.name} "
                f"({reason}); prefetch stopped"
            ) from None
        # Write-if-absent: False is fine if another node put the part first.
        if not stored and not self.tier.has(ident):
            raise CacheWriteError(
                f"the shared tier {self.tier.name} refused part {number} of {plan.name}; "
                "prefetch stopped"
            )

    def commit(self) -> None:
        return None  # each put was synchronous


def prefetch_set_to_tier(
    plans: Sequence[FilePlan],
    tier: SharedTierLike,
    *,
    files: int = 4,
    threads: int = 8,
    progress: AggregateProgress | None = None,
    stop: threading.Event | None = None,
) -> SetResult:
    """`prefetch_set` into the shared tier: plans made with ``plan_file(..., tier=tier)``."""
    local = UncachedParts("(no local cache)", "filling the shared tier", warn=False)
    return prefetch_set(
        plans,
        local,
        files=files,
        threads=threads,
        progress=progress,
        make_sink=lambda plan: SharedTierSink(tier, plan),
        stop=stop,
    )


@dataclass(frozen=True)
class MountedSource:
    """What a mount says about one of its files (via SOURCE_XATTR)."""

    protocol: str
    endpoint: str
    bucket: str
    key: str
    region: str | None
    signature_version: str
    addressing: str
    anonymous: bool
    cache_dir: str
    part_size: int

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_path(cls, path: str) -> MountedSource:
        try:
            raw = os.getxattr(path, SOURCE_XATTR)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except OSError:
            raise UsageError(
                f"{path} is not a file in an ossfs-resume mount; "
                "use oss://BUCKET/KEY with --endpoint and --cache-dir instead"
            ) from None
        return cls(**json.loads(raw))
