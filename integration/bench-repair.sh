#!/usr/bin/env bash
# rawfs repair benchmark of issue 6: how fast the healer restores full redundancy after a
# chunkserver is lost, and what a repair costs foreground reads. Not run in CI.
#
#   A. throttle lifted (repair rate 0 = unlimited): kill -9 the chunkserver with the most
#      chunks of a 6-server cluster holding SIZE MiB, time until every chunk is back at full
#      redundancy; MiB/s of reconstructed data (the dead server's used bytes / the time from
#      "status shows chunks at risk" to "all healthy") against the raw sequential disk write
#      speed (dd + fsync) of the same run. Target >= 0.3.
#   B. default throttle (64M/s): kill a second chunkserver; as soon as the repair starts, read
#      one file with cold caches, against the same read on the idle cluster just before the
#      kill. Target >= 0.6.
#
# Only same-run ratios mean anything: absolute figures swing 2-3x between runs on a shared
# machine.
#
# Usage: integration/bench-repair.sh [--size-mib N] [--debug] [--no-build]
#   --size-mib N  data written into the cluster, as 8 files (default 2048)
#   --debug       use the debug build: only to check the script, its figures mean nothing
#   --no-build    use the binaries already built
# Needs root (FUSE, drop_caches, kill -9 of the chunkservers) and jq. The repair throttle is set
# with `rawfs healer set --repair-rate`.
# RAWFS_BENCH_DIR (default /var/tmp/rawfs-bench-repair) holds the cluster and the local
# directory; it is removed at the end, and the cluster is stopped and unmounted even when the
# script fails.
set -euo pipefail

SIZE_MIB=2048
PROFILE=release
BUILD=1
FILES=8
# The healer's default repair rate (rawfs healer --repair-rate); phase B goes back to it with
# `rawfs healer set --repair-rate default`.
DEFAULT_REPAIR_RATE=64M/s
CHUNKSERVER_TIMEOUT=3s
REPAIR_TIMEOUT=1200 # seconds, per repair
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
case "$SIZE_MIB" in '' | *[!0-9]*) usage ;; esac
PER_FILE_MIB=$((SIZE_MIB / FILES))
if [ "$PER_FILE_MIB" -lt 1 ]; then
    echo "bench-repair.sh: --size-mib must be at least $FILES" >&2
    exit 2
fi
SIZE_MIB=$((PER_FILE_MIB * FILES))

cd "$(dirname "$0")/.."
command -v jq >/dev/null || { echo "bench-repair.sh: jq is needed (apt-get install jq)" >&2; exit 1; }
if [ $BUILD = 1 ] && [ $PROFILE = release ]; then
    cargo build --release -p rawfs -p rawfs-integration >&2
elif [ $BUILD = 1 ]; then
    cargo build -p rawfs -p rawfs-integration >&2
fi
BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/$PROFILE"

BASE="${RAWFS_BENCH_DIR:-/var/tmp/rawfs-bench-repair}"
CLUSTER="$BASE/cluster"
MNT="$BASE/mnt"
UP=""
cleanup() {
    if [ -n "$UP" ]; then
        kill -TERM "$UP" 2>/dev/null || true
        wait "$UP" 2>/dev/null || true
        UP=""
    fi
    # rawfs up unmounts on SIGTERM; this only catches an up that died without doing so.
    if mountpoint -q "$MNT" 2>/dev/null; then
        echo "bench-repair.sh: $MNT still mounted; unmounting" >&2
        umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$BASE"
mkdir -p "$BASE/local" "$MNT"

drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        echo "bench-repair.sh: cannot drop caches; the figures are warm" >&2
    fi
}

now() { date +%s.%N; }
rate() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.1f", n / (b - a) }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }'; }
mib() { awk -v n="$1" 'BEGIN { printf "%.1f", n / 1048576 }'; }

