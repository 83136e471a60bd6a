#!/usr/bin/env bash
# rawfs metadata benchmark of issue 3: what 3 metadata replicas cost against 1.
#
# In one run, starts a cluster with 1 metadata replica, then one with 3 (one at a time, never
# both: the machine has 2 cores), and on each runs create / stat / rename / unlink of N empty
# files through the mount (rawfs-bench meta, stats with cold dentry caches so that each one
# reaches the metadata service). Prints ops/s of each and the ratio 3 replicas / 1 replica,
# against the targets (writes >= 0.6, stat >= 0.9). Only same-run ratios mean anything on a
# shared machine. Not run in CI.
#
# Usage: integration/bench-replicas.sh [--files N] [--rounds R] [--debug] [--no-build]
#   --rounds R   alternate 1 and 3 replicas R times and keep each figure's best (default 1)
#   --debug      use the debug build: only to check the script, its figures mean nothing
#   --no-build   use the binaries already built
# Needs root (FUSE, drop_caches). Builds the release binaries first.
# RAWFS_BENCH_DIR (default /var/tmp/rawfs-bench-replicas) holds the clusters; it is removed
# at the end, and every cluster is stopped and unmounted even when the script fails.
set -euo pipefail

FILES=10000
ROUNDS=1
PROFILE=release
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --files) FILES="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --debug) PROFILE=debug ;;
        --no-build) BUILD=0 ;;
        *) echo "usage: $0 [--files N] [--rounds R] [--debug] [--no-build]" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
if [ $BUILD = 1 ] && [ $PROFILE = release ]; then
    cargo build --release -p rawfs -p rawfs-integration >&2
elif [ $BUILD = 1 ]; then
    cargo build -p rawfs -p rawfs-integration >&2
fi
BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/$PROFILE"

BASE="${RAWFS_BENCH_DIR:-/var/tmp/rawfs-bench-replicas}"
UP=""
MNT=""
stop_cluster() {
    if [ -n "$UP" ]; then
        kill -TERM "$UP" 2>/dev/null || true
        wait "$UP" 2>/dev/null || true
        UP=""
    fi
    # rawfs up unmounts on SIGTERM; this only catches an up that died without doing so.
    if [ -n "$MNT" ] && mountpoint -q "$MNT" 2>/dev/null; then
        echo "bench-replicas.sh: $MNT still mounted; unmounting" >&2
        umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    MNT=""
}
cleanup() {
    stop_cluster
    rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run N -> "create stat rename unlink" ops/s on a fresh cluster with N metadata replicas.
# Called with its output redirected to a file, never in $(...): in a subshell the EXIT trap
# would not see the cluster it started.
run() {
    local n=$1 dir="$BASE/cluster-$1" log="$BASE/up-$1.log"
    rm -rf "$dir"
    MNT="$BASE/mnt-$n"
    mkdir -p "$MNT"
    "$BIN/rawfs" up --dir "$dir" --mount "$MNT" --metadata-replicas "$n" --chunkservers 3 \
        >"$log" 2>&1 &
    UP=$!
    local deadline=$((SECONDS + 120))
    until grep -q '"ready": true' "$dir/cluster.json" 2>/dev/null; do
        if ! kill -0 "$UP" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
            echo "bench-replicas.sh: the $n-replica cluster did not come up:" >&2
            tail -30 "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
    local replicas
    replicas=$("$BIN/rawfs" status --json --dir "$dir" |
        grep -c '"role": "\(leader\|follower\)"' || true)
    if [ "$replicas" != "$n" ]; then
        echo "bench-replicas.sh: expected $n metadata replicas, status shows $replicas" >&2
        exit 1
    fi
    echo "bench-replicas.sh: $n replica(s): $FILES files" >&2
    "$BIN/rawfs-bench" meta "$MNT/meta" "$FILES" --cold-stat |
        awk '{ v[$1] = $2 } END { print v["create_per_s"], v["stat_per_s"], v["rename_per_s"], v["unlink_per_s"] }'
    stop_cluster
    rm -rf "$dir"
}

declare -A R
OPS="create stat rename unlink"
for op in $OPS; do R[1.$op]=0; R[3.$op]=0; done
mkdir -p "$BASE"
for round in $(seq 1 "$ROUNDS"); do
    for n in 1 3; do
        run $n >"$BASE/result"
        read -r c s r u <"$BASE/result"
        echo "bench-replicas.sh: round $round, $n replica(s): create $c stat $s rename $r unlink $u /s" >&2
        for kv in "create $c" "stat $s" "rename $r" "unlink $u"; do
            set -- $kv
            R[$n.$1]=$(awk -v a="${R[$n.$1]}" -v b="$2" 'BEGIN { print (b > a) ? b : a }')
        done
    done
done

printf '\n%-22s %14s %14s %8s %8s\n' "metadata ops/s" "1 replica" "3 replicas" "3/1" "target"
for op in $OPS; do
    target=">=0.60"
    [ $op = stat ] && target=">=0.90"
    printf '%-22s %14s %14s %8s %8s\n' "$op ($FILES files)" "${R[1.$op]}" "${R[3.$op]}" \
        "$(awk -v a="${R[1.$op]}" -v b="${R[3.$op]}" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }')" \
        "$target"
done
