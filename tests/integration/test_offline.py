"""The store unreachable under a mount: cached files keep being served, others fail fast.

The mount talks to the store through a proxy; stopping the proxy makes the
store unreachable (connections refused), and a new proxy on the same port
brings it back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time
from pathlib import Path

import pytest
from conftest import Mounter
from local_store import LocalStore
from netproxy import NetProxy, ProxyConfig

MIB = 1 << 20


def _put_random(store: LocalStore, key: str, size: int) -> bytes:
    data = random.Random(key).randbytes(size)
    store.put_bytes(key, data)
    return data


def _read_uncached(path: Path) -> bytes:
    """The file's bytes as the mount serves them now, not from the kernel's page cache."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


def test_cached_files_are_served_offline_and_uncached_reads_fail_fast(
    mounter: Mounter, store: LocalStore, proxy: NetProxy, tmp_path: Path
) -> None:
    cached = _put_random(store, "offline/cached.bin", 300 * 1024 + 7)
    cold = _put_random(store, "offline/cold.bin", 2 * MIB + 3)
    mount = mounter.mount(endpoint=proxy.endpoint, extra=["--part-size", "1M", "--list-ttl", "1"])
    want = hashlib.md5(cached).hexdigest()
    assert hashlib.md5((mount.path / "offline/cached.bin").read_bytes()).hexdigest() == want
    assert (mount.path / "offline/cold.bin").stat().st_size == len(cold)
    port = proxy.port

    proxy.stop()  # the store is unreachable: connections are refused
    time.sleep(1.5)  # past the listing TTL (and the kernel's attribute timeout)

    for _ in range(2):
        data = _read_uncached(mount.path / "offline/cached.bin")
        assert hashlib.md5(data).hexdigest() == want
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        _read_uncached(mount.path / "offline/cold.bin")
    assert info.value.errno == errno.EIO
    assert time.monotonic() - started < 5
    assert os.path.ismount(mount.path)
    log = mount.log()
    assert "store unreachable; serving the listing of /offline" in log
    assert "serving /offline/cached.bin offline" in log
    assert log.count("serving /offline/cached.bin offline") == 1  # one warning per file
    assert "Traceback" not in log

    # The store is back (a new proxy on the same port): the uncached file reads again,
    # once the client's "store down" latch lets a request through to probe it.
    config = ProxyConfig(upstream_port=proxy.config.upstream_port, listen_port=port)
    with NetProxy(config):
        deadline = time.monotonic() + 15
        while True:
            try:
                got = _read_uncached(mount.path / "offline/cold.bin")
                break
            except OSError as exc:
                assert exc.errno == errno.EIO
                assert time.monotonic() < deadline, "reads did not recover"
                time.sleep(0.5)
        assert got == cold
        assert _read_uncached(mount.path / "offline/cached.bin") == cached
