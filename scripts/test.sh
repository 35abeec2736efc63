#!/usr/bin/env bash
# The test command: installs what it needs, lints, then runs every test (unit, then integration).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k remount`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

.venv/bin/ruff check ossfs_resume tests scripts
.venv/bin/ruff format --check ossfs_resume tests scripts

# FUSE tests mount real file systems: run serially (no -n), unmounting is in the fixtures.
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "no tests were collected" >&2
fi
exit "$status"
