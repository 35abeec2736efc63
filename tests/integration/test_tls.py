"""https to a store whose certificate is not trusted: refused at once, in one line, saying
why; trusted with --ca-bundle or the CA variables.

A NetProxy in front of the store speaks TLS with a self-signed certificate and counts
connections before the handshake, so a client retrying a refused handshake would show.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import md5_file, run_cli, store_env
from netproxy import NetProxy, ProxyConfig

from ossfs_resume.client import CA_BUNDLE_ENV

pytestmark = [pytest.mark.integration]

KEY = "data/2024/01/part-001.bin"  # 1 MiB + 17: a few parts at --part-size 256K


@pytest.fixture
def tls_proxy(store, tls_cert: tuple[Path, Path]) -> Iterator[NetProxy]:
    port = int(store.endpoint.rsplit(":", 1)[1])
    cert, key = tls_cert
    with NetProxy(ProxyConfig(upstream_port=port, tls=(str(cert), str(key)))) as proxy:
        yield proxy


def env_without_ca(store) -> dict[str, str]:
    env = store_env(store)
    for name in (*CA_BUNDLE_ENV, "CURL_CA_BUNDLE"):
        env.pop(name, None)
    return env


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ossfs-resume: error: "), lines[0]
    return lines[0]


def download(store, proxy: NetProxy, out: Path, *extra: str, env=None):
    args = [
        "download",
        f"s3://{store.bucket}/{KEY}",
        str(out),
        "--endpoint",
        proxy.endpoint,
        "--part-size",
        "256K",
        "--progress",
        "never",
        *extra,
    ]
    return run_cli(args, env=env if env is not None else env_without_ca(store))


def test_untrusted_certificate_is_refused_in_one_line_without_retries(
    store, tls_proxy: NetProxy, tmp_path: Path
):
    assert tls_proxy.endpoint.startswith("https://127.0.0.1:")
    out = tmp_path / "out.bin"
    line = one_line_error(download(store, tls_proxy, out))
    assert f"cannot connect to {tls_proxy.endpoint} securely" in line
    assert "certificate verify failed: self" in line  # self-signed (or "self signed")
    assert line.endswith("; see --ca-bundle")
    assert tls_proxy.connections() == 1  # one handshake, not one per retry
    assert tls_proxy.requests() == []
    assert sorted(tmp_path.iterdir()) == []  # no file, no checkpoint


def test_mount_with_untrusted_certificate_fails_before_mounting(
    store, tls_proxy: NetProxy, tmp_path: Path
):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["mount", f"s3://{store.bucket}", str(mnt), "--endpoint", tls_proxy.endpoint]
    result = run_cli([*args, "--cache-dir", str(tmp_path / "cache")], env=env_without_ca(store))
    assert "certificate verify failed" in one_line_error(result)
    assert not os.path.ismount(mnt)
    assert tls_proxy.connections() == 1


@pytest.mark.parametrize("how", ["--ca-bundle", *CA_BUNDLE_ENV])
def test_ca_bundle_trusts_the_store(
    store, tls_proxy: NetProxy, tls_cert: tuple[Path, Path], sample_tree, tmp_path: Path, how
):
    out = tmp_path / "out.bin"
    env = env_without_ca(store)
    extra: list[str] = []
    if how == "--ca-bundle":
        extra = ["--ca-bundle", str(tls_cert[0])]
    else:
        env[how] = str(tls_cert[0])
    result = download(store, tls_proxy, out, *extra, env=env)
    assert result.returncode == 0, result.stderr
    assert md5_file(out) == md5_file(sample_tree[KEY])
    assert tls_proxy.counts()["GET"] == 5  # 1 MiB + 17 in parts of 256K


def test_prefetch_with_ca_bundle(store, tls_proxy: NetProxy, tls_cert: tuple[Path, Path], tmp_path):
    args = [
        "prefetch",
        f"s3://{store.bucket}/{KEY}",
        "--endpoint",
        tls_proxy.endpoint,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "256K",
        "--progress",
        "never",
    ]
    refused = run_cli(args, env=env_without_ca(store))
    assert "certificate verify failed" in one_line_error(refused)
    result = run_cli([*args, "--ca-bundle", str(tls_cert[0])], env=env_without_ca(store))
    assert result.returncode == 0, result.stderr
    assert tls_proxy.counts()["GET"] == 5
