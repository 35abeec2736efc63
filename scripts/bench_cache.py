#!/usr/bin/env python3
"""Part-cache scale benchmark: how the cache's costs grow with the number of parts it holds.

For each ``--parts N`` this builds a cache dir of N parts through the cache's own
pieces (the ``PartFiles`` layout, ``PartIndex.add_parts`` in large transactions):
part files are sparse (``ftruncate``), so each holds `length` zero bytes and its
row carries the CRC-64 of `length` zeros, which is what a checksum check reads.
Objects have ``--parts-per-object`` parts (the last one shorter), with varied
access times and hit counts, so the eviction order means something. The limit
is set to exactly the bytes built, so the cache starts at its limit.

Then, each on a fresh ``PartCache`` (like the next process to open the dir):

1. open: ``PartCache(root)`` on the existing index (the first, and the median of 5);
2. first read: ``read_into`` of 4 KiB of a part not yet verified by the instance
   (time to first byte: index lookup, open, CRC-64 of the whole part), and the
   same read again (verified: no re-read);
3. ``stats()``;
4. the start-up check, ``check_consistency()`` run synchronously (total time);
5. first reads while ``check_consistency(background=True)`` runs (is it off the
   read path?), and how long that background check took;
6. one eviction pass, ``evictor.evict_pass()``, from the limit down to 90% of it,
   while two writer threads write parts: one through the reservation step
   (``evictor.reserve`` + ``PartIndex.commit_part``, a sparse file in between,
   not timed) and one through ``PartCache.store`` (real data of ``--store-size``,
   written and fsynced). Reports each one's p99 and longest wait, and the same
   writers afterwards with no eviction running, as a baseline. The writers'
   own requests for a background pass are switched off, so the figure is one pass.

Prints a table (several N: with the growth of each figure per 10x of parts);
``--json`` prints the results as JSON on stdout and the table on stderr.
A benchmark, not a test: nothing here asserts a speed.

    PYTHONPATH=. .venv/bin/python scripts/bench_cache.py --parts 10000 100000 [--json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ossfs_resume.cache import INDEX_NAME, PartCache, PartId, PartRecord, name_id, object_id
from ossfs_resume.cache.eviction import LOW_WATER
from ossfs_resume.cache.index import ObjectRow, PartIndex
from ossfs_resume.cache.partfiles import PartFiles
from ossfs_resume.cache.writers import writer_token
from ossfs_resume.checksum import crc64, crc64_combine

log = logging.getLogger("bench_cache")
T = TypeVar("T")

STORE_ID = "bench://cache"
BUCKET = "bench"
#: Rows per build transaction.
BUILD_BATCH = 50_000
#: Parts read in each first-read figure (different parts each time).
READS = 16
READ_SIZE = 4096
OPENS = 5
#: Writes per writer in the no-eviction baseline.
BASELINE_WRITES = 100
DAY = 86400.0


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str  # "s" (shown in ms), "count", "bytes"


FIGURES = [
    Figure("build_files_s", "build: sparse part files", "s"),
    Figure("build_index_s", "build: index rows (add_parts)", "s"),
    Figure("index_bytes", "index.db size", "bytes"),
    Figure("open_first_s", "1. open PartCache (first)", "s"),
    Figure("open_median_s", "1. open PartCache (median of 5)", "s"),
    Figure("first_read_median_s", "2. first read, TTFB (median)", "s"),
    Figure("first_read_max_s", "2. first read, TTFB (max)", "s"),
    Figure("verified_read_s", "2. read again (verified)", "s"),
    Figure("stats_s", "3. stats()", "s"),
    Figure("check_s", "4. check_consistency() (sync)", "s"),
    Figure("check_dropped", "4. rows dropped by the check", "count"),
    Figure("read_during_check_median_s", "5. first read during bg check (median)", "s"),
    Figure("read_during_check_max_s", "5. first read during bg check (max)", "s"),
    Figure("bg_check_s", "5. background check, total", "s"),
    Figure("evict_pass_s", "6. eviction pass, 10% of limit", "s"),
    Figure("evicted_parts", "6. parts evicted by the pass", "count"),
    Figure("reserve_during_pass_p99_s", "6. reserve+commit during pass (p99)", "s"),
    Figure("reserve_during_pass_max_s", "6. reserve+commit during pass (max)", "s"),
    Figure("reserve_during_pass_n", "6. reserve+commit wholly in the pass", "count"),
    Figure("store_during_pass_p99_s", "6. store() during pass (p99)", "s"),
    Figure("store_during_pass_max_s", "6. store() during pass (max)", "s"),
    Figure("store_during_pass_n", "6. store() wholly in the pass", "count"),
    Figure("reserve_idle_p99_s", "6. reserve+commit, no eviction (p99)", "s"),
    Figure("reserve_idle_max_s", "6. reserve+commit, no eviction (max)", "s"),
    Figure("store_idle_p99_s", "6. store(), no eviction (p99)", "s"),
    Figure("store_idle_max_s", "6. store(), no eviction (max)", "s"),
]


def parse_size(text: str) -> int:
    """Bytes from "8M", "64K", "1G" or a plain number (binary multiples)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@functools.cache
