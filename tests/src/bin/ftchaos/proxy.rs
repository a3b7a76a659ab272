//! A TCP proxy that can be cut (a partition) and restored, and slowed (a
//! loaded SAN): every side's logging channel and way to the ftdisk run
//! through one. It is the harness's own, not `ftvmm_tests::tcp_relay`:
//! [`Proxy`] says why.

use crate::lock;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) struct ProxyState {
    target: String,
    cut: AtomicBool,
    closed: AtomicBool,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    /// Microseconds each chunk waits before it is passed on, in either
    /// direction (slow storage; shared by the scenario's storage proxies).
    delay_us: Option<Arc<AtomicU64>>,
    /// Bytes read from a client (a side) and not yet passed on to the
    /// target: its requests (writes) still in the network.
    pub(crate) in_flight_up: AtomicU64,
}

impl ProxyState {
    /// Waits while the proxy is cut; false once it is closed.
    fn wait_while_cut(&self) -> bool {
        while self.cut.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(2));
        }
        !self.closed.load(Ordering::Acquire)
    }
}

/// Cut, it holds every byte and every close in both directions (and new
/// connections are not passed on), as a partitioned network would; restored,
/// it lets them through, or resets every connection. A storage proxy may
/// also be slow: each chunk waits the scenario's current storage delay
/// before it is passed on (as a loaded SAN answers), in order.
///
/// (Not `ftvmm_tests::tcp_relay`: that one listens on 127.0.0.1 only — the
/// redis lab's hosts reach these on the LAN's bridge —, stops accepting
/// once its target refuses a connection — an ftdisk restart would end it
/// —, and can neither hold a close nor reset its connections.)
pub(crate) struct Proxy {
    pub(crate) addr: String,
    pub(crate) state: Arc<ProxyState>,
}

impl Proxy {
    /// A proxy to `target`, listening on `ip` (any port).
    pub(crate) fn new(ip: &str, target: &str) -> Proxy {
        Proxy::with_delay(ip, target, None)
    }

    /// A proxy to `target`, listening on `ip`, whose chunks each wait
    /// `delay_us` microseconds (read at every chunk) if given.
    pub(crate) fn with_delay(ip: &str, target: &str, delay_us: Option<Arc<AtomicU64>>) -> Proxy {
        let listener = TcpListener::bind(format!("{ip}:0")).expect("bind a proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(ProxyState {
            target: target.to_string(),
            cut: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            next: AtomicU64::new(0),
            conns: Mutex::default(),
            delay_us,
            in_flight_up: AtomicU64::new(0),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.closed.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                let st = st.clone();
                std::thread::spawn(move || Proxy::serve(client, st));
            }
        });
        Proxy { addr, state }
    }

    fn serve(client: TcpStream, st: Arc<ProxyState>) {
        if !st.wait_while_cut() {
            return;
        }
        let Ok(server) = TcpStream::connect(&st.target) else { return };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = st.next.fetch_add(1, Ordering::AcqRel);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
        if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
            lock(&st.conns).insert(id, (c3, s3));
        }
        let st2 = st.clone();
        let up = std::thread::spawn(move || Proxy::pump(c2, s2, &st2, true));
        Proxy::pump(server, client, &st, false);
        let _ = up.join();
        lock(&st.conns).remove(&id);
    }

    /// Passes on what `from` sends to `to` (`up`: from the client to the
    /// target).
    fn pump(mut from: TcpStream, mut to: TcpStream, st: &ProxyState, up: bool) {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let counted = if up { n as u64 } else { 0 };
            st.in_flight_up.fetch_add(counted, Ordering::AcqRel);
            if n > 0 {
                let delay = st.delay_us.as_ref().map_or(0, |d| d.load(Ordering::Acquire));
                if delay > 0 {
                    std::thread::sleep(Duration::from_micros(delay));
                }
            }
            let passed = st.wait_while_cut() && n > 0 && to.write_all(&buf[..n]).is_ok();
            st.in_flight_up.fetch_sub(counted, Ordering::AcqRel);
            if !passed {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }

    pub(crate) fn cut(&self) {
        self.state.cut.store(true, Ordering::Release);
    }

    pub(crate) fn restore(&self, reset: bool) {
        if reset {
            self.reset();
        }
        self.state.cut.store(false, Ordering::Release);
    }

    pub(crate) fn reset(&self) {
        for (c, s) in lock(&self.state.conns).values() {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::Release);
        self.state.cut.store(false, Ordering::Release);
        self.reset();
        let _ = TcpStream::connect(&self.addr);
    }
}
