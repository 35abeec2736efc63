"""Maintenance over the index and the part files: stats, verify, clear, the start-up
sweep, and migrating the index of earlier versions.

Every pass pages through the index by key (O(log n) per page) and changes it
in short transactions, so a mount sharing the cache dir keeps reading and
writing while these run. Files go with their rows, inside one transaction:
a crash leaves at most rows without files, which the sweep drops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

from ..parts import PartRecord
from .eviction import Limits
from .index import ObjectRow, PartId, PartIndex
from .partfiles import PartFiles
from .writers import writer_alive

log = logging.getLogger("ossfs_resume.cache")

#: Rows per page (reads) and per transaction (changes).
PAGE = 512
CHANGE_BATCH = 128


def cache_stats(index: PartIndex, limits: Limits) -> dict[str, int | float]:
    """Totals kept by triggers and counters: O(1) whatever the cache's size."""
    totals = index.totals()
    reserved = index.writers()
    hits = int(index.setting("stat:hits") or 0)
    misses = int(index.setting("stat:misses") or 0)
    pending = sum(reserved.values())
    return {
        "objects": totals.objects,
        "parts": totals.parts,
        "bytes": totals.bytes - pending,
        "bytes_being_written": pending,
        "limit_bytes": limits.max_bytes,
        "min_free_bytes": limits.min_free_bytes,
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "bytes_fetched": int(index.setting("stat:fetched") or 0),
    }


def _file_matches(files: PartFiles, pid: PartId, rec: PartRecord) -> bool:
    try:
        handle = files.open(pid, rec.length)
    except OSError:
        return False
    try:
        return files.check(handle, rec)
    except OSError:
        return False
    finally:
        handle.file.close()


def verify_parts(index: PartIndex, files: PartFiles) -> tuple[int, list[PartId]]:
    """Check every part's CRC-64; drop the bad ones. A part evicted while being checked
    (another process's eviction) is not bad: it is confirmed under the write lock."""
    checked, bad = 0, []
    after: PartId | None = None
    while page := index.scan(after, PAGE):
        after = page[-1][0]
        for pid, rec in page:
            if isinstance(rec, str):
                continue  # being written right now
            checked += 1
            if _file_matches(files, pid, rec):
                continue
            with index.writing() as conn:
                now = index.part_in(conn, pid)  # sees evictions committed meanwhile
                if now is None or now.crc != rec.crc or _file_matches(files, pid, now):
                    checked -= 1 if now is None else 0
                    continue
                files.unlink(pid)
                index.delete_part(conn, pid)
            bad.append(pid)
    return checked, bad


def drop_object_parts(index: PartIndex, files: PartFiles, oid: str) -> int:
    """Delete every part of one object version, files with rows; returns parts dropped."""
    dropped = 0
    while True:
        rows = list(index.parts_of(oid))[:CHANGE_BATCH]
        if not rows:
            break
        with index.writing() as conn:
            for pid in rows:
                files.unlink(pid)
                index.delete_part(conn, pid)
                dropped += 1
    files.remove_object(oid)
    return dropped


def clear_all(index: PartIndex, files: PartFiles) -> int:
    """Forget every part and object, a batch per transaction; returns parts dropped."""
    dropped = 0
    while page := index.scan(None, CHANGE_BATCH):
        with index.writing() as conn:
            for pid, _ in page:
                files.unlink(pid)
                index.delete_part(conn, pid)
                dropped += 1
    while names := index.object_names("", CHANGE_BATCH):
        with index.writing() as conn:
            for name in names:
                index.delete_object(conn, name)
    for _oid, obj_dir in files.object_dirs():
        files.remove_if_empty(obj_dir)
    return dropped


