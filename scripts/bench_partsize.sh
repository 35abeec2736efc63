#!/usr/bin/env bash
# Part-size sweep: cold and warm sequential reads of one 1 GiB object through the mount for
# several part sizes, against the local store. Run after `bash scripts/setup.sh`; needs root
# (it drops the page cache). Usage: bash scripts/bench_partsize.sh [SIZES...]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("${@:-2M 4M 8M 16M 32M}")
WORK="${OSSFS_BENCH_DIR:-${OSSFS_RESUME_WORK:-${TMPDIR:-/tmp}/ossfs-resume-work}/partsize}"
MNT="$WORK/mnt"
mkdir -p "$MNT"
cleanup() {
    if mountpoint -q "$MNT"; then fusermount3 -u "$MNT" || fusermount3 -u -z "$MNT"; fi
    .venv/bin/python scripts/local_store.py stop --workdir "$WORK/store" >/dev/null 2>&1 || true
}
trap cleanup EXIT
.venv/bin/python scripts/local_store.py start --workdir "$WORK/store" >/dev/null
# shellcheck disable=SC1091
source "$WORK/store/store.env"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
rate() { dd if="$1" of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1), $NF}'; }
echo "| part size | cold MB/s | warm (disk cache) MB/s | 200 random 64 KiB reads, ms each |"
echo "|---|---|---|---|"
for size in ${SIZES[*]}; do
    rm -rf "$WORK/cache"
    .venv/bin/ossfs-resume mount "s3://$LOCAL_STORE_BUCKET" "$MNT" --endpoint "$LOCAL_STORE_ENDPOINT" \
        --cache-dir "$WORK/cache" --part-size "$size"
    drop; cold=$(rate "$MNT/big/blob.bin")
    drop; warm=$(rate "$MNT/big/blob.bin")
    rm -rf "$WORK/cache"; fusermount3 -u "$MNT"
    .venv/bin/ossfs-resume mount "s3://$LOCAL_STORE_BUCKET" "$MNT" --endpoint "$LOCAL_STORE_ENDPOINT" \
        --cache-dir "$WORK/cache" --part-size "$size"
    drop
    random_ms=$(.venv/bin/python - "$MNT/big/blob.bin" <<'PY'
import os, random, sys, time
path = sys.argv[1]
size = os.path.getsize(path)
rng = random.Random(42)
fd = os.open(path, os.O_RDONLY)
t = time.perf_counter()
for _ in range(200):
    os.pread(fd, 65536, rng.randrange(0, size - 65536))
print(f"{(time.perf_counter() - t) / 200 * 1000:.1f}")
PY
)
    fusermount3 -u "$MNT"
    echo "| $size | ${cold% *} | ${warm% *} | $random_ms |"
done
