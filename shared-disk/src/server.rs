//! The storage server: one thread accepting connections, one thread per
//! connection answering its requests in order, against the image file and
//! the arbitration record (or, arbiter-only, against the record alone).
//!
//! Every request goes through its client's session ([`crate::session`]):
//! requests of one session are executed one at a time, each at most once,
//! never an older after a newer.
//!
//! Bounds, per connection: one request is read and answered at a time, and
//! the next is not read until the answer has been handed to the kernel, so
//! a client that sends but never reads costs one answer (at most
//! [`crate::MAX_FRAME`]) plus the kernel's socket buffers, and is dropped when that
//! answer has not gone out within [`FRAME_TIMEOUT`]; the frame buffer grows
//! to at most [`crate::MAX_FRAME`] and is shrunk back to [`RETAINED_BUFFER`] after a
//! larger request. A frame must arrive whole within [`FRAME_TIMEOUT`] of its
//! first byte, a new peer must send its preamble within
//! [`HANDSHAKE_TIMEOUT`], and a connection idle for [`IDLE_TIMEOUT`] is
//! closed. Server-wide: at most [`MAX_CONNECTIONS`] connections (so
//! threads), and at most [`crate::session::MAX_SESSIONS`] sessions of
//! [`crate::session::REPLY_CACHE`] remembered answers each.

use crate::metrics::{kind_index, DiskMetrics};
use crate::owner::{self, OwnerRecord};
use crate::proto::{self, DiskError, Op, Reply, Request, Response, WireError};
use crate::secure::{self, Access};
use crate::session::{Disposition, Sessions, Slot, MAX_SESSIONS};
use crate::timed::Timed;
use crate::{MAX_IO, SECTOR_SIZE};
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a new peer has to send its preamble.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer has to send the rest of a frame once it started one, and
/// to take an answer off our hands (the whole of it, not per byte).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection without requests for this long is closed, so that clients
/// on hosts that died do not hold a thread forever. Harmless to a live
/// client: [`crate::DiskClient`] reconnects on its next request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections beyond this many are closed at once: bounds the threads a
/// misbehaving client can make us start.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection's frame buffer is shrunk back to this after a larger
/// request, so idle connections do not each keep [`crate::MAX_FRAME`] bytes.
pub const RETAINED_BUFFER: usize = 64 << 10;
/// The size of a connection's input buffer (requests smaller than this
/// are read in one system call).
const INPUT_BUFFER: usize = 8 << 10;

// An open connection keeps at most one session in use; with more sessions
// than connections, a new session always finds one to evict.
const _: () = assert!(MAX_SESSIONS > MAX_CONNECTIONS);

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The image does not exist, is not a regular file or cannot be opened
    /// for reading and writing.
    #[error("cannot open the image {path}: {source}")]
    OpenImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image's size does not make a disk.
    #[error("the image {path} is {size} bytes, not a positive multiple of {SECTOR_SIZE}")]
    BadSize { path: PathBuf, size: u64 },
    /// Two servers on one image would each arbitrate on their own.
    #[error("the image {0} is already being served (it is locked)")]
    Busy(PathBuf),
    /// Two servers on one arbitration record would each arbitrate on their
    /// own.
    #[error("the arbitration record {0} is already being served (its lock file {0}.lock is locked)")]
    RecordBusy(PathBuf),
    /// The arbitration record (`IMAGE.owner`, or the state file of an
    /// arbiter-only server) cannot be read, parsed, created or locked.
    #[error("the owner record: {0}")]
    OwnerRecord(String),
    /// A socket operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Counts of what a server did, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Requests executed (new ones, and reads repeated by a retry).
    pub executed: u64,
    /// Writes that went into the image.
    pub writes_applied: u64,
    /// Retries answered with the outcome remembered from the first time,
    /// without executing them again.
    pub answered_from_memory: u64,
    /// Requests not executed because their session had moved past them (or
    /// that contradicted what the session remembered).
    pub refused_stale: u64,
    /// Sessions kept now.
    pub sessions: usize,
    /// Sessions forgotten because the table was full.
    pub sessions_evicted: u64,
    /// Connection threads that panicked: a bug (each ends only its own
    /// connection). Tests check it stays 0.
    pub connection_panics: u64,
}

