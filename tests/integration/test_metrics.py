"""A mount's --metrics-port endpoint agrees with what the store saw, and `stats` shows it."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from conftest import Mounter, run_cli
from netproxy import NetProxy

from ossfs_resume.metrics import METRICS_XATTR, scrape

pytestmark = [pytest.mark.integration, pytest.mark.fuse]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _range_bytes(rng: str | None, size: int) -> int:
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
    assert match, rng
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    return min(end, size - 1) - start + 1


def test_metrics_match_the_bytes_the_store_sent(
    mounter: Mounter, proxy: NetProxy, sample_tree: dict[str, Path]
) -> None:
    port = _free_port()
    mount = mounter.mount(
        endpoint=proxy.endpoint,
        extra=["--part-size", "1M", "--metrics-port", str(port)],
    )
    url = os.getxattr(mount.path, METRICS_XATTR).decode()
    assert url == f"http://127.0.0.1:{port}/metrics"
    key = "data/2024/01/part-001.bin"
    size = sample_tree[key].stat().st_size
    assert (mount.path / key).read_bytes() == sample_tree[key].read_bytes()
    # Read-ahead may still be landing: wait until nothing is in flight.
    deadline = time.monotonic() + 10
    while (flat := scrape(url))["ossfs_inflight_parts"] and time.monotonic() < deadline:
        time.sleep(0.05)
    gets = [(m, t, r) for m, t, r in proxy.requests() if m == "GET" and "list-type" not in t]
    get_bytes = sum(_range_bytes(r, size) for _m, _t, r in gets)
    assert get_bytes >= size
    assert flat['ossfs_store_received_bytes_total{kind="get"}'] == get_bytes
    counted = sum(
        v for k, v in flat.items() if k.startswith('ossfs_store_requests_total{kind="get"')
    )
    assert counted == len(gets)
    assert flat["ossfs_fuse_read_bytes_total"] >= size
    assert flat['ossfs_fuse_operation_seconds_count{op="read"}'] >= 1

    stats = run_cli(["stats", str(mount.path)])
    assert stats.returncode == 0, stats.stderr
    assert "store bytes" in stats.stdout and "cache" in stats.stdout
    as_json = json.loads(run_cli(["stats", str(mount.path), "--json"]).stdout)
    assert as_json["store_bytes"] == get_bytes
    mounter.unmount(mount)


def test_stats_of_a_mount_without_metrics(mounter: Mounter) -> None:
    mount = mounter.mount()
    result = run_cli(["stats", str(mount.path)])
    assert result.returncode == 2
    assert "--metrics-port" in result.stderr and result.stderr.count("\n") == 1
