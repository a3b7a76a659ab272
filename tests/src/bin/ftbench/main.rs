//! ftbench: ftvmm's benchmark. Prints tables of figures; asserts nothing
//! (speed targets are read off these figures, not enforced by timed tests).
//!
//! `cargo run --release -p ftvmm-tests --bin ftbench [-- --runs N]`
//!
//! Record/replay: for `compute` and `timer`, the median wall time of a plain
//! run, a recording and a replay, their ratios, and the log's event and byte
//! rates while recording.
//!
//! Fault tolerance (primary and backup on this machine, over loopback): the
//! FT overhead ratio (throughput with a backup attached ÷ alone) for
//! `compute` and `ticker`, the output-commit latency, the failover time from
//! SIGKILL of the primary to the new primary's first output, and the log
//! bandwidth; and the FT overhead in CPU seconds (the primary's alone and
//! with a backup, and the backup's) per run of `compute` and per 1,000
//! ticks of `ticker`.
//!
//! kvstore: set and get throughput and latency through the guest's TCP
//! console, alone and with a backup attached, the disk on ftdisk.
//!
//! Re-protection: a backup joining a running primary by live state
//! transfer, for idle and busy 64 MiB and 512 MiB guests: the time to join,
//! the bytes sent and their ratio to guest memory, the pre-copy rounds and
//! the final pause during which the guest did not run.
//!
//! redis (root: network-namespace hosts with TAPs): stock redis-benchmark
//! against the redis guest alone and with a backup attached (ops/s, p50,
//! p99, the FT ratio), unpipelined and pipelined, with the exits and the
//! VMMs' CPU seconds a request costs; bulk TCP throughput (the guest's
//! discard and source services: MB/s received and sent, and the log
//! bandwidth); the pause a client on one connection sees at a failover,
//! for SIGKILL and for a silent death; and
//! the same redis-benchmark against a real redis-server on this host, as
//! context for what virtualization costs here.
//!
//! Output commit, hop by hop: `ticker` pairs at 100 Hz and 1 kHz with a
//! console client reading, without and with `--poll-us`: p50 and p99 of each
//! hop of an output's way, from the primary's and the backup's `--stats`.
//!
//! TLS (`--only tls`, not in the default run): the cost of mutual TLS on
//! the logging channel and to ftdisk — for `compute`, `ticker`, kvstore and
//! (root) redis, the FT throughput ratio and the primary's output-commit
//! latency (p50, p99), in plaintext and with TLS, in one run, interleaved.
//!
//! State syncs: `spin` and `compute exitpoints=0` (no exit in their work
//! loops; their ticks come by kick and sync) at 100 Hz and 1 kHz, and
//! `compute` with working sets of 64 KiB to 4 MiB: the FT overhead ratio
//! (throughput with a backup attached ÷ alone), syncs per second, page
//! bytes and the primary's µs per sync, the backup's µs to apply one, and
//! the log bandwidth the syncs' pages take.
//!
//! Disk (`--only disk`): `blkstress` (4 KiB ops, 75% writes, 24% reads
//! checked against the guest's model, 1% flushes), sequential and random,
//! at queue depth 1 and 32: IOPS and KiB/s as the guest measures them, alone
//! on a local image, alone on ftdisk, and on ftdisk with a backup attached;
//! and the same op mix by the host itself on a raw image (pwrite, pread,
//! fdatasync), as context.
//!
//! Metrics (`--only metrics`, not in the default run): the FT ratio and
//! commit latency with `--metrics` on both VMMs, scraped every second,
//! against without.
//!
//! Seccomp (`--only seccomp`, not in the default run): the FT ratio and
//! commit latency of `compute` and `ticker` with the filters on and off.
//!
//! `--only SECTION` (record-replay, ft, commit, sync, kvstore, join, redis, bulk, tls, disk, metrics, seccomp) runs
//! one section (`bulk`: the bulk throughput of the redis section alone).
//!
//! `ftbench soak --minutes N [--load]`: memory over time and false
//! failovers. It runs a `ticker` pair at 1 kHz with no console client, one
//! with a client reading, and a `kvstore` pair on ftdisk under a steady
//! set/get load, and prints every process's RSS each minute; with `--load`,
//! two busy loops saturate both cores and a process holds and touches
//! 4 GiB meanwhile. It counts go-lives and lost backups while both sides
//! were alive (false failovers).

mod commit;
mod common;
mod disk;
mod ft;
mod join;
mod kvstore;
mod metrics;
mod record_replay;
mod redis;
mod seccomp;
mod soak;
mod sync;
mod tls;

use commit::commit_hops;
use disk::disk_bench;
use ft::fault_tolerance;
use ftvmm_tests::require_kvm;
use join::reprotection;
use kvstore::kvstore_bench;
use record_replay::record_replay;
use redis::redis_bench;
use soak::soak;
use sync::sync_bench;
use tls::tls_cost;

fn main() {
    require_kvm();
    if std::env::args().nth(1).as_deref() == Some("soak") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        let minutes = args
            .iter()
            .position(|a| a == "--minutes")
            .and_then(|i| args.get(i + 1))
            .and_then(|m| m.parse().ok())
            .unwrap_or(10);
        soak(minutes, args.iter().any(|a| a == "--load"));
        return;
    }
    let mut runs = 5;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(n)) => runs = n.parse().unwrap_or(5).max(1),
            ("--only", Some(s))
                if [
                    "record-replay",
                    "ft",
                    "commit",
                    "sync",
                    "kvstore",
                    "join",
                    "redis",
                    "bulk",
                    "tls",
                    "disk",
                    "metrics",
                    "seccomp",
                ]
                .contains(&s.as_str()) =>
            {
                only = Some(s)
            }
            _ => {
                eprintln!(
                    "usage: ftbench [--runs N] [--only \
                     record-replay|ft|commit|sync|kvstore|join|redis|bulk|tls|disk|metrics|seccomp]"
                );
                std::process::exit(2);
            }
        }
    }
    let wanted = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if wanted("record-replay") {
        record_replay(runs);
    }
    if wanted("ft") {
        fault_tolerance(runs);
        ft::cpu_overhead(runs);
    }
    if wanted("commit") {
        commit_hops(runs);
    }
    if wanted("sync") {
        sync_bench(runs);
    }
    if wanted("kvstore") {
        kvstore_bench(500);
    }
    if wanted("join") {
        reprotection(runs);
    }
    if wanted("redis") {
        redis_bench(runs);
    }
    if only.as_deref() == Some("bulk") {
        redis::bulk_bench(runs);
    }
    if wanted("disk") {
        disk_bench(runs);
    }
    // Only when asked for: it repeats the FT runs twice over.
    if only.as_deref() == Some("tls") {
        tls_cost(runs);
    }
    if only.as_deref() == Some("metrics") {
        metrics::metrics_cost(runs);
    }
    if only.as_deref() == Some("seccomp") {
        seccomp::seccomp_cost(runs);
    }
}
