#!/usr/bin/env python3
"""Benchmark: node B's cold read with and without a shared part tier.

Two local stores: the origin behind ``netproxy`` (added latency and a
per-connection rate cap, like a remote region), and the tier on loopback
(an object store near the nodes). Node A reads the object through a mount
with ``--shared-cache`` (filling the tier), then node B, a fresh mount with
its own empty local cache, reads it cold: once without the tier, once with
it. Reported: MB/s, and the bytes node B took from the origin (counted at
the proxy). Page cache dropped before each read. This is a benchmark, not a
test: it prints a Markdown table and writes it to ``--out``.

    .venv/bin/python scripts/bench_shared.py [--size 1073741824] [--latency-ms 20 --rate-mbps 64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

from local_store import LocalStore, work_dir  # noqa: E402
from netproxy import NetProxy, ProxyConfig  # noqa: E402

CLI = [sys.executable, "-m", "ossfs_resume.cli"]
KEY = "bench/shared.bin"


def drop_caches() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def origin_bytes(proxy: NetProxy) -> int:
    total = 0
    for method, _path, rng in proxy.requests():
        if method == "GET" and rng and rng.startswith("bytes="):
            start, _, end = rng[6:].partition("-")
            total += int(end) - int(start) + 1
    return total


@contextlib.contextmanager
def mounted(
    url: str, mnt: Path, cache: Path, endpoint: str, env: dict[str, str], extra: list[str]
) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    log_file = mnt.parent / f"{mnt.name}.log"
    args = [*CLI, "mount", url, str(mnt), "--endpoint", endpoint, "--cache-dir", str(cache)]
    # A local cache that holds the whole object: node A's tier puts that fall behind its
    # reads are read back from it (a smaller cache may evict them first).
    args += ["--cache-size", "8G", "--cache-min-free", "0"]
    subprocess.run([*args, "--log-file", str(log_file), *extra], check=True, env=env, cwd=REPO)
    found = subprocess.run(
        ["pgrep", "-f", f"ossfs_resume.cli mount {url} {mnt} "], capture_output=True, text=True
    )
    daemons = [int(pid) for pid in found.stdout.split()]
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        # The daemon finishes its cache writes and queued tier puts after the kernel lets
        # go: the next node must see what this one stored.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            os.path.ismount(mnt) or any(Path(f"/proc/{pid}").exists() for pid in daemons)
        ):
            time.sleep(0.1)


def timed_read(path: Path, size: int) -> float:
    drop_caches()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return size / (time.perf_counter() - t0) / 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1 << 30)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--rate-mbps", type=float, default=64.0)
    p.add_argument("--out", default="bench-results/shared.md")
    args = p.parse_args()
    base = Path(
        tempfile.mkdtemp(prefix="bench-shared-", dir=work_dir() if work_dir().exists() else None)
    )
    origin = LocalStore(base / "origin", bucket="origin")
    tier = LocalStore(base / "tier", bucket="tier")
    rows: list[tuple[str, float, int]] = []
    try:
        origin.start()
        tier.start()
        src = base / "object.bin"
        with open(src, "wb") as f:
            left = args.size
            while left:
                chunk = os.urandom(min(left, 64 << 20))
                f.write(chunk)
                left -= len(chunk)
        origin.s3_client().upload_file(str(src), origin.bucket, KEY)
        src.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OSS_"))}
        env.update(
            AWS_ACCESS_KEY_ID=origin.access_key_id, AWS_SECRET_ACCESS_KEY=origin.access_key_secret
        )
        creds = base / "tier.passwd"
        creds.write_text(f"{tier.access_key_id}:{tier.access_key_secret}\n")
        creds.chmod(0o600)
        shared = ["--shared-cache", f"s3://{tier.bucket}/bench", "--shared-endpoint", tier.endpoint]
        shared += ["--shared-credentials-file", str(creds)]
        port = int(origin.endpoint.rsplit(":", 1)[1])
        config = ProxyConfig(
            upstream_port=port, latency_ms=args.latency_ms, rate_bytes_per_s=args.rate_mbps * 1e6
        )
        url = f"s3://{origin.bucket}/"
        with NetProxy(config) as proxy:
            for name, extra in (
                ("node A, fills the tier", shared),
                ("node B, no tier", []),
                ("node B, with the tier", shared),
            ):
                proxy.reset_counts()
                cache = base / f"cache-{len(rows)}"
                with mounted(
                    url, base / f"mnt{len(rows)}", cache, proxy.endpoint, env, extra
                ) as mnt:
                    rate = timed_read(mnt / KEY, args.size)
                rows.append((name, rate, origin_bytes(proxy)))
                in_tier = sum(
                    len(page.get("Contents", []))
                    for page in tier.s3_client()
                    .get_paginator("list_objects_v2")
                    .paginate(Bucket=tier.bucket, Prefix="bench/")
                )
                print(f"  parts in the tier after {name}: {in_tier}", flush=True)
                node_log = (base / f"mnt{len(rows) - 1}.log").read_text(errors="replace")
                for line in node_log.splitlines():
                    if "shared cache" in line and ("WARNING" in line or "not stored" in line):
                        print(f"  {name}: {line}", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
                print(
                    f"{name}: {rate:,.0f} MB/s, {rows[-1][2]:,} bytes from the origin", flush=True
                )
    finally:
        origin.stop()
        tier.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
    lines = [
        f"Cold read of {args.size:,} bytes: origin behind netproxy (+{args.latency_ms:g} ms RTT, "
        f"{args.rate_mbps:g} MB/s per connection), shared tier on loopback; one run.",
        "",
        "| node | cold MB/s | bytes from the origin |",
        "|---|---|---|",
        *(f"| {n} | {r:,.0f} | {b:,} |" for n, r, b in rows),
    ]
    if len(rows) == 3 and rows[1][1]:
        lines += ["", f"Node B with the tier / without: {rows[2][1] / rows[1][1]:.2f}x."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
