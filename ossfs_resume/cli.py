"""Command line: ``ossfs-resume mount|download|prefetch|cache``.

Every user mistake ends in one line on stderr and a non-zero exit before
anything is mounted or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import sqlite3
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .client import (
    CA_BUNDLE_ENV,
    StoreClient,
    StoreConfig,
    ca_bundle_from_env,
    check_endpoint,
    store_id,
)
from .credentials import ChainOptions
from .credentials import resolve as resolve_credentials
from .download import CHECKPOINT_SUFFIX, DEFAULT_THREADS, MAX_THREADS
from .errors import OssfsError, UsageError
from .logs import check_port_free, setup_background_logging, setup_logging
from .mountopts import (
    file_and_dir_modes,
    fuse_conf_allows_other,
    helper_to_mount_argv,
    is_helper_form,
    parse_id,
    parse_octal,
)
from .objectstore import ObjectMeta
from .parts import DEFAULT_PART_SIZE, check_part_size, parse_size

if TYPE_CHECKING:
    from .cache import PartCache
    from .core import MemoryPlan
    from .shared import SharedTier

log = logging.getLogger("ossfs_resume")

EXIT_ERROR = 1
EXIT_USAGE = 2

#: Upper bound of --max-parallel and --threads: more only adds threads and sockets.
MAX_PARALLEL = MAX_THREADS
#: --list-ttl beyond this is 'never'.
MAX_TTL = 365 * 86400
#: --read-ahead-kb: 64 MiB, far more than any FUSE read gains from.
MAX_READ_AHEAD_KB = 65536


class _Parser(argparse.ArgumentParser):
    """Mistakes argparse catches end in one line too, like those the commands raise."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"ossfs-resume: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


@dataclass(frozen=True)
class BucketUrl:
    protocol: str  # "oss" or "s3"
    bucket: str
    key: str  # prefix for mount, object key for download


def parse_bucket_url(text: str) -> BucketUrl:
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise UsageError(f"bad URL {text!r}: expected oss://BUCKET[/PATH] or s3://BUCKET[/PATH]")
    if scheme not in ("oss", "s3"):
        raise UsageError(f"unknown URL scheme {scheme!r} in {text!r}: use oss:// or s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"bad URL {text!r}: no bucket name")
    return BucketUrl(scheme, bucket, key)


def parse_ttl(text: str) -> float:
    """--list-ttl: seconds in 0..MAX_TTL, or 'never' (math.inf). nan and inf are refused."""
    if text.strip().lower() in ("never", "forever"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_TTL:  # also false for nan
        raise UsageError(f"bad --list-ttl {text!r}: seconds in 0..{MAX_TTL} (a year), or 'never'")
    return value


def check_range(option: str, value: int, low: int, high: int) -> int:
    """`value` of `option` if it is in low..high, else one UsageError saying so."""
    if not low <= value <= high:
        raise UsageError(f"bad {option} {value}: must be {low}..{high}")
    return value


def _store_args(parser: argparse.ArgumentParser, *, endpoint_required: bool = True) -> None:
    parser.add_argument(
        "--endpoint",
        required=endpoint_required,
        help="http(s)://host[:port] of the store (port 1..65535)",
    )
    parser.add_argument("--region", help="signing region (derived from OSS endpoints)")
    parser.add_argument(
        "--signature-version", choices=("v4", "v1"), default="v4", help="OSS signature version"
    )
    parser.add_argument(
        "--addressing",
        choices=("auto", "path", "virtual"),
        default="auto",
        help="bucket in the path or in the host name (auto: path for IPs and localhost)",
    )
    parser.add_argument(
        "--anonymous", action="store_true", help="send unsigned requests even if keys are set"
    )
    parser.add_argument(
        "--credentials-file",
        metavar="FILE",
        help="keys in s3fs/ossfs passwd format (AK:SK or BUCKET:AK:SK lines, mode 600)",
    )
    parser.add_argument(
        "--profile", help="profile in ~/.aws (s3://) or ~/.ossutilconfig, ~/.aliyun (oss://)"
    )
    parser.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="CA certificates (PEM) to verify an https endpoint with; default: the first of "
        f"${', $'.join(CA_BUNDLE_ENV)} that is set, else the bundled certifi CAs",
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    if not any("--config" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--config", metavar="FILE", help="TOML file of option values (flags override it)"
        )
    parser.add_argument("--log-file", help="write logs here (background mounts log nowhere else)")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """The `--progress auto|always|never` option shared by download and prefetch."""
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar (auto: only when stderr is a terminal)",
    )


def _cache_limit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-size",
        help="cache size limit, e.g. 20G (> 0); stored with the cache and shared by every "
        "process using it (default: the stored limit, else 10%% of the cache's disk)",
    )
    parser.add_argument(
        "--cache-min-free",
        help="free space to leave on the cache's disk (>= 0), stored like --cache-size "
        "(default: 5%%, <= 4G)",
    )


def memory_plan(text: str, part_size: int, max_parallel: int | None) -> MemoryPlan:
    """--memory-limit as a plan for the mount, or one UsageError."""
    from .core import plan_memory

    limit = parse_size(text)
    try:
        return plan_memory(limit, part_size, max_parallel)
    except ValueError as exc:
        raise UsageError(
            f"bad --memory-limit {text}: {exc} ({_human(2 * part_size)} "
            f"with part size {_human(part_size)})"
        ) from None


