#!/usr/bin/env python3
"""Download benchmark: ossfs-resume's resumable_download vs oss2.resumable_download vs aria2c.

Starts its own local store (SeaweedFS on 127.0.0.1), uploads one object, then
downloads it with each tool in the same run, interleaved, with the page cache
dropped before each run. Same threads and part size for the two SDK-style
downloaders; aria2c gets `-x THREADS -s THREADS`. Prints a Markdown table and
writes it to --out. A benchmark, not a test: nothing here asserts a speed.

    .venv/bin/python scripts/bench_download.py [--size 1073741824] [--reps 3]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_store import LocalStore

from ossfs_resume.client import StoreClient, StoreConfig
from ossfs_resume.download import resumable_download

log = logging.getLogger("bench_download")
MIB = 1 << 20


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:  # not root, or a container without it
        log.warning("cannot drop the page cache (%s); figures include cached reads", exc)


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="object size in bytes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--part-size", type=int, default=8 * MIB)
    parser.add_argument("--workdir", type=Path, help="keep the store and data here")
    parser.add_argument("--out", type=Path, default=Path("bench-results/download.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-download-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source.bin"
    if not source.exists() or source.stat().st_size != args.size:
        log.info("writing %d random bytes", args.size)
        with open(source, "wb") as f:
            left = args.size
            while left:
                n = min(left, 64 * MIB)
                f.write(os.urandom(n))
                left -= n
    want = md5(source)
    key = "bench/download.bin"
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)

    store = LocalStore(work / "store")
    try:
        store.start()
        store.put_file(key, source)
        endpoint = store.endpoint
        url = f"{endpoint}/{store.bucket}/{key}"

        def ours(target: Path) -> None:
            client = StoreClient(StoreConfig("oss", endpoint, store.bucket, pool_size=args.threads))
            try:
                resumable_download(
                    client,
                    key,
                    str(target),
                    part_size=args.part_size,
                    num_threads=args.threads,
                )
            finally:
                client.close()

        def with_oss2(target: Path) -> None:
            import oss2

            oss2.defaults.connection_pool_size = args.threads
            bucket = oss2.Bucket(oss2.AnonymousAuth(), endpoint, store.bucket)
            oss2.resumable_download(
                bucket,
                key,
                str(target),
                multiget_threshold=args.part_size,
                part_size=args.part_size,
                num_threads=args.threads,
                store=oss2.ResumableDownloadStore(root=str(work / "oss2-store")),
            )

        def with_aria2(target: Path) -> None:
            subprocess.run(
                [
                    "aria2c",
                    f"-x{args.threads}",
                    f"-s{args.threads}",
                    f"-k{args.part_size // MIB}M",
                    "--file-allocation=none",
                    "--allow-overwrite=true",
                    "--auto-file-renaming=false",
                    "--console-log-level=warn",
                    "--summary-interval=0",
                    "-d",
                    str(target.parent),
                    "-o",
                    target.name,
                    url,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )

        tools: dict[str, Callable[[Path], None]] = {
            "ossfs-resume resumable_download": ours,
            "oss2.resumable_download": with_oss2,
        }
        if shutil.which("aria2c"):
            tools[f"aria2c -x {args.threads}"] = with_aria2
        else:
            log.warning("aria2c is not installed (apt-get install aria2): left out")
        results: dict[str, list[float]] = {name: [] for name in tools}
        for rep in range(args.reps):
            for name, run in tools.items():
                target = out_dir / "download.bin"
                target.unlink(missing_ok=True)
                drop_caches()
                started = time.perf_counter()
                run(target)
                elapsed = time.perf_counter() - started
                if md5(target) != want:
                    raise SystemExit(f"{name}: wrong bytes")
                results[name].append(args.size / elapsed / 1e6)
                log.info("rep %d %s: %.0f MB/s", rep + 1, name, results[name][-1])
    finally:
        store.stop()

    base = statistics.median(results["ossfs-resume resumable_download"])
    lines = [
        f"Download of {args.size / MIB:.0f} MiB from SeaweedFS on 127.0.0.1, "
        f"{args.threads} threads, {args.part_size // MIB} MiB parts, "
        f"median of {args.reps} interleaved runs, page cache dropped before each.",
        "",
        "| tool | MB/s | ossfs-resume is |",
        "|---|---|---|",
    ]
    for name, values in results.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.0f} | {base / median:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