/// The timeouts of a server's connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub(crate) handshake: Duration,
    pub(crate) frame: Duration,
    pub(crate) idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { handshake: HANDSHAKE_TIMEOUT, frame: FRAME_TIMEOUT, idle: IDLE_TIMEOUT }
    }
}

/// The image.
struct Image {
    file: File,
    size: u64,
}

/// What a server serves: the image (none when arbiter-only) and the
/// arbitration record.
struct Store {
    image: Option<Image>,
    record_path: PathBuf,
    /// Writes and flushes hold it shared from their fencing check to the
    /// end of their pwrite, a test-and-set holds it exclusively from its
    /// check to the end of persisting: so no write checked against an old
    /// generation can land after a newer generation was handed out.
    record: RwLock<OwnerRecord>,
    /// `RECORD.lock`, locked while the server runs.
    _record_lock: File,
}

struct Shared {
    store: Store,
    sessions: Arc<Sessions>,
    /// What it counts (also what [`ServerStats`] reports).
    metrics: Arc<DiskMetrics>,
    timeouts: Timeouts,
    /// TLS and authorization; `None`: plaintext, anyone may do anything.
    access: Option<Access>,
    stopping: AtomicBool,
    /// Connections by number, until the accept thread reaps them after
    /// they end.
    conns: Mutex<HashMap<u64, Conn>>,
    executed: AtomicU64,
    writes_applied: AtomicU64,
}

struct Conn {
    /// A handle to shut the connection down with; the connection's thread
    /// clears it when it ends, so that the socket closes then.
    stream: Option<TcpStream>,
    /// Joined when the server stops: only then is the thread's share of the
    /// image (and its lock) surely released.
    thread: JoinHandle<()>,
}

/// A running ftdisk server. Dropping it stops it, like [`Server::stop`].
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// Serves `image` on `listener` until the process ends: [`Server::start`]
/// then [`Server::wait`].
pub fn serve(image: &Path, listener: TcpListener) -> Result<(), ServerError> {
    Server::start(image, listener)?.wait();
    Ok(())
}

/// Serves only the arbitration record kept in `state` on `listener` until
/// the process ends: [`Server::start_arbiter`] then [`Server::wait`].
pub fn serve_arbiter(state: &Path, listener: TcpListener) -> Result<(), ServerError> {
    Server::start_arbiter(state, listener)?.wait();
    Ok(())
}

impl Server {
    /// Opens and locks `image` (which must exist, with a size that is a
    /// positive multiple of [`SECTOR_SIZE`]), loads or creates its owner
    /// record `IMAGE.owner` (and locks it through `IMAGE.owner.lock`), and
    /// starts serving on `listener` in background threads.
    pub fn start(image: &Path, listener: TcpListener) -> Result<Server, ServerError> {
        Self::launch(open_disk(image)?, listener, Timeouts::default(), None)
    }

    /// [`Server::start`], with mutual TLS and authorization when `access`
    /// is given (see [`crate::secure`]).
    pub fn start_secured(image: &Path, listener: TcpListener, access: Option<Access>) -> Result<Server, ServerError> {
        Self::launch(open_disk(image)?, listener, Timeouts::default(), access)
    }

    /// [`Server::start_arbiter`], with mutual TLS and authorization when
    /// `access` is given.
    pub fn start_arbiter_secured(
        state: &Path,
        listener: TcpListener,
        access: Option<Access>,
    ) -> Result<Server, ServerError> {
        Self::launch(open_record(state, None)?, listener, Timeouts::default(), access)
    }

    /// An arbiter-only server: no image, only the arbitration record, kept
    /// in the file `state` exactly as `IMAGE.owner` is for a disk (created,
    /// at generation 0, if missing; locked through `STATE.lock`). Reads,
    /// writes and flushes are answered with [`DiskError::NoImage`].
    pub fn start_arbiter(state: &Path, listener: TcpListener) -> Result<Server, ServerError> {
        Self::launch(open_record(state, None)?, listener, Timeouts::default(), None)
    }

    /// [`Server::start`] with other timeouts (for tests).
    #[cfg(test)]
    pub(crate) fn start_with(image: &Path, listener: TcpListener, timeouts: Timeouts) -> Result<Server, ServerError> {
        Self::launch(open_disk(image)?, listener, timeouts, None)
    }

