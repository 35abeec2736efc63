"""The part cache under faults: full, damaged, deleted, read-only and failing disks, kill -9
of every kind of writer, several processes on one cache dir, fd limits, file modes.

Every test goes through a real mount or the real CLI and ends with
``assert_cache_consistent``: rows and part files agree, nothing is left half
written, and ``cache verify`` finds nothing bad.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    CLI,
    FUSERMOUNT,
    REPO,
    Mount,
    Mounter,
    assert_cache_consistent,
    daemon_pids,
    md5_file,
    run_cli,
    store_env,
    sweep_cache,
    unmount,
)
from local_store import LocalStore
from netproxy import NetProxy, ProxyConfig

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

MIB = 1 << 20
PART = 8 * MIB  # the default part size
BIG = 96 * MIB
SMALL_KEYS = ["data/2024/02/part-000.bin", "data/2024/01/part-001.bin", "archives/sample.tar"]


# -- helpers -----------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0) -> object:
    """Poll `check` until it returns something true; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def md5_uncached(path: Path) -> str:
    """MD5 of a file read with its kernel pages dropped first, so the read reaches the
    mount (an unchanged object keeps its page cache across opens)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def part_files(cache: Path) -> list[Path]:
    parts = cache / "parts"
    return sorted(p for p in parts.glob("*/*/*") if not p.name.startswith("."))


def bytes_under(path: Path) -> int:
    """Bytes of every file under `path` right now, temp files included."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def no_traceback(mount: Mount) -> None:
    log = mount.log()
    assert "Traceback" not in log, log[-4000:]


def kill_mount(mount: Mount) -> None:
    """SIGKILL the mount's daemon and take the dead mount point down."""
    pids = daemon_pids(mount.path)
    assert pids, f"no daemon for {mount.path}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    subprocess.run([FUSERMOUNT, "-u", "-z", str(mount.path)], capture_output=True, timeout=30)
    wait_for("the killed daemon to exit", lambda: not daemon_pids(mount.path))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def put_random(store: LocalStore, key: str, size: int) -> str:
    data = random.Random(key).randbytes(size)
    store.put_bytes(key, data)
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def big_objects(store: LocalStore) -> dict[str, str]:
    """Three objects of 96 MiB (12 default parts each): key -> MD5."""
    return {f"faults/big-{i}.bin": put_random(store, f"faults/big-{i}.bin", BIG) for i in range(3)}


@pytest.fixture(scope="module")
def small_objects(store: LocalStore) -> dict[str, str]:
    """Fifty small objects: key -> MD5."""
    return {
        f"faults/small/f{i:02d}.txt": put_random(store, f"faults/small/f{i:02d}.txt", 1000 + i)
        for i in range(50)
    }


def sample_md5s(sample_tree: dict[str, Path]) -> dict[str, str]:
    return {key: md5_file(sample_tree[key]) for key in SMALL_KEYS}


# -- faults of the cache's disk ---------------------------------------------------------


def test_a_disk_that_fills_before_the_limit_serves_every_byte(
    mounter: Mounter, tmp_path: Path, big_objects: dict[str, str], sample_tree: dict[str, Path]
):
    with tmpfs(tmp_path / "disk", "40m") as disk:
        cache = disk / "cache"
        mount = mounter.mount(
            cache_dir=cache, extra=["--cache-size", "1G", "--cache-min-free", "0"]
        )
        try:
            want = {**dict(list(big_objects.items())[:2]), **sample_md5s(sample_tree)}
            for key, md5 in want.items():  # 195 MiB through a 40 MiB disk
                assert md5_uncached(mount.path / key) == md5, key
            assert part_files(cache), "nothing was cached"
        finally:
            mounter.unmount(mount)
        log = mount.log()
        no_traceback(mount)
        # One episode at most (each is one warning); a flapping free-space check gives many.
        assert log.count("cannot write to the cache") <= 1, log
        sweep_cache(cache)
        assert_cache_consistent(cache)


