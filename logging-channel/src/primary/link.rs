//! The link as the primary's vCPU thread uses it: records appended at each
//! exit and handed to the network thread at `passed`/`flush` (a
//! [`RecordSink`]), the released and disk-applied positions, throttling on
//! the backup's lag, the acknowledgements (polled, or through the ack
//! callback), the repair's restart, and the end of the log (`finish`).

use super::network::run;
use super::state_sender::{end_state, send_state, StateSender};
use super::{weight, Shared, State, StateOut};
use crate::transport::Stream;
use crate::{lock, ChannelConfig, ChannelError, LogStart};
use replay::{Record, RecordSink};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

pub(super) type AckCallback = Arc<dyn Fn(&Acked<'_>) + Send + Sync>;

/// One acknowledgement as the ack callback sees it: the watermark, and the
/// way each batch it retires went (for the per-hop output-commit figures of
/// `--stats`).
#[derive(Clone, Copy, Debug)]
pub struct Acked<'a> {
    /// Highest watermark acknowledged so far; `u64::MAX` when the backup is lost.
    pub watermark: u64,
    /// The batches this ack retires, oldest first (none when the backup is lost).
    pub batches: &'a [BatchTimes],
    /// When the ack was read from the socket.
    pub received: Instant,
}

/// When one batch went each step of its way out.
#[derive(Clone, Copy, Debug)]
pub struct BatchTimes {
    /// The watermark it carried.
    pub watermark: u64,
    /// When the vCPU thread handed over that watermark.
    pub handed: Instant,
    /// When its last byte was written to the socket.
    pub sent: Instant,
}

impl Acked<'static> {
    pub(super) fn lost() -> Self {
        Acked { watermark: u64::MAX, batches: &[], received: Instant::now() }
    }
}

/// The primary's link to its backup. Used from the primary's vCPU thread;
/// a background thread does the socket I/O, heartbeats and ack handling.
///
/// Call [`RecordSink::passed`] before [`PrimaryLink::throttle`]: records
/// still buffered here are not on their way, so no ack can cover them.
pub struct PrimaryLink {
    shared: Arc<Shared>,
    /// Records appended since the last flush/passed: a plain vector, as
    /// `append` runs at every guest exit.
    buffer: Vec<Record>,
    /// Their bytes, by [`weight`].
    buffer_bytes: u64,
    /// Highest watermark handed to the network thread.
    handed_watermark: u64,
    /// Records or a watermark were thrown away because the backup was
    /// lost: `finish` cannot report everything acknowledged.
    discarded: bool,
    thread: Option<JoinHandle<()>>,
}

