"""`ossfs-resume prefetch`: fills the mount's part cache; the part index is the checkpoint."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, REPO, Mounter, md5_file, proxy_ranges, run_cli, store_env
from netproxy import NetProxy, ProxyConfig

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

MIB = 1 << 20


def _ranges(proxy: NetProxy) -> set[tuple[int, int]]:
    return set(proxy_ranges(proxy))


@pytest.fixture
def object_32m(store) -> tuple[str, bytes]:
    key = f"prefetch/obj-{random.randrange(1 << 30)}.bin"
    data = random.Random(key).randbytes(32 * MIB + 12345)
    store.put_bytes(key, data)
    return key, data


def test_prefetch_then_reading_through_the_mount_issues_no_get(
    mounter: Mounter, proxy: NetProxy, object_32m
):
    key, data = object_32m
    mount = mounter.mount(endpoint=proxy.endpoint, extra=["--part-size", "1M"])
    path = mount.path / key
    result = run_cli(
        ["prefetch", str(path), "--threads", "4", "--progress", "never"],
        env=store_env(mounter.store),
    )
    assert result.returncode == 0, result.stderr
    assert len(_ranges(proxy)) == 33  # every 1 MiB part, once
    proxy.reset_counts()
    assert hashlib.md5(path.read_bytes()).digest() == hashlib.md5(data).digest()
    assert _ranges(proxy) == set(), "the mount fetched parts that prefetch had cached"
    # A second prefetch finds everything cached and fetches nothing.
    result = run_cli(["prefetch", str(path), "--progress", "never"], env=store_env(mounter.store))
    assert result.returncode == 0, result.stderr
    assert _ranges(proxy) == set()


def test_prefetch_by_url_fills_a_cache_a_later_mount_uses(
    mounter: Mounter, proxy: NetProxy, object_32m, tmp_path: Path
):
    key, data = object_32m
    cache = tmp_path / "shared-cache"
    result = run_cli(
        [
            "prefetch",
            f"s3://{mounter.store.bucket}/{key}",
            "--endpoint",
            proxy.endpoint,
            "--cache-dir",
            str(cache),
            "--part-size",
            "2M",
            "--progress",
            "never",
        ],
        env=store_env(mounter.store),
    )
    assert result.returncode == 0, result.stderr
    proxy.reset_counts()
    mount = mounter.mount(endpoint=proxy.endpoint, cache_dir=cache, extra=["--part-size", "2M"])
    assert (mount.path / key).read_bytes() == data
    assert _ranges(proxy) == set()


def test_kill_9_during_prefetch_then_rerun_fetches_only_missing_parts(
    mounter: Mounter, store, object_32m
):
    key, data = object_32m
    threads, part = 4, MIB
    port = int(store.endpoint.rsplit(":", 1)[1])
    # Slow each connection down so the kill lands mid-run.
    with NetProxy(ProxyConfig(upstream_port=port, rate_bytes_per_s=4e6)) as slow:
        mount = mounter.mount(endpoint=slow.endpoint, extra=["--part-size", "1M"])
        path = mount.path / key
        proc = subprocess.Popen(
            [*CLI, "prefetch", str(path), "--threads", str(threads), "--progress", "never"],
            env=store_env(store),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while len(_ranges(slow)) < 16:
                assert proc.poll() is None, "prefetch ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        first = _ranges(slow)
        assert len(first) < 33
        slow.reset_counts()
        result = run_cli(
            ["prefetch", str(path), "--threads", str(threads), "--progress", "never"],
            env=store_env(store),
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        second = _ranges(slow)
        refetched = sum(end - start + 1 for start, end in first & second)
        assert refetched <= threads * part, (refetched, sorted(first & second))
        assert len(first | second) == 33
        slow.reset_counts()
        assert md5_file(path) == hashlib.md5(data).hexdigest()
        # Every part is cached: the read costs no GET (on failure, say what both logged).
        assert _ranges(slow) == set(), f"{result.stderr}\n{mount.log()}"


def test_prefetch_while_the_mount_reads_the_same_file(
    mounter: Mounter, proxy: NetProxy, object_32m
):
    key, data = object_32m
    mount = mounter.mount(endpoint=proxy.endpoint, extra=["--part-size", "1M"])
    path = mount.path / key
    proc = subprocess.Popen(
        [*CLI, "prefetch", str(path), "--threads", "4", "--progress", "never"],
        env=store_env(mounter.store),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        got = path.read_bytes()
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert got == data
    # Both fetched aligned 1 MiB parts only (the two processes may overlap on a few).
    assert len(_ranges(proxy)) == 33


def test_prefetch_bad_targets(mounter: Mounter, tmp_path: Path):
    mount = mounter.mount()
    env = store_env(mounter.store)
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "notes.txt").write_text("not in a mount\n")
    (tmp_path / "empty").mkdir()
    cases = [
        (["prefetch", str(local)], "not a file in an ossfs-resume mount"),
        (["prefetch", str(tmp_path / "empty")], "nothing to prefetch"),
        (["prefetch"], "prefetch needs a TARGET or --from-file LIST"),
        (["prefetch", "--from-file", str(tmp_path / "no-list")], "no such file"),
        (["prefetch", str(mount.path / "docs"), "--files", "0"], "--files"),
        (["prefetch", str(mount.path / "nope.bin")], "no such file"),
        (["prefetch", f"s3://{mounter.store.bucket}/docs/readme.txt"], "--endpoint is needed"),
        (["prefetch", str(mount.path / "docs" / "readme.txt"), "--threads", "0"], "thread"),
    ]
    for args, needle in cases:
        result = run_cli(args, env=env)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert os.path.ismount(mount.path)


# -- sets: directories, prefixes, lists --------------------------------------------


def _cli_ok(args: list[str], store, **kw) -> subprocess.CompletedProcess[str]:
    result = run_cli([*args, "--progress", "never"], env=store_env(store), **kw)
    assert result.returncode == 0, result.stderr
    return result


def _part_gets(proxy: NetProxy) -> set[tuple[str, str]]:
    """(path, Range) of every ranged GET the proxy relayed: the parts of any object."""
    return {(path, rng) for method, path, rng in proxy.requests() if method == "GET" and rng}


def _read_all(paths: list[Path]) -> None:
    for path in paths:
        path.read_bytes()


def test_prefetch_a_mount_directory_then_reading_it_issues_no_get(
    mounter: Mounter, proxy: NetProxy, sample_tree
):
    mount = mounter.mount(endpoint=proxy.endpoint, extra=["--part-size", "1M"])
    files = sorted(p for p in (mount.path / "data").rglob("*") if p.is_file())
    assert len(files) == 4
    result = _cli_ok(
        ["prefetch", str(mount.path / "data"), "--files", "2", "--threads", "3"], mounter.store
    )
    assert result.stdout.splitlines()[-1] == (
        "cached: 4 of 4 files complete, 4.1 MiB of 4.1 MiB cached (100%)"
    )
    gets = [(path, rng) for method, path, rng in proxy.requests() if method == "GET" and rng]
    assert len(gets) == len(set(gets)) == 1 + 2 + 4 + 1  # every part of the four files, once
    proxy.reset_counts()
    _read_all(files)
    assert _ranges(proxy) == set(), "the mount fetched parts that prefetch had cached"


def test_prefetch_a_url_prefix_fills_a_cache_a_later_mount_uses(
    mounter: Mounter, proxy: NetProxy, sample_tree, tmp_path: Path
):
    cache = tmp_path / "warm-cache"
    url = ["--endpoint", proxy.endpoint, "--cache-dir", str(cache), "--part-size", "1M"]
    target = f"s3://{mounter.store.bucket}/docs/"
    before = _cli_ok(["prefetch", target, *url, "--check"], mounter.store)
    assert before.stdout.splitlines()[-1].startswith("total: 1 of 4 files complete, 0 B of ")
    assert not _ranges(proxy)
    _cli_ok(["prefetch", target, *url], mounter.store)
    after = _cli_ok(["prefetch", target, *url, "--check"], mounter.store)
    lines = after.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("100%") for line in lines[:4]), lines
    assert lines[-1] == "total: 4 of 4 files complete, 5.2 KiB of 5.2 KiB cached (100%)"
    proxy.reset_counts()
    mount = mounter.mount(endpoint=proxy.endpoint, cache_dir=cache, extra=["--part-size", "1M"])
    _read_all([p for p in (mount.path / "docs").iterdir() if p.is_file()])
    assert _ranges(proxy) == set()


def test_prefetch_from_file_in_access_order_relative_to_a_url(
    mounter: Mounter, proxy: NetProxy, sample_tree, tmp_path: Path
):
    listing = tmp_path / "warm.txt"
    listing.write_text("# first the notes\ndocs/notes.md\n\ndata/2024/02/tiny.bin\n")
    cache = tmp_path / "list-cache"
    url = ["--endpoint", proxy.endpoint, "--cache-dir", str(cache), "--part-size", "1M"]
    bucket = f"s3://{mounter.store.bucket}/"
    result = _cli_ok(["prefetch", "--from-file", str(listing), bucket, *url], mounter.store)
    assert result.stdout.splitlines()[-1].startswith("cached: 2 of 2 files complete")
    gets = [path for method, path, rng in proxy.requests() if method == "GET" and rng]
    assert sorted(gets) == sorted(
        f"/{mounter.store.bucket}/{key}" for key in ("docs/notes.md", "data/2024/02/tiny.bin")
    )
    check = _cli_ok(
        ["prefetch", "--from-file", str(listing), bucket, *url, "--check"], mounter.store
    )
    names = [line.rsplit("  ", 1)[1] for line in check.stdout.splitlines()[:-1]]
    assert names == [bucket + "docs/notes.md", bucket + "data/2024/02/tiny.bin"]


def test_a_set_larger_than_the_cache_limit_is_refused_before_fetching(
    mounter: Mounter, proxy: NetProxy, sample_tree, tmp_path: Path
):
    url = ["--endpoint", proxy.endpoint, "--cache-dir", str(tmp_path / "small")]
    result = run_cli(
        ["prefetch", f"s3://{mounter.store.bucket}/data/", *url, "--cache-size", "1M"],
        env=store_env(mounter.store),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ossfs-resume: error: the set is 4.1 MiB, the cache limit 1.0 MiB: "
        "raise --cache-size or prefetch less"
    )
    assert _ranges(proxy) == set()


def test_kill_9_during_a_directory_prefetch_then_rerun_fetches_only_the_rest(store, tmp_path: Path):
    prefix = f"warm-{random.randrange(1 << 30)}/"
    blobs = {f"{prefix}f{i}.bin": random.Random(i).randbytes(6 * MIB + i) for i in range(4)}
    for key, data in blobs.items():
        store.put_bytes(key, data)
    parts = sum(-(-len(d) // MIB) for d in blobs.values())
    threads = 4
    cache = tmp_path / "cache"
    port = int(store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port, rate_bytes_per_s=4e6)) as slow:
        url = ["--endpoint", slow.endpoint, "--cache-dir", str(cache), "--part-size", "1M"]
        args = ["prefetch", f"s3://{store.bucket}/{prefix}", *url, "--threads", str(threads)]
        proc = subprocess.Popen(
            [*CLI, *args, "--files", "2", "--progress", "never"],
            env=store_env(store),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while len(_part_gets(slow)) < 10:
                assert proc.poll() is None, "prefetch ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        first = _part_gets(slow)
        assert len(first) < parts
        check = _cli_ok([*args, "--check"], store).stdout.splitlines()[-1]
        assert check.startswith("total: ") and "(100%)" not in check, check
        slow.reset_counts()
        result = _cli_ok(args, store, timeout=180)
        assert result.stdout.splitlines()[-1].startswith("cached: 4 of 4 files complete")
        second = _part_gets(slow)
        assert len(first & second) <= threads, sorted(first & second)  # in flight at the kill
        assert len(first | second) == parts
        check = _cli_ok([*args, "--check"], store).stdout.splitlines()[-1]
        assert check.endswith("(100%)"), check
