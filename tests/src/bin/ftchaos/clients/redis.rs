//! The redis client: ONE connection to the VM's address for the whole
//! scenario, through every failover (the VM's TCP state moves with it).

use super::{check_history, ClientReport, ClientView, GetRec, Msg, Op, Phase, SetRec, NKEYS, THINK};
use crate::lock;
use crate::transcript::Transcript;
use ftvmm_tests::resp::{Reply, RespConn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct RedisClient {
    t: Transcript,
    view: Arc<Mutex<ClientView>>,
    rng: StdRng,
    addr: Option<String>,
    conn: Option<RespConn>,
    connections: u32,
    phase: Phase,
    final_queue: VecDeque<Op>,
    seq: u64,
    sent_ver: [u64; NKEYS],
    sets: Vec<SetRec>,
    gets: Vec<GetRec>,
    report: ClientReport,
    /// The last INCR value, while the counter's history is known.
    counter: Option<i64>,
}

impl RedisClient {
    fn violation(&mut self, kind: &str, msg: String) {
        self.t.say(format!("client: VIOLATION {kind}: {msg}"));
        self.report.violations.push((kind.to_string(), msg));
    }

    /// Connects (and waits for PONG); false if the VM does not answer yet.
    fn connect(&mut self) -> bool {
        let Some(addr) = self.addr.clone() else { return false };
        let Some(mut c) = resp_connect(&addr) else { return false };
        if !matches!(c.cmd(&["PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
            return false;
        }
        self.connections += 1;
        self.t.say(format!("client: connected to {addr} (connection {})", self.connections));
        self.conn = Some(c);
        let mut v = lock(&self.view);
        v.ready = true;
        v.last_reply = Some(Instant::now());
        true
    }

    fn next_op(&mut self) -> Option<Op> {
        match self.phase {
            Phase::Work => {
                let key = self.rng.gen_range(0..NKEYS);
                match self.rng.gen_range(0..10) {
                    0..=3 => {
                        self.sent_ver[key] += 1;
                        let ver = self.sent_ver[key];
                        self.sets.push(SetRec { key, ver, seq: self.seq + 1, acked: false });
                        Some(Op::Set { key, ver, rec: self.sets.len() - 1 })
                    }
                    4..=7 => Some(Op::Get { key }),
                    _ => Some(Op::Incr),
                }
            }
            Phase::Final => self.final_queue.pop_front(),
            Phase::Done => None,
        }
    }

    fn run_op(&mut self, op: Op) {
        self.seq += 1;
        let seq = self.seq;
        let Some(conn) = self.conn.as_mut() else { return };
        let text = op.text();
        let started = Instant::now();
        let args: Vec<String> = match op {
            Op::Set { key, ver, .. } => vec!["SET".into(), format!("k{key}"), format!("k{key}-v{ver}")],
            Op::Get { key } => vec!["GET".into(), format!("k{key}")],
            Op::Incr => vec!["INCR".into(), "counter".into()],
            Op::Quit => vec!["SHUTDOWN".into()],
            Op::Probe { .. } | Op::GetProbe { .. } => return,
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.t.op(format!("client> {text}"));
        if op == Op::Quit {
            // SHUTDOWN has no reply: the VM ends.
            let sent = conn.send(&args);
            self.t.say(format!("client: SHUTDOWN sent ({sent:?})"));
            self.report.quit = sent.is_ok();
            self.phase = Phase::Done;
            return;
        }
        let reply = conn.cmd(&args);
        let took = started.elapsed();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.t.say(format!("client: {text}: {e} after {took:?}"));
                self.violation(
                    "connection-broke",
                    format!("the client's connection to the VM failed at {text:?} after {took:?}: {e}"),
                );
                self.conn = None;
                if op == Op::Incr {
                    self.counter = None;
                }
                return;
            }
        };
        self.t.op(format!("client< {}  ({} ms)", reply.text(), took.as_millis()));
        if took > Duration::from_millis(300) {
            self.t.say(format!("client: {text} answered after {took:?}"));
        }
        {
            let mut v = lock(&self.view);
            v.last_reply = Some(Instant::now());
        }
        let at = self.t.start.elapsed().as_secs_f64();
        match (op, &reply) {
            (Op::Set { rec, .. }, Reply::Simple(ok)) if ok == "OK" => {
                self.sets[rec].acked = true;
                self.report.acked += 1;
                lock(&self.view).acked = self.report.acked;
            }
            (Op::Get { key }, Reply::Bulk(value)) => {
                let ver = match value {
                    None => Some(0),
                    Some(b) => String::from_utf8_lossy(b)
                        .strip_prefix(&format!("k{key}-v"))
                        .and_then(|v| v.parse::<u64>().ok()),
                };
                match ver {
                    Some(ver) => self.gets.push(GetRec { key, seq, ver, side: "the VM".into(), at }),
                    None => self.violation("bad-reply", format!("GET k{key} answered {reply:?}")),
                }
                if self.phase == Phase::Final {
                    self.report.final_values.insert(format!("k{key}"), reply_text(&reply));
                }
            }
            (Op::Incr, Reply::Int(n)) => {
                if let Some(last) = self.counter {
                    if *n != last + 1 {
                        self.violation("incr-not-consecutive", format!("INCR counter went from {last} to {n}"));
                    }
                }
                self.counter = Some(*n);
            }
            _ => self.violation("bad-reply", format!("{text} answered {reply:?}")),
        }
    }

    fn start_final(&mut self) {
        self.t.say("client: final reads");
        self.phase = Phase::Final;
        self.final_queue = (0..NKEYS).map(|key| Op::Get { key }).collect();
        self.final_queue.push_back(Op::Quit);
    }
}

/// A RESP connection to `addr`, if it accepts one within a second
/// (`RespConn::connect` alone would wait out the kernel's SYN retries).
pub(crate) fn resp_connect(addr: &str) -> Option<RespConn> {
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    RespConn::connect(addr, Duration::from_secs(20)).ok()
}

/// A GET's reply as the final reads and the disk check compare it.
pub(crate) fn reply_text(r: &Reply) -> String {
    match r {
        Reply::Bulk(Some(b)) => format!("VALUE {}", String::from_utf8_lossy(b)),
        Reply::Bulk(None) => "NOTFOUND".into(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn redis_client_main(
    rx: Receiver<Msg>,
    view: Arc<Mutex<ClientView>>,
    t: Transcript,
    seed: u64,
) -> ClientReport {
    let mut c = RedisClient {
        t,
        view: view.clone(),
        rng: StdRng::seed_from_u64(seed ^ 0x5eed_c11e),
        addr: None,
        conn: None,
        connections: 0,
        phase: Phase::Work,
        final_queue: VecDeque::new(),
        seq: 0,
        sent_ver: [0; NKEYS],
        sets: Vec::new(),
        gets: Vec::new(),
        report: ClientReport::default(),
        counter: None,
    };
    'run: loop {
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::AddConn { addr, .. } => c.addr = Some(addr),
                Msg::Final => c.start_final(),
                Msg::Abort => break 'run,
                _ => {}
            }
        }
        if c.phase == Phase::Done {
            break;
        }
        if c.conn.is_none() {
            if !c.connect() {
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let paused = {
            let mut v = lock(&c.view);
            v.idle = true;
            v.paused
        };
        if paused {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        lock(&c.view).idle = false;
        if let Some(op) = c.next_op() {
            c.run_op(op);
        }
        std::thread::sleep(THINK);
    }
    let (found, bounds) = check_history(&c.sets, &c.gets, &c.sent_ver);
    for (kind, msg) in found {
        c.violation(kind, msg);
    }
    c.report.bounds = bounds;
    lock(&view).finished = true;
    c.report
}
