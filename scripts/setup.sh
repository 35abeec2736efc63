#!/usr/bin/env bash
# Set up a fresh machine: libfuse3 (system package) and .venv with the package and its test tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! command -v fusermount3 >/dev/null 2>&1 || ! ldconfig -p | grep -q 'libfuse3\.so\.3'; then
    echo "setup: installing fuse3 and libfuse3-3" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fuse3 libfuse3-3 >/dev/null
fi
if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing; FUSE mounts cannot work on this machine" >&2
    exit 1
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"

# fstab and `mount -t fuse.ossfs-resume` find the program on the shell's default PATH only
# (mount(8) passes helpers no PATH): say how to put it there, without touching system dirs.
if [ ! -e /usr/local/bin/ossfs-resume ]; then
    echo "setup: for fstab and mount -t fuse.ossfs-resume, run:" \
        "$SUDO ln -s $(pwd)/.venv/bin/ossfs-resume /usr/local/bin/ossfs-resume" >&2
fi
