"""A mount's live figures in the Prometheus text format, from a registry of its own.

Most figures are read when scraped, from counters the mount keeps anyway (the
store client's ``RequestCounters``, the part cache's hits and misses, the
engine's in-flight table, the evictor's totals), so they cost the I/O path
nothing. The FUSE operations are timed by the adapter: one ``perf_counter`` pair
and one ``Histogram.observe`` a call.

``ossfs-resume stats MOUNTPOINT`` finds a mount's endpoint in the ``METRICS_XATTR``
extended attribute of the mount's root and summarizes what it serves.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Extended attribute of a mount's root: the URL of its metrics endpoint.
METRICS_XATTR = "user.ossfs_resume.metrics"

DEFAULT_ADDRESS = "127.0.0.1"

#: Every metric a mount serves (the README lists them too).
METRIC_NAMES = (
    "ossfs_store_requests_total",
    "ossfs_store_received_bytes_total",
    "ossfs_store_retries_total",
    "ossfs_cache_hits_total",
    "ossfs_cache_misses_total",
    "ossfs_cache_fetched_bytes_total",
    "ossfs_cache_evicted_parts_total",
    "ossfs_cache_evicted_bytes_total",
    "ossfs_inflight_parts",
    "ossfs_inflight_bytes",
    "ossfs_fuse_operation_seconds",
    "ossfs_fuse_errors_total",
    "ossfs_fuse_read_bytes_total",
)

# Latency buckets from 50 µs (a cached read) to 10 s (a stalled store).
_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25)
_BUCKETS += (0.5, 1.0, 2.5, 5.0, 10.0)


class _MountCollector(Collector):
    """Figures read at scrape time from the mount's core (None before ``init``)."""

    def __init__(self, get_core: Callable[[], Any]) -> None:
        self.get_core = get_core

    def collect(self) -> Iterator[Metric]:
        core = self.get_core()
        if core is None:
            return
        counters = getattr(core.client, "counters", None)
        if counters is not None:
            requests = CounterMetricFamily(
                "ossfs_store_requests",
                "Requests answered by the store (status 'error': no answer), by kind",
                labels=["kind", "status"],
            )
            for (kind, status), n in sorted(counters.by_status().items()):
                requests.add_metric([kind, status], n)
            yield requests
            snap = counters.snapshot()
            received = CounterMetricFamily(
                "ossfs_store_received_bytes",
                "Object bytes received from the store (GET bodies)",
                labels=["kind"],
            )
            received.add_metric(["get"], snap["bytes_received"])
            yield received
            yield CounterMetricFamily(
                "ossfs_store_retries", "Requests retried", value=snap["retries"]
            )
        cache = core.cache
        yield CounterMetricFamily(
            "ossfs_cache_hits", "Part reads served from the cache", value=getattr(cache, "hits", 0)
        )
        yield CounterMetricFamily(
            "ossfs_cache_misses", "Part reads not in the cache", value=getattr(cache, "misses", 0)
        )
        fetched = getattr(cache, "fetched_bytes", None)
        if fetched is not None:
            yield CounterMetricFamily(
                "ossfs_cache_fetched_bytes",
                "Bytes fetched from the store into the cache",
                value=fetched,
            )
        evictor = getattr(cache, "evictor", None)
        if evictor is not None:
            yield CounterMetricFamily(
                "ossfs_cache_evicted_parts",
                "Parts this mount evicted",
                value=evictor.evicted_parts,
            )
            yield CounterMetricFamily(
                "ossfs_cache_evicted_bytes",
                "Bytes this mount evicted",
                value=evictor.evicted_bytes,
            )
        parts, nbytes = core.fetcher.inflight()
        yield GaugeMetricFamily("ossfs_inflight_parts", "Parts being fetched", value=parts)
        yield GaugeMetricFamily(
            "ossfs_inflight_bytes", "Bytes of parts being fetched", value=nbytes
        )


