//! The metrics server: a minimal HTTP/1.1 server that answers `GET
//! /metrics` (the registry, OpenMetrics text) and `GET /status` (the
//! program's JSON status), and nothing else.
//!
//! Threads: one accepts connections and hands them to [`WORKERS`] workers
//! through a queue of [`QUEUED`]; a connection that finds the queue full is
//! answered 503 at once and closed. A worker reads the request head (at
//! most [`MAX_REQUEST_HEAD`] bytes, all of it within [`REQUEST_TIMEOUT`] of
//! the connection's acceptance, time in the queue included), answers one request and closes the connection
//! (`Connection: close`; Prometheus reconnects for each scrape, which at a
//! scrape a second costs nothing). So a client that connects and sends
//! nothing holds one worker for at most [`REQUEST_TIMEOUT`] (and a crowd of
//! them, arriving together, all of the workers for about as long: a
//! connection that waited its time out in the queue is answered 408 at
//! once), a client that
//! sends an endless head is answered 431 after [`MAX_REQUEST_HEAD`] bytes,
//! and memory per connection is one head buffer and one answer. Garbage
//! gets 400, other methods 405, other paths 404. A panic while making an
//! answer (the status closure, a collector) is caught and answered 500.
//!
//! Dropping the [`MetricsServer`] stops it: the listen port is closed,
//! connections being served are shut down, and every thread is joined.

use crate::{TelemetryError, METRICS_CONTENT_TYPE};
use prometheus_client::registry::Registry;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request head (request line and headers) accepted, in bytes; a
/// longer one is answered 431.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// A request's head must arrive whole within this long of its connection's
/// acceptance; else the connection is answered 408 and closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an answer may take to go out before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const WORKERS: usize = 2;
/// Accepted connections waiting for a worker; beyond this they get 503.
pub const QUEUED: usize = 8;

/// Makes the `/status` document, on the server's thread, for each request.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Run first on each of the server's threads (the program confines them
/// there, for one: ftvmm's seccomp filters).
pub type OnThreadStart = Arc<dyn Fn() + Send + Sync>;

/// A running metrics server; dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    registry: Arc<Registry>,
    status: StatusFn,
    stopping: AtomicBool,
    /// The connection each worker is serving (a clone to shut it down with
    /// when the server stops).
    serving: Vec<Mutex<Option<TcpStream>>>,
}

