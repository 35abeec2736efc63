#!/usr/bin/env bash
# The demo: start a local object store with sample data (including a 1 GiB file), mount it,
# read files with ordinary tools, prefetch the big file with a progress bar, then read it
# back from the cache. Cleans up after itself (unmount, stop the store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

WORK="${OSSFS_DEMO_DIR:-${OSSFS_RESUME_WORK:-${TMPDIR:-/tmp}/ossfs-resume-work}/demo}"
MNT="$WORK/mnt"
BIN=.venv/bin/ossfs-resume
mkdir -p "$WORK" "$MNT"

cleanup() {
    if mountpoint -q "$MNT"; then fusermount3 -u "$MNT" || fusermount3 -u -z "$MNT"; fi
    .venv/bin/python scripts/local_store.py stop --workdir "$WORK/store" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Starting SeaweedFS on 127.0.0.1 and loading sample data (first run writes 1 GiB)"
.venv/bin/python scripts/local_store.py start --workdir "$WORK/store" >/dev/null
# shellcheck disable=SC1091
source "$WORK/store/store.env"
SRC="$WORK/store/sample"

step "Mounting oss://$LOCAL_STORE_BUCKET at $MNT (OSS protocol, anonymous read)"
$BIN mount "oss://$LOCAL_STORE_BUCKET" "$MNT" --endpoint "$LOCAL_STORE_ENDPOINT" \
    --anonymous --cache-dir "$WORK/cache"
mount | grep -F "$MNT"

step "ls -l and find: one LIST per directory, sizes and times from the listing"
ls -l "$MNT"
find "$MNT/docs" "$MNT/data" -type f | sort

step "cat a file"
head -c 300 "$MNT/docs/readme.txt"; echo

step "md5sum through the mount equals the source"
(cd "$MNT" && md5sum docs/notes.md data/2024/02/part-000.bin)
(cd "$SRC" && md5sum docs/notes.md data/2024/02/part-000.bin)

step "Prefetch the 1 GiB file into the part cache (parallel parts, resumable)"
$BIN prefetch --progress always "$MNT/big/blob.bin"

step "Read it back: served from the local part cache"
time md5sum "$MNT/big/blob.bin"
md5sum "$SRC/big/blob.bin"

step "Unmounting"
fusermount3 -u "$MNT"
echo "done: the part cache in $WORK/cache survives; mount again and no part is fetched twice"
