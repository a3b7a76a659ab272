//! Where the guest's external inputs come from.
//!
//! Live (a plain run, a recording, the primary): from the host — its clock,
//! serial input — and, when recording, each input is appended to the log as
//! it is taken. Replay (`--replay`, the backup): from the log, at the
//! positions where they were recorded, and nothing from the host.

use crate::clock::HostClock;
use crate::ft::{LogSink, LogSource};
use rand::{rngs::StdRng, Rng, SeedableRng};
use replay::{Event, Recorder, Replayer};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::Instant;

/// Host-side inputs of a live run.
pub struct LiveInputs {
    pub host: HostClock,
    serial: Option<Receiver<Vec<u8>>>,
    pending: VecDeque<u8>,
    pub recorder: Option<Recorder<LogSink>>,
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
    /// `serial`: chunks of received serial bytes, until the sender drops.
    pub fn new(
        host: HostClock,
        serial: Option<Receiver<Vec<u8>>>,
        recorder: Option<Recorder<LogSink>>,
        perturb_seed: Option<u64>,
    ) -> Self {
        LiveInputs {
            host,
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

/// The source of a run's inputs.
pub enum Inputs {
    Live(Box<LiveInputs>),
    Replay(Replayer<LogSource>),
}
