"""Bad input: one clear error line, a non-zero exit, before mounting; no hang, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli, store_env, unmount

from ossfs_resume.cache import PartCache

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
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if os.path.ismount(path):  # a test that failed by mounting must not leave it behind
        unmount(path)


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `path` (or `path` itself): size, mtime in ns, first bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns, f.read_bytes()[:4096]) for f in files}


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


# -- values out of range, or not what the option takes -------------------------------


def prefetch_args(store, tmp_path: Path, target: str, *, endpoint: str) -> list[str]:
    return [
        "prefetch",
        target,
        "--endpoint",
        endpoint,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--progress",
        "never",
    ]


def download_args(store, tmp_path: Path, *, endpoint: str) -> list[str]:
    return [
        "download",
        f"s3://{store.bucket}/big/blob.bin",
        str(tmp_path / "out.bin"),
        "--endpoint",
        endpoint,
        "--progress",
        "never",
    ]


@pytest.mark.parametrize(
    ("endpoint", "needle"),
    [("http://127.0.0.1:99999", "out of range"), ("http://[::1", "Invalid IPv6 URL")],
    ids=["port-99999", "unclosed-bracket"],
)
@pytest.mark.parametrize("command", ["mount", "prefetch", "download"])
def test_malformed_endpoint(store, mnt: Path, tmp_path: Path, command: str, endpoint, needle):
    if command == "mount":
        args = mount_args(store, mnt, tmp_path, endpoint=endpoint)
    elif command == "prefetch":
        target = f"s3://{store.bucket}/big/blob.bin"
        args = prefetch_args(store, tmp_path, target, endpoint=endpoint)
    else:
        args = download_args(store, tmp_path, endpoint=endpoint)
    result = run_cli(args, env=store_env(store))
    assert_one_line_error(result, "bad endpoint", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]  # no cache, no file
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("command", ["mount", "prefetch"])
def test_cache_dir_is_a_file(store, proxy, mnt: Path, tmp_path: Path, command: str):
    file = tmp_path / "cache"  # where --cache-dir points
    file.write_bytes(b"my notes, not a cache\n")
    before = snapshot(file)
    if command == "mount":
        args = mount_args(store, mnt, tmp_path, endpoint=proxy.endpoint)
    else:
        target = f"s3://{store.bucket}/big/blob.bin"
        args = prefetch_args(store, tmp_path, target, endpoint=proxy.endpoint)
    result = run_cli(args, env=store_env(store))
    assert_one_line_error(result, f"--cache-dir {file} is not a directory")
    assert snapshot(file) == before
    assert not os.path.ismount(mnt)
    assert proxy.requests() == []  # refused before asking the store anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mnt"]


def test_prefetch_of_an_empty_prefix_is_one_line(store, proxy, tmp_path: Path):
    target = f"s3://{store.bucket}/no-such-dir-{os.getpid()}/"
    args = prefetch_args(store, tmp_path, target, endpoint=proxy.endpoint)
    result = run_cli(args, env=store_env(store))
    assert_one_line_error(result, f"nothing to prefetch: no objects under {target}")
    assert [method for method, _path, _range in proxy.requests()] == ["GET"]  # the listing
    assert not (tmp_path / "cache").exists()


def test_prefetch_check_of_a_bucket_url_means_the_whole_bucket(store, proxy, tmp_path: Path):
    target = f"s3://{store.bucket}"
    args = [*prefetch_args(store, tmp_path, target, endpoint=proxy.endpoint), "--check"]
    result = run_cli(args, env=store_env(store))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith(f"s3://{store.bucket}/big/blob.bin") for line in lines), lines
    assert any(line.endswith(f"s3://{store.bucket}/docs/readme.txt") for line in lines), lines
    assert lines[-1].startswith("total: ") and " files complete, 0 B of " in lines[-1]
    assert not [r for r in proxy.requests() if r[2]]  # listed, nothing fetched


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--max-parallel", "20000000", "bad --max-parallel 20000000: must be 1..256"),
        ("--max-parallel", "0", "bad --max-parallel 0: must be 1..256"),
        ("--max-parallel", "many", "invalid int value: 'many'"),
        ("--read-ahead-kb", "-1", "bad --read-ahead-kb -1: must be 0..65536"),
        ("--list-ttl", "nan", "bad --list-ttl 'nan'"),
        ("--list-ttl", "inf", "bad --list-ttl 'inf'"),
        ("--list-ttl", "-1", "bad --list-ttl '-1'"),
        ("--list-ttl", "1e400", "bad --list-ttl '1e400'"),
        ("--cache-size", "0", "bad --cache-size '0': must be more than 0"),
        ("--part-size", "0", "bad part size '0'"),
        ("--memory-limit", "8M", "bad --memory-limit 8M: must hold at least 2 parts (16.0 MiB"),
        ("--memory-limit", "lots", "bad size 'lots'"),
    ],
)
def test_mount_option_out_of_range(
    store, proxy, mnt: Path, tmp_path: Path, option: str, value: str, needle: str
):
    args = [*mount_args(store, mnt, tmp_path, endpoint=proxy.endpoint), f"{option}={value}"]
    result = run_cli(args, env=store_env(store))
    assert_one_line_error(result, needle)
    assert not os.path.ismount(mnt)
    assert proxy.requests() == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--threads", "0", "bad --threads 0: must be 1..256"),
        ("--threads", "20000000", "bad --threads 20000000: must be 1..256"),
        ("--cache-size", "0", "bad --cache-size '0': must be more than 0"),
    ],
)
def test_prefetch_option_out_of_range(
    store, proxy, tmp_path: Path, option: str, value: str, needle: str
):
    target = f"s3://{store.bucket}/big/blob.bin"
    args = [*prefetch_args(store, tmp_path, target, endpoint=proxy.endpoint), option, value]
    result = run_cli(args, env=store_env(store))
    assert_one_line_error(result, needle)
    assert proxy.requests() == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["mount", "prefetch", "download"])
def test_every_option_shows_its_range_in_help(command: str):
    result = run_cli([command, "--help"])
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    expected = {
        "mount": ["100K..5G", "1..256", "0..31536000", "0..65536", "(> 0)", "(>= 0)"],
        "prefetch": ["100K..5G", "1..256", "(> 0)", "(>= 0)"],
        "download": ["100K..5G", "1..256"],
    }[command]
    for needle in [*expected, "port 1..65535", "--ca-bundle FILE"]:
        assert needle in text, needle


# -- a read-only cache -------------------------------------------------------------


@pytest.fixture
def read_only_cache(tmp_path: Path) -> Iterator[Path]:
    """A real cache, seen through a read-only bind mount (root ignores file modes)."""
    source = tmp_path / "cache-src"
    cache = PartCache(source)
    cache.close()
    view = tmp_path / "cache-ro"
    view.mkdir()
    bound = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.decode().strip()}")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(view)]
        ro = subprocess.run(remount, capture_output=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {ro.stderr.decode().strip()}")
        yield view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


@pytest.mark.parametrize("command", ["stats", "verify", "clear"])
def test_cache_commands_on_a_read_only_cache(read_only_cache: Path, command: str):
    before = snapshot(read_only_cache)
    assert before, "the fixture made no cache"
    result = run_cli(["cache", command, "--cache-dir", str(read_only_cache)])
    assert_one_line_error(result, f"cache at {read_only_cache}", "not writable", "Read-only")
    assert snapshot(read_only_cache) == before


def test_new_commands_and_options_give_one_line_and_touch_nothing(
    store, proxy, tmp_path: Path
) -> None:
    """download --cache-dir without a cache, config show of a missing file, stats of a
    directory that is no mount, shared-cache with a bad URL: one line, no request."""
    out = tmp_path / "out.bin"
    not_a_cache = tmp_path / "empty"
    not_a_cache.mkdir()
    cases = [
        (
            [
                *["download", f"s3://{store.bucket}/big/blob.bin", str(out)],
                *["--endpoint", proxy.endpoint, "--cache-dir", str(not_a_cache)],
            ],
            "no cache at --cache-dir",
        ),
        (["config", "show", "--config", str(tmp_path / "absent.toml")], "does not exist"),
        (["stats", str(tmp_path)], "is not an ossfs-resume mount"),
        (
            ["shared-cache", "stats", "ftp://tier", "--endpoint", proxy.endpoint],
            "unknown URL scheme",
        ),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli(args, env=store_env(store)), needle)
    assert proxy.requests() == []
    assert not out.exists()
    assert list(not_a_cache.iterdir()) == []  # a download never creates a cache
