//! Where the guest's serial port meets the outside world: stdin/stdout, or a
//! console server — plaintext TCP (`--serial tcp:ADDR`) or mutual TLS
//! (`--serial tls:ADDR`) — whose client types the guest's input and reads
//! its output.
//!
//! Input is bounded: what was received and not yet taken by the run is at
//! most [`MAX_INPUT_BUFFER`] bytes here (plus the run's own queue: a few
//! dozen chunks of at most [`INPUT_CHUNK`] bytes, and a few KiB for the UART);
//! while it is full, the reader stops reading its source, so a console
//! client that types faster than the guest reads is held back by its TCP's
//! flow control instead of growing the VMM's memory.
//!
//! A console server serves one client at a time. A client that connects
//! while another is connected is told [`BUSY_MESSAGE`] and closed — unless
//! the server takes over (`--serial-takeover`): then the new client
//! replaces the old one, whose connection is shut down and whose input is
//! no longer delivered. A client that has closed its end does not keep the
//! next one out: once what it sent last is handed on (or after
//! [`PREDECESSOR_GRACE`], the rest dropped), the next one is served. Over
//! TLS only a client whose certificate chains to `--tls-ca` gets that far:
//! the handshake comes first.
//!
//! Output goes through an [`OutputPort`]: to a console client it is written
//! at once, without blocking, by the thread that releases it (the logging
//! channel's ack handler, on a primary: a thread wake-up less between an
//! ack and the client); what the client cannot take at once, and all output
//! to a plain writer (stdout, which may block), goes through a channel to a
//! writer thread, so that neither the vCPU thread nor the ack handler ever
//! blocks on a slow reader. Output produced while no client is connected is
//! kept (up to [`MAX_BACKLOG`]) and sent to the next client.

use credentials::rustls::{ServerConfig, ServerConnection};
use credentials::Tls;
use logging_channel::{LatencyHistogram, LatencySummary};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of output dropped because no console client came for them in
/// time (beyond [`MAX_BACKLOG`]): this process's console (one per VMM).
static OUTPUT_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Bytes of output the console dropped so far (no client took them).
pub fn output_dropped_bytes() -> u64 {
    OUTPUT_DROPPED.load(Ordering::Relaxed)
}

/// Output kept for a TCP console with no client; beyond it the oldest goes.
pub const MAX_BACKLOG: usize = 4 << 20;
/// Exits whose output a [`Backlog`] tells apart (1 MiB of marks); beyond,
/// neighbouring outputs share a mark.
pub const MAX_MARKS: usize = 1 << 16;
/// Serial input received and not yet handed to the run, at most, in bytes:
/// beyond it the reader stops reading (a console client's TCP then stops
/// it sending).
pub const MAX_INPUT_BUFFER: usize = 64 << 10;
/// Input is read, and handed on, this many bytes at a time at most: small,
/// since the run's own queue holds a number of chunks (a guest takes serial
/// input a few bytes at a time anyway).
pub const INPUT_CHUNK: usize = 1 << 10;
/// What a client that connects while another is connected reads before the
/// console closes its connection.
pub const BUSY_MESSAGE: &str = "ftvmm: console busy: another client is connected\n";
/// Connections being greeted at once (TLS handshake, admission, refusal);
/// beyond that a new connection is closed at once.
const MAX_GREETING: usize = 8;
/// A TLS handshake, or a refused client's farewell, that takes longer is
/// abandoned.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new client waits for a predecessor that has hung up to have
/// its last input handed on (then what is left of it is dropped).
const PREDECESSOR_GRACE: Duration = Duration::from_secs(2);
/// How often a client's reader blocked by a full input buffer looks again.
const FULL_RETRY: Duration = Duration::from_millis(1);

/// The `--serial` choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    Stdio,
    /// A console server on `addr`: plaintext TCP, or mutual TLS with the
    /// VMM's credentials; `takeover`: a new client replaces the current one
    /// instead of being refused.
    Tcp {
        addr: String,
        tls: bool,
        takeover: bool,
    },
}

impl SerialSpec {
    /// A plaintext console server on `addr`.
    pub fn tcp(addr: &str) -> SerialSpec {
        SerialSpec::Tcp { addr: addr.to_string(), tls: false, takeover: false }
    }
}