# Random source data, made once and read from the page cache, so that /dev/urandom's own speed
# does not cap the disk write or the writes into the mount.
SOURCE="$BASE/source.dat"
dd if=/dev/urandom of="$SOURCE" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
cat "$SOURCE" >/dev/null

# --- raw disk: sequential write + fsync of SIZE MiB on the same disk -----------------------
echo "bench-repair.sh: raw disk write, $SIZE_MIB MiB in $BASE/local" >&2
t0=$(now)
dd if="$SOURCE" of="$BASE/local/seq" bs=1M conv=fsync status=none
t1=$(now)
DISK_W=$(rate "$t0" "$t1" "$SIZE_MIB")
rm -f "$BASE/local/seq"

# --- the cluster -----------------------------------------------------------------------------
"$BIN/rawfs" up --dir "$CLUSTER" --mount "$MNT" --chunkservers 6 \
    --chunkserver-timeout "$CHUNKSERVER_TIMEOUT" --healer-scan-interval 1s \
    >"$BASE/up.log" 2>&1 &
UP=$!
deadline=$((SECONDS + 120))
until grep -q '"ready": true' "$CLUSTER/cluster.json" 2>/dev/null; do
    if ! kill -0 "$UP" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        echo "bench-repair.sh: the cluster did not come up:" >&2
        tail -30 "$BASE/up.log" >&2
        exit 1
    fi
    sleep 0.2
done

status_json() { "$BIN/rawfs" status --dir "$CLUSTER" --json 2>/dev/null; }

# The status, asked up to 10 times (an election or a slow answer fails one call).
status_retry() {
    local i
    for i in $(seq 1 10); do
        status_json && return 0
        sleep 1
    done
    echo "bench-repair.sh: rawfs status --dir $CLUSTER keeps failing" >&2
    return 1
}

# health -> "under_replicated degraded lost bytes_at_risk", or nothing if status failed (an
# election, a slow answer): the pollers then simply ask again. A failed status still prints
# the replicas' own views, with every chunk count 0: never read those as "all healthy".
health() {
    local st
    st=$(status_json) || return 0
    jq -r 'select(.metadata.leader != null) | [.chunks.under_replicated, .chunks.degraded,
        .chunks.lost, .healer.bytes_at_risk] | map(. // 0) | @tsv' <<<"$st" 2>/dev/null || true
}

healer_set() { # --repair-rate RATE
    if ! "$BIN/rawfs" healer set --dir "$CLUSTER" "$@"; then
        echo "bench-repair.sh: \`rawfs healer set --dir $CLUSTER $*\` failed" >&2
        exit 1
    fi
}

echo "bench-repair.sh: writing $SIZE_MIB MiB into the mount ($FILES files)" >&2
t0=$(now)
for i in $(seq 0 $((FILES - 1))); do
    dd if="$SOURCE" of="$MNT/f$i" bs=1M count="$PER_FILE_MIB" skip=$((i * PER_FILE_MIB)) \
        conv=fsync status=none
done
t1=$(now)
MOUNT_W=$(rate "$t0" "$t1" "$SIZE_MIB")
rm -f "$SOURCE"

cold_read() { # file -> MiB/s, caches dropped first
    local t0 t1
    drop_caches
    t0=$(now)
    dd if="$1" of=/dev/null bs=1M status=none
    t1=$(now)
    rate "$t0" "$t1" "$PER_FILE_MIB"
}
READ_FILE="$MNT/f0"
IDLE_R6=$(cold_read "$READ_FILE")
echo "bench-repair.sh: idle read of $PER_FILE_MIB MiB, 6 chunkservers: $IDLE_R6 MiB/s" >&2

