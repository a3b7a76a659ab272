//! Where the guest's serial port meets the outside world: stdin/stdout, or a
//! TCP server (`--serial tcp:ADDR`) whose client types the guest's input and
//! reads its output.
//!
//! Output goes through an [`OutputPort`]: to a TCP client it is written at
//! once, without blocking, by the thread that releases it (the logging
//! channel's ack handler, on a primary: a thread wake-up less between an
//! ack and the client); what the client cannot take at once, and all output
//! to a plain writer (stdout, which may block), goes through a channel to a
//! writer thread, so that neither the vCPU thread nor the ack handler ever
//! blocks on a slow reader. A TCP console serves one client at a time (a new
//! client replaces the old one); output produced while no client is connected
//! is kept (up to [`MAX_BACKLOG`]) and sent to the next client.

use logging_channel::{LatencyHistogram, LatencySummary};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Output kept for a TCP console with no client; beyond it the oldest goes.
pub const MAX_BACKLOG: usize = 4 << 20;
/// Exits whose output a [`Backlog`] tells apart (1 MiB of marks); beyond,
/// neighbouring outputs share a mark.
pub const MAX_MARKS: usize = 1 << 16;

/// The `--serial` choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    Stdio,
    Tcp(String),
}

impl std::str::FromStr for SerialSpec {
    type Err = SerialSpecError;
    fn from_str(s: &str) -> Result<Self, SerialSpecError> {
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            _ => match s.strip_prefix("tcp:") {
                Some(addr) if !addr.is_empty() => Ok(SerialSpec::Tcp(addr.to_string())),
                _ => Err(SerialSpecError(s.to_string())),
            },
        }
    }
}

/// A `--serial` value that is neither `stdio` nor `tcp:ADDR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither `stdio` nor `tcp:ADDR`")]
pub struct SerialSpecError(String);

/// The serial endpoint, bound but not yet serving (a backup binds its
/// console at start and serves it only once it goes live).
pub enum Endpoint {
    Stdio,
    Tcp(TcpListener),
}

impl Endpoint {
    pub fn bind(spec: &SerialSpec) -> std::io::Result<Self> {
        Ok(match spec {
            SerialSpec::Stdio => Endpoint::Stdio,
            SerialSpec::Tcp(addr) => Endpoint::Tcp(TcpListener::bind(addr)?),
        })
    }

    /// The TCP address being served, if any.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Endpoint::Stdio => None,
            Endpoint::Tcp(l) => l.local_addr().ok(),
        }
    }

    /// Starts serving: returns the guest's input (chunks of received bytes;
    /// the sender drops at end of input) and its output port.
    pub fn start(self) -> (Receiver<Vec<u8>>, OutputPort) {
        match self {
            Endpoint::Stdio => (spawn_reader(std::io::stdin()), OutputPort::to_writer(Box::new(std::io::stdout()))),
            tcp => tcp.start_serving(),
        }
    }

    /// Starts serving, with the guest's input read from `input_file`
    /// (`--serial-input`) instead of the endpoint when one is given.
    pub fn start_with_input(
        self,
        input_file: Option<&std::path::Path>,
    ) -> std::io::Result<(Receiver<Vec<u8>>, OutputPort)> {
        match input_file {
            Some(path) => {
                let file = std::fs::File::open(path)?;
                Ok((spawn_reader(file), self.start_output_only()))
            }
            None => Ok(self.start()),
        }
    }

    /// Starts serving output only: a replay takes no input from the host.
    pub fn start_output_only(self) -> OutputPort {
        match self {
            Endpoint::Stdio => OutputPort::to_writer(Box::new(std::io::stdout())),
            tcp => tcp.start_serving().1,
        }
    }

    fn start_serving(self) -> (Receiver<Vec<u8>>, OutputPort) {
        match self {
            Endpoint::Stdio => unreachable!("stdio is served by start()"),
            Endpoint::Tcp(listener) => {
                let (input_tx, input_rx) = mpsc::channel();
                let client: Arc<Mutex<Option<TcpStream>>> = Arc::default();
                let port = OutputPort::spawn(Sink::Tcp {
                    client: client.clone(),
                    backlog: Backlog::default(),
                    in_flight: VecDeque::new(),
                    written: 0,
                });
                let notify = port.sender();
                std::thread::spawn(move || serve(listener, client, input_tx, notify));
                (input_rx, port)
            }
        }
    }
}

