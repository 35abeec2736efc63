"""Mount-helper form: ``ossfs-resume SOURCE MOUNTPOINT -o OPT[,OPT=VAL...]``.

``mount -t fuse.ossfs-resume`` and fstab lines of that type run ``mount.fuse3``, which
runs ``ossfs-resume SOURCE MOUNTPOINT -o OPTIONS`` through ``/bin/sh`` (found on the
shell's default PATH: mount(8) passes no PATH; the rest of the environment, keys
included, is passed through). This module turns that form into the arguments of
``ossfs-resume mount``; it knows nothing of argparse.

Every mount option has an ``-o`` spelling with underscores (``cache_dir=/c``,
``anonymous``); mount(8)'s and FUSE's generic options are accepted, and ignored where
they are not ours (the mount is always read-only). Anything else is one UsageError
naming the option, never its value (a value may be a secret typed in the wrong place).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UsageError

#: -o options taking a value -> the `mount` command's option.
VALUE_OPTIONS: dict[str, str] = {
    name: "--" + name.replace("_", "-")
    for name in (
        "endpoint",
        "region",
        "signature_version",
        "addressing",
        "ca_bundle",
        "cache_dir",
        "part_size",
        "list_ttl",
        "max_parallel",
        "memory_limit",
        "read_ahead_kb",
        "cache_size",
        "cache_min_free",
        "log_file",
        "uid",
        "gid",
        "umask",
        "file_mode",
        "dir_mode",
    )
} | {"stat_ttl": "--list-ttl"}

#: -o options without a value -> the `mount` command's flag.
FLAG_OPTIONS: dict[str, str] = {
    "anonymous": "--anonymous",
    "allow_other": "--allow-other",
    "allow_root": "--allow-root",
    "verbose": "--verbose",
}

#: mount(8)'s and FUSE's generic options: accepted, no effect on a read-only bucket mount
#: (libfuse mounts nosuid,nodev already; mount(8) adds ``rw`` unless ``ro`` is given).
IGNORED_OPTIONS: frozenset[str] = frozenset(
    {
        "ro",
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "_netdev",
        "nofail",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "sync",
        "async",
        "dirsync",
        "silent",
        "loud",
    }
)
#: Prefixes of options meant for mount(8), systemd and friends: accepted and ignored.
IGNORED_PREFIXES: tuple[str, ...] = ("x-", "comment=")

#: Flags mount(8) may give a helper (-n no mtab, -s sloppy, -v verbose): ignored.
IGNORED_FLAGS: frozenset[str] = frozenset({"-n", "-s", "-v"})

#: The old fstab syntax names the program in the source: ``ossfs-resume#s3://bucket/``.
PROGRAM_PREFIX = "ossfs-resume#"


def is_helper_form(argv: Sequence[str]) -> bool:
    """True if `argv` (without the program name) starts with a bucket URL, not a command."""
    if not argv:
        return False
    source = argv[0].removeprefix(PROGRAM_PREFIX)
    return source.startswith(("oss://", "s3://"))


def split_options(text: str) -> list[str]:
    """``a,b=c`` -> ``["a", "b=c"]``; empty items (``a,,b``) are skipped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def translate_option(option: str) -> list[str]:
    """One -o item as `mount` command arguments ([] if ignored); UsageError if unknown."""
    name, sep, value = option.partition("=")
    if option in IGNORED_OPTIONS or option.startswith(IGNORED_PREFIXES):
        return []
    if name in VALUE_OPTIONS:
        if not sep or not value:
            raise UsageError(f"mount option {name} needs a value: -o {name}=VALUE")
        return [f"{VALUE_OPTIONS[name]}={value}"]
    if name in FLAG_OPTIONS:
        if sep:
            raise UsageError(f"mount option {name} takes no value: -o {name}")
        return [FLAG_OPTIONS[name]]
    if name in IGNORED_OPTIONS:
        raise UsageError(f"mount option {name} takes no value")
    raise UsageError(
        f"unknown mount option {name!r} (mount options are those of 'ossfs-resume mount' "
        "with underscores, e.g. cache_dir=DIR, and mount(8)'s generic ones)"
    )


def helper_to_mount_argv(argv: Sequence[str]) -> list[str]:
    """``SOURCE MOUNTPOINT [-o OPTS]...`` -> ``mount SOURCE MOUNTPOINT --option=value...``.

    UsageError for a missing argument, an unknown option or flag, or a bad -o item.
    """
    positional: list[str] = []
    options: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":
            if i + 1 == len(args):
                raise UsageError("-o needs a list of mount options")
            options += split_options(args[i + 1])
            i += 2
            continue
        if arg.startswith("-o"):
            options += split_options(arg[2:])
        elif arg in IGNORED_FLAGS:
            pass
        elif arg.startswith("-"):
            raise UsageError(
                f"unknown argument {arg!r}: the mount-helper form is "
                "ossfs-resume SOURCE MOUNTPOINT [-o OPTIONS]"
            )
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise UsageError(
            f"expected SOURCE and MOUNTPOINT, got {len(positional)} argument(s): "
            "ossfs-resume SOURCE MOUNTPOINT [-o OPTIONS]"
        )
    source, mountpoint = positional
    out = ["mount", source.removeprefix(PROGRAM_PREFIX), mountpoint]
    for option in options:
        out += translate_option(option)
    return out


def parse_octal(option: str, text: str, high: int = 0o7777) -> int:
    """A mode or umask in octal (``0444``, ``444``, ``0o444``), at most `high`."""
    digits = text.strip().lower().removeprefix("0o")
    try:
        value = int(digits, 8)
    except ValueError:
        raise UsageError(f"bad {option} {text!r}: expected an octal mode like 0444") from None
    if not 0 <= value <= high:
        raise UsageError(f"bad {option} {text!r}: must be 0..{high:o} (octal)")
    return value


def parse_id(option: str, text: str) -> int:
    """A numeric uid or gid (0..4294967294)."""
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise UsageError(f"bad {option} {text!r}: expected a number") from None
    if not 0 <= value < 0xFFFFFFFF:
        raise UsageError(f"bad {option} {text!r}: must be 0..{0xFFFFFFFF - 1}")
    return value


def file_and_dir_modes(
    file_mode: int | None, dir_mode: int | None, umask: int | None
) -> tuple[int, int]:
    """(file mode, dir mode): each as given, else 0444/0555 less a given umask's bits.

    The umask starts from 0777 for directories and 0666 for files (as with mount(8)
    options of vfat and friends), and the mount is read-only, so write bits are dropped
    from what it leaves: umask 022 -> 0444 files, 0555 dirs; umask 077 -> 0400, 0500.
    """
    if umask is None:
        files, dirs = 0o444, 0o555
    else:
        files, dirs = 0o666 & ~umask & ~0o222, 0o777 & ~umask & ~0o222
    return (
        files if file_mode is None else file_mode,
        dirs if dir_mode is None else dir_mode,
    )


def fuse_conf_allows_other(path: str = "/etc/fuse.conf") -> bool:
    """True if `path` has a ``user_allow_other`` line (needed by non-root allow_other)."""
    try:
        with open(path) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False