class MountMetrics:
    """The registry of one mount, the FUSE timers, and its HTTP server."""

    def __init__(self, get_core: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_MountCollector(get_core))
        self.fuse_seconds = Histogram(
            "ossfs_fuse_operation_seconds",
            "FUSE operations by name, and how long they took",
            ["op"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.fuse_errors = Counter(
            "ossfs_fuse_errors", "FUSE operations that failed", ["op"], registry=self.registry
        )
        self.read_bytes = Counter(
            "ossfs_fuse_read_bytes", "Bytes read through the mount", registry=self.registry
        )
        self._timers: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}
        self._server: Any = None
        self.url: str | None = None

    def timer(self, op: str) -> Any:
        """The histogram child of `op` (looked up once, then cached)."""
        child = self._timers.get(op)
        if child is None:
            child = self._timers[op] = self.fuse_seconds.labels(op)
        return child

    def failed(self, op: str) -> None:
        child = self._errors.get(op)
        if child is None:
            child = self._errors[op] = self.fuse_errors.labels(op)
        child.inc()

    def serve(self, address: str, port: int) -> str:
        """Start the HTTP server (a daemon thread); returns the URL of ``/metrics``."""
        server = start_http_server(port, addr=address, registry=self.registry)
        self._server = server[0] if isinstance(server, tuple) else None
        host = f"[{address}]" if ":" in address else address
        bound = self._server.server_address[1] if self._server is not None else port
        self.url = f"http://{host}:{bound}/metrics"
        log.info("serving metrics at %s", self.url)
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Fetch `url` and flatten it: ``name{label="v",...}`` -> value (counters with _total)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            flat[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return flat


def format_bytes(n: float) -> str:
    """1288490188 -> '1.2 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _sum(flat: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in flat.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def summarize(flat: dict[str, float]) -> dict[str, Any]:
    """The figures `ossfs-resume stats` shows, from a scrape."""
    hits = _sum(flat, "ossfs_cache_hits_total")
    misses = _sum(flat, "ossfs_cache_misses_total")
    ops: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        base, _, rest = key.partition("{")
        if base in ("ossfs_fuse_operation_seconds_count", "ossfs_fuse_operation_seconds_sum"):
            op = rest.split('op="', 1)[1].split('"', 1)[0]
            ops.setdefault(op, {})[base.rsplit("_", 1)[1]] = value
    return {
        "store_requests": {
            kind: _sum(flat, "ossfs_store_requests_total", kind=kind)
            for kind in ("head", "get", "list")
        },
        "store_errors": sum(
            v
            for k, v in flat.items()
            if k.startswith("ossfs_store_requests_total{") and 'status="2' not in k
        ),
        "store_bytes": _sum(flat, "ossfs_store_received_bytes_total"),
        "retries": _sum(flat, "ossfs_store_retries_total"),
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_ratio": hits / (hits + misses) if hits + misses else 0.0,
        "cache_fetched_bytes": _sum(flat, "ossfs_cache_fetched_bytes_total"),
        "evicted_parts": _sum(flat, "ossfs_cache_evicted_parts_total"),
        "inflight_parts": _sum(flat, "ossfs_inflight_parts"),
        "inflight_bytes": _sum(flat, "ossfs_inflight_bytes"),
        "read_bytes": _sum(flat, "ossfs_fuse_read_bytes_total"),
        "fuse_operations": {
            op: {
                "count": v.get("count", 0.0),
                "mean_ms": v.get("sum", 0.0) / v["count"] * 1000 if v.get("count") else 0.0,
            }
            for op, v in sorted(ops.items())
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    req = summary["store_requests"]
    lines = [
        f"store requests   {int(sum(req.values()))} (get {int(req['get'])}, head "
        f"{int(req['head'])}, list {int(req['list'])}; {int(summary['store_errors'])} "
        f"not 2xx, {int(summary['retries'])} retries)",
        f"store bytes      {format_bytes(summary['store_bytes'])}",
        f"read via mount   {format_bytes(summary['read_bytes'])}",
        f"cache            {int(summary['cache_hits'])} hits, {int(summary['cache_misses'])} "
        f"misses ({summary['cache_hit_ratio']:.1%} hit ratio); "
        f"{format_bytes(summary['cache_fetched_bytes'])} fetched into it, "
        f"{int(summary['evicted_parts'])} parts evicted",
        f"in flight        {int(summary['inflight_parts'])} parts, "
        f"{format_bytes(summary['inflight_bytes'])}",
    ]
    for op, v in summary["fuse_operations"].items():
        lines.append(f"fuse {op:11} {int(v['count'])} calls, {v['mean_ms']:.2f} ms mean")
    return "\n".join(lines)


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)


def cache_stats_text(stats: dict[str, int | float | None]) -> str:
    """``cache stats`` for people: sizes in KiB/MiB/GiB, the hit ratio in %."""
    sizes = {"bytes", "bytes_being_written", "limit_bytes", "min_free_bytes", "bytes_fetched"}
    lines = []
    for name, value in stats.items():
        if value is None:
            shown = "-"
        elif name in sizes:
            shown = format_bytes(value)
        elif name == "hit_ratio":
            shown = f"{value:.1%}"
        else:
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.3f}"
        lines.append(f"{name.replace('_', ' '):20} {shown}")
    return "\n".join(lines)
