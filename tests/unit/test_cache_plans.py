"""The index's hot and periodic queries find their rows through an index, never by
reading the whole parts table: the cache must stay fast at millions of parts.

Each test runs a real ``PartIndex`` method with its connection recorded, then
asks SQLite for the plan (``EXPLAIN QUERY PLAN``) of every statement it ran.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ossfs_resume.cache.index import PartId, PartIndex, PartRecord, Totals

PART = 1 << 20
OBJECTS = 40
PARTS_PER_OBJECT = 25
WRITER = "123-456"


class _Recorder:
    """A connection that remembers each statement it runs, with its parameters."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        self.statements.append((sql, tuple(params)))
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        self.statements.append((sql, tuple(rows[0]) if rows else ()))
        return self.conn.executemany(sql, rows)


def _oid(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture(params=[False, True], ids=["fresh", "analyzed"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PartIndex]:
    """An index of 1000 parts (varied ages and hits) and one reservation; "analyzed" also
    has SQLite's statistics, which can change the planner's choices."""
    ix = PartIndex(tmp_path / "index.db")
    parts = [
        (PartId(_oid(o), PART, n), PartRecord(PART, o * n, float((o * 37 + n * 11) % 997), n % 4))
        for o in range(OBJECTS)
        for n in range(PARTS_PER_OBJECT)
    ]
    with ix.writing() as conn:
        PartIndex.add_parts(conn, parts)
        PartIndex.reserve(conn, PartId(_oid(OBJECTS), PART, 0), PartRecord(PART, 0), WRITER)
    if request.param:
        with ix.writing() as conn:
            conn.execute("ANALYZE")
    try:
        yield ix
    finally:
        ix.close()


def _plans(
    index: PartIndex, monkeypatch: pytest.MonkeyPatch, call: Callable[[Any], object]
) -> list[str]:
    """The plan lines of every statement `call` runs (it gets a recording connection,
    and the index's own reading()/writing() hand out that connection too)."""
    with index.reading() as conn:
        recorder = _Recorder(conn)

        @contextlib.contextmanager
        def recorded() -> Iterator[_Recorder]:
            yield recorder

        monkeypatch.setattr(index, "reading", recorded)
        monkeypatch.setattr(index, "writing", recorded)
        call(recorder)
        monkeypatch.undo()
        assert recorder.statements, "the method ran no statement"
        lines: list[str] = []
        for sql, params in recorder.statements:
            plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            lines += [f"{row[3]}  <- {sql}" for row in plan]
        return lines


def _assert_indexed(lines: list[str], *, allowed_scan: str | None = None) -> None:
    for line in lines:
        detail = line.split("  <- ")[0]
        assert "TEMP B-TREE" not in detail, line
        if detail.startswith("SCAN") and detail != allowed_scan:
            pytest.fail(f"full scan: {line}")


def test_bulk_added_parts_keep_the_totals(index: PartIndex) -> None:
    n = OBJECTS * PARTS_PER_OBJECT + 1  # and the reservation
    assert index.totals() == Totals(n, n * PART, 0)
    assert index.part(PartId(_oid(3), PART, 4)) == PartRecord(PART, 12, float(3 * 37 + 44), 0)
    assert index.writers() == {WRITER: PART}


def test_eviction_order_walks_the_age_index(
    index: PartIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = _plans(index, monkeypatch, lambda conn: PartIndex.oldest(conn, 48))
    _assert_indexed(lines, allowed_scan="SCAN parts USING INDEX parts_by_age")
    assert any("parts_by_age" in line for line in lines), lines


@pytest.mark.parametrize(
    "name, call",
    [
        ("part", lambda ix, conn: ix.part(PartId(_oid(3), PART, 4))),
        ("row_state", lambda ix, conn: PartIndex.row_state(conn, PartId(_oid(3), PART, 4))),
        ("parts_of", lambda ix, conn: ix.parts_of(_oid(3))),
        ("scan from the start", lambda ix, conn: ix.scan(None, 512)),
        ("scan after a key", lambda ix, conn: ix.scan(PartId(_oid(3), PART, 4), 512)),
        ("writers", lambda ix, conn: ix.writers()),
        ("reservations_of", lambda ix, conn: ix.reservations_of(WRITER)),
        ("touch_parts", lambda ix, conn: ix.touch_parts([(PartId(_oid(3), PART, 4), 5000.0)])),
        ("delete_part", lambda ix, conn: PartIndex.delete_part(conn, PartId(_oid(3), PART, 4))),
    ],
)
def test_lookups_search_by_key_or_index(
    index: PartIndex,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    call: Callable[[PartIndex, Any], object],
) -> None:
    lines = _plans(index, monkeypatch, lambda conn: call(index, conn))
    _assert_indexed(lines)
    assert all(line.startswith("SEARCH parts USING") for line in lines if "FROM parts" in line), (
        lines
    )