def sweep(index: PartIndex, files: PartFiles) -> int:
    """The start-up check. Returns the rows dropped because their data was missing.

    1. Reservations of writers that died: rows and files go.
    2. Rows whose file is missing or has the wrong length: rows go.
    3. Part files no row accounts for, and temp files of dead writers: files go.
    """
    for writer in index.writers():
        if writer_alive(writer):
            continue
        for pid in index.reservations_of(writer):
            with index.writing() as conn:
                if index.delete_part(conn, pid, writer=writer):
                    files.unlink(pid)
    dropped = 0
    after: PartId | None = None
    while page := index.scan(after, PAGE):
        after = page[-1][0]
        for pid, rec in page:
            if isinstance(rec, str):
                continue
            if files.size(pid) == rec.length:
                continue
            with index.writing() as conn:
                if index.row_state(conn, pid) != "ready":
                    continue
                size = files.size(pid)  # again, under the lock: a writer may have been quicker
                if size == rec.length:
                    continue
                log.warning(
                    "cached part %s: data %s; dropping its index row",
                    files.path(pid),
                    "missing" if size < 0 else f"has {size} bytes, not {rec.length}",
                )
                files.unlink(pid)
                index.delete_part(conn, pid)
                dropped += 1
    orphans = temps = 0
    for oid, obj_dir in files.object_dirs():
        on_disk, temp_files = files.listing(obj_dir)
        for path, writer in temp_files:
            if not writer_alive(writer):
                with contextlib.suppress(OSError):
                    path.unlink()
                    temps += 1
        if on_disk:
            known = index.parts_of(oid)
            strays = [pid for pid in on_disk if pid not in known]
            if strays:
                # Under the write lock: no writer can reserve one of these names meanwhile
                # (a reservation is committed before its file appears).
                with index.writing() as conn:
                    for pid in strays:
                        if index.row_state(conn, pid) is None:
                            files.unlink(pid)
                            orphans += 1
        elif not temp_files:
            files.remove_if_empty(obj_dir)
    if orphans or temps:
        log.warning(
            "removed %d part files that no index row accounted for and %d temp files of "
            "writers that died",
            orphans,
            temps,
        )
    return dropped


def migrate_legacy_index(root: Path, index: PartIndex) -> None:
    """Bring the rows of an earlier version's index (``root/index/cache.db``) into `index`.

    That index stored our rows as plain text (never unpickled here); anything
    else in it is ignored. The old directory is removed once its rows are in.
    """
    legacy = root / "index" / "cache.db"
    if not legacy.is_file():
        return
    try:
        old = sqlite3.connect(f"file:{legacy}?mode=ro", uri=True)
        try:
            rows = old.execute(
                "SELECT key, value FROM Cache WHERE typeof(key) = 'text' AND typeof(value) = 'text'"
            ).fetchall()
        finally:
            old.close()
    except sqlite3.Error as exc:
        log.warning("the earlier cache index %s cannot be read (%s); ignoring it", legacy, exc)
        return
    parts = objects = 0
    with index.writing() as conn:
        for key, value in rows:
            if key.startswith("p:"):
                try:
                    _, oid, part_size, number = key.split(":")
                    fields = value.split(":")
                    rec = PartRecord(
                        int(fields[0]),
                        int(fields[1]),
                        float(fields[2]) if len(fields) > 2 else 0.0,
                        int(fields[3]) if len(fields) > 3 else 0,
                    )
                    pid = PartId(oid, int(part_size), int(number))
                except (ValueError, IndexError):
                    continue
                if index.row_state(conn, pid) is None:
                    index.reserve(conn, pid, rec, "migrating")
                    conn.execute(
                        "UPDATE parts SET writer = NULL WHERE oid = ? AND part_size = ? "
                        "AND number = ?",
                        (pid.object_id, pid.part_size, pid.number),
                    )
                    parts += 1
            elif key.startswith("o:"):
                try:
                    obj = json.loads(value)
                    row = ObjectRow(
                        key[2:],
                        obj["oid"],
                        obj["bucket"],
                        obj["key"],
                        obj["etag"],
                        int(obj.get("size", 0)),
                        tuple(int(s) for s in obj.get("part_sizes", [])),
                    )
                except (ValueError, KeyError, TypeError):
                    continue
                index.put_object(conn, row)
                objects += 1
    shutil.rmtree(root / "index", ignore_errors=True)
    log.warning(
        "moved %d parts and %d objects from the earlier cache index format into %s",
        parts,
        objects,
        index.path,
    )
    with contextlib.suppress(OSError):
        os.chmod(index.path, 0o600)
