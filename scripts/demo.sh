#!/usr/bin/env bash
# ftvmm's failover demos, on "hosts" that are network namespaces on one
# bridge (made by ftlab): ftdemo-primary 10.77.0.1, ftdemo-backup 10.77.0.2,
# ftdemo-client 10.77.0.3, ftdemo-storage 10.77.0.4, and for `reprotect` two
# more VM hosts, ftdemo-third 10.77.0.5 and ftdemo-fourth 10.77.0.6. The
# storage host serves the shared disk (ftdisk); the primary and the backup
# run a guest in lockstep; the client talks to the guest. Then the primary
# host dies: its VMM is SIGKILLed and its link cut. The backup wins the
# go-live test-and-set on the shared disk, goes live, and the client carries
# on.
#
# Modes:
#   net (default)      the `redis` guest with a NIC of its own: the VM is
#                      10.77.0.10, bridged onto the LAN from the primary's and
#                      the backup's hosts (a TAP on each, the same MAC). The
#                      client runs stock redis-cli and redis-benchmark against
#                      it, then ftclient holds ONE TCP connection that INCRs
#                      and SETs while the primary host dies: the same
#                      connection carries on, and every acknowledged SET
#                      reads back.
#   kvstore            the client streams `set`s to the guest's serial console
#                      and afterwards reads back every one that was
#                      acknowledged: none may be lost.
#   ticker             the client reads ticks: none may be missing, a few
#                      repeat at the switch.
#   reprotect          kvstore through three failovers in a row: after each,
#                      a new backup joins the live side by live state
#                      transfer, and the next kill fails over to it.
#
# Every connection between hosts — the logging channel (and the state
# transfers of `reprotect`) and each VMM's to ftdisk — is mutual TLS, with a
# CA and a certificate per host made by ftcert at the start; ftdisk lets
# only the VM hosts' certificates read, write and claim the disk. TLS=off
# runs it all in plaintext instead (the VMMs and ftdisk then warn).
#
# Each VMM starts as root (to open /dev/kvm, its TAP and its listeners) and
# then runs as `nobody` (--run-as nobody): the failovers and the joins all
# happen unprivileged, every thread under its seccomp filter (the default;
# docs/sandbox.md).
#
# Needs root (namespaces), /dev/kvm, iproute2, qemu-img and (net) redis-tools
# (installed from the distribution where missing).
# Usage: [TLS=off] scripts/demo.sh [net|kvstore|ticker|reprotect] [seconds-before-kill]
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-net}
KILL_AFTER=${2:-3}
case "$MODE" in net|kvstore|ticker|reprotect) ;; *) echo "demo: mode must be net, kvstore, ticker or reprotect" >&2; exit 2;; esac
S=10.77.0.4
TLS=${TLS:-on}
case "$TLS" in on|off) ;; *) echo "demo: TLS must be on or off" >&2; exit 2;; esac

