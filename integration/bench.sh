#!/usr/bin/env bash
# rawfs benchmark: the same figures on a rawfs mount and on a plain local directory of the same
# disk, in the same run, printed side by side as ratios (only same-run ratios mean anything:
# absolute figures swing 2-3x between runs on a shared machine). Not run in CI.
#
#   sequential 1 GiB write + fsync, and read with cold caches      (dd)
#   (the write also against 3 copies written at once on the local disk: the ceiling of 3
#   replicas on one disk)
#   4 KiB random read and random write IOPS, iodepth 16            (fio)
#   create / stat / unlink of 10,000 empty files per second        (rawfs-bench meta)
#   a source tree (/usr/include, else this repository's sources): tar x, ls -lR, cp -r and
#   rm -rf, in entries per second                                  (tar, ls, cp, rm)
#   optional (--million): RSS of the metadata process after 1,000,000 files created through
#   the metadata client (rawfs-bench million), target < 300 MB
#
# Every figure is measured in each of --rounds rounds (default 3), local then rawfs (then the
# peer) within a round, so that a slow spell of the host's disk hits both sides of a round's
# ratio; the table shows the median of each side and the median of the rounds' ratios, with
# their range (on this project's shared VM one round's ratio swings by 1.5-2x).
#
# Usage: integration/bench.sh [--million] [--rounds N] [--size-mib N] [--fio-seconds S] [--peer DIR] [--debug]
# --peer DIR measures a third directory in the same run, a mount of another filesystem (MooseFS,
# CephFS, JuiceFS...) set up by hand, and prints its ratio to local beside rawfs's.
# (--debug uses the debug build: only to check the script itself, its figures mean nothing)
# Needs root (FUSE, drop_caches), fio, and builds the release binaries first.
# RAWFS_BENCH_DIR (default /var/tmp/rawfs-bench) holds the cluster and the local directory.
set -euo pipefail

MILLION=0
ROUNDS=3
SIZE_MIB=1024
FIO_SECONDS=20
FILES=10000
PROFILE=release
PEER=
while [ $# -gt 0 ]; do
    case "$1" in
        --million) MILLION=1 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --size-mib) SIZE_MIB="$2"; shift ;;
        --fio-seconds) FIO_SECONDS="$2"; shift ;;
        --files) FILES="$2"; shift ;;
        --peer) PEER="$2"; shift ;;
        --debug) PROFILE=debug ;;
        *) echo "usage: $0 [--million] [--rounds N] [--size-mib N] [--fio-seconds S] [--files N] [--peer DIR] [--debug]" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
# shellcheck source=integration/bench-lib.sh
. integration/bench-lib.sh
if [ -n "$PEER" ]; then
    mountpoint -q "$PEER" || { echo "bench.sh: --peer $PEER is not a mount point" >&2; exit 2; }
    PEER="$PEER/rawfs-bench"
    rm -rf "$PEER" && mkdir -p "$PEER"
fi
command -v fio >/dev/null || { echo "bench.sh: fio is needed (apt-get install fio)" >&2; exit 1; }
if [ $PROFILE = release ]; then
    cargo build --release -p rawfs -p rawfs-integration >&2
else
    cargo build -p rawfs -p rawfs-integration >&2
fi
BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/$PROFILE"

BASE="${RAWFS_BENCH_DIR:-/var/tmp/rawfs-bench}"
rm -rf "$BASE/local" "$BASE/cluster"
mkdir -p "$BASE/local" "$BASE/mnt"
LOCAL="$BASE/local"
MNT="$BASE/mnt"

"$BIN/rawfs" up --dir "$BASE/cluster" --mount "$MNT" >"$BASE/up.log" 2>&1 &
UP=$!
cleanup() {
    kill -TERM "$UP" 2>/dev/null || true
    wait "$UP" 2>/dev/null || true
    if [ -n "$PEER" ]; then rm -rf "$PEER"; fi
}
trap cleanup EXIT

# Poll until cluster.json says ready (rawfs up writes it once the mount is live).
deadline=$((SECONDS + 120))
until grep -q '"ready": true' "$BASE/cluster/cluster.json" 2>/dev/null; do
    if ! kill -0 "$UP" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        echo "bench.sh: the cluster did not come up:" >&2
        tail -30 "$BASE/up.log" >&2
        exit 1
    fi
    sleep 0.2
