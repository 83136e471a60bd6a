#!/usr/bin/env bash
# rawfs block-volume benchmark: the same fio jobs over NBD against a rawfs volume (`rawfs up`,
# 3 replicas) and against nbdkit's file plugin serving a file on the same disk, in the same
# run, printed as ratios (only same-run ratios mean anything on a shared machine). Not run in
# CI.
#
#   sequential write of SIZE with a flush at the end, and sequential read   (bs 1 MiB, qd 8)
#   (the write also against 3 fsynced copies written at once to local files: the ceiling
#   of 3 replicas on one disk; shown in the nbdkit column)
#   4 KiB random read and random write IOPS                                 (qd 16)
#
# fio talks NBD itself (ioengine=nbd, libnbd), so no kernel NBD module is needed.
#
# Every figure is measured in each of --rounds rounds (default 3), nbdkit then rawfs within a
# round, each round writing into a fresh volume and a fresh nbdkit file; the table shows the
# median of each side and the median of the rounds' ratios with their range (nbdkit's own
# sequential write swings 670-1,210 MiB/s from run to run on this project's shared VM).
#
# Usage: integration/bench-nbd.sh [--rounds N] [--size-mib N] [--fio-seconds S] [--debug] [--no-build]
#   --no-build   use the binaries already built
# Needs root for drop_caches (the figures are warm otherwise), fio with the nbd engine, nbdkit.
# RAWFS_BENCH_DIR (default /var/tmp/rawfs-bench-nbd) holds the cluster and nbdkit's file.
set -euo pipefail

ROUNDS=3
SIZE_MIB=1024
FIO_SECONDS=20
PROFILE=release
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --size-mib) SIZE_MIB="$2"; shift ;;
        --fio-seconds) FIO_SECONDS="$2"; shift ;;
        --debug) PROFILE=debug ;;
        --no-build) BUILD=0 ;;
        *) echo "usage: $0 [--rounds N] [--size-mib N] [--fio-seconds S] [--debug] [--no-build]" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
# shellcheck source=integration/bench-lib.sh
. integration/bench-lib.sh
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench-nbd.sh: fio lacks the nbd engine" >&2; exit 1; }
command -v nbdkit >/dev/null || { echo "bench-nbd.sh: nbdkit is needed" >&2; exit 1; }
# The same package set as the other benchmarks, so that they share one build.
if [ $BUILD = 1 ] && [ $PROFILE = release ]; then
    cargo build --release -p rawfs -p rawfs-integration >&2
elif [ $BUILD = 1 ]; then
    cargo build -p rawfs -p rawfs-integration >&2
fi
BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/$PROFILE"

BASE="${RAWFS_BENCH_DIR:-/var/tmp/rawfs-bench-nbd}"
rm -rf "$BASE"
mkdir -p "$BASE/mnt"
VOL_MIB=$((SIZE_MIB * 2))

"$BIN/rawfs" up --dir "$BASE/cluster" --mount "$BASE/mnt" >"$BASE/up.log" 2>&1 &
UP=$!
KIT=""
cleanup() {
    [ -n "$KIT" ] && kill "$KIT" 2>/dev/null || true
    kill -TERM "$UP" 2>/dev/null || true
    wait "$UP" 2>/dev/null || true
}
trap cleanup EXIT

deadline=$((SECONDS + 120))
until grep -q '"ready": true' "$BASE/cluster/cluster.json" 2>/dev/null; do
    if ! kill -0 "$UP" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        echo "bench-nbd.sh: the cluster did not come up:" >&2
        tail -30 "$BASE/up.log" >&2
        exit 1
    fi
    sleep 0.2
done
NBD_ADDR=$(grep -A3 '"role": "nbd"' "$BASE/cluster/cluster.json" | sed -n 's/.*"addr": "\(.*\)".*/\1/p' | head -1)
[ -n "$NBD_ADDR" ] || { echo "bench-nbd.sh: no nbd server in cluster.json" >&2; exit 1; }
# Multi-conn, as nbdkit's file plugin is: fio's jobs may use several connections.
# One volume and one nbdkit file per round (nbdkit's dir= mode exports each file of the
# directory under its name), so that every round's write lands in fresh space on both sides.
mkdir -p "$BASE/nbdkit"
for round in $(seq "$ROUNDS"); do
    "$BIN/rawfs" volume create "bench$round" --size "${VOL_MIB}M" --multi-conn --dir "$BASE/cluster" >&2
    truncate -s "${VOL_MIB}M" "$BASE/nbdkit/bench$round"