/// Accepts console clients one after the other.
fn serve(listener: TcpListener, client: Arc<Mutex<Option<TcpStream>>>, input: Sender<Vec<u8>>, out: PortSender) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        // A client that does not read must not block the writer: a write
        // that cannot proceed returns soon, and the output waits in the
        // bounded backlog.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(1)));
        let Ok(reader) = stream.try_clone() else { continue };
        if let Ok(mut slot) = client.lock() {
            *slot = Some(stream);
        }
        // Tell the writer a client is there, so it sends what was kept.
        if !out.connected() {
            return;
        }
        let input = input.clone();
        std::thread::spawn(move || forward(reader, input));
    }
}

fn forward(mut from: impl Read, to: Sender<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Reads `input` on a thread, in chunks, until its end.
pub fn spawn_reader(input: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || forward(input, tx));
    rx
}

/// Output kept for later, at most [`MAX_BACKLOG`] bytes, with the exit of
/// each output; beyond it the oldest goes. Bytes of one exit share one
/// entry, so a guest that writes a byte per exit costs a byte per byte, not
/// an allocation per byte.
#[derive(Default)]
pub struct Backlog {
    bytes: VecDeque<u8>,
    /// (exit, bytes it produced), oldest first.
    marks: VecDeque<(u64, usize)>,
}

impl Backlog {
    /// Keeps `data`, produced at `exit`; returns the newest exit whose
    /// output had to go to make room.
    pub fn push(&mut self, exit: u64, data: &[u8]) -> Option<u64> {
        match self.marks.back_mut() {
            Some((last, len)) if *last == exit => *len += data.len(),
            _ => self.marks.push_back((exit, data.len())),
        }
        self.bytes.extend(data);
        let mut dropped = None;
        while self.bytes.len() > MAX_BACKLOG {
            dropped = self.pop_oldest().or(dropped);
        }
        if self.marks.len() > MAX_MARKS {
            self.coarsen();
        }
        dropped
    }

    /// Merges each pair of neighbouring marks into one that carries the
    /// later exit: a guest that writes a byte per exit would otherwise cost
    /// a mark per byte. Coarser marks only keep output a little longer
    /// (until its later exit is released): re-emitted at a switch, never
    /// lost.
    fn coarsen(&mut self) {
        let old = std::mem::take(&mut self.marks);
        let mut it = old.into_iter();
        while let Some((exit_a, len_a)) = it.next() {
            match it.next() {
                Some((exit_b, len_b)) => self.marks.push_back((exit_b, len_a + len_b)),
                None => self.marks.push_back((exit_a, len_a)),
            }
        }
    }

    fn pop_oldest(&mut self) -> Option<u64> {
        let (exit, len) = self.marks.pop_front()?;
        self.bytes.drain(..len.min(self.bytes.len()));
        Some(exit)
    }

    /// Forgets the output of exits up to `exit`.
    pub fn forget_up_to(&mut self, exit: u64) {
        while self.marks.front().is_some_and(|(e, _)| *e <= exit) {
            self.pop_oldest();
        }
    }

    /// A copy of everything kept, as (exit, bytes), oldest first.
    pub fn to_vec(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.marks.len());
        let mut bytes = self.bytes.iter().copied();
        for &(exit, len) in &self.marks {
            out.push((exit, bytes.by_ref().take(len).collect()));
        }
        out
    }

    /// Takes everything kept, as (exit, bytes), oldest first.
    pub fn drain(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::with_capacity(self.marks.len());
        for (exit, len) in self.marks.drain(..) {
            out.push((exit, self.bytes.drain(..len.min(self.bytes.len())).collect()));
        }
        out
    }

    /// The oldest output: its exit, and as many of its bytes as lie
    /// contiguously in memory (all of them, or a first part).
    fn front(&self) -> Option<(u64, &[u8])> {
        let &(exit, len) = self.marks.front()?;
        let (a, b) = self.bytes.as_slices();
        let part = if a.is_empty() { b } else { a };
        Some((exit, &part[..len.min(part.len())]))
    }

    /// `n` bytes of the oldest output were written; returns its exit once
    /// all of it was.
    fn consume(&mut self, n: usize) -> Option<u64> {
        let (exit, len) = self.marks.front_mut()?;
        let n = n.min(*len);
        self.bytes.drain(..n);
        *len -= n;
        let exit = *exit;
        if *len == 0 {
            self.marks.pop_front();
            return Some(exit);
        }
        None
    }

    /// Bytes kept.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The exits whose output is kept, oldest first.
    pub fn exits(&self) -> impl Iterator<Item = u64> + '_ {
        self.marks.iter().map(|(e, _)| *e)
    }
}

