//! The client: what the scenario tells it, the commands it sends, what it
//! reports, and the history checks both guests' clients run on what they
//! saw (acknowledged writes visible, reads monotonic, no phantom versions).
//!
//! - [`kvstore`]: the kvstore client, on every side's serial console;
//! - [`redis`]: the redis client, on one TCP connection to the VM.

mod kvstore;
mod redis;

pub(crate) use kvstore::client_main;
pub(crate) use redis::{redis_client_main, reply_text, resp_connect};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Keys the client writes versions of.
const NKEYS: usize = 8;
/// Probe keys `pN` = `pvN`, written into the image before the VM boots.
pub(crate) const PROBES: u32 = 400;
/// The client's pause between commands.
const THINK: Duration = Duration::from_millis(4);

pub(crate) enum Msg {
    Line { side: usize, line: String, at: u64 },
    Eof { side: usize },
    Partial { side: usize, text: String },
    AddConn { side: usize, name: String, pid: u32, addr: String, initial: bool },
    Final,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Set { key: usize, ver: u64, rec: usize },
    Get { key: usize },
    Probe { id: u32 },
    GetProbe { id: u32 },
    Incr,
    Quit,
}

impl Op {
    fn text(&self) -> String {
        match *self {
            Op::Set { key, ver, .. } => format!("set k{key} k{key}-v{ver}"),
            Op::Get { key } => format!("get k{key}"),
            Op::Probe { id } | Op::GetProbe { id } => format!("get p{id}"),
            Op::Incr => "INCR counter".into(),
            Op::Quit => "quit".into(),
        }
    }
}

struct SetRec {
    key: usize,
    ver: u64,
    seq: u64,
    acked: bool,
}

struct GetRec {
    key: usize,
    seq: u64,
    ver: u64,
    side: String,
    at: f64,
}

/// A reply the client attributed to a command, for the split-brain check.
#[derive(Clone)]
pub(crate) struct ReplyRec {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) sent_us: u64,
    pub(crate) at_us: u64,
    pub(crate) what: String,
}

#[derive(Default)]
pub(crate) struct ClientView {
    pub(crate) current_pid: Option<u32>,
    pub(crate) failing_over: bool,
    /// The first side said it is ready.
    pub(crate) ready: bool,
    pub(crate) last_reply: Option<Instant>,
    acked: u64,
    pub(crate) switches: u32,
    pub(crate) finished: bool,
    /// Send no new command (the harness quiesces the client)...
    pub(crate) paused: bool,
    /// ...and whether none is outstanding on the serving connection.
    pub(crate) idle: bool,
}

#[derive(Default)]
pub(crate) struct ClientReport {
    pub(crate) violations: Vec<(String, String)>,
    pub(crate) replies: Vec<ReplyRec>,
    pub(crate) acked: u64,
    /// The final reads: key name → reply line.
    pub(crate) final_values: BTreeMap<String, String>,
    /// Per key name: the highest version acknowledged, the highest sent.
    pub(crate) bounds: BTreeMap<String, (u64, u64)>,
    pub(crate) quit: bool,
}

#[derive(PartialEq, Eq)]
enum Phase {
    Work,
    Final,
    Done,
}

/// The history checks: acknowledged writes visible, reads monotonic, no
/// phantom versions. Returns the violations and, per key, the highest
/// version acknowledged and the highest sent.
#[allow(clippy::type_complexity)]
fn check_history(
    sets: &[SetRec],
    gets: &[GetRec],
    sent_ver: &[u64; NKEYS],
) -> (Vec<(&'static str, String)>, BTreeMap<String, (u64, u64)>) {
    let mut acked_by_key: Vec<Vec<(u64, u64)>> = vec![Vec::new(); NKEYS];
    let mut sent_by_key: Vec<Vec<(u64, u64)>> = vec![Vec::new(); NKEYS];
    for s in sets {
        sent_by_key[s.key].push((s.seq, s.ver));
        if s.acked {
            acked_by_key[s.key].push((s.seq, s.ver));
        }
    }
    let mut found = Vec::new();
    let mut last_read: [Option<(u64, String, f64)>; NKEYS] = Default::default();
    for g in gets {
        let must = acked_by_key[g.key].iter().filter(|(seq, _)| *seq < g.seq).map(|(_, v)| *v).max().unwrap_or(0);
        if g.ver < must {
            found.push((
                "lost-write",
                format!(
                    "get k{} (at {:.3}, from {}) read version {} though version {must} was acknowledged before it was sent",
                    g.key, g.at, g.side, g.ver
                ),
            ));
        }
        let sent = sent_by_key[g.key].iter().filter(|(seq, _)| *seq < g.seq).map(|(_, v)| *v).max().unwrap_or(0);
        if g.ver > sent {
            found.push((
                "phantom-read",
                format!("get k{} (at {:.3}, from {}) read version {} never written", g.key, g.at, g.side, g.ver),
            ));
        }
        if let Some((v, side, at)) = &last_read[g.key] {
            if g.ver < *v {
                found.push((
                    "read-backwards",
                    format!(
                        "get k{} read version {} (at {:.3}, from {}) after version {v} (at {at:.3}, from {side})",
                        g.key, g.ver, g.at, g.side
                    ),
                ));
            }
        }
        if last_read[g.key].as_ref().is_none_or(|(v, _, _)| g.ver >= *v) {
            last_read[g.key] = Some((g.ver, g.side.clone(), g.at));
        }
    }
    let mut bounds = BTreeMap::new();
    for (key, (acked, sent)) in acked_by_key.iter().zip(sent_ver).enumerate() {
        let acked = acked.iter().map(|(_, v)| *v).max().unwrap_or(0);
        bounds.insert(format!("k{key}"), (acked, *sent));
    }
    (found, bounds)
}
