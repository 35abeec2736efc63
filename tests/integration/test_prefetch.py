"""`ossfs-resume prefetch`: fills the mount's part cache; the part index is the checkpoint."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, REPO, Mounter, md5_file, run_cli, store_env
from netproxy import NetProxy, ProxyConfig

pytestmark = [pytest.mark.integration, pytest.mark.fuse]

MIB = 1 << 20


def _ranges(proxy: NetProxy) -> set[tuple[int, int]]:
    """(start, end) of every ranged GET the proxy relayed."""
    out = set()
    for method, _path, rng in proxy.requests():
        if method == "GET" and rng:
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
            assert match, rng
            out.add((int(match.group(1)), int(match.group(2))))
    return out


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
        assert _ranges(slow) == set()


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
    cases = [
        (["prefetch", str(mount.path / "docs")], "not a file in an ossfs-resume mount"),
        (["prefetch", str(tmp_path)], "not a file in an ossfs-resume mount"),
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