enum Chunk {
    /// Output the guest produced at exit `.0`, released at `.1`.
    Bytes(u64, Instant, Vec<u8>),
    Connected,
    /// Output was written directly and is not all confirmed yet: the writer
    /// should watch it.
    Watch,
    /// Everything before this is written; the writer stops.
    Close,
}

/// Bytes of `ioctl(SIOCOUTQ)`: what the peer has not acknowledged yet.
fn unacked_bytes(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    const SIOCOUTQ: libc::c_ulong = 0x5411;
    let mut pending: libc::c_int = 0;
    // SAFETY: SIOCOUTQ on a TCP socket fd writes one int through a valid pointer.
    let ret = unsafe { libc::ioctl(stream.as_raw_fd(), SIOCOUTQ, &mut pending as *mut libc::c_int) };
    if ret == 0 {
        usize::try_from(pending).unwrap_or(0)
    } else {
        // Unknown: assume nothing is confirmed beyond what is already known.
        usize::MAX
    }
}

enum Sink {
    Writer(Box<dyn Write + Send>),
    Tcp {
        client: Arc<Mutex<Option<TcpStream>>>,
        /// Output not yet written to a client.
        backlog: Backlog,
        /// Written to the current client but not yet acknowledged by its TCP:
        /// (stream offset just past the chunk, exit).
        in_flight: VecDeque<(u64, u64)>,
        written: u64,
    },
}

impl Sink {
    /// Takes a chunk, advancing `delivered` as output reaches the world.
    fn take(&mut self, chunk: Chunk, delivered: &AtomicU64, write_delay: &Mutex<LatencyHistogram>) {
        match self {
            Sink::Writer(out) => {
                if let Chunk::Bytes(exit, released, bytes) = chunk {
                    let _ = out.write_all(&bytes).and_then(|_| out.flush());
                    delivered.fetch_max(exit, Ordering::Release);
                    record_delay(write_delay, released);
                }
            }
            Sink::Tcp { client, backlog, in_flight, written } => {
                if let Chunk::Connected = chunk {
                    // A new client, a new stream: what the old one had in
                    // flight stays unconfirmed (a backup would re-emit it).
                    in_flight.clear();
                    *written = 0;
                }
                let mut released_at = None;
                if let Chunk::Bytes(exit, released, bytes) = chunk {
                    // Too long without a client: the oldest output goes, and
                    // counts as delivered (no one will ever get it).
                    if let Some(dropped) = backlog.push(exit, &bytes) {
                        delivered.fetch_max(dropped, Ordering::Release);
                    }
                    released_at = Some(released);
                }
                Self::flush_backlog(client, backlog, in_flight, written);
                // Written out now (not kept for a client to come): a hop of
                // the output's way to the world.
                if let Some(released) = released_at.filter(|_| backlog.is_empty()) {
                    record_delay(write_delay, released);
                }
                if let Ok(slot) = client.lock() {
                    if let Some(stream) = slot.as_ref() {
                        Self::confirm(stream, in_flight, *written, delivered);
                    }
                }
            }
        }
    }

