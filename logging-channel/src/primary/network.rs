//! The link's network thread: one tokio task that writes the state, the
//! batches of records (natural batching, within the size limits) and
//! heartbeats to the backup, and reads its acks, StateAcks and Resync,
//! until the backup is lost or the link closed.

use super::link::{Acked, BatchTimes};
use super::state_sender::carries_state;
use super::{weight, Shared};
use crate::wire::{self, BusyPoll, Bytes, Message, Watched};
use crate::{lock, ChannelCounters, ChannelError, LogStart};
use replay::Record;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncWriteExt, BufReader};
// The transport's halves (plaintext or TLS) under the names the code has
// always used for them.
use crate::transport::{ReadHalf as OwnedReadHalf, Stream, WriteHalf as OwnedWriteHalf};
use tracing::{info, warn};

/// Most records in one batch: keeps a frame far below [`crate::MAX_FRAME`]
/// for ordinary records and bounds how long one write holds up acks of the
/// rest.
const MAX_BATCH_RECORDS: usize = 16 * 1024;
/// Most record bytes (by [`weight`]) in one batch, unless a single record
/// is larger: a frame takes 84 ms at 100 Mbit/s.
const MAX_BATCH_BYTES: u64 = 1 << 20;

/// A batch sent and not yet acknowledged.
struct Sent {
    seq: u64,
    watermark: u64,
    /// Records sent in total, up to and including this batch.
    records: u64,
    /// Their bytes, by [`weight`].
    bytes: u64,
    times: BatchTimes,
}

/// What the network thread's reader and writer share (one task: no lock).
#[derive(Default)]
struct Local {
    /// Batches sent and not yet acknowledged, oldest first.
    in_flight: RefCell<VecDeque<Sent>>,
    /// State bytes written to the socket (or being written), in total.
    state_sent: Cell<u64>,
    /// The batches the latest ack retired (reused: no allocation per ack).
    retired: RefCell<Vec<BatchTimes>>,
}

/// The network thread's body: runs until the backup is lost, the link is
/// dropped, or `finish` had Done sent.
pub(super) async fn run(stream: Stream, shared: Arc<Shared>) {
    let fd = stream.as_raw_fd();
    let (rd, wr) = stream.into_split();
    let local = Local::default();
    let outcome = tokio::select! {
        r = read_acks(rd, fd, &shared, &local) => r,
        r = write_batches(wr, &shared, &local) => r,
        _ = shared.stop.notified() => Ok(()),
    };
    match outcome {
        // We closed the link ourselves (finish or drop): nobody is left to
        // hold outputs, so the ack callback is not called.
        Ok(()) => lose(&shared, "the link was closed".to_string(), false),
        Err(e) => {
            warn!(peer = %shared.peer, "lost the backup: {e}");
            lose(&shared, format!("lost the backup at {}: {e}", shared.peer), true);
        }
    }
}

/// Marks the backup lost and wakes everyone who waits on it.
fn lose(shared: &Shared, reason: String, call_back: bool) {
    let callback = {
        let mut st = lock(&shared.state);
        if st.lost.is_some() {
            return;
        }
        st.lost = Some(reason);
        st.pending = Vec::new();
        st.state.pieces = VecDeque::new();
        shared.lost.store(true, Ordering::Relaxed);
        st.on_ack.clone()
    };
    shared.changed.notify_all();
    if let Some(callback) = callback.filter(|_| call_back) {
        callback(&Acked::lost());
    }
}