done

drop_caches() {
    sync
    if ! echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        echo "bench.sh: cannot drop caches; the read figures are warm" >&2
    fi
}

now() { date +%s.%N; }
rate() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.1f", n / (b - a) }'; }

# Random source data, made once and read from the page cache, so that /dev/urandom's own speed
# does not cap (and flatten) both sides of the write ratio.
SOURCE="$BASE/source.dat"
make_source() {
    [ -f "$SOURCE" ] && [ "$(stat -c %s "$SOURCE")" -eq $((SIZE_MIB << 20)) ] ||
        dd if=/dev/urandom of="$SOURCE" bs=1M count="$SIZE_MIB" iflag=fullblock status=none
    cat "$SOURCE" >/dev/null
}

seq_write() { # dir -> MiB/s
    local t0 t1
    make_source
    t0=$(now)
    dd if="$SOURCE" of="$1/seq" bs=1M conv=fsync status=none
    t1=$(now)
    rate "$t0" "$t1" "$SIZE_MIB"
}

# The disk's own ceiling for a replicated write: the same 1 GiB written as 3 files at once,
# each fsynced, as 3 replicas on this one disk must be (the figure is the logical MiB/s).
seq_write_3copies() { # dir -> MiB/s
    local t0 t1 i
    make_source
    t0=$(now)
    for i in 1 2 3; do
        dd if="$SOURCE" of="$1/seq.copy$i" bs=1M conv=fsync status=none &
    done
    wait
    t1=$(now)
    rm -f "$1"/seq.copy?
    rate "$t0" "$t1" "$SIZE_MIB"
}

seq_read() { # dir -> MiB/s
    local t0 t1
    drop_caches
    t0=$(now)
    dd if="$1/seq" of=/dev/null bs=1M status=none
    t1=$(now)
    rm -f "$1/seq"
    rate "$t0" "$t1" "$SIZE_MIB"
}

fio_iops() { # dir rw -> IOPS (terse v3: field 8 read IOPS, field 49 write IOPS)
    local field=8
    [ "$2" = randwrite ] && field=49
    fio --name=bench --directory="$1" --filename=fio.dat --size=512M --bs=4k --rw="$2" \
        --ioengine=libaio --iodepth=16 --direct=0 --time_based --runtime="$FIO_SECONDS" \
        --fsync_on_close=1 --output-format=terse --terse-version=3 2>/dev/null \
        | awk -F';' -v f=$field '{ print $f }'
}

# A tarball of a source tree, made once: /usr/include (libc and compiler headers, ~9,000
# entries on Debian with gcc), else this repository's own sources.
TREE="$BASE/tree.tar"
make_tree() {
    if [ ! -s "$TREE" ]; then
        if [ -d /usr/include ]; then
            tar cf "$TREE" -C /usr include
        else
            git ls-files -z | tar cf "$TREE" --null -T -
        fi
    fi
    TREE_ENTRIES=$(tar tf "$TREE" | wc -l)
}

tree_ops() { # dir -> "untar list copy remove" (entries/s)
    local t0 t1 t2 t3 t4
    mkdir "$1/tree"
    t0=$(now)
    tar xf "$TREE" -C "$1/tree"
    t1=$(now)
    ls -lR "$1/tree" >/dev/null
    t2=$(now)
    cp -r "$1/tree" "$1/tree-copy"
    t3=$(now)
    rm -rf "$1/tree" "$1/tree-copy"
    t4=$(now)
    # rm -rf removes both trees: twice the entries.
    echo "$(rate "$t0" "$t1" "$TREE_ENTRIES") $(rate "$t1" "$t2" "$TREE_ENTRIES")" \
        "$(rate "$t2" "$t3" "$TREE_ENTRIES") $(rate "$t3" "$t4" $((2 * TREE_ENTRIES)))"
}

meta_ops() { # dir -> "create stat unlink"
    "$BIN/rawfs-bench" meta "$1/meta" "$FILES" | awk '{ v[$1] = $2 } END { print v["create_per_s"], v["stat_per_s"], v["unlink_per_s"] }'
}