impl std::str::FromStr for SerialSpec {
    type Err = SerialSpecError;
    fn from_str(s: &str) -> Result<Self, SerialSpecError> {
        if s == "stdio" {
            return Ok(SerialSpec::Stdio);
        }
        let (addr, tls) = match (s.strip_prefix("tcp:"), s.strip_prefix("tls:")) {
            (Some(addr), _) => (addr, false),
            (_, Some(addr)) => (addr, true),
            _ => return Err(SerialSpecError(s.to_string())),
        };
        if addr.is_empty() {
            return Err(SerialSpecError(s.to_string()));
        }
        Ok(SerialSpec::Tcp { addr: addr.to_string(), tls, takeover: false })
    }
}

impl std::fmt::Display for SerialSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialSpec::Stdio => write!(f, "stdio"),
            SerialSpec::Tcp { addr, tls: false, .. } => write!(f, "tcp:{addr}"),
            SerialSpec::Tcp { addr, tls: true, .. } => write!(f, "tls:{addr}"),
        }
    }
}

/// A `--serial` value that is neither `stdio`, `tcp:ADDR` nor `tls:ADDR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither `stdio`, `tcp:ADDR` nor `tls:ADDR`")]
pub struct SerialSpecError(String);

/// Why a console endpoint cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: String, err: std::io::Error },
    #[error(
        "a TLS console (tls:{addr}) needs the VMM's TLS credentials: give --tls-cert, --tls-key and --tls-ca \
         (or serve it in plaintext with tcp:{addr})"
    )]
    NoCredentials { addr: String },
}

/// The serial endpoint, bound but not yet serving (a backup binds its
/// console at start and serves it only once it goes live).
pub enum Endpoint {
    Stdio,
    Server(Server),
}

/// A bound console server.
pub struct Server {
    listener: TcpListener,
    /// Mutual TLS with these settings (`tls:`), else plaintext.
    tls: Option<Arc<ServerConfig>>,
    takeover: bool,
}

impl Endpoint {
    /// Binds `spec`; a TLS console serves with `tls`'s credentials (which
    /// it then needs). A plaintext console reachable from other hosts is
    /// warned about on stderr.
    pub fn bind(spec: &SerialSpec, tls: Option<&Tls>) -> Result<Self, ConsoleError> {
        let SerialSpec::Tcp { addr, tls: wants_tls, takeover } = spec else {
            return Ok(Endpoint::Stdio);
        };
        let config = match (wants_tls, tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(tls.server_config()),
            (true, None) => return Err(ConsoleError::NoCredentials { addr: addr.clone() }),
        };
        let listener = TcpListener::bind(addr).map_err(|err| ConsoleError::Listen { addr: addr.clone(), err })?;
        if config.is_none() {
            if let Some(local) = listener.local_addr().ok().filter(|a| !a.ip().is_loopback()) {
                // (Not "serial console on": tools look for the line that
                // names the address served by those words.)
                eprintln!(
                    "ftvmm: warning: the console (--serial tcp:{local}) is plaintext and unauthenticated, and \
                     reachable from other hosts: whoever connects first types into the guest; use --serial tls:ADDR, \
                     or a loopback address"
                );
            }
        }
        Ok(Endpoint::Server(Server { listener, tls: config, takeover: *takeover }))
    }

    /// The TCP address being served, if any.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Endpoint::Stdio => None,
            Endpoint::Server(s) => s.listener.local_addr().ok(),
        }
    }

    /// Starts serving: returns the guest's input (chunks of received bytes;
    /// the sender drops at end of input) and its output port.
    pub fn start(self) -> (Receiver<Vec<u8>>, OutputPort) {
        match self {
            Endpoint::Stdio => (spawn_reader(std::io::stdin()), OutputPort::to_writer(Box::new(std::io::stdout()))),
            Endpoint::Server(server) => {
                let (tx, rx) = input_channel();
                (rx, server.serve(Some(tx)))
            }
        }
    }

    /// Starts serving, with the guest's input read from `input_file`
    /// (`--serial-input`) instead of the endpoint when one is given.
    pub fn start_with_input(
        self,
        input_file: Option<&std::path::Path>,
    ) -> std::io::Result<(Receiver<Vec<u8>>, OutputPort)> {
        let file = input_file.map(std::fs::File::open).transpose()?;
        Ok(self.start_with_file(file))
    }

    /// Starts serving, with serial input from `file` (opened already:
    /// `--serial-input` of a backup, opened at build time, before any
    /// `--run-as` drop) if given, else from the endpoint.
    pub fn start_with_file(self, file: Option<std::fs::File>) -> (Receiver<Vec<u8>>, OutputPort) {
        match file {
            Some(file) => (spawn_reader(file), self.start_output_only()),
            None => self.start(),
        }
    }

    /// Starts serving output only: a replay takes no input from the host
    /// (what a console client types is read and dropped).
    pub fn start_output_only(self) -> OutputPort {
        match self {
            Endpoint::Stdio => OutputPort::to_writer(Box::new(std::io::stdout())),
            Endpoint::Server(server) => server.serve(None),
        }
    }
}