    fn launch(
        store: Store,
        listener: TcpListener,
        timeouts: Timeouts,
        access: Option<Access>,
    ) -> Result<Server, ServerError> {
        let addr = listener
            .local_addr()
            .map_err(|e| ServerError::Io { what: "reading the listen address".into(), source: e })?;
        let sessions = Arc::new(Sessions::new());
        let (generation, owner) = {
            let record = store.record.read().unwrap_or_else(PoisonError::into_inner);
            (record.generation, record.owner.clone())
        };
        let size = store.image.as_ref().map_or(0, |image| image.size);
        let metrics = Arc::new(DiskMetrics::new(sessions.clone(), generation, owner, size));
        let shared = Arc::new(Shared {
            store,
            sessions,
            metrics,
            timeouts,
            access,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            executed: AtomicU64::new(0),
            writes_applied: AtomicU64::new(0),
        });
        let for_thread = shared.clone();
        let accept = std::thread::Builder::new()
            .name("ftdisk-accept".into())
            .spawn(move || accept_loop(listener, for_thread))
            .map_err(|e| ServerError::Io { what: "starting the accept thread".into(), source: e })?;
        Ok(Server { addr, shared, accept: Some(accept) })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The disk's size in bytes; 0 for an arbiter-only server.
    pub fn size(&self) -> u64 {
        self.shared.store.image.as_ref().map_or(0, |image| image.size)
    }

    /// True for a server started with [`Server::start_arbiter`].
    pub fn is_arbiter_only(&self) -> bool {
        self.shared.store.image.is_none()
    }

    /// What the server did so far.
    pub fn stats(&self) -> ServerStats {
        let s = &self.shared;
        let (sessions, sessions_evicted) = s.sessions.counts();
        ServerStats {
            executed: s.executed.load(Ordering::Relaxed),
            writes_applied: s.writes_applied.load(Ordering::Relaxed),
            answered_from_memory: s.metrics.retries_answered.load(Ordering::Relaxed),
            refused_stale: s.metrics.stale.load(Ordering::Relaxed),
            sessions,
            sessions_evicted,
            connection_panics: s.metrics.panics.load(Ordering::Relaxed),
        }
    }

    /// Its counters, for metrics ([`crate::metrics`]): they go on being
    /// readable after the server stops (they hold no file).
    pub fn metrics(&self) -> Arc<DiskMetrics> {
        self.shared.metrics.clone()
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).values().filter(|conn| !conn.thread.is_finished()).count()
    }

    /// Holds the arbitration record's lock, as a slow test-and-set would:
    /// writes, flushes and test-and-sets wait until the guard is dropped.
    #[cfg(test)]
    pub(crate) fn stall(&self) -> std::sync::RwLockWriteGuard<'_, OwnerRecord> {
        self.shared.store.record.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks while the server runs (forever, unless its accept thread dies).
    pub fn wait(mut self) {
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }

    /// Stops accepting, closes every connection and waits for their
    /// threads: when this returns, no request is being served, the listen
    /// port is free and the image is closed (and unlocked). Writes already
    /// acknowledged are in the image file (but only flushed ones are
    /// durable against a host crash).
    pub fn stop(self) {
        // Drop does the work.
    }

    fn shutdown(&mut self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(accept) = self.accept.take() {
            // The accept thread is blocked in accept(): a connection wakes
            // it, and it sees `stopping`.
            let wake = match self.addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.addr.port()),
                IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.addr.port()),
                _ => self.addr,
            };
            match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
                Ok(_) => {
                    let _ = accept.join();
                }
                // Without the wake-up the join could hang: leave the thread be.
                Err(e) => warn!(addr = %self.addr, "could not wake the accept thread to stop it: {e}"),
            }
        }
        let conns: Vec<Conn> = lock(&self.shared.conns).drain().map(|(_, conn)| conn).collect();
        for conn in conns {
            if let Some(stream) = conn.stream {
                // Unblocks the thread's read; it ends after its current request.
                let _ = stream.shutdown(Shutdown::Both);
            }
            let _ = conn.thread.join();
        }
        info!(addr = %self.addr, "stopped serving");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn open_disk(image: &Path) -> Result<Store, ServerError> {
    let open_err = |source| ServerError::OpenImage { path: image.to_path_buf(), source };
    let file = OpenOptions::new().read(true).write(true).open(image).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(ServerError::BadSize { path: image.to_path_buf(), size });
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(ServerError::Busy(image.to_path_buf())),
        Err(TryLockError::Error(e)) => return Err(open_err(e)),
    }
    let store = open_record(&owner::sidecar_path(image), Some(Image { file, size }))?;
    info!(image = %image.display(), size, "opened the image");
    Ok(store)
}

