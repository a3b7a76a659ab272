//! The blocking clients: [`DiskClient`] for a disk server, [`Arbiter`] for
//! go-live arbitration on either kind of server. Each keeps one connection
//! to ftdisk, re-established whenever it fails, and one session
//! ([`crate::session`]): a random session id chosen when the client is
//! created and kept across reconnections, and a sequence number per
//! request, which a retry repeats, so the server executes a retried request
//! at most once and never after a newer one.
//!
//! Bounds: a client has one request outstanding at a time and one
//! connection (a failed one is dropped before the next is made); its
//! response buffer grows to at most [`crate::MAX_FRAME`]. A server that is
//! slow or absent costs a call at most its retry time
//! ([`DiskClient::set_retry_for`]): every read and write on the socket
//! waits only until the call's deadline.

use crate::owner;
use crate::proto::{self, DiskError, Op, Reply, Request, Response, WireError};
use crate::secure::{self, ClientConn, TlsFailure};
use crate::timed::Timed;
use crate::{MAX_IO, SECTOR_SIZE};
use credentials::Tls;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// How long a client keeps retrying a request across connection failures
/// unless told otherwise ([`DiskClient::set_retry_for`]).
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(10);

/// Pause between connection attempts that keep failing.
const RECONNECT_DELAY: Duration = Duration::from_millis(50);

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused or failed the request (not retried).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// No answer could be had for this long, across reconnections.
    #[error("the disk server at {addr} was unreachable for {waited:?}: {last}")]
    Unreachable { addr: String, waited: Duration, last: String },
    /// The peer is not an ftdisk server, or not one of our version, or it
    /// answered nonsense.
    #[error("the disk server at {addr} broke the protocol: {why}")]
    Protocol { addr: String, why: String },
    /// `addr` is not `host:port`.
    #[error("invalid disk server address {addr}: {why}")]
    BadAddress { addr: String, why: String },
    /// [`DiskClient::connect`] reached an arbiter-only server, which has no
    /// disk ([`Arbiter::connect`] is the way to use one).
    #[error("the ftdisk server at {addr} is arbiter-only: it serves an arbitration record but no disk")]
    NoDisk { addr: String },
    /// The TLS handshake failed: a certificate was refused (ours by the
    /// server, or the server's by us), or the server does not speak TLS.
    #[error("the TLS handshake with the disk server at {addr} failed: {why}")]
    Tls { addr: String, why: String },
}

/// The outcome of a test-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TasOutcome {
    /// The caller owns the record: on a disk server its writes and flushes
    /// must carry `generation`.
    Won { generation: u64 },
    /// Someone else got there first: this is the record as it stands.
    Lost { generation: u64, owner: String },
}

/// What an ftdisk server serves, as its `Info` reply says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// A disk image of `size` bytes (a positive multiple of
    /// [`SECTOR_SIZE`]), and the arbitration record beside it.
    Disk { size: u64 },
    /// Only an arbitration record (`ftdisk --arbiter-only`).
    ArbiterOnly,
}

/// A connection to an ftdisk disk server, for one VMM.
///
/// Every method blocks until the server answers. When the connection fails
/// (the server restarted, a reset, a timeout) the client reconnects and
/// sends the request again, with the same session and sequence number, for
/// up to [`DiskClient::retry_for`] per call: the server answers a request
/// it already executed from memory instead of executing it again, and an
/// old copy of the request still queued in the server never executes after
/// the retry or anything newer. (Across a restart of the server a retry may
/// execute again: reads, writes and flushes are idempotent, and a
/// test-and-set recognises its own win; see [`DiskClient::test_and_set`].)
#[derive(Debug)]
pub struct DiskClient {
    link: Link,
    size: u64,
}

/// Go-live arbitration on an ftdisk server of either kind: an arbiter-only
/// one (`ftdisk --arbiter-only`), or a disk server's record (the same
/// record that fences that disk's writes). It retries across connection
/// failures like [`DiskClient`].
#[derive(Debug)]
pub struct Arbiter {
    link: Link,
    kind: ServerKind,
}