done
KIT_PORT=10899
nbdkit --foreground --port "$KIT_PORT" --ipaddr 127.0.0.1 file dir="$BASE/nbdkit" &
KIT=$!
deadline=$((SECONDS + 30))
until nbdinfo --size "nbd://127.0.0.1:$KIT_PORT/bench1" >/dev/null 2>&1; do
    [ $SECONDS -gt $deadline ] && { echo "bench-nbd.sh: nbdkit did not start" >&2; exit 1; }
    sleep 0.1
done

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || echo "bench-nbd.sh: cannot drop caches" >&2
}

# fio over NBD; prints bandwidth in MiB/s (seq) or IOPS (rand) from the terse v3 output
# (fields: 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS; only the job's own
# line, which starts with the terse version 3 and the job name).
run_fio() { # uri rw bs iodepth -> figure
    local uri=$1 rw=$2 bs=$3 qd=$4 extra=() field
    case $rw in
        write) field=48; extra=(--size="${SIZE_MIB}M" --end_fsync=1) ;;
        read) field=7; extra=(--size="${SIZE_MIB}M") ;;
        randread) field=8; extra=(--size="${SIZE_MIB}M" --time_based --runtime="$FIO_SECONDS") ;;
        randwrite) field=49; extra=(--size="${SIZE_MIB}M" --time_based --runtime="$FIO_SECONDS") ;;
    esac
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        "${extra[@]}" --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' -v f=$field '$1 == "3" && $3 == "bench" { v = $f } END { if (f == 7 || f == 48) printf "%.1f\n", v / 1024; else print v }'
}

# What 3 replicas on this one disk can reach: the same sequential write as 3 local files
# at once, each fsynced at its end (fio, buffered); the figure is the logical MiB/s, as the
# volume's.
seqw_3copies() { # -> MiB/s
    fio --name=copies --directory="$BASE" --rw=write --bs=1M --size="${SIZE_MIB}M" \
        --numjobs=3 --end_fsync=1 --group_reporting --output-format=terse --terse-version=3 \
        2>/dev/null | awk -F';' '$1 == "3" && $3 == "copies" { v = $48 } END { printf "%.1f\n", v / 1024 / 3 }'
    rm -f "$BASE"/copies.*
}

declare -A R
for round in $(seq "$ROUNDS"); do
    for where in nbdkit rawfs; do
        uri="nbd://127.0.0.1:$KIT_PORT/bench$round"
        [ $where = rawfs ] && uri="nbd://$NBD_ADDR/bench$round"
        echo "bench-nbd.sh: round $round of $ROUNDS: measuring $where ($uri)" >&2
        R[$where.seqw.$round]=$(run_fio "$uri" write 1M 8)
        if [ $where = nbdkit ]; then
            R[nbdkit.seqw3.$round]=$(seqw_3copies)
        else
            R[rawfs.seqw3.$round]=${R[rawfs.seqw.$round]}
        fi
        drop_caches
        R[$where.seqr.$round]=$(run_fio "$uri" read 1M 8)
        R[$where.randr.$round]=$(run_fio "$uri" randread 4k 16)
        R[$where.randw.$round]=$(run_fio "$uri" randwrite 4k 16)
        printf 'bench-nbd.sh: round %s %s: seq write %s (3 copies %s), seq read %s MiB/s; randread %s, randwrite %s IOPS\n' \
            "$round" "$where" "${R[$where.seqw.$round]}" "${R[$where.seqw3.$round]}" "${R[$where.seqr.$round]}" \
            "${R[$where.randr.$round]}" "${R[$where.randw.$round]}" >&2
    done
done

printf '\n%d rounds; figures are medians, ratios the median of the rounds'"'"' ratios (range)\n' "$ROUNDS"
printf '%-30s %16s %16s %8s %11s %8s\n' "benchmark (over NBD)" "nbdkit file" "rawfs" "ratio" "range" "target"
row() { # key label unit target
    local r range
    read -r r range <<<"$(ratios nbdkit rawfs "$1")"
    printf '%-30s %10s %-5s %10s %-5s %8s %11s %8s\n' "$2" "$(figures nbdkit "$1" | median)" "$3" \
        "$(figures rawfs "$1" | median)" "$3" "$r" "$range" "$4"
}
row seqw "seq write ${SIZE_MIB} MiB + flush" "MiB/s" ">=0.5"
row seqw3 "  vs 3 copies on local disk" "MiB/s" "-"
row seqr "seq read (cold cache)" "MiB/s" ">=0.5"
row randr "4 KiB random read, qd16" "IOPS" ">=0.3"
row randw "4 KiB random write, qd16" "IOPS" ">=0.3"
