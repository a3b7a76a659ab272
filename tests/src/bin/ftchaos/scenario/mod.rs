//! A scenario: its ftdisk, sides and client set up, the pair started, the
//! faults drawn and injected between settled states, re-protections and
//! kill-after-joins, and what came of it ([`Outcome`]); [`checks`] judges
//! its end.

mod checks;

use crate::clients::{client_main, redis_client_main, ClientView, Msg, PROBES};
use crate::faults::{around_heartbeat, signal, Fault};
use crate::ftdisk::Ftdisk;
use crate::lab::{GuestKind, NetLab, NET_HOSTS};
use crate::lock;
use crate::proxy::Proxy;
use crate::sides::{aborted_join, refresh, Role, Side, Tripwire, Watchers};
use crate::transcript::Transcript;
use ftvmm_tests::Scratch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a re-protection that a fault may still follow is a
/// kill-after-join.
const KILL_AFTER_JOIN: f64 = 0.5;
const SETTLE: Duration = Duration::from_secs(30);
const START: Duration = Duration::from_secs(30);
const MEM_MIB: &str = "16";

#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) faults: Vec<Fault>,
    pub(crate) acked: u64,
    pub(crate) switches: u32,
    pub(crate) failovers: u32,
    pub(crate) reprotections: u32,
    pub(crate) aborted_joins: u32,
    pub(crate) violations: Vec<(String, String)>,
    /// The storage's per-chunk delay throughout the scenario (0: fast).
    pub(crate) slow_base_ms: u64,
}

struct Scenario {
    seed: u64,
    rng: StdRng,
    t: Transcript,
    hb: u64,
    ftdisk: Arc<Mutex<Ftdisk>>,
    ftdisk_addr: String,
    sides: Vec<Side>,
    client_tx: Sender<Msg>,
    view: Arc<Mutex<ClientView>>,
    outcome: Outcome,
    faults_running: Vec<(Fault, JoinHandle<()>)>,
    quiesce_joins: bool,
    guest: GuestKind,
    net: Option<Arc<NetLab>>,
    /// The sides' stderr readers' hooks: wins as the winners logged them,
    /// the armed tripwires.
    watchers: Watchers,
    /// Each storage proxy's current per-chunk delay (µs), shared by all.
    storage_delay: Arc<AtomicU64>,
    /// The delay this scenario's storage has throughout (µs; 0: fast).
    storage_base_us: u64,
    _dir: Scratch,
}

impl Scenario {
    fn violation(&mut self, kind: &str, msg: String) {
        self.t.say(format!("harness: VIOLATION {kind}: {msg}"));
        self.outcome.violations.push((kind.to_string(), msg));
    }

    /// Where the harness's servers (ftdisk, proxies) listen.
    fn bind_ip(&self) -> String {
        self.net.as_ref().map_or_else(|| "127.0.0.1".to_string(), |n| n.bridge_ip())
    }

    /// A lab host with no running side (redis), round robin.
    fn pick_host(&self) -> Result<Option<(String, String)>, String> {
        let Some(net) = &self.net else { return Ok(None) };
        for _ in 0..NET_HOSTS {
            let i = net.next.fetch_add(1, Ordering::AcqRel) % u64::from(NET_HOSTS);
            let h = format!("v{}", i + 1);
            if !self.sides.iter().any(|s| s.running() && s.host.as_deref() == Some(h.as_str())) {
                let _ = net.lab.restore(&h);
                return Ok(Some((h.clone(), net.ns(&h))));
            }
        }
        Err("no free lab host".into())
    }

    /// The `--listen` address of a side on `host`.
    fn listen_arg(&self, host: &Option<(String, String)>) -> String {
        match (&self.net, host) {
            (Some(net), Some((h, _))) => format!("{}:0", net.ip(h)),
            _ => "127.0.0.1:0".into(),
        }
    }

