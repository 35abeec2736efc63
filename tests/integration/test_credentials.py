"""Credential sources against the real store: each signs requests SeaweedFS accepts.

The store has two extra identities with Read/List on the bucket (``readers=2``). A
NetProxy in front of it counts requests by the key id that signed them, so a test sees
which keys were used, not just that reads worked. SeaweedFS checks signatures even though
it grants anonymous read: a request signed with a wrong secret gets 403.

The instance-role test runs a fake IMDSv2 on 127.0.0.1 (never the real address) handing
out short-lived keys that rotate between the two identities. It serves no session token:
SeaweedFS refuses requests carrying a token it did not issue.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli, unmount
from local_store import LocalStore
from metadata_server import MetadataServer
from netproxy import NetProxy, ProxyConfig

pytestmark = [pytest.mark.integration]

FILES = {f"creds/f{i}.txt": f"file {i} ".encode() * (1000 + i) for i in range(4)}


@pytest.fixture(scope="module")
def readers_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStore]:
    local = LocalStore(tmp_path_factory.mktemp("creds-store"), readers=2)
    try:
        local.start()
        for key, data in FILES.items():
            local.put_bytes(key, data)
        yield local
    finally:
        local.stop()


@pytest.fixture
def proxy(readers_store: LocalStore) -> Iterator[NetProxy]:
    port = int(readers_store.endpoint.rsplit(":", 1)[1])
    with NetProxy(ProxyConfig(upstream_port=port)) as p:
        yield p


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No keys in the environment, an empty HOME, no metadata service unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OSS_", "ALIBABA_"))}
    env["HOME"] = str(home)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    env.update(extra)
    return env


def download(
    store: LocalStore, proxy: NetProxy, tmp_path: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "out.txt"
    out.unlink(missing_ok=True)
    args = ["download", f"s3://{store.bucket}/creds/f0.txt", str(out)]
    return run_cli([*args, "--endpoint", proxy.endpoint, "--no-cache", *extra], env=env)


def signed_by(proxy: NetProxy) -> set[str]:
    return {key_id for key_id, n in proxy.key_ids().items() if n}


def test_passwd_file_signs(readers_store: LocalStore, proxy: NetProxy, tmp_path: Path) -> None:
    (ak0, sk0), (ak1, sk1) = readers_store.reader_keys
    passwd = tmp_path / "passwd"
    passwd.write_text(f"# test keys\n{ak1}:{sk1}\n{readers_store.bucket}:{ak0}:{sk0}\n")
    passwd.chmod(0o600)
    result = download(
        readers_store, proxy, tmp_path, clean_env(tmp_path), "--credentials-file", str(passwd)
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.txt").read_bytes() == FILES["creds/f0.txt"]
    assert signed_by(proxy) == {ak0}  # the bucket's line won
    assert sk0 not in result.stderr + result.stdout

    passwd.chmod(0o644)
    result = download(
        readers_store, proxy, tmp_path, clean_env(tmp_path), "--credentials-file", str(passwd)
    )
    assert result.returncode != 0
    assert result.stderr.strip().endswith(
        f"credentials file {passwd} is readable by others (mode 0644): chmod 600 {passwd}"
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_aws_profile_signs(readers_store: LocalStore, proxy: NetProxy, tmp_path: Path) -> None:
    (ak0, sk0), (ak1, sk1) = readers_store.reader_keys
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(
        f"[default]\naws_access_key_id = {ak0}\naws_secret_access_key = {sk0}\n"
        f"[dev]\naws_access_key_id = {ak1}\naws_secret_access_key = {sk1}\n"
    )
    result = download(readers_store, proxy, tmp_path, clean_env(tmp_path), "--profile", "dev")
    assert result.returncode == 0, result.stderr
    assert signed_by(proxy) == {ak1}
    proxy.reset_counts()
    result = download(readers_store, proxy, tmp_path, clean_env(tmp_path, AWS_PROFILE="default"))
    assert result.returncode == 0, result.stderr
    assert signed_by(proxy) == {ak0}


def test_env_signs_and_a_wrong_key_names_its_source(
    readers_store: LocalStore, proxy: NetProxy, tmp_path: Path
) -> None:
    ak0, sk0 = readers_store.reader_keys[0]
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID=ak0, AWS_SECRET_ACCESS_KEY=sk0)
    result = download(readers_store, proxy, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert signed_by(proxy) == {ak0}
    # The store does check signatures: a wrong secret is refused, and the error says
    # where the keys came from.
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID=ak0, AWS_SECRET_ACCESS_KEY="wrong" + sk0)
    result = download(readers_store, proxy, tmp_path, env)
    assert result.returncode != 0
    assert "403" in result.stderr
    assert "credentials from environment (AWS_*)" in result.stderr
    assert sk0 not in result.stderr


@pytest.mark.fuse
def test_mount_with_rotating_instance_role(
    readers_store: LocalStore, proxy: NetProxy, tmp_path: Path
) -> None:
    pairs = readers_store.reader_keys
    lifetime = 4.0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_file = tmp_path / "mount.log"
    with MetadataServer("ec2", pairs, lifetime=lifetime, token=False) as meta:
        env = clean_env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=meta.endpoint)
        del env["AWS_EC2_METADATA_DISABLED"]
        args = [
            "mount",
            f"s3://{readers_store.bucket}/creds/",
            str(mnt),
            "--endpoint",
            proxy.endpoint,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--log-file",
            str(log_file),
            "-v",
        ]
        try:
            result = run_cli(args, env=env)
            log = log_file.read_text() if log_file.exists() else ""
            assert result.returncode == 0, result.stderr + log
            assert os.path.ismount(mnt)
            # Read a new file (a store GET) in each lifetime of the keys.
            for i in range(3):
                if i:
                    time.sleep(lifetime + 0.5)
                data = (mnt / f"f{i}.txt").read_bytes()
                assert data == FILES[f"creds/f{i}.txt"]
            assert (mnt / "f3.txt").read_bytes() == FILES["creds/f3.txt"]
        finally:
            unmount(mnt)
    log = log_file.read_text()
    assert meta.counts["credentials"] >= 3, (meta.counts, log)
    assert meta.counts["refused"] == 0
    used = signed_by(proxy)
    assert used == {ak for ak, _ in pairs}, (proxy.key_ids(), meta.served)
    assert "" not in used  # nothing unsigned
    assert "EC2 instance role test-role" in log
    for _, secret in pairs:
        assert secret not in log


def test_oss_with_only_aws_keys_hints(
    readers_store: LocalStore, proxy: NetProxy, tmp_path: Path
) -> None:
    ak0, sk0 = readers_store.reader_keys[0]
    env = clean_env(tmp_path, AWS_ACCESS_KEY_ID=ak0, AWS_SECRET_ACCESS_KEY=sk0)
    out = tmp_path / "o.txt"
    args = ["download", f"oss://{readers_store.bucket}/creds/f0.txt", str(out)]
    result = run_cli([*args, "--endpoint", proxy.endpoint, "--no-cache", "-v"], env=env)
    # SeaweedFS lets oss:// read anonymously; the log still says why no keys were used.
    assert result.returncode == 0, result.stderr
    assert "oss:// reads OSS_* variables" in result.stderr
    assert signed_by(proxy) == {""}