def _damage_index_while_mounted(
    mounter: Mounter,
    sample_tree: dict[str, Path],
    damage: Callable[[Path], None],
    *,
    noticed_while_mounted: bool,
) -> None:
    want = sample_md5s(sample_tree)
    first, *others = list(want)
    notes = md5_file(sample_tree["docs/notes.md"])
    mount = mounter.mount(extra=["--part-size", "1M"])
    try:
        assert md5_uncached(mount.path / first) == want[first]
        wait_for("the first file's parts", lambda: len(part_files(mount.cache_dir)) >= 4)
        index = mount.cache_dir / "index.db"
        damage(index)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{index}{suffix}")
        for key in [*others, first, *others]:
            assert md5_uncached(mount.path / key) == want[key], key
        if noticed_while_mounted:
            wait_for("the damage to be noticed", lambda: "is damaged" in mount.log())
        assert md5_uncached(mount.path / "docs/notes.md") == notes
    finally:
        mounter.unmount(mount)
    no_traceback(mount)
    # The next mount starts from whatever the damaged file holds now: a damaged index is
    # moved aside, parts no row accounts for are swept; reads are right and get cached.
    again = mounter.mount(cache_dir=mount.cache_dir, extra=["--part-size", "1M"])
    try:
        for key in [first, *others]:
            assert md5_uncached(again.path / key) == want[key], key
        wait_for("reads to be cached", lambda: len(part_files(again.cache_dir)) >= 4)
    finally:
        mounter.unmount(again)
    no_traceback(again)
    damaged = mount.log().count("is damaged") + again.log().count("is damaged")
    assert damaged <= 1, (mount.log(), again.log())
    if noticed_while_mounted:
        assert damaged == 1
    sweep_cache(mount.cache_dir)
    assert_cache_consistent(mount.cache_dir)


def test_an_index_overwritten_with_garbage_while_mounted(
    mounter: Mounter, sample_tree: dict[str, Path]
):
    def garble(index: Path) -> None:
        size = index.stat().st_size
        with open(index, "r+b") as f:
            f.write(random.Random(1).randbytes(max(size, 8192)))

    _damage_index_while_mounted(mounter, sample_tree, garble, noticed_while_mounted=True)


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_an_index_truncated_while_mounted(
    mounter: Mounter, sample_tree: dict[str, Path], keep: float
):
    # Cut to nothing, the header is gone: the mount's health check notices within a
    # second. Cut in half, SQLite serves the running mount from its page cache and the
    # (now unlinked) WAL, and may not read a lost page before the unmount: the next
    # start moves the damaged file aside.
    def cut(index: Path) -> None:
        os.truncate(index, int(index.stat().st_size * keep))

    _damage_index_while_mounted(mounter, sample_tree, cut, noticed_while_mounted=keep == 0)


def test_the_cache_dir_deleted_while_mounted(mounter: Mounter, sample_tree: dict[str, Path]):
    want = sample_md5s(sample_tree)
    first, second, third = list(want)
    mount = mounter.mount(extra=["--part-size", "1M"])
    try:
        assert md5_uncached(mount.path / first) == want[first]
        wait_for("the first file's parts", lambda: len(part_files(mount.cache_dir)) >= 4)
        subprocess.run(["rm", "-rf", str(mount.cache_dir)], check=True)
        assert md5_uncached(mount.path / second) == want[second]
        wait_for("a fresh index", lambda: (mount.cache_dir / "index.db").exists(), timeout=10)
        assert md5_uncached(mount.path / first) == want[first]
        assert md5_uncached(mount.path / third) == want[third]
        wait_for("new reads to be cached again", lambda: part_files(mount.cache_dir))
        assert stat.S_IMODE(mount.cache_dir.stat().st_mode) == 0o700
    finally:
        mounter.unmount(mount)
    no_traceback(mount)
    assert mount.log().count("was removed or replaced") == 1, mount.log()
    sweep_cache(mount.cache_dir)
    assert_cache_consistent(mount.cache_dir)