def _crc_of_zero_power(power: int) -> int:
    """CRC-64 of 2**power zero bytes."""
    if power == 0:
        return crc64(bytes(1))
    half = _crc_of_zero_power(power - 1)
    return crc64_combine(half, half, 1 << (power - 1))


@functools.cache
def zeros_crc(length: int) -> int:
    """CRC-64 of `length` zero bytes (what a sparse file of that length holds), in
    O(log length) combines instead of reading `length` bytes."""
    crc = 0
    for power in range(length.bit_length()):
        if length >> power & 1:
            crc = crc64_combine(crc, _crc_of_zero_power(power), 1 << power)
    return crc


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@dataclass
class Built:
    total_bytes: int = 0
    objects: int = 0
    sample: list[PartId] = field(default_factory=list)  # full-size parts for the reads
    build_files_s: float = 0.0
    build_index_s: float = 0.0


def build(root: Path, parts: int, part_size: int, per_object: int, seed: int) -> Built:
    """A cache dir of `parts` parts: sparse files first, then their rows (data before row,
    as the cache itself does), `BUILD_BATCH` rows per transaction."""
    rng = random.Random(seed)
    files = PartFiles(root)
    root.mkdir(mode=0o700)
    os.makedirs(files.dir, mode=0o700, exist_ok=True)
    index = PartIndex(root / INDEX_NAME)
    now = time.time()
    built = Built(objects=math.ceil(parts / per_object))
    # Candidates for the timed reads: random parts; the full-size ones among them are read.
    sampled = set(rng.sample(range(parts), min(parts, 4 * READS)))
    rows: list[tuple[PartId, PartRecord]] = []
    objects: list[ObjectRow] = []
    t_files = t_rows = 0.0

    def flush() -> float:
        started = time.perf_counter()
        with index.writing() as conn:
            PartIndex.add_parts(conn, rows)
            for row in objects:
                PartIndex.put_object(conn, row)
        rows.clear()
        objects.clear()
        return time.perf_counter() - started

    try:
        done = 0
        for o in range(built.objects):
            key = f"data/object-{o:07d}"
            oid = object_id(STORE_ID, BUCKET, key, "etag")
            count = min(per_object, parts - done)
            tail = rng.randrange(1, 17) * part_size // 16 if count > 1 else part_size
            size = (count - 1) * part_size + tail
            objects.append(ObjectRow(name_id(STORE_ID, BUCKET, key), oid, BUCKET, key, "etag",
                                     size, (part_size,)))  # fmt: skip
            # Ages over 30 days, a part after another as a sequential read goes; 20% of the
            # objects never read (prefetched), half read in one window, the rest hot.
            atime = now - rng.uniform(0, 30 * DAY)
            kind = rng.random()
            started = time.perf_counter()
            obj_dir = files.object_dir(oid)
            os.makedirs(obj_dir, mode=0o700, exist_ok=True)
            for number in range(count):
                pid = PartId(oid, part_size, number)
                length = tail if number == count - 1 else part_size
                fd = os.open(files.path(pid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, length)
                finally:
                    os.close(fd)
                hits = 0 if kind < 0.2 else 1 if kind < 0.7 else rng.randrange(2, 50)
                rows.append((pid, PartRecord(length, zeros_crc(length), atime + number, hits)))
                built.total_bytes += length
                if done + number in sampled and length == part_size:
                    built.sample.append(pid)
            t_files += time.perf_counter() - started
            done += count
            if len(rows) >= BUILD_BATCH:
                t_rows += flush()
                log.info("  %d of %d parts", done, parts)
        if rows or objects:
            t_rows += flush()
    finally:
        index.close()
    built.build_files_s, built.build_index_s = t_files, t_rows
    rng.shuffle(built.sample)
    del built.sample[2 * READS :]
    return built


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def first_reads(cache: PartCache, pids: list[PartId]) -> list[float]:
    """Time to first byte of each part, none verified by `cache` yet."""
    buf = memoryview(bytearray(READ_SIZE))
    times = []
    for pid in pids:
        elapsed, n = timed(lambda pid=pid: cache.read_into(pid, 0, buf))
        if n != READ_SIZE:
            raise SystemExit(f"read of cached part {pid} failed ({n}): the bench is broken")
        times.append(elapsed)
    return times


@dataclass
class Writer:
    """A thread writing new parts until stopped (or `count` writes), timing each."""

    name: str
    write: Callable[[int], float]  # write part number i; returns the time that counts
    count: int | None = None
    times: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # perf_counter start, end
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set() and (self.count is None or i < self.count):
                started = time.perf_counter()
                self.times.append(self.write(i))
                self.spans.append((started, time.perf_counter()))
                i += 1
        except BaseException as exc:
            self.error = exc

    def during(self, start: float, end: float) -> tuple[list[float], int]:
        """Times of the writes that overlapped [start, end], and how many ran wholly in it."""
        times = [
            t for t, (a, b) in zip(self.times, self.spans, strict=True) if b > start and a < end
        ]
        inside = sum(1 for a, b in self.spans if a >= start and b <= end)
        return times, inside

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"writer {self.name} failed") from self.error


