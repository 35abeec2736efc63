"""Shared fixtures: a real SeaweedFS store on 127.0.0.1 and real FUSE mounts.

Mounts are made with the real command line (`ossfs-resume mount`, background
mode) and always unmounted at teardown, lazily if they are busy, even when the
test failed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from local_store import (  # noqa: E402
    LocalStore,
    load_odd_keys,
    load_sample_tree,
    make_sample_tree,
    work_dir,
)
from netproxy import NetProxy, ProxyConfig  # noqa: E402

# No test may ask a real instance metadata service (a non-loopback address) for keys.
NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true", "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}
os.environ.update(NO_METADATA)

BIG_SIZE = int(os.environ.get("OSSFS_TEST_BIG_SIZE", str(1 << 30)))
#: Generated sample data (a 1 GiB file among it) is kept here between runs: under the one
#: work dir of the project's scripts ($OSSFS_RESUME_WORK), or $OSSFS_TEST_DATA.
DATA_DIR = Path(os.environ.get("OSSFS_TEST_DATA") or work_dir() / "testdata")
CLI = [sys.executable, "-m", "ossfs_resume.cli"]
FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


def md5_file(path: Path | str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files: a self-signed certificate for 127.0.0.1 and localhost.

    It is its own CA (so a client given it as its CA bundle trusts it) and is trusted by
    nothing else, like a private store's certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ossfs-resume test store")])
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed certificate for 127.0.0.1."""
    pytest.importorskip("cryptography")
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def sample_tree() -> dict[str, Path]:
    return make_sample_tree(DATA_DIR / "sample", big_size=BIG_SIZE)


@pytest.fixture(scope="session")
def store(
    tmp_path_factory: pytest.TempPathFactory, sample_tree: dict[str, Path]
) -> Iterator[LocalStore]:
    local = LocalStore(tmp_path_factory.mktemp("store"))
    try:
        local.start()
        load_sample_tree(local, sample_tree)
        load_odd_keys(local)  # the store may refuse some (e.g. dot segments); that's fine
        yield local
    finally:
        local.stop()


@pytest.fixture
def proxy(store: LocalStore) -> Iterator[NetProxy]:
    """A counting TCP proxy in front of the store: the server-side view of our requests."""
    port = int(store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port)) as p:
        yield p


def proxy_ranges(proxy: NetProxy) -> list[tuple[int, int]]:
    """(start, end) of every ranged GET the proxy relayed (the server-side view)."""
    out = []
    for method, _path, rng in proxy.requests():
        if method == "GET" and rng:
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
            assert match, rng
            out.append((int(match.group(1)), int(match.group(2))))
    return out


def ranged_bytes(proxy: NetProxy) -> int:
    """Bytes asked for by the ranged GETs the proxy relayed."""
    return sum(end - start + 1 for start, end in proxy_ranges(proxy))


def store_env(store: LocalStore, protocol: str = "s3") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OSS_"))}
    env.update(NO_METADATA)
    if protocol == "s3":
        env["AWS_ACCESS_KEY_ID"] = store.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = store.access_key_secret
    # OSS protocol: anonymous; the store grants anonymous read on the bucket.
    return env


