"""Prefetch of a set of files: expansion, lists, aggregate progress, --check, the size
refusal, and the shared-tier sink, over a MemoryStore and a real PartCache."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ossfs_resume import prefetch
from ossfs_resume.cache import PartCache
from ossfs_resume.errors import CacheWriteError, UsageError
from ossfs_resume.objectstore import FaultyStore, MemoryStore
from ossfs_resume.prefetch import (
    SetTotals,
    SharedTierSink,
    check_fits,
    check_lines,
    join_key,
    list_prefix,
    plan_file,
    prefetch_set,
    prefetch_set_to_tier,
    read_list_file,
    walk_files,
)
from ossfs_resume.progress import AggregateProgress

pytestmark = pytest.mark.usefixtures("watchdog")

PART = 1000


def _bucket() -> FaultyStore[MemoryStore]:
    memory = MemoryStore("bkt", endpoint="http://fake", max_page=2)
    for key, size in {
        "ds/a.bin": 2500,
        "ds/sub/b.bin": 1000,
        "ds/sub/": 0,  # a directory marker
        "ds/empty.bin": 0,
        "other/c.bin": 10,
    }.items():
        memory.put(key, bytes(i % 251 for i in range(size)))
    return FaultyStore(memory)


def _plans(client: Any, cache: PartCache, keys: list[str], **kw: Any) -> list[prefetch.FilePlan]:
    return [plan_file(client, client.head(k), PART, cache=cache, **kw) for k in keys]


def test_listing_a_prefix_is_recursive_in_key_order_without_markers() -> None:
    client = _bucket()
    keys = [m.key for m in list_prefix(client, "ds/")]
    assert keys == ["ds/a.bin", "ds/empty.bin", "ds/sub/b.bin"]
    assert [m.key for m in list_prefix(client, "")][-1] == "other/c.bin"
    assert list_prefix(client, "nope/") == []


def test_walk_files_is_recursive_and_sorted(tmp_path: Path) -> None:
    for rel in ("b/2.txt", "b/1.txt", "a.txt", "c/d/e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    rels = [str(Path(p).relative_to(tmp_path)) for p in walk_files(str(tmp_path))]
    assert rels == ["a.txt", "b/1.txt", "b/2.txt", "c/d/e.txt"]


def test_list_file_keeps_order_and_skips_blanks_and_comments(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# warm-up order\nsub/b.bin\n\n  a.bin  \n# done\ns3://bkt/x\n")
    assert read_list_file(str(listing)) == ["sub/b.bin", "a.bin", "s3://bkt/x"]
    with pytest.raises(UsageError, match="no such file"):
        read_list_file(str(tmp_path / "missing.txt"))
    assert join_key("ds/", "a.bin") == "ds/a.bin"
    assert join_key("ds", "/a.bin") == "ds/a.bin"
    assert join_key("", "a.bin") == "a.bin"


def test_aggregate_progress_lines_with_an_injected_clock() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = AggregateProgress("prefetch", mode="auto", stream=out, clock=lambda: now[0])
    assert progress.periodic  # a StringIO is no terminal
    progress.start(files_total=4, files_done=1, bytes_total=4 << 20, bytes_done=1 << 20)
    now[0] += 1
    progress.add(1 << 20)
    assert out.getvalue() == ""  # not due yet
    now[0] += 4
    progress.file_done()
    assert out.getvalue() == (
        "prefetch: 2/4 files, 2.0 MiB of 4.0 MiB (50%), 204.8 KiB/s, ETA 10 s\n"
    )
    progress.add(2 << 20)
    progress.file_done()
    progress.file_done()
    assert progress.status().startswith("4/4 files, 4.0 MiB of 4.0 MiB (100%)")
    assert progress.status().endswith("ETA 0 s")
    progress.close()
    progress.close()


def test_aggregate_progress_never_writes_nothing() -> None:
    out = io.StringIO()
    with AggregateProgress("p", mode="never", stream=out, clock=lambda: 0.0) as progress:
        progress.start(files_total=1, files_done=0, bytes_total=10, bytes_done=0)
        progress.add(10)
        progress.file_done()
    assert out.getvalue() == ""


def test_prefetch_set_fetches_each_missing_part_once_then_nothing(cache: PartCache) -> None:
    client = _bucket()
    keys = [m.key for m in list_prefix(client, "ds/")]
    plans = _plans(client, cache, keys)
    out = io.StringIO()
    progress = AggregateProgress("p", mode="never", stream=out)
    result = prefetch_set(plans, cache, files=2, threads=2, progress=progress)
    assert result.failed == []
    assert (result.parts_fetched, result.bytes_fetched) == (4, 3500)
    assert client.count("get_range") == 4
    assert progress.files_done == 3 and progress.bytes_done == 3500
    again = _plans(client, cache, keys)
    assert SetTotals.of(again) == SetTotals(3, 3, 3500, 3500)
    assert prefetch_set(again, cache, files=2, threads=2).parts_fetched == 0
    assert client.count("get_range") == 4


def test_a_rerun_fetches_only_the_parts_a_stopped_run_left(cache: PartCache) -> None:
    client = _bucket()
    plans = _plans(client, cache, ["ds/a.bin", "ds/sub/b.bin"])
    gate = client.hold("get_range", times=1, when=lambda call: call.key == "ds/a.bin")
    stop = threading.Event()

    def run() -> None:
        prefetch_set(plans, cache, files=1, threads=1, stop=stop)

    thread = threading.Thread(target=run)
    thread.start()
    assert gate.wait_held(1)
    stop.set()  # as Ctrl-C does: no new parts or files
    gate.release()
    thread.join(5)
    first = client.count("get_range")
    again = _plans(client, cache, ["ds/a.bin", "ds/sub/b.bin"])
    # Part 0 (started) was kept; part 1 was queued behind it and is kept only if the
    # worker took it before the stop; the third part and b.bin were not begun.
    assert again[0].missing in ([2], [1, 2])
    assert again[1].missing == [0]
    missing = len(again[0].missing) + 1
    prefetch_set(again, cache, files=2, threads=1)
    assert client.count("get_range") == first + missing
    assert SetTotals.of(_plans(client, cache, ["ds/a.bin", "ds/sub/b.bin"])).files_complete == 2


def test_check_reports_per_file_and_total_without_writing(cache: PartCache) -> None:
    client = _bucket()
    prefetch_set(_plans(client, cache, ["ds/sub/b.bin"]), cache, threads=1)
    totals_before = cache.totals()
    plans = _plans(client, cache, ["ds/a.bin", "ds/sub/b.bin", "ds/empty.bin"], record=False)
    lines = check_lines(plans)
    assert lines == [
        "  0%  0 of 2500 bytes cached  s3://bkt/ds/a.bin",
        "100%  1000 of 1000 bytes cached  s3://bkt/ds/sub/b.bin",
        "100%  0 of 0 bytes cached  s3://bkt/ds/empty.bin",
        "total: 2 of 3 files complete, 1000 B of 3.4 KiB cached (29%)",
    ]
    assert cache.totals() == totals_before
    assert client.count("get_range") == 1


def test_a_set_larger_than_the_cache_limit_is_refused(cache: PartCache) -> None:
    client = _bucket()
    plans = _plans(client, cache, ["ds/a.bin", "ds/sub/b.bin"])
    check_fits(plans, 3500)
    with pytest.raises(UsageError) as info:
        check_fits(plans, 3000)
    assert str(info.value) == (
        "the set is 3.4 KiB, the cache limit 2.9 KiB: raise --cache-size or prefetch less"
    )
    with pytest.raises(UsageError, match=r"the set is 12\.3 GiB, the cache limit 10\.0 GiB"):
        meta = prefetch.ObjectMeta("big", int(12.3 * (1 << 30)), "e", 0.0)
        check_fits([plan_file(client, meta, 1 << 20, cache=cache, record=False)], 10 << 30)


# -- the shared tier ----------------------------------------------------------------


class FakeTier:
    name = "mem://tier"

    def __init__(self, *, refuse: bool = False) -> None:
        self.parts: dict[Any, bytes] = {}
        self.puts = 0
        self.refuse = refuse

    def put(self, ident: Any, data: Any) -> bool:
        self.puts += 1
        if self.refuse:
            raise OSError(28, "No space left on device")
        if ident in self.parts:
            return False
        self.parts[ident] = bytes(data)
        return True

    def has(self, ident: Any) -> bool:
        return ident in self.parts


def test_filling_the_shared_tier_puts_every_part_from_the_origin_and_resumes(
    tmp_path: Path,
) -> None:
    origin = _bucket()
    tier = FakeTier()
    keys = ["ds/a.bin", "ds/sub/b.bin"]
    plans = [plan_file(origin, origin.head(k), PART, tier=tier) for k in keys]
    first = plans[0]
    # Part 1 of a.bin is in the tier already (another node, or an earlier run).
    ident = prefetch.part_identity(origin, first.meta, PART, 1)
    tier.parts[ident] = origin.inner.data("ds/a.bin")[1000:2000]
    plans = [plan_file(origin, origin.head(k), PART, tier=tier) for k in keys]
    assert plans[0].missing == [0, 2]
    result = prefetch_set_to_tier(plans, tier, files=2, threads=2)
    assert result.parts_fetched == 3 and result.failed == []
    assert origin.count("get_range") == 3
    for key in keys:
        data = origin.inner.data(key)
        meta = origin.head(key)
        got = b"".join(
            tier.parts[prefetch.part_identity(origin, meta, PART, n)]
            for n in range(-(-len(data) // PART))
        )
        assert got == data
    assert ident.etag == first.meta.etag and ident.store_id == origin.config.store_id
    assert not list(tmp_path.iterdir())  # nothing written locally
    again = [plan_file(origin, origin.head(k), PART, tier=tier) for k in keys]
    assert prefetch_set_to_tier(again, tier).parts_fetched == 0
    assert origin.count("get_range") == 3


def test_a_tier_that_refuses_stops_the_set_with_one_line() -> None:
    origin = _bucket()
    tier = FakeTier(refuse=True)
    plans = [plan_file(origin, origin.head(k), PART, tier=tier) for k in ["ds/a.bin"]]
    with pytest.raises(CacheWriteError) as info:
        prefetch_set_to_tier(plans, tier, threads=1)
    message = str(info.value)
    assert "\n" not in message
    assert "the shared tier mem://tier refused part 0 of s3://bkt/ds/a.bin" in message
    assert "No space left" in message
    assert tier.puts == 1


def test_a_put_that_loses_a_race_is_not_a_refusal() -> None:
    origin = _bucket()
    tier = FakeTier()
    meta = origin.head("ds/sub/b.bin")
    plan = plan_file(origin, meta, PART, tier=tier)
    sink = SharedTierSink(tier, plan)
    ident = prefetch.part_identity(origin, meta, PART, 0)
    tier.parts[ident] = b"x"  # another node got there first
    sink.accept(0, memoryview(b"y" * 1000))  # put() says False, has() says yes: fine
    sink.commit()

    class Refusing(FakeTier):
        def put(self, ident: Any, data: Any) -> bool:
            return False

    with pytest.raises(CacheWriteError, match="refused part 0"):
        SharedTierSink(Refusing(), plan).accept(0, memoryview(b"y" * 1000))


def test_the_bar_counts_files_on_a_terminal() -> None:
    out = io.StringIO()
    with AggregateProgress("prefetch", mode="always", stream=out) as progress:
        progress.start(files_total=2, files_done=0, bytes_total=2048, bytes_done=0)
        progress.add(1024)
        progress.file_done()
    assert "1/2 files" in out.getvalue()


@pytest.fixture
def cli_main() -> Iterator[Callable[[list[str]], int]]:
    """cli.main, with the root logger's handlers (which it replaces) restored after."""
    from ossfs_resume import cli

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield cli.main
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in saved[0]:
                handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([], "--to shared needs --shared-cache URL"),
        (["--shared-cache", "s3://tier"], "--shared-cache needs --shared-endpoint"),
    ],
)
def test_to_shared_options_are_one_line(
    capsys: pytest.CaptureFixture[str], cli_main: Callable[[list[str]], int], extra, needle
) -> None:
    assert cli_main(["prefetch", "/nonexistent/file", "--to", "shared", *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and needle in err[0], err
