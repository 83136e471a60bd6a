#!/usr/bin/env bash
# Fault campaign (on demand, not in CI; the CI test is integration/tests/integration/fault_storm.rs):
# three writers on a `rawfs up` mount create, extend and overwrite files with an fsync after
# each change (writer.py; LIMIT_MIB per writer, older files deleted), while every 3-8 s a
# random daemon (metadata replica, chunkserver, healer, NBD server) is killed with SIGKILL
# and restarted 1-6 s later from its recorded command line, without waiting for repairs.
# Writers read files back as they go (MISMATCH lines); at the end every fsynced file is
# verified, the cluster is stopped, started again, and verified again (verify.py).
#
# Usage (root): integration/chaos/chaos.sh SECONDS SEED
#   BIN (default target/release) holds the binaries; CHAOS_DIR (default /var/tmp/rawfs-chaos)
#   the cluster, the mount, journals (j1..j3) and the writers' output (w1.out..w3.out).
set -u
DUR=$1; SEED=$2; RANDOM=$SEED; export LIMIT_MIB=${LIMIT_MIB:-1024}
HERE=$(cd "$(dirname "$0")" && pwd)
B=${BIN:-$HERE/../../target/release}
D=${CHAOS_DIR:-/var/tmp/rawfs-chaos}; C=$D/c; M=$D/mnt
mkdir -p "$D"
rm -rf $C $D/j* $D/STOP $D/*.out; mkdir -p $M
setsid $B/rawfs up --dir $C --mount $M > $D/up.log 2>&1 &
for i in $(seq 90); do grep -q '"ready": true' $C/cluster.json 2>/dev/null && break; sleep 1; done
declare -A CMD PID
while read -r role id pid; do
    k=$role-$id; PID[$k]=$pid
    CMD[$k]=$(tr '\0' '\n' < /proc/$pid/cmdline | sed "s/'/'\\\\''/g; s/.*/'&'/" | tr '\n' ' ')
done < <(python3 -c "
import json
for p in json.load(open('$C/cluster.json'))['processes']:
    if p['role'] in ('metadata','chunkserver','healer','nbd'): print(p['role'], p['id'], p['pid'])")
echo "daemons: ${!PID[*]}"
WP=()
for w in 1 2 3; do python3 -u $HERE/writer.py $M/w$w $((SEED * 10 + w)) $D/j$w > $D/w$w.out 2>&1 & WP+=($!); done
end=$((SECONDS + DUR)); kills=0
while [ $SECONDS -lt $end ]; do
    sleep $((3 + RANDOM % 6))
    keys=(${!PID[*]}); k=${keys[$((RANDOM % ${#keys[@]}))]}
    echo "$(date +%T) kill -9 $k (pid ${PID[$k]})"
    kill -9 "${PID[$k]}"; kills=$((kills + 1))
    sleep $((1 + RANDOM % 6))
    eval "setsid ${CMD[$k]} >> $C/logs/$k.log 2>&1 &"
    PID[$k]=$!
    echo "$(date +%T) restarted $k (pid ${PID[$k]})"
done
touch $D/STOP; wait "${WP[@]}"
sleep 1
echo "kills $kills"; tail -n 3 $D/w*.out
python3 $HERE/verify.py $M/w1 $D/j1; python3 $HERE/verify.py $M/w2 $D/j2; python3 $HERE/verify.py $M/w3 $D/j3
$B/rawfs status --dir $C | head -30
stop_all() {
    pkill -INT -f "rawfs up --dir $C"; sleep 3
    for k in "${!PID[@]}"; do kill "${PID[$k]}" 2>/dev/null; done; sleep 2
    pkill -9 -f "$C/" ; umount $M 2>/dev/null; sleep 1
}
stop_all
echo "== restart"
setsid $B/rawfs up --dir $C --mount $M > $D/up2.log 2>&1 &
for i in $(seq 90); do grep -q '"ready": true' $C/cluster.json 2>/dev/null && break; sleep 1; done
python3 $HERE/verify.py $M/w1 $D/j1; python3 $HERE/verify.py $M/w2 $D/j2; python3 $HERE/verify.py $M/w3 $D/j3
PID=()
stop_all