def cache_limits(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(--cache-size, --cache-min-free) in bytes, None where not given."""
    size = parse_size(args.cache_size) if args.cache_size else None
    if size is not None and size <= 0:
        raise UsageError(f"bad --cache-size {args.cache_size!r}: must be more than 0")
    floor = parse_size(args.cache_min_free) if args.cache_min_free else None
    return size, floor


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ossfs-resume",
        description="Mount an OSS or S3-compatible bucket read-only, with a resumable part cache.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="mount a bucket (read-only)")
    mount.add_argument("url", help="oss://BUCKET[/PREFIX] or s3://BUCKET[/PREFIX]")
    mount.add_argument("mountpoint")
    _store_args(mount)
    mount.add_argument("--cache-dir", help="persistent part cache (default under $XDG_CACHE_HOME)")
    mount.add_argument(
        "--part-size", default=str(DEFAULT_PART_SIZE), help="part size, e.g. 8M (100K..5G)"
    )
    mount.add_argument(
        "--list-ttl",
        "--stat-ttl",
        dest="list_ttl",
        default="10",
        help="seconds a listing, and the sizes, mtimes and ETags in it, are trusted "
        f"(stats come from listings, so one TTL covers both): 0..{MAX_TTL}, "
        "0 = always revalidate, or 'never' (default 10)",
    )
    mount.add_argument(
        "--memory-limit",
        default="128M",
        help="memory for part data: fetches in flight, read-ahead, parts kept for readers "
        "(at least 2 parts; default 128M: peak RSS stays under 200 MiB). More buys more "
        "parallel fetches, for long links",
    )
    mount.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help=f"parallel part fetches (1..{MAX_PARALLEL}; default: parts that fit "
        "--memory-limit, 4..64, so 16 with the defaults)",
    )
    mount.add_argument(
        "--read-ahead-kb",
        type=int,
        default=1024,
        help=f"kernel read-ahead for the mount (0..{MAX_READ_AHEAD_KB}, default 1024; "
        "needs root; 0 keeps the kernel's 128)",
    )
    _cache_limit_args(mount)
    add_access_options(mount)
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (http://ADDRESS:PORT/metrics)",
    )
    mount.add_argument("--metrics-address", default="127.0.0.1", help="address to serve metrics on")
    add_shared_options(mount)
    _common_args(mount)

    prefetch = sub.add_parser(
        "prefetch",
        help="fill the part cache for files, directories or prefixes (parallel, resumable)",
    )
    prefetch.add_argument(
        "targets",
        nargs="*",
        metavar="TARGET",
        help="a file or directory in a mount, or oss://BUCKET[/KEY|/PREFIX/] (a bucket or a "
        "PREFIX/ means everything under it); with --from-file, a URL is the base of its keys",
    )
    prefetch.add_argument(
        "--from-file",
        metavar="LIST",
        help="files to prefetch, one path or key a line, in access order (blank lines and "
        "# comments skipped; keys are relative to the URL target)",
    )
    _store_args(prefetch, endpoint_required=False)
    prefetch.add_argument("--cache-dir", help="cache dir (for oss:// targets; default as mount)")
    prefetch.add_argument(
        "--part-size",
        default=str(DEFAULT_PART_SIZE),
        help="part size for oss:// targets, e.g. 8M (100K..5G)",
    )
    prefetch.add_argument(
        "--threads",
        type=int,
        default=8,
        help=f"parallel part fetches in all (1..{MAX_PARALLEL}, default 8)",
    )
    prefetch.add_argument(
        "--files",
        type=int,
        default=4,
        help=f"files fetched at once, sharing the --threads (1..{MAX_PARALLEL}, default 4)",
    )
    prefetch.add_argument(
        "--check",
        action="store_true",
        help="only report how much of each file is cached; fetch nothing",
    )
    prefetch.add_argument(
        "--to",
        choices=("local", "shared"),
        default="local",
        help="fill the local part cache (default) or the shared part tier (--shared-cache)",
    )
    add_shared_options(prefetch)
    _cache_limit_args(prefetch)
    add_progress_option(prefetch)
    _common_args(prefetch)

    add_download_parser(sub)

    cache = sub.add_parser("cache", help="inspect or clean the part cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (
        ("stats", "objects, parts, bytes, hit ratio, bytes fetched"),
        ("verify", "check every cached part's checksum; drop and report bad ones"),
        ("clear", "forget cached parts: all, or those of the given files"),
    ):
        cmd = cache_sub.add_parser(name, help=text)
        cmd.add_argument("--cache-dir", help="the cache dir (default as mount)")
        if name == "stats":
            cmd.add_argument("--json", action="store_true", help="the raw figures, as JSON")
        if name == "clear":
            cmd.add_argument(
                "targets", nargs="*", metavar="PATH", help="files in a mount, or oss://BUCKET/KEY"
            )
            _store_args(cmd, endpoint_required=False)
        _common_args(cmd)
    add_service_parsers(sub)
    add_shared_cache_parser(sub)
    return parser


#: Keys in the environment: the chain's first source, unless a --shared-* option names one.
KEY_VARIABLES = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "OSS_ACCESS_KEY_ID",
        "OSS_ACCESS_KEY_SECRET",
        "OSS_SESSION_TOKEN",
    }
)


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """--shared-cache and how to reach it: a part tier shared by many nodes."""
    parser.add_argument(
        "--shared-cache",
        metavar="URL",
        help="s3://BUCKET[/PREFIX] or oss://BUCKET[/PREFIX]: parts shared by every node "
        "mounting with it (read before the origin, filled by each node's origin reads)",
    )
    parser.add_argument(
        "--shared-endpoint",
        metavar="URL",
        help="http(s)://host[:port] of the shared cache's store (default: --endpoint)",
    )
    parser.add_argument(
        "--shared-credentials-file",
        metavar="FILE",
        help="keys for the shared cache (passwd format), used before keys in the environment "
        "(default: the same chain as the origin)",
    )
    parser.add_argument(
        "--shared-profile", help="profile for the shared cache's keys (as --profile)"
    )


def add_shared_cache_parser(sub: Any) -> None:
    shared = sub.add_parser("shared-cache", help="inspect or clear a shared part tier")
    shared_sub = shared.add_subparsers(dest="shared_command", required=True)
    for name, text in (
        ("stats", "objects and bytes under PREFIX/parts/"),
        ("clear", "delete every part under PREFIX/parts/"),
    ):
        cmd = shared_sub.add_parser(name, help=text)
        cmd.add_argument("url", metavar="URL", help="s3://BUCKET[/PREFIX] or oss://BUCKET[/PREFIX]")
        _store_args(cmd)
        if name == "stats":
            cmd.add_argument("--json", action="store_true", help="the figures as JSON")
        _common_args(cmd)


def _dir_prefix(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def shared_tier_target(args: argparse.Namespace) -> tuple[BucketUrl, StoreOptions] | None:
    """The --shared-cache bucket and how to reach it (None without one); checked."""
    if not getattr(args, "shared_cache", None):
        return None
    url = parse_bucket_url(args.shared_cache)
    endpoint = args.shared_endpoint or args.endpoint
    if not endpoint:
        raise UsageError("--shared-cache needs --shared-endpoint (or --endpoint)")
    check_endpoint(endpoint)
    base = StoreOptions.from_args(args)
    options = dataclasses.replace(
        base,
        endpoint=endpoint,
        anonymous=False,  # a tier is written to: it needs keys
        credentials_file=_abspath(args.shared_credentials_file) or base.credentials_file,
        profile=args.shared_profile or base.profile,
    )
    return url, options


def make_shared_tier(args: argparse.Namespace, *, timeout: float = 2.0) -> SharedTier | None:
    """The shared tier of --shared-cache on a client of its own (a mount's: short timeouts,
    so a slow tier never holds a read up)."""
    from .shared import SharedTier, tier_client_settings

    target = shared_tier_target(args)
    if target is None:
        return None
    url, options = target
    env: dict[str, str] | None = None
    if args.shared_credentials_file or args.shared_profile:
        # Asked for by name: these win over the origin's keys in the environment.
        env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    client = make_client(
        url, options, pool_size=8, credentials_env=env, **tier_client_settings(timeout)
    )
    return SharedTier(client, _dir_prefix(url.key), timeout=timeout)


def cmd_shared_cache(args: argparse.Namespace) -> int:
    url = parse_bucket_url(args.url)
    parts = _dir_prefix(url.key) + "parts/"
    client = make_client(url, StoreOptions.from_args(args))
    where = f"{url.protocol}://{url.bucket}/{parts}"
    try:
        objects = nbytes = 0
        for page in client.list(parts, delimiter=""):
            for obj in page.objects:
                if args.shared_command == "clear":
                    client.delete_object(obj.key)
                objects += 1
                nbytes += obj.size
    finally:
        client.close()
    if args.shared_command == "clear":
        print(f"deleted {objects} parts ({_human(nbytes)}) under {where}")
    elif args.json:
        print(json.dumps({"url": where, "objects": objects, "bytes": nbytes}))
    else:
        print(f"{where}: {objects} parts, {_human(nbytes)}")
    return 0


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{nbytes} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} bytes"


def add_access_options(parser: argparse.ArgumentParser) -> None:
    """Who may use a mount, and the owner and modes its files show."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users use the mount (non-root: needs user_allow_other in /etc/fuse.conf)",
    )
    group.add_argument(
        "--allow-root", action="store_true", help="let root use the mount too (not other users)"
    )
    parser.add_argument("--uid", help="owner of every file and dir (default: yours)")
    parser.add_argument("--gid", help="group of every file and dir (default: yours)")
    parser.add_argument(
        "--umask", help="octal, e.g. 022: bits cleared from both modes (unless given below)"
    )
    parser.add_argument("--file-mode", help="octal mode of files (default 0444)")
    parser.add_argument("--dir-mode", help="octal mode of directories (default 0555)")


