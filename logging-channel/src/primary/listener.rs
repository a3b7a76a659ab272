//! Where the primary waits for its backups: the listening socket, the
//! accept loop (handshakes run concurrently, a failed one is reported and
//! the wait goes on), and the primary's half of the handshake.

use super::PrimaryLink;
use crate::transport::{self, Stream};
use crate::wire::{self, Message};
use crate::{new_runtime, ChannelConfig, ChannelCounters, ChannelError, LogStart};
use replay::Header;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Where the primary waits for its backup.
pub struct PrimaryListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl PrimaryListener {
    /// Binds the listening socket (`"127.0.0.1:0"` picks a free port).
    pub fn bind(addr: &str) -> Result<Self, ChannelError> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| ChannelError::io(format!("binding the logging channel to {addr}"), e))?;
        // tokio takes the socket over in `accept`, and requires it non-blocking.
        listener.set_nonblocking(true).map_err(|e| ChannelError::io("configuring the listening socket", e))?;
        let addr = listener.local_addr().map_err(|e| ChannelError::io("reading the listening address", e))?;
        Ok(PrimaryListener { listener, addr })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until a backup has connected and completed the handshake, for
    /// a primary that boots with its backup: the log starts at the guest's
    /// boot ([`LogStart::Boot`]). Peers that fail the handshake (garbage,
    /// wrong version, rejection, silence) are reported with `tracing::warn`
    /// and the wait goes on. Handshakes run concurrently, so a silent peer
    /// does not hold up a good backup that connects after it. Must not be
    /// called from within an async runtime (it runs its own).
    ///
    /// A listener serves any number of backups one after the other: accept
    /// one, lose it, accept the next (from any thread: the listener is
    /// `Send` and `Sync`). Connections that arrive while nobody accepts wait
    /// in the socket's backlog until the next call.
    pub fn accept(&self, header: &Header, config: &ChannelConfig) -> Result<PrimaryLink, ChannelError> {
        self.accept_as(header, config, LogStart::Boot)
    }

    /// Like [`accept`](Self::accept), for a VM that is already running: the
    /// backup is told that a state transfer precedes the log
    /// ([`LogStart::State`]). Send the state with
    /// [`PrimaryLink::send_state`] and [`PrimaryLink::end_state`]; records go
    /// out after it.
    pub fn accept_joining(&self, header: &Header, config: &ChannelConfig) -> Result<PrimaryLink, ChannelError> {
        self.accept_as(header, config, LogStart::State)
    }

    fn accept_as(&self, header: &Header, config: &ChannelConfig, start: LogStart) -> Result<PrimaryLink, ChannelError> {
        let runtime = new_runtime(config)?;
        let listener =
            self.listener.try_clone().map_err(|e| ChannelError::io("duplicating the listening socket", e))?;
        let (stream, peer) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| ChannelError::io("registering the listening socket", e))?;
            accept_loop(&listener, header, config, start).await
        })?;
        info!(%peer, ?start, "backup connected");
        PrimaryLink::start(runtime, stream, peer, config.clone(), start)
    }
}

async fn accept_loop(
    listener: &tokio::net::TcpListener,
    header: &Header,
    config: &ChannelConfig,
    start: LogStart,
) -> Result<(Stream, SocketAddr), ChannelError> {
    let header = Arc::new(header.clone());
    let limit = config.handshake_timeout();
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let header = header.clone();
                    let tls = config.tls.clone();
                    handshakes.spawn(async move {
                        let handshaking = handshake(stream, &header, start, tls.as_ref());
                        let outcome = match tokio::time::timeout(limit, handshaking).await {
                            Ok(outcome) => outcome,
                            Err(_) => Err(ChannelError::Timeout(format!("no handshake within {limit:?}"))),
                        };
                        (peer, outcome)
                    });
                }
                Err(e) if transient_accept_error(&e) => {
                    warn!("accepting a backup connection: {e}");
                    // Out of descriptors and the like: give it a moment
                    // rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(ChannelError::io("accepting a backup connection", e)),
            },
            Some(joined) = handshakes.join_next(), if !handshakes.is_empty() => match joined {
                Ok((peer, Ok(stream))) => return Ok((stream, peer)),
                Ok((peer, Err(e))) => {
                    ChannelCounters::add(&config.counters.peers_refused, 1);
                    warn!(%peer, "a backup connection failed the handshake, still waiting: {e}");
                }
                Err(e) => warn!("a backup handshake task failed: {e}"),
            },
        }
    }
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || matches!(e.raw_os_error(), Some(23 /* ENFILE */ | 24 /* EMFILE */ | 12 /* ENOMEM */ | 105 /* ENOBUFS */))
}

/// The primary's half of the handshake: preamble and Hello out, the
/// backup's preamble and verdict in.
async fn handshake(
    stream: TcpStream,
    header: &Header,
    start: LogStart,
    tls: Option<&credentials::Tls>,
) -> Result<Stream, ChannelError> {
    let mut stream = transport::accept(stream, tls).await?;
    stream.set_nodelay(true).map_err(|e| ChannelError::io("setting TCP_NODELAY", e))?;
    let mut hello = wire::preamble().to_vec();
    hello.extend(wire::encode(&Message::Hello { header: header.clone(), start })?);
    stream.write_all(&hello).await.map_err(|e| ChannelError::io("sending the handshake", e))?;
    wire::read_preamble(&mut stream).await?;
    // No BufReader: it could swallow the backup's first heartbeat, which
    // the streaming phase's reader must see.
    match wire::read_frame(&mut stream, &mut Vec::new()).await? {
        Message::Welcome => Ok(stream),
        Message::Reject { reason } => Err(ChannelError::Refused(reason)),
        other => Err(ChannelError::Protocol(format!("expected Welcome or Reject, got {}", other.kind()))),
    }
}