# victim -> "id pid used_bytes chunks" of the live chunkserver with the most chunks.
victim() {
    local st id used chunks pid
    st=$(status_retry)
    read -r id used chunks < <(jq -r '[.chunkservers[] | select(.up == true)]
        | max_by(.chunks) | "\(.id) \(.used_bytes) \(.chunks)"' <<<"$st")
    pid=$(jq -r --argjson id "$id" \
        '.processes[] | select(.role == "chunkserver" and .id == $id) | .pid' \
        "$CLUSTER/cluster.json")
    echo "$id $pid $used $chunks"
}

kill_chunkserver() { # id pid
    # Only a pid that cluster.json lists and that still runs a rawfs chunkserver.
    if ! tr '\0' ' ' <"/proc/$2/cmdline" 2>/dev/null | grep -q chunkserver; then
        echo "bench-repair.sh: pid $2 of chunkserver $1 is not a running chunkserver" >&2
        exit 1
    fi
    kill -9 "$2"
}

# wait_repair KILL_TIME [RISK_TIME] -> sets T_RISK (first sight of chunks at risk), T_DONE (every
# chunk at full redundancy again, none lost) and AT_RISK (bytes at risk at first sight).
wait_repair() {
    local t h ur dg lost risk start=$SECONDS
    T_RISK=${2:-}
    T_DONE=""
    AT_RISK=0
    while [ $((SECONDS - start)) -le $REPAIR_TIMEOUT ]; do
        t=$(now)
        h=$(health)
        if [ -n "$h" ]; then
            read -r ur dg lost risk <<<"$h"
            if [ "$lost" != 0 ]; then
                echo "bench-repair.sh: status shows $lost lost chunks" >&2
                exit 1
            fi
            if [ -z "$T_RISK" ] && [ $((ur + dg)) -gt 0 ]; then
                T_RISK=$t
                AT_RISK=$risk
                echo "bench-repair.sh: $(secs "$1" "$t") s after the kill: $ur under-replicated," \
                    "$dg degraded, $(mib "$risk") MiB at risk" >&2
            elif [ -n "$T_RISK" ] && [ $((ur + dg)) -eq 0 ]; then
                T_DONE=$t
                return 0
            fi
        fi
        if [ -z "$T_RISK" ] && [ $((SECONDS - start)) -gt 120 ]; then
            echo "bench-repair.sh: no chunk at risk 120 s after the kill (was the repair" \
                "over between two polls? try a larger --size-mib)" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "bench-repair.sh: redundancy not restored within $REPAIR_TIMEOUT s" >&2
    "$BIN/rawfs" status --dir "$CLUSTER" >&2 || true
    exit 1
}

# --- phase A: throttle lifted ------------------------------------------------------------------
healer_set --repair-rate 0
read -r A_ID A_PID A_USED A_CHUNKS <<<"$(victim)"
echo "bench-repair.sh: A: repair rate unlimited; killing chunkserver $A_ID (pid $A_PID," \
    "$A_CHUNKS chunks, $(mib "$A_USED") MiB used)" >&2
# The repair reads its sources from disk, not from the page cache the writes left.
drop_caches
T_KILL=$(now)
kill_chunkserver "$A_ID" "$A_PID"
wait_repair "$T_KILL"
A_TOTAL=$(secs "$T_KILL" "$T_DONE")
A_DETECT=$(secs "$T_KILL" "$T_RISK")
A_REPAIR=$(secs "$T_RISK" "$T_DONE")
A_AT_RISK=$AT_RISK
REPAIR_RATE=$(rate "$T_RISK" "$T_DONE" "$(mib "$A_USED")")
echo "bench-repair.sh: A: full redundancy $A_TOTAL s after the kill ($A_REPAIR s of repair)" >&2

# --- phase B: default throttle, a foreground read during the repair ---------------------------
healer_set --repair-rate default
# The idle figure is taken on the cluster as it is right before the kill (5 servers up), so
# that the ratio shows the repair's cost only.
IDLE_R=$(cold_read "$READ_FILE")
read -r B_ID B_PID B_USED B_CHUNKS <<<"$(victim)"
echo "bench-repair.sh: B: repair rate $DEFAULT_REPAIR_RATE; idle read $IDLE_R MiB/s;" \
    "killing chunkserver $B_ID (pid $B_PID, $B_CHUNKS chunks, $(mib "$B_USED") MiB used)" >&2
T_KILL=$(now)
kill_chunkserver "$B_ID" "$B_PID"
# Wait for the repair to start, then read while it runs.
deadline=$((SECONDS + 120))
while :; do
    h=$(health)
    if [ -n "$h" ]; then
        read -r ur dg lost _ <<<"$h"
        [ $((ur + dg)) -gt 0 ] && break
    fi
    if [ $SECONDS -gt $deadline ]; then
        echo "bench-repair.sh: B: no chunk at risk 120 s after the kill" >&2
        exit 1
    fi
    sleep 0.5
done
B_RISK=$(now)
B_DETECT=$(secs "$T_KILL" "$B_RISK")
BUSY_R=$(cold_read "$READ_FILE")
h=$(health)
read -r ur dg lost _ <<<"${h:-0 0 0 0}"
DURING="yes"
if [ -z "$h" ]; then
    DURING="unknown (status did not answer after the read)"
elif [ $((ur + dg)) -eq 0 ]; then
    DURING="no: the repair was over before the read ended, the figure is not 'during repair'"
fi
echo "bench-repair.sh: B: read during repair $BUSY_R MiB/s (repair still running at its end: $DURING)" >&2
# Let the repair finish, so that its time under the default throttle is known too.
wait_repair "$T_KILL" "$B_RISK"
B_TOTAL=$(secs "$T_KILL" "$T_DONE")

# --- what the logs say --------------------------------------------------------------------------
echo >&2
while read -r log; do
    n=$(grep -c -E 'WARN|ERROR' "$log" 2>/dev/null || true)
    if [ "${n:-0}" -gt 0 ]; then
        echo "bench-repair.sh: $n warnings/errors in $log, the last ones:" >&2
        grep -E 'WARN|ERROR' "$log" | tail -3 | cut -c1-300 >&2
    fi
done < <(jq -r '.processes[] | select(.log != null) | .log' "$CLUSTER/cluster.json")

printf '\n%-36s %14s %14s %8s %8s\n' "benchmark ($SIZE_MIB MiB, $PROFILE)" "baseline" "rawfs" "ratio" "target"
printf '%-36s %8s MiB/s %8s MiB/s %8s %8s\n' "repair (unthrottled) vs disk write" "$DISK_W" \
    "$REPAIR_RATE" "$(ratio "$DISK_W" "$REPAIR_RATE")" ">=0.30"
printf '%-36s %8s MiB/s %8s MiB/s %8s %8s\n' "seq read during repair vs idle" "$IDLE_R" \
    "$BUSY_R" "$(ratio "$IDLE_R" "$BUSY_R")" ">=0.60"
echo
echo "disk write (dd, fsync):        $DISK_W MiB/s; write into the mount $MOUNT_W MiB/s"
echo "A, repair rate unlimited:      chunkserver $A_ID, $A_CHUNKS chunks, $(mib "$A_USED") MiB used" \
    "($(mib "$A_AT_RISK") MiB of file data at risk)"
echo "                               at risk ${A_DETECT} s after the kill (chunkserver timeout" \
    "$CHUNKSERVER_TIMEOUT), full redundancy ${A_REPAIR} s later: $A_TOTAL s in all"
echo "B, repair rate $DEFAULT_REPAIR_RATE: chunkserver $B_ID, $B_CHUNKS chunks," \
    "$(mib "$B_USED") MiB used; at risk $B_DETECT s after the kill, full redundancy $B_TOTAL s after it"
echo "                               idle read $IDLE_R MiB/s (6 servers: $IDLE_R6 MiB/s), during" \
    "repair $BUSY_R MiB/s ($PER_FILE_MIB MiB, cold caches); repair still running at the read's end: $DURING"