def access_options(args: argparse.Namespace) -> dict[str, int]:
    """MountOptions' uid, gid, file_mode and dir_mode from the mount's options."""
    umask = parse_octal("--umask", args.umask, 0o777) if args.umask else None
    file_mode = parse_octal("--file-mode", args.file_mode) if args.file_mode else None
    dir_mode = parse_octal("--dir-mode", args.dir_mode) if args.dir_mode else None
    files, dirs = file_and_dir_modes(file_mode, dir_mode, umask)
    found: dict[str, int] = {"file_mode": files, "dir_mode": dirs}
    if args.uid:
        found["uid"] = parse_id("--uid", args.uid)
    if args.gid:
        found["gid"] = parse_id("--gid", args.gid)
    return found


def check_allow_other(args: argparse.Namespace) -> None:
    """Non-root --allow-other/--allow-root without user_allow_other: one line, before mounting."""
    wanted = "--allow-other" if args.allow_other else "--allow-root" if args.allow_root else ""
    if wanted and os.geteuid() != 0 and not fuse_conf_allows_other():
        raise UsageError(
            f"{wanted} needs a line 'user_allow_other' in /etc/fuse.conf when not run as root"
        )


@dataclass(frozen=True)
class StoreOptions:
    """How to reach a store, as the user gave it (options, or what a mount says of a file)."""

    endpoint: str
    region: str | None = None
    signature_version: str = "v4"
    addressing: str = "auto"
    anonymous: bool = False
    ca_bundle: str | None = None
    credentials_file: str | None = None
    profile: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StoreOptions:
        return cls(
            endpoint=args.endpoint,
            region=args.region,
            signature_version=args.signature_version,
            addressing=args.addressing,
            anonymous=args.anonymous,
            ca_bundle=getattr(args, "ca_bundle", None),
            # Absolute: a background mount resolves it after leaving the working directory.
            credentials_file=_abspath(getattr(args, "credentials_file", None)),
            profile=getattr(args, "profile", None),
        )


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def make_client(
    url: BucketUrl,
    options: StoreOptions,
    *,
    pool_size: int = 16,
    credentials_env: Mapping[str, str] | None = None,
    **kw: Any,
) -> StoreClient:
    """A client for `url`'s bucket, from typed options (keys: the chain, over
    `credentials_env` instead of the environment when given)."""
    chain = ChainOptions(options.credentials_file, options.profile, options.anonymous)
    source = resolve_credentials(url.protocol, url.bucket, chain, env=credentials_env)
    config = StoreConfig(
        ca_bundle=resolve_ca_bundle(options.ca_bundle),
        protocol=url.protocol,  # type: ignore[arg-type]
        endpoint=options.endpoint.rstrip("/"),
        bucket=url.bucket,
        credentials_provider=source,
        region=options.region,
        signature_version=options.signature_version,  # type: ignore[arg-type]
        addressing=options.addressing,  # type: ignore[arg-type]
        pool_size=pool_size,
        **kw,
    )
    return StoreClient(config)