def writers(cache: PartCache, index: PartIndex, part_size: int, store_size: int, tag: str,
            count: int | None = None) -> tuple[Writer, Writer]:  # fmt: skip
    """Two writers of new objects: the reservation step, and the whole store()."""
    token = writer_token()
    reserve_oid = object_id(STORE_ID, BUCKET, f"written/{tag}/reserved", "etag")
    store_oid = object_id(STORE_ID, BUCKET, f"written/{tag}/stored", "etag")
    os.makedirs(cache.object_dir(reserve_oid), mode=0o700, exist_ok=True)
    data = os.urandom(store_size)

    def reserve(i: int) -> float:
        pid = PartId(reserve_oid, part_size, i)
        record = PartRecord(part_size, zeros_crc(part_size), time.time(), 0)
        started = time.perf_counter()
        if not cache.evictor.reserve(pid, record, token):
            raise RuntimeError(f"{pid} was already there")
        reserved = time.perf_counter()
        fd = os.open(cache.part_path(pid), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, part_size)
        finally:
            os.close(fd)
        committing = time.perf_counter()
        if not index.commit_part(pid, token):
            raise RuntimeError(f"the reservation of {pid} was dropped")
        return reserved - started + time.perf_counter() - committing

    def store(i: int) -> float:
        pid = PartId(store_oid, part_size, i)
        elapsed, ok = timed(lambda: cache.store(pid, data))
        if not ok:
            raise RuntimeError(f"store of {pid} refused")
        return elapsed

    return (
        Writer(f"reserve-{tag}", reserve, count),
        Writer(f"store-{tag}", store, count),
    )