/// Locks the record at `path` (through `PATH.lock`) and loads it, creating
/// it if missing.
fn open_record(path: &Path, image: Option<Image>) -> Result<Store, ServerError> {
    let lock_path = owner::lock_path(path);
    let record_lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| ServerError::OwnerRecord(format!("opening the lock file {}: {e}", lock_path.display())))?;
    match record_lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(ServerError::RecordBusy(path.to_path_buf())),
        Err(TryLockError::Error(e)) => {
            return Err(ServerError::OwnerRecord(format!("locking {}: {e}", lock_path.display())))
        }
    }
    let record = owner::load_or_create(path).map_err(ServerError::OwnerRecord)?;
    info!(
        record = %path.display(), generation = record.generation, owner = %record.owner,
        arbiter_only = image.is_none(), "loaded the arbitration record"
    );
    Ok(Store { image, record_path: path.to_path_buf(), record: RwLock::new(record), _record_lock: record_lock })
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                warn!("accepting a connection failed: {e}");
                // E.g. out of file descriptors: do not spin on it.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = match stream.peer_addr() {
            Ok(peer) => peer,
            Err(e) => {
                debug!("a connection closed before it could be served: {e}");
                continue;
            }
        };
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                warn!(%peer, "refusing a connection: {e}");
                continue;
            }
        };
        // Held across the spawn, so that a thread that ends at once finds
        // its entry.
        let mut conns = lock(&shared.conns);
        // A finished thread has dropped everything it held: no need to join.
        conns.retain(|_, conn| !conn.thread.is_finished());
        if conns.len() >= MAX_CONNECTIONS {
            shared.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, "refusing a connection: {MAX_CONNECTIONS} are open already");
            continue;
        }
        let id = next_id;
        next_id += 1;
        let for_thread = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("ftdisk-conn-{id}")).spawn(move || {
            let _count = CountPanic(&for_thread.metrics.panics);
            let _open = CountOpen::new(&for_thread.metrics.connections);
            serve_connection(&for_thread, stream, peer);
            if let Some(conn) = lock(&for_thread.conns).get_mut(&id) {
                conn.stream = None;
            }
        });
        match spawned {
            Ok(thread) => {
                shared.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
                conns.insert(id, Conn { stream: Some(handle), thread });
            }
            Err(e) => warn!(%peer, "refusing a connection: cannot start its thread: {e}"),
        }
    }
}

/// Counts the connection threads that panicked (a bug; it ends only that
/// connection).
struct CountPanic<'a>(&'a AtomicU64);

impl Drop for CountPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a connection as open while it lives.
struct CountOpen<'a>(&'a AtomicU64);

impl<'a> CountOpen<'a> {
    fn new(open: &'a AtomicU64) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        CountOpen(open)
    }
}

impl Drop for CountOpen<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection until it closes or misbehaves; logs one line on
/// the way out.
fn serve_connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    debug!(%peer, "connected");
    match converse(shared, &stream, peer) {
        Ok(()) => debug!(%peer, "disconnected"),
        Err(e) if e.is_timeout() => info!(%peer, "dropping the connection: timed out ({e})"),
        Err(WireError::Io { source, .. }) if source.kind() == ErrorKind::ConnectionReset => {
            debug!(%peer, "the peer reset the connection")
        }
        // A TLS client that goes away without a close_notify: what a
        // client that drops its connection does.
        Err(WireError::Io { what, source }) if what == WAITING && source.kind() == ErrorKind::UnexpectedEof => {
            debug!(%peer, "disconnected")
        }
        Err(e) => warn!(%peer, "dropping the connection: {e}"),
    }
}

const WAITING: &str = "waiting for a request";

