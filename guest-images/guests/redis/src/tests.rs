//! The server over smoltcp, end to end on the host: a server interface and
//! a client interface joined by an in-memory Ethernet wire.

use super::*;
use resp::{Entry, Journal, NoDisk, Store};
use smoltcp::iface::{Config, Interface, SocketStorage};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of the wire.
struct End {
    rx: Queue,
    tx: Queue,
}

struct RxTok(Vec<u8>);
struct TxTok(Queue);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.borrow_mut().push_back(frame);
        r
    }
}

impl Device for End {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok;
    fn receive(&mut self, _: Instant) -> Option<(RxTok, TxTok)> {
        let frame = self.rx.borrow_mut().pop_front()?;
        Some((RxTok(frame), TxTok(self.tx.clone())))
    }
    fn transmit(&mut self, _: Instant) -> Option<TxTok> {
        Some(TxTok(self.tx.clone()))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

fn leak<T>(v: Vec<T>) -> &'static mut [T] {
    Box::leak(v.into_boxed_slice())
}

const SERVER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const MAX_REQUEST: usize = 4096;

/// A server (with `slots` connections and the given TCP buffer sizes) and
/// a client interface, and a clock.
struct Lab<D: BlockDev + 'static> {
    server: Interface,
    server_dev: End,
    server_sockets: SocketSet<'static>,
    conns: Vec<Conn<'static>>,
    engine: Engine<'static, D>,
    client: Interface,
    client_dev: End,
    client_sockets: SocketSet<'static>,
    now: Instant,
    rounds: u64,
}

fn iface(mac: u8, ip: Ipv4Address, dev: &mut End) -> Interface {
    let mut config = Config::new(EthernetAddress([2, 0, 0, 0, 0, mac]).into());
    config.random_seed = u64::from(mac);
    let mut iface = Interface::new(config, dev, Instant::ZERO);
    iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::Ipv4(ip), 24)).unwrap());
    iface
}

fn lab(slots: usize, tx_buffer: usize) -> Lab<NoDisk> {
    let entries = leak(vec![Entry::ZERO; 1024]);
    let index = leak(vec![0u32; 2048]);
    lab_with(slots, tx_buffer, Engine::new(Store::new(entries, index), None, MAX_REQUEST))
}

fn lab_with<D: BlockDev>(slots: usize, tx_buffer: usize, engine: Engine<'static, D>) -> Lab<D> {
    let (a, b): (Queue, Queue) = Default::default();
    let mut server_dev = End { rx: a.clone(), tx: b.clone() };
    let mut client_dev = End { rx: b, tx: a };
    let server = iface(1, SERVER_IP, &mut server_dev);
    let client = iface(2, Ipv4Address::new(10, 0, 0, 2), &mut client_dev);
    let mut server_sockets = SocketSet::new(leak((0..slots).map(|_| SocketStorage::EMPTY).collect()));
    let conns = (0..slots)
        .map(|_| {
            let socket = listening_socket(leak(vec![0; 4096]), leak(vec![0; tx_buffer]), PORT);
            Conn::new(server_sockets.add(socket), leak(vec![0; MAX_REQUEST]))
        })
        .collect();
    let client_sockets = SocketSet::new(leak((0..64).map(|_| SocketStorage::EMPTY).collect()));
    Lab {
        server,
        server_dev,
        server_sockets,
        conns,
        engine,
        client,
        client_dev,
        client_sockets,
        now: Instant::ZERO,
        rounds: 0,
    }
}

impl<D: BlockDev> Lab<D> {
    /// One round of both sides, as the guest's main loop does it.
    fn step(&mut self) {
        self.now += Duration::from_millis(1);
        self.client.poll(self.now, &mut self.client_dev, &mut self.client_sockets);
        self.server.poll(self.now, &mut self.server_dev, &mut self.server_sockets);
        loop {
            match serve(&mut self.server_sockets, &mut self.engine, &mut self.conns, PORT) {
                Round::Busy => {
                    self.server.poll(self.now, &mut self.server_dev, &mut self.server_sockets);
                }
                Round::Idle => break,
                Round::DiskFailed => panic!("disk failed"),
                Round::Shutdown => panic!("shutdown"),
            }
        }
        self.rounds += 1;
    }

