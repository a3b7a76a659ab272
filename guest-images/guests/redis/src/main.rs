//! redis: a RESP2 server on TCP port 6379 that stock `redis-cli` and
//! `redis-benchmark` work against, over virtio-net with smoltcp.
//!
//! Command line: `ip=A.B.C.D/N` (required) and `gw=A.B.C.D` (optional).
//! Commands: PING ECHO SET GET DEL EXISTS INCR INCRBY DECR DECRBY MSET MGET
//! DBSIZE FLUSHALL, plus harmless answers to what clients send at start
//! (COMMAND, CONFIG GET, INFO, HELLO, CLIENT, SELECT 0); see the `resp`
//! crate, which holds the parser, the store and the engine.
//!
//! Up to [`CONNS`] connections at once, each a listening socket that listens
//! again once its connection has closed. Each round of the main loop reads
//! what every connection received, answers every complete command in it
//! (pipelining), stops a connection's parsing while its transmit buffer has
//! no room for the next reply, and then commits the round's writes.
//!
//! Persistence: with a virtio disk, every write command is logged (see
//! `resp::log`) and the round's records are written and flushed before any
//! of its replies leave the guest (they sit in the sockets' buffers until
//! the next poll of the stack); at boot the log is replayed. Without a disk
//! the store lives in memory only. A disk that fails stops the server (exit
//! status 3) rather than send replies for writes that are not durable.
#![no_std]
#![no_main]

use guest_rt::net::smoltcp::iface::{SocketHandle, SocketSet, SocketStorage};
use guest_rt::net::smoltcp::socket::tcp;
use guest_rt::net::{IpConfig, IpConfigError, MacDisplay, Service, Stack};
use guest_rt::virtio_blk::{self, Disk};
use guest_rt::virtio_net;
use guest_rt::{hw, println, Static};
use resp::{BlockDev, Engine, Entry, Journal, Sink, Status, Store};

guest_rt::entry!(main);

const PORT: u16 = 6379;
/// Connections served at once (redis-benchmark opens 50 by default).
const CONNS: usize = 64;
/// Each socket's receive and transmit buffers.
const SOCKET_RX: usize = 16 * 1024;
const SOCKET_TX: usize = 16 * 1024;
/// Each connection's buffer of received, not yet answered bytes: the
/// longest request.
const INPUT: usize = 16 * 1024;
/// Keys the store holds, and its index (at least twice as many, a power of two).
const KEYS: usize = 16 * 1024;
const INDEX: usize = 32 * 1024;
/// The journal's batch buffer.
const JOURNAL: usize = 64 * 1024;

/// Everything large, all zero (so it is .bss and costs the image nothing).
struct Memory {
    entries: [Entry; KEYS],
    index: [u32; INDEX],
    journal: [u8; JOURNAL],
    socket_rx: [[u8; SOCKET_RX]; CONNS],
    socket_tx: [[u8; SOCKET_TX]; CONNS],
    inputs: [[u8; INPUT]; CONNS],
}

static MEMORY: Static<Memory> = Static::new(Memory {
    entries: [Entry::ZERO; KEYS],
    index: [0; INDEX],
    journal: [0; JOURNAL],
    socket_rx: [[0; SOCKET_RX]; CONNS],
    socket_tx: [[0; SOCKET_TX]; CONNS],
    inputs: [[0; INPUT]; CONNS],
});

