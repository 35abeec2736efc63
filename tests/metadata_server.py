"""A fake instance metadata service on 127.0.0.1: ECS RAM role (OSS) or EC2 IMDSv2 (S3).

Each credentials request gets the next key pair of ``pairs`` (round robin), valid for
``lifetime`` seconds from then. ``token=False`` serves no session token (SeaweedFS refuses
requests carrying a token it did not issue, so integration tests use long-term key pairs).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal


class MetadataServer:
    def __init__(
        self,
        kind: Literal["ec2", "ecs"],
        pairs: list[tuple[str, str]],
        *,
        role: str = "test-role",
        lifetime: float = 3600.0,
        token: bool = True,
    ) -> None:
        self.kind = kind
        self.pairs = pairs
        self.role = role
        self.lifetime = lifetime
        self.token = token
        self.imds_token = secrets.token_hex(16)
        self.counts: Counter[str] = Counter()  # "token", "role", "credentials", "refused"
        self.served: list[str] = []  # key ids, in order
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _base(self) -> str:
        if self.kind == "ecs":
            return "/latest/meta-data/ram/security-credentials/"
        return "/latest/meta-data/iam/security-credentials/"

    def _credentials(self) -> dict[str, str]:
        with self._lock:
            n = self.counts["credentials"]
            self.counts["credentials"] += 1
            key_id, secret = self.pairs[n % len(self.pairs)]
            self.served.append(key_id)
        expires = datetime.fromtimestamp(time.time() + self.lifetime, timezone.utc)
        expiration = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        token = f"token-{n}" if self.token else ""
        if self.kind == "ecs":
            return {
                "AccessKeyId": key_id,
                "AccessKeySecret": secret,
                "SecurityToken": token,
                "Expiration": expiration,
                "Code": "Success",
            }
        return {
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": key_id,
            "SecretAccessKey": secret,
            "Token": token,
            "Expiration": expiration,
        }

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: str, ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                if server.kind == "ec2" and self.path == "/latest/api/token":
                    if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                        self._reply(400, "missing ttl")
                        return
                    with server._lock:
                        server.counts["token"] += 1
                    self._reply(200, server.imds_token)
                    return
                self._reply(404, "not found")

            def do_GET(self) -> None:
                token = self.headers.get("X-aws-ec2-metadata-token")
                if server.kind == "ec2" and token != server.imds_token:
                    with server._lock:
                        server.counts["refused"] += 1
                    self._reply(401, "")
                    return
                base = server._base()
                if self.path == base:
                    with server._lock:
                        server.counts["role"] += 1
                    self._reply(200, server.role)
                elif self.path == base + server.role:
                    self._reply(200, json.dumps(server._credentials()), "application/json")
                else:
                    self._reply(404, "not found")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MetadataServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
