#!/usr/bin/env bash
# Set up a machine: libfuse3 (system package), python3-venv when missing, and .venv with the
# package and its test tools. Idempotent, and offline once everything is installed: the pip
# step runs again only when pyproject.toml changed (a stamp in .venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# The library list is read whole: `ldconfig -p | grep -q` under pipefail fails now and then
# (grep exits at the first match and ldconfig dies of SIGPIPE), which ran apt for nothing.
fuse_ok=1
command -v fusermount3 >/dev/null 2>&1 || fuse_ok=0
libs="$(ldconfig -p 2>/dev/null || true)"
case "$libs" in *libfuse3.so.3*) ;; *) fuse_ok=0 ;; esac
if [ "$fuse_ok" = 0 ]; then
    echo "setup: installing fuse3 and libfuse3-3" >&2
    apt_install fuse3 libfuse3-3
fi
if [ ! -e /dev/fuse ]; then
    echo "setup: /dev/fuse is missing; FUSE mounts cannot work on this machine" >&2
    exit 1
fi

PYTHON="${PYTHON:-python3}"
# Debian's python3 makes a venv without pip unless python3-venv (ensurepip) is installed.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    echo "setup: installing python3-venv" >&2
    apt_install python3-venv || apt_install "python${version}-venv"
fi

# A half-made .venv (interrupted creation, a moved checkout, a removed interpreter) is rebuilt.
if [ -e .venv ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: .venv is incomplete; recreating it" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.ossfs-resume-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ] || ! .venv/bin/python -c 'import ossfs_resume' >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
    rm -f .venv/.ossfs-resume-installed-*
    touch "$stamp"
    # fstab and `mount -t fuse.ossfs-resume` find the program on the shell's default PATH
    # only (mount(8) passes helpers no PATH): say how to put it there, touching no system dir.
    if [ ! -e /usr/local/bin/ossfs-resume ]; then
        echo "setup: for fstab and mount -t fuse.ossfs-resume, run:" \
            "$SUDO ln -s $(pwd)/.venv/bin/ossfs-resume /usr/local/bin/ossfs-resume" >&2
    fi
fi
