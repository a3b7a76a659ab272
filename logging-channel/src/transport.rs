//! The logging channel's transport: a TCP connection, plaintext or inside
//! mutual TLS (rustls through tokio-rustls), as one stream type that the
//! handshake and the streaming code read and write without knowing which.
//!
//! This module owns the TLS handshakes of the channel, done on a fresh TCP
//! connection before the channel's own magic-and-version handshake:
//! [`accept`] on the primary's side (the TLS server, which requires a client
//! certificate from the CA), [`connect`] on the backup's (the TLS client,
//! which checks that the primary's certificate chains to the CA and names the
//! address it connected to). The credentials and their rules are the
//! `credentials` crate's.

use crate::ChannelError;
use credentials::Tls;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::info;

/// The read half of a [`Stream`].
pub(crate) type ReadHalf = tokio::io::ReadHalf<Stream>;
/// The write half of a [`Stream`].
pub(crate) type WriteHalf = tokio::io::WriteHalf<Stream>;

/// A logging-channel connection after its TLS handshake (if any).
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls {
        tls: Box<tokio_rustls::TlsStream<TcpStream>>,
        /// Bytes of the current write that rustls took but has not yet
        /// handed to the socket: the write is reported done only once they
        /// are out (see `poll_write`).
        unflushed: Option<usize>,
    },
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls { tls, .. } => tls.get_ref().0,
        }
    }

    /// The socket beneath any TLS layer (for the busy-poll's readiness check).
    pub(crate) fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.tcp().as_raw_fd()
    }

    pub(crate) fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp().set_nodelay(nodelay)
    }

    /// Splits the stream into halves that one task can read and write at
    /// once.
    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        tokio::io::split(self)
    }
}

fn handshake_failed(e: io::Error) -> ChannelError {
    ChannelError::Tls(e.to_string())
}

/// The primary's side: with `tls`, the TLS server handshake, which fails
/// for a peer without a certificate from the CA, or one that does not speak
/// TLS; without, the connection as it is.
pub(crate) async fn accept(tcp: TcpStream, tls: Option<&Tls>) -> Result<Stream, ChannelError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let peer = tcp.peer_addr().ok();
    let stream = tokio_rustls::TlsAcceptor::from(tls.server_config()).accept(tcp).await.map_err(handshake_failed)?;
    let name = credentials::peer_name(stream.get_ref().1.peer_certificates());
    info!(peer = ?peer, identity = name.as_deref().unwrap_or("?"), "TLS: the peer's certificate is from our CA");
    Ok(Stream::Tls { tls: Box::new(stream.into()), unflushed: None })
}

/// The backup's side: with `tls`, the TLS client handshake with the server
/// at `addr` (`host:port`), whose certificate must chain to the CA and name
/// `host`; without, the connection as it is.
pub(crate) async fn connect(tcp: TcpStream, addr: &str, tls: Option<&Tls>) -> Result<Stream, ChannelError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let name = credentials::server_name(addr).map_err(ChannelError::Tls)?;
    let stream =
        tokio_rustls::TlsConnector::from(tls.client_config()).connect(name, tcp).await.map_err(handshake_failed)?;
    Ok(Stream::Tls { tls: Box::new(stream.into()), unflushed: None })
}

impl AsyncRead for Stream {
    /// On TLS, a peer that goes away without a close_notify (its process
    /// was killed, its host died) ends the stream as a TCP peer's FIN does:
    /// rustls reports it as an `UnexpectedEof` error, read here as the end
    /// of the stream. Nothing is lost by that: the channel's own framing
    /// tells a clean end (the primary's `Done`) from one cut short, on TLS
    /// as on TCP, so the peer's death reads the same in both (`the peer
    /// closed the connection`, or `... in the middle of a frame`).
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls { tls, .. } => match ready!(Pin::new(&mut **tls).poll_read(cx, buf)) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
                read => Poll::Ready(read),
            },
        }
    }
}

impl AsyncWrite for Stream {
    /// On TLS, a write completes only when its bytes have left rustls for
    /// the socket. tokio-rustls alone may report bytes written that still
    /// sit in its buffer when the socket is full; nothing would push them
    /// out until the next write, and the channel's writers do not flush
    /// (on TCP a write is on its way as soon as it returns).
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls { tls, unflushed } => {
                let taken = match *unflushed {
                    Some(taken) => taken,
                    None => {
                        let taken = ready!(Pin::new(&mut **tls).poll_write(cx, buf))?;
                        *unflushed = Some(taken);
                        taken
                    }
                };
                ready!(Pin::new(&mut **tls).poll_flush(cx))?;
                *unflushed = None;
                Poll::Ready(Ok(taken))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls { tls, .. } => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls { tls, .. } => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