if [ "$(id -u)" != 0 ]; then echo "demo: needs root (network namespaces)" >&2; exit 1; fi
if [ ! -e /dev/kvm ]; then echo "demo: /dev/kvm is missing" >&2; exit 1; fi
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v qemu-img >/dev/null || need+=(qemu-utils)
if [ "$MODE" = net ]; then command -v redis-benchmark >/dev/null || need+=(redis-tools); fi
if [ ${#need[@]} -gt 0 ]; then
    echo "demo: installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo build --release --bin ftvmm --bin ftdisk --bin ftclient --bin ftlab --bin ftcert >&2
BIN=$PWD/target/release
WORK=$(mktemp -d)

# The servers and VMMs started in the background (see start_in).
SERVERS=()
cleanup() {
    [ ${#SERVERS[@]} -eq 0 ] || kill -9 "${SERVERS[@]}" 2>/dev/null || true
    # A client still running (the demo failed): killed, and waited for
    # with its job notice (`Killed`) thrown away.
    local pid
    for pid in $(jobs -p); do kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    "$BIN/ftlab" down ftdemo
    rm -rf "$WORK"
}
trap cleanup EXIT
# The lab's namespaces and bridge: whatever an earlier run left is removed first.
"$BIN/ftlab" up ftdemo 10.77.0 primary=1 backup=2 client=3 storage=4 third=5 fourth=6 --owner $$ >/dev/null
in_host() { local h=$1; shift; ip netns exec "ftdemo-$h" "$@"; }
# start_in HOST CMD...: CMD in the background on HOST (its stderr is the
# caller's redirection). A direct child of this shell (`ip netns exec`
# becomes CMD) and disowned: the demo kills hosts on purpose, and bash would
# report each death as a `Killed` job line.
start_in() {
    local h=$1; shift
    ip netns exec "ftdemo-$h" "$@" &
    SERVERS+=($!)
    disown $!
}
kill_host() {
    echo "== killing the $1 host: SIGKILL to its VMM, its link cut"
    ip netns pids "ftdemo-$1" | xargs -r kill -9
    "$BIN/ftlab" cut ftdemo "$1"
}
wait_for() { # FILE TEXT SECONDS
    local i
    for i in $(seq $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "demo: no \"$2\" in $1 after $3 s" >&2; return 1
}
# users: who each server and VMM started so far runs as (ftdisk as root,
# the VMMs as nobody once built).
users() { echo "== running as:"; ps -o user=,pid=,comm= -p "$(IFS=,; echo "${SERVERS[*]}")" | sed 's/^/   /' || true; }
show() { for who in "$@"; do echo "== $who said:"; sed 's/^/   /' "$WORK/$who.err"; done; }
# status HOST-IP...: what an operator sees of each VMM (`ftvmm status` on
# its --metrics address, from the client host); a dead host's is one line.
status() {
    local ip
    for ip in "$@"; do
        echo "== ftvmm status $ip:9400"
        in_host client "$BIN/ftvmm" status "$ip:9400" 2>&1 | sed 's/^/   /' || true
    done
}

echo "== hosts: primary 10.77.0.1, backup 10.77.0.2, client 10.77.0.3, storage $S (namespaces on bridge ftdemo-br0)"
# tls HOST: HOST's TLS flags (none with TLS=off).
if [ "$TLS" = on ]; then
    "$BIN/ftcert" --dir "$WORK/creds" primary=10.77.0.1 backup=10.77.0.2 storage=$S third=10.77.0.5 fourth=10.77.0.6 2>/dev/null
    echo "== TLS on: a test CA and a certificate per host made by ftcert in $WORK/creds; ftdisk allows the VM hosts only"
    tls() { echo --tls-cert "$WORK/creds/$1.pem" --tls-key "$WORK/creds/$1.key" --tls-ca "$WORK/creds/ca.pem"; }
    STORAGE_TLS=($(tls storage) --tls-allow primary --tls-allow backup --tls-allow third --tls-allow fourth)
else
    echo "== TLS off: every connection between hosts is plaintext"
    tls() { :; }
    STORAGE_TLS=()
fi
qemu-img create -q -f raw "$WORK/shared.img" 16M
start_in storage "$BIN/ftdisk" --image "$WORK/shared.img" --listen $S:7100 --metrics $S:9400 "${STORAGE_TLS[@]}" 2>"$WORK/storage.err"
sleep 0.3
DISK=(--disk ftdisk:$S:7100)
# Every VMM gives up root once its VM is built (docs/sandbox.md).
RUN_AS=(--run-as nobody)

if [ "$MODE" = net ]; then
    VM=10.77.0.10 P=10.77.0.1 B=10.77.0.2
    # Each VM host bridges a TAP onto the LAN; the VM has the same MAC on both.
    "$BIN/ftlab" tap ftdemo primary fttap
    "$BIN/ftlab" tap ftdemo backup fttap
    VMARGS=(--guest redis --cmdline "ip=$VM/24" --net tap:fttap,mac=52:54:00:77:00:10 "${DISK[@]}" "${RUN_AS[@]}")
    echo "== the VM $VM runs on the primary host, its backup on the backup host; the disk (and the arbitration record) on the storage host"
    start_in backup "$BIN/ftvmm" --backup "${VMARGS[@]}" --connect $P:7000 --metrics $B:9400 $(tls backup) 2>"$WORK/backup.err"
    start_in primary "$BIN/ftvmm" --primary "${VMARGS[@]}" --listen $P:7000 --metrics $P:9400 $(tls primary) 2>"$WORK/primary.err"
    for i in $(seq 100); do in_host client redis-cli -h $VM ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "== stock clients on the client host: redis-cli and redis-benchmark against $VM"
    in_host client redis-cli -h $VM set greeting "hello from a fault-tolerant VM" | sed 's/^/   /'
    in_host client redis-cli -h $VM get greeting | sed 's/^/   /'
    in_host client redis-benchmark -h $VM -t set,get,incr -n 2000 -c 8 -P 4 -q | tr '\r' '\n' | grep -v 'rps=' | sed 's/^/   /'
    status $P $B
    users
    echo "== ftclient: one TCP connection, INCR and SET every 20 ms, while the primary host dies"
    in_host client "$BIN/ftclient" --redis $(( (KILL_AFTER + 3) * 40 )) $VM:6379 &
    CLIENT=$!
    sleep "$KILL_AFTER"
    kill_host primary
    wait $CLIENT && result=0 || result=$?
    echo "== after the failover, stock redis-cli still reaches $VM:"
    in_host client redis-cli -h $VM get greeting | sed 's/^/   /'
    status $P $B
    show primary backup storage
    exit $result
fi

if [ "$MODE" = reprotect ]; then
    # Each VM host listens for a backup of its own once it is live.
    hosts=(primary backup third fourth)
    ips=(10.77.0.1 10.77.0.2 10.77.0.5 10.77.0.6)
    start_in primary "$BIN/ftvmm" --primary --guest kvstore "${DISK[@]}" "${RUN_AS[@]}" --listen ${ips[0]}:7000 \
        --serial tcp:${ips[0]}:7001 $(tls primary) 2>"$WORK/primary.err"
    start_backup() { # INDEX: a backup of host INDEX-1
        start_in "${hosts[$1]}" "$BIN/ftvmm" --backup --guest kvstore "${DISK[@]}" "${RUN_AS[@]}" --connect "${ips[$1 - 1]}:7000" \
            --listen "${ips[$1]}:7000" --serial "tcp:${ips[$1]}:7001" $(tls "${hosts[$1]}") 2>"$WORK/${hosts[$1]}.err"
    }
    start_backup 1
    wait_for "$WORK/backup.err" "replaying" 30
    users
    in_host client "$BIN/ftclient" --kv $(( (KILL_AFTER + 22) * 40 )) \
        ${ips[0]}:7001 ${ips[1]}:7001 ${ips[2]}:7001 ${ips[3]}:7001 &
    CLIENT=$!
    for i in 1 2 3; do
        # Long enough for the client to notice the last death (its reads
        # time out after 5 s when a dead host's link is cut) and move on.
        if [ $i = 1 ]; then sleep "$KILL_AFTER"; else sleep $(( KILL_AFTER > 7 ? KILL_AFTER : 7 )); fi
        kill_host "${hosts[$i - 1]}"
        wait_for "$WORK/${hosts[$i]}.err" "going live" 10
        if [ $i -lt 3 ]; then
            echo "== a new backup joins the live ${hosts[$i]} host by live state transfer"
            start_backup $((i + 1))
            wait_for "$WORK/${hosts[$i]}.err" "backup joined" 60
            grep "backup joined" "$WORK/${hosts[$i]}.err" | sed 's/^/   /'
        fi
    done
    wait $CLIENT && result=0 || result=$?
    show primary backup third fourth storage
    exit $result
fi

P=10.77.0.1 B=10.77.0.2
start_in backup "$BIN/ftvmm" --backup --guest "$MODE" "${DISK[@]}" "${RUN_AS[@]}" --connect $P:7000 --serial tcp:$B:7001 \
    --metrics $B:9400 $(tls backup) 2>"$WORK/backup.err"
start_in primary "$BIN/ftvmm" --primary --guest "$MODE" "${DISK[@]}" "${RUN_AS[@]}" --listen $P:7000 --serial tcp:$P:7001 \
    --metrics $P:9400 $(tls primary) 2>"$WORK/primary.err"
if [ "$MODE" = kvstore ]; then
    in_host client "$BIN/ftclient" --kv $(( (KILL_AFTER + 3) * 40 )) $P:7001 $B:7001 &
else
    in_host client "$BIN/ftclient" --seconds $((KILL_AFTER + 6)) $P:7001 $B:7001 &
fi
CLIENT=$!
sleep "$KILL_AFTER"
status $P $B
users
kill_host primary
wait $CLIENT && result=0 || result=$?
status $P $B
show primary backup storage
exit $result