static SOCKETS: Static<[SocketStorage<'static>; CONNS]> = Static::new([SocketStorage::EMPTY; CONNS]);

/// The virtio disk as the journal's block device.
struct DiskDev(Disk);

impl BlockDev for DiskDev {
    fn sectors(&self) -> u64 {
        self.0.sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
        self.0.read(sector, buf)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> bool {
        self.0.write(sector, buf)
    }
    fn flush(&mut self) -> bool {
        self.0.flush()
    }
}

/// A socket's transmit buffer as the engine's output.
struct SocketSink<'s, 'a>(&'s mut tcp::Socket<'a>);

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

/// One connection slot.
struct Conn {
    handle: SocketHandle,
    input: &'static mut [u8; INPUT],
    len: usize,
    /// Closing: the last reply is queued, further input is ignored.
    closing: bool,
    /// What the last feed stopped at.
    last: Status,
}

fn main() -> u8 {
    hw::pic_init_auto_eoi();
    let nic = match virtio_net::init() {
        Ok(nic) => nic,
        Err(virtio_net::Error::NoDevice) => {
            println!("redis: no network card (run ftvmm with --net tap:IFNAME)");
            return 1;
        }
        Err(e) => {
            println!("redis: the network card did not start: {:?}", e);
            return 1;
        }
    };
    let ip = match IpConfig::from_cmdline() {
        Ok(ip) => ip,
        Err(e) => {
            let why = match e {
                IpConfigError::Missing => "no ip= on the command line",
                IpConfigError::BadAddress => "ip= is not A.B.C.D/N",
                IpConfigError::BadGateway => "gw= is not A.B.C.D",
            };
            println!("redis: {} (ftvmm --cmdline \"ip=A.B.C.D/N [gw=A.B.C.D]\")", why);
            return 1;
        }
    };

    let Some(memory) = MEMORY.take() else {
        return 1;
    };
    let mut store = Store::new(&mut memory.entries, &mut memory.index);
    let journal = match virtio_blk::init() {
        None => None,
        Some(disk) => match Journal::open(DiskDev(disk), &mut memory.journal, &mut store) {
            Ok((journal, loaded)) => {
                if loaded.failed > 0 {
                    println!("redis: {} logged writes did not fit in the store", loaded.failed);
                }
                Some(journal)
            }
            Err(_) => {
                println!("redis: cannot read the disk");
                return 1;
            }
        },
    };
    let disk_note = match &journal {
        Some(j) => (true, store.len(), j.records(), j.sectors_total()),
        None => (false, 0, 0, 0),
    };
    let mut engine = Engine::new(store, journal, INPUT);

    let mut stack = Stack::new(nic, &ip);
    let Some(storage) = SOCKETS.take() else {
        return 1;
    };
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut conns = memory.socket_rx.iter_mut().zip(memory.socket_tx.iter_mut()).zip(memory.inputs.iter_mut()).map(
        |((rx, tx), input)| {
            let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(&mut rx[..]), tcp::SocketBuffer::new(&mut tx[..]));
            // Replies go out at once, not held back for earlier ones' ACKs.
            socket.set_nagle_enabled(false);
            let _ = socket.listen(PORT);
            Conn { handle: sockets.add(socket), input, len: 0, closing: false, last: Status::NeedInput }
        },
    );
    let mut slots: [Option<Conn>; CONNS] = [const { None }; CONNS];
    for slot in slots.iter_mut() {
        *slot = conns.next();
    }

    match disk_note {
        (true, keys, records, sectors) => println!(
            "redis: listening on {}:{} (mac {}, disk: {} keys loaded from {} records, {} sectors)",
            ip.address.address(),
            PORT,
            MacDisplay(stack.mac()),
            keys,
            records,
            sectors
        ),
        (false, ..) => println!(
            "redis: listening on {}:{} (mac {}, disk: none)",
            ip.address.address(),
            PORT,
            MacDisplay(stack.mac())
        ),
    }

    stack.run(&mut sockets, |sockets, _now| serve(sockets, &mut engine, &mut slots))
}

/// One round over every connection: listen again where one closed, take
/// in what arrived, answer it, then commit the round's writes.
fn serve<D: BlockDev>(sockets: &mut SocketSet<'_>, engine: &mut Engine<'_, D>, slots: &mut [Option<Conn>]) -> Service {
    let mut busy = false;
    for conn in slots.iter_mut().flatten() {
        let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
        if !socket.is_open() {
            conn.len = 0;
            conn.closing = false;
            conn.last = Status::NeedInput;
            let _ = socket.listen(PORT);
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
        if conn.len < INPUT && socket.can_recv() {
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
            if fed.status == Status::Close {
                conn.closing = true;
                socket.close();
                continue;
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
    // Before any reply of this round can leave (at the next poll), its
    // writes are on the disk.
    if !engine.commit() {
        println!("redis: the disk failed; stopping without sending replies for writes that may not be durable");
        return Service::Exit(3);
    }
    if busy {
        Service::Busy
    } else {
        Service::Idle
    }
}
