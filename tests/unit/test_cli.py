"""Command-line parsing and checks that need no store: ranges, TTLs, CA bundles."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ossfs_resume import cli
from ossfs_resume.errors import OssfsError, UsageError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0.0), ("10", 10.0), ("0.5", 0.5), ("31536000", 31536000.0), ("never", math.inf)],
)
def test_parse_ttl_accepts(text: str, expected: float) -> None:
    assert cli.parse_ttl(text) == expected


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "Infinity", "-1", "1e400", "31536001", "x"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(UsageError, match=r"bad --list-ttl .*0\.\.31536000.*'never'"):
        cli.parse_ttl(text)


def test_check_range() -> None:
    assert cli.check_range("--threads", 256, 1, 256) == 256
    with pytest.raises(UsageError, match=r"^bad --threads 257: must be 1\.\.256$"):
        cli.check_range("--threads", 257, 1, 256)


def test_argparse_mistakes_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["mount", "s3://b", "/mnt", "--max-parallel", "many"])
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "ossfs-resume: error: argument --max-parallel: invalid int value: 'many' "
        "(see ossfs-resume mount --help)"
    ]


def test_resolve_ca_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    assert cli.resolve_ca_bundle(None) is None
    assert cli.resolve_ca_bundle(str(pem)) == str(pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(UsageError, match=r"^\$SSL_CERT_FILE .*missing\.pem does not exist"):
        cli.resolve_ca_bundle(None)
    assert cli.resolve_ca_bundle(str(pem)) == str(pem)  # the option wins over the variable
    monkeypatch.setenv("AWS_CA_BUNDLE", str(pem))
    assert cli.resolve_ca_bundle(None) == str(pem)  # AWS_CA_BUNDLE before SSL_CERT_FILE
    with pytest.raises(UsageError, match="is not a file"):
        cli.resolve_ca_bundle(str(tmp_path))


def test_check_cache_dir(tmp_path: Path) -> None:
    cli.check_cache_dir(tmp_path / "new")  # created on first use
    cli.check_cache_dir(tmp_path)
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(UsageError, match="is not a directory"):
        cli.check_cache_dir(file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left nothing


def test_check_cache_dir_not_writable() -> None:
    with pytest.raises(OssfsError, match="not writable"):
        cli.check_cache_dir(Path("/proc/self"))  # refuses new files, even to root


def test_memory_limit_buys_parallel_fetches() -> None:
    mib = 1 << 20
    default = cli.memory_plan("128M", 8 * mib, None)
    assert (default.max_parallel, default.max_readahead_parts) == (16, 16)
    assert default.max_inflight_bytes == 128 * mib
    big = cli.memory_plan("1G", 8 * mib, None)
    assert (big.max_parallel, big.max_readahead_parts) == (64, 128)  # parallel capped at 64
    small = cli.memory_plan("16M", 8 * mib, None)
    assert (small.max_parallel, small.max_readahead_parts) == (4, 2)  # at least 4 GETs
    assert cli.memory_plan("1G", 8 * mib, 7).max_parallel == 7  # --max-parallel wins
    with pytest.raises(UsageError, match=r"^bad --memory-limit 15M: must hold at least 2 parts"):
        cli.memory_plan("15M", 8 * mib, None)