/// One session on one server: the connection, the session id and the
/// request numbering.
#[derive(Debug)]
struct Link {
    addr: String,
    /// None after a failure, until the next request reconnects.
    conn: Option<BufReader<ClientConn>>,
    /// Mutual TLS on every connection; `None`: plaintext.
    tls: Option<Tls>,
    connect_timeout: Duration,
    retry_for: Duration,
    session: u64,
    next_seq: u64,
    /// Reused for every response.
    buf: Vec<u8>,
}

/// The outcome of one attempt at a request.
enum Failure {
    /// The connection failed, or the server was busy: worth another try.
    Retry(String),
    /// Another try would fail the same way.
    Fatal(ClientError),
}

/// The retry budget of one call.
struct Retry {
    start: Instant,
    deadline: Instant,
    failures: u32,
}

impl DiskClient {
    /// Connects to the ftdisk server at `addr` (`host:port`) and learns the
    /// disk's size. A server that is not listening yet is waited for, up to
    /// `timeout`; `timeout` also bounds each later connection attempt. An
    /// arbiter-only server is refused with [`ClientError::NoDisk`].
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_secured(addr, timeout, None)
    }

    /// [`DiskClient::connect`], over mutual TLS with `tls` when given.
    pub fn connect_secured(addr: &str, timeout: Duration, tls: Option<Tls>) -> Result<Self, ClientError> {
        let (link, kind) = Link::open(addr, timeout, tls)?;
        match kind {
            ServerKind::Disk { size } => Ok(DiskClient { link, size }),
            ServerKind::ArbiterOnly => Err(ClientError::NoDisk { addr: addr.to_string() }),
        }
    }

    /// The disk's size in bytes, a multiple of [`SECTOR_SIZE`].
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `len` bytes at `offset`, in requests of at most [`MAX_IO`] bytes.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        if len > MAX_IO as usize {
            self.check_range(offset, len)?;
        }
        let mut out = Vec::with_capacity(len.min(MAX_IO as usize));
        while out.len() < len {
            let chunk = (len - out.len()).min(MAX_IO as usize);
            let at = offset + out.len() as u64;
            let op = Op::Read { offset: at, len: chunk as u32 };
            match self.link.call(op)? {
                Reply::Data(data) if data.len() == chunk => out.extend_from_slice(&data),
                Reply::Data(data) => {
                    return Err(self.link.protocol(format!("asked for {chunk} bytes, got {}", data.len())));
                }
                other => return Err(self.link.unexpected("Data", &other)),
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset` as the owner at `generation`, in requests of
    /// at most [`MAX_IO`] bytes. When this returns Ok the data is in the
    /// image (later reads see it), but only [`DiskClient::flush`] makes it
    /// durable. A transfer split in several requests is checked against the
    /// disk's size first, so an out-of-range one writes nothing; if the
    /// writer is fenced in between, a prefix may have been written.
    pub fn write(&mut self, offset: u64, data: &[u8], generation: u64) -> Result<(), ClientError> {
        if data.len() > MAX_IO as usize {
            self.check_range(offset, data.len())?;
        }
        // An empty write is still sent: it checks range and fencing.
        let mut done = 0;
        loop {
            let chunk = &data[done..data.len().min(done + MAX_IO as usize)];
            let op = Op::Write { offset: offset + done as u64, data: chunk.to_vec(), generation };
            match self.link.call(op)? {
                Reply::Done => {}
                other => return Err(self.link.unexpected("Done", &other)),
            }
            done += chunk.len();
            if done >= data.len() {
                return Ok(());
            }
        }
    }

    /// Makes every write acknowledged so far durable, as the owner at
    /// `generation`.
    pub fn flush(&mut self, generation: u64) -> Result<(), ClientError> {
        match self.link.call(Op::Flush { generation })? {
            Reply::Done => Ok(()),
            other => Err(self.link.unexpected("Done", &other)),
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), ClientError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ClientError::Disk(DiskError::OutOfRange { offset, len: len as u64, size: self.size })),
        }
    }
}

impl Arbiter {
    /// Connects to the ftdisk server at `addr` (`host:port`), arbiter-only
    /// or disk server. A server that is not listening yet is waited for, up
    /// to `timeout`; `timeout` also bounds each later connection attempt.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_secured(addr, timeout, None)
    }

    /// [`Arbiter::connect`], over mutual TLS with `tls` when given.
    pub fn connect_secured(addr: &str, timeout: Duration, tls: Option<Tls>) -> Result<Self, ClientError> {
        let (link, kind) = Link::open(addr, timeout, tls)?;
        Ok(Arbiter { link, kind })
    }

    /// What the server serves (as it said when this client connected).
    pub fn kind(&self) -> ServerKind {
        self.kind
    }
}

/// The methods both clients have, one session on one server each: its
/// address, session and retry time, and the arbitration record.
macro_rules! session_methods {
    ($($client:ident),*) => {$(
        impl $client {
            #[doc = concat!("The server's address, as given to [`", stringify!($client), "::connect`].")]
            pub fn addr(&self) -> &str {
                &self.link.addr
            }

            /// This client's session id (for logs).
            pub fn session(&self) -> u64 {
                self.link.session
            }

            /// How long one call keeps retrying across connection failures.
            pub fn retry_for(&self) -> Duration {
                self.link.retry_for
            }

            /// Sets how long one call keeps retrying across connection
            /// failures before it fails with [`ClientError::Unreachable`]; it
            /// also bounds how long one call waits for an answer.
            pub fn set_retry_for(&mut self, retry_for: Duration) {
                self.link.retry_for = retry_for;
            }

            /// The go-live arbitration: if the record's generation is
            /// `expected_generation`, it becomes `expected_generation + 1`
            /// with `owner` as the owner, and the caller has won. `owner`
            /// must be unique to this VMM (e.g. `role@host`), non-empty, at
            /// most [`crate::MAX_OWNER_LEN`] bytes and without control
            /// characters.
            ///
            /// If the connection fails after the request went out, the
            /// client sends it again (same session, same sequence number): a
            /// server that executed it answers from memory. A server that
            /// forgot it (it restarted, say) executes it again, which then
            /// loses against our own first win: an answer `Lost` that shows
            /// `owner` at `expected_generation + 1` after such a retry is
            /// reported as Won.
            pub fn test_and_set(&mut self, expected_generation: u64, owner: &str) -> Result<TasOutcome, ClientError> {
                self.link.test_and_set(expected_generation, owner)
            }

            /// The arbitration record: the owner generation and the owner's
            /// name (empty while the generation is 0).
            pub fn owner(&mut self) -> Result<(u64, String), ClientError> {
                self.link.owner()
            }

            /// The arbitration record's owner generation (0 until the first
            /// test-and-set won).
            pub fn generation(&mut self) -> Result<u64, ClientError> {
                self.link.owner().map(|(generation, _)| generation)
            }
        }
    )*};
}

session_methods!(DiskClient, Arbiter);

impl Link {
    /// A new session on the server at `addr`, and what the server serves.
    fn open(addr: &str, timeout: Duration, tls: Option<Tls>) -> Result<(Link, ServerKind), ClientError> {
        let mut link = Link {
            addr: addr.to_string(),
            conn: None,
            tls,
            connect_timeout: timeout,
            retry_for: DEFAULT_RETRY_FOR,
            session: rand::random(),
            next_seq: 1,
            buf: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        let kind = match link.call_until(Op::Info, deadline)? {
            Reply::Info { size: 0, arbiter_only: true } => ServerKind::ArbiterOnly,
            Reply::Info { size, arbiter_only: false } if size > 0 && size % SECTOR_SIZE == 0 => {
                ServerKind::Disk { size }
            }
            Reply::Info { size, arbiter_only } => {
                return Err(link.protocol(format!("its Info makes no sense (size {size}, arbiter-only {arbiter_only})")))
            }
            other => return Err(link.unexpected("Info", &other)),
        };
        debug!(addr, session = format_args!("{:016x}", link.session), ?kind, "opened a session");
        Ok((link, kind))
    }

    fn test_and_set(&mut self, expected_generation: u64, owner: &str) -> Result<TasOutcome, ClientError> {
        // Checked here too, so an invalid name fails before any retrying.
        owner::check_owner(owner).map_err(DiskError::Invalid)?;
        let request = self.request(Op::TestAndSet { expected_generation, owner: owner.to_string() })?;
        let mut retry = Retry::until(Instant::now() + self.retry_for);
        // Whether an earlier attempt may have been executed.
        let mut uncertain = false;
        loop {
            match self.attempt(&request, retry.deadline) {
                Ok(Reply::Won { generation }) => return Ok(TasOutcome::Won { generation }),
                Ok(Reply::Lost { generation, owner: holder }) => {
                    if uncertain && Some(generation) == expected_generation.checked_add(1) && holder == owner {
                        info!(generation, "test-and-set won (its answer was lost with the connection)");
                        return Ok(TasOutcome::Won { generation });
                    }
                    return Ok(TasOutcome::Lost { generation, owner: holder });
                }
                Ok(other) => return Err(self.unexpected("Won or Lost", &other)),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(why)) => {
                    uncertain = true;
                    self.wait_to_retry(&mut retry, why)?;
                }
            }
        }
    }

    fn owner(&mut self) -> Result<(u64, String), ClientError> {
        match self.call(Op::Owner)? {
            Reply::Owner { generation, owner } => Ok((generation, owner)),
            other => Err(self.unexpected("Owner", &other)),
        }
    }

    /// Sends `op`, retrying across connection failures for `retry_for`.
    fn call(&mut self, op: Op) -> Result<Reply, ClientError> {
        self.call_until(op, Instant::now() + self.retry_for)
    }

    fn call_until(&mut self, op: Op, deadline: Instant) -> Result<Reply, ClientError> {
        // Encoded once: a retry sends the same bytes, sequence number
        // included.
        let request = self.request(op)?;
        let mut retry = Retry::until(deadline);
        loop {
            match self.attempt(&request, deadline) {
                Ok(reply) => return Ok(reply),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(why)) => self.wait_to_retry(&mut retry, why)?,
            }
        }
    }

    /// Encodes `op` as the session's next request.
    fn request(&mut self, op: Op) -> Result<(u64, Vec<u8>), ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame =
            proto::encode(&Request { session: self.session, seq, op }).map_err(|e| self.protocol(e.to_string()))?;
        Ok((seq, frame))
    }

    /// One try: (re)connect if needed, send, wait for the answer until
    /// `deadline`. The connection is dropped on any failure of its own.
    fn attempt(&mut self, (seq, frame): &(u64, Vec<u8>), deadline: Instant) -> Result<Reply, Failure> {
        let result = self.exchange(*seq, frame, deadline);
        if result.is_err() {
            self.conn = None;
        }
        match result? {
            Ok(reply) => Ok(reply),
            // Nothing was executed; the connection is fine.
            Err(DiskError::Busy(why)) => Err(Failure::Retry(format!("the server is busy: {why}"))),
            Err(e) => Err(Failure::Fatal(ClientError::Disk(e))),
        }
    }

    fn exchange(&mut self, seq: u64, frame: &[u8], deadline: Instant) -> Result<Result<Reply, DiskError>, Failure> {
        remaining(deadline)?;
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.establish(deadline)?,
        };
        let conn = self.conn.insert(conn);
        // The answer must come by the deadline; waiting longer would only
        // end in Unreachable anyway.
        let socket = conn.get_mut();
        socket.timed().set_deadline(deadline);
        socket
            .write_all(frame)
            .and_then(|()| socket.flush())
            .map_err(|e| Failure::Retry(format!("sending a request: {e}")))?;
        let addr = &self.addr;
        let wire = |e: WireError| wire_failure(addr, e);
        proto::read_frame(conn, &mut self.buf).map_err(wire)?;
        let response: Response = proto::decode(&self.buf).map_err(wire)?;
        if response.seq != seq {
            return Err(Failure::Fatal(ClientError::Protocol {
                addr: self.addr.clone(),
                why: format!("got the answer to request {} instead of {seq}", response.seq),
            }));
        }
        Ok(response.result)
    }

    /// Connects and does the handshake.
    fn establish(&self, deadline: Instant) -> Result<BufReader<ClientConn>, Failure> {
        let limit = remaining(deadline)?.min(self.connect_timeout);
        let addrs: Vec<SocketAddr> = match self.addr.to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(Failure::Fatal(ClientError::BadAddress { addr: self.addr.clone(), why: e.to_string() }))
            }
            // E.g. a name server that is down for a moment.
            Err(e) => return Err(Failure::Retry(format!("resolving the address: {e}"))),
        };
        let mut last = String::from("the address resolves to nothing");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, limit) {
                Ok(stream) => return self.handshake(stream, limit),
                Err(e) => last = format!("connecting to {addr}: {e}"),
            }
        }
        Err(Failure::Retry(last))
    }

    fn handshake(&self, stream: TcpStream, limit: Duration) -> Result<BufReader<ClientConn>, Failure> {
        stream.set_nodelay(true).map_err(|e| Failure::Retry(format!("setting up the connection: {e}")))?;
        let tls_failed = |why: String| Failure::Fatal(ClientError::Tls { addr: self.addr.clone(), why });
        let conn = secure::connect(Timed::new(stream, limit), &self.addr, self.tls.as_ref()).map_err(|e| match e {
            TlsFailure::Refused(why) => tls_failed(why),
            TlsFailure::Connection(e) => Failure::Retry(format!("the TLS handshake: {e}")),
        })?;
        let mut conn = BufReader::new(conn);
        let out = conn.get_mut();
        out.write_all(&proto::preamble())
            .and_then(|()| out.flush())
            .map_err(|e| Failure::Retry(format!("sending the preamble: {e}")))?;
        proto::read_preamble(&mut conn).map_err(|e| match secure::tls_refusal(&e) {
            // TLS 1.3 lets a client finish its handshake before the server
            // has judged its certificate: a refusal arrives as an alert here.
            Some(why) => tls_failed(why),
            None => wire_failure(&self.addr, e),
        })?;
        debug!(addr = %self.addr, "connected to the disk server");
        Ok(conn)
    }

    /// Records a failed attempt; pauses before the next unless it is the
    /// first retry (a server that restarted is likely back at once), or
    /// gives up at the deadline.
    fn wait_to_retry(&self, retry: &mut Retry, why: String) -> Result<(), ClientError> {
        retry.failures += 1;
        let now = Instant::now();
        if now >= retry.deadline {
            return Err(ClientError::Unreachable { addr: self.addr.clone(), waited: now - retry.start, last: why });
        }
        if retry.failures == 1 {
            info!(addr = %self.addr, "no answer from the disk server ({why}); retrying");
        } else {
            std::thread::sleep(RECONNECT_DELAY.min(retry.deadline - now));
        }
        Ok(())
    }

    fn protocol(&self, why: String) -> ClientError {
        ClientError::Protocol { addr: self.addr.clone(), why }
    }

    fn unexpected(&self, wanted: &str, got: &Reply) -> ClientError {
        self.protocol(format!("expected a {wanted} reply, got {}", got.kind()))
    }
}

impl Retry {
    fn until(deadline: Instant) -> Self {
        Retry { start: Instant::now(), deadline, failures: 0 }
    }
}

/// What is left until `deadline`; none left is a failure that the caller's
/// retry loop turns into Unreachable.
fn remaining(deadline: Instant) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Failure::Retry("timed out".into()))
    } else {
        Ok(left)
    }
}

fn wire_failure(addr: &str, e: WireError) -> Failure {
    if e.is_connection_failure() {
        Failure::Retry(e.to_string())
    } else {
        Failure::Fatal(ClientError::Protocol { addr: addr.to_string(), why: e.to_string() })
    }
}
