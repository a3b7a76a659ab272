//! A scenario's end and its verdict: the final reads and `quit`, how every
//! side ended, the state digests, the disk read back by a fresh VM (also
//! after the VM was lost), and the split-brain check on the arbitration's
//! wins and the replies.

use super::{Scenario, MEM_MIB, START};
use crate::clients::{reply_text, resp_connect, ClientReport, Msg, PROBES};
use crate::ftdisk::Win;
use crate::lab::{GuestKind, NetLab};
use crate::lock;
use crate::sides::{aborted_join, addr_at_end, Side};
use crate::transcript::Transcript;
use ftvmm_tests::ftvmm_bin;
use ftvmm_tests::resp::Reply;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Boots a fresh redis VM on the disk, on lab host `host`, and reads `keys`
/// back over the network.
fn read_redis_disk(
    net: &NetLab,
    host: &str,
    ftdisk_addr: &str,
    keys: &[String],
    t: &Transcript,
) -> Result<Vec<String>, String> {
    let disk = format!("ftdisk:{ftdisk_addr}");
    let cmdline = format!("ip={}/24", net.vm_ip());
    let ns = net.ns(host);
    let args = ["--guest", "redis", "--cmdline", &cmdline, "--net", "tap:fttap", "--disk", &disk];
    t.say(format!("harness: a fresh VM on host {host} reads the disk: ftvmm {}", args.join(" ")));
    let _ = net.lab.restore(host);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(ftvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let err = child.stderr.take();
    let t2 = t.clone();
    std::thread::spawn(move || {
        if let Some(err) = err {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                t2.say(format!("fresh VM: {line}"));
            }
        }
    });
    let addr = format!("{}:6379", net.vm_ip());
    let result = (|| {
        let deadline = Instant::now() + START;
        let mut conn = loop {
            if let Some(mut c) = resp_connect(&addr) {
                if matches!(c.cmd(&["PING"]), Ok(Reply::Simple(p)) if p == "PONG") {
                    break c;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("the fresh VM at {addr} never answered"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut values = Vec::new();
        for k in keys {
            let r = conn.cmd(&["GET", k]).map_err(|e| format!("GET {k} from the fresh VM: {e}"))?;
            values.push(reply_text(&r));
        }
        let _ = conn.send(&["SHUTDOWN"]);
        Ok(values)
    })();
    fresh_vm_ended(&mut child, result)
}

/// What a fresh VM read, once it has ended by itself with status 0.
fn fresh_vm_ended(child: &mut Child, read: Result<Vec<String>, String>) -> Result<Vec<String>, String> {
    let status = ftvmm_tests::wait_timeout(child, Duration::from_secs(20));
    let values = read?;
    match status.and_then(|s| s.code()) {
        Some(0) => Ok(values),
        other => Err(format!("the fresh VM ended with {other:?}")),
    }
}

/// Boots a fresh VM on the disk and reads `keys` (names) back through its
/// console, 50 commands at a time (kvstore's receive ring holds 1 KiB and
/// drops what overruns it, so the input is paced by the replies).
fn read_disk(ftdisk_addr: &str, keys: &[String], t: &Transcript) -> Result<Vec<String>, String> {
    let disk = format!("ftdisk:{ftdisk_addr}");
    let args = ["--guest", "kvstore", "--mem-mib", MEM_MIB, "--disk", &disk, "--serial", "tcp:127.0.0.1:0"];
    t.say(format!("harness: a fresh VM reads the disk: ftvmm {}", args.join(" ")));
    let mut child = Command::new(ftvmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| {
        let mut err = BufReader::new(child.stderr.take().ok_or("no stderr")?);
        let mut line = String::new();
        let console = loop {
            line.clear();
            if err.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("the fresh VM ended before serving its console".to_string());
            }
            if line.contains("serial console on ") {
                break addr_at_end(line.trim_end());
            }
        };
        std::thread::spawn(move || for _ in err.lines() {});
        let stream = TcpStream::connect(&console).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let mut w = stream.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(stream);
        let mut read = || -> Result<String, String> {
            let mut l = String::new();
            match r.read_line(&mut l) {
                Ok(n) if n > 0 => Ok(l.trim_end().to_string()),
                Ok(_) => Err("the fresh VM's console closed".to_string()),
                Err(e) => Err(format!("reading the fresh VM's console: {e}")),
            }
        };
        let ready = read()?;
        t.say(format!("harness: fresh VM: {ready}"));
        let mut values = Vec::new();
        for batch in keys.chunks(50) {
            let text: String = batch.iter().map(|k| format!("get {k}\n")).collect();
            w.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
            for _ in batch {
                values.push(read()?);
            }
        }
        w.write_all(b"quit\n").map_err(|e| e.to_string())?;
        let bye = read()?;
        if bye != "BYE" {
            return Err(format!("the fresh VM answered {bye:?} to quit"));
        }
        Ok(values)
    })();
    fresh_vm_ended(&mut child, result)
}

impl Scenario {
    /// The VM was lost (every side ended before the harness ended them,
    /// the last by itself): nothing released an output that only a dead
    /// side held, so a fresh VM on the disk still reads every acknowledged
    /// write — for each key a version at least the newest acknowledged and
    /// at most the newest sent.
    fn check_disk_after_loss(&mut self, report: &ClientReport) {
        self.t.say("harness: every side is gone: the disk must still hold every acknowledged write");
        if !lock(&self.ftdisk).running() {
            let _ = lock(&self.ftdisk).spawn();
        }
        let keys: Vec<String> = report.bounds.keys().cloned().collect();
        let read = match &self.net {
            None => read_disk(&self.ftdisk_addr, &keys, &self.t),
            Some(net) => {
                let host = self.sides.iter().rev().find_map(|s| s.host.clone()).unwrap_or_else(|| "v1".into());
                net.flush_fdb();
                read_redis_disk(net, &host, &self.ftdisk_addr, &keys, &self.t)
            }
        };
        let values = match read {
            Ok(v) => v,
            Err(e) => return self.violation("disk-check", e),
        };
        let read: Vec<String> = keys.iter().zip(&values).map(|(k, v)| format!("{k}: {v}")).collect();
        let bounds: Vec<String> = report.bounds.iter().map(|(k, (a, s))| format!("{k}: {a}..={s}")).collect();
        self.t.say(format!(
            "harness: the disk holds {}; acknowledged..=sent versions: {}",
            read.join(", "),
            bounds.join(", ")
        ));
        for (k, v) in keys.iter().zip(values) {
            let (acked, sent) = report.bounds[k];
            let ver = if v == "NOTFOUND" {
                Some(0)
            } else {
                v.strip_prefix(&format!("VALUE {k}-v")).and_then(|n| n.parse::<u64>().ok())
            };
            match ver {
                Some(ver) if ver < acked => self.violation(
                    "lost-write",
                    format!("after the VM was lost, {k} reads version {ver} from the disk though version {acked} was acknowledged"),
                ),
                Some(ver) if ver > sent => self.violation(
                    "phantom-read",
                    format!("after the VM was lost, {k} reads version {ver} from the disk, never written (last sent: {sent})"),
                ),
                Some(_) => {}
                None => self.violation("disk-check", format!("{k} reads {v:?} from the disk")),
            }
        }
    }

    /// Final reads and `quit`, the endings, the disk, the split-brain check.
    pub(super) fn finish(&mut self, settled: bool, client: JoinHandle<ClientReport>) {
        // Let the faults end before anything else.
        while !self.faults_done() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.client_tx.send(if settled { Msg::Final } else { Msg::Abort });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lock(&self.view).finished && Instant::now() < deadline {
            self.refresh();
            std::thread::sleep(Duration::from_millis(10));
        }
        if !lock(&self.view).finished {
            self.violation("unavailable", format!("the client could not finish its final reads: {}", self.describe()));
            let _ = self.client_tx.send(Msg::Abort);
        }
        let report = client.join().unwrap_or_default();
        self.outcome.acked = report.acked;
        self.outcome.switches = lock(&self.view).switches;
        self.outcome.failovers = self.sides.iter().filter(|s| s.went_live).count() as u32;
        for (k, m) in &report.violations {
            self.outcome.violations.push((k.clone(), m.clone()));
        }

        // Endings: once the VM quit, every side must end.
        let deadline = Instant::now() + Duration::from_secs(if report.quit { 15 } else { 0 });
        loop {
            self.refresh();
            if self.sides.iter().all(|s| !s.running()) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let still: Vec<String> = self.sides.iter().filter(|s| s.running()).map(|s| s.name.clone()).collect();
        if report.quit && !still.is_empty() {
            let d = self.describe();
            self.violation("still-running", format!("{} still running 15 s after the VM quit: {d}", still.join(", ")));
        }
        // Every side gone before the harness ends them: the VM was lost.
        let none_left = !report.quit && self.sides.iter().all(|s| !s.running());
        for s in &mut self.sides {
            s.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
        self.refresh();
        let mut found = Vec::new();
        for s in &self.sides {
            if s.killed || aborted_join(s) {
                continue;
            }
            let code = s.exit.and_then(|e| e.code());
            match code {
                Some(5) => {}
                Some(0) if report.quit => {}
                _ => found.push((
                    if code == Some(3) { "divergence" } else { "bad-exit" },
                    format!("{} {}: {}", s.name, s.status_text(), s.error.clone().unwrap_or_default()),
                )),
            }
        }
        // The sides that ended with the VM: equal digests.
        let enders: Vec<&Side> = self.sides.iter().filter(|s| s.exit.and_then(|e| e.code()) == Some(0)).collect();
        if let Some(first) = enders.first() {
            for o in &enders[1..] {
                if o.digest != first.digest || o.digest.is_none() {
                    found.push((
                        "digest-mismatch",
                        format!("{} ended with {:?}, {} with {:?}", first.name, first.digest, o.name, o.digest),
                    ));
                }
            }
        }
        for (k, m) in found {
            self.violation(k, m);
        }

        // The disk, read by a fresh VM, holds what the final reads saw.
        if report.quit {
            if !lock(&self.ftdisk).running() {
                let _ = lock(&self.ftdisk).spawn();
            }
            // The keys read at the end, and a sample of the untouched probe keys.
            let mut want_values = report.final_values.clone();
            for _ in 0..if self.guest == GuestKind::Kvstore { 24 } else { 0 } {
                let id = self.rng.gen_range(0..PROBES);
                want_values.insert(format!("p{id}"), format!("VALUE pv{id}"));
            }
            let keys: Vec<String> = want_values.keys().cloned().collect();
            let read = match &self.net {
                None => read_disk(&self.ftdisk_addr, &keys, &self.t),
                Some(net) => {
                    // On the last live side's host: the LAN knows the VM's MAC there.
                    let host = self
                        .sides
                        .iter()
                        .filter(|s| s.exit.and_then(|e| e.code()) == Some(0))
                        .max_by_key(|s| s.gen)
                        .and_then(|s| s.host.clone())
                        .unwrap_or_else(|| "v1".into());
                    net.flush_fdb();
                    read_redis_disk(net, &host, &self.ftdisk_addr, &keys, &self.t)
                }
            };
            match read {
                Ok(values) => {
                    for (k, v) in keys.iter().zip(values) {
                        let want = &want_values[k];
                        if &v != want {
                            let bounds = report.bounds.get(k).copied();
                            self.violation(
                                "disk-mismatch",
                                format!("{k} reads {v:?} from the disk but {want:?} from the live side (acknowledged, sent: {bounds:?})"),
                            );
                        }
                    }
                }
                Err(e) => self.violation("disk-check", e),
            }
        } else if none_left {
            self.check_disk_after_loss(&report);
        }

        // Split brain: who answered, and whether a newer owner existed
        // before the command was sent.
        let mut wins = lock(&lock(&self.ftdisk).wins).clone();
        for w in lock(&self.watchers.wins).iter() {
            if !wins.iter().any(|x| x.generation == w.generation && x.pid == w.pid) {
                self.t.say(format!("harness: generation {} won by {}: not in the ftdisk's log", w.generation, w.owner));
                wins.push(w.clone());
            }
        }
        let mut found = Vec::new();
        let mut by_gen: BTreeMap<u64, Vec<&Win>> = BTreeMap::new();
        for w in &wins {
            by_gen.entry(w.generation).or_default().push(w);
        }
        for (g, ws) in &by_gen {
            if ws.iter().any(|w| w.pid != ws[0].pid) {
                let owners: Vec<&str> = ws.iter().map(|w| w.owner.as_str()).collect();
                found.push(("split-brain", format!("generation {g} won by more than one side: {owners:?}")));
            }
        }
        let mut flagged: HashMap<u32, u32> = HashMap::new();
        for r in &report.replies {
            // A win read from the winner's log may be read after its first reply.
            let own = wins
                .iter()
                .filter(|w| w.pid == r.pid && w.at_us <= r.at_us + if w.from_side { 500_000 } else { 0 })
                .map(|w| w.generation)
                .max();
            let msg = match own {
                None => {
                    Some(format!("{} (pid {}) answered {:?} without having won the arbitration", r.name, r.pid, r.what))
                }
                Some(g) => wins.iter().find(|w| w.pid != r.pid && w.generation > g && w.at_us < r.sent_us).map(|w| {
                    format!(
                        "{} (pid {}, generation {g}) answered {:?}, sent {:.3} s after {} won generation {}",
                        r.name,
                        r.pid,
                        r.what,
                        (r.sent_us - w.at_us) as f64 / 1e6,
                        w.owner,
                        w.generation
                    )
                }),
            };
            if let Some(msg) = msg {
                let n = flagged.entry(r.pid).or_default();
                *n += 1;
                if *n <= 3 {
                    found.push(("split-brain", msg));
                }
            }
        }
        for (k, m) in found {
            self.violation(k, m);
        }
        let seed = self.seed;
        self.t.say(format!("harness: scenario with seed {seed} done"));
    }
}
