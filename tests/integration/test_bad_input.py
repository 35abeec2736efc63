"""Bad input: one clear error line, a non-zero exit, before mounting; no hang, no traceback."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from conftest import run_cli, store_env

pytestmark = [pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("ossfs-resume: error: "), line
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def mount_args(store, mnt: Path, tmp_path: Path, *, url: str | None = None, endpoint=None):
    return [
        "mount",
        url or f"s3://{store.bucket}",
        str(mnt),
        "--endpoint",
        endpoint or store.endpoint,
        "--cache-dir",
        str(tmp_path / "cache"),
    ]


def test_unreachable_endpoint(store, mnt: Path, tmp_path: Path):
    started = time.monotonic()
    endpoint = f"http://127.0.0.1:{_free_port()}"
    result = run_cli(mount_args(store, mnt, tmp_path, endpoint=endpoint), env=store_env(store))
    assert_one_line_error(result, "cannot reach", "connection refused")
    assert time.monotonic() - started < 30
    assert not os.path.ismount(mnt)


def test_wrong_credentials(store, mnt: Path, tmp_path: Path):
    env = store_env(store)
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    result = run_cli(mount_args(store, mnt, tmp_path), env=env)
    assert_one_line_error(result, "403")
    assert not os.path.ismount(mnt)


def test_missing_bucket(store, mnt: Path, tmp_path: Path):
    result = run_cli(
        mount_args(store, mnt, tmp_path, url="s3://no-such-bucket-here"), env=store_env(store)
    )
    assert_one_line_error(result, "no-such-bucket-here", "does not exist")
    assert not os.path.ismount(mnt)


def test_missing_mountpoint(store, tmp_path: Path):
    result = run_cli(mount_args(store, tmp_path / "nope", tmp_path), env=store_env(store))
    assert_one_line_error(result, "does not exist")


def test_mountpoint_is_a_file(store, tmp_path: Path):
    target = tmp_path / "file"
    target.write_text("x")
    result = run_cli(mount_args(store, target, tmp_path), env=store_env(store))
    assert_one_line_error(result, "not a directory")
    assert target.read_text() == "x"


def test_mountpoint_not_empty(store, mnt: Path, tmp_path: Path):
    (mnt / "keep.txt").write_text("precious")
    result = run_cli(mount_args(store, mnt, tmp_path), env=store_env(store))
    assert_one_line_error(result, "not empty")
    assert (mnt / "keep.txt").read_text() == "precious"


def test_unknown_url_scheme(store, mnt: Path, tmp_path: Path):
    result = run_cli(
        mount_args(store, mnt, tmp_path, url=f"gs://{store.bucket}"), env=store_env(store)
    )
    assert_one_line_error(result, "unknown URL scheme 'gs'")


@pytest.mark.parametrize("size", ["1K", "6G", "12 parsecs"])
def test_bad_part_size(store, mnt: Path, tmp_path: Path, size: str):
    result = run_cli([*mount_args(store, mnt, tmp_path), "--part-size", size], env=store_env(store))
    assert_one_line_error(result, size.split()[0] if size[0].isdigit() else "bad")
    assert not os.path.ismount(mnt)


def test_credentials_never_appear_in_output_or_logs(store, mnt: Path, tmp_path: Path):
    env = store_env(store)
    env["AWS_SECRET_ACCESS_KEY"] = "sup3r-s3cret-value"
    log_file = tmp_path / "log.txt"
    result = run_cli(
        [*mount_args(store, mnt, tmp_path), "-vv", "--log-file", str(log_file)], env=env
    )
    assert result.returncode != 0
    text = result.stdout + result.stderr + (log_file.read_text() if log_file.exists() else "")
    assert "sup3r-s3cret-value" not in text


@pytest.mark.parametrize("protocol", ["s3", "oss"])
def test_dot_segments_in_a_key_never_name_another_object(
    store, proxy, sample_tree, tmp_path: Path, protocol: str
):
    # Resolved, a/../big/blob.bin is big/blob.bin, which exists: the download must not
    # fetch it. The store gets the key as typed (it refuses such keys: 400 from SeaweedFS).
    assert "big/blob.bin" in sample_tree
    typed = "a/../big/blob.bin"
    out = tmp_path / "blob.bin"
    result = run_cli(
        [
            "download",
            f"{protocol}://{store.bucket}/{typed}",
            str(out),
            "--endpoint",
            proxy.endpoint,
            "--progress",
            "never",
        ],
        env=store_env(store, protocol),
    )
    assert_one_line_error(result, f"{protocol}://{store.bucket}/{typed}")
    assert list(tmp_path.iterdir()) == []  # no file, no checkpoint
    targets = [target for _method, target, _range in proxy.requests()]
    assert targets == [f"/{store.bucket}/a/%2E%2E/big/blob.bin"]