    fn connect(&mut self, local_port: u16) -> SocketHandle {
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(leak(vec![0; 64 * 1024])),
            tcp::SocketBuffer::new(leak(vec![0; 64 * 1024])),
        );
        let handle = self.client_sockets.add(socket);
        let cx = self.client.context();
        self.client_sockets.get_mut::<tcp::Socket>(handle).connect(cx, (SERVER_IP, PORT), local_port).unwrap();
        for _ in 0..100 {
            self.step();
            if self.client_sockets.get::<tcp::Socket>(handle).may_send() {
                return handle;
            }
        }
        panic!("no connection");
    }

    fn client(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.client_sockets.get_mut::<tcp::Socket>(h)
    }

    /// Sends all of `data`, stepping while the client's buffer is full.
    fn send(&mut self, h: SocketHandle, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.client(h).send_slice(data).unwrap();
            data = &data[n..];
            self.step();
        }
    }

    /// Steps until `n` bytes arrived (or nothing more comes) and returns them.
    fn read(&mut self, h: SocketHandle, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut quiet = 0;
        while got.len() < n && quiet < 50 {
            self.step();
            let mut buf = [0u8; 8192];
            match self.client(h).recv_slice(&mut buf) {
                Ok(0) | Err(_) => quiet += 1,
                Ok(k) => {
                    quiet = 0;
                    got.extend_from_slice(&buf[..k]);
                }
            }
        }
        got
    }

    fn roundtrip(&mut self, h: SocketHandle, request: &[u8], reply_len: usize) -> String {
        self.send(h, request);
        String::from_utf8(self.read(h, reply_len)).unwrap()
    }
}

