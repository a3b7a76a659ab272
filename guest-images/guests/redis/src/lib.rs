//! The redis guest's connection handling: smoltcp TCP sockets on one side,
//! the `resp` engine on the other. `no_std`; the guest binary (main.rs)
//! adds the network card, the disk and the main loop.
//!
//! Host tests drive it through smoltcp over an in-memory wire, with
//! clients on a second interface. From `guest-images/guests`:
//!
//! ```text
//! cargo test -p redis --lib --target-dir target/host
//! ```
#![cfg_attr(not(test), no_std)]

use resp::{BlockDev, Engine, Sink, Status};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

/// The port Redis listens on.
pub const PORT: u16 = 6379;

/// A socket's transmit buffer as the engine's output.
pub struct SocketSink<'s, 'a>(pub &'s mut tcp::Socket<'a>);

impl Sink for SocketSink<'_, '_> {
    fn room(&self) -> usize {
        if self.0.may_send() {
            self.0.send_capacity() - self.0.send_queue()
        } else {
            0
        }
    }
    fn capacity(&self) -> usize {
        self.0.send_capacity()
    }
    fn put(&mut self, data: &[u8]) {
        // The engine never puts more than `room`, so this takes it all.
        let _ = self.0.send_slice(data);
    }
}

/// A new server socket: Nagle off (a reply goes out at once, not held back
/// for the ACK of the one before), listening on `port`.
pub fn listening_socket<'a>(rx: &'a mut [u8], tx: &'a mut [u8], port: u16) -> tcp::Socket<'a> {
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    socket.set_nagle_enabled(false);
    // A peer that goes silent — a half-open SYN, a client whose host died —
    // gives its slot back: keep-alive probes an idle connection every 10 s,
    // and 30 s without a packet from the peer aborts it (on the virtual
    // clock: a replay times out at the same points).
    socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(10)));
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(30)));
    let _ = socket.listen(port);
    socket
}

/// One connection slot: a socket that listens again once its connection
/// has closed, and the bytes it received that are not answered yet.
pub struct Conn<'b> {
    handle: SocketHandle,
    input: &'b mut [u8],
    len: usize,
    /// Closing: the last reply is queued, further input is ignored.
    closing: bool,
    /// What the last feed stopped at.
    last: Status,
}

impl<'b> Conn<'b> {
    /// A slot for the listening socket `handle`; `input` (as long as the
    /// engine's `max_request`) holds a request until it is complete.
    pub fn new(handle: SocketHandle, input: &'b mut [u8]) -> Self {
        Conn { handle, input, len: 0, closing: false, last: Status::NeedInput }
    }

    pub fn handle(&self) -> SocketHandle {
        self.handle
    }
}

/// What a round of [`serve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// It moved bytes: poll the stack again (to send them) before idling.
    Busy,
    /// Nothing to do until the network brings something.
    Idle,
    /// The disk failed: stop without letting this round's replies out.
    DiskFailed,
    /// A client asked for SHUTDOWN; the round's writes are committed.
    Shutdown,
}

/// One round over every connection: listen again where one closed, take
/// in what arrived, answer every complete command (stopping where the
/// transmit buffer has no room for the next reply), then commit the
/// round's writes, before the next poll of the stack can send any reply.
pub fn serve<D: BlockDev>(
    sockets: &mut SocketSet<'_>,
    engine: &mut Engine<'_, D>,
    conns: &mut [Conn<'_>],
    port: u16,
) -> Round {
    let mut busy = false;
    let mut shutdown = false;
    for conn in conns.iter_mut() {
        let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
        if !socket.is_open() {
            conn.len = 0;
            conn.closing = false;
            conn.last = Status::NeedInput;
            let _ = socket.listen(port);
            continue;
        }
        if matches!(socket.state(), tcp::State::Listen | tcp::State::SynReceived) {
            continue;
        }
        if conn.closing {
            // Whatever else the client sends is dropped.
            let _ = socket.recv(|bytes| (bytes.len(), ()));
            continue;
        }
        if conn.len < conn.input.len() && socket.can_recv() {
            if let Ok(n) = socket.recv_slice(&mut conn.input[conn.len..]) {
                conn.len += n;
                busy |= n > 0;
            }
        }
        if conn.len > 0 {
            let fed = engine.feed(&conn.input[..conn.len], &mut SocketSink(socket));
            if fed.consumed > 0 {
                conn.input.copy_within(fed.consumed..conn.len, 0);
                conn.len -= fed.consumed;
                busy = true;
            }
            conn.last = fed.status;
            match fed.status {
                Status::Close => {
                    conn.closing = true;
                    socket.close();
                    continue;
                }
                Status::Shutdown => shutdown = true,
                Status::NeedInput | Status::NeedRoom => {}
            }
        }
        // The client half-closed and everything it sent is answered (or
        // can never be completed): close our half too.
        if socket.state() == tcp::State::CloseWait
            && !socket.can_recv()
            && (conn.len == 0 || conn.last == Status::NeedInput)
        {
            conn.closing = true;
            socket.close();
        }
    }
    if !engine.commit() {
        return Round::DiskFailed;
    }
    if shutdown {
        // As Redis does: every connection is closed, so clients (redis-cli
        // SHUTDOWN among them) see the end instead of waiting.
        for conn in conns.iter() {
            sockets.get_mut::<tcp::Socket>(conn.handle).abort();
        }
        return Round::Shutdown;
    }
    if busy {
        Round::Busy
    } else {
        Round::Idle
    }
}

/// The bulk services, for measuring the NIC's throughput with a plain TCP
/// client: discard (RFC 863) reads and drops whatever arrives; source
/// sends [`SOURCE_BYTE`] for as long as the client reads, like RFC 864's
/// character generator without its lines.
pub const DISCARD_PORT: u16 = 9;
pub const SOURCE_PORT: u16 = 19;
/// What the source sends.
pub const SOURCE_BYTE: u8 = b'x';

/// One bulk service: a socket that listens again once its connection has
/// closed, one connection at a time.
pub struct Bulk {
    pub handle: SocketHandle,
    pub port: u16,
}

impl Bulk {
    /// A bulk service on `port` (discard or source) over `socket`.
    pub fn new(sockets: &mut SocketSet<'_>, mut socket: tcp::Socket<'static>, port: u16) -> Bulk {
        let _ = socket.listen(port);
        Bulk { handle: sockets.add(socket), port }
    }

    /// Moves what it can: the discard service drops every received byte,
    /// the source fills its transmit buffer. True if it moved data. A
    /// client that closes its half is answered with our close.
    pub fn serve(&self, sockets: &mut SocketSet<'_>) -> bool {
        let socket = sockets.get_mut::<tcp::Socket>(self.handle);
        if !socket.is_open() {
            let _ = socket.listen(self.port);
            return false;
        }
        let mut moved = false;
        // Both drop what they receive (a source's client sends nothing).
        while let Ok(n) = socket.recv(|bytes| (bytes.len(), bytes.len())) {
            if n == 0 {
                break;
            }
            moved = true;
        }
        if self.port == SOURCE_PORT && socket.may_send() {
            while let Ok(n) = socket.send(|buf| {
                buf.fill(SOURCE_BYTE);
                (buf.len(), buf.len())
            }) {
                if n == 0 {
                    break;
                }
                moved = true;
            }
        }
        if socket.state() == tcp::State::CloseWait {
            socket.close();
        }
        moved
    }
}

#[cfg(test)]
mod tests;
