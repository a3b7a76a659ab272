//! The kvstore client: one connection to every side's serial console, the
//! commands sent one at a time to the side serving it, and the failover by
//! probes when a reply does not come.

use super::{check_history, ClientReport, ClientView, GetRec, Msg, Op, Phase, ReplyRec, SetRec, NKEYS, PROBES, THINK};
use crate::lock;
use crate::transcript::{now_us, Transcript};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A reply later than this starts a failover...
const OP_TIMEOUT: Duration = Duration::from_millis(800);
/// ...whose probe rounds are this far apart.
const PROBE_ROUND: Duration = Duration::from_millis(300);

struct Cmd {
    op: Op,
    seq: u64,
    sent_us: u64,
    sent: Instant,
}

struct Conn {
    name: String,
    pid: u32,
    writer: Option<TcpStream>,
    fifo: VecDeque<Cmd>,
    synced: bool,
    initial: bool,
    alive: bool,
    probe_out: bool,
}

struct Failover {
    since: Instant,
    next_round: Instant,
}

struct Kv {
    t: Transcript,
    tx: Sender<Msg>,
    view: Arc<Mutex<ClientView>>,
    rng: StdRng,
    conns: Vec<Option<Conn>>,
    current: Option<usize>,
    failover: Option<Failover>,
    phase: Phase,
    final_queue: VecDeque<Op>,
    next_op_at: Instant,
    seq: u64,
    sent_ver: [u64; NKEYS],
    sets: Vec<SetRec>,
    gets: Vec<GetRec>,
    report: ClientReport,
    probes_avail: VecDeque<u32>,
    /// The initial connection exists.
    started: bool,
}

impl Kv {
    fn violation(&mut self, kind: &str, msg: String) {
        self.t.say(format!("client: VIOLATION {kind}: {msg}"));
        self.report.violations.push((kind.to_string(), msg));
    }

    fn conn(&mut self, side: usize) -> Option<&mut Conn> {
        self.conns.get_mut(side).and_then(Option::as_mut)
    }

    fn add_conn(&mut self, side: usize, name: String, pid: u32, addr: &str, initial: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break Some(s),
                Err(e) if Instant::now() > deadline => {
                    self.t.say(format!("client: cannot connect to {name}'s console {addr}: {e}"));
                    break None;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut conn = Conn {
            name,
            pid,
            writer: None,
            fifo: VecDeque::new(),
            synced: false,
            initial,
            alive: false,
            probe_out: false,
        };
        if let Some(stream) = stream {
            let _ = stream.set_nodelay(true);
            if let Ok(w) = stream.try_clone() {
                conn.writer = Some(w);
                conn.alive = true;
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            // The console closed after part of a line (output
                            // commit is byte-granular: a new live side
                            // re-emits the rest on its own console).
                            Ok(_) if !line.ends_with('\n') => {
                                let _ = tx.send(Msg::Partial { side, text: line });
                                break;
                            }
                            Ok(_) => {
                                let line = line.trim_end_matches(['\r', '\n']).to_string();
                                if tx.send(Msg::Line { side, line, at: now_us() }).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tx.send(Msg::Eof { side });
                });
            }
        }
        self.t.say(format!("client: connected to {}'s console {addr}", conn.name));
        if self.conns.len() <= side {
            self.conns.resize_with(side + 1, || None);
        }
        self.conns[side] = Some(conn);
        if initial {
            self.current = Some(side);
            self.started = true;
        }
    }

    /// Sends `op` on `side`'s connection.
    fn send(&mut self, side: usize, op: Op) -> bool {
        self.seq += 1;
        let seq = self.seq;
        let t = self.t.clone();
        let Some(conn) = self.conn(side) else { return false };
        let text = op.text();
        let ok = conn.writer.as_mut().is_some_and(|w| w.write_all(format!("{text}\n").as_bytes()).is_ok());
        if !ok {
            conn.alive = false;
            t.say(format!("client: writing to {} failed", conn.name));
            return false;
        }
        t.op(format!("client> {}: {text}", conn.name));
        conn.fifo.push_back(Cmd { op, seq, sent_us: now_us(), sent: Instant::now() });
        true
    }

    fn next_op(&mut self) -> Option<Op> {
        match self.phase {
            Phase::Work => {
                let key = self.rng.gen_range(0..NKEYS);
                if self.rng.gen_bool(0.5) {
                    self.sent_ver[key] += 1;
                    let ver = self.sent_ver[key];
                    self.sets.push(SetRec { key, ver, seq: self.seq + 1, acked: false });
                    Some(Op::Set { key, ver, rec: self.sets.len() - 1 })
                } else {
                    Some(Op::Get { key })
                }
            }
            Phase::Final => self.final_queue.pop_front(),
            Phase::Done => None,
        }
    }