#[test]
fn ping_set_get() {
    let mut lab = lab(4, 4096);
    let c = lab.connect(50000);
    assert_eq!(lab.roundtrip(c, b"*1\r\n$4\r\nPING\r\n", 7), "+PONG\r\n");
    assert_eq!(lab.roundtrip(c, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n", 5), "+OK\r\n");
    assert_eq!(lab.roundtrip(c, b"GET k\r\n", 8), "$2\r\nv1\r\n");
}

#[test]
fn pipelined_replies_larger_than_the_transmit_buffer_all_arrive_in_order() {
    // A 1 KiB transmit buffer and 300 pipelined requests whose replies add
    // up to far more: parsing stops while there is no room, nothing is lost.
    let mut lab = lab(2, 1024);
    let c = lab.connect(50001);
    let mut request = Vec::new();
    let mut expected = String::new();
    for i in 0..300 {
        request.extend_from_slice(format!("SET key{i} value-{i:05}\r\nGET key{i}\r\nINCR n\r\n").as_bytes());
        expected.push_str(&format!("+OK\r\n$11\r\nvalue-{i:05}\r\n:{}\r\n", i + 1));
    }
    lab.send(c, &request);
    let got = String::from_utf8(lab.read(c, expected.len())).unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "replies differ");
}

#[test]
fn a_request_split_across_segments_waits_for_its_end() {
    let mut lab = lab(2, 4096);
    let c = lab.connect(50002);
    let request = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
    for chunk in request.chunks(3) {
        lab.send(c, chunk);
    }
    assert_eq!(String::from_utf8(lab.read(c, 5)).unwrap(), "+OK\r\n");
}

#[test]
fn sixteen_connections_at_once_and_slots_are_reused() {
    let mut lab = lab(16, 4096);
    let clients: Vec<_> = (0..16).map(|i| lab.connect(51000 + i)).collect();
    for (i, &c) in clients.iter().enumerate() {
        lab.send(c, format!("SET c{i} {i}\r\n").as_bytes());
    }
    for &c in &clients {
        assert_eq!(String::from_utf8(lab.read(c, 5)).unwrap(), "+OK\r\n");
    }
    assert_eq!(lab.roundtrip(clients[3], b"DBSIZE\r\n", 5), ":16\r\n");
    // Every slot is busy; closing clients frees them for new connections.
    for &c in &clients {
        lab.client(c).close();
    }
    for _ in 0..50 {
        lab.step();
    }
    for round in 0..3u16 {
        let c = lab.connect(52000 + round);
        assert_eq!(lab.roundtrip(c, b"GET c5\r\n", 7), "$1\r\n5\r\n");
        lab.client(c).close();
        for _ in 0..20 {
            lab.step();
        }
    }
}

#[test]
fn malformed_input_gets_an_error_and_the_connection_closes_others_continue() {
    let mut lab = lab(4, 4096);
    let good = lab.connect(50010);
    let bad = lab.connect(50011);
    lab.send(bad, b"*1\r\n+oops\r\n");
    let reply = String::from_utf8(lab.read(bad, 5)).unwrap();
    assert!(reply.starts_with("-ERR Protocol error"), "{reply:?}");
    for _ in 0..20 {
        lab.step();
    }
    assert!(!lab.client(bad).may_recv(), "the server closed the connection");
    assert_eq!(lab.roundtrip(good, b"PING\r\n", 7), "+PONG\r\n");
}

#[test]
fn quit_and_half_close() {
    let mut lab = lab(2, 4096);
    let c = lab.connect(50020);
    assert_eq!(lab.roundtrip(c, b"QUIT\r\n", 5), "+OK\r\n");
    for _ in 0..20 {
        lab.step();
    }
    assert!(!lab.client(c).may_recv());

    // A client that sends its commands and shuts down its sending half
    // (redis-cli --pipe, `nc -N`) still gets every reply, then a close.
    let c = lab.connect(50021);
    lab.send(c, b"SET a 1\r\nINCR a\r\nGET a\r\n");
    lab.client(c).close();
    let reply = String::from_utf8(lab.read(c, 16)).unwrap();
    assert_eq!(reply, "+OK\r\n:2\r\n$1\r\n2\r\n");
    for _ in 0..20 {
        lab.step();
    }
    assert!(!lab.client(c).is_open() || !lab.client(c).may_recv());
}

/// A disk in memory.
struct MemDisk(Rc<RefCell<Vec<u8>>>);

impl BlockDev for MemDisk {
    fn sectors(&self) -> u64 {
        (self.0.borrow().len() / 512) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
        let at = sector as usize * 512;
        buf.copy_from_slice(&self.0.borrow()[at..at + buf.len()]);
        true
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> bool {
        let at = sector as usize * 512;
        self.0.borrow_mut()[at..at + buf.len()].copy_from_slice(buf);
        true
    }
    fn flush(&mut self) -> bool {
        true
    }
}

fn disk_engine(disk: &Rc<RefCell<Vec<u8>>>) -> Engine<'static, MemDisk> {
    let mut store = Store::new(leak(vec![Entry::ZERO; 1024]), leak(vec![0u32; 2048]));
    let buf = leak(vec![0u8; 64 * 1024]);
    let (journal, _) = Journal::open(MemDisk(disk.clone()), buf, &mut store).unwrap();
    Engine::new(store, Some(journal), MAX_REQUEST)
}

#[test]
fn writes_survive_a_restart() {
    let disk = Rc::new(RefCell::new(vec![0u8; 1 << 20]));
    {
        let mut lab = lab_with(4, 4096, disk_engine(&disk));
        let c = lab.connect(50030);
        assert_eq!(
            lab.roundtrip(c, b"SET a 1\r\nMSET b 2 c 3\r\nINCR a\r\nDEL c\r\n", 20),
            "+OK\r\n+OK\r\n:2\r\n:1\r\n"
        );
    }
    let mut lab = lab_with(4, 4096, disk_engine(&disk));
    let c = lab.connect(50031);
    let reply = lab.roundtrip(c, b"MGET a b c\r\n", 25);
    assert_eq!(reply, "*3\r\n$1\r\n2\r\n$1\r\n2\r\n$-1\r\n");
}