impl Server {
    /// Serves clients on a thread of its own; their input goes to `input`.
    fn serve(self, input: Option<SyncSender<Vec<u8>>>) -> OutputPort {
        let slot: Arc<Mutex<Option<Client>>> = Arc::default();
        let port = OutputPort::spawn(Sink::Tcp { client: slot.clone(), backlog: Backlog::default() });
        let console = Arc::new(Console {
            slot,
            current: Mutex::new(0),
            next_id: AtomicU64::new(1),
            input,
            out: port.sender(),
            tls: self.tls,
            takeover: self.takeover,
            greeting: AtomicUsize::new(0),
        });
        let listener = self.listener;
        std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Console);
            accept(listener, console)
        });
        port
    }
}

/// The bounded channel of serial input: [`MAX_INPUT_BUFFER`] bytes in
/// chunks of at most [`INPUT_CHUNK`].
fn input_channel() -> (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) {
    mpsc::sync_channel(MAX_INPUT_BUFFER / INPUT_CHUNK)
}

/// Reads `input` on a thread, in chunks, until its end; the reader waits
/// while [`MAX_INPUT_BUFFER`] bytes are read and not yet taken.
pub fn spawn_reader(mut input: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = input_channel();
    std::thread::spawn(move || {
        crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Console);
        let mut buf = vec![0u8; INPUT_CHUNK];
        loop {
            match input.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    });
    rx
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a console server's threads share: the accepting thread, one thread
/// per connection (greeting it, then reading its input), and the output
/// sink (through `slot`).
struct Console {
    /// The client being served, if any.
    slot: Arc<Mutex<Option<Client>>>,
    /// The id of the client whose input is the guest's (0: none). A
    /// client's reader checks it, under this lock, as it hands on each
    /// chunk: once a client is replaced, nothing more of its is delivered.
    current: Mutex<u64>,
    next_id: AtomicU64,
    /// Where input goes (`None`: serving output only; input is dropped).
    input: Option<SyncSender<Vec<u8>>>,
    out: PortSender,
    tls: Option<Arc<ServerConfig>>,
    takeover: bool,
    /// Connections being greeted now.
    greeting: AtomicUsize,
}

/// Accepts connections and greets each on a thread of its own.
fn accept(listener: TcpListener, console: Arc<Console>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Out of file descriptors, say: let it pass rather than spin.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if console.greeting.fetch_add(1, Ordering::AcqRel) >= MAX_GREETING {
            console.greeting.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let console = console.clone();
        std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Console);
            console.greet(stream)
        });
    }
}

/// Counts a connection as greeted when dropped.
struct Greeting<'a>(&'a AtomicUsize);

impl Drop for Greeting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Console {
    /// A new connection: its TLS handshake, then admission or refusal; an
    /// admitted client's input is read on this thread until it ends.
    fn greet(&self, stream: TcpStream) {
        let greeting = Greeting(&self.greeting);
        let peer = stream.peer_addr().map_or_else(|_| "a client".to_string(), |a| a.to_string());
        configure(&stream);
        let tls = match &self.tls {
            None => None,
            Some(config) => match handshake(config, &stream) {
                Ok(conn) => Some(Arc::new(Mutex::new(TlsStream { conn, sent: 0 }))),
                Err(why) => {
                    eprintln!("ftvmm: console: refused {peer}: {why}");
                    return;
                }
            },
        };
        let Ok(reader) = stream.try_clone() else { return };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ended = Arc::new(AtomicBool::new(false));
        let client = Client {
            id,
            peer: peer.clone(),
            sock: stream,
            tls: tls.clone(),
            written: 0,
            input_ended: ended.clone(),
            in_flight: VecDeque::new(),
        };
        if let Err(refused) = self.admit(client) {
            eprintln!("ftvmm: console: refused {peer}: another client is connected");
            refused.refuse();
            return;
        }
        drop(greeting);
        match tls {
            None => self.read_plain(id, reader, &ended),
            Some(tls) => self.read_tls(id, reader, &tls, &ended),
        }
    }

