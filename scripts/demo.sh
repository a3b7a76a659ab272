#!/usr/bin/env bash
# ftvmm's failover demo on three "hosts": network namespaces ftdemo-primary
# (10.77.0.1), ftdemo-backup (10.77.0.2) and ftdemo-client (10.77.0.3) on a
# bridge. The primary and backup run the `ticker` guest in lockstep; the
# client reads its console from the primary. Then the primary host dies: its
# VMM is SIGKILLed and its link cut. The backup goes live and the client,
# reconnecting to the backup's console, sees the ticks continue — none
# missing, some repeated at the switch.
#
# Needs root (namespaces) and /dev/kvm. Usage: scripts/demo.sh [seconds-before-kill]
set -euo pipefail
cd "$(dirname "$0")/.."
KILL_AFTER=${1:-3}
NS_P=ftdemo-primary NS_B=ftdemo-backup NS_C=ftdemo-client BR=ftdemo-br0
P=10.77.0.1 B=10.77.0.2 C=10.77.0.3

if [ "$(id -u)" != 0 ]; then echo "demo: needs root (network namespaces)" >&2; exit 1; fi
if [ ! -e /dev/kvm ]; then echo "demo: /dev/kvm is missing" >&2; exit 1; fi
command -v ip >/dev/null || { echo "demo: needs iproute2 (ip)" >&2; exit 1; }

cargo build --release --bin ftvmm --bin ftclient >&2
FTVMM=$PWD/target/release/ftvmm FTCLIENT=$PWD/target/release/ftclient
LOGS=$(mktemp -d)

cleanup() {
    jobs -p | xargs -r kill -9 2>/dev/null || true
    for ns in $NS_P $NS_B $NS_C; do ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del $ns 2>/dev/null || true; done
    ip link del $BR 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip link add $BR type bridge && ip link set $BR up
i=0
for ns in $NS_P $NS_B $NS_C; do
    i=$((i + 1))
    ip netns add $ns
    ip link add ftdemo-v$i type veth peer name eth0 netns $ns
    ip link set ftdemo-v$i master $BR up
    ip -n $ns addr add 10.77.0.$i/24 dev eth0
    ip -n $ns link set eth0 up
    ip -n $ns link set lo up
done

echo "== three hosts: primary $P, backup $B, client $C (network namespaces on bridge $BR)"
ip netns exec $NS_B "$FTVMM" --backup --guest ticker --connect $P:7000 --serial tcp:$B:7001 2>"$LOGS/backup.err" &
ip netns exec $NS_P "$FTVMM" --primary --guest ticker --listen $P:7000 --serial tcp:$P:7001 2>"$LOGS/primary.err" &
PRIMARY=$!
ip netns exec $NS_C "$FTCLIENT" --seconds $((KILL_AFTER + 6)) $P:7001 $B:7001 &
CLIENT=$!

sleep "$KILL_AFTER"
echo "== killing the primary host: SIGKILL to its VMM, its link cut"
ip netns pids $NS_P | xargs -r kill -9
ip link set ftdemo-v1 down
wait $CLIENT && status=0 || status=$?
echo "== primary said:"; sed 's/^/   /' "$LOGS/primary.err"
echo "== backup said:";  sed 's/^/   /' "$LOGS/backup.err"
exit $status
