//! The VMM processes: each side (a primary or a backup) spawned with its
//! stderr read line by line into its events (and the transcript), the
//! tripwires that kill a side on a line another prints (kill-after-join),
//! and reading what the sides said: consoles, listening addresses, wins,
//! lockstep, go-lives, errors, digests and exits.

use crate::ftdisk::Win;
use crate::lock;
use crate::proxy::Proxy;
use crate::transcript::{now_us, Transcript};
use ftvmm_tests::ftvmm_bin;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A kill armed on a stderr line: when side `watch` prints a line
/// containing `needle`, the stderr reader itself SIGKILLs `victim` (after
/// `delay`), without waiting for the harness's next look (kill-after-join:
/// the live side dies while the writes it released are still in flight).
pub(crate) struct Tripwire {
    pub(crate) watch: String,
    pub(crate) needle: &'static str,
    pub(crate) victim: u32,
    pub(crate) victim_name: String,
    /// The victim's way to the ftdisk: what it holds at the kill is told.
    pub(crate) victim_storage: Arc<Proxy>,
    /// Set before the signal is sent: the harness then counts the victim's
    /// end as its own kill.
    pub(crate) doomed: Arc<AtomicBool>,
    pub(crate) delay: Duration,
    /// The victim's host dies with it: its storage proxy drops what it
    /// holds from it (resets its connections) instead of passing it on.
    pub(crate) host_dies: bool,
}

/// What every side's stderr reader reports to.
#[derive(Clone)]
pub(crate) struct Watchers {
    pub(crate) t: Transcript,
    /// Wins as the winners logged them.
    pub(crate) wins: Arc<Mutex<Vec<Win>>>,
    pub(crate) tripwires: Arc<Mutex<Vec<Tripwire>>>,
}

impl Watchers {
    /// Fires (and disarms) the tripwires that `line` of side `name` trips.
    fn on_line(&self, name: &str, line: &str) {
        let fired: Vec<Tripwire> = {
            let mut wires = lock(&self.tripwires);
            let (fired, kept) = std::mem::take(&mut *wires)
                .into_iter()
                .partition(|w: &Tripwire| w.watch == name && line.contains(w.needle));
            *wires = kept;
            fired
        };
        for w in fired {
            if !w.delay.is_zero() {
                std::thread::sleep(w.delay);
            }
            w.doomed.store(true, Ordering::Release);
            // SAFETY: kill(2) on the pid of a child of ours that has not
            // been reaped (the harness reaps only after seeing `doomed`).
            let r = unsafe { libc::kill(w.victim as libc::pid_t, libc::SIGKILL) };
            let in_flight = w.victim_storage.state.in_flight_up.load(Ordering::Acquire);
            if w.host_dies {
                w.victim_storage.reset();
            }
            self.t.say(format!(
                "harness: {name} printed {:?}: SIGKILL {} (pid {}){}{}; the {in_flight} bytes from it to the ftdisk \
                 in its storage proxy {}",
                w.needle,
                w.victim_name,
                w.victim,
                if w.delay.is_zero() { String::new() } else { format!(" {:?} later", w.delay) },
                if r == 0 { "" } else { " (it was gone already)" },
                if w.host_dies { "are dropped (its host died)" } else { "go on" }
            ));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Role {
    Primary,
    Backup,
}

pub(crate) struct Side {
    pub(crate) name: String,
    pub(crate) role: Role,
    child: Child,
    pub(crate) pid: u32,
    pub(crate) events: Arc<Mutex<Vec<String>>>,
    seen: usize,
    pub(crate) console: Option<String>,
    /// Where it accepts backups (once known).
    pub(crate) listen: Option<String>,
    /// The side it was started to back up.
    pub(crate) target: Option<usize>,
    pub(crate) log_proxy: Option<Arc<Proxy>>,
    pub(crate) storage: Arc<Proxy>,
    /// The last generation it won (the initial primary's claim at boot is 1).
    pub(crate) gen: Option<u64>,
    /// In lockstep with its target (attached at boot, or joined).
    pub(crate) synced: bool,
    /// Its target's generation when it got in lockstep.
    pub(crate) attach_gen: Option<u64>,
    pub(crate) exit: Option<ExitStatus>,
    pub(crate) killed: bool,
    pub(crate) digest: Option<String>,
    halted_why: Option<String>,
    /// Its `ftvmm: error:` line, if it printed one.
    pub(crate) error: Option<String>,
    /// The lab host it runs on (the redis guest).
    pub(crate) host: Option<String>,
    /// It went live (a failover).
    pub(crate) went_live: bool,
    /// A tripwire SIGKILLed it (or is about to): its end is the harness's kill.
    pub(crate) doomed: Arc<AtomicBool>,
}

impl Side {
    /// Spawns `ftvmm args`, inside lab host `host`'s network namespace if
    /// given (`ip netns exec` execs ftvmm: the child is the VMM itself).
    pub(crate) fn spawn(
        name: &str,
        role: Role,
        args: &[String],
        storage: Arc<Proxy>,
        host: Option<(String, String)>,
        watchers: &Watchers,
    ) -> Result<Side, String> {
        let t = &watchers.t;
        let mut cmd = match &host {
            Some((_, ns)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(ftvmm_bin());
                c
            }
            None => Command::new(ftvmm_bin()),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn ftvmm: {e}"))?;
        let pid = child.id();
        let on = host.as_ref().map(|(h, _)| format!(" on host {h}")).unwrap_or_default();
        t.say(format!("harness: started {name} (pid {pid}){on}: ftvmm {}", args.join(" ")));
        let err = child.stderr.take().expect("piped stderr");
        let events: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ev, w, n) = (events.clone(), watchers.clone(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                w.t.say(format!("{n}: {line}"));
                w.on_line(&n, &line);
                if let Some(g) = line.split("(generation ").nth(1).filter(|_| line.contains(" won the ")) {
                    if let Ok(generation) = g.trim_end_matches(')').parse() {
                        let owner = format!("{n} (pid {pid}, by its own log)");
                        lock(&w.wins).push(Win { at_us: now_us(), generation, pid, owner, from_side: true });
                    }
                }
                lock(&ev).push(line);
            }
        });
        Ok(Side {
            name: name.to_string(),
            role,
            child,
            pid,
            events,
            seen: 0,
            console: None,
            listen: None,
            target: None,
            log_proxy: None,
            storage,
            gen: None,
            synced: false,
            attach_gen: None,
            exit: None,
            killed: false,
            digest: None,
            halted_why: None,
            error: None,
            host: host.map(|(h, _)| h),
            went_live: false,
            doomed: Arc::default(),
        })
    }

    pub(crate) fn running(&self) -> bool {
        self.exit.is_none() && !self.killed
    }

    pub(crate) fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.killed = true;
        }
    }

