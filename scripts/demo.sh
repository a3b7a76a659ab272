#!/usr/bin/env bash
# ftvmm's failover demo on four "hosts": network namespaces ftdemo-primary
# (10.77.0.1), ftdemo-backup (10.77.0.2), ftdemo-client (10.77.0.3) and
# ftdemo-storage (10.77.0.4) on one bridge. The storage host serves the shared
# disk (ftdisk); the primary and backup run a guest in lockstep; the client
# talks to the guest's console on the primary. Then the primary host dies: its
# VMM is SIGKILLed and its link cut. The backup wins the go-live test-and-set
# on the shared disk, goes live, and the client, reconnecting to the backup's
# console, carries on.
#
# Guests: `kvstore` (default): the client streams `set`s and afterwards reads
# back every one that was acknowledged — none may be lost. `ticker`: the
# client reads ticks — none may be missing, a few repeat at the switch.
#
# Needs root (namespaces), /dev/kvm, iproute2 and qemu-img.
# Usage: scripts/demo.sh [kvstore|ticker] [seconds-before-kill]
set -euo pipefail
cd "$(dirname "$0")/.."
GUEST=${1:-kvstore}
KILL_AFTER=${2:-3}
case "$GUEST" in kvstore|ticker) ;; *) echo "demo: guest must be kvstore or ticker" >&2; exit 2;; esac
NS_P=ftdemo-primary NS_B=ftdemo-backup NS_C=ftdemo-client NS_S=ftdemo-storage
P=10.77.0.1 B=10.77.0.2 S=10.77.0.4

if [ "$(id -u)" != 0 ]; then echo "demo: needs root (network namespaces)" >&2; exit 1; fi
if [ ! -e /dev/kvm ]; then echo "demo: /dev/kvm is missing" >&2; exit 1; fi
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
    echo "demo: installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo build --release --bin ftvmm --bin ftdisk --bin ftclient --bin ftlab >&2
BIN=$PWD/target/release
WORK=$(mktemp -d)

cleanup() {
    jobs -p | xargs -r kill -9 2>/dev/null || true
    "$BIN/ftlab" down ftdemo
    rm -rf "$WORK"
}
trap cleanup EXIT
# The lab's namespaces and bridge: whatever an earlier run left is removed first.
"$BIN/ftlab" up ftdemo 10.77.0 primary=1 backup=2 client=3 storage=4 --owner $$ >/dev/null

echo "== four hosts: primary $P, backup $B, client 10.77.0.3, storage $S (namespaces on bridge ftdemo-br0)"
qemu-img create -q -f raw "$WORK/shared.img" 16M
ip netns exec $NS_S "$BIN/ftdisk" --image "$WORK/shared.img" --listen $S:7100 2>"$WORK/storage.err" &
sleep 0.3
DISK=(--disk ftdisk:$S:7100)
ip netns exec $NS_B "$BIN/ftvmm" --backup --guest "$GUEST" "${DISK[@]}" --connect $P:7000 --serial tcp:$B:7001 2>"$WORK/backup.err" &
ip netns exec $NS_P "$BIN/ftvmm" --primary --guest "$GUEST" "${DISK[@]}" --listen $P:7000 --serial tcp:$P:7001 2>"$WORK/primary.err" &
if [ "$GUEST" = kvstore ]; then
    ip netns exec $NS_C "$BIN/ftclient" --kv $(( (KILL_AFTER + 3) * 40 )) $P:7001 $B:7001 &
else
    ip netns exec $NS_C "$BIN/ftclient" --seconds $((KILL_AFTER + 6)) $P:7001 $B:7001 &
fi
CLIENT=$!

sleep "$KILL_AFTER"
echo "== killing the primary host: SIGKILL to its VMM, its link cut"
ip netns pids $NS_P | xargs -r kill -9
"$BIN/ftlab" cut ftdemo primary
wait $CLIENT && status=0 || status=$?
for who in primary backup storage; do
    echo "== $who said:"; sed 's/^/   /' "$WORK/$who.err"
done
exit $status
