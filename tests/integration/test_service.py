"""Run it as a service: fstab and ``mount -t fuse.ossfs-resume``, other users, systemd."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLI, REPO, Mounter, md5_file, store_env, unmount
from local_store import LocalStore

KEY = "data/2024/01/part-001.bin"
READER = "ossfsreader"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, users)")


def _helper_daemons(mountpoint: Path) -> list[int]:
    """Pids of mount-helper-form daemons (``ossfs_resume.cli SOURCE MOUNTPOINT -o``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ossfs_resume.cli" in argv and str(mountpoint).encode() in argv:
            pids.append(int(entry.name))
    return pids


def _wrapper_dir(where: Path) -> Path:
    """A dir with an executable ``ossfs-resume`` running this checkout with this Python."""
    where.mkdir(parents=True, exist_ok=True)
    wrapper = where / "ossfs-resume"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"cd {shlex.quote(str(REPO))}\n"
        f'exec {shlex.quote(sys.executable)} -m ossfs_resume.cli "$@"\n'
    )
    wrapper.chmod(0o755)
    return where


def test_fstab_line_mounts_with_mount_T(
    store: LocalStore, sample_tree: dict[str, Path], tmp_path: Path
) -> None:
    """An fstab line of type fuse.ossfs-resume mounts with util-linux mount and umount.

    mount(8) runs helpers without PATH, so mount.fuse3's /bin/sh finds ``ossfs-resume``
    on the shell's default PATH (/usr/local/sbin first). The test puts its wrapper there
    by a bind mount in a private mount namespace of its own: nothing on the machine
    changes, and everything (mount, read, umount) happens inside that namespace.
    """
    if not shutil.which("unshare") or not os.path.isdir("/usr/local/sbin"):
        pytest.skip("needs unshare(1) and /usr/local/sbin")
    bindir = _wrapper_dir(tmp_path / "bin")
    mnt, cache, log_file = tmp_path / "mnt", tmp_path / "cache", tmp_path / "mount.log"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"s3://{store.bucket}/ {mnt} fuse.ossfs-resume "
        f"_netdev,nofail,noauto,x-systemd.requires=network-online.target,"
        f"endpoint={store.endpoint},cache_dir={cache},log_file={log_file},allow_other,"
        "umask=022 0 0\n"
    )
    script = "\n".join(
        [
            "set -e",
            f"mount --bind {shlex.quote(str(bindir))} /usr/local/sbin",
            f"trap 'umount -l {shlex.quote(str(mnt))} 2>/dev/null || true' EXIT",
            f"mount -T {shlex.quote(str(fstab))} {shlex.quote(str(mnt))}",
            f"grep ' {mnt} ' /proc/self/mounts",
            f"md5sum {shlex.quote(str(mnt / KEY))}",
            f"umount {shlex.quote(str(mnt))}",
            "echo unmounted",
        ]
    )
    env = store_env(store)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # not the wrapper's dir: mount drops PATH
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        for pid in _helper_daemons(mnt):  # only if the script failed to unmount
            os.kill(pid, signal.SIGTERM)
    log = log_file.read_text() if log_file.exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log
    lines = result.stdout.splitlines()
    fields = lines[0].split()
    assert fields[1] == str(mnt) and fields[2] == "fuse.ossfs-resume", lines[0]
    assert "ro" in fields[3].split(","), lines[0]
    assert fields[0] == f"s3://{store.bucket}/"
    assert lines[1].split()[0] == md5_file(sample_tree[KEY])
    assert lines[-1] == "unmounted"
    assert store.access_key_secret not in log and store.access_key_id not in log