impl MetricsServer {
    /// Listens on `addr` (e.g. `127.0.0.1:9400`; port 0 picks a free port)
    /// and serves `registry` on `/metrics` and `status()` on `/status` from
    /// background threads until dropped.
    pub fn start(
        addr: &str,
        registry: Arc<Registry>,
        status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    ) -> Result<MetricsServer, TelemetryError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| TelemetryError::Bind { addr: addr.to_string(), source })?;
        Self::start_on(listener, registry, status)
    }

    /// [`MetricsServer::start`] on a listener the caller bound.
    pub fn start_on(
        listener: TcpListener,
        registry: Arc<Registry>,
        status: StatusFn,
    ) -> Result<MetricsServer, TelemetryError> {
        Self::start_hooked(listener, registry, status, None)
    }

    /// [`MetricsServer::start_on`], each of its threads running
    /// `on_thread_start` first.
    pub fn start_hooked(
        listener: TcpListener,
        registry: Arc<Registry>,
        status: StatusFn,
        on_thread_start: Option<OnThreadStart>,
    ) -> Result<MetricsServer, TelemetryError> {
        let hook = move || {
            let hook = on_thread_start.clone();
            move || {
                if let Some(hook) = hook {
                    hook();
                }
            }
        };
        let addr = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind { addr: "the metrics listener".into(), source })?;
        let shared = Arc::new(Shared {
            registry,
            status,
            stopping: AtomicBool::new(false),
            serving: (0..WORKERS).map(|_| Mutex::new(None)).collect(),
        });
        let (queue, waiting) = sync_channel::<(TcpStream, Instant)>(QUEUED);
        let waiting = Arc::new(Mutex::new(waiting));
        let mut server = MetricsServer { addr, shared: shared.clone(), accept: None, workers: Vec::new() };
        for worker in 0..WORKERS {
            let (shared, waiting, started) = (shared.clone(), waiting.clone(), hook());
            let thread = std::thread::Builder::new()
                .name(format!("metrics-{worker}"))
                .spawn(move || {
                    started();
                    work(&shared, worker, &waiting)
                })
                .map_err(TelemetryError::Spawn)?;
            server.workers.push(thread);
        }
        let started = hook();
        let thread = std::thread::Builder::new()
            .name("metrics-accept".into())
            .spawn(move || {
                started();
                for stream in listener.incoming() {
                    if shared.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match stream {
                        Ok(stream) => match queue.try_send((stream, Instant::now())) {
                            Ok(()) => {}
                            Err(TrySendError::Full((mut stream, _))) => {
                                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                                let _ = respond(&mut stream, false, 503, "text/plain", b"busy: try again\n");
                            }
                            Err(TrySendError::Disconnected(_)) => break,
                        },
                        // E.g. out of file descriptors: do not spin on it.
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .map_err(TelemetryError::Spawn)?;
        server.accept = Some(thread);
        Ok(server)
    }

    /// The address it listens on (with the port picked, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for slot in &self.shared.serving {
            if let Some(stream) = lock(slot).as_ref() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        if let Some(accept) = self.accept.take() {
            // The accept thread is blocked in accept(): a connection wakes
            // it, and it sees `stopping`. Without the wake-up a join could
            // hang: then the thread is left be.
            let wake = match self.addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.addr.port()),
                IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.addr.port()),
                _ => self.addr,
            };
            if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_err() {
                // The workers wait for the queue the accept thread holds:
                // they are left be too.
                return;
            }
            let _ = accept.join();
        }
        // The accept thread has dropped the queue's sender: each worker
        // drops what is still queued and ends.
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A worker: serves queued connections one at a time until the queue's
/// sender is gone.
fn work(shared: &Shared, worker: usize, waiting: &Mutex<Receiver<(TcpStream, Instant)>>) {
    loop {
        let next = lock(waiting).recv();
        let Ok((mut stream, accepted)) = next else { return };
        if shared.stopping.load(Ordering::SeqCst) {
            continue;
        }
        *lock(&shared.serving[worker]) = stream.try_clone().ok();
        // A panic here would be a bug; it costs the one connection, not
        // the worker.
        let _ = catch_unwind(AssertUnwindSafe(|| serve(shared, &mut stream, accepted + REQUEST_TIMEOUT)));
        *lock(&shared.serving[worker]) = None;
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    /// GET (`head: false`) or HEAD of a path (the query string cut off).
    Get { path: &'a str, head: bool },
    /// Not an HTTP/1.x request line.
    Garbage(&'static str),
    /// A method other than GET or HEAD.
    Method,
}

/// Serves one connection: reads one request head, which must be whole by
/// `deadline`, and answers it.
fn serve(shared: &Shared, stream: &mut TcpStream, deadline: Instant) {
    let mut head = [0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = respond(stream, false, 408, "text/plain", b"the request took too long\n");
            return;
        }
        match stream.read(&mut head[len..]) {
            Ok(0) => return,
            Ok(n) => {
                let from = len.saturating_sub(3);
                len += n;
                if let Some(end) = head_end(&head[from..len]) {
                    break from + end;
                }
                if len == head.len() {
                    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
                    let _ = respond(stream, false, 431, "text/plain", b"the request head is too large\n");
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let _ = respond(stream, false, 408, "text/plain", b"the request took too long\n");
                return;
            }
            Err(_) => return,
        }
    };
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = match parse(&head[..end]) {
        Request::Garbage(why) => respond(stream, false, 400, "text/plain", format!("bad request: {why}\n").as_bytes()),
        Request::Method => respond(stream, false, 405, "text/plain", b"only GET and HEAD\n"),
        Request::Get { path: "/metrics", head } => match catch_unwind(AssertUnwindSafe(|| encode(&shared.registry))) {
            Ok(Ok(text)) => respond(stream, head, 200, METRICS_CONTENT_TYPE, text.as_bytes()),
            _ => respond(stream, head, 500, "text/plain", b"encoding the metrics failed\n"),
        },
        Request::Get { path: "/status", head } => match catch_unwind(AssertUnwindSafe(|| (shared.status)())) {
            Ok(status) => {
                let mut body = serde_json::to_vec(&status).unwrap_or_else(|_| b"{}".to_vec());
                body.push(b'\n');
                respond(stream, head, 200, "application/json", &body)
            }
            Err(_) => respond(stream, head, 500, "text/plain", b"making the status failed\n"),
        },
        Request::Get { head, .. } => respond(stream, head, 404, "text/plain", b"not found: try /metrics or /status\n"),
    };
    let _ = stream.shutdown(Shutdown::Write);
}

/// Where the head ends in `bytes` (the index past its blank line), if it
/// does: a blank line ends it, CRLF or bare LF.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a request head's first line.
fn parse(head: &[u8]) -> Request<'_> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Garbage("the request line is not UTF-8");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Garbage("want METHOD TARGET HTTP/1.x");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Request::Garbage("want METHOD TARGET HTTP/1.x");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match method {
        "GET" => Request::Get { path, head: false },
        "HEAD" => Request::Get { path, head: true },
        _ if method.bytes().all(|b| b.is_ascii_uppercase()) && !method.is_empty() => Request::Method,
        _ => Request::Garbage("the method is not a word"),
    }
}

/// The registry in the OpenMetrics text format.
fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(4096);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Writes a whole answer; `head_only` leaves out the body (a HEAD request).
fn respond(stream: &mut TcpStream, head_only: bool, code: u16, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let allow = if code == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let mut answer = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        answer.extend_from_slice(body);
    }
    stream.write_all(&answer)?;
    stream.flush()
}

/// Locks a mutex, ignoring poisoning: what it guards is a plain value.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Request::Get { path: "/metrics", head: false });
        assert_eq!(parse(b"HEAD /status?x=1 HTTP/1.0\r\n\r\n"), Request::Get { path: "/status", head: true });
        assert_eq!(parse(b"POST /status HTTP/1.1\r\n\r\n"), Request::Method);
        assert!(matches!(parse(b"GET /metrics\r\n\r\n"), Request::Garbage(_)));
        assert!(matches!(parse(b"GET metrics HTTP/1.1\r\n\r\n"), Request::Garbage(_)));
        assert!(matches!(parse(b"\xff\xfe / HTTP/1.1\r\n\r\n"), Request::Garbage(_)));
        assert!(matches!(parse(b"get / HTTP/1.1\r\n\r\n"), Request::Garbage(_)));
        assert!(matches!(parse(b""), Request::Garbage(_)));
    }

    #[test]
    fn finds_the_end_of_a_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