def resolve_ca_bundle(option: str | None) -> str | None:
    """The CA bundle to verify https with: --ca-bundle, else CA_BUNDLE_ENV; checked to exist."""
    if option:
        path, source = option, "--ca-bundle"
    else:
        found = ca_bundle_from_env()
        if found is None:
            return None
        path, source = found[0], f"${found[1]}"
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise UsageError(f"{source} {path} {what}: expected a PEM file of CA certificates")
    return os.path.abspath(path)


def check_cache_dir(cache_dir: Path) -> None:
    """Fail before any request or write unless `cache_dir` is, or can become, a cache dir.

    A real probe file, not os.access(): root passes access() on a read-only mount.
    """
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UsageError(f"--cache-dir {cache_dir} is not a directory")
    if not cache_dir.is_dir():
        return  # created on first use; a parent that refuses says so then
    try:
        fd, probe = tempfile.mkstemp(prefix=".ossfs-resume-probe-", dir=cache_dir)
    except OSError as exc:
        raise OssfsError(
            f"cannot use the cache at {cache_dir}: it is not writable ({exc.strerror or exc})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_mountpoint(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"mountpoint {path} does not exist")
    if not p.is_dir():
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path} is already a mount point")
    try:
        if any(p.iterdir()):
            raise UsageError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise UsageError(f"mountpoint {path} is not readable") from None


