#!/usr/bin/env bash
# rawfs erasure-coding benchmark of issue 5: a cold (RS 4+2) file against a hot (3 replicas)
# file of the same size through the same mount, and a degraded read with 2 chunkservers down
# against the healthy read. Not run in CI.
#
#   write: SIZE MiB with dd + fsync into a `hot` and a `cold` directory     target >= 0.8
#          (a cold file's stripes are encoded by the client and written as 6 shards)
#   read:  the same files with cold caches, once the cold one is all RS 4+2  target >= 0.8
#   degraded read: the cold file with 2 of the 6 chunkservers killed (the healers are
#          stopped first, so that every read decodes around the lost shards)  target >= 0.5
#
# Only same-run ratios mean anything: absolute figures swing 2-3x between runs on a shared
# machine. The codec's own throughput per core is measured by
# `RUSTFLAGS="--cfg rawfs_bench" cargo test --release -p rawfs-client erasure_throughput -- --nocapture`.
#
# Usage: integration/bench-ec.sh [--size-mib N] [--debug] [--no-build]
# Needs root (FUSE, drop_caches, kill -9) and jq. RAWFS_BENCH_DIR (default
# /var/tmp/rawfs-bench-ec) holds the cluster; it is removed at the end.
set -euo pipefail

SIZE_MIB=1024
PROFILE=release
BUILD=1
CONVERT_TIMEOUT=600 # seconds
usage() { echo "usage: $0 [--size-mib N] [--debug] [--no-build]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --size-mib) [ $# -ge 2 ] || usage; SIZE_MIB="$2"; shift ;;
        --debug) PROFILE=debug ;;
        --no-build) BUILD=0 ;;
        *) usage ;;
    esac
    shift
done
case "$SIZE_MIB" in '' | *[!0-9]* | 0) usage ;; esac

cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "bench-ec.sh: jq is needed (apt-get install jq)" >&2; exit 1; }
if [ $BUILD = 1 ] && [ $PROFILE = release ]; then
    cargo build --release -p rawfs >&2
elif [ $BUILD = 1 ]; then
    cargo build -p rawfs >&2
fi
BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/$PROFILE"

BASE="${RAWFS_BENCH_DIR:-/var/tmp/rawfs-bench-ec}"
CLUSTER="$BASE/cluster"
MNT="$BASE/mnt"
UP=""
cleanup() {
    local rc=$?
    if [ $rc != 0 ] && [ -d "$CLUSTER/logs" ]; then
        rm -rf "$BASE.logs" && cp -r "$CLUSTER/logs" "$BASE.logs" &&
            echo "bench-ec.sh: failed; the cluster's logs are in $BASE.logs" >&2
    fi
    if [ -n "$UP" ]; then
        kill -TERM "$UP" 2>/dev/null || true
        wait "$UP" 2>/dev/null || true
        UP=""
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$BASE"
mkdir -p "$MNT"

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null ||
        echo "bench-ec.sh: cannot drop caches; the figures are warm" >&2
}
now() { date +%s.%N; }
rate() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.1f", n / (b - a) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }'; }

SOURCE="$BASE/source.dat"
dd if=/dev/urandom of="$SOURCE" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
cat "$SOURCE" >/dev/null

"$BIN/rawfs" up --dir "$CLUSTER" --mount "$MNT" --chunkservers 6 \
    --chunkserver-timeout 3s --healer-scan-interval 1s --cold-after 0 >"$BASE/up.log" 2>&1 &
UP=$!
deadline=$((SECONDS + 120))
until grep -q '"ready": true' "$CLUSTER/cluster.json" 2>/dev/null; do
    if ! kill -0 "$UP" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        echo "bench-ec.sh: the cluster did not come up:" >&2
        tail -30 "$BASE/up.log" >&2
        exit 1
    fi
    sleep 0.2
