"""A real SeaweedFS, real FUSE mounts, real tools (md5sum, find, tar, dd, cp, Python)."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    CLI,
    REPO,
    Mounter,
    md5_file,
    store_env,
    unmount,
)
from local_store import BIG_KEY, TAR_KEY, odd_keys
from netproxy import NetProxy, ProxyConfig

pytestmark = [pytest.mark.integration, pytest.mark.fuse]


def test_md5sum_of_every_sample_file_matches(mounter: Mounter, sample_tree: dict[str, Path]):
    mount = mounter.mount()
    keys = sorted(sample_tree)
    out = subprocess.run(
        ["md5sum", *keys], cwd=mount.path, capture_output=True, text=True, check=True
    ).stdout
    got = {line[34:]: line[:32] for line in out.splitlines()}
    want = {key: md5_file(sample_tree[key]) for key in keys}
    assert got == want


def test_ls_and_find_show_the_tree(mounter: Mounter, sample_tree: dict[str, Path]):
    mount = mounter.mount()
    found = subprocess.run(
        ["find", ".", "-type", "f"], cwd=mount.path, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    # Other tests add objects under their own prefixes; the sample tree's are its own.
    tops = {key.split("/")[0] for key in sample_tree}
    files = {line[2:] for line in found if line and line[2:].split("/")[0] in tops}
    assert files == set(sample_tree)
    listing = subprocess.run(
        ["ls", "-ln", "docs"], cwd=mount.path, capture_output=True, text=True, check=True
    ).stdout
    for key in ("docs/readme.txt", "docs/notes.md", "docs/empty.txt"):
        size = sample_tree[key].stat().st_size
        line = next(ln for ln in listing.splitlines() if ln.endswith(" " + key.split("/")[1]))
        assert line.startswith("-r--r--r--"), line
        assert int(line.split()[4]) == size
        st = os.stat(mount.path / key)
        assert st.st_uid == os.getuid() and st.st_size == size
    assert (os.stat(mount.path / "docs").st_mode & 0o777) == 0o555


def test_odd_keys_are_skipped_or_resolved(mounter: Mounter):
    mount = mounter.mount()
    odd = mount.path / "odd"
    names = set(os.listdir(odd))
    assert "ok.txt" in names
    assert (odd / "ok.txt").read_bytes() == odd_keys()["odd/ok.txt"]
    # A key that is both a file and a prefix: the directory wins.
    assert (odd / "clash").is_dir()
    assert "inner.txt" in os.listdir(odd / "clash")
    # A marker object with nothing under it is an empty directory.
    assert (odd / "marker").is_dir() and os.listdir(odd / "marker") == []
    # Names a POSIX file system cannot hold never show up, and nothing crashed.
    for name in names:
        assert name not in ("", ".", "..") and len(name.encode()) <= 255
    assert "is both an object and a prefix" in mount.log()
    assert "longer than 255 bytes" in mount.log()


def test_tar_extracts_an_archive_from_the_bucket(
    mounter: Mounter, sample_tree: dict[str, Path], tmp_path: Path
):
    mount = mounter.mount()
    dest = tmp_path / "untar"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(mount.path / TAR_KEY), "-C", str(dest)], check=True)
    with tarfile.open(sample_tree[TAR_KEY]) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    assert members
    for name in members:
        assert md5_file(dest / name) == md5_file(sample_tree[name]), name


def test_dd_and_cp_copy_exact_bytes(mounter: Mounter, sample_tree: dict[str, Path], tmp_path: Path):
    mount = mounter.mount()
    key = "data/2024/02/part-000.bin"
    subprocess.run(["cp", str(mount.path / key), str(tmp_path / "cp.bin")], check=True)
    assert md5_file(tmp_path / "cp.bin") == md5_file(sample_tree[key])
    subprocess.run(
        ["dd", f"if={mount.path / key}", f"of={tmp_path / 'dd.bin'}", "bs=1M", "status=none"],
        check=True,
    )
    assert md5_file(tmp_path / "dd.bin") == md5_file(sample_tree[key])


def test_random_seek_and_read_at_1000_offsets(mounter: Mounter, sample_tree: dict[str, Path]):
    mount = mounter.mount(extra=["--part-size", "1M"])
    local = sample_tree[BIG_KEY]
    size = local.stat().st_size
    rng = random.Random(7)
    with open(mount.path / BIG_KEY, "rb") as remote, open(local, "rb") as want:
        for _ in range(1000):
            offset = rng.randrange(0, size)
            length = rng.choice([1, 17, 4096, 65536, 200_000, 3 << 20])
            remote.seek(offset)
            want.seek(offset)
            assert remote.read(length) == want.read(length), (offset, length)
        # Reads at and past the end.
        remote.seek(size - 3)
        want.seek(size - 3)
        tail = remote.read(10)
        assert len(tail) == 3 and tail == want.read(10)
        remote.seek(size + 100)
        assert remote.read(10) == b""


def test_oss_and_s3_protocols_read_the_same_bytes(mounter: Mounter, sample_tree: dict[str, Path]):
    s3 = mounter.mount(protocol="s3")
    oss = mounter.mount(protocol="oss")
    for key in ("docs/notes.md", "data/2024/01/part-001.bin", TAR_KEY):
        a = (s3.path / key).read_bytes()
        b = (oss.path / key).read_bytes()
        assert a == b == sample_tree[key].read_bytes(), key
    assert sorted(os.listdir(s3.path)) == sorted(os.listdir(oss.path))


def test_mount_with_prefix_shows_only_that_prefix(mounter: Mounter, sample_tree: dict[str, Path]):
    mount = mounter.mount(prefix="data/2024")
    assert sorted(os.listdir(mount.path)) == ["01", "02"]
    key = "data/2024/02/tiny.bin"
    assert (mount.path / "02" / "tiny.bin").read_bytes() == sample_tree[key].read_bytes()


def test_remount_reuses_cached_parts_without_a_get(
    mounter: Mounter, proxy, sample_tree: dict[str, Path]
):
    key = "data/2024/02/part-000.bin"
    first = mounter.mount(endpoint=proxy.endpoint, extra=["--part-size", "1M"])
    assert md5_file(first.path / key) == md5_file(sample_tree[key])
    assert proxy.counts().get("GET", 0) > 0
    mounter.unmount(first)

    proxy.reset_counts()
    second = mounter.mount(
        endpoint=proxy.endpoint, cache_dir=first.cache_dir, extra=["--part-size", "1M"]
    )
    assert md5_file(second.path / key) == md5_file(sample_tree[key])
    ranged = [r for r in proxy.requests() if r[0] == "GET" and r[2]]
    assert ranged == [], f"remount fetched parts again: {ranged}"
    # Only listings (and at most a HEAD) were needed to confirm the ETag.
    assert proxy.counts().get("HEAD", 0) <= 1


def test_writes_are_refused_with_erofs(mounter: Mounter):
    mount = mounter.mount()
    target = mount.path / "docs" / "readme.txt"
    for action in (
        lambda: open(target, "ab"),  # noqa: SIM115 - must fail before returning
        lambda: open(mount.path / "docs" / "new.txt", "wb"),  # noqa: SIM115
        lambda: os.mkdir(mount.path / "newdir"),
        lambda: os.unlink(target),
        lambda: os.rename(target, mount.path / "docs" / "moved.txt"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno in (errno.EROFS, errno.EACCES), info.value


def test_foreground_mount_unmounts_cleanly_on_sigterm(store, tmp_path: Path):
    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen(
        [
            *CLI,
            "mount",
            f"s3://{store.bucket}",
            str(mnt),
            "--endpoint",
            store.endpoint,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--foreground",
        ],
        env=store_env(store),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.1)
        assert "docs" in os.listdir(mnt)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt)


def test_cli_module_runs_as_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "ossfs_resume.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "mount" in out.stdout


def test_the_mount_gets_1_mib_kernel_read_ahead(mounter: Mounter, tmp_path: Path):
    mount = mounter.mount(name="with space")
    device = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        device = f"{os.major(os.stat(mount.path).st_dev)}:{os.minor(os.stat(mount.path).st_dev)}"
        setting = Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip()
        if setting == "1024":
            break
        time.sleep(0.1)
    assert setting == "1024", (device, setting, mount.log())


def test_more_requests_at_once_than_libfuse_s_default_ten(
    mounter: Mounter, sample_tree: dict[str, Path]
):
    """24 readers blocked on a slow store at once each get their own GET: the mount serves
    more than libfuse's default of 10 requests at a time (counted as connections at the
    store side: a connection per request in flight)."""
    mib = 1 << 20
    source = sample_tree[BIG_KEY].read_bytes()
    port = int(mounter.store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port, latency_ms=300)) as slow:
        mount = mounter.mount(endpoint=slow.endpoint, extra=["--part-size", "1M"])
        path = mount.path / BIG_KEY
        offsets = [(2 * i + 1) * mib + 123 for i in range(24)]
        assert offsets[-1] + 4096 <= len(source)
        start = threading.Barrier(len(offsets))

        def read(offset: int) -> bytes:
            with open(path, "rb", buffering=0) as f:
                start.wait(30)
                return os.pread(f.fileno(), 4096, offset)

        with ThreadPoolExecutor(len(offsets)) as pool:
            got = list(pool.map(read, offsets))
        assert got == [source[o : o + 4096] for o in offsets]
        assert slow.connections() >= 16, mount.log()