@dataclass
class FaultFs:
    """tests/faultfs.py mounted at `path` over `backing`; faults while `control` exists."""

    path: Path
    backing: Path
    control: Path
    log: Path

    def fail(self, mode: str) -> None:
        self.control.write_text(mode)

    def heal(self) -> None:
        self.control.unlink(missing_ok=True)


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[FaultFs]:
    fs = FaultFs(
        tmp_path / "faulty", tmp_path / "backing", tmp_path / "fault-mode", tmp_path / "faultfs.log"
    )
    fs.path.mkdir()
    fs.backing.mkdir()
    with open(fs.log, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "faultfs.py"),
                str(fs.backing),
                str(fs.path),
                str(fs.control),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
    try:
        wait_for("faultfs to mount", lambda: os.path.ismount(fs.path) or proc.poll() is not None)
        if not os.path.ismount(fs.path):
            pytest.skip(f"faultfs did not mount: {fs.log.read_text()}")
        yield fs
    finally:
        fs.heal()
        for args in ([FUSERMOUNT, "-u", str(fs.path)], [FUSERMOUNT, "-u", "-z", str(fs.path)]):
            if os.path.ismount(fs.path):
                subprocess.run(args, capture_output=True, timeout=30)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _disk_fault_while_mounted(
    mounter: Mounter,
    faultfs: FaultFs,
    sample_tree: dict[str, Path],
    small_objects: dict[str, str],
    mode: str,
) -> None:
    want = sample_md5s(sample_tree)
    first, *others = list(want)
    mount = mounter.mount(cache_dir=faultfs.path / "cache", extra=["--part-size", "1M"])
    try:
        assert md5_uncached(mount.path / first) == want[first]
        wait_for("the first file's parts", lambda: len(part_files(mount.cache_dir)) >= 4)
        faultfs.fail(mode)
        for key in [*others, first]:
            assert md5_uncached(mount.path / key) == want[key], key
        wait_for(
            "a warning about the fault",
            lambda: "unusable" in mount.log() or "cannot write" in mount.log(),
        )
        faultfs.heal()
        # The cache comes back by itself (the index is retried every few seconds): each
        # read is of an object never read before, so it is fetched and offered to the cache.
        before = {p.parent for p in part_files(mount.cache_dir)}
        fresh = iter(small_objects.items())

        def cached_again() -> bool:
            key, md5 = next(fresh)
            assert md5_uncached(mount.path / key) == md5, key
            time.sleep(0.2)  # pace: the fresh objects must outlast the retry interval
            return any(p.parent not in before for p in part_files(mount.cache_dir))

        wait_for("the cache to come back by itself", cached_again, timeout=9)
    finally:
        mounter.unmount(mount)
    no_traceback(mount)
    # A disk fault is transient: the index is kept, never moved aside as damaged.
    assert "is damaged" not in mount.log(), mount.log()
    assert not list((faultfs.backing / "cache").glob("index.broken-*"))
    backing_cache = faultfs.backing / "cache"
    sweep_cache(backing_cache)
    assert_cache_consistent(backing_cache)


def test_a_read_only_cache_disk_while_mounted(
    faultfs: FaultFs,
    mounter: Mounter,
    sample_tree: dict[str, Path],
    small_objects: dict[str, str],
):
    # `mount -o remount,ro` is refused (EBUSY) while SQLite holds its files open for
    # writing, so faultfs plays the disk the kernel remounted read-only: EROFS.
    _disk_fault_while_mounted(mounter, faultfs, sample_tree, small_objects, "erofs")


def test_an_io_error_on_the_cache_disk_while_mounted(
    faultfs: FaultFs,
    mounter: Mounter,
    sample_tree: dict[str, Path],
    small_objects: dict[str, str],
):
    _disk_fault_while_mounted(mounter, faultfs, sample_tree, small_objects, "eio")


# -- kill -9 of every kind of writer -----------------------------------------------------