    fn common_args(&self, storage: &Proxy) -> Vec<String> {
        let hb = self.hb.to_string();
        let disk = format!("ftdisk:{}", storage.addr);
        let args: Vec<String> = match &self.net {
            None => ["--guest", "kvstore", "--mem-mib", MEM_MIB, "--serial", "tcp:127.0.0.1:0"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            Some(net) => vec!["--guest".into(), "redis".into(), "--cmdline".into(), format!("ip={}/24", net.vm_ip())]
                .into_iter()
                .chain(["--net".to_string(), "tap:fttap".to_string()])
                .collect(),
        };
        args.into_iter().chain(["--heartbeat-ms".into(), hb, "--digest".into(), "--disk".into(), disk]).collect()
    }

    /// A side's own way to the ftdisk (cut by cut-storage, slowed by
    /// slow-storage).
    fn storage_proxy(&self) -> Proxy {
        Proxy::with_delay(&self.bind_ip(), &self.ftdisk_addr, Some(self.storage_delay.clone()))
    }

    fn side_name(&self) -> String {
        char::from(b'A' + (self.sides.len() % 26) as u8).to_string()
    }

    fn refresh(&mut self) {
        refresh(&mut self.sides, &self.t);
    }

    /// Waits until `cond` holds for side `i` (or it ends, or time is up).
    fn wait_side(
        &mut self,
        i: usize,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Side) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh();
            let s = &self.sides[i];
            if cond(s) {
                return Ok(());
            }
            if !s.running() {
                return Err(format!("{} {} before {what}", s.name, s.status_text()));
            }
            if Instant::now() > deadline {
                return Err(format!("{} not {what} within {timeout:?}", s.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn register_console(&mut self, i: usize, initial: bool) -> Result<(), String> {
        if let Some(net) = &self.net {
            // The redis client talks to the VM's own address, whichever side is live.
            if initial {
                let s = &self.sides[i];
                let addr = format!("{}:6379", net.vm_ip());
                let msg = Msg::AddConn { side: i, name: s.name.clone(), pid: s.pid, addr, initial };
                return self.client_tx.send(msg).map_err(|_| "the client is gone".to_string());
            }
            return Ok(());
        }
        self.wait_side(i, START, "serving a console", |s| s.console.is_some())?;
        let s = &self.sides[i];
        let msg = Msg::AddConn {
            side: i,
            name: s.name.clone(),
            pid: s.pid,
            addr: s.console.clone().unwrap_or_default(),
            initial,
        };
        self.client_tx.send(msg).map_err(|_| "the client is gone".to_string())
    }

    fn start_pair(&mut self) -> Result<(), String> {
        let storage = Arc::new(self.storage_proxy());
        let host = self.pick_host()?;
        let mut args: Vec<String> = vec!["--primary".into(), "--listen".into(), self.listen_arg(&host)];
        args.extend(self.common_args(&storage));
        let mut a = Side::spawn(&self.side_name(), Role::Primary, &args, storage, host, &self.watchers)?;
        a.gen = Some(1);
        self.sides.push(a);
        self.wait_side(0, START, "listening for a backup", |s| s.listen.is_some())?;
        self.add_backup(0)?;
        self.wait_side(1, START, "in lockstep", |s| s.synced)?;
        self.register_console(0, true)?;
        self.register_console(1, false)?;
        Ok(())
    }

    /// Starts a backup of side `target` (through a logging-channel proxy);
    /// returns its index.
    fn add_backup(&mut self, target: usize) -> Result<usize, String> {
        let listen = self.sides[target].listen.clone().ok_or("the target has no --listen address")?;
        let log_proxy = Arc::new(Proxy::new(&self.bind_ip(), &listen));
        let storage = Arc::new(self.storage_proxy());
        let host = self.pick_host()?;
        let mut args: Vec<String> = vec![
            "--backup".into(),
            "--connect".into(),
            log_proxy.addr.clone(),
            "--listen".into(),
            self.listen_arg(&host),
        ];
        args.extend(self.common_args(&storage));
        let mut b = Side::spawn(&self.side_name(), Role::Backup, &args, storage, host, &self.watchers)?;
        b.target = Some(target);
        b.log_proxy = Some(log_proxy);
        self.sides.push(b);
        Ok(self.sides.len() - 1)
    }

    /// The live side: the running side that won the newest generation.
    fn live(&self) -> Option<usize> {
        let g = self.sides.iter().filter_map(|s| s.gen).max()?;
        self.sides.iter().position(|s| s.running() && s.gen == Some(g))
    }

    /// The live side's backup in lockstep, if any.
    fn backup_of(&self, live: usize) -> Option<usize> {
        let g = self.sides[live].gen;
        self.sides.iter().position(|s| s.running() && s.target == Some(live) && s.synced && s.attach_gen == g)
    }

    fn faults_done(&mut self) -> bool {
        let (done, running): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.faults_running).into_iter().partition(|(_, h)| h.is_finished());
        for (_, h) in done {
            let _ = h.join();
        }
        self.faults_running = running;
        self.faults_running.is_empty()
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for s in &self.sides {
            out.push_str(&format!(
                "{} ({:?}, pid {}): {}, generation {:?}, target {:?}, in lockstep {}, attached at {:?}; ",
                s.name,
                s.role,
                s.pid,
                s.status_text(),
                s.gen,
                s.target.map(|t| self.sides[t].name.clone()),
                s.synced,
                s.attach_gen
            ));
        }
        let v = lock(&self.view);
        out.push_str(&format!("client: serving pid {:?}, failing over {}", v.current_pid, v.failing_over));
        out
    }

    /// Waits until the faults are over, exactly one side is live, every
    /// other running side is its backup in lockstep, and the client is
    /// served by the live side.
    fn settle(&mut self) -> Result<usize, String> {
        let start = Instant::now();
        let deadline = start + SETTLE;
        loop {
            self.refresh();
            let faults_done = self.faults_done();
            if let Some(live) = self.live().filter(|_| faults_done) {
                let g = self.sides[live].gen;
                let others_ok = self.sides.iter().enumerate().all(|(i, s)| {
                    i == live || !s.running() || (s.target == Some(live) && s.synced && s.attach_gen == g)
                });
                let served = {
                    let v = lock(&self.view);
                    (self.net.is_some() || v.current_pid == Some(self.sides[live].pid))
                        && !v.failing_over
                        && v.last_reply.is_some_and(|r| r.elapsed() < Duration::from_millis(500))
                };
                if others_ok && served {
                    return Ok(live);
                }
            }
            if faults_done && self.sides.iter().all(|s| !s.running()) {
                return Err(format!("no side is left running: {}", self.describe()));
            }
            if Instant::now() > deadline {
                return Err(format!("did not settle within {SETTLE:?}: {}", self.describe()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new backup joins the live side. Ok(false): its state transfer was
    /// cut short (a heartbeat timeout on a loaded host), which is no fault.
    fn reprotect(&mut self, live: usize) -> Result<bool, String> {
        self.t.say(format!("harness: re-protection: a new backup joins {}", self.sides[live].name));
        self.wait_side(live, START, "accepting backups", |s| s.listen.is_some())?;
        if self.quiesce_joins {
            lock(&self.view).paused = true;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !lock(&self.view).idle && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.t.say("harness: the client pauses during the join");
        }
        let mut joiner = None;
        let result = (|| {
            let b = self.add_backup(live)?;
            joiner = Some(b);
            self.register_console(b, false)?;
            self.wait_side(b, START, "joined", |s| s.synced)
        })();
        if self.quiesce_joins {
            lock(&self.view).paused = false;
            self.t.say("harness: the client resumes");
        }
        if let (Err(e), Some(b)) = (&result, joiner) {
            std::thread::sleep(Duration::from_millis(50));
            self.refresh();
            if aborted_join(&self.sides[b]) {
                self.t.say(format!("harness: the join was cut short ({e})"));
                self.outcome.aborted_joins += 1;
                return Ok(false);
            }
        }
        result?;
        self.outcome.reprotections += 1;
        Ok(true)
    }

    /// kill-after-join: a new backup joins `live` (under slow storage most
    /// times, so that the writes the live side released are still in
    /// flight), and `live` is SIGKILLed as soon as the joiner prints that it
    /// restored the state or `live` that the backup joined (at once, or up
    /// to 30 ms later): the joined backup must go live with what it was
    /// handed. Ok(true) if the kill happened (a join cut short by a
    /// heartbeat timeout disarms it).
    fn kill_after_join(&mut self, live: usize) -> Result<bool, String> {
        let slowed = self.storage_base_us > 0 || self.rng.gen_bool(0.25);
        if !slowed {
            self.inject(Fault::SlowStorage, live, None);
            // Let the unapplied writes pile up.
            let d = Duration::from_millis(self.rng.gen_range(100..600));
            self.run_workload(d);
        }
        let joiner = self.side_name();
        let joiner_name = joiner.clone();
        let victim = self.sides[live].name.clone();
        let (watch, needle) = if self.rng.gen_bool(0.5) {
            (joiner, "restored at exit")
        } else {
            (victim.clone(), "backup joined at exit")
        };
        let delay =
            if self.rng.gen_bool(0.6) { Duration::ZERO } else { Duration::from_millis(self.rng.gen_range(1..=30)) };
        let host_dies = self.rng.gen_bool(0.5);
        self.t.say(format!(
            "harness: FAULT {}: SIGKILL {victim} {} {watch} prints {needle:?}{}",
            Fault::KillAfterJoin.name(),
            if delay.is_zero() { "as soon as".to_string() } else { format!("{delay:?} after") },
            if host_dies { " (its host dies: what its storage proxy holds from it is dropped)" } else { "" }
        ));
        let doomed = self.sides[live].doomed.clone();
        let victim_lines = lock(&self.sides[live].events).len();
        lock(&self.watchers.tripwires).push(Tripwire {
            watch,
            needle,
            victim: self.sides[live].pid,
            victim_name: victim,
            victim_storage: self.sides[live].storage.clone(),
            doomed: doomed.clone(),
            delay,
            host_dies,
        });
        let joined = self.reprotect(live);
        if matches!(joined, Ok(true)) {
            // The live side's line may come after the joiner's.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !doomed.load(Ordering::Acquire) && self.sides[live].running() && Instant::now() < deadline {
                self.refresh();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        lock(&self.watchers.tripwires).clear();
        self.refresh();
        let fired = doomed.load(Ordering::Acquire);
        if fired {
            self.outcome.faults.push(Fault::KillAfterJoin);
        } else {
            self.t.say(format!("harness: {} disarmed: it did not fire", Fault::KillAfterJoin.name()));
        }
        // A join cut short is no fault when the live side had not finished
        // it; but once the live side said the backup joined (and released
        // what only that backup's copy of the state protects: the outputs
        // that waited for the disk alone), the backup must be able to go
        // live on its own.
        let joined_line = lock(&self.sides[live].events)
            .get(victim_lines..)
            .and_then(|new| new.iter().find(|l| l.contains("backup joined at exit")).cloned());
        let cut_short = self.sides.iter().rev().find(|s| s.name == joiner_name).filter(|s| aborted_join(s));
        match (fired, joined_line, cut_short) {
            (true, Some(line), Some(b)) => {
                let msg = format!(
                    "{} printed {line:?} and was killed; its new backup {} could not go live: {}",
                    self.sides[live].name,
                    b.name,
                    b.error.clone().unwrap_or_default()
                );
                self.violation("join-lost", msg);
            }
            (_, _, Some(_)) => self.t.say("harness: (the live side had not said the backup joined: not reported)"),
            _ => {}
        }
        joined.map(|_| fired)
    }

    /// The faults that may be injected now: those that need a backup only
    /// when there is one in lockstep; while timed faults last, only storage
    /// faults, or anything (but the same kind again) if only storage faults
    /// are under way (a kill never overlaps a freeze or a cut logging
    /// channel, so that one copy of the VM always survives).
    fn eligible(&self, backup: Option<usize>, overlapping: bool) -> Vec<Fault> {
        let running: Vec<Fault> = self.faults_running.iter().map(|(f, _)| *f).collect();
        let storage_only = running.iter().all(|r| r.is_storage());
        Fault::ALL
            .into_iter()
            .filter(|f| {
                backup.is_some()
                    || !matches!(
                        f,
                        Fault::KillPrimary
                            | Fault::KillBackup
                            | Fault::FreezeBackup
                            | Fault::CutLogging
                            | Fault::CutLink
                    )
            })
            .filter(|f| *f != Fault::CutLink || self.net.is_some())
            .filter(|f| !overlapping || (!running.contains(f) && (f.is_storage() || storage_only)))
            .collect()
    }

    fn inject(&mut self, fault: Fault, live: usize, backup: Option<usize>) {
        let hb = self.hb;
        self.outcome.faults.push(fault);
        let t = self.t.clone();
        match fault {
            Fault::KillPrimary | Fault::KillBackup => {
                let i = if fault == Fault::KillPrimary { live } else { backup.expect("a backup") };
                t.say(format!("harness: FAULT {}: SIGKILL {}", fault.name(), self.sides[i].name));
                self.sides[i].kill();
            }
            Fault::FreezePrimary | Fault::FreezeBackup => {
                let i = if fault == Fault::FreezePrimary { live } else { backup.expect("a backup") };
                let d = around_heartbeat(&mut self.rng, hb, 1500);
                let (pid, name) = (self.sides[i].pid, self.sides[i].name.clone());
                t.say(format!("harness: FAULT {}: SIGSTOP {name} for {d:?}", fault.name()));
                signal(pid, "-STOP");
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    signal(pid, "-CONT");
                    t.say(format!("harness: SIGCONT {name}"));
                });
                self.faults_running.push((fault, h));
            }
            Fault::CutLogging => {
                let b = backup.expect("a backup");
                let proxy = self.sides[b].log_proxy.clone().expect("a logging proxy");
                let d = around_heartbeat(&mut self.rng, hb, 1500);
                let reset = self.rng.gen_bool(0.3);
                t.say(format!(
                    "harness: FAULT {}: the logging channel {}-{} cut for {d:?}{}",
                    fault.name(),
                    self.sides[live].name,
                    self.sides[b].name,
                    if reset { ", then reset" } else { "" }
                ));
                proxy.cut();
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    proxy.restore(reset);
                    t.say("harness: logging channel restored");
                });
                self.faults_running.push((fault, h));
            }
            Fault::RestartFtdisk => {
                let down = Duration::from_millis(self.rng.gen_range(0..1500));
                t.say(format!("harness: FAULT {}: SIGKILL ftdisk, a new one in {down:?}", fault.name()));
                let ftdisk = self.ftdisk.clone();
                lock(&ftdisk).kill();
                let h = std::thread::spawn(move || {
                    std::thread::sleep(down);
                    let mut d = lock(&ftdisk);
                    match d.spawn() {
                        Ok(()) => t.say("harness: ftdisk restarted"),
                        Err(e) => t.say(format!("harness: ftdisk restart failed: {e}")),
                    }
                });
                self.faults_running.push((fault, h));
            }
            Fault::CutLink => {
                let b = backup.expect("a backup");
                let i = if self.rng.gen_bool(0.6) { live } else { b };
                let net = self.net.clone().expect("a lab");
                let host = self.sides[i].host.clone().unwrap_or_default();
                let d = around_heartbeat(&mut self.rng, hb, 1500);
                t.say(format!(
                    "harness: FAULT {}: {}'s host {host} cut from the LAN for {d:?}",
                    fault.name(),
                    self.sides[i].name
                ));
                let _ = net.lab.cut(&host);
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    let _ = net.lab.restore(&host);
                    t.say(format!("harness: host {host} back on the LAN"));
                });
                self.faults_running.push((fault, h));
            }
            Fault::SlowStorage => {
                let d = Duration::from_millis(self.rng.gen_range(1000..=4000));
                let per_chunk = self.rng.gen_range(1..=5u64) * 1000;
                let (delay, base) = (self.storage_delay.clone(), self.storage_base_us);
                t.say(format!(
                    "harness: FAULT {}: every storage proxy delays each chunk by {} ms for {d:?}",
                    fault.name(),
                    (base + per_chunk) as f64 / 1000.0
                ));
                delay.store(base + per_chunk, Ordering::Release);
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    delay.store(base, Ordering::Release);
                    t.say("harness: the storage is back to its usual speed");
                });
                self.faults_running.push((fault, h));
            }
            Fault::KillAfterJoin => unreachable!("kill-after-join is a re-protection (Scenario::kill_after_join)"),
            Fault::CutStorage => {
                let i = match backup {
                    Some(b) if self.rng.gen_bool(0.5) => b,
                    _ => live,
                };
                let d = Duration::from_millis(self.rng.gen_range(100..3000));
                let proxy = self.sides[i].storage.clone();
                let reset = self.rng.gen_bool(0.3);
                t.say(format!(
                    "harness: FAULT {}: {}'s storage cut for {d:?}{}",
                    fault.name(),
                    self.sides[i].name,
                    if reset { ", then reset" } else { "" }
                ));
                proxy.cut();
                let h = std::thread::spawn(move || {
                    std::thread::sleep(d);
                    proxy.restore(reset);
                    t.say("harness: storage restored");
                });
                self.faults_running.push((fault, h));
            }
        }
    }

    fn run_workload(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.refresh();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn run(&mut self) -> Result<(), String> {
        self.start_pair()?;
        let deadline = Instant::now() + START;
        while !lock(&self.view).ready {
            self.refresh();
            if Instant::now() > deadline {
                return Err(format!("the client never got going: {}", self.describe()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let warm = Duration::from_millis(self.rng.gen_range(200..1000));
        self.run_workload(warm);
        let n_faults = self.rng.gen_range(1..=3);
        let reprotect = self.rng.gen_bool(0.8);
        let mut joins_left = n_faults + 1;
        let mut injected = 0;
        while injected < n_faults {
            let live = self.settle()?;
            let backup = self.backup_of(live);
            if backup.is_none() && reprotect && joins_left > 0 {
                joins_left -= 1;
                if self.rng.gen_bool(KILL_AFTER_JOIN) {
                    // The join is the fault: the live side dies as it ends.
                    if self.kill_after_join(live)? {
                        injected += 1;
                    }
                    let d = Duration::from_millis(self.rng.gen_range(300..1200));
                    self.run_workload(d);
                } else {
                    self.reprotect(live)?;
                    // A joined backup must stay in lockstep: give it a moment.
                    self.run_workload(Duration::from_millis(300));
                }
                continue;
            }
            let choices = self.eligible(backup, false);
            let fault = choices[self.rng.gen_range(0..choices.len())];
            self.inject(fault, live, backup);
            injected += 1;
            // Sometimes another fault while this one lasts.
            if injected < n_faults && !fault.is_kill() && self.rng.gen_bool(0.3) {
                std::thread::sleep(Duration::from_millis(self.rng.gen_range(0..300)));
                self.refresh();
                let backup = self.backup_of(live).filter(|_| self.sides[live].running());
                let choices: Vec<Fault> = self
                    .eligible(backup, true)
                    .into_iter()
                    .filter(|f| !f.is_kill() || self.sides[live].running())
                    .collect();
                if !choices.is_empty() {
                    let second = choices[self.rng.gen_range(0..choices.len())];
                    self.t.say("harness: overlapping fault");
                    self.inject(second, live, backup);
                    injected += 1;
                }
            }
            let d = Duration::from_millis(self.rng.gen_range(300..1200));
            self.run_workload(d);
        }
        let live = self.settle()?;
        if self.backup_of(live).is_none() && reprotect && joins_left > 0 {
            self.reprotect(live)?;
            self.run_workload(Duration::from_millis(300));
            self.settle()?;
        }
        let d = Duration::from_millis(self.rng.gen_range(100..500));
        self.run_workload(d);
        Ok(())
    }
}

/// An 8 MiB kvstore disk whose log already holds the probe keys: `pN` set
/// to `pvN` for N below [`PROBES`] (kvstore's records: one 512-byte sector
/// each, magic `KVS1`, the sector's index, op 1 = set, key and value
/// lengths, the key at byte 11, the value at byte 75).
fn kvstore_image(path: &str) -> std::io::Result<()> {
    let mut data = vec![0u8; PROBES as usize * 512];
    for (i, rec) in data.chunks_mut(512).enumerate() {
        let (key, value) = (format!("p{i}"), format!("pv{i}"));
        rec[..4].copy_from_slice(b"KVS1");
        rec[4..8].copy_from_slice(&(i as u32).to_le_bytes());
        rec[8] = 1;
        rec[9] = key.len() as u8;
        rec[10] = value.len() as u8;
        rec[11..11 + key.len()].copy_from_slice(key.as_bytes());
        rec[75..75 + value.len()].copy_from_slice(value.as_bytes());
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&data)?;
    f.set_len(8 << 20)
}

pub(crate) fn run_scenario(
    idx: u64,
    seed: u64,
    net: Option<Arc<NetLab>>,
    quiesce_joins: bool,
) -> (Outcome, Transcript) {
    let t = Transcript::new();
    let guest = if net.is_some() { GuestKind::Redis } else { GuestKind::Kvstore };
    t.say(format!("harness: scenario {idx}, seed {seed}, guest {guest:?}"));
    let dir = Scratch::new("chaos");
    let image = dir.path("disk.img");
    let made = match guest {
        GuestKind::Kvstore => kvstore_image(&image),
        GuestKind::Redis => std::fs::File::create(&image).and_then(|f| f.set_len(8 << 20)),
    };
    if let Some(net) = &net {
        net.restore_all();
        net.flush_fdb();
    }
    if let Err(e) = made {
        let outcome = Outcome {
            violations: vec![("harness".into(), format!("cannot write {image}: {e}"))],
            ..Default::default()
        };
        return (outcome, t);
    }
    let bind_ip = net.as_ref().map_or_else(|| "127.0.0.1".to_string(), |n| n.bridge_ip());
    let ftdisk = match Ftdisk::start(&image, &bind_ip, &t) {
        Ok(d) => d,
        Err(e) => {
            let outcome = Outcome {
                violations: vec![("harness".into(), format!("cannot start ftdisk: {e}"))],
                ..Default::default()
            };
            return (outcome, t);
        }
    };
    let ftdisk_addr = ftdisk.addr.clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let hb = rng.gen_range(100..=150);
    t.say(format!("harness: heartbeat {hb} ms"));
    // Some scenarios run on slow storage throughout.
    let storage_base_us = if rng.gen_bool(0.25) { rng.gen_range(1..=3u64) * 1000 } else { 0 };
    if storage_base_us > 0 {
        t.say(format!(
            "harness: slow storage throughout: every storage proxy delays each chunk by {} ms",
            storage_base_us / 1000
        ));
    }
    let view: Arc<Mutex<ClientView>> = Arc::default();
    let (client_tx, client_rx) = mpsc::channel();
    let client = {
        let (tx, view, t) = (client_tx.clone(), view.clone(), t.clone());
        match guest {
            GuestKind::Kvstore => std::thread::spawn(move || client_main(client_rx, tx, view, t, seed)),
            GuestKind::Redis => std::thread::spawn(move || redis_client_main(client_rx, view, t, seed)),
        }
    };
    let outcome = Outcome { slow_base_ms: storage_base_us / 1000, ..Default::default() };
    let mut sc = Scenario {
        seed,
        rng,
        t: t.clone(),
        hb,
        ftdisk: Arc::new(Mutex::new(ftdisk)),
        ftdisk_addr,
        sides: Vec::new(),
        client_tx,
        view,
        outcome,
        faults_running: Vec::new(),
        quiesce_joins,
        guest,
        net,
        watchers: Watchers { t: t.clone(), wins: Arc::default(), tripwires: Arc::default() },
        storage_delay: Arc::new(AtomicU64::new(storage_base_us)),
        storage_base_us,
        _dir: dir,
    };
    let result = sc.run();
    let settled = match result {
        Ok(_) => true,
        Err(e) => {
            let kind = if e.contains("settle") || e.contains("no side is left") {
                "unavailable"
            } else if e.contains("joined") {
                "join-failed"
            } else {
                "harness"
            };
            sc.violation(kind, e);
            false
        }
    };
    sc.finish(settled, client);
    let outcome = std::mem::take(&mut sc.outcome);
    drop(sc);
    (outcome, t)
}
