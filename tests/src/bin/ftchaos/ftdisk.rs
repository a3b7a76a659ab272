//! The storage server: an `ftdisk` process on the scenario's image, killed
//! and restarted on the same address by the `restart-ftdisk` fault, and the
//! go-live arbitration's wins read from its log.

use crate::lock;
use crate::transcript::{parse_utc_us, Transcript};
use ftvmm_tests::ftdisk_bin;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A won test-and-set, from the ftdisk's log.
#[derive(Clone, Debug)]
pub(crate) struct Win {
    pub(crate) at_us: u64,
    pub(crate) generation: u64,
    pub(crate) pid: u32,
    pub(crate) owner: String,
    /// From the winner's own log line, timestamped when the harness read
    /// it (a little late): an ftdisk killed between persisting a win and
    /// logging it leaves only this (the winner's retry on the next ftdisk
    /// recognises its own win without a new one).
    pub(crate) from_side: bool,
}

fn parse_win(line: &str) -> Option<Win> {
    if !line.contains("test-and-set won") {
        return None;
    }
    let at_us = parse_utc_us(line.split_whitespace().next()?)?;
    let generation = line.split("generation=").nth(1)?.split_whitespace().next()?.parse().ok()?;
    let owner = line.split("owner=").nth(1)?.trim().to_string();
    let pid = owner.split("pid ").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some(Win { at_us, generation, pid, owner, from_side: false })
}

pub(crate) struct Ftdisk {
    image: String,
    pub(crate) addr: String,
    child: Option<Child>,
    pub(crate) wins: Arc<Mutex<Vec<Win>>>,
    t: Transcript,
    instance: u32,
}

impl Ftdisk {
    pub(crate) fn start(image: &str, ip: &str, t: &Transcript) -> Result<Ftdisk, String> {
        let port = TcpListener::bind(format!("{ip}:0")).and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut d = Ftdisk {
            image: image.to_string(),
            addr: format!("{ip}:{port}"),
            child: None,
            wins: Arc::default(),
            t: t.clone(),
            instance: 0,
        };
        d.spawn()?;
        Ok(d)
    }

    pub(crate) fn spawn(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.instance += 1;
            let mut child = Command::new(ftdisk_bin())
                .args(["--image", &self.image, "--listen", &self.addr])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("spawn ftdisk: {e}"))?;
            let err = child.stderr.take().expect("piped stderr");
            let (tx, rx) = mpsc::channel();
            let (wins, t, n) = (self.wins.clone(), self.t.clone(), self.instance);
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    t.say(format!("ftdisk#{n}: {line}"));
                    if let Some(w) = parse_win(&line) {
                        lock(&wins).push(w);
                    }
                    if line.starts_with("ftdisk: serving") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            });
            if rx.recv_timeout(Duration::from_secs(10)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                return Err(format!("ftdisk would not serve on {}", self.addr));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Ftdisk {
    fn drop(&mut self) {
        self.kill();
    }
}
