//! Transport security of the ftdisk protocol: mutual TLS (rustls, blocking)
//! around each connection, and the server's authorization of its clients.
//!
//! With credentials ([`credentials::Tls`]), both sides present a certificate
//! and accept only a peer whose certificate chains to the CA; the client also
//! checks that the server's names the address it connects to. The TLS
//! handshake comes first on a connection, then the protocol's own preamble.
//! Every read and write, the handshake's included, goes through a
//! [`Timed`] socket, so the deadlines of the plaintext protocol hold on TLS.
//!
//! Authorization ([`Access`]): a client's identity is its certificate's
//! subject common name. A server with an allow list lets only the names on
//! it read, write, flush or test-and-set; other clients get
//! [`crate::DiskError::Forbidden`] and nothing is executed (they may still
//! ask what the server serves and who owns the record). A server without a
//! list lets every certificate from its CA do everything.

use crate::timed::Timed;
use credentials::rustls::{self, ClientConnection, ConnectionCommon, ServerConnection, SideData, StreamOwned};
use credentials::Tls;
use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::Path;

/// Who may use a TLS server: its credentials, and the certificate names
/// allowed to read and change the disk and the record (`None`: every
/// certificate from the CA).
#[derive(Clone, Debug)]
pub struct Access {
    pub tls: Tls,
    pub allowed: Option<BTreeSet<String>>,
}

impl Access {
    /// True if a peer that presented a certificate named `name` may read,
    /// write, flush and test-and-set.
    pub(crate) fn allows(&self, name: Option<&str>) -> bool {
        match (&self.allowed, name) {
            (None, _) => true,
            (Some(allowed), Some(name)) => allowed.contains(name),
            (Some(_), None) => false,
        }
    }
}

/// Reads a file of allowed certificate names: one a line; blank lines and
/// lines starting with `#` are ignored, and so is the space around a name.
pub fn read_allow_file(path: &Path) -> Result<BTreeSet<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// A connection, plaintext or TLS, over a deadline-bounded socket.
#[derive(Debug)]
pub(crate) enum Conn<C, S: Borrow<TcpStream>> {
    Plain(Timed<S>),
    Tls(Box<StreamOwned<C, Timed<S>>>),
}

/// A server's side of a connection.
pub(crate) type ServerConn<'a> = Conn<ServerConnection, &'a TcpStream>;
/// A client's side of a connection.
pub(crate) type ClientConn = Conn<ClientConnection, TcpStream>;

impl<C, S: Borrow<TcpStream>> Conn<C, S> {
    pub(crate) fn timed(&mut self) -> &mut Timed<S> {
        match self {
            Conn::Plain(timed) => timed,
            Conn::Tls(tls) => &mut tls.sock,
        }
    }
}

/// Drives a TLS handshake to its end within the socket's deadline.
fn handshake<C, D, S>(mut conn: C, mut sock: Timed<S>) -> io::Result<Box<StreamOwned<C, Timed<S>>>>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
    S: Borrow<TcpStream>,
{
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    // What the handshake left to send (a client's Finished).
    while conn.wants_write() {
        conn.complete_io(&mut sock)?;
    }
    Ok(Box::new(StreamOwned::new(conn, sock)))
}

/// The server's side: with `tls`, the TLS handshake (which fails for a peer
/// without a certificate from the CA or one that does not speak TLS), then
/// the peer's certificate name; without, the connection as it is and no name.
pub(crate) fn accept<'a>(
    sock: Timed<&'a TcpStream>,
    tls: Option<&Tls>,
) -> io::Result<(ServerConn<'a>, Option<String>)> {
    let Some(tls) = tls else {
        return Ok((Conn::Plain(sock), None));
    };
    let conn = ServerConnection::new(tls.server_config()).map_err(io::Error::other)?;
    let stream = handshake(conn, sock)?;
    let name = credentials::peer_name(stream.conn.peer_certificates());
    Ok((Conn::Tls(stream), name))
}

/// The client's side: with `tls`, the TLS handshake with the server at
/// `addr`, whose certificate must chain to the CA and name the host of
/// `addr`.
pub(crate) fn connect(sock: Timed<TcpStream>, addr: &str, tls: Option<&Tls>) -> Result<ClientConn, TlsFailure> {
    let Some(tls) = tls else {
        return Ok(Conn::Plain(sock));
    };
    let name = credentials::server_name(addr).map_err(TlsFailure::Refused)?;
    let conn = ClientConnection::new(tls.client_config(), name).map_err(|e| TlsFailure::Refused(e.to_string()))?;
    handshake(conn, sock).map(Conn::Tls).map_err(|e| {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            // A certificate refused either way, or a peer that is not TLS: the
            // same again would fail the same way.
            Some(tls_error) => TlsFailure::Refused(tls_error.to_string()),
            None => TlsFailure::Connection(e),
        }
    })
}

/// The TLS refusal behind a failed read or write, if that is what it was
/// (an alert from the peer, a certificate it sent that we refuse).
pub(crate) fn tls_refusal(e: &crate::proto::WireError) -> Option<String> {
    match e {
        crate::proto::WireError::Io { source, .. } => {
            source.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(|e| e.to_string())
        }
        _ => None,
    }
}

/// Why a client's TLS handshake failed.
pub(crate) enum TlsFailure {
    /// The peer or we refused the other's certificate, or it is not a TLS
    /// server: trying again will not help.
    Refused(String),
    /// The connection failed or timed out during the handshake.
    Connection(io::Error),
}

impl<C, D, S> Read for Conn<C, S>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
    S: Borrow<TcpStream>,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(timed) => timed.read(buf),
            Conn::Tls(tls) => tls.read(buf),
        }
    }
}

impl<C, D, S> Write for Conn<C, S>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
    S: Borrow<TcpStream>,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(timed) => timed.write(buf),
            Conn::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(timed) => timed.flush(),
            Conn::Tls(tls) => tls.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_files_hold_one_name_a_line() {
        let path = std::env::temp_dir().join(format!("ftdisk-allow-{}", std::process::id()));
        std::fs::write(&path, "# the pair\nprimary\n  backup  \n\n#intruder\n").unwrap();
        let names = read_allow_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(names, BTreeSet::from(["primary".to_string(), "backup".to_string()]));
    }
}
