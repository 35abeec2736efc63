"""--shared-cache across real mounts: a second SeaweedFS is the shared tier.

The origin sits behind a proxy with latency and a rate cap, and the proxy's
record of ranged GETs says which bytes came from the origin. Nodes are mounts
of the same bucket with their own local caches and the same shared cache.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounter, md5_file, ranged_bytes, run_cli, store_env
from local_store import LocalStore
from netproxy import NetProxy, ProxyConfig

PART = 4 << 20
#: Node A's puts are asynchronous and bounded (256 MiB queued at most): an object that fits
#: lands whole in the tier by unmount, whatever size the sample's big file has.
SIZE = 64 * (1 << 20) + 12345


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStore]:
    """A second store, the shared tier: its own dir, ports and keys."""
    local = LocalStore(tmp_path_factory.mktemp("tier"), bucket="tier")
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture
def origin(store: LocalStore) -> Iterator[NetProxy]:
    port = int(store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port, latency_ms=20, rate_bytes_per_s=64e6)) as p:
        yield p


def _port(store: LocalStore) -> int:
    return int(store.endpoint.rsplit(":", 1)[1])


def _read(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tier_parts(tier: LocalStore) -> dict[str, int]:
    s3 = tier.s3_client()
    found: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=tier.bucket, Prefix="p/"):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = obj["Size"]
    return found


def test_nodes_share_parts_through_the_tier(
    store: LocalStore,
    tier: LocalStore,
    origin: NetProxy,
    mounter: Mounter,
    sample_tree: dict[str, Path],
    tmp_path: Path,
) -> None:
    big_key = f"shared/obj-{random.randrange(1 << 40):010x}.bin"
    data = random.Random(big_key).randbytes(SIZE)
    store.put_bytes(big_key, data)
    expected = hashlib.md5(data).hexdigest()
    parts = -(-SIZE // PART)
    creds = tmp_path / "tier.passwd"
    creds.write_text(f"{tier.access_key_id}:{tier.access_key_secret}\n")
    creds.chmod(0o600)

    def node(name: str, tier_endpoint: str) -> Path:
        extra = ["--part-size", "4M", "--shared-cache", f"s3://{tier.bucket}/p"]
        extra += ["--shared-endpoint", tier_endpoint, "--shared-credentials-file", str(creds)]
        return mounter.mount(endpoint=origin.endpoint, extra=extra, name=name).path

    with NetProxy(ProxyConfig(upstream_port=_port(tier))) as tier_proxy:
        # Node A reads from the origin and fills the tier (its puts finish by unmount).
        a = node("a", tier_proxy.endpoint)
        assert _read(a / big_key) == expected
        assert ranged_bytes(origin) >= SIZE
        mounter.unmount(mounter.mounts[-1])
        stored = _tier_parts(tier)
        log_a = mounter.mounts[-1].log()
        assert len(stored) == parts and sum(stored.values()) == SIZE, (stored, log_a)

        # Node B: a fresh local cache, every part from the tier.
        origin.reset_counts()
        b = node("b", tier_proxy.endpoint)
        assert _read(b / big_key) == expected
        assert ranged_bytes(origin) < SIZE // 100
        log_b = mounter.mounts[-1].log()
        assert "WARNING" not in log_b, log_b

        # One object in the tier corrupted (same metadata, a byte flipped): node C reads
        # that part from the origin, and says so once.
        s3 = tier.s3_client()
        bad = sorted(stored)[3]
        head = s3.head_object(Bucket=tier.bucket, Key=bad)
        body = bytearray(s3.get_object(Bucket=tier.bucket, Key=bad)["Body"].read())
        body[1000] ^= 0xFF
        s3.put_object(Bucket=tier.bucket, Key=bad, Body=bytes(body), Metadata=head["Metadata"])
        origin.reset_counts()
        c = node("c", tier_proxy.endpoint)
        assert _read(c / big_key) == expected
        assert ranged_bytes(origin) == len(body)  # that one part, and nothing else
        log_c = mounter.mounts[-1].log()
        assert log_c.count("is bad (") == 1, log_c
        assert bad in log_c

    # Node D: the tier goes away in the middle of the read (its proxy, slowed so that
    # parts are still arriving from it, is stopped): no read error, the same bytes.
    slow = NetProxy(ProxyConfig(upstream_port=_port(tier), latency_ms=100, rate_bytes_per_s=4e6))
    slow.start()
    try:
        origin.reset_counts()
        d = node("d", slow.endpoint)
        result: dict[str, object] = {}

        def reader() -> None:
            try:
                result["md5"] = _read(d / big_key)
            except Exception as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=reader)
        thread.start()
        # Stop the tier as soon as it has been asked for a part (its answers take > 1 s).
        deadline = time.monotonic() + 30
        while not any(m == "GET" for m, _, _ in slow.requests()):
            assert time.monotonic() < deadline, "node D never asked the tier"
            time.sleep(0.01)
        slow.stop()
        thread.join(60)
        assert not thread.is_alive()
        assert result.get("md5") == expected, result
        assert ranged_bytes(origin) > 0  # what the tier did not deliver came from the origin
        log_d = mounter.mounts[-1].log()
        assert "unreachable" in log_d, log_d
    finally:
        slow.stop()

    # The command line sees the parts, and clears them.
    env = store_env(tier)
    url = f"s3://{tier.bucket}/p"
    stats = run_cli(["shared-cache", "stats", url, "--endpoint", tier.endpoint, "--json"], env=env)
    assert stats.returncode == 0, stats.stderr
    assert f'"objects": {parts}' in stats.stdout, stats.stdout
    cleared = run_cli(["shared-cache", "clear", url, "--endpoint", tier.endpoint], env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert f"deleted {parts} parts" in cleared.stdout
    assert _tier_parts(tier) == {}


def test_prefetch_to_shared_warms_every_node(
    store: LocalStore,
    tier: LocalStore,
    origin: NetProxy,
    mounter: Mounter,
    sample_tree: dict[str, Path],
    tmp_path: Path,
) -> None:
    """One job fills the tier with a directory; then two nodes read it with no origin GET."""
    creds = tmp_path / "tier.passwd"
    creds.write_text(f"{tier.access_key_id}:{tier.access_key_secret}\n")
    creds.chmod(0o600)
    shared = ["--shared-cache", f"s3://{tier.bucket}/warm"]
    shared += ["--shared-endpoint", tier.endpoint, "--shared-credentials-file", str(creds)]
    files = {k: p for k, p in sample_tree.items() if k.startswith("data/") and p.stat().st_size}
    assert files
    job = run_cli(
        [
            "prefetch",
            f"s3://{store.bucket}/data/",
            "--endpoint",
            origin.endpoint,
            "--part-size",
            "4M",
            "--to",
            "shared",
            *shared,
            "--progress",
            "never",
        ],
        env=store_env(store),
        timeout=120,
    )
    assert job.returncode == 0, job.stderr
    origin.reset_counts()
    for name in ("warm-a", "warm-b"):
        extra = ["--part-size", "4M", *shared]
        node = mounter.mount(endpoint=origin.endpoint, extra=extra, name=name)
        for key, src in files.items():
            assert md5_file(node.path / key) == md5_file(src), (name, key)
        log = node.log()
        assert "WARNING" not in log, log
    assert ranged_bytes(origin) == 0  # every byte came from the shared tier