    /// Writes what the client can take now; the rest stays in the backlog
    /// (a client that does not read never blocks the writer, and what waits
    /// for it is bounded by the backlog).
    fn flush_backlog(
        client: &Mutex<Option<TcpStream>>,
        backlog: &mut Backlog,
        in_flight: &mut VecDeque<(u64, u64)>,
        written: &mut u64,
    ) {
        let Ok(mut slot) = client.lock() else { return };
        let Some(stream) = slot.as_mut() else { return };
        while let Some((_, bytes)) = backlog.front() {
            match send_nonblocking(stream, bytes) {
                Ok(n) if n > 0 => {
                    *written += n as u64;
                    if let Some(exit) = backlog.consume(n) {
                        in_flight.push_back((*written, exit));
                    }
                }
                // The client is full: the rest waits.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The client went away: what it did not get waits for the next one.
                _ => {
                    in_flight.clear();
                    *written = 0;
                    *slot = None;
                    return;
                }
            }
        }
    }

    /// Moves output the client's TCP has acknowledged to `delivered`.
    fn confirm(stream: &TcpStream, in_flight: &mut VecDeque<(u64, u64)>, written: u64, delivered: &AtomicU64) {
        if in_flight.is_empty() {
            return;
        }
        let acked_to = written.saturating_sub(unacked_bytes(stream) as u64);
        while in_flight.front().is_some_and(|(end, _)| *end <= acked_to) {
            if let Some((_, exit)) = in_flight.pop_front() {
                delivered.fetch_max(exit, Ordering::Release);
            }
        }
    }

    /// Retries what waits for the client and confirms what it acknowledged;
    /// returns whether anything is still unconfirmed with a client there
    /// (then the writer looks again soon).
    fn poll(&mut self, delivered: &AtomicU64) -> bool {
        match self {
            Sink::Writer(_) => false,
            Sink::Tcp { client, backlog, in_flight, written } => {
                if !backlog.is_empty() {
                    Self::flush_backlog(client, backlog, in_flight, written);
                }
                let Ok(slot) = client.lock() else { return false };
                let Some(stream) = slot.as_ref() else { return false };
                Self::confirm(stream, in_flight, *written, delivered);
                !in_flight.is_empty() || !backlog.is_empty()
            }
        }
    }
}

/// Records how long output took from its release to its write.
fn record_delay(write_delay: &Mutex<LatencyHistogram>, released: Instant) {
    if let Ok(mut h) = write_delay.lock() {
        h.record_between(released, Instant::now());
    }
}