async fn read_acks(rd: OwnedReadHalf, fd: RawFd, shared: &Shared, local: &Local) -> Result<(), ChannelError> {
    // An ack is due while batches are in flight; spinning for it is worth
    // it until the vCPU thread hands over more to send.
    let busy = BusyPoll {
        fd,
        budget: shared.config.busy_poll_budget(),
        worth_it: Box::new(|| {
            !local.in_flight.borrow().is_empty() && shared.state.try_lock().is_ok_and(|st| st.pending.is_empty())
        }),
    };
    let watched = Watched::new(rd, shared.config.heartbeat_timeout, "the backup")
        .counting_missed(shared.config.counters.clone(), shared.config.heartbeat_interval());
    let mut rd = BufReader::new(watched.busy_polling(busy));
    let mut buf = Vec::new();
    loop {
        let msg = wire::read_frame(&mut rd, &mut buf).await?;
        match msg {
            Message::Heartbeat => {}
            Message::Ack { seq, watermark } => {
                let received = Instant::now();
                let mut retired = local.retired.borrow_mut();
                retired.clear();
                let (records, bytes) = acknowledge(&local.in_flight, seq, watermark, &mut retired)?;
                let (acked, callback) = {
                    let mut st = lock(&shared.state);
                    st.acked = st.acked.max(watermark);
                    st.records_acked = st.records_acked.max(records);
                    st.bytes_acked = st.bytes_acked.max(bytes);
                    (st.acked, st.on_ack.clone())
                };
                shared.changed.notify_all();
                if let Some(callback) = callback {
                    callback(&Acked { watermark: acked, batches: &retired, received });
                }
            }
            Message::Resync { exit } => {
                warn!(peer = %shared.peer, exit, "the backup diverged and asks for the whole state");
                {
                    let mut st = lock(&shared.state);
                    st.resync_requested = Some(exit);
                    st.resyncing = true;
                }
                shared.changed.notify_all();
            }
            Message::StateAck { consumed } => {
                if !carries_state(shared) {
                    return Err(ChannelError::Protocol("a StateAck from the backup, but no state was sent".into()));
                }
                let sent = local.state_sent.get();
                {
                    let mut st = lock(&shared.state);
                    if consumed > sent || consumed < st.state.consumed {
                        return Err(ChannelError::Protocol(format!(
                            "the backup acknowledged {consumed} state bytes, after {}, of {sent} sent",
                            st.state.consumed
                        )));
                    }
                    st.state.consumed = consumed;
                }
                shared.changed.notify_all();
            }
            other => return Err(ChannelError::Protocol(format!("unexpected {} from the backup", other.kind()))),
        }
    }
}

/// Retires the batches an Ack covers (their times go to `retired`); returns
/// the records and their bytes acknowledged in total. An Ack for a batch never sent (or with another
/// watermark) is a protocol error: trusting it could release outputs the
/// backup lacks.
fn acknowledge(
    in_flight: &RefCell<VecDeque<Sent>>,
    seq: u64,
    watermark: u64,
    retired: &mut Vec<BatchTimes>,
) -> Result<(u64, u64), ChannelError> {
    let mut in_flight = in_flight.borrow_mut();
    while let Some(sent) = in_flight.pop_front() {
        if sent.seq > seq {
            in_flight.push_front(sent);
            break;
        }
        retired.push(sent.times);
        if sent.seq == seq {
            if sent.watermark != watermark {
                return Err(ChannelError::Protocol(format!(
                    "the backup acknowledged batch {seq} with watermark {watermark}, but it was sent with {}",
                    sent.watermark
                )));
            }
            return Ok((sent.records, sent.bytes));
        }
    }
    Err(ChannelError::Protocol(format!("the backup acknowledged batch {seq}, which is not awaiting an ack")))
}

