"""A cache you can trust: crash safety, checksums, size limit, versions, outages, full disks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Mounter, daemon_pids, md5_file, run_cli, store_env, unmount
from local_store import LocalStore
from netproxy import NetProxy, ProxyConfig

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

MIB = 1 << 20


def _put_random(store: LocalStore, key: str, size: int, seed: str | None = None) -> bytes:
    data = random.Random(seed or key).randbytes(size)
    store.put_bytes(key, data)
    return data


def _ranged_gets(proxy: NetProxy) -> list[str]:
    return [r[2] for r in proxy.requests() if r[0] == "GET" and r[2]]


def _daemon_pid(mountpoint: Path) -> int:
    pids = daemon_pids(mountpoint)
    assert pids, f"no daemon found for {mountpoint}"
    return pids[0]


def test_kill_9_of_the_mount_during_parallel_reads_then_remount_reads_identical(
    mounter: Mounter, sample_tree: dict[str, Path]
):
    keys = [k for k in sample_tree if sample_tree[k].stat().st_size > 0]
    cache = mounter.base / "crash-cache"
    for round_no in range(3):
        mount = mounter.mount(cache_dir=cache, extra=["--part-size", "1M"], name=f"crash{round_no}")
        pid = _daemon_pid(mount.path)
        errors: list[BaseException] = []

        def reader(key: str, mount=mount, errors=errors) -> None:
            try:
                with open(mount.path / key, "rb") as f:
                    while f.read(1 << 20):
                        pass
            except OSError as exc:  # the mount dies under us: expected
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in keys * 2]
        for t in threads:
            t.start()
        time.sleep(0.3 + 0.2 * round_no)
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        unmount(mount.path)

        survivor = mounter.mount(cache_dir=cache, extra=["--part-size", "1M"])
        for key in keys:
            assert md5_file(survivor.path / key) == md5_file(sample_tree[key]), (round_no, key)
        mounter.unmount(survivor)


def read_past_page_cache(path: Path) -> bytes:
    """Read a file with its kernel pages dropped first, so the read reaches the part cache.

    Unchanged objects keep their page cache across opens (keep_cache); this is
    what memory pressure would do.
    """
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


def _bytes_on_disk(cache: Path) -> int:
    """Bytes of the part files right now (the mount may evict one while we look)."""
    total = 0
    for path in _part_files(cache):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def _part_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "parts").glob("*/*/*") if not p.name.startswith("."))


def test_a_flipped_byte_in_a_cached_part_is_detected_and_refetched(
    mounter: Mounter, proxy: NetProxy, store: LocalStore
):
    key = "trust/flip.bin"
    data = _put_random(store, key, 3 * MIB + 5)
    first = mounter.mount(endpoint=proxy.endpoint, extra=["--part-size", "1M"])
    assert (first.path / key).read_bytes() == data
    mounter.unmount(first)
    parts = _part_files(first.cache_dir)
    assert len(parts) == 4
    victim = parts[1]
    raw = bytearray(victim.read_bytes())
    raw[1234] ^= 0x01
    victim.write_bytes(bytes(raw))

    proxy.reset_counts()
    second = mounter.mount(
        endpoint=proxy.endpoint, cache_dir=first.cache_dir, extra=["--part-size", "1M"]
    )
    assert (second.path / key).read_bytes() == data
    # Only the bad part's bytes were fetched again (the kernel's first request may
    # land mid-file and be served as a random read, so that can take two GETs).
    gets = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in _ranged_gets(proxy)]
    assert gets and all(MIB <= lo <= hi < 2 * MIB for lo, hi in gets), gets
    assert "failed its checksum" in second.log()
    # `cache verify` finds nothing bad now; a new flip is reported and dropped.
    mounter.unmount(second)
    assert run_cli(["cache", "verify", "--cache-dir", str(first.cache_dir)]).returncode == 0
    victim = _part_files(first.cache_dir)[0]
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    result = run_cli(["cache", "verify", "--cache-dir", str(first.cache_dir)])
    assert result.returncode == 1 and "1 bad" in result.stdout, result.stdout


def test_reading_3x_the_cache_size_stays_within_the_limit_and_keeps_the_hot_file(
    mounter: Mounter, proxy: NetProxy, store: LocalStore
):
    limit = 24 * MIB
    hot_key = "trust/hot.bin"
    hot = _put_random(store, hot_key, 4 * MIB)
    cold = {
        f"trust/cold-{i}.bin": _put_random(store, f"trust/cold-{i}.bin", 12 * MIB) for i in range(6)
    }
    mount = mounter.mount(
        endpoint=proxy.endpoint,
        extra=["--part-size", "1M", "--cache-size", str(limit), "--cache-min-free", "0"],
    )

    def read_hot() -> bytes:
        return read_past_page_cache(mount.path / hot_key)

    # Read the hot file in three access windows (flushed every second): it is hot.
    for _ in range(3):
        assert read_hot() == hot
        time.sleep(1.5)
    peak = 0
    for key, data in cold.items():
        assert read_hot() == hot
        assert (mount.path / key).read_bytes() == data
        used = _bytes_on_disk(mount.cache_dir)
        peak = max(peak, used)
    # The limit, plus at most one part per reader in flight.
    assert peak <= limit + 2 * MIB, peak
    mounter.unmount(mount)
    stats = run_cli(["cache", "stats", "--json", "--cache-dir", str(mount.cache_dir)]).stdout
    cached = json.loads(stats)["bytes"]
    assert cached <= limit + 2 * MIB
    # The hot file survived the scan of 72 MiB of cold data.
    proxy.reset_counts()
    again = mounter.mount(
        endpoint=proxy.endpoint,
        cache_dir=mount.cache_dir,
        extra=["--part-size", "1M", "--cache-size", str(limit), "--cache-min-free", "0"],
    )
    assert (again.path / hot_key).read_bytes() == hot
    assert _ranged_gets(proxy) == [], "the hot file was evicted"


def test_an_object_overwritten_while_streaming_gives_old_bytes_or_eio_never_a_mix(
    mounter: Mounter, store: LocalStore
):
    key = "trust/changing.bin"
    old = _put_random(store, key, 8 * MIB, seed="old")
    new = random.Random("new").randbytes(8 * MIB)
    mount = mounter.mount(extra=["--part-size", "1M", "--list-ttl", "1"])
    got = bytearray()
    failed = None
    with open(mount.path / key, "rb", buffering=0) as f:
        got += f.read(MIB)
        store.put_bytes(key, new)
        try:
            while chunk := f.read(256 * 1024):
                got += chunk
        except OSError as exc:
            failed = exc
    assert bytes(got) == old[: len(got)], "bytes of the new version leaked into the old"
    if failed is not None:
        assert failed.errno == errno.EIO
        assert "changed since it was opened" in mount.log()
    else:
        assert bytes(got) == old
    time.sleep(1.5)  # past the metadata TTL
    assert (mount.path / key).read_bytes() == new


def test_the_store_stopped_mid_read_gives_eio_quickly_and_reads_recover(
    mounter: Mounter, tmp_path: Path
):
    with LocalStore(tmp_path / "outage-store") as own:
        own.start()
        cached_data = _put_random(own, "cached.bin", 2 * MIB)
        cold_data = _put_random(own, "cold.bin", 4 * MIB)
        mounter.store = own
        mount = mounter.mount(extra=["--part-size", "1M", "--list-ttl", "never"])
        assert (mount.path / "cached.bin").read_bytes() == cached_data
        assert (mount.path / "cold.bin").stat().st_size == len(cold_data)
        own.kill()
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            (mount.path / "cold.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert time.monotonic() - started < 20
        assert os.path.ismount(mount.path)
        assert (mount.path / "cached.bin").read_bytes() == cached_data
        own.restart()
        # Reads recover once the client's "store down" latch lets a probe through.
        deadline = time.monotonic() + 10
        while True:
            try:
                got = (mount.path / "cold.bin").read_bytes()
                break
            except OSError as exc:
                assert exc.errno == errno.EIO
                assert time.monotonic() < deadline, "reads did not recover"
                time.sleep(0.5)
        assert got == cold_data


def test_injected_503s_and_resets_change_no_byte(
    mounter: Mounter, store: LocalStore, sample_tree: dict[str, Path]
):
    port = int(store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port)) as faulty:
        mount = mounter.mount(endpoint=faulty.endpoint, extra=["--part-size", "1M"])
        faulty.set_faults(fail_503_every=4, reset_every=5)
        for key in ("data/2024/02/part-000.bin", "data/2024/01/part-001.bin", "docs/notes.md"):
            assert md5_file(mount.path / key) == md5_file(sample_tree[key]), key
        faulty.set_faults()
        assert "retry" in mount.log() or "resuming" in mount.log()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    path = tmp_path / "tiny-disk"
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_cache_disk_still_serves_correct_reads(
    mounter: Mounter, small_tmpfs: Path, sample_tree: dict[str, Path]
):
    key = "data/2024/02/part-000.bin"  # 3 MiB + 5: more than the disk holds
    want = md5_file(sample_tree[key])
    # Within its own small disk the cache evicts to make room.
    mount = mounter.mount(
        cache_dir=small_tmpfs / "cache", extra=["--part-size", "1M", "--cache-min-free", "0"]
    )
    for _ in range(2):
        assert hashlib.md5((mount.path / key).read_bytes()).hexdigest() == want
    mounter.unmount(mount)
    # Filled by something else, so even evicting everything cannot make room.
    run_cli(["cache", "clear", "--cache-dir", str(small_tmpfs / "cache")])
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    full = mounter.mount(
        cache_dir=small_tmpfs / "cache", extra=["--part-size", "1M", "--cache-min-free", "0"]
    )
    for _ in range(2):
        assert hashlib.md5((full.path / key).read_bytes()).hexdigest() == want
    assert "reading straight from the store" in full.log()


def test_an_unusable_cache_dir_degrades_to_direct_reads(
    mounter: Mounter, tmp_path: Path, sample_tree
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    mount = mounter.mount(
        cache_dir=blocker / "cache", extra=["--log-file", str(tmp_path / "d.log")]
    )
    key = "docs/notes.md"
    assert (mount.path / key).read_bytes() == sample_tree[key].read_bytes()
    assert "reading straight from the store" in (tmp_path / "d.log").read_text()


def _wait_for_parts(cache_dir: Path, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = run_cli(["cache", "stats", "--json", "--cache-dir", str(cache_dir)]).stdout
        if json.loads(stats)["parts"] >= count:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def test_cache_stats_and_clear(mounter: Mounter, sample_tree: dict[str, Path]):
    mount = mounter.mount(extra=["--part-size", "1M"])
    key = "data/2024/01/part-001.bin"
    assert read_past_page_cache(mount.path / key) == sample_tree[key].read_bytes()
    _wait_for_parts(mount.cache_dir, 2)  # parts are written to the cache just after serving
    assert read_past_page_cache(mount.path / key) == sample_tree[key].read_bytes()
    time.sleep(1.5)  # access counts are flushed once a second
    result = run_cli(["cache", "clear", str(mount.path / key)], env=store_env(mounter.store))
    assert result.returncode == 0 and "cleared" in result.stdout, result.stderr
    mounter.unmount(mount)
    stats = run_cli(["cache", "stats", "--json", "--cache-dir", str(mount.cache_dir)]).stdout
    fields = json.loads(stats)
    assert int(fields["parts"]) == 0
    assert int(fields["bytes_fetched"]) == sample_tree[key].stat().st_size
    hits, misses = int(fields["hits"]), int(fields["misses"])
    assert hits >= 2 and misses >= 1  # the second read was served by both cached parts
    assert abs(float(fields["hit_ratio"]) - hits / (hits + misses)) < 0.001
    missing = run_cli(["cache", "stats", "--cache-dir", str(mount.cache_dir / "nope")])
    assert missing.returncode != 0 and "no cache at" in missing.stderr
