"""Running as a service: --config FILE, config show, periodic progress lines, the mount's
metrics registry, human-readable cache stats, logging handlers."""

from __future__ import annotations

import io
import logging
import logging.handlers
from pathlib import Path
from types import SimpleNamespace

import pytest

from ossfs_resume import cli
from ossfs_resume.cache import PartCache
from ossfs_resume.client import RequestCounters
from ossfs_resume.config import parse_with_config, show_config
from ossfs_resume.core import BucketFS, MountOptions
from ossfs_resume.errors import UsageError
from ossfs_resume.fuse_ops import FuseAdapter
from ossfs_resume.logs import setup_background_logging, setup_logging
from ossfs_resume.metrics import (
    METRICS_XATTR,
    MountMetrics,
    cache_stats_text,
    format_summary,
    parse_metrics,
    summarize,
)
from ossfs_resume.objectstore import MemoryStore
from ossfs_resume.progress import ProgressReporter

# -- --config FILE --------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ossfs.toml"
    path.write_text(text)
    return path


def _parse(argv: list[str]) -> object:
    return parse_with_config(cli.build_parser(), argv)


def test_config_file_values_with_flags_overriding(tmp_path: Path) -> None:
    conf = _write(
        tmp_path,
        'endpoint = "http://store:9000"\ncache-size = "20G"\nthreads = 4\n'
        "[mount]\nmax_parallel = 8\nforeground = true\nlist-ttl = 30\n",
    )
    args = _parse(["mount", "s3://b", "/mnt", "--config", str(conf), "--max-parallel", "3"])
    # --endpoint is required, yet the file is enough; the flag wins over [mount].
    assert args.endpoint == "http://store:9000"
    assert args.cache_size == "20G"
    assert args.max_parallel == 3
    assert args.foreground is True
    assert args.list_ttl == "30"
    # A top-level key applies to every command having that option.
    down = _parse(["download", "s3://b/k", "out", "--config", str(conf)])
    assert down.threads == 4 and down.endpoint == "http://store:9000"
    flag = _parse(["download", "s3://b/k", "out", "--threads=2", f"--config={conf}"])
    assert flag.threads == 2


def test_a_flag_equal_to_the_default_still_wins(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'endpoint = "http://e:1"\n[mount]\nmax_parallel = 8\n')
    args = _parse(["mount", "s3://b", "/m", "--config", str(conf), "--max-parallel", "16"])
    assert args.max_parallel == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown key bogus"),
        ("[mount]\nthreads = 2\n", "unknown key [mount] threads"),
        ("[nothing]\nx = 1\n", "unknown table [nothing]"),
        ('access_key_id = "AK"\n', "looks like a credential"),
        ('[download]\nsecret = "s"\n', "looks like a credential"),
        ("max_parallel = true\n", "must not be true/false"),
        ('[mount]\nmax_parallel = "many"\n', "must be a whole number"),
        ('[mount]\nsignature_version = "v9"\n', "expected one of"),
        ("endpoint = [\n", "not valid TOML"),
    ],
)
def test_bad_config_files_give_one_line(tmp_path: Path, text: str, message: str) -> None:
    conf = _write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        _parse(["mount", "s3://b", "/m", "--endpoint", "http://e:1", "--config", str(conf)])
    assert message in str(info.value)
    assert str(conf) in str(info.value)
    assert "\n" not in str(info.value)


