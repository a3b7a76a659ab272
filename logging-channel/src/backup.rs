//! The backup's end: connecting to the primary, receiving and acknowledging
//! its records, handing them to the replayer.

use crate::wire::{self, Message};
use crate::{lock, new_runtime, ChannelConfig, ChannelError};
use replay::{Header, LogError, Record, RecordSource};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

/// How often a refused connection is retried while the primary is not yet
/// listening.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

struct Shared {
    state: Mutex<State>,
    /// Signalled when records arrive or the primary is lost.
    arrived: Condvar,
    /// Ends the network thread (the link was dropped).
    stop: Notify,
}

struct State {
    /// Received records not yet handed out.
    queue: VecDeque<Record>,
    /// The primary's latest watermark.
    watermark: u64,
    /// The primary's latest output-release position.
    released: u64,
    lost: Option<String>,
}

/// The backup's link to its primary: a [`RecordSource`] of the primary's
/// records. A background thread receives and acknowledges them.
pub struct BackupLink {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BackupLink {
    /// Connects to the primary at `addr`, retrying every 50 ms while nothing
    /// listens there (the backup may start first) until `connect_timeout`
    /// elapses, and does the handshake: the primary's header must match
    /// `ours` (image and configuration). Returns the link and the primary's
    /// header, whose `wall_clock_base_ns` the backup must use. Must not be
    /// called from within an async runtime (it runs its own).
    pub fn connect(
        addr: &str,
        ours: &Header,
        config: &ChannelConfig,
        connect_timeout: Duration,
    ) -> Result<(BackupLink, Header), ChannelError> {
        let runtime = new_runtime()?;
        let (stream, peer, header) = runtime.block_on(async {
            let deadline = Instant::now() + connect_timeout;
            let (mut stream, peer) = connect_retrying(addr, deadline).await?;
            // A primary that is still starting up may have bound its
            // listener without accepting yet: its preamble may come as late
            // as the connect deadline.
            let limit = config.handshake_timeout().max(deadline.saturating_duration_since(Instant::now()));
            let header = match tokio::time::timeout(limit, handshake(&mut stream, ours)).await {
                Ok(header) => header?,
                Err(_) => {
                    return Err(ChannelError::Timeout(format!(
                        "the primary at {peer} sent no handshake within {limit:?}"
                    )))
                }
            };
            Ok((stream, peer, header))
        })?;
        info!(%peer, "connected to the primary");
        let shared = Arc::new(Shared {
            state: Mutex::new(State { queue: VecDeque::new(), watermark: 0, released: 0, lost: None }),
            arrived: Condvar::new(),
            stop: Notify::new(),
        });
        let for_thread = shared.clone();
        let config = config.clone();
        let thread = std::thread::Builder::new()
            .name("ftvmm-lc-backup".into())
            .spawn(move || runtime.block_on(run(stream, peer, for_thread, config)))
            .map_err(|e| ChannelError::io("starting the network thread", e))?;
        Ok((BackupLink { shared, thread: Some(thread) }, header))
    }

    /// The latest output-release position the primary reported: outputs at
    /// positions up to it have left the primary.
    pub fn released(&self) -> u64 {
        lock(&self.shared.state).released
    }

    /// Why the primary was lost, or `None` while it is alive.
    pub fn primary_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }
}

