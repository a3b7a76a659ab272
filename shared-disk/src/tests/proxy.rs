//! A TCP proxy between a client and an ftdisk server that breaks
//! connections in the middle of requests, as a flaky network would.

use crate::proto::{self, Request};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fate {
    /// Forward it and its answer.
    Pass,
    /// Forward it, then close the client's connection at once, before any
    /// answer: the request runs (or waits) in the server, and its answer
    /// goes nowhere.
    ResetAfterForward,
    /// Forward it and wait for the answer, then close the client's
    /// connection instead of forwarding the answer.
    LoseAnswer,
    /// Close the client's connection at once and forward the request only
    /// after this long, on the old connection to the server: the original
    /// is still on its way when the client retries.
    Delay(Duration),
}

type Decide = dyn FnMut(&Request) -> Fate + Send;

pub(super) struct Proxy {
    addr: SocketAddr,
    /// Requests forwarded whose answer the server has not sent yet, of
    /// connections the client no longer has.
    orphans: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

impl Proxy {
    /// Proxies connections to `target`, asking `decide` the fate of every
    /// request.
    pub(super) fn start(target: SocketAddr, decide: impl FnMut(&Request) -> Fate + Send + 'static) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let decide: Arc<Mutex<Box<Decide>>> = Arc::new(Mutex::new(Box::new(decide)));
        let orphans = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (o, s) = (orphans.clone(), stopping.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { return };
                let (decide, orphans) = (decide.clone(), o.clone());
                thread::spawn(move || {
                    // A server that is down (restarting) shows as a closed
                    // connection: the client retries.
                    if let Ok(server) = TcpStream::connect(target) {
                        relay(client, server, &decide, &orphans);
                    }
                });
            }
        });
        Proxy { addr, orphans, stopping }
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until every orphaned request has been answered by the server
    /// (delayed ones included).
    pub(super) fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.orphans.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "orphaned requests never got their answers");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Relays one client connection; returns when either side is done.
fn relay(mut client: TcpStream, mut server: TcpStream, decide: &Mutex<Box<Decide>>, orphans: &Arc<AtomicUsize>) {
    let limit = Some(Duration::from_secs(20));
    for s in [&client, &server] {
        let _ = s.set_read_timeout(limit);
        let _ = s.set_nodelay(true);
    }
    // The client sends its preamble before it reads the server's.
    let mut preamble = [0u8; 12];
    if server.read_exact(&mut preamble).is_err() || client.write_all(&preamble).is_err() {
        return;
    }
    if client.read_exact(&mut preamble).is_err() || server.write_all(&preamble).is_err() {
        return;
    }
    let mut buf = Vec::new();
    loop {
        if proto::read_frame(&mut client, &mut buf).is_err() {
            return;
        }
        let request_frame = super::frame(&buf);
        let fate = match proto::decode::<Request>(&buf) {
            Ok(request) => (decide.lock().unwrap())(&request),
            Err(_) => Fate::Pass,
        };
        match fate {
            Fate::Pass => {
                if server.write_all(&request_frame).is_err() || proto::read_frame(&mut server, &mut buf).is_err() {
                    return;
                }
                if client.write_all(&super::frame(&buf)).is_err() {
                    return;
                }
            }
            Fate::LoseAnswer => {
                if server.write_all(&request_frame).is_ok() {
                    let _ = proto::read_frame(&mut server, &mut buf);
                }
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            Fate::ResetAfterForward => {
                let forwarded = server.write_all(&request_frame).is_ok();
                let _ = client.shutdown(Shutdown::Both);
                if forwarded {
                    orphans.fetch_add(1, Ordering::SeqCst);
                    let _ = proto::read_frame(&mut server, &mut buf);
                    orphans.fetch_sub(1, Ordering::SeqCst);
                }
                return;
            }
            Fate::Delay(delay) => {
                orphans.fetch_add(1, Ordering::SeqCst);
                let _ = client.shutdown(Shutdown::Both);
                thread::sleep(delay);
                if server.write_all(&request_frame).is_ok() {
                    let _ = proto::read_frame(&mut server, &mut buf);
                }
                orphans.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
    }
}