/// `send(2)` without blocking (and without SIGPIPE): a client that does not
/// read must block neither the writer thread nor a releasing thread.
fn send_nonblocking(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: send(2) reads at most `bytes.len()` bytes from a valid slice on
    // a socket fd that `stream` keeps open.
    let n = unsafe {
        libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What an [`OutputPort`], its senders and its writer thread share.
struct PortShared {
    sink: Mutex<Sink>,
    /// Chunks sent to the writer thread and not yet taken (counted before
    /// the send, uncounted after the take, under the sink's lock): a sender
    /// writes directly only when this is 0, so output keeps its order.
    queued: AtomicUsize,
    /// The exit up to which output reached the outside world.
    delivered: Arc<AtomicU64>,
    /// Release to write, in µs, of output written out at once (`--stats`).
    write_delay: Mutex<LatencyHistogram>,
}

impl PortShared {
    fn lock_sink(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The writing end of the serial port. Never blocks.
pub struct OutputPort {
    tx: Sender<Chunk>,
    shared: Arc<PortShared>,
    writer: Option<JoinHandle<()>>,
}

impl OutputPort {
    fn spawn(sink: Sink) -> Self {
        let (tx, rx) = mpsc::channel::<Chunk>();
        let shared = Arc::new(PortShared {
            sink: Mutex::new(sink),
            queued: AtomicUsize::new(0),
            delivered: Arc::new(AtomicU64::new(0)),
            write_delay: Mutex::new(LatencyHistogram::new()),
        });
        let ours = shared.clone();
        let writer = std::thread::spawn(move || loop {
            // While the client has not taken and acknowledged everything,
            // look again soon.
            let pending = ours.lock_sink().poll(&ours.delivered);
            let chunk = if pending {
                match rx.recv_timeout(Duration::from_micros(200)) {
                    Ok(chunk) => chunk,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(chunk) => chunk,
                    Err(_) => return,
                }
            };
            let mut sink = ours.lock_sink();
            if let Chunk::Close = chunk {
                return;
            }
            sink.take(chunk, &ours.delivered, &ours.write_delay);
            ours.queued.fetch_sub(1, Ordering::AcqRel);
        });
        OutputPort { tx, shared, writer: Some(writer) }
    }

    /// A port writing to `out` (stdout, a file...): output counts as
    /// delivered once written.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        OutputPort::spawn(Sink::Writer(out))
    }

    /// A handle that sends into the same port (for the output gate).
    pub fn sender(&self) -> PortSender {
        PortSender { tx: self.tx.clone(), shared: self.shared.clone() }
    }

    /// The exit up to which output has reached the outside world: written to
    /// stdout, or acknowledged by the console client's TCP. What a backup
    /// going live need not re-emit.
    pub fn delivered(&self) -> Arc<AtomicU64> {
        self.shared.delivered.clone()
    }

    /// Waits until everything sent so far has been written (or kept for a
    /// console client that never came), then stops the writer.
    pub fn close(mut self) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let _ = self.tx.send(Chunk::Close);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// A cloneable sender into an [`OutputPort`].
#[derive(Clone)]
pub struct PortSender {
    tx: Sender<Chunk>,
    shared: Arc<PortShared>,
}

impl PortSender {
    /// Output the guest produced at exit `exit`, released now. To a TCP
    /// client it is written at once when nothing is queued before it and the
    /// writer thread is not busy; else the writer thread writes it.
    pub fn send(&self, exit: u64, bytes: Vec<u8>) {
        let chunk = Chunk::Bytes(exit, Instant::now(), bytes);
        let chunk = match self.shared.sink.try_lock() {
            Ok(mut sink) if matches!(*sink, Sink::Tcp { .. }) && self.shared.queued.load(Ordering::Acquire) == 0 => {
                sink.take(chunk, &self.shared.delivered, &self.shared.write_delay);
                // What the client's TCP has not confirmed yet is watched by
                // the writer (off the output's path: it is written).
                if !sink.poll(&self.shared.delivered) {
                    return;
                }
                Chunk::Watch
            }
            _ => chunk,
        };
        self.enqueue(chunk);
    }

    /// A new console client is there. False once the port is closed.
    fn connected(&self) -> bool {
        self.enqueue(Chunk::Connected)
    }

    fn enqueue(&self, chunk: Chunk) -> bool {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        // The writer thread lives as long as the port; a send after it is
        // gone (process ending) has no one to deliver to.
        if self.tx.send(chunk).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Output released but not yet written to a console client (kept for
    /// one that has not come), as (exit, bytes), oldest first: what a backup
    /// joining now must be able to re-emit.
    pub fn undelivered(&self) -> Vec<(u64, Vec<u8>)> {
        match &*self.shared.lock_sink() {
            Sink::Tcp { backlog, .. } => backlog.to_vec(),
            Sink::Writer(_) => Vec::new(),
        }
    }

    /// Release-to-write delay of the output written so far, as (outputs,
    /// p50 µs, p99 µs, max µs).
    pub fn write_delay(&self) -> Option<LatencySummary> {
        self.shared.write_delay.lock().ok()?.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_serial_specs() {
        assert_eq!("stdio".parse::<SerialSpec>(), Ok(SerialSpec::Stdio));
        assert_eq!("tcp:127.0.0.1:5000".parse::<SerialSpec>(), Ok(SerialSpec::Tcp("127.0.0.1:5000".into())));
        assert!("tcp:".parse::<SerialSpec>().is_err());
        assert!("udp:1".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn tcp_console_keeps_output_until_a_client_comes_and_forwards_input() {
        let endpoint = Endpoint::bind(&SerialSpec::Tcp("127.0.0.1:0".into())).unwrap();
        let Endpoint::Tcp(listener) = &endpoint else { panic!("tcp") };
        let addr = listener.local_addr().unwrap();
        let (input, port) = endpoint.start();
        port.sender().send(1, b"before ".to_vec());
        std::thread::sleep(Duration::from_millis(50));
        let mut client = TcpStream::connect(addr).unwrap();
        port.sender().send(2, b"after\n".to_vec());
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"\n") {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"before after\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while port.delivered().load(Ordering::Acquire) < 2 {
            assert!(std::time::Instant::now() < deadline, "delivery never confirmed");
            std::thread::sleep(Duration::from_millis(1));
        }
        client.write_all(b"typed").unwrap();
        assert_eq!(input.recv_timeout(Duration::from_secs(5)).unwrap(), b"typed");
    }

    #[test]
    fn output_reaches_a_client_whole_and_in_order_whichever_thread_writes_it() {
        let endpoint = Endpoint::bind(&SerialSpec::Tcp("127.0.0.1:0".into())).unwrap();
        let Endpoint::Tcp(listener) = &endpoint else { panic!("tcp") };
        let addr = listener.local_addr().unwrap();
        let port = endpoint.start_output_only();
        let mut client = TcpStream::connect(addr).unwrap();
        // Wait until the writer has the client, so that sends go direct.
        port.sender().send(1, b"0\n".to_vec());
        let mut first = [0u8; 2];
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.read_exact(&mut first).unwrap();
        // Far more than the socket holds while the client is not reading:
        // some output is written directly, some waits for the writer thread.
        let lines = 200_000u64;
        let sender = port.sender();
        let producer = std::thread::spawn(move || {
            for i in 1..=lines {
                sender.send(i + 1, format!("{i}\n").into_bytes());
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        let expected: Vec<u8> = (1..=lines).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < expected.len() {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "the console closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        producer.join().unwrap();
        assert!(got == expected, "output reordered, lost or repeated");
        // Directly written output is confirmed too (the writer watches it).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while port.delivered().load(Ordering::Acquire) < lines + 1 {
            assert!(std::time::Instant::now() < deadline, "delivery of direct writes never confirmed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(port.sender().write_delay().is_some_and(|(n, ..)| n > 0));
    }

    #[test]
    fn a_client_that_never_reads_neither_blocks_the_port_nor_grows_it() {
        let endpoint = Endpoint::bind(&SerialSpec::Tcp("127.0.0.1:0".into())).unwrap();
        let Endpoint::Tcp(listener) = &endpoint else { panic!("tcp") };
        let addr = listener.local_addr().unwrap();
        let (_input, port) = endpoint.start();
        let _client = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // Far more than the socket buffers and the backlog hold.
        let chunk = vec![b'x'; 64 << 10];
        let total = 4 * MAX_BACKLOG / chunk.len();
        for exit in 1..=total as u64 {
            port.sender().send(exit, chunk.clone());
        }
        let started = std::time::Instant::now();
        port.close();
        assert!(started.elapsed() < Duration::from_secs(10), "the writer was stuck on the client");
    }

    #[test]
    fn a_byte_per_exit_costs_a_bounded_number_of_marks() {
        let mut b = Backlog::default();
        for exit in 1..=300_000u64 {
            b.push(exit, &[b'a' + (exit % 26) as u8]);
        }
        assert!(b.exits().count() <= MAX_MARKS, "{} marks", b.exits().count());
        assert_eq!(b.len(), 300_000);
        assert_eq!(b.exits().last(), Some(300_000), "the newest output keeps its exit");
        // Forgetting up to an exit keeps everything after it (and perhaps a little before).
        b.forget_up_to(200_000);
        assert!(b.len() >= 100_000 && b.len() < 100_000 + 16, "{}", b.len());
        let kept = b.len();
        let drained: usize = b.drain().iter().map(|(_, bytes)| bytes.len()).sum();
        assert_eq!(drained, kept, "drain hands out every byte kept");
        assert!(b.is_empty());
    }

    #[test]
    fn the_backlog_keeps_the_newest_bytes_and_reports_what_it_dropped() {
        let mut b = Backlog::default();
        assert_eq!(b.push(1, &vec![1; MAX_BACKLOG]), None);
        assert_eq!(b.push(2, b"ab"), Some(1), "exit 1's output had to go");
        assert_eq!(b.len(), 2);
        b.push(2, b"c");
        b.push(3, b"d");
        assert_eq!(b.exits().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(b.consume(2), None);
        assert_eq!(b.front(), Some((2, &b"c"[..])));
        assert_eq!(b.consume(1), Some(2));
        b.forget_up_to(3);
        assert!(b.is_empty());
    }
}