make_tree
declare -A R
for round in $(seq "$ROUNDS"); do
    for where in local mount ${PEER:+peer}; do
        case $where in
            local) dir=$LOCAL ;;
            mount) dir=$MNT ;;
            peer) dir=$PEER ;;
        esac
        echo "bench.sh: round $round of $ROUNDS: measuring $where ($dir)" >&2
        R[$where.seqw.$round]=$(seq_write "$dir")
        if [ $where = local ]; then
            R[local.seqw3.$round]=$(seq_write_3copies "$dir")
        else
            R[$where.seqw3.$round]=${R[$where.seqw.$round]}
        fi
        R[$where.seqr.$round]=$(seq_read "$dir")
        R[$where.randr.$round]=$(fio_iops "$dir" randread)
        R[$where.randw.$round]=$(fio_iops "$dir" randwrite)
        rm -f "$dir/fio.dat"
        read -r c s u <<<"$(meta_ops "$dir")"
        R[$where.create.$round]=$c
        R[$where.stat.$round]=$s
        R[$where.unlink.$round]=$u
        rm -rf "$dir/meta"
        read -r tx tl tc tr <<<"$(tree_ops "$dir")"
        R[$where.untar.$round]=$tx
        R[$where.list.$round]=$tl
        R[$where.copy.$round]=$tc
        R[$where.remove.$round]=$tr
        printf 'bench.sh: round %s %s: seq write %s (3 copies %s), seq read %s MiB/s; randread %s, randwrite %s IOPS; create %s, stat %s, unlink %s /s; tree: tar x %s, ls -lR %s, cp -r %s, rm -rf %s entries/s\n' \
            "$round" "$where" "${R[$where.seqw.$round]}" "${R[$where.seqw3.$round]}" "${R[$where.seqr.$round]}" \
            "${R[$where.randr.$round]}" "${R[$where.randw.$round]}" "$c" "$s" "$u" "$tx" "$tl" "$tc" "$tr" >&2
    done
done

printf '\n%d rounds; figures are medians, ratios the median of the rounds'"'"' ratios (range)\n' "$ROUNDS"
printf '%-28s %18s %18s %8s %11s %8s' "benchmark" "local" "rawfs" "ratio" "range" "target"
[ -n "$PEER" ] && printf ' %18s %8s %11s' "peer" "ratio" "range"
printf '\n'
row() { # key label unit target
    local l m r
    l=$(figures local "$1" | median)
    m=$(figures mount "$1" | median)
    read -r r range <<<"$(ratios local mount "$1")"
    printf '%-28s %12s %-5s %12s %-5s %8s %11s %8s' "$2" "$l" "$3" "$m" "$3" "$r" "$range" "$4"
    if [ -n "$PEER" ]; then
        read -r r range <<<"$(ratios local peer "$1")"
        printf ' %12s %-5s %8s %11s' "$(figures peer "$1" | median)" "$3" "$r" "$range"
    fi
    printf '\n'
}
row seqw "seq write ${SIZE_MIB} MiB + fsync" "MiB/s" ">=0.25"
row seqw3 "  vs 3 copies on local disk" "MiB/s" "-"
row seqr "seq read (cold cache)" "MiB/s" ">=0.80"
row randr "4 KiB random read, qd16" "IOPS" ">=0.25"
row randw "4 KiB random write, qd16" "IOPS" ">=0.06"
row create "create empty files" "/s" ">=0.15"
row stat "stat files" "/s" ">=0.05"
row unlink "unlink files" "/s" "-"
row untar "tar x of a source tree" "/s" "-"
row list "ls -lR of it" "/s" "-"
row copy "cp -r of it" "/s" "-"
row remove "rm -rf of both" "/s" "-"

if [ $MILLION = 1 ]; then
    META_ADDR=$(grep -A3 '"role": "metadata"' "$BASE/cluster/cluster.json" | sed -n 's/.*"addr": "\(.*\)".*/\1/p' | head -1)
    META_PID=$(grep -A3 '"role": "metadata"' "$BASE/cluster/cluster.json" | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' | head -1)
    echo "bench.sh: creating 1,000,000 files through the metadata client at $META_ADDR" >&2
    "$BIN/rawfs-bench" million "$META_ADDR" 1000000
    rss_kb=$(awk '/VmRSS/ { print $2 }' "/proc/$META_PID/status")
    printf '%-30s %10s MB (target < 300 MB)\n' "metadata RSS after 1M files" "$((rss_kb / 1024))"
fi
