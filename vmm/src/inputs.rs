//! Where the guest's external inputs come from.
//!
//! Live (a plain run, a recording, the primary): from the host — its clock,
//! serial input — and, when recording, each input is appended to the log as
//! it is taken. Replay (`--replay`, the backup): from the log, at the
//! positions where they were recorded, and nothing from the host.

use crate::clock::HostClock;
use rand::{rngs::StdRng, Rng, SeedableRng};
use replay::{Event, RecordSink, RecordSource, Recorder, Replayer};
use std::collections::VecDeque;
use std::io::Read;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::Instant;

/// Where live serial input comes from.
pub enum SerialInput {
    /// Standard input.
    Stdin,
    /// A file, read to its end.
    File(std::fs::File),
    /// No serial input at all.
    None,
}

/// Host-side inputs of a live run.
pub struct LiveInputs {
    pub host: HostClock,
    serial: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<u8>,
    pub recorder: Option<Recorder<Box<dyn RecordSink>>>,
    perturb: Option<StdRng>,
}

/// What ended a wait for input.
pub enum Woken {
    Input,
    Deadline,
    /// Serial input is closed and there is no deadline: nothing can come.
    Nothing,
}

impl LiveInputs {
    pub fn new(
        serial: SerialInput,
        recorder: Option<Recorder<Box<dyn RecordSink>>>,
        perturb_seed: Option<u64>,
    ) -> Self {
        let serial = match serial {
            SerialInput::Stdin => Some(spawn_reader(std::io::stdin())),
            SerialInput::File(f) => Some(spawn_reader(f)),
            SerialInput::None => None,
        };
        LiveInputs {
            host: HostClock::start(),
            serial,
            pending: VecDeque::new(),
            recorder,
            perturb: perturb_seed.map(StdRng::seed_from_u64),
        }
    }

    /// Appends `event` to the log when recording.
    pub fn record(&mut self, event: Event) -> std::io::Result<()> {
        match &mut self.recorder {
            Some(r) => r.event(event),
            None => Ok(()),
        }
    }

    /// Up to `room` received serial bytes, if any arrived.
    pub fn take_serial(&mut self, room: usize) -> Option<Vec<u8>> {
        if let Some(rx) = &self.serial {
            loop {
                match rx.try_recv() {
                    Ok(chunk) => self.pending.extend(chunk),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.serial = None;
                        break;
                    }
                }
            }
        }
        if room == 0 || self.pending.is_empty() {
            return None;
        }
        let n = room.min(self.pending.len());
        Some(self.pending.drain(..n).collect())
    }

    /// Blocks until serial input arrives or `deadline` passes.
    pub fn wait(&mut self, deadline: Option<Instant>) -> Woken {
        if !self.pending.is_empty() {
            return Woken::Input;
        }
        let Some(rx) = &self.serial else {
            return match deadline {
                Some(d) => {
                    std::thread::sleep(d.saturating_duration_since(Instant::now()));
                    Woken::Deadline
                }
                None => Woken::Nothing,
            };
        };
        let got = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(chunk) => {
                self.pending.extend(chunk);
                Woken::Input
            }
            Err(RecvTimeoutError::Timeout) => Woken::Deadline,
            Err(RecvTimeoutError::Disconnected) => {
                self.serial = None;
                if deadline.is_some() {
                    self.wait(deadline)
                } else {
                    Woken::Nothing
                }
            }
        }
    }

    /// With `--perturb-seed`: how late (ns) the timer is noticed this time.
    pub fn timer_jitter_ns(&mut self) -> u64 {
        self.perturb.as_mut().map_or(0, |rng| rng.gen_range(0..2_000_000))
    }

    /// With `--perturb-seed`: sometimes stall the host before an injection,
    /// as a loaded host would.
    pub fn injection_delay(&mut self) {
        if let Some(rng) = self.perturb.as_mut() {
            if rng.gen_ratio(1, 4) {
                let us = rng.gen_range(0..500);
                std::thread::sleep(std::time::Duration::from_micros(us));
            }
        }
    }
}

fn spawn_reader(mut input: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });
    rx
}

/// The source of a run's inputs.
pub enum Inputs {
    Live(Box<LiveInputs>),
    Replay(Replayer<Box<dyn RecordSource>>),
}