def _prefetch(store: LocalStore, key: str, cache: Path, *extra: str) -> None:
    result = run_cli(
        [
            "prefetch",
            f"s3://{store.bucket}/{key}",
            "--endpoint",
            store.endpoint,
            "--cache-dir",
            str(cache),
            "--progress",
            "never",
            *extra,
        ],
        env=store_env(store),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_kill_9_during_cache_clear_leaves_a_consistent_cache(
    store: LocalStore, tmp_path: Path, big_objects: dict[str, str]
):
    key = next(iter(big_objects))
    killed_midway = 0
    with tmpfs(tmp_path / "disk", "200m") as disk:
        cache = disk / "cache"
        for gone in (1, 40, 250):
            _prefetch(store, key, cache, "--part-size", "100K")  # 984 parts
            full = len(part_files(cache))
            assert full == -(-BIG // (100 * 1024))
            proc = subprocess.Popen(
                [*CLI, "cache", "clear", "--cache-dir", str(cache)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            (obj_dir,) = {p.parent for p in part_files(cache)}
            try:
                # A tight poll: the clear takes a fraction of a second.
                deadline = time.monotonic() + 60
                while len(os.listdir(obj_dir)) > full - gone and proc.poll() is None:
                    assert time.monotonic() < deadline, "the clear removed nothing"
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            finally:
                if proc.poll() is None:
                    proc.kill()
            if proc.returncode == -signal.SIGKILL and part_files(cache):
                killed_midway += 1
            sweep_cache(cache)
            assert_cache_consistent(cache)
        assert killed_midway, "every clear finished before the kill: nothing was tested"


def test_kill_9_of_the_mount_during_eviction_then_remount(
    mounter: Mounter, big_objects: dict[str, str]
):
    (key0, md5_0), (key1, md5_1) = list(big_objects.items())[:2]
    extra = ["--cache-size", "64M", "--cache-min-free", "0"]
    mount = mounter.mount(extra=extra)
    try:
        assert md5_uncached(mount.path / key0) == md5_0  # fills the cache to its limit
        reader = subprocess.Popen(
            ["cat", str(mount.path / key1)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Evicting for the second object: kill the daemon in the middle of it.
            wait_for("eviction", lambda: "evicted" in mount.log(), timeout=60)
            kill_mount(mount)
        finally:
            reader.kill()
            reader.wait(timeout=10)
    finally:
        unmount(mount.path)
    no_traceback(mount)
    again = mounter.mount(cache_dir=mount.cache_dir, extra=extra)
    try:
        for key, md5 in ((key1, md5_1), (key0, md5_0)):
            assert md5_uncached(again.path / key) == md5, key
    finally:
        mounter.unmount(again)
    no_traceback(again)
    assert_cache_consistent(mount.cache_dir)  # the remount's start-up sweep ran


def test_kill_9_during_prefetch_then_sweep_and_rerun(
    store: LocalStore, tmp_path: Path, big_objects: dict[str, str]
):
    key = next(iter(big_objects))
    cache = tmp_path / "cache"
    port = int(store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port, rate_bytes_per_s=8e6)) as slow:
        args = [
            "prefetch",
            f"s3://{store.bucket}/{key}",
            "--endpoint",
            slow.endpoint,
            "--cache-dir",
            str(cache),
            "--part-size",
            "1M",
            "--threads",
            "8",
            "--progress",
            "never",
        ]
        proc = subprocess.Popen(
            [*CLI, *args],
            env=store_env(store),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for("some parts", lambda: len(part_files(cache)) >= 10, timeout=60)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert len(part_files(cache)) < BIG // MIB
        sweep_cache(cache)
        assert_cache_consistent(cache)
        result = run_cli(args, env=store_env(store), timeout=120)
        assert result.returncode == 0, result.stderr
    assert len(part_files(cache)) == BIG // MIB
    assert_cache_consistent(cache)


# -- several processes on one cache dir ----------------------------------------------------


def test_two_mounts_and_a_prefetch_share_one_limit(
    mounter: Mounter, store: LocalStore, big_objects: dict[str, str]
):
    limit = 100 * MIB
    cache = mounter.base / "shared-cache"
    extra = ["--cache-size", "100M", "--cache-min-free", "0"]
    mounts = [mounter.mount(cache_dir=cache, extra=extra) for _ in range(2)]
    (key0, md5_0), (key1, md5_1), (key2, _) = big_objects.items()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, bytes_under(cache / "parts"))
            time.sleep(0.05)

    results: dict[str, str] = {}

    def read(mount: Mount, key: str) -> None:
        results[key] = md5_uncached(mount.path / key)

    sampler = threading.Thread(target=sample)
    readers = [
        threading.Thread(target=read, args=(mounts[0], key0)),
        threading.Thread(target=read, args=(mounts[1], key1)),
    ]
    sampler.start()
    try:
        for t in readers:
            t.start()
        _prefetch(store, key2, cache)
        for t in readers:
            t.join(timeout=120)
    finally:
        stop.set()
        sampler.join()
        for mount in mounts:
            mounter.unmount(mount)
    assert results == {key0: md5_0, key1: md5_1}
    # Reservations are counted before a byte is written, in the same transaction that
    # evicts for them, so the dir itself stays within the limit; the slack is one part
    # per writer for what a sample can see twice or mid-rename (a temp file and its
    # final name) while the tree is walked.
    print(f"peak bytes under parts/: {peak} ({peak / MIB:.1f} MiB) for a limit of 100 MiB")
    assert peak <= limit + 3 * PART, peak
    for mount in mounts:
        no_traceback(mount)
    assert_cache_consistent(cache)


def test_the_mount_keeps_its_fds_bounded_under_a_low_limit(
    mounter: Mounter, small_objects: dict[str, str]
):
    mount = mounter.mount(extra=["--part-size", "1M"], wrapper=["prlimit", "--nofile=1024:1024"])
    try:
        pid = daemon_pids(mount.path)[0]
        paths = [str(mount.path / key) for key in small_objects]
        for path in paths:  # warm: every file cached, every handle opened once
            Path(path).read_bytes()
        before = len(os.listdir(f"/proc/{pid}/fd"))
        code = (
            "import sys\n"
            "paths = sys.argv[2:]\n"
            "for _ in range(int(sys.argv[1])):\n"
            "    for p in paths:\n"
            "        with open(p, 'rb') as f:\n"
            "            f.read()\n"
        )
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", code, "300", *paths],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        errors = [w.communicate(timeout=120)[1] for w in workers]
        assert all(w.returncode == 0 for w in workers), errors
        wait_for(
            "the daemon's fds to settle",
            lambda: len(os.listdir(f"/proc/{pid}/fd")) <= before + 32,
            timeout=10,
        )
    finally:
        mounter.unmount(mount)
    no_traceback(mount)
    assert_cache_consistent(mount.cache_dir)


def test_cache_files_are_private(mounter: Mounter, sample_tree: dict[str, Path]):
    key = "data/2024/01/part-001.bin"
    fresh = mounter.mount(extra=["--part-size", "1M"])
    try:
        assert md5_uncached(fresh.path / key) == md5_file(sample_tree[key])
        wait_for("parts", lambda: len(part_files(fresh.cache_dir)) >= 2)
    finally:
        mounter.unmount(fresh)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(fresh.cache_dir) == 0o700
    assert mode(fresh.cache_dir / "index.db") == 0o600
    assert mode(fresh.log_file) == 0o600
    assert mode(fresh.cache_dir / "parts") == 0o700
    for part in part_files(fresh.cache_dir):
        assert mode(part) == 0o600, part
        assert mode(part.parent) == 0o700, part.parent
    assert "readable by others" not in fresh.log()

    loose = mounter.base / "loose-cache"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    mount = mounter.mount(cache_dir=loose)
    try:
        assert mode(loose) == 0o700
    finally:
        mounter.unmount(mount)
    assert mount.log().count("readable by others") == 1, mount.log()
    assert_cache_consistent(fresh.cache_dir)
    assert_cache_consistent(loose)