    pub(crate) fn status_text(&self) -> String {
        if self.killed {
            return "killed by the harness".into();
        }
        match self.exit {
            None => "running".into(),
            Some(s) => match s.code() {
                Some(c) => format!("exited with status {c}"),
                None => format!("ended by {s}"),
            },
        }
    }
}

/// A joining backup whose state transfer was cut short (a heartbeat
/// timeout mid-transfer, on a loaded host): it ends with status 2 before
/// it is in lockstep, and the live side runs on alone.
pub(crate) fn aborted_join(s: &Side) -> bool {
    s.role == Role::Backup
        && !s.synced
        && s.exit.and_then(|e| e.code()) == Some(2)
        && s.error.as_deref().is_some_and(|e| e.contains("the state transfer was cut short"))
}

pub(crate) fn addr_at_end(line: &str) -> String {
    line.rsplit(' ').next().unwrap_or_default().trim_end_matches(';').to_string()
}

/// Reads the sides' new stderr lines and notices their exits.
pub(crate) fn refresh(sides: &mut [Side], t: &Transcript) {
    for i in 0..sides.len() {
        let new: Vec<String> = {
            let ev = lock(&sides[i].events);
            ev[sides[i].seen..].to_vec()
        };
        sides[i].seen += new.len();
        for line in new {
            let target_gen = sides[i].target.and_then(|j| sides[j].gen);
            let s = &mut sides[i];
            if line.contains("serial console on ") {
                s.console = Some(addr_at_end(&line));
            } else if line.contains("waiting for a backup on ")
                || line.contains("backups may join on ")
                || line.contains("live: accepting a backup on ")
                || line.contains("accepting a new backup on ")
            {
                s.listen = Some(addr_at_end(&line));
            } else if let Some(g) = line.split("(generation ").nth(1).filter(|_| line.contains(" won the ")) {
                if let Ok(g) = g.trim_end_matches(')').parse() {
                    s.gen = Some(g);
                }
            } else if line.contains("replaying in lockstep") || line.contains("restored at exit") {
                s.synced = true;
                s.attach_gen = target_gen;
            } else if line.contains("halting") {
                s.halted_why = Some(line.clone());
                s.error = Some(line.clone());
            } else if line.contains("backup: going live") {
                s.went_live = true;
            } else if line.starts_with("ftvmm: error:") {
                s.error = Some(line.clone());
            } else if let Some(d) = line.strip_prefix("state-digest: ") {
                s.digest = Some(d.trim().to_string());
            }
        }
        let s = &mut sides[i];
        if s.running() && s.doomed.load(Ordering::Acquire) {
            // A tripwire's SIGKILL (before looking at its exit: that is ours).
            s.kill();
            t.say(format!("harness: {} killed by a tripwire", s.name));
        }
        if s.exit.is_none() && !s.killed {
            if let Ok(Some(status)) = s.child.try_wait() {
                s.exit = Some(status);
                t.say(format!("harness: {} {}", s.name, s.status_text()));
            }
        }
    }
}