def test_main_reports_a_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    conf = _write(tmp_path, "bogus = 1\n")
    assert cli.main(["cache", "stats", "--config", str(conf)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key bogus" in err and str(conf) in err


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        _parse(["cache", "stats", "--config", str(tmp_path / "none.toml")])


def test_config_show_names_each_source(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'endpoint = "http://store:9000"\n[mount]\ncache_size = "20G"\n')
    text = show_config(cli.build_parser(), "mount", ["--max-parallel", "3"], str(conf))
    lines = {line.split(" = ")[0]: line for line in text.splitlines()}
    assert lines["endpoint"] == 'endpoint = "http://store:9000"  # config file'
    assert lines["cache-size"] == 'cache-size = "20G"  # config file'
    assert lines["max-parallel"] == "max-parallel = 3  # flag"
    assert lines["read-ahead-kb"] == "read-ahead-kb = 1024  # default"
    assert "# region = (not set)  # default" in text


def test_config_show_masks_secret_like_options(tmp_path: Path) -> None:
    # No such option today: the mask is for the day one is added.
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["download"]
    sub.add_argument("--session-token")
    text = show_config(parser, "download", ["--session-token", "abc"], None)
    assert 'session-token = "********"  # flag' in text
    assert "abc" not in text


def test_config_show_through_main(tmp_path: Path, capsys) -> None:
    conf = _write(tmp_path, "threads = 3\n")
    assert cli.main(["config", "show", "--config", str(conf), "prefetch"]) == 0
    out = capsys.readouterr().out
    assert "threads = 3  # config file" in out and out.startswith("# ossfs-resume prefetch")


# -- progress lines off a terminal ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_a_line_every_interval_off_a_terminal() -> None:
    stream, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter("big.bin", mode="auto", stream=stream, clock=clock)
    mib = 1 << 20
    reporter(0, 100 * mib)
    clock.now += 2
    reporter(10 * mib, 100 * mib)
    assert stream.getvalue() == ""  # not yet 5 s
    clock.now += 3
    reporter(25 * mib, 100 * mib)
    assert stream.getvalue() == "big.bin: 25.0 MiB of 100.0 MiB (25%), 5.0 MiB/s, ETA 15 s\n"
    clock.now += 1
    reporter(30 * mib, 100 * mib)
    assert stream.getvalue().count("\n") == 1
    clock.now += 5
    reporter(60 * mib, 100 * mib)
    assert stream.getvalue().splitlines()[-1].startswith("big.bin: 60.0 MiB of 100.0 MiB (60%)")
    reporter.close()


def test_no_periodic_lines_with_progress_never() -> None:
    stream, clock = io.StringIO(), FakeClock()
    reporter = ProgressReporter("k", mode="never", stream=stream, clock=clock)
    reporter(0, 100)
    clock.now += 60
    reporter(50, 100)
    assert stream.getvalue() == ""


# -- the mount's metrics ---------------------------------------------------------------


def test_metrics_registry_after_driving_the_adapter(tmp_path: Path) -> None:
    store = MemoryStore()
    data = bytes(range(256)) * 4096  # 1 MiB
    store.put("dir/file.bin", data)

    def make_core() -> BucketFS:
        return BucketFS(store, PartCache(tmp_path / "cache"), MountOptions(part_size=256 << 10))

    adapter = FuseAdapter(
        make_core, mountpoint=str(tmp_path / "mnt"), metadata_ttl=1.0, read_ahead_kb=0
    )
    adapter.metrics = MountMetrics(lambda: adapter.core)
    adapter.init_with_config(None, None)
    try:
        assert adapter.getattr("/dir/file.bin")["st_size"] == len(data)
        fi = SimpleNamespace(flags=0, fh=0, keep_cache=0)
        adapter.open("/dir/file.bin", fi)
        view = memoryview(bytearray(len(data)))
        n = adapter.read_into(fi, 0, view)
        assert bytes(view[:n]) == data[:n]
        adapter.core.fetcher.wait_idle(5)
        adapter.read_into(fi, 0, memoryview(bytearray(4096)))
        adapter.release("/dir/file.bin", fi)
        with pytest.raises(OSError):
            adapter.getattr("/missing")
        from prometheus_client import generate_latest

        flat = parse_metrics(generate_latest(adapter.metrics.registry).decode())
    finally:
        adapter.destroy("/")
    assert flat['ossfs_fuse_operation_seconds_count{op="getattr"}'] == 2
    assert flat['ossfs_fuse_operation_seconds_count{op="read"}'] == 2
    assert flat['ossfs_fuse_operation_seconds_count{op="open"}'] == 1
    assert flat['ossfs_fuse_errors_total{op="getattr"}'] == 1
    assert flat["ossfs_fuse_read_bytes_total"] == n + 4096
    assert flat["ossfs_cache_misses_total"] >= 1
    assert flat["ossfs_cache_hits_total"] >= 1
    assert flat["ossfs_cache_fetched_bytes_total"] >= n
    assert flat["ossfs_inflight_parts"] == 0
    assert flat["ossfs_inflight_bytes"] == 0
    assert "ossfs_cache_evicted_parts_total" in flat
    # A MemoryStore keeps no request counters: no store figures, and no failure either.
    assert not any(k.startswith("ossfs_store_") for k in flat)
    summary = summarize(flat)
    assert summary["fuse_operations"]["read"]["count"] == 2
    assert "cache" in format_summary(summary)


def test_store_counters_become_metrics_by_kind_and_status() -> None:
    counters = RequestCounters()
    for kind, status in [("get", "206"), ("get", "206"), ("head", "200"), ("get", "503")]:
        counters.add_response(kind, status)
    counters.add("bytes_received", 1234)
    counters.add("retries")
    core = SimpleNamespace(
        client=SimpleNamespace(counters=counters),
        cache=SimpleNamespace(hits=3, misses=1),
        fetcher=SimpleNamespace(inflight=lambda: (2, 4096)),
    )
    metrics = MountMetrics(lambda: core)
    from prometheus_client import generate_latest

    flat = parse_metrics(generate_latest(metrics.registry).decode())
    assert flat['ossfs_store_requests_total{kind="get",status="206"}'] == 2
    assert flat['ossfs_store_requests_total{kind="get",status="503"}'] == 1
    assert flat['ossfs_store_requests_total{kind="head",status="200"}'] == 1
    assert flat['ossfs_store_received_bytes_total{kind="get"}'] == 1234
    assert flat["ossfs_store_retries_total"] == 1
    assert flat["ossfs_inflight_parts"] == 2
    summary = summarize(flat)
    assert summary["store_requests"] == {"head": 1, "get": 3, "list": 0}
    assert summary["store_errors"] == 1
    assert summary["cache_hit_ratio"] == 0.75


def test_the_root_names_the_metrics_endpoint(tmp_path: Path) -> None:
    store = MemoryStore()
    store.put("a", b"x")

    def make_core() -> BucketFS:
        return BucketFS(store, PartCache(tmp_path / "cache"), MountOptions())

    adapter = FuseAdapter(
        make_core,
        mountpoint=str(tmp_path / "mnt"),
        metadata_ttl=1.0,
        read_ahead_kb=0,
        metrics_port=0,
    )
    adapter.metrics = MountMetrics(lambda: adapter.core)
    adapter.init_with_config(None, None)
    try:
        url = adapter.getxattr("/", METRICS_XATTR).decode()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        assert METRICS_XATTR in adapter.listxattr("/")
        from ossfs_resume.metrics import scrape

        assert "ossfs_cache_hits_total" in scrape(url)
    finally:
        adapter.destroy("/")


# -- cache stats ------------------------------------------------------------------------


def test_cache_stats_are_human_readable() -> None:
    text = cache_stats_text(
        {
            "objects": 12,
            "parts": 1234,
            "bytes": 1288490189,
            "limit_bytes": 20 << 30,
            "hits": 3,
            "misses": 1,
            "hit_ratio": 0.75,
            "bytes_fetched": 512,
        }
    )
    lines = {line[:20].strip(): line[20:].strip() for line in text.splitlines()}
    assert lines["bytes"] == "1.2 GiB"
    assert lines["limit bytes"] == "20.0 GiB"
    assert lines["hit ratio"] == "75.0%"
    assert lines["parts"] == "1,234"
    assert lines["bytes fetched"] == "512 B"


# -- logs --------------------------------------------------------------------------------


def test_log_files_are_reopened_after_rotation(tmp_path: Path) -> None:
    log_file = tmp_path / "ossfs.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(0, str(log_file))
        assert isinstance(root.handlers[0], logging.handlers.WatchedFileHandler)
        logging.getLogger("ossfs_resume.t").info("before")
        log_file.rename(tmp_path / "ossfs.log.1")  # logrotate
        logging.getLogger("ossfs_resume.t").info("after")
        assert "after" in log_file.read_text() and "before" not in log_file.read_text()
        assert log_file.stat().st_mode & 0o777 == 0o600
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_background_logs_go_to_syslog_or_the_cache_dir(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        fallback = tmp_path / "ossfs-resume.log"
        where = setup_background_logging(0, fallback, syslog_socket=str(tmp_path / "no-log"))
        assert where == str(fallback) and fallback.exists()
        sock = tmp_path / "log.sock"
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(str(sock))
            where = setup_background_logging(0, fallback, syslog_socket=str(sock))
            assert where == f"syslog ({sock})"
            logging.getLogger("ossfs_resume.core").warning("read %s: %s", "/a/b", "EIO")
            message = server.recv(4096).decode()
        assert "ossfs-resume[" in message and "read /a/b: EIO" in message
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