def test_helper_form_rejects_unknown_options_and_rw_is_read_only(
    store: LocalStore, tmp_path: Path
) -> None:
    """The helper form names an unknown option in one line and mounts nothing."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        [*CLI, f"s3://{store.bucket}/", str(mnt), "-o", "ro,secret_access_key=hunter2"],
        env=store_env(store),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "secret_access_key" in result.stderr
    assert "hunter2" not in result.stderr
    assert not os.path.ismount(mnt)


def _ensure_reader() -> tuple[int, int]:
    """(uid, gid) of the system user READER, created if missing (kept for reruns)."""
    import pwd

    try:
        entry = pwd.getpwnam(READER)
    except KeyError:
        subprocess.run(
            ["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", READER],
            capture_output=True,
            timeout=30,
        )  # another run may have created it meanwhile: look again
        try:
            entry = pwd.getpwnam(READER)
        except KeyError:
            pytest.skip(f"cannot create the user {READER}")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def shared_mounter(store: LocalStore) -> Iterator[Mounter]:
    """A Mounter whose mount points another user can reach (pytest's tmp dirs are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="ossfs-svc-"))
    base.chmod(0o755)
    m = Mounter(store, base)
    try:
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _as_reader(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", READER, "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


def test_allow_other_lets_another_user_read(
    shared_mounter: Mounter, sample_tree: dict[str, Path]
) -> None:
    _ensure_reader()
    mount = shared_mounter.mount(
        extra=["--allow-other", "--file-mode", "0444", "--dir-mode", "0555"], name="shared"
    )
    result = _as_reader("md5sum", str(mount.path / KEY))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == md5_file(sample_tree[KEY])
    assert (os.stat(mount.path / KEY).st_mode & 0o7777) == 0o444
    assert (os.stat(mount.path).st_mode & 0o7777) == 0o555


def test_without_allow_other_another_user_gets_eacces(shared_mounter: Mounter) -> None:
    _ensure_reader()
    mount = shared_mounter.mount(name="private")
    result = _as_reader("stat", str(mount.path))
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr
    result = _as_reader("cat", str(mount.path / KEY))
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr


def test_uid_gid_and_umask_show_in_stat(mounter: Mounter) -> None:
    mount = mounter.mount(extra=["--uid", "1234", "--gid", "5678", "--umask", "027"])
    for path, mode in ((mount.path, 0o550), (mount.path / KEY, 0o440)):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (1234, 5678), path
        assert st.st_mode & 0o7777 == mode, (path, oct(st.st_mode))


def _systemd_ok() -> str | None:
    """None if systemd runs this machine, else why not."""
    try:
        comm = Path("/proc/1/comm").read_text().strip()
    except OSError as exc:
        return f"cannot read /proc/1/comm: {exc}"
    if comm != "systemd":
        return f"PID 1 is {comm!r}, not systemd"
    if not shutil.which("systemd-run") or not shutil.which("systemctl"):
        return "systemd-run or systemctl is missing"
    state = subprocess.run(
        ["systemctl", "is-system-running"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    if state not in ("running", "degraded"):
        return f"systemctl is-system-running says {state!r}"
    return None


def test_systemd_unit_mounts_and_stop_unmounts(
    store: LocalStore, sample_tree: dict[str, Path], tmp_path: Path
) -> None:
    """``systemd-run`` a foreground mount (Type=simple), read through it, stop the unit."""
    why = _systemd_ok()
    if why:
        pytest.skip(f"no systemd: {why}")
    unit = f"ossfs-test-{uuid.uuid4().hex[:8]}"
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    env_file = tmp_path / "keys.env"
    env_file.touch(mode=0o600)
    env_file.write_text(
        f"AWS_ACCESS_KEY_ID={store.access_key_id}\n"
        f"AWS_SECRET_ACCESS_KEY={store.access_key_secret}\n"
    )
    argv = [
        "systemd-run",
        f"--unit={unit}",
        "--property=Type=simple",
        f"--property=EnvironmentFile={env_file}",
        f"--property=ExecStop={shutil.which('fusermount3') or 'fusermount3'} -u {mnt}",
        f"--working-directory={REPO}",
        *CLI,
        "mount",
        f"s3://{store.bucket}/",
        str(mnt),
        "--endpoint",
        store.endpoint,
        "--cache-dir",
        str(cache),
        "--foreground",
    ]
    started = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling for the mount to appear, not proving an absence
        assert os.path.ismount(mnt), subprocess.run(
            ["journalctl", "-u", unit, "--no-pager"], capture_output=True, text=True
        ).stdout
        assert md5_file(mnt / KEY) == md5_file(sample_tree[KEY])
        stop = subprocess.run(["systemctl", "stop", unit], capture_output=True, timeout=60)
        assert stop.returncode == 0
        assert not os.path.ismount(mnt)
    finally:
        subprocess.run(["systemctl", "stop", unit], capture_output=True, timeout=60)
        subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, timeout=60)
        unmount(mnt)