impl Drop for BackupLink {
    fn drop(&mut self) {
        self.shared.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl RecordSource for BackupLink {
    /// Hands out received records in order, blocking until one arrives.
    /// Returns `Ok(None)` once the primary is lost (heartbeat timeout, EOF,
    /// error, or the primary said Done) and every record received before
    /// was handed out.
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(record) = st.queue.pop_front() {
                return Ok(Some(record));
            }
            if st.lost.is_some() {
                return Ok(None);
            }
            st = self.shared.arrived.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Non-blocking: true iff no received record is waiting and the
    /// primary's latest watermark has reached `exit`.
    fn passed(&mut self, exit: u64) -> Result<bool, LogError> {
        let st = lock(&self.shared.state);
        Ok(st.queue.is_empty() && st.watermark >= exit)
    }
}

/// Connects, retrying while the primary is not listening yet.
async fn connect_retrying(addr: &str, deadline: Instant) -> Result<(TcpStream, SocketAddr), ChannelError> {
    loop {
        let err = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let peer = stream.peer_addr().map_err(|e| ChannelError::io("reading the primary's address", e))?;
                return Ok((stream, peer));
            }
            Ok(Err(e)) if retryable(&e) => e,
            Ok(Err(e)) => return Err(ChannelError::io(format!("connecting to the primary at {addr}"), e)),
            Err(_) => return Err(ChannelError::Timeout(format!("connecting to the primary at {addr}"))),
        };
        if Instant::now() + CONNECT_RETRY >= deadline {
            return Err(ChannelError::Timeout(format!(
                "connecting to the primary at {addr}: nothing accepted the connection ({err})"
            )));
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::TimedOut
    )
}

/// The backup's half of the handshake: preamble out, the primary's
/// preamble and Hello in, Welcome or Reject out.
async fn handshake(stream: &mut TcpStream, ours: &Header) -> Result<Header, ChannelError> {
    stream.set_nodelay(true).map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    stream.write_all(&wire::preamble()).await.map_err(|e| ChannelError::io("sending the handshake", e))?;
    wire::read_preamble(stream).await?;
    // No BufReader: it could swallow the first batch, which the streaming
    // phase's reader must see.
    let header = match wire::read_frame(stream, &mut Vec::new()).await? {
        Message::Hello { header } => header,
        other => return Err(ChannelError::Protocol(format!("expected Hello, got {}", other.kind()))),
    };
    // The primary's header is the log's: it is authoritative.
    if let Err(reason) = header.check_matches(ours) {
        let reject = Message::Reject { reason: reason.clone() };
        // Best effort: the primary is told why, but we fail either way.
        if wire::write_message(stream, &reject, "sending Reject").await.is_ok() {
            let _ = stream.shutdown().await;
        }
        return Err(ChannelError::Mismatch(reason));
    }
    wire::write_message(stream, &Message::Welcome, "sending Welcome").await?;
    Ok(header)
}

/// The network thread's body: runs until the primary is lost or the link
/// is dropped.
async fn run(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, config: ChannelConfig) {
    let (rd, wr) = stream.into_split();
    let (acks, to_ack) = watch::channel(None);
    let outcome = tokio::select! {
        r = read_batches(rd, &shared, &config, acks) => r,
        r = write_acks(wr, &config, to_ack) => r,
        _ = shared.stop.notified() => Ok("the link was closed".to_string()),
    };
    let reason = match outcome {
        Ok(reason) => {
            info!(%peer, "{reason}");
            reason
        }
        Err(e) => {
            warn!(%peer, "lost the primary: {e}");
            format!("lost the primary at {peer}: {e}")
        }
    };
    {
        let mut st = lock(&shared.state);
        st.lost.get_or_insert(reason);
    }
    shared.arrived.notify_all();
}

/// Receives batches and queues their records; returns why the primary
/// ended when it said Done.
async fn read_batches(
    rd: OwnedReadHalf,
    shared: &Shared,
    config: &ChannelConfig,
    acks: watch::Sender<Option<(u64, u64)>>,
) -> Result<String, ChannelError> {
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let limit = config.heartbeat_timeout;
    let mut expected = 1u64;
    loop {
        let msg = match tokio::time::timeout(limit, wire::read_frame(&mut rd, &mut buf)).await {
            Ok(msg) => msg?,
            Err(_) => {
                return Err(ChannelError::Timeout(format!(
                    "no traffic from the primary for {limit:?} (heartbeat timeout)"
                )))
            }
        };
        match msg {
            Message::Batch { seq, watermark, released, records } => {
                if seq != expected {
                    return Err(ChannelError::Protocol(format!("batch {seq} arrived where batch {expected} was due")));
                }
                expected += 1;
                {
                    let mut st = lock(&shared.state);
                    st.queue.extend(records.into_owned());
                    st.watermark = st.watermark.max(watermark);
                    st.released = st.released.max(released);
                }
                shared.arrived.notify_all();
                // Acked on receipt, before replay: the output rule only
                // needs the backup to hold the log, not to have run it.
                acks.send_replace(Some((seq, watermark)));
            }
            Message::Heartbeat => {}
            Message::Done => return Ok("the primary ended the run".to_string()),
            other => return Err(ChannelError::Protocol(format!("unexpected {} from the primary", other.kind()))),
        }
    }
}

/// Sends the latest ack whenever there is a new one (acks that pile up
/// while a write is in flight collapse into the newest, which covers them),
/// and a heartbeat when nothing else went out for a while.
async fn write_acks(
    mut wr: OwnedWriteHalf,
    config: &ChannelConfig,
    mut to_ack: watch::Receiver<Option<(u64, u64)>>,
) -> Result<String, ChannelError> {
    let mut ticker = tokio::time::interval(config.heartbeat_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wrote = false;
    loop {
        tokio::select! {
            changed = to_ack.changed() => {
                if changed.is_err() {
                    // The reader ended; its outcome is the link's.
                    std::future::pending::<()>().await;
                }
                let ack = *to_ack.borrow_and_update();
                if let Some((seq, watermark)) = ack {
                    wire::write_message(&mut wr, &Message::Ack { seq, watermark }, "sending an ack to the primary")
                        .await?;
                    wrote = true;
                }
            }
            _ = ticker.tick() => {
                if !wrote {
                    wire::write_message(&mut wr, &Message::Heartbeat, "sending a heartbeat to the primary").await?;
                }
                wrote = false;
            }
        }
    }
}