fn converse(shared: &Shared, stream: &TcpStream, peer: SocketAddr) -> Result<(), WireError> {
    let timeouts = shared.timeouts;
    stream.set_nodelay(true).map_err(|e| WireError::io("setting TCP_NODELAY", e))?;
    let tls = shared.access.as_ref().map(|access| &access.tls);
    let (conn, name) = secure::accept(Timed::new(stream, timeouts.handshake), tls)
        .map_err(|e| WireError::io("refusing the TLS handshake", e))?;
    let authorized = shared.access.as_ref().is_none_or(|access| access.allows(name.as_deref()));
    if let Some(name) = &name {
        if authorized {
            debug!(%peer, name, "TLS: a certificate from our CA");
        } else {
            warn!(%peer, name, "TLS: the certificate is not on the allow list: it may not read, write or claim");
        }
    }
    let mut input = BufReader::with_capacity(INPUT_BUFFER, conn);
    input.get_mut().write_all(&proto::preamble()).map_err(|e| WireError::io("sending the preamble", e))?;
    input.get_mut().flush().map_err(|e| WireError::io("sending the preamble", e))?;
    proto::read_preamble(&mut input)?;
    let mut buf = Vec::new();
    // The session of the last request: kept in use (not evictable) while
    // this connection is open.
    let mut session: Option<Arc<Slot>> = None;
    loop {
        // Idle between requests, but once a frame has begun the rest must
        // follow promptly.
        input.get_mut().timed().set_within(timeouts.idle);
        match input.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(WireError::io(WAITING, e)),
        }
        input.get_mut().timed().set_within(timeouts.frame);
        proto::read_frame(&mut input, &mut buf)?;
        let request: Request = proto::decode(&buf)?;
        if buf.capacity() > RETAINED_BUFFER {
            buf = Vec::with_capacity(RETAINED_BUFFER);
        }
        let seq = request.seq;
        let kind = kind_index(&request.op);
        shared.metrics.requests[kind].fetch_add(1, Ordering::Relaxed);
        let result = match (&name, authorized || !request.op.needs_authorization()) {
            (_, true) => shared.handle(request, &mut session),
            // Refused before its session sees it: nothing is executed.
            (name, false) => {
                let name = name.clone().unwrap_or_default();
                warn!(%peer, name, "refused a {} from a certificate that is not on the allow list", request.op.kind());
                Err(DiskError::Forbidden { name })
            }
        };
        if result.is_err() {
            shared.metrics.errors[kind].fetch_add(1, Ordering::Relaxed);
        }
        let frame = proto::encode(&Response { seq, result })?;
        // Not reading the next request until this answer is out bounds what
        // a client that does not read can make us hold.
        let out = input.get_mut();
        out.timed().set_within(timeouts.frame);
        out.write_all(&frame).and_then(|()| out.flush()).map_err(|e| WireError::io("sending a response", e))?;
    }
}