def run_cli(
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 60,
    wrapper: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; `wrapper` goes before it (e.g. ``["prlimit", "--nofile=1024:1024"]``)."""
    return subprocess.run(
        [*(wrapper or []), *CLI, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
    )


def daemon_pids(path: Path | str) -> list[int]:
    """Pids of ossfs-resume mount daemons whose command line names mount point `path`
    (``python -m ossfs_resume.cli mount ...`` or the ``ossfs-resume`` script)."""
    path = str(path)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and path.encode() in argv and any(b"ossfs" in a for a in argv[:3]):
            pids.append(int(entry.name))
    return pids


def unmount(path: Path | str) -> None:
    """Unmount and wait for the daemon to exit: it finishes its cache writes after the
    kernel lets go of the mount point, and tests inspect the cache right after."""
    path = str(path)
    daemons = daemon_pids(path)
    for args in ([FUSERMOUNT, "-u", path], [FUSERMOUNT, "-u", "-z", path]):
        if not os.path.ismount(path):
            break
        subprocess.run(args, capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while os.path.ismount(path) and time.monotonic() < deadline:
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while daemons and time.monotonic() < deadline:
        daemons = [pid for pid in daemons if _running(pid)]
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited


@dataclass
class Mount:
    path: Path
    cache_dir: Path
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@dataclass
class Mounter:
    """Makes mounts with the real CLI and always takes them down."""

    store: LocalStore
    base: Path
    mounts: list[Mount] = field(default_factory=list)

    def mount(
        self,
        *,
        protocol: str = "s3",
        endpoint: str | None = None,
        cache_dir: Path | None = None,
        prefix: str = "",
        extra: list[str] | None = None,
        name: str | None = None,
        wrapper: list[str] | None = None,
    ) -> Mount:
        index = len(self.mounts)
        path = self.base / (name or f"mnt{index}")
        path.mkdir(parents=True, exist_ok=True)
        cache = cache_dir or self.base / f"cache{index}"
        log_file = self.base / f"mount{index}.log"
        url = f"{protocol}://{self.store.bucket}/{prefix}"
        args = [
            "mount",
            url,
            str(path),
            "--endpoint",
            endpoint or self.store.endpoint,
            "--cache-dir",
            str(cache),
            "--log-file",
            str(log_file),
            "-v",
            *(extra or []),
        ]
        result = run_cli(args, env=store_env(self.store, protocol), wrapper=wrapper)
        mount = Mount(path, cache, log_file)
        self.mounts.append(mount)
        assert result.returncode == 0, f"mount failed: {result.stderr}\n{mount.log()}"
        assert os.path.ismount(path), f"not mounted: {result.stderr}\n{mount.log()}"
        return mount

    def unmount(self, mount: Mount) -> None:
        unmount(mount.path)
        assert not os.path.ismount(mount.path)

    def cleanup(self) -> None:
        for mount in self.mounts:
            unmount(mount.path)


@pytest.fixture
def mounter(store: LocalStore, tmp_path: Path) -> Iterator[Mounter]:
    m = Mounter(store, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


# -- the part cache's consistency ------------------------------------------------------

_PART_NAME = re.compile(r"^(\d+)-(\d+)$")


def sweep_cache(cache_dir: Path) -> int:
    """Run the start-up sweep on `cache_dir` (the code path a mount runs at start), in a
    process of its own; returns the rows it dropped."""
    code = (
        "import sys\n"
        "from ossfs_resume.cache import PartCache\n"
        "cache = PartCache(sys.argv[1])\n"
        "print(cache.check_consistency())\n"
        "cache.close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def cache_rows(cache_dir: Path) -> list[tuple[str, int, int, int, str | None]]:
    """(oid, part size, number, length, writer) of every part row, read-only."""
    index = Path(cache_dir) / "index.db"
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT oid, part_size, number, length, writer FROM parts").fetchall()
    finally:
        conn.close()


def assert_cache_consistent(cache_dir: Path | str) -> None:
    """The cache at `cache_dir` (no process using it) is consistent: every ready row has a
    part file of its length, every part file has a row, no reservation and no temp file
    is left, and `ossfs-resume cache verify` finds nothing bad."""
    cache_dir = Path(cache_dir)
    rows = cache_rows(cache_dir)
    reservations = [r for r in rows if r[4] is not None]
    assert not reservations, f"reservations left: {reservations[:5]}"
    known = {(oid, size, number): length for oid, size, number, length, _ in rows}
    parts = cache_dir / "parts"
    for (oid, size, number), length in known.items():
        path = parts / oid[:2] / oid / f"{size}-{number}"
        assert path.is_file(), f"row without a file: {path}"
        assert path.stat().st_size == length, (path, path.stat().st_size, length)
    strays, temps = [], []
    for path in parts.rglob("*"):
        if path.is_dir():
            continue
        if path.name.endswith(".tmp"):
            temps.append(path)
            continue
        match = _PART_NAME.match(path.name)
        oid = path.parent.name
        if not match or (oid, int(match.group(1)), int(match.group(2))) not in known:
            strays.append(path)
    assert not temps, f"temp files left: {temps[:5]}"
    assert not strays, f"part files without a row: {strays[:5]}"
    verify = run_cli(["cache", "verify", "--cache-dir", str(cache_dir)], timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
