"""Tests of scripts/netproxy.py against a tiny local HTTP/1.1 server."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests

from .conftest import serving

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "netproxy.py"


def _load_netproxy() -> ModuleType:
    if "netproxy" in sys.modules:
        return sys.modules["netproxy"]
    spec = importlib.util.spec_from_file_location("netproxy", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netproxy"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


netproxy = _load_netproxy()
NetProxy = netproxy.NetProxy
ProxyConfig = netproxy.ProxyConfig

DATA = random.Random(20240601).randbytes(4 * 1024 * 1024)
SMALL = b"small object body\n" * 10


# --------------------------------------------------------------------------- the test server


def _read_chunked(rfile: Any) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body_for_path(self) -> bytes:
        return DATA if self.path.startswith("/data") else SMALL

    def _send_head(self, body: bytes) -> tuple[int, int]:
        start, end = 0, len(body)
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end = int(first), min(int(last) + 1 if last else len(body), len(body))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        return start, end

    def do_GET(self) -> None:
        self.server.seen.append(("GET", self.path))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for off in range(0, 300_000, 100_000):
                piece = DATA[off : off + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        body = self._body_for_path()
        start, end = self._send_head(body)
        self.wfile.write(body[start:end])

    def do_HEAD(self) -> None:
        self.server.seen.append(("HEAD", self.path))
        self._send_head(self._body_for_path())

    def do_PUT(self) -> None:
        self.server.seen.append(("PUT", self.path))
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = _read_chunked(self.rfile)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.uploads[self.path] = body
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str]] = []
        self.uploads: dict[str, bytes] = {}

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections reset on purpose by the proxy


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    with serving(_Server()) as srv:
        yield srv


@pytest.fixture
def make_proxy(server: _Server) -> Iterator[Callable[..., Any]]:
    proxies: list[Any] = []

    def make(**kwargs: Any) -> Any:
        proxy = NetProxy(ProxyConfig(upstream_port=server.server_address[1], **kwargs))
        proxies.append(proxy)
        proxy.start()
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _recv_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- tests


def test_bytes_and_counts_over_keep_alive(server, make_proxy, session):
    proxy = make_proxy()
    base = proxy.endpoint
    assert base == f"http://127.0.0.1:{proxy.port}"
    assert proxy.counts()["GET"] == 0  # a Counter: unseen methods count 0

    r = session.get(f"{base}/data")
    assert r.status_code == 200 and r.content == DATA
    r = session.get(f"{base}/data", headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206 and r.content == DATA[1000:2000]
    r = session.head(f"{base}/data")
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(DATA))
    r = session.put(f"{base}/upload/a", data=DATA[:1_000_000])
    assert r.status_code == 200
    r = session.put(f"{base}/upload/b", data=iter([DATA[:1000], DATA[1000:71000]]))  # chunked
    assert r.status_code == 200
    r = session.get(f"{base}/chunked")
    assert r.status_code == 200 and r.content == DATA[:300_000]
    r = session.get(f"{base}/small?x=1&y=2")
    assert r.content == SMALL

    assert server.uploads["/upload/a"] == DATA[:1_000_000]
    assert server.uploads["/upload/b"] == DATA[:71000]
    assert proxy.counts() == {"GET": 4, "HEAD": 1, "PUT": 2}
    assert proxy.requests() == [
        ("GET", "/data", None),
        ("GET", "/data", "bytes=1000-1999"),
        ("HEAD", "/data", None),
        ("PUT", "/upload/a", None),
        ("PUT", "/upload/b", None),
        ("GET", "/chunked", None),
        ("GET", "/small?x=1&y=2", None),
    ]
    assert proxy.connections() == 1  # all on one keep-alive connection

    proxy.reset_counts()
    assert proxy.counts() == {} and proxy.requests() == []
    session.head(f"{base}/small")
    assert proxy.counts() == {"HEAD": 1}


def test_expect_100_continue_is_relayed(server, make_proxy):
    proxy = make_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /upload/expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert _recv_head(sock).startswith(b"HTTP/1.1 100")
        sock.sendall(b"hello")
        assert _recv_head(sock).startswith(b"HTTP/1.1 200")
    assert server.uploads["/upload/expect"] == b"hello"
    assert proxy.counts() == {"PUT": 1}


def test_latency_is_added_per_request(make_proxy, session):
    proxy = make_proxy(latency_ms=100)
    session.get(f"{proxy.endpoint}/small")  # connect
    t0 = time.monotonic()
    for _ in range(4):
        assert session.get(f"{proxy.endpoint}/small").content == SMALL
    elapsed = time.monotonic() - t0
    assert elapsed >= 4 * 0.1 * 0.9, elapsed
    assert proxy.connections() == 1


def test_rate_cap(make_proxy, session):
    proxy = make_proxy(rate_bytes_per_s=8e6)
    t0 = time.monotonic()
    r = session.get(f"{proxy.endpoint}/data")  # 4 MiB at 8 MB/s: ~0.52 s
    elapsed = time.monotonic() - t0
    assert r.content == DATA
    assert elapsed >= 0.4, elapsed


def test_fail_503_every_second_request(server, make_proxy, session):
    proxy = make_proxy(fail_503_every=2)
    before = len(server.seen)
    statuses = []
    for i in range(6):
        r = session.get(f"{proxy.endpoint}/small?i={i}")
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.headers["Connection"] == "close"
            assert r.headers["Content-Type"] == "application/xml"
            assert int(r.headers["Content-Length"]) == len(r.content)
            assert b"<Code>SlowDown</Code>" in r.content
            assert b"<Resource>/small</Resource>" in r.content
        else:
            assert r.content == SMALL
    assert statuses == [200, 503] * 3
    assert len(server.seen) - before == 3  # the 503s were not forwarded
    assert proxy.counts() == {"GET": 6}

    # A PUT with a body and a HEAD get a clean 503 too (the body is consumed, no reset).
    proxy.set_faults(fail_503_every=1)
    r = session.put(f"{proxy.endpoint}/upload/never", data=DATA[:500_000])
    assert r.status_code == 503 and b"SlowDown" in r.content
    r = session.head(f"{proxy.endpoint}/small")
    assert r.status_code == 503 and r.content == b""
    assert "/upload/never" not in server.uploads

    proxy.set_faults()
    assert session.get(f"{proxy.endpoint}/small").status_code == 200


def test_503_with_expect_100_continue(server, make_proxy):
    proxy = make_proxy(fail_503_every=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /upload/expect503 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        response = _recv_head(sock)
        while chunk := sock.recv(65536):  # Connection: close
            response += chunk
    assert response.startswith(b"HTTP/1.1 503 ")
    head, _, body = response.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert "/upload/expect503" not in server.uploads


def _broken(call: Callable[[], requests.Response], expected_len: int) -> bool:
    try:
        r = call()
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        return True
    return len(r.content) < expected_len


def test_reset_every(make_proxy, session):
    proxy = make_proxy(reset_every=2)
    base = proxy.endpoint
    assert session.get(f"{base}/data").content == DATA
    assert _broken(lambda: session.get(f"{base}/data"), len(DATA))
    assert session.get(f"{base}/data").content == DATA  # a new connection
    assert _broken(lambda: session.get(f"{base}/chunked"), 300_000)
    assert session.get(f"{base}/small").content == SMALL
    assert _broken(lambda: session.head(f"{base}/small"), 0)
    assert proxy.counts() == {"GET": 5, "HEAD": 1}

    proxy.set_faults()
    for _ in range(3):
        assert session.get(f"{base}/data").content == DATA


def test_reset_is_a_tcp_reset(make_proxy):
    proxy = make_proxy(reset_every=1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /data HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += len(chunk)
    assert received < len(DATA)


def test_lifecycle_and_config(server):
    with pytest.raises(ValueError):
        ProxyConfig(upstream_host="10.0.0.1", upstream_port=80)
    proxy = NetProxy(ProxyConfig(upstream_port=server.server_address[1]))
    proxy.stop()  # never started: fine
    with NetProxy(ProxyConfig(upstream_port=server.server_address[1])) as proxy:
        port = proxy.start()  # already started: same port
        assert port == proxy.port
        assert requests.get(f"{proxy.endpoint}/small", timeout=5).content == SMALL
    proxy.stop()  # idempotent
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/small", timeout=5)


def test_unreachable_upstream_resets_client():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again: nothing listens there
    with (
        NetProxy(ProxyConfig(upstream_port=dead_port)) as proxy,
        pytest.raises(requests.exceptions.ConnectionError),
    ):
        requests.get(f"{proxy.endpoint}/small", timeout=5)


def test_cli(server):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--upstream",
            f"127.0.0.1:{server.server_address[1]}",
            "--listen",
            "0",
            "--latency-ms",
            "2",
            "--rate-mbps",
            "64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        assert requests.get(f"{endpoint}/data", timeout=10).content == DATA
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