impl Shared {
    /// Handles one request in its session (see [`crate::session`]).
    fn handle(&self, request: Request, session: &mut Option<Arc<Slot>>) -> Result<Reply, DiskError> {
        let Request { session: id, seq, op } = request;
        let slot = match session {
            Some(slot) if slot.id() == id => {
                self.sessions.touch(slot);
                slot.clone()
            }
            _ => {
                let slot = self.sessions.slot(id)?;
                *session = Some(slot.clone());
                slot
            }
        };
        let kind = op.kind();
        // What the metrics need of the op, which `execute` consumes.
        let written = match &op {
            Op::Write { data, .. } => Some(data.len() as u64),
            _ => None,
        };
        let claimant = match &op {
            Op::TestAndSet { owner, .. } => Some(owner.clone()),
            _ => None,
        };
        let is_flush = matches!(op, Op::Flush { .. });
        let (result, disposition) = slot.handle(seq, op, |op| self.store.execute(op, &self.writes_applied));
        let m = &self.metrics;
        match disposition {
            Disposition::Executed | Disposition::ReadAgain => {
                self.executed.fetch_add(1, Ordering::Relaxed);
                match (&result, written) {
                    (Ok(Reply::Data(data)), _) => {
                        m.bytes_read.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    (Ok(Reply::Done), Some(len)) => {
                        m.bytes_written.fetch_add(len, Ordering::Relaxed);
                    }
                    (Err(DiskError::Fenced { .. }), Some(_)) => {
                        m.fenced_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    (Err(DiskError::Fenced { .. }), None) if is_flush => {
                        m.fenced_flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    (Ok(Reply::Won { generation }), _) => {
                        m.tas_won.fetch_add(1, Ordering::Relaxed);
                        m.set_owner(*generation, claimant.unwrap_or_default());
                    }
                    (Ok(Reply::Lost { .. }), _) => {
                        m.tas_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            Disposition::Remembered => {
                m.retries_answered.fetch_add(1, Ordering::Relaxed);
                debug!(session = format_args!("{id:016x}"), seq, "{kind} retried: answered from memory");
            }
            Disposition::Refused => {
                m.stale.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(e) = &result {
            debug!(session = format_args!("{id:016x}"), seq, "{kind} refused: {e}");
        }
        result
    }
}

impl Store {
    fn execute(&self, op: Op, writes_applied: &AtomicU64) -> Result<Reply, DiskError> {
        match op {
            Op::Read { offset, len } => {
                let image = self.image()?;
                image.check_io(offset, u64::from(len))?;
                let mut data = vec![0u8; len as usize];
                image.file.read_exact_at(&mut data, offset).map_err(|e| io_error("reading the image", e))?;
                Ok(Reply::Data(data))
            }
            Op::Write { offset, data, generation } => {
                let image = self.image()?;
                image.check_io(offset, data.len() as u64)?;
                let record = self.record.read().unwrap_or_else(PoisonError::into_inner);
                check_generation(generation, &record)?;
                image.file.write_all_at(&data, offset).map_err(|e| io_error("writing the image", e))?;
                writes_applied.fetch_add(1, Ordering::Relaxed);
                Ok(Reply::Done)
            }
            Op::Flush { generation } => {
                let image = self.image()?;
                // The check is all fencing needs: flushing what an
                // acknowledged write already put in the file harms no one.
                check_generation(generation, &self.record.read().unwrap_or_else(PoisonError::into_inner))?;
                image.file.sync_data().map_err(|e| io_error("flushing the image", e))?;
                Ok(Reply::Done)
            }
            Op::TestAndSet { expected_generation, owner } => self.test_and_set(expected_generation, owner),
            Op::Owner => {
                let record = self.record.read().unwrap_or_else(PoisonError::into_inner);
                Ok(Reply::Owner { generation: record.generation, owner: record.owner.clone() })
            }
            Op::Info => Ok(match &self.image {
                Some(image) => Reply::Info { size: image.size, arbiter_only: false },
                None => Reply::Info { size: 0, arbiter_only: true },
            }),
        }
    }

    fn image(&self) -> Result<&Image, DiskError> {
        self.image.as_ref().ok_or(DiskError::NoImage)
    }

    fn test_and_set(&self, expected: u64, owner: String) -> Result<Reply, DiskError> {
        owner::check_owner(&owner).map_err(DiskError::Invalid)?;
        let mut record = self.record.write().unwrap_or_else(PoisonError::into_inner);
        if record.generation != expected {
            return Ok(Reply::Lost { generation: record.generation, owner: record.owner.clone() });
        }
        let generation = expected.checked_add(1).ok_or(DiskError::Invalid("the generation is exhausted".into()))?;
        let next = OwnerRecord { generation, owner };
        // Persisted before it takes effect: a win that a restart could
        // forget would let two VMMs believe they own the disk.
        owner::persist(&self.record_path, &next).map_err(|e| io_error("persisting the owner record", e))?;
        info!(generation, owner = %next.owner, "test-and-set won: the record has a new owner");
        *record = next;
        Ok(Reply::Won { generation })
    }
}

impl Image {
    /// A transfer must fit in one request and in the disk.
    fn check_io(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len > u64::from(MAX_IO) {
            return Err(DiskError::TooLarge { len, max: u64::from(MAX_IO) });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange { offset, len, size: self.size }),
        }
    }
}

/// Fencing: only the current owner generation may write.
fn check_generation(yours: u64, record: &OwnerRecord) -> Result<(), DiskError> {
    if yours == record.generation {
        Ok(())
    } else {
        Err(DiskError::Fenced { yours, current: record.generation })
    }
}

fn io_error(what: &str, e: std::io::Error) -> DiskError {
    warn!("{what}: {e}");
    DiskError::Io(format!("{what}: {e}"))
}

/// Locks a mutex, ignoring poisoning: the map behind it is consistent after
/// every statement.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