def cmd_mount(args: argparse.Namespace) -> int:
    from .cache import open_cache
    from .core import BucketFS, MountOptions, default_cache_dir
    from .fuse_ops import run_mount

    url = parse_bucket_url(args.url)
    part_size = check_part_size(args.part_size)
    list_ttl = parse_ttl(args.list_ttl)
    if args.max_parallel is not None:
        check_range("--max-parallel", args.max_parallel, 1, MAX_PARALLEL)
    memory = memory_plan(args.memory_limit, part_size, args.max_parallel)
    check_range("--read-ahead-kb", args.read_ahead_kb, 0, MAX_READ_AHEAD_KB)
    cache_size, cache_min_free = cache_limits(args)
    access = access_options(args)
    check_allow_other(args)
    mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(mountpoint)
    cache_dir = Path(args.cache_dir or default_cache_dir()).absolute()
    if cache_dir.exists() and not cache_dir.is_dir():
        # Not merely unusable: a mistake, and the log that would say so lives in that dir.
        raise UsageError(f"--cache-dir {cache_dir} is not a directory")
    prefix = url.key if not url.key or url.key.endswith("/") else url.key + "/"

    # Fail before mounting: a wrong endpoint, bucket or key pair is one clear line.
    probe = make_client(
        url, StoreOptions.from_args(args), pool_size=1, max_attempts=2, connect_timeout=3.0
    )
    try:
        probe.check_access(prefix)
    finally:
        probe.close()
    # The shared cache is never fatal: a mistake in it is a warning, and reads go
    # to the origin until it answers.
    shared_target = shared_tier_target(args)
    if shared_target is not None:
        shared_probe = make_shared_tier(args)
        assert shared_probe is not None
        try:
            shared_probe.store.check_access(shared_probe.prefix)
        except OssfsError as exc:
            print(
                f"ossfs-resume: warning: shared cache {shared_probe.name}: {exc}; "
                "reading from the origin until it answers",
                file=sys.stderr,
            )
        finally:
            shared_probe.close(wait=0)
            shared_probe.store.close()
    unusable: str | None = None
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_cache_dir(cache_dir)
    except OSError as exc:
        unusable = f"cannot create the cache at {cache_dir}: {exc.strerror or exc}"
    except OssfsError as exc:
        unusable = str(exc)
    cache_usable = unusable is None
    if unusable:
        # The mount still works, reading straight from the store; say so here, where
        # the user sees it: a background mount's log would live in that very dir.
        print(
            f"ossfs-resume: warning: {unusable}; the mount reads straight from the store",
            file=sys.stderr,
        )
    if args.metrics_port is not None:
        check_range("--metrics-port", args.metrics_port, 0, 65535)
        check_port_free(args.metrics_address, args.metrics_port)
    if not args.foreground and not args.log_file:
        # Background: syslog/journald when there is one, else a file in the cache dir.
        setup_background_logging(
            args.verbose, cache_dir / "ossfs-resume.log" if cache_usable else None
        )

    options = MountOptions(
        prefix=prefix,
        part_size=part_size,
        list_ttl=list_ttl,
        max_parallel=memory.max_parallel,
        max_readahead_parts=memory.max_readahead_parts,
        max_inflight_bytes=memory.max_inflight_bytes,
        **access,
    )

    def make_core() -> BucketFS:
        # Short read timeout and few attempts: a dead store must give EIO in seconds.
        client = make_client(
            url,
            StoreOptions.from_args(args),
            pool_size=memory.max_parallel + 8,
            read_timeout=5.0,
            max_attempts=3,
        )
        cache = open_cache(cache_dir, max_bytes=cache_size, min_free_bytes=cache_min_free)
        shared = make_shared_tier(args)
        if shared is not None:
            log.info("shared cache %s: read after the local cache, before the origin", shared.name)
        return BucketFS(client, cache, options, shared=shared)

    log.info(
        "mounting %s://%s/%s at %s (cache %s, part size %d)",
        url.protocol,
        url.bucket,
        prefix,
        mountpoint,
        cache_dir,
        part_size,
    )
    try:
        run_mount(
            mountpoint,
            make_core,
            foreground=args.foreground,
            metadata_ttl=list_ttl,
            fsname=f"{url.protocol}://{url.bucket}/{prefix}",
            read_ahead_kb=max(0, args.read_ahead_kb),
            allow_other=args.allow_other,
            allow_root=args.allow_root,
            metrics_address=args.metrics_address,
            metrics_port=args.metrics_port,
        )
    except RuntimeError as exc:
        raise OssfsError(f"mount failed: {exc}") from None
    return 0


@dataclass
class _PrefetchItem:
    client: StoreClient
    meta: ObjectMeta
    cache_dir: str
    part_size: int


