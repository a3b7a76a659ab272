//! The storage server: one thread accepting connections, one thread per
//! connection answering its requests in order against the image file.

use crate::owner::{self, OwnerRecord};
use crate::proto::{self, DiskError, Op, Reply, Request, Response, WireError};
use crate::{MAX_IO, SECTOR_SIZE};
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a new peer has to send its preamble.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer has to send the rest of a frame once it started one, and
/// to take a response off our hands.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection without requests for this long is closed, so that clients
/// on hosts that died do not hold a thread forever. Harmless to a live
/// client: [`crate::DiskClient`] reconnects on its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections beyond this many are closed at once: bounds the threads a
/// misbehaving client can make us start.
const MAX_CONNECTIONS: usize = 256;

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
    /// `IMAGE.owner` cannot be read, parsed or created.
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

/// The image and its arbitration record.
struct Disk {
    file: File,
    size: u64,
    owner_path: PathBuf,
    /// Writes and flushes hold it shared from their fencing check to the
    /// end of their pwrite, a test-and-set holds it exclusively from its
    /// check to the end of persisting: so no write checked against an old
    /// generation can land after a newer generation was handed out.
    record: RwLock<OwnerRecord>,
}

struct Shared {
    disk: Disk,
    stopping: AtomicBool,
    /// Connections by number, until the accept thread reaps them after
    /// they end.
    conns: Mutex<HashMap<u64, Conn>>,
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

impl Server {
    /// Opens and locks `image` (which must exist, with a size that is a
    /// positive multiple of [`SECTOR_SIZE`]), loads or creates its owner
    /// record `IMAGE.owner`, and starts serving on `listener` in background
    /// threads.
    pub fn start(image: &Path, listener: TcpListener) -> Result<Server, ServerError> {
        let disk = open_disk(image)?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServerError::Io { what: "reading the listen address".into(), source: e })?;
        let shared = Arc::new(Shared { disk, stopping: AtomicBool::new(false), conns: Mutex::new(HashMap::new()) });
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

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.disk.size
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

fn open_disk(image: &Path) -> Result<Disk, ServerError> {
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
    let owner_path = owner::sidecar_path(image);
    let record = owner::load_or_create(&owner_path).map_err(ServerError::OwnerRecord)?;
    info!(
        image = %image.display(), size, generation = record.generation, owner = %record.owner,
        "opened the image"
    );
    Ok(Disk { file, size, owner_path, record: RwLock::new(record) })
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
            warn!(%peer, "refusing a connection: {MAX_CONNECTIONS} are open already");
            continue;
        }
        let id = next_id;
        next_id += 1;
        let for_thread = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("ftdisk-conn-{id}")).spawn(move || {
            serve_connection(&for_thread.disk, stream, peer);
            if let Some(conn) = lock(&for_thread.conns).get_mut(&id) {
                conn.stream = None;
            }
        });
        match spawned {
            Ok(thread) => {
                conns.insert(id, Conn { stream: Some(handle), thread });
            }
            Err(e) => warn!(%peer, "refusing a connection: cannot start its thread: {e}"),
        }
    }
}

/// Serves one connection until it closes or misbehaves; logs one line on
/// the way out.
fn serve_connection(disk: &Disk, stream: TcpStream, peer: SocketAddr) {
    debug!(%peer, "connected");
    match converse(disk, &stream) {
        Ok(()) => debug!(%peer, "disconnected"),
        Err(e) if e.is_timeout() => info!(%peer, "dropping the connection: timed out ({e})"),
        Err(WireError::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionReset => {
            debug!(%peer, "the peer reset the connection")
        }
        Err(e) => warn!(%peer, "dropping the connection: {e}"),
    }
}

fn converse(disk: &Disk, stream: &TcpStream) -> Result<(), WireError> {
    let sock = |what: &'static str| move |e| WireError::io(what, e);
    stream.set_nodelay(true).map_err(sock("setting TCP_NODELAY"))?;
    stream.set_write_timeout(Some(FRAME_TIMEOUT)).map_err(sock("setting a write timeout"))?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(sock("setting a read timeout"))?;
    let mut out = stream;
    out.write_all(&proto::preamble()).map_err(sock("sending the preamble"))?;
    let mut input = BufReader::new(stream);
    proto::read_preamble(&mut input)?;
    let mut buf = Vec::new();
    loop {
        // Idle between requests, but once a frame has begun the rest must
        // follow promptly.
        stream.set_read_timeout(Some(IDLE_TIMEOUT)).map_err(sock("setting a read timeout"))?;
        match input.fill_buf() {
            Ok([]) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WireError::io("waiting for a request", e)),
        }
        stream.set_read_timeout(Some(FRAME_TIMEOUT)).map_err(sock("setting a read timeout"))?;
        proto::read_frame(&mut input, &mut buf)?;
        let request: Request = proto::decode(&buf)?;
        let kind = request.op.kind();
        let result = disk.handle(request.op);
        if let Err(e) = &result {
            debug!("{kind} refused: {e}");
        }
        let frame = proto::encode(&Response { id: request.id, result })?;
        out.write_all(&frame).map_err(sock("sending a response"))?;
    }
}

impl Disk {
    fn handle(&self, op: Op) -> Result<Reply, DiskError> {
        match op {
            Op::Read { offset, len } => {
                self.check_io(offset, u64::from(len))?;
                let mut data = vec![0u8; len as usize];
                self.file.read_exact_at(&mut data, offset).map_err(|e| io_error("reading the image", e))?;
                Ok(Reply::Data(data))
            }
            Op::Write { offset, data, generation } => {
                self.check_io(offset, data.len() as u64)?;
                let record = self.record.read().unwrap_or_else(PoisonError::into_inner);
                check_generation(generation, &record)?;
                self.file.write_all_at(&data, offset).map_err(|e| io_error("writing the image", e))?;
                Ok(Reply::Done)
            }
            Op::Flush { generation } => {
                // The check is all fencing needs: flushing what an
                // acknowledged write already put in the file harms no one.
                check_generation(generation, &self.record.read().unwrap_or_else(PoisonError::into_inner))?;
                self.file.sync_data().map_err(|e| io_error("flushing the image", e))?;
                Ok(Reply::Done)
            }
            Op::TestAndSet { expected_generation, owner } => self.test_and_set(expected_generation, owner),
            Op::Owner => {
                let record = self.record.read().unwrap_or_else(PoisonError::into_inner);
                Ok(Reply::Owner { generation: record.generation, owner: record.owner.clone() })
            }
            Op::Info => Ok(Reply::Info { size: self.size }),
        }
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
        owner::persist(&self.owner_path, &next).map_err(|e| io_error("persisting the owner record", e))?;
        info!(generation, owner = %next.owner, "test-and-set won: the disk has a new owner");
        *record = next;
        Ok(Reply::Won { generation })
    }

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
