//! Where the guest's external inputs come from.
//!
//! Live (a plain run, a recording, the primary): from the host — its clock,
//! serial input, frames from the NIC's TAP — and, when recording, each input
//! is appended to the log as it is taken. Replay (`--replay`, the backup): from the log, at the
//! positions where they were recorded, and nothing from the host.

use crate::clock::HostClock;
use crate::host::tap::TapRx;
use crate::log_io::{LogSink, LogSource};
use rand::{rngs::StdRng, Rng, SeedableRng};
use replay::{Event, Recorder, Replayer};
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Something that happened on the host side, for a waiting vCPU thread.
pub enum HostEvent {
    Serial(Vec<u8>),
    SerialClosed,
    /// A frame arrived in the NIC's receive queue.
    Frame,
}

/// Serial input held here for the guest, at most (bytes, give or take a
/// chunk): the UART takes a few bytes at a time. The rest waits in the
/// queue (at most [`WAKE_QUEUE`] chunks) and in the console's bounded buffer.
const MAX_PENDING_SERIAL: usize = 4 << 10;

/// Wake-ups queued beyond this many are dropped: one pending wake-up is as
/// good as many (the frames themselves wait in the TAP's bounded queue).
const WAKE_QUEUE: usize = 64;

/// How the NIC's receive thread wakes the run that takes its frames (set
/// when a live run attaches the NIC: a backup's TAP thread exists before
/// its live run does).
#[derive(Clone, Default)]
pub struct FrameWaker(Arc<Mutex<Option<SyncSender<HostEvent>>>>);

impl FrameWaker {
    /// What the TAP's receive thread calls after queueing a frame.
    pub fn callback(&self) -> Box<dyn Fn() + Send> {
        let slot = self.0.clone();
        Box::new(move || {
            if let Some(tx) = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
                let _ = tx.try_send(HostEvent::Frame);
            }
        })
    }
}

/// Host-side inputs of a live run.
pub struct LiveInputs {
    pub host: HostClock,
    events: Receiver<HostEvent>,
    events_tx: SyncSender<HostEvent>,
    serial_open: bool,
    pending: VecDeque<u8>,
    /// The NIC's host side: frames received from the TAP.
    pub net: Option<Arc<TapRx>>,
    pub recorder: Option<Recorder<LogSink>>,
    perturb: Option<StdRng>,
}

/// What ended a wait for input.
pub enum Woken {
    Input,
    Deadline,
    /// Serial input is closed, there is no NIC and no deadline: nothing can come.
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
        let (events_tx, events) = mpsc::sync_channel(WAKE_QUEUE);
        let serial_open = serial.is_some();
        if let Some(rx) = serial {
            // Serial chunks join the one queue a waiting vCPU thread sleeps
            // on; a full queue holds the reader back (no byte is dropped).
            let tx = events_tx.clone();
            std::thread::spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Console);
                for chunk in rx {
                    if tx.send(HostEvent::Serial(chunk)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(HostEvent::SerialClosed);
            });
        }
        LiveInputs {
            host,
            events,
            events_tx,
            serial_open,
            pending: VecDeque::new(),
            net: None,
            recorder,
            perturb: perturb_seed.map(StdRng::seed_from_u64),
        }
    }

    /// Takes the NIC's received frames from `rx` from now on; `waker`
    /// (the one `rx`'s thread calls) wakes this run's waits.
    pub fn attach_nic(&mut self, rx: Arc<TapRx>, waker: &FrameWaker) {
        let mut slot = waker.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(self.events_tx.clone());
        self.net = Some(rx);
    }

    /// Appends `event` to the log when recording.
    pub fn record(&mut self, event: Event) -> std::io::Result<()> {
        match &mut self.recorder {
            Some(r) => r.event(event),
            None => Ok(()),
        }
    }

    fn take_event(&mut self, event: HostEvent) {
        match event {
            HostEvent::Serial(chunk) => self.pending.extend(chunk),
            HostEvent::SerialClosed => self.serial_open = false,
            HostEvent::Frame => {}
        }
    }

    /// Up to `room` received serial bytes, if any arrived.
    pub fn take_serial(&mut self, room: usize) -> Option<Vec<u8>> {
        // Serial input is taken off the queue only while little waits here:
        // beyond, it waits in the queue and the console's bounded buffer,
        // and the console stops reading its client.
        while self.pending.len() < MAX_PENDING_SERIAL {
            let Ok(event) = self.events.try_recv() else { break };
            self.take_event(event);
        }
        if room == 0 || self.pending.is_empty() {
            return None;
        }
        let n = room.min(self.pending.len());
        Some(self.pending.drain(..n).collect())
    }

    /// A received frame, if one waits (and the guest has posted a buffer for
    /// it: the caller checks).
    pub fn take_frame(&mut self) -> Option<Vec<u8>> {
        self.net.as_ref()?.pop()
    }

    /// Blocks until serial input or a frame arrives or `deadline` passes.
    /// `frames_deliverable`: the guest has posted a receive buffer, so a
    /// frame already waiting is an input now (else it waits for a buffer).
    pub fn wait(&mut self, deadline: Option<Instant>, frames_deliverable: bool) -> Woken {
        let frame_waits = self.net.as_ref().is_some_and(|n| !n.is_empty());
        if !self.pending.is_empty() || (frames_deliverable && frame_waits) {
            return Woken::Input;
        }
        loop {
            if !self.serial_open && self.net.is_none() && deadline.is_none() {
                return Woken::Nothing;
            }
            let got = match deadline {
                Some(d) => self.events.recv_timeout(d.saturating_duration_since(Instant::now())),
                None => self.events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match got {
                Ok(HostEvent::SerialClosed) => self.serial_open = false,
                Ok(event) => {
                    self.take_event(event);
                    return Woken::Input;
                }
                Err(RecvTimeoutError::Timeout) => return Woken::Deadline,
                // We hold a sender ourselves: the queue never disconnects.
                Err(RecvTimeoutError::Disconnected) => return Woken::Nothing,
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

impl Inputs {
    /// The logging channel to a backup, if these are a primary's inputs
    /// (live, recorded to a backup).
    pub fn primary_link(&mut self) -> Option<&mut logging_channel::PrimaryLink> {
        match self {
            Inputs::Live(live) => match live.recorder.as_mut()?.sink_mut() {
                LogSink::Primary(link) => Some(link),
                LogSink::File(_) => None,
            },
            Inputs::Replay(_) => None,
        }
    }

    /// The logging channel from the primary, if these are a backup's
    /// inputs (a replay of the primary's log).
    pub fn backup_link(&mut self) -> Option<&mut logging_channel::BackupLink> {
        match self {
            Inputs::Replay(r) => match r.source_mut() {
                LogSource::Backup(link) => Some(link),
                LogSource::File(_) => None,
            },
            Inputs::Live(_) => None,
        }
    }
}