done
status_json() { "$BIN/rawfs" status --dir "$CLUSTER" --json 2>/dev/null; }
pid_of() { # role id
    jq -r --arg r "$1" --argjson id "$2" \
        '.processes[] | select(.role == $r and .id == $id) | .pid' "$CLUSTER/cluster.json"
}

mkdir "$MNT/hot" "$MNT/cold"
"$BIN/rawfs" class set "$MNT/hot" hot >/dev/null
"$BIN/rawfs" class set "$MNT/cold" cold >/dev/null

write() { # file -> MiB/s
    local t0 t1
    t0=$(now)
    dd if="$SOURCE" of="$1" bs=1M conv=fsync status=none
    t1=$(now)
    rate "$t0" "$t1" "$SIZE_MIB"
}
read_cold() { # file -> MiB/s, caches dropped first
    local t0 t1
    drop_caches
    t0=$(now)
    dd if="$1" of=/dev/null bs=1M status=none
    t1=$(now)
    rate "$t0" "$t1" "$SIZE_MIB"
}

echo "bench-ec.sh: writing $SIZE_MIB MiB hot and cold" >&2
HOT_W=$(write "$MNT/hot/f")
COLD_W=$(write "$MNT/cold/f")

# Every chunk of the cold file erasure coded: the EC chunk count reaches the file's chunks
# (at once when written as RS 4+2 directly; chunks that went to replicas wait for the healer).
WANT=$(((SIZE_MIB + 63) / 64))
EC_AT_WRITE=$(status_json | jq -r '.chunks.ec // 0' 2>/dev/null || echo 0)
echo "bench-ec.sh: waiting for all $WANT chunks to be RS 4+2 ($EC_AT_WRITE are)" >&2
start=$SECONDS
until [ "$(status_json | jq -r '.chunks.ec // 0' 2>/dev/null || echo 0)" -ge "$WANT" ]; do
    if [ $((SECONDS - start)) -gt $CONVERT_TIMEOUT ]; then
        echo "bench-ec.sh: the cold file was not converted within $CONVERT_TIMEOUT s" >&2
        "$BIN/rawfs" status --dir "$CLUSTER" >&2 || true
        exit 1
    fi
    sleep 1
done
CONVERT_S=$((SECONDS - start))

HOT_R=$(read_cold "$MNT/hot/f")
COLD_R=$(read_cold "$MNT/cold/f")
cmp -s "$SOURCE" "$MNT/cold/f" || { echo "bench-ec.sh: the cold file reads back wrong" >&2; exit 1; }

# Degraded: no healer to rebuild, 2 chunkservers gone.
for id in 1 2; do
    kill -9 "$(pid_of healer "$id")" 2>/dev/null || true
done
for id in 1 2; do
    kill -9 "$(pid_of chunkserver "$id")"
done
DEG_R=$(read_cold "$MNT/cold/f")
cmp -s "$SOURCE" "$MNT/cold/f" || { echo "bench-ec.sh: the degraded read is wrong" >&2; exit 1; }

printf '\n%-34s %14s %14s %8s %8s\n' "benchmark ($SIZE_MIB MiB, $PROFILE)" baseline rawfs ratio target
printf '%-34s %9s MiB/s %9s MiB/s %8s %8s\n' "cold write vs hot write" "$HOT_W" "$COLD_W" \
    "$(ratio "$HOT_W" "$COLD_W")" ">=0.8"
printf '%-34s %9s MiB/s %9s MiB/s %8s %8s\n' "cold read vs hot read" "$HOT_R" "$COLD_R" \
    "$(ratio "$HOT_R" "$COLD_R")" ">=0.8"
printf '%-34s %9s MiB/s %9s MiB/s %8s %8s\n' "degraded (2 down) vs healthy read" "$COLD_R" \
    "$DEG_R" "$(ratio "$COLD_R" "$DEG_R")" ">=0.5"
echo "cold file: $EC_AT_WRITE of $WANT chunks RS 4+2 when its write returned, all $WANT after $CONVERT_S s more"