async fn write_batches(mut wr: OwnedWriteHalf, shared: &Shared, local: &Local) -> Result<(), ChannelError> {
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outgoing: VecDeque<Record> = VecDeque::new();
    let (mut seq, mut sent_records, mut sent_bytes, mut sent_watermark) = (0u64, 0u64, 0u64, 0u64);
    let (mut sent_released, mut sent_disk_applied) = (0u64, 0u64);
    // A joining link sends its state first; records wait behind it.
    let mut state_open = shared.start == LogStart::State;
    // Set once the state ended: the exit no record may be at or before.
    let mut state_exit = None;
    let mut wrote = false;
    loop {
        let (watermark, handed, (released, disk_applied), closing, piece, state_end, restart) = {
            let mut st = lock(&shared.state);
            outgoing.extend(std::mem::take(&mut st.pending));
            let restart = std::mem::take(&mut st.state.restart);
            let (piece, end) =
                if state_open && !restart { (st.state.pieces.pop_front(), st.state.end) } else { (None, None) };
            (st.watermark, st.handed_at, (st.released, st.disk_applied), st.closing, piece, end, restart)
        };
        if restart {
            // Repair: records not yet sent are older than the new state,
            // which covers them; they count as sent, so that the acks after
            // the state cover their bytes.
            sent_records += outgoing.len() as u64;
            sent_bytes += outgoing.drain(..).map(|r| weight(&r)).sum::<u64>();
            local.state_sent.set(0);
            state_open = true;
            state_exit = None;
            wire::write_message(&mut wr, &Message::StateRestart, "restarting the state stream").await?;
            info!(peer = %shared.peer, "state stream restarted (repair)");
            wrote = true;
            continue;
        }
        if state_open {
            if let Some(piece) = piece {
                let offset = local.state_sent.get();
                let frame = wire::encode(&Message::State { offset, data: Bytes(Cow::Borrowed(&piece)) })?;
                // Counted before the write: the backup may acknowledge the
                // piece as soon as its last byte is out.
                local.state_sent.set(offset + piece.len() as u64);
                drop(piece);
                wr.write_all(&frame).await.map_err(|e| ChannelError::io("sending the state to the backup", e))?;
                ChannelCounters::add(&shared.config.counters.state_bytes_sent, frame.len() as u64);
                wrote = true;
                continue;
            }
            if let Some(exit) = state_end {
                // `end_state` comes after every piece: all of them are out.
                let len = local.state_sent.get();
                wire::write_message(&mut wr, &Message::StateEnd { exit, len }, "sending the state's end to the backup")
                    .await?;
                info!(peer = %shared.peer, exit, len, "state sent");
                state_open = false;
                state_exit = Some(exit);
                wrote = true;
                continue;
            }
        } else if !outgoing.is_empty()
            || watermark > sent_watermark
            || released > sent_released
            || disk_applied > sent_disk_applied
        {
            if let (Some(exit), Some(first)) = (state_exit, outgoing.front()) {
                if first.position.exit <= exit {
                    return Err(ChannelError::Misuse(format!(
                        "a record at exit {} follows the state taken at exit {exit}, which covers it",
                        first.position.exit
                    )));
                }
                state_exit = None;
            }
            // Everything that accumulated while the previous write was in
            // flight goes out now, in as few batches as the size limits
            // allow: natural batching, no timer.
            let mut n = 0;
            let mut bytes = 0;
            for record in outgoing.iter().take(MAX_BATCH_RECORDS) {
                let w = weight(record);
                if n > 0 && bytes + w > MAX_BATCH_BYTES {
                    break;
                }
                n += 1;
                bytes += w;
            }
            let (frame, batch_watermark) = loop {
                // When records stay behind, the watermark may only claim the
                // exits before the first of them.
                let batch_watermark = match outgoing.get(n) {
                    Some(next) => watermark.min(next.position.exit.saturating_sub(1)),
                    None => watermark,
                }
                .max(sent_watermark);
                let records = &outgoing.make_contiguous()[..n];
                let msg = Message::Batch {
                    seq: seq + 1,
                    watermark: batch_watermark,
                    released,
                    disk_applied,
                    records: Cow::Borrowed(records),
                };
                match wire::encode(&msg) {
                    Ok(frame) => break (frame, batch_watermark),
                    // Over the frame limit (huge records): split.
                    Err(_) if n > 1 => n /= 2,
                    Err(e) => return Err(e),
                }
            };
            seq += 1;
            sent_records += n as u64;
            sent_bytes += outgoing.drain(..n).map(|r| weight(&r)).sum::<u64>();
            wr.write_all(&frame).await.map_err(|e| ChannelError::io("sending to the backup", e))?;
            ChannelCounters::add(&shared.config.counters.records_sent, n as u64);
            ChannelCounters::add(&shared.config.counters.log_bytes_sent, frame.len() as u64);
            // In flight once written: the ack reader runs on this thread, so
            // no ack for it can be read before this.
            local.in_flight.borrow_mut().push_back(Sent {
                seq,
                watermark: batch_watermark,
                records: sent_records,
                bytes: sent_bytes,
                times: BatchTimes { watermark: batch_watermark, handed, sent: Instant::now() },
            });
            sent_watermark = batch_watermark;
            sent_released = released;
            sent_disk_applied = disk_applied;
            wrote = true;
            continue;
        }
        if closing {
            // The backup has acknowledged everything; a backup that cannot
            // take a last small frame within a heartbeat timeout is gone
            // anyway.
            let limit = shared.config.heartbeat_timeout;
            let goodbye = async {
                wire::write_message(&mut wr, &Message::Done, "sending Done to the backup").await?;
                wr.shutdown().await.map_err(|e| ChannelError::io("closing the connection", e))
            };
            if let Err(e) = tokio::time::timeout(limit, goodbye).await.unwrap_or(Ok(())) {
                warn!(peer = %shared.peer, "saying goodbye to the backup: {e}");
            }
            return Ok(());
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = ticker.tick() => {
                if !wrote {
                    wire::write_message(&mut wr, &Message::Heartbeat, "sending a heartbeat to the backup").await?;
                }
                wrote = false;
            }
        }
    }
}