impl PrimaryLink {
    pub(super) fn start(
        runtime: Runtime,
        stream: Stream,
        peer: SocketAddr,
        config: ChannelConfig,
        start: LogStart,
    ) -> Result<PrimaryLink, ChannelError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                queued: 0,
                queued_bytes: 0,
                watermark: 0,
                handed_at: Instant::now(),
                released: 0,
                disk_applied: 0,
                acked: 0,
                records_acked: 0,
                bytes_acked: 0,
                #[cfg(test)]
                peak_unacked_bytes: 0,
                lost: None,
                closing: false,
                on_ack: None,
                state: StateOut::default(),
                resync_requested: None,
                resyncing: false,
            }),
            changed: Condvar::new(),
            wake: Notify::new(),
            stop: Notify::new(),
            lost: AtomicBool::new(false),
            config,
            peer,
            start,
            sending: Mutex::new(()),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-lc-primary".into())
            .spawn(move || {
                for_thread.config.thread_started();
                crate::prioritize_network_thread();
                runtime.block_on(run(stream, for_thread))
            })
            .map_err(|e| ChannelError::io("starting the network thread", e))?;
        Ok(PrimaryLink {
            shared,
            buffer: Vec::new(),
            buffer_bytes: 0,
            handed_watermark: 0,
            discarded: false,
            thread: Some(thread),
        })
    }

    /// The backup's address.
    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    /// How this link's log starts: [`LogStart::State`] for a link from
    /// [`PrimaryListener::accept_joining`](super::PrimaryListener::accept_joining).
    pub fn log_start(&self) -> LogStart {
        self.shared.start
    }

    /// Sends the next part of the state stream (a joining link only). The
    /// stream is opaque and ordered: the backup's VMM reads the same bytes in
    /// the same order, though cut into other pieces. Callable from any
    /// thread (see also [`state_sender`](Self::state_sender)); calls from
    /// several threads at once are sent in some order, each chunk whole.
    ///
    /// Blocks while more than [`ChannelConfig::state_window`] state bytes
    /// are sent and not yet consumed by the backup's VMM. Fails with
    /// [`ChannelError::Lost`] once the backup is lost (also while blocked),
    /// and with [`ChannelError::Misuse`] on a link whose log starts at boot
    /// or after [`end_state`](Self::end_state).
    pub fn send_state(&self, chunk: Vec<u8>) -> Result<(), ChannelError> {
        send_state(&self.shared, chunk)
    }

    /// The state stream is complete: it is the VM's state at guest exit
    /// `exit`, and the log goes on with the records of the exits after it.
    /// Waits for a chunk another thread is sending to be handed over, not
    /// for the backup. Records appended before this call wait
    /// until the state is out; a record at an exit up to `exit` is a misuse
    /// that loses the backup (the state already covers it). Until this call,
    /// [`throttle`](Self::throttle) bounds the records by bytes only; after
    /// it, the lag in exits counts from `exit`.
    pub fn end_state(&self, exit: u64) -> Result<(), ChannelError> {
        end_state(&self.shared, exit)
    }

    /// A handle for sending the state from another thread while this link
    /// stays with the vCPU thread.
    pub fn state_sender(&self) -> StateSender {
        StateSender { shared: self.shared.clone() }
    }

    /// Outputs at positions <= `exit` have been released to the outside
    /// world. Sent on the next Batch (a Batch without records if nothing
    /// else is going out), so the backup knows what a new primary must
    /// emit again.
    pub fn released(&self, exit: u64) {
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() || exit <= st.released {
                return;
            }
            st.released = exit;
        }
        self.shared.wake.notify_one();
    }

    /// The guest's disk ops numbered up to `op` have been applied to the
    /// storage. Sent like [`released`](Self::released), so the backup can
    /// forget the writes it keeps for going live.
    pub fn disk_applied(&self, op: u64) {
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() || op <= st.disk_applied {
                return;
            }
            st.disk_applied = op;
        }
        self.shared.wake.notify_one();
    }

    /// Highest watermark the backup has acknowledged; `u64::MAX` once the
    /// backup is lost (nothing is held back for a backup that is gone).
    pub fn acked(&self) -> u64 {
        let st = lock(&self.shared.state);
        if st.lost.is_some() {
            u64::MAX
        } else {
            st.acked
        }
    }

    /// Registers the callback the network thread calls with the new acked
    /// watermark after each Ack, and once with `u64::MAX` when the backup is
    /// lost. If the link is already lost, calls `f(u64::MAX)` at once. The
    /// callback runs on the network thread: it must be quick and must not
    /// drop the link.
    pub fn on_ack(&self, f: Box<dyn Fn(&Acked<'_>) + Send + Sync>) {
        let f: AckCallback = Arc::from(f);
        let lost = {
            let mut st = lock(&self.shared.state);
            st.on_ack = Some(f.clone());
            st.lost.is_some()
        };
        // Outside the lock: the callback may well call acked().
        if lost {
            f(&Acked::lost());
        }
    }

    /// Blocks while `exit` is more than `max_lag_exits` ahead of the
    /// acknowledged watermark, or while the records handed over and not
    /// yet acknowledged take more than `max_lag_bytes`; returns at once when
    /// the backup is lost. On a joining link the lag in exits counts from the
    /// state's exit, and not at all before [`end_state`](Self::end_state).
    pub fn throttle(&self, exit: u64) {
        let config = &self.shared.config;
        let mut st = lock(&self.shared.state);
        loop {
            if st.lost.is_some() || st.resyncing {
                return;
            }
            let base = match self.shared.start {
                _ if st.state.restarted => st.state.end,
                LogStart::Boot => Some(0),
                LogStart::State => st.state.end,
            };
            let behind_exits = base.is_some_and(|base| exit.saturating_sub(st.acked.max(base)) > config.max_lag_exits);
            let behind_bytes = st.unacked_bytes() > config.max_lag_bytes;
            if !behind_exits && !behind_bytes {
                return;
            }
            st = self.shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Record bytes handed over and not yet acknowledged.
    #[cfg(test)]
    pub(crate) fn unacked_bytes(&self) -> u64 {
        lock(&self.shared.state).unacked_bytes()
    }

    /// The most record bytes ever handed over and not acknowledged at once.
    #[cfg(test)]
    pub(crate) fn peak_unacked_bytes(&self) -> u64 {
        lock(&self.shared.state).peak_unacked_bytes
    }

    /// The most state bytes ever handed over and not consumed at once.
    #[cfg(test)]
    pub(crate) fn peak_unconsumed_state(&self) -> u64 {
        lock(&self.shared.state).state.peak_unconsumed
    }

    /// The exit at which the backup reported its replay diverged (a
    /// `Resync`), once: the VMM answers with
    /// [`restart_state`](Self::restart_state) and a whole state.
    pub fn take_resync_request(&self) -> Option<u64> {
        lock(&self.shared.state).resync_requested.take()
    }

    /// Repair: the state stream starts again on this link (any link, also
    /// one whose log started at boot), replacing the backup's state. The
    /// VMM appends no record until [`end_state`](Self::end_state); records
    /// handed over before this call and not yet sent are dropped (the new
    /// state covers them). Send the state with
    /// [`send_state`](Self::send_state) or a [`StateSender`] as for a
    /// joining backup. Throttling is off until the state ends.
    pub fn restart_state(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.state = StateOut { restart: true, restarted: true, ..StateOut::default() };
            st.resyncing = true;
        }
        self.shared.changed.notify_all();
        self.shared.wake.notify_one();
    }

    /// Why the backup was lost (heartbeat timeout, connection closed,
    /// protocol error), or `None` while it is connected.
    pub fn backup_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }

    /// The guest has ended: sends what is buffered (the caller has appended
    /// the End record and called `passed`), then waits until the backup
    /// acknowledged everything or `timeout` passes or the backup is lost;
    /// then closes. Returns whether everything was acknowledged (never, on a
    /// joining link whose state was not ended).
    pub fn finish(mut self, timeout: Duration) -> bool {
        self.hand_over(None);
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let (records, watermark) = (st.queued, st.watermark);
        // Records thrown away after a loss were never acknowledged; a
        // backup with half a state has nothing to replay.
        let state_complete = self.shared.start == LogStart::Boot || st.state.end.is_some();
        let mut all_acked = !self.discarded && state_complete;
        while all_acked {
            // Checked before `lost`: a backup that acked everything and then
            // went away still got everything.
            if st.records_acked >= records && st.acked >= watermark {
                break;
            }
            let now = Instant::now();
            if st.lost.is_some() || now >= deadline {
                all_acked = false;
                break;
            }
            st = match self.shared.changed.wait_timeout(st, deadline - now) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        if all_acked {
            // Say goodbye so the backup tells a finished primary from a dead one.
            st.closing = true;
            drop(st);
            self.shared.wake.notify_one();
        } else {
            drop(st);
            self.shared.stop.notify_one();
        }
        self.join();
        all_acked
    }

    /// Moves the local buffer (and the watermark, if any) to the network
    /// thread. Only a short lock: never waits for the network.
    fn hand_over(&mut self, watermark: Option<u64>) {
        if self.shared.lost.load(Ordering::Relaxed) {
            self.discard(watermark);
            return;
        }
        if self.buffer.is_empty() && watermark.is_none() {
            return;
        }
        {
            let mut st = lock(&self.shared.state);
            if st.lost.is_some() {
                drop(st);
                self.discard(watermark);
                return;
            }
            st.queued += self.buffer.len() as u64;
            st.queued_bytes += std::mem::take(&mut self.buffer_bytes);
            #[cfg(test)]
            {
                st.peak_unacked_bytes = st.peak_unacked_bytes.max(st.unacked_bytes());
            }
            if st.pending.is_empty() {
                // The common case: swap, so neither vector reallocates.
                std::mem::swap(&mut st.pending, &mut self.buffer);
            } else {
                st.pending.append(&mut self.buffer);
            }
            if let Some(exit) = watermark {
                st.watermark = st.watermark.max(exit);
                self.handed_watermark = st.watermark;
            }
            st.handed_at = Instant::now();
        }
        self.shared.wake.notify_one();
    }

    /// The backup is gone: what would have been handed over is dropped.
    fn discard(&mut self, watermark: Option<u64>) {
        if !self.buffer.is_empty() || watermark.is_some_and(|w| w > self.handed_watermark) {
            self.discarded = true;
        }
        self.buffer.clear();
        self.buffer_bytes = 0;
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // Dropped from the ack callback: joining ourselves would hang;
            // the thread ends on its own once `stop` is seen.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for PrimaryLink {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.stop.notify_one();
            self.join();
        }
    }
}

impl RecordSink for PrimaryLink {
    fn append(&mut self, record: &Record) -> io::Result<()> {
        if !self.shared.lost.load(Ordering::Relaxed) {
            self.buffer_bytes += weight(record);
            self.buffer.push(record.clone());
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hand_over(None);
        Ok(())
    }

    fn passed(&mut self, exit: u64) -> io::Result<()> {
        self.hand_over(Some(exit));
        Ok(())
    }
}