class _PrefetchTargets:
    """Turns prefetch targets (files, directories, URLs, list entries) into objects.

    Files of one mount, or URLs of one bucket, share one client, so one engine (and
    its --threads) serves them all. Every target is resolved before anything is fetched.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clients: dict[tuple[Any, ...], StoreClient] = {}
        self.items: list[_PrefetchItem] = []
        self._seen: set[tuple[int, str]] = set()

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def _client(self, url: BucketUrl, options: StoreOptions) -> StoreClient:
        ident = (url.protocol, url.bucket, options)
        if ident not in self.clients:
            self.clients[ident] = make_client(url, options, pool_size=self.args.threads + 2)
        return self.clients[ident]

    def _add(self, client: StoreClient, meta: ObjectMeta, cache_dir: str, part_size: int) -> None:
        if (id(client), meta.key) not in self._seen:
            self._seen.add((id(client), meta.key))
            self.items.append(_PrefetchItem(client, meta, cache_dir, part_size))

    def add_url(self, text: str, url: BucketUrl) -> None:
        """An object, or with no key or a key ending in "/", everything under that prefix."""
        from .core import default_cache_dir
        from .errors import NotFoundError
        from .prefetch import list_prefix

        args = self.args
        if not args.endpoint:
            raise UsageError(f"{text}: --endpoint is needed for a URL target")
        part_size = check_part_size(args.part_size)
        cache_dir = str(Path(args.cache_dir or default_cache_dir()).absolute())
        check_cache_dir(Path(cache_dir))
        client = self._client(BucketUrl(url.protocol, url.bucket, ""), StoreOptions.from_args(args))
        if url.key and not url.key.endswith("/"):
            try:
                self._add(client, client.head(url.key), cache_dir, part_size)
                return
            except NotFoundError:
                prefix = url.key + "/"  # s3://bucket/dir names the directory
                found = list_prefix(client, prefix)
                if not found:
                    raise
        else:
            prefix = url.key
            found = list_prefix(client, prefix)
            if not found:
                raise UsageError(f"nothing to prefetch: no objects under {text}")
        for meta in found:
            self._add(client, meta, cache_dir, part_size)

    def add_path(self, path: str) -> None:
        """A file in a mount, or a directory in one (walked, recursively)."""
        from .prefetch import walk_files

        if os.path.isdir(path):
            files = walk_files(path)
            if not files:
                raise UsageError(f"nothing to prefetch: {path} holds no files")
            for name in files:
                self._add_mounted(name)
        else:
            self._add_mounted(path)

    def _add_mounted(self, path: str) -> None:
        from .prefetch import MountedSource

        src = MountedSource.from_path(path)
        options = StoreOptions(
            endpoint=src.endpoint,
            region=src.region,
            signature_version=src.signature_version,
            addressing=src.addressing,
            anonymous=src.anonymous,
            ca_bundle=self.args.ca_bundle,
            credentials_file=_abspath(self.args.credentials_file),
            profile=self.args.profile,
        )
        check_cache_dir(Path(src.cache_dir))
        client = self._client(BucketUrl(src.protocol, src.bucket, ""), options)
        self._add(client, client.head(src.key), src.cache_dir, src.part_size)

    def resolve(self) -> None:
        from .prefetch import join_key, read_list_file

        args = self.args
        urls = [(t, parse_bucket_url(t)) for t in args.targets if "://" in t]
        if not args.targets and not args.from_file:
            raise UsageError("prefetch needs a TARGET or --from-file LIST")
        base: tuple[str, BucketUrl] | None = None
        if args.from_file:
            if len(urls) > 1:
                raise UsageError(
                    "with --from-file, give at most one URL (the base of the list's keys)"
                )
            base = urls[0] if urls else None
        for target in args.targets:
            if "://" not in target:
                self.add_path(target)
            elif base is None:
                self.add_url(target, parse_bucket_url(target))
        if args.from_file:
            for entry in read_list_file(args.from_file):
                if "://" in entry:
                    self.add_url(entry, parse_bucket_url(entry))
                elif base is not None:
                    url = base[1]
                    key = join_key(url.key, entry)
                    self.add_url(
                        f"{url.protocol}://{url.bucket}/{key}",
                        BucketUrl(url.protocol, url.bucket, key),
                    )
                else:
                    self.add_path(entry)
        if not self.items:
            raise UsageError("nothing to prefetch: the list is empty")


def _open_shared_tier(args: argparse.Namespace) -> tuple[Any, StoreClient]:
    """The shared part tier of --shared-cache for `prefetch --to shared`, and its client:
    reached as a mount reaches it, with the patience of a bulk job (retries, 30 s)."""
    if not args.shared_cache:
        raise UsageError("--to shared needs --shared-cache URL")
    tier = make_shared_tier(args, timeout=30.0)
    assert tier is not None
    return tier, tier.store


def cmd_prefetch(args: argparse.Namespace) -> int:
    import threading

    from .prefetch import (
        SetTotals,
        check_fits,
        check_lines,
        plan_file,
        prefetch_set,
        prefetch_set_to_tier,
        start_progress,
    )
    from .progress import AggregateProgress

    check_range("--threads", args.threads, 1, MAX_PARALLEL)
    check_range("--files", args.files, 1, MAX_PARALLEL)
    cache_size, cache_min_free = cache_limits(args)
    shared = args.to == "shared"
    if not shared and (args.shared_cache or args.shared_endpoint):
        raise UsageError("--shared-cache and --shared-endpoint go with --to shared")
    targets = _PrefetchTargets(args)
    caches: dict[str, PartCache] = {}
    tier: Any = None
    tier_client: StoreClient | None = None
    stop = threading.Event()
    try:
        if shared:
            tier, tier_client = _open_shared_tier(args)
        # Every target is resolved (listed, HEADed) before anything is fetched.
        targets.resolve()
        where = f"in the shared tier {tier.name}" if shared else "cached"

        def plan_all() -> list[tuple[str, Any]]:
            planned = []
            for item in targets.items:
                cache = None
                if not shared:
                    if item.cache_dir not in caches:
                        caches[item.cache_dir] = _open_cache_for_command(
                            item.cache_dir,
                            repair=True,
                            max_bytes=cache_size,
                            min_free_bytes=cache_min_free,
                        )
                    cache = caches[item.cache_dir]
                plan = plan_file(
                    item.client,
                    item.meta,
                    item.part_size,
                    cache=cache,
                    tier=tier,
                    record=not args.check,
                )
                planned.append((item.cache_dir, plan))
            return planned

        planned = plan_all()
        plans = [plan for _, plan in planned]
        if args.check:
            for line in check_lines(plans, where):
                print(line)
            return 0
        if not shared:
            for cache_dir, cache in caches.items():
                check_fits([p for d, p in planned if d == cache_dir], cache.max_bytes)
        failed: list[tuple[str, str]] = []
        with AggregateProgress("prefetch", mode=args.progress) as progress:
            start_progress(progress, plans)
            options = {"files": args.files, "threads": args.threads, "progress": progress}
            if shared:
                result = prefetch_set_to_tier(plans, tier, stop=stop, **options)
                failed += result.failed
            else:
                for cache_dir, cache in caches.items():
                    group = [p for d, p in planned if d == cache_dir]
                    result = prefetch_set(group, cache, stop=stop, **options)
                    failed += result.failed
        after = SetTotals.of([plan for _, plan in plan_all()])
        print(f"{'cached' if not shared else 'shared tier'}: {after.text(where)}")
        for name, reason in failed:
            print(f"ossfs-resume: error: {name}: {reason}", file=sys.stderr)
        return EXIT_ERROR if failed else 0
    except KeyboardInterrupt:
        stop.set()
        kept = "the shared tier" if shared else ", ".join(caches) or "the cache"
        print(
            f"ossfs-resume: interrupted; fetched parts are kept in {kept}: "
            "run the same command again to fetch the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        for cache in caches.values():
            cache.close()
        targets.close()
        if tier_client is not None:
            tier_client.close()


def _open_cache_for_command(
    cache_dir: str | Path,
    *,
    repair: bool,
    max_bytes: int | None = None,
    min_free_bytes: int | None = None,
) -> PartCache:
    """The cache for a command, or one clear error: a command needs a working cache."""
    import sqlite3

    from .cache import PartCache

    try:
        cache = PartCache(
            cache_dir, repair=repair, max_bytes=max_bytes, min_free_bytes=min_free_bytes
        )
    except NotADirectoryError:
        raise UsageError(f"--cache-dir {cache_dir} is not a directory") from None
    except (OSError, sqlite3.Error) as exc:
        raise OssfsError(f"cannot use the cache at {cache_dir}: {exc}") from None
    problem = cache.index_problem()
    if problem:
        cache.close()
        raise OssfsError(f"cannot use the cache index at {cache_dir}: {problem}")
    return cache


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import cache_exists
    from .core import default_cache_dir
    from .prefetch import MountedSource

    default_dir = Path(args.cache_dir or default_cache_dir()).absolute()
    targets = getattr(args, "targets", None) or []
    # (cache dir, store id, bucket, key) per target; a mount's file names its own cache.
    objects = []
    for target in targets:
        if "://" in target:
            url = parse_bucket_url(target)
            if not args.endpoint:
                raise UsageError(f"{target}: --endpoint is needed for a URL target")
            check_endpoint(args.endpoint)
            objects.append(
                (default_dir, store_id(url.protocol, args.endpoint), url.bucket, url.key)
            )
        else:
            src = MountedSource.from_path(target)
            sid = store_id(src.protocol, src.endpoint)
            objects.append((Path(src.cache_dir), sid, src.bucket, src.key))
    cache_dirs = {entry[0] for entry in objects} or {default_dir}
    for cache_dir in cache_dirs:
        if not cache_exists(cache_dir):
            raise UsageError(f"no cache at {cache_dir}")
        # Every command here writes (verify drops bad parts, even stats opens the index
        # for writing): a read-only cache is one clear line, not a failure halfway.
        check_cache_dir(cache_dir)
    status = 0
    for cache_dir in sorted(cache_dirs):
        # Maintenance never moves a damaged index aside: it says so and leaves it.
        cache = _open_cache_for_command(cache_dir, repair=False)
        try:
            if args.cache_command == "stats":
                from .metrics import cache_stats_text

                stats = cache.stats()
                print(json.dumps(stats) if args.json else cache_stats_text(stats))
            elif args.cache_command == "verify":
                checked, bad = cache.verify_all()
                for path in bad:
                    print(f"bad part dropped: {path}")
                print(f"checked {checked} parts: {len(bad)} bad")
                status = 1 if bad else status
            elif not objects:
                print(f"cleared {cache.clear()} parts from {cache_dir}")
            else:
                for target, (where, sid, bucket, key) in zip(targets, objects, strict=True):
                    if where == cache_dir:
                        found = cache.clear_object(sid, bucket, key)
                        print(f"{'cleared' if found else 'not cached'}: {target}")
        finally:
            cache.close()
    return status


def _setup_logging(args: argparse.Namespace) -> None:
    setup_logging(args.verbose, getattr(args, "log_file", None))


def add_download_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``download URL LOCAL_FILE`` to `subparsers` (from ``add_subparsers()``)."""
    store_args, common_args = _store_args, _common_args
    parser = subparsers.add_parser(
        "download",
        help="download one object to a local file (parallel, resumable)",
        description=(
            "Download one object in parallel parts to LOCAL_FILE. Progress is kept in a "
            "checkpoint (LOCAL_FILE.dcp): after an interruption, run the same command "
            "again to fetch only the missing parts."
        ),
    )
    parser.add_argument("url", metavar="URL", help="oss://BUCKET/KEY or s3://BUCKET/KEY")
    parser.add_argument("local_file", metavar="LOCAL_FILE", help="where to write the object")
    store_args(parser)
    parser.add_argument(
        "--part-size",
        default=str(DEFAULT_PART_SIZE),
        help="part size, e.g. 8M (100K..5G; a resumed download keeps its recorded size)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"parts fetched in parallel (1..{MAX_THREADS}, default {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--checkpoint", metavar="FILE", help="checkpoint file (default LOCAL_FILE.dcp)"
    )
    parser.add_argument(
        "--no-checkpoint", action="store_true", help="keep no checkpoint: cannot resume"
    )
    parser.add_argument(
        "--cache-dir",
        help="a part cache whose parts of this object version are copied instead of fetched "
        "(default: the mounts' default cache, when it exists)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="fetch every part, even those in the part cache"
    )
    add_progress_option(parser)
    common_args(parser)
    return parser


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this download (same options)."""
    argv = ["ossfs-resume", "download", args.url, args.local_file, "--endpoint", args.endpoint]
    if getattr(args, "region", None):
        argv += ["--region", args.region]
    if getattr(args, "signature_version", "v4") != "v4":
        argv += ["--signature-version", args.signature_version]
    if getattr(args, "addressing", "auto") != "auto":
        argv += ["--addressing", args.addressing]
    if getattr(args, "anonymous", False):
        argv.append("--anonymous")
    if getattr(args, "ca_bundle", None):
        argv += ["--ca-bundle", args.ca_bundle]
    for option in ("credentials_file", "profile"):
        if getattr(args, option, None):
            argv += [f"--{option.replace('_', '-')}", getattr(args, option)]
    if str(args.part_size) != str(DEFAULT_PART_SIZE):
        argv += ["--part-size", str(args.part_size)]
    if args.threads != DEFAULT_THREADS:
        argv += ["--threads", str(args.threads)]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    if args.no_checkpoint:
        argv.append("--no-checkpoint")
    if getattr(args, "cache_dir", None):
        argv += ["--cache-dir", args.cache_dir]
    if getattr(args, "no_cache", False):
        argv.append("--no-cache")
    if getattr(args, "progress", "auto") != "auto":
        argv += ["--progress", args.progress]
    if getattr(args, "verbose", 0):
        argv.append("-" + "v" * args.verbose)
    if getattr(args, "log_file", None):
        argv += ["--log-file", args.log_file]
    return shlex.join(argv)


def cmd_download(args: argparse.Namespace) -> int:
    """``ossfs-resume download``: 0 on success, 130 after Ctrl-C (checkpoint kept)."""
    from .download import resumable_download
    from .progress import ProgressReporter

    url = parse_bucket_url(args.url)
    if not url.key or url.key.endswith("/"):
        raise UsageError(
            f"{args.url} names no object: expected {url.protocol}://BUCKET/KEY for download"
        )
    part_size = check_part_size(args.part_size)
    threads = check_range("--threads", args.threads, 1, MAX_THREADS)
    if args.no_checkpoint and args.checkpoint:
        raise UsageError("--checkpoint and --no-checkpoint cannot be used together")
    if args.no_cache and args.cache_dir:
        raise UsageError("--cache-dir and --no-cache cannot be used together")
    client = make_client(url, StoreOptions.from_args(args), pool_size=threads)
    cache = None if args.no_cache else _download_cache(args.cache_dir)
    reporter = ProgressReporter(url.key, mode=args.progress)
    try:
        with reporter:
            resumable_download(
                client,
                url.key,
                args.local_file,
                part_size=part_size,
                num_threads=threads,
                checkpoint_file=args.checkpoint,
                enable_checkpoint=not args.no_checkpoint,
                progress_callback=reporter,
                cache=cache,
            )
    except KeyboardInterrupt:
        if args.no_checkpoint:
            kept = "nothing was kept (--no-checkpoint)"
        else:
            checkpoint = args.checkpoint or os.path.abspath(args.local_file) + CHECKPOINT_SUFFIX
            if os.path.exists(checkpoint):
                kept = f"finished parts are recorded in {checkpoint}"
            else:
                kept = "nothing was downloaded yet"
        print(
            f"ossfs-resume: interrupted; {kept}: run the same command to resume: "
            f"{resume_command(args)}",
            file=sys.stderr,
        )
        return 130
    finally:
        if cache is not None:
            cache.close()
        client.close()
    return 0


def _download_cache(cache_dir: str | None) -> PartCache | None:
    """The part cache a download copies from: --cache-dir (which must hold one), else the
    default cache if there is one; never created by a download."""
    from .cache import PartCache, cache_exists
    from .core import default_cache_dir

    where = Path(cache_dir) if cache_dir else default_cache_dir()
    if not cache_exists(where):
        if cache_dir:
            raise UsageError(f"no cache at --cache-dir {cache_dir}")
        return None
    try:
        cache = PartCache(where, repair=False)
    except (OSError, sqlite3.Error) as exc:
        log.warning("not using the part cache at %s: %s", where, exc)
        return None
    if cache.index_problem():
        log.warning("not using the part cache at %s: %s", where, cache.index_problem())
        cache.close()
        return None
    return cache


COMMANDS = {
    "mount": cmd_mount,
    "prefetch": cmd_prefetch,
    "download": cmd_download,
    "cache": cmd_cache,
    "stats": lambda args: cmd_stats(args),
    "config": lambda args: cmd_config(args),
    "shared-cache": cmd_shared_cache,
}


def add_service_parsers(sub: Any) -> None:
    """``stats MOUNTPOINT`` and ``config show``: running as a service."""
    stats = sub.add_parser("stats", help="live figures of a running mount (needs --metrics-port)")
    stats.add_argument("mountpoint")
    stats.add_argument("--json", action="store_true", help="the figures as JSON")
    _common_args(stats)
    config = sub.add_parser("config", help="the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show", help="each option's value and where it comes from (default, config file, flag)"
    )
    show.add_argument("--config", metavar="FILE", help="TOML config file")
    show.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [OPTIONS]",
        help="the command (default: mount) and its options",
    )
    _common_args(show)


def cmd_stats(args: argparse.Namespace) -> int:
    from .metrics import METRICS_XATTR, format_summary, scrape, summarize, summary_json

    try:
        url = os.getxattr(args.mountpoint, METRICS_XATTR).decode()
    except OSError:
        raise UsageError(
            f"{args.mountpoint} is not an ossfs-resume mount serving metrics "
            "(mount it with --metrics-port)"
        ) from None
    try:
        summary = summarize(scrape(url))
    except OSError as exc:
        raise OssfsError(f"cannot read the metrics of {args.mountpoint} at {url}: {exc}") from None
    print(summary_json(summary) if args.json else format_summary(summary))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import show_config

    rest = list(args.rest)
    command = rest.pop(0) if rest and not rest[0].startswith("-") else "mount"
    print(show_config(build_parser(), command, rest, args.config), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .config import parse_with_config

    argv = sys.argv[1:] if argv is None else list(argv)
    if is_helper_form(argv):
        # `mount -t fuse.ossfs-resume` / fstab: ossfs-resume SOURCE MOUNTPOINT -o OPTIONS.
        try:
            argv = helper_to_mount_argv(argv)
        except UsageError as exc:
            print(f"ossfs-resume: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser()
    try:
        args = parse_with_config(parser, argv)
    except UsageError as exc:
        print(f"ossfs-resume: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _setup_logging(args)
    except OSError as exc:
        print(
            f"ossfs-resume: error: cannot write the log file {args.log_file}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"ossfs-resume: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OssfsError as exc:
        print(f"ossfs-resume: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ossfs-resume: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