    /// Makes `client` the one served, if no other is (or if it takes over);
    /// else hands it back.
    fn admit(&self, client: Client) -> Result<(), Client> {
        let deadline = Instant::now() + PREDECESSOR_GRACE;
        let mut slot = loop {
            let mut slot = lock(&self.slot);
            match slot.as_ref() {
                None => break slot,
                // Done typing (it may still be reading): it does not keep
                // the next client out.
                Some(old) if old.input_ended.load(Ordering::Acquire) => {
                    if let Some(old) = slot.take() {
                        old.shutdown();
                    }
                    break slot;
                }
                Some(old) if self.takeover => {
                    eprintln!("ftvmm: console: {} takes the console over from {}", client.peer, old.peer);
                    if let Some(old) = slot.take() {
                        old.shutdown();
                    }
                    break slot;
                }
                // It has hung up, and its reader is still handing on what
                // it sent last: wait for that, briefly; then what is left of
                // it is dropped (the guest was not taking it).
                Some(old) if old.hung_up() => {
                    if Instant::now() < deadline {
                        drop(slot);
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    eprintln!(
                        "ftvmm: console: {} hung up with input the guest has not taken yet; dropping it for {}",
                        old.peer, client.peer
                    );
                    if let Some(old) = slot.take() {
                        old.shutdown();
                    }
                    break slot;
                }
                Some(_) => return Err(client),
            }
        };
        *lock(&self.current) = client.id;
        *slot = Some(client);
        drop(slot);
        // Tell the writer a client is there, so it sends what was kept.
        self.out.connected();
        Ok(())
    }

    /// Hands a chunk of client `id`'s input on, waiting while the input
    /// buffer is full. False once `id` is no longer the client served.
    fn deliver(&self, id: u64, bytes: &[u8]) -> bool {
        let mut chunk = bytes.to_vec();
        loop {
            {
                let current = lock(&self.current);
                if *current != id {
                    return false;
                }
                let Some(input) = &self.input else { return true };
                match input.try_send(chunk) {
                    Ok(()) => return true,
                    Err(TrySendError::Full(back)) => chunk = back,
                    // The run takes no more input: drop it.
                    Err(TrySendError::Disconnected(_)) => return true,
                }
            }
            std::thread::sleep(FULL_RETRY);
        }
    }

    /// Client `id`'s connection failed: it is no longer served.
    fn hang_up(&self, id: u64) {
        let mut slot = lock(&self.slot);
        if slot.as_ref().is_some_and(|c| c.id == id) {
            if let Some(old) = slot.take() {
                old.shutdown();
            }
        }
    }

    /// Reads a plaintext client's input until it ends, fails, or the client
    /// is replaced.
    fn read_plain(&self, id: u64, mut stream: TcpStream, ended: &AtomicBool) {
        let mut buf = vec![0u8; INPUT_CHUNK];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    ended.store(true, Ordering::Release);
                    return;
                }
                Ok(n) => {
                    if !self.deliver(id, &buf[..n]) {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.hang_up(id);
                    return;
                }
            }
        }
    }

    /// Reads a TLS client's input until it ends, fails, or the client is
    /// replaced. The connection is shared with the output side: it is
    /// locked only to take what has arrived, never while waiting.
    fn read_tls(&self, id: u64, sock: TcpStream, tls: &Mutex<TlsStream>, ended: &AtomicBool) {
        let mut plain = Vec::new();
        loop {
            match wait_readable(&sock, Duration::from_millis(200)) {
                Ok(true) => {}
                Ok(false) => {
                    if *lock(&self.current) != id {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    self.hang_up(id);
                    return;
                }
            }
            let state = lock(tls).receive(&sock, &mut plain);
            for chunk in plain.chunks(INPUT_CHUNK) {
                if !self.deliver(id, chunk) {
                    return;
                }
            }
            plain.clear();
            match state {
                Received::Open => {}
                Received::Ended => {
                    ended.store(true, Ordering::Release);
                    return;
                }
                Received::Failed(why) => {
                    eprintln!("ftvmm: console: dropping the client: {why}");
                    self.hang_up(id);
                    return;
                }
            }
        }
    }
}