def wait_for_thread(name: str) -> None:
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join()


def measure(root: Path, n: int, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {"parts": n}
    log.info("N=%d: building %d parts in %s", n, n, root)
    built = build(root, n, args.part_size, args.parts_per_object, args.seed)
    out["build_files_s"] = built.build_files_s
    out["build_index_s"] = built.build_index_s
    out["objects"] = built.objects
    out["total_bytes"] = built.total_bytes
    # The limit is the bytes built: the cache is at its limit. No free-space floor, so
    # the disk's free space (sparse files take none) never decides anything.
    PartCache(root, max_bytes=built.total_bytes, min_free_bytes=0).close()
    out["index_bytes"] = sum(
        p.stat().st_size for p in root.iterdir() if p.name.startswith(INDEX_NAME)
    )
    half = len(built.sample) // 2
    if half < 2:
        raise SystemExit(f"only {len(built.sample)} full-size parts sampled: use more parts")
    reads, reads_during_check = built.sample[:half], built.sample[half:]

    log.info("N=%d: open, first reads, stats", n)
    opens = []
    for _ in range(OPENS):
        elapsed, cache = timed(lambda: PartCache(root))
        opens.append(elapsed)
        cache.close()
    out["open_first_s"] = opens[0]
    out["open_median_s"] = statistics.median(opens)

    cache = PartCache(root)
    try:
        times = first_reads(cache, reads)
        out["first_read_median_s"] = statistics.median(times)
        out["first_read_max_s"] = max(times)
        out["verified_read_s"] = statistics.median(first_reads(cache, reads))
        elapsed, stats = timed(cache.stats)
        out["stats_s"] = elapsed
        if stats["parts"] != n:
            raise SystemExit(f"stats() counts {stats['parts']} parts, not {n}")
    finally:
        cache.close()

    log.info("N=%d: start-up check", n)
    cache = PartCache(root)
    try:
        elapsed, dropped = timed(cache.check_consistency)
        out["check_s"] = elapsed
        out["check_dropped"] = dropped
    finally:
        cache.close()

    cache = PartCache(root)
    try:
        started = time.perf_counter()
        cache.check_consistency(background=True)
        times = first_reads(cache, reads_during_check)
        still_running = any(t.name == "cache-check" for t in threading.enumerate())
        wait_for_thread("cache-check")
        out["bg_check_s"] = time.perf_counter() - started
        out["read_during_check_median_s"] = statistics.median(times)
        out["read_during_check_max_s"] = max(times)
        if not still_running:
            log.warning("N=%d: the background check ended before the reads did", n)
    finally:
        cache.close()

    log.info("N=%d: eviction pass with writers", n)
    cache = PartCache(root)
    index = PartIndex(root / INDEX_NAME)
    try:
        # One pass, timed here: the writers' reservations must not start passes of their own.
        cache.evictor.kick = lambda: None  # type: ignore[method-assign]
        busy = writers(cache, index, args.part_size, args.store_size, "pass")
        for w in busy:
            w.start()
        while not all(w.times for w in busy):  # both writing before the pass starts
            time.sleep(0.001)
        started = time.perf_counter()
        evicted, _freed = cache.evictor.evict_pass()
        ended = time.perf_counter()
        used = cache.totals().bytes
        for w in busy:
            w.stop()
        out["evict_pass_s"] = ended - started
        out["evicted_parts"] = evicted
        for w, name in zip(busy, ("reserve", "store"), strict=True):
            times, inside = w.during(started, ended)
            out[f"{name}_during_pass_p99_s"] = p99(times)
            out[f"{name}_during_pass_max_s"] = max(times)
            out[f"{name}_during_pass_n"] = inside
        log.info(
            "N=%d: after the pass: %.1f%% of the limit (target %.0f%%)",
            n,
            100 * used / cache.max_bytes,
            100 * LOW_WATER,
        )
        # Few enough writes that they stay under the limit: no eviction at all.
        count = min(BASELINE_WRITES, max(10, n // 40))
        idle = writers(cache, index, args.part_size, args.store_size, "idle", count)
        for w in idle:
            w.start()
        for w, name in zip(idle, ("reserve", "store"), strict=True):
            w.join()
            out[f"{name}_idle_p99_s"] = p99(w.times)
            out[f"{name}_idle_max_s"] = max(w.times)
    finally:
        index.close()
        cache.close()
    return out


def show(value: float, unit: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if unit == "s":
        return f"{value * 1000:.3f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "bytes":
        return f"{value / (1 << 20):.1f} MiB"
    return f"{value:.0f}"


def growth(a: float, b: float, na: int, nb: int) -> str:
    """Factor per 10x of parts between two runs: (b/a) ** (1 / log10(nb/na))."""
    if not a or not b or math.isnan(a) or math.isnan(b) or nb == na:
        return "-"
    return f"x{(b / a) ** (1 / math.log10(nb / na)):.2f}"


def table(results: list[dict[str, float]], args: argparse.Namespace) -> Iterator[str]:
    ns = [int(r["parts"]) for r in results]
    head = ["figure", *(f"N={n:,}" for n in ns)]
    head += [f"per 10x {a:,}->{b:,}" for a, b in itertools.pairwise(ns)]
    rows = [head]
    for fig in FIGURES:
        row = [fig.label, *(show(r[fig.key], fig.unit) for r in results)]
        row += [
            growth(a[fig.key], b[fig.key], int(a["parts"]), int(b["parts"]))
            for a, b in itertools.pairwise(results)
        ]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    yield (
        f"Part cache at scale: {args.part_size >> 20} MiB parts (sparse), "
        f"{args.parts_per_object} per object, store() of {args.store_size >> 10} KiB; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs."
    )
    yield ""
    for i, row in enumerate(rows):
        yield "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        if i == 0:
            yield "|" + "|".join("-" * (w + 2) for w in widths) + "|"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", type=int, nargs="+", required=True, help="cache sizes in parts (several: growth)"
    )
    parser.add_argument("--part-size", type=parse_size, default=parse_size("8M"))
    parser.add_argument("--parts-per-object", type=int, default=16)
    parser.add_argument(
        "--store-size", type=parse_size, default=parse_size("64K"), help="data per store()"
    )
    parser.add_argument("--dir", type=Path, help="make the cache dirs under DIR (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the cache dirs")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("ossfs_resume").setLevel(logging.WARNING)
    if args.part_size < 16 or args.parts_per_object < 1 or min(args.parts) < 4 * READS:
        parser.error(f"need a part size >= 16, >= 1 part per object and >= {4 * READS} parts")

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    results: list[dict[str, float]] = []
    try:
        for n in sorted(args.parts):
            st = os.statvfs(work)
            if st.f_favail < n * 1.1 + n / args.parts_per_object + 1000:
                raise SystemExit(f"{work}: {st.f_favail} free inodes, not enough for {n} parts")
            root = work / f"cache-{n}"
            try:
                results.append(measure(root, n, args))
            finally:
                if not args.keep:
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        if args.keep:
            log.info("kept the cache dirs in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    lines = "\n".join(table(results, args))
    if args.json:
        print(lines, file=sys.stderr)
        meta = {
            "part_size": args.part_size,
            "parts_per_object": args.parts_per_object,
            "store_size": args.store_size,
            "loadavg": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
        json.dump({"meta": meta, "results": results}, sys.stdout, indent=2)
        print()
    else:
        print(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