    fn start_final(&mut self) {
        self.t.say("client: final reads");
        self.phase = Phase::Final;
        self.final_queue = (0..NKEYS).map(|key| Op::Get { key }).collect();
        let ids: Vec<u32> = (0..PROBES).filter(|id| !self.probes_avail.contains(id)).collect();
        self.final_queue.extend(ids.into_iter().map(|id| Op::GetProbe { id }));
        self.final_queue.push_back(Op::Quit);
    }

    fn start_failover(&mut self, why: &str) {
        if self.failover.is_some() {
            return;
        }
        let now = Instant::now();
        self.t.say(format!("client: {why}; probing every console"));
        self.failover = Some(Failover { since: now, next_round: now });
        lock(&self.view).failing_over = true;
    }

    fn probe_round(&mut self) {
        for side in 0..self.conns.len() {
            let Some(c) = self.conn(side) else { continue };
            if !c.alive || c.probe_out {
                continue;
            }
            let Some(id) = self.probes_avail.pop_front() else {
                self.t.say("client: out of probe keys");
                return;
            };
            if self.send(side, Op::Probe { id }) {
                if let Some(c) = self.conn(side) {
                    c.probe_out = true;
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.phase == Phase::Done || !self.started {
            return;
        }
        let cur_ok = self.current.and_then(|c| self.conns.get(c).and_then(Option::as_ref)).is_some_and(|c| c.alive);
        if !cur_ok {
            self.start_failover("no live console");
        }
        if let Some(cur) = self.current.filter(|_| cur_ok && self.failover.is_none()) {
            let conn = self.conns[cur].as_ref().expect("current conn");
            if conn.synced {
                let paused = {
                    let mut v = lock(&self.view);
                    v.idle = conn.fifo.is_empty();
                    v.paused
                };
                match conn.fifo.front() {
                    None if now >= self.next_op_at && !paused => {
                        if let Some(op) = self.next_op() {
                            if !self.send(cur, op) {
                                self.start_failover("the console write failed");
                            }
                        }
                    }
                    Some(front) if now.duration_since(front.sent) > OP_TIMEOUT => {
                        let msg = format!("no reply from {} to {:?} in {OP_TIMEOUT:?}", conn.name, front.op.text());
                        self.start_failover(&msg);
                    }
                    _ => {}
                }
            }
        }
        if let Some(f) = &mut self.failover {
            if now >= f.next_round {
                f.next_round = now + PROBE_ROUND;
                self.probe_round();
            }
        }
    }

    fn record_reply(&mut self, side: usize, cmd: &Cmd, at: u64) {
        let Some(c) = self.conns[side].as_ref() else { return };
        let rec = ReplyRec { name: c.name.clone(), pid: c.pid, sent_us: cmd.sent_us, at_us: at, what: cmd.op.text() };
        self.report.replies.push(rec);
        if Some(side) == self.current {
            lock(&self.view).last_reply = Some(Instant::now());
        }
    }

    /// `side` answered a probe: during a failover, it serves the client now.
    fn probe_answered(&mut self, side: usize) {
        if let Some(c) = self.conn(side) {
            c.probe_out = false;
        }
        let name = self.conns[side].as_ref().map(|c| c.name.clone()).unwrap_or_default();
        if let Some(f) = self.failover.take() {
            if self.current != Some(side) {
                lock(&self.view).switches += 1;
            }
            self.t.say(format!("client: {name} answered; it serves the client (after {:?})", f.since.elapsed()));
            self.current = Some(side);
            let pid = self.conns[side].as_ref().map(|c| c.pid);
            let mut v = lock(&self.view);
            v.ready = true;
            v.current_pid = pid;
            v.failing_over = false;
            v.last_reply = Some(Instant::now());
        } else if self.current != Some(side) {
            self.t.say(format!("client: {name} answered a probe late (it does not serve the client)"));
        }
    }

    fn on_line(&mut self, side: usize, line: String, at: u64) {
        let t = self.t.clone();
        let Some(conn) = self.conn(side) else { return };
        let name = conn.name.clone();
        if !conn.synced {
            if conn.initial && line.starts_with("kvstore: ready") {
                conn.synced = true;
                t.say(format!("client: {name}: {line}"));
                let pid = conn.pid;
                let mut v = lock(&self.view);
                v.current_pid = Some(pid);
                v.last_reply = Some(Instant::now());
                v.ready = true;
                return;
            }
            let pos =
                conn.fifo.iter().position(|c| matches!(c.op, Op::Probe { id } if line == format!("VALUE pv{id}")));
            let Some(pos) = pos else {
                t.say(format!("client: {name} (before its first answer, skipped): {line}"));
                return;
            };
            let before: Vec<Cmd> = conn.fifo.drain(..pos).collect();
            let probe = conn.fifo.pop_front().expect("the probe");
            conn.synced = true;
            for b in before {
                t.say(format!("client: {name}: no answer to {:?}", b.op.text()));
            }
            t.op(format!("client< {name}: {line}"));
            t.say(format!("client: {name} answered probe {:?}", probe.op.text()));
            self.record_reply(side, &probe, at);
            self.probe_answered(side);
            return;
        }
        let Some(cmd) = conn.fifo.pop_front() else {
            self.violation("unsolicited-output", format!("{name} printed {line:?} with no command outstanding"));
            return;
        };
        t.op(format!("client< {name}: {line}  ({} ms)", cmd.sent.elapsed().as_millis()));
        self.record_reply(side, &cmd, at);
        let at_s = t.start.elapsed().as_secs_f64();
        match cmd.op {
            Op::Set { key, ver, rec } => {
                if line == "OK" {
                    if !self.sets[rec].acked {
                        self.sets[rec].acked = true;
                        self.report.acked += 1;
                        lock(&self.view).acked = self.report.acked;
                    }
                } else {
                    self.violation("bad-reply", format!("{name} answered {line:?} to set k{key} k{key}-v{ver}"));
                }
            }
            Op::Get { key } => {
                let ver = if line == "NOTFOUND" {
                    Some(0)
                } else {
                    line.strip_prefix(&format!("VALUE k{key}-v")).and_then(|v| v.parse::<u64>().ok())
                };
                match ver {
                    Some(ver) => {
                        self.gets.push(GetRec { key, seq: cmd.seq, ver, side: name.clone(), at: at_s });
                        if self.phase != Phase::Work {
                            self.report.final_values.insert(format!("k{key}"), line.clone());
                        }
                    }
                    None => self.violation("bad-reply", format!("{name} answered {line:?} to get k{key}")),
                }
            }
            Op::Probe { id } => {
                if line != format!("VALUE pv{id}") {
                    self.violation("bad-reply", format!("{name} answered {line:?} to probe get p{id}"));
                }
                self.probe_answered(side);
            }
            Op::GetProbe { id } => {
                if line != format!("VALUE pv{id}") {
                    self.violation(
                        "lost-write",
                        format!("{name} answered {line:?} to get p{id} (written before boot)"),
                    );
                }
                self.report.final_values.insert(format!("p{id}"), line.clone());
            }
            Op::Incr => {}
            Op::Quit => {
                if line == "BYE" {
                    self.report.quit = true;
                    self.phase = Phase::Done;
                    t.say(format!("client: {name} said BYE"));
                } else {
                    self.violation("bad-reply", format!("{name} answered {line:?} to quit"));
                }
            }
        }
        self.next_op_at = Instant::now() + THINK;
    }

    fn on_eof(&mut self, side: usize) {
        let t = self.t.clone();
        if let Some(c) = self.conn(side) {
            c.alive = false;
            t.say(format!("client: {}'s console closed ({} commands unanswered)", c.name, c.fifo.len()));
        }
        if self.current == Some(side) && self.phase != Phase::Done {
            self.start_failover("the serving console closed");
        }
    }

    fn check_history(&mut self) {
        let (found, bounds) = check_history(&self.sets, &self.gets, &self.sent_ver);
        for (kind, msg) in found {
            self.violation(kind, msg);
        }
        self.report.bounds = bounds;
    }
}

pub(crate) fn client_main(
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    view: Arc<Mutex<ClientView>>,
    t: Transcript,
    seed: u64,
) -> ClientReport {
    let mut kv = Kv {
        t,
        tx,
        view: view.clone(),
        rng: StdRng::seed_from_u64(seed ^ 0x5eed_c11e),
        conns: Vec::new(),
        current: None,
        failover: None,
        phase: Phase::Work,
        final_queue: VecDeque::new(),
        next_op_at: Instant::now(),
        seq: 0,
        sent_ver: [0; NKEYS],
        sets: Vec::new(),
        gets: Vec::new(),
        report: ClientReport::default(),
        probes_avail: (0..PROBES).collect(),
        started: false,
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(Msg::Line { side, line, at }) => kv.on_line(side, line, at),
            Ok(Msg::Eof { side }) => kv.on_eof(side),
            Ok(Msg::Partial { side, text }) => {
                let name = kv.conns.get(side).and_then(Option::as_ref).map(|c| c.name.clone()).unwrap_or_default();
                kv.t.say(format!("client: {name}'s console ended in the middle of a line: {text:?}"));
            }
            Ok(Msg::AddConn { side, name, pid, addr, initial }) => kv.add_conn(side, name, pid, &addr, initial),
            Ok(Msg::Final) => kv.start_final(),
            Ok(Msg::Abort) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        kv.tick();
        if kv.phase == Phase::Done {
            break;
        }
    }
    kv.check_history();
    lock(&view).finished = true;
    kv.report
}