/// Socket options of a console connection: no Nagle delay (a keystroke is
/// sent at once), and keepalive probes so that a client whose host vanished
/// is found gone (in about 25 s of silence) instead of holding the console.
fn configure(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let value: libc::c_int = value;
        // SAFETY: setsockopt reads one c_int through a valid pointer of the
        // length given, on a socket fd that `stream` keeps open.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Waits up to `timeout` for `sock` to have something to read (data, its
/// end, or an error).
fn wait_readable(sock: &TcpStream, timeout: Duration) -> std::io::Result<bool> {
    let mut fds = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll(2) on one valid pollfd, for a socket fd `sock` keeps open.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    match n {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Whether the peer of `sock` has shut down its sending side.
fn peer_hung_up(sock: &TcpStream) -> bool {
    let mut fds = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: poll(2) on one valid pollfd, for a socket fd `sock` keeps open,
    // without waiting.
    let n = unsafe { libc::poll(&mut fds, 1, 0) };
    n > 0 && fds.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A TLS server handshake on `sock`, within [`GREETING_TIMEOUT`].
fn handshake(config: &Arc<ServerConfig>, sock: &TcpStream) -> Result<ServerConnection, String> {
    let _ = sock.set_read_timeout(Some(GREETING_TIMEOUT));
    let _ = sock.set_write_timeout(Some(GREETING_TIMEOUT));
    let deadline = Instant::now() + GREETING_TIMEOUT;
    let mut conn = ServerConnection::new(config.clone()).map_err(|e| format!("TLS: {e}"))?;
    let mut io = sock;
    while conn.is_handshaking() {
        if Instant::now() > deadline {
            return Err("the TLS handshake took too long".into());
        }
        match conn.complete_io(&mut io) {
            Ok((0, 0)) => return Err("the connection closed during the TLS handshake".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("the TLS handshake failed: {e}")),
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut io).map_err(|e| format!("the TLS handshake failed: {e}"))?;
    }
    // From now on the socket is used without blocking (see `Wire`).
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_write_timeout(None);
    Ok(conn)
}

/// A socket as rustls' transport, never blocking (and without SIGPIPE): the
/// output side must never wait on a client, and the reader waits with
/// poll(2) before it takes the connection's lock.
struct Wire<'a>(&'a TcpStream);

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into a valid
        // mutable slice, from a socket fd the stream keeps open.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        send_nonblocking(self.0, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The TLS state of a client's connection, which its reader and the output
/// side share.
struct TlsStream {
    conn: ServerConnection,
    /// TLS bytes written to the socket so far.
    sent: u64,
}

/// What a TLS client's reader found.
enum Received {
    Open,
    /// The client closed (its input ended; it may still read).
    Ended,
    Failed(String),
}

impl TlsStream {
    /// Writes the TLS records waiting to go, as far as the socket takes them.
    fn flush(&mut self, sock: &TcpStream) -> std::io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Wire(sock)) {
                Ok(0) => return Ok(()),
                Ok(n) => self.sent += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes what has arrived on `sock`, appending its plaintext to `plain`.
    fn receive(&mut self, sock: &TcpStream, plain: &mut Vec<u8>) -> Received {
        let mut ended = false;
        match self.conn.read_tls(&mut Wire(sock)) {
            Ok(0) => ended = true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
            Err(e) => return Received::Failed(e.to_string()),
        }
        let state = match self.conn.process_new_packets() {
            Ok(state) => state,
            Err(e) => {
                // Tell the client why (an alert), if the socket takes it.
                let _ = self.flush(sock);
                return Received::Failed(format!("TLS: {e}"));
            }
        };
        let n = state.plaintext_bytes_to_read();
        if n > 0 {
            let start = plain.len();
            plain.resize(start + n, 0);
            if let Err(e) = self.conn.reader().read_exact(&mut plain[start..]) {
                plain.truncate(start);
                return Received::Failed(format!("TLS: {e}"));
            }
        }
        // Key updates and the like are answered.
        if let Err(e) = self.flush(sock) {
            return Received::Failed(e.to_string());
        }
        if ended || state.peer_has_closed() {
            Received::Ended
        } else {
            Received::Open
        }
    }
}

/// The console's client, as the output side sees it.
struct Client {
    id: u64,
    peer: String,
    sock: TcpStream,
    /// A TLS client's connection (`None`: plaintext).
    tls: Option<Arc<Mutex<TlsStream>>>,
    /// Plaintext bytes written to the socket so far.
    written: u64,
    /// Its reader has reached the end of its input.
    input_ended: Arc<AtomicBool>,
    /// Output written to this client but not yet acknowledged by its TCP:
    /// (the socket's byte offset just past it — unknown while part of it is
    /// still in TLS's buffer —, its exit).
    in_flight: VecDeque<(Option<u64>, u64)>,
}

impl Client {
    /// Writes what the client can take of `bytes` now, without blocking;
    /// `WouldBlock` when it can take nothing.
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let Some(tls) = &self.tls else {
            let n = send_nonblocking(&self.sock, bytes)?;
            self.written += n as u64;
            return Ok(n);
        };
        let mut tls = lock(tls);
        tls.flush(&self.sock)?;
        let n = tls.conn.writer().write(bytes)?;
        tls.flush(&self.sock)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Writes TLS records still waiting, as far as the socket takes them.
    fn flush(&mut self) -> std::io::Result<()> {
        match &self.tls {
            Some(tls) => lock(tls).flush(&self.sock),
            None => Ok(()),
        }
    }

    /// The socket offset past everything written so far, when all of it
    /// has left TLS's buffer.
    fn sent_end(&self) -> Option<u64> {
        match &self.tls {
            None => Some(self.written),
            Some(tls) => {
                let tls = lock(tls);
                (!tls.conn.wants_write()).then_some(tls.sent)
            }
        }
    }

    /// Bytes written to the socket so far.
    fn wire_sent(&self) -> u64 {
        match &self.tls {
            None => self.written,
            Some(tls) => lock(tls).sent,
        }
    }

    /// The whole output of `exit` was written.
    fn wrote(&mut self, exit: u64) {
        self.in_flight.push_back((None, exit));
        self.settle_ends();
    }

    /// Gives output still in TLS's buffer its end once the buffer is empty.
    fn settle_ends(&mut self) {
        if self.in_flight.back().is_some_and(|(end, _)| end.is_none()) {
            if let Some(end) = self.sent_end() {
                for (e, _) in self.in_flight.iter_mut().rev() {
                    if e.is_some() {
                        break;
                    }
                    *e = Some(end);
                }
            }
        }
    }

    /// Moves output the client's TCP has acknowledged to `delivered`.
    fn confirm(&mut self, delivered: &AtomicU64) {
        if self.in_flight.is_empty() {
            return;
        }
        self.settle_ends();
        // Read in this order, what the peer acknowledged can only be
        // underestimated.
        let sent = self.wire_sent();
        let acked_to = sent.saturating_sub(unacked_bytes(&self.sock) as u64);
        while let Some(&(Some(end), exit)) = self.in_flight.front() {
            if end > acked_to {
                break;
            }
            self.in_flight.pop_front();
            delivered.fetch_max(exit, Ordering::Release);
        }
    }

    /// Whether the client has shut down its sending side (or is gone).
    fn hung_up(&self) -> bool {
        self.input_ended.load(Ordering::Acquire) || peer_hung_up(&self.sock)
    }

    /// Ends the connection: its reader sees the end and stops.
    fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Tells a client that is not admitted why, and closes its connection
    /// (reading what it still sends, for a while, so that the message is not
    /// lost to a reset).
    fn refuse(self) {
        let _ = self.sock.set_write_timeout(Some(GREETING_TIMEOUT));
        let _ = self.sock.set_read_timeout(Some(GREETING_TIMEOUT));
        let mut io = &self.sock;
        match &self.tls {
            None => {
                let _ = io.write_all(BUSY_MESSAGE.as_bytes());
            }
            Some(tls) => {
                let mut tls = lock(tls);
                let _ = tls.conn.writer().write_all(BUSY_MESSAGE.as_bytes());
                tls.conn.send_close_notify();
                while tls.conn.wants_write() {
                    if tls.conn.write_tls(&mut io).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + GREETING_TIMEOUT;
        let mut sink = [0u8; 4096];
        while Instant::now() < deadline {
            match io.read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
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
        /// The console's client, if one is connected (shared with the
        /// console's threads, which admit and drop clients).
        client: Arc<Mutex<Option<Client>>>,
        /// Output not yet written to a client.
        backlog: Backlog,
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
            Sink::Tcp { client, backlog } => {
                // A new client (`Chunk::Connected`) has a new stream: what an
                // old one had in flight went with it, unconfirmed (a backup
                // would re-emit it).
                let mut released_at = None;
                if let Chunk::Bytes(exit, released, bytes) = chunk {
                    // Too long without a client: the oldest output goes, and
                    // counts as delivered (no one will ever get it).
                    let before = backlog.len() + bytes.len();
                    if let Some(dropped) = backlog.push(exit, &bytes) {
                        delivered.fetch_max(dropped, Ordering::Release);
                    }
                    OUTPUT_DROPPED.fetch_add(before.saturating_sub(backlog.len()) as u64, Ordering::Relaxed);
                    released_at = Some(released);
                }
                let mut slot = lock(client);
                Self::flush_backlog(&mut slot, backlog);
                // Written out now (not kept for a client to come): a hop of
                // the output's way to the world.
                if let Some(released) = released_at.filter(|_| backlog.is_empty()) {
                    record_delay(write_delay, released);
                }
                if let Some(client) = slot.as_mut() {
                    client.confirm(delivered);
                }
            }
        }
    }

    /// Writes what the client can take now; the rest stays in the backlog
    /// (a client that does not read never blocks the writer, and what waits
    /// for it is bounded by the backlog).
    fn flush_backlog(slot: &mut Option<Client>, backlog: &mut Backlog) {
        let Some(client) = slot.as_mut() else { return };
        while let Some((_, bytes)) = backlog.front() {
            let empty = bytes.is_empty();
            match client.send(bytes) {
                // Nothing taken of something: the client is full.
                Ok(0) if !empty => return,
                Ok(n) => {
                    if let Some(exit) = backlog.consume(n) {
                        client.wrote(exit);
                    }
                }
                // The client is full: the rest waits.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // The client went away: what it did not get waits for the next one.
                Err(_) => {
                    if let Some(gone) = slot.take() {
                        gone.shutdown();
                    }
                    return;
                }
            }
        }
    }

    /// Retries what waits for the client and confirms what it acknowledged;
    /// returns whether anything is still unconfirmed with a client there
    /// (then the writer looks again soon).
    fn poll(&mut self, delivered: &AtomicU64) -> bool {
        match self {
            Sink::Writer(_) => false,
            Sink::Tcp { client, backlog } => {
                let mut slot = lock(client);
                if !backlog.is_empty() {
                    Self::flush_backlog(&mut slot, backlog);
                }
                let Some(client) = slot.as_mut() else { return false };
                if client.flush().is_err() {
                    if let Some(gone) = slot.take() {
                        gone.shutdown();
                    }
                    return false;
                }
                client.confirm(delivered);
                !client.in_flight.is_empty() || !backlog.is_empty()
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
        let writer = std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Console);
            loop {
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
            }
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
    use std::io::BufRead;
    use std::time::Duration;

    #[test]
    fn parses_serial_specs() {
        assert_eq!("stdio".parse::<SerialSpec>(), Ok(SerialSpec::Stdio));
        assert_eq!("tcp:127.0.0.1:5000".parse::<SerialSpec>(), Ok(SerialSpec::tcp("127.0.0.1:5000")));
        let tls = SerialSpec::Tcp { addr: "127.0.0.1:5000".into(), tls: true, takeover: false };
        assert_eq!("tls:127.0.0.1:5000".parse::<SerialSpec>(), Ok(tls.clone()));
        assert_eq!(tls.to_string(), "tls:127.0.0.1:5000");
        assert!("tcp:".parse::<SerialSpec>().is_err());
        assert!("tls:".parse::<SerialSpec>().is_err());
        assert!("udp:1".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn tcp_console_keeps_output_until_a_client_comes_and_forwards_input() {
        let endpoint = Endpoint::bind(&SerialSpec::tcp("127.0.0.1:0"), None).unwrap();
        let addr = endpoint.local_addr().unwrap();
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
        let endpoint = Endpoint::bind(&SerialSpec::tcp("127.0.0.1:0"), None).unwrap();
        let addr = endpoint.local_addr().unwrap();
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
        let endpoint = Endpoint::bind(&SerialSpec::tcp("127.0.0.1:0"), None).unwrap();
        let addr = endpoint.local_addr().unwrap();
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

    /// A console server on loopback (taking clients over if `takeover`),
    /// started, and its address.
    fn server(takeover: bool) -> (Receiver<Vec<u8>>, OutputPort, std::net::SocketAddr) {
        let spec = SerialSpec::Tcp { addr: "127.0.0.1:0".into(), tls: false, takeover };
        let endpoint = Endpoint::bind(&spec, None).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (input, port) = endpoint.start();
        (input, port, addr)
    }

    /// Connects and waits until the console serves this client: output
    /// sent at `exit` reaches it.
    fn admitted(addr: std::net::SocketAddr, port: &OutputPort, exit: u64) -> TcpStream {
        let mut client = TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mark = format!("<{exit}>");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&got).contains(&mark) {
            assert!(Instant::now() < deadline, "the client was never served");
            port.sender().send(exit, mark.clone().into_bytes());
            client.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            if let Ok(n) = client.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client
    }

    /// Input received within `wait`, concatenated.
    fn received(input: &Receiver<Vec<u8>>, wait: Duration) -> Vec<u8> {
        let mut got = Vec::new();
        while let Ok(chunk) = input.recv_timeout(wait) {
            got.extend(chunk);
        }
        got
    }

    #[test]
    fn a_second_client_is_told_the_console_is_busy_and_the_first_keeps_it() {
        let (input, port, addr) = server(false);
        let mut first = admitted(addr, &port, 1);
        let mut second = TcpStream::connect(addr).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = second.write_all(b"intruder\n");
        let mut told = String::new();
        second.read_to_string(&mut told).unwrap();
        assert_eq!(told, BUSY_MESSAGE);
        first.write_all(b"mine\n").unwrap();
        assert_eq!(received(&input, Duration::from_millis(300)), b"mine\n");
        // Output still goes to the first client.
        port.sender().send(5, b"still yours\n".to_vec());
        let mut line = String::new();
        std::io::BufReader::new(&first).read_line(&mut line).unwrap();
        assert_eq!(line, "still yours\n");
    }

    #[test]
    fn a_client_that_hung_up_does_not_keep_the_next_one_out() {
        let (input, port, addr) = server(false);
        for round in 0..5u64 {
            let mut client = admitted(addr, &port, round + 1);
            client.write_all(format!("bye {round}\n").as_bytes()).unwrap();
            // Closed at once: the next client connects right after.
        }
        let got = received(&input, Duration::from_millis(300));
        let expected: String = (0..5).map(|r| format!("bye {r}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&got), expected, "every client's last input is delivered");
    }

    #[test]
    fn a_client_taken_over_is_cut_off_and_its_input_dropped() {
        let (input, port, addr) = server(true);
        let mut old = admitted(addr, &port, 1);
        old.write_all(b"old\n").unwrap();
        assert_eq!(received(&input, Duration::from_millis(300)), b"old\n");
        let mut new = admitted(addr, &port, 2);
        // The old connection is shut down: it reads its end (not a timeout)...
        assert!(old.read_to_end(&mut Vec::new()).is_ok(), "the old client's connection was left open");
        // ...and whatever it still manages to send is not delivered.
        let _ = old.write_all(b"stale\n");
        new.write_all(b"new\n").unwrap();
        assert_eq!(received(&input, Duration::from_millis(300)), b"new\n");
    }

    #[test]
    fn input_nobody_takes_is_bounded_and_the_client_is_held_back() {
        let (input, port, addr) = server(false);
        let mut client = admitted(addr, &port, 1);
        client.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        // Far more than the socket buffers hold: the client must block.
        let block = vec![b'x'; 1 << 20];
        let mut sent = 0usize;
        while sent < 256 << 20 {
            match client.write(&block) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(sent < 256 << 20, "256 MiB went in while nobody took any input");
        std::thread::sleep(Duration::from_millis(100));
        let held: usize = input.try_iter().map(|c| c.len()).sum();
        assert!(held <= MAX_INPUT_BUFFER, "{held} bytes held");
        assert!(held > 0, "nothing was read at all");
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
