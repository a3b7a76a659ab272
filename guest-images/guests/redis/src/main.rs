//! redis: a RESP2 server on TCP port 6379 that stock `redis-cli` and
//! `redis-benchmark` work against, over virtio-net with smoltcp.
//!
//! Command line: `ip=A.B.C.D/N` (required) and `gw=A.B.C.D` (optional).
//! Commands: PING ECHO SET GET DEL EXISTS INCR INCRBY DECR DECRBY MSET MGET
//! DBSIZE FLUSHALL, SHUTDOWN (the VM exits with status 0), plus harmless
//! answers to what clients send at start (COMMAND, CONFIG GET, INFO, HELLO,
//! CLIENT, SELECT 0); see the `resp` crate, which holds the parser, the
//! store and the engine.
//!
//! Bulk services for throughput measurements: discard on TCP port 9, and a
//! source of `x` bytes on port 19 (see `redis::Bulk`).
//!
//! Up to [`CONNS`] connections at once, each a listening socket that listens
//! again once its connection has closed. Each round of the main loop reads
//! what every connection received, answers every complete command in it
//! (pipelining), stops a connection's parsing while its transmit buffer has
//! no room for the next reply, and then commits the round's writes.
//!
//! Persistence: with a virtio disk, every write command is logged (see
//! `resp::log`) and the round's records are written and flushed (one
//! notify for both) before any of its replies leave the guest (they sit in
//! the sockets' buffers until the next poll of the stack); at boot the log
//! is replayed. Without a disk the store lives in memory only. A disk that fails stops the server (exit
//! status 3) rather than send replies for writes that are not durable.
#![no_std]
#![no_main]

use guest_rt::net::smoltcp::iface::{SocketSet, SocketStorage};
use guest_rt::net::smoltcp::socket::tcp;
use guest_rt::net::{IpConfig, IpConfigError, MacDisplay, Service, Stack};
use guest_rt::virtio_blk::{self, Disk};
use guest_rt::virtio_net;
use guest_rt::{hw, println, Static};
use redis::{listening_socket, serve, Bulk, Conn, Round, DISCARD_PORT, PORT, SOURCE_PORT};
use resp::{BlockDev, Engine, Entry, Journal, Store};

guest_rt::entry!(main);

/// Connection slots. smoltcp has no listen backlog: a SYN that finds no
/// socket listening is answered with a reset, and a slot is busy until its
/// connection has closed, so there are enough for a client that opens a new
/// batch while the old one is still closing (redis-benchmark opens 50 per
/// test by default, right after closing the previous test's 50).
const CONNS: usize = 160;
/// Each socket's receive and transmit buffers.
const SOCKET_RX: usize = 8 * 1024;
const SOCKET_TX: usize = 16 * 1024;
/// Each connection's buffer of received, not yet answered bytes: the
/// longest request.
const INPUT: usize = 16 * 1024;
/// Keys the store holds, and its index (at least twice as many, a power of two).
const KEYS: usize = 16 * 1024;
const INDEX: usize = 32 * 1024;
/// The journal's batch buffer.
const JOURNAL: usize = 64 * 1024;
/// The bulk services' socket buffers, each way (window scaling makes all of
/// it the TCP window: a receive window of 64 KiB held the guest to 64 KiB a
/// commit round trip with a backup).
const BULK_BUF: usize = 256 * 1024;

/// Everything large, all zero (so it is .bss and costs the image nothing).
struct Memory {
    entries: [Entry; KEYS],
    index: [u32; INDEX],
    journal: [u8; JOURNAL],
    socket_rx: [[u8; SOCKET_RX]; CONNS],
    socket_tx: [[u8; SOCKET_TX]; CONNS],
    inputs: [[u8; INPUT]; CONNS],
    bulk_rx: [[u8; BULK_BUF]; 2],
    bulk_tx: [[u8; BULK_BUF]; 2],
}

static MEMORY: Static<Memory> = Static::new(Memory {
    entries: [Entry::ZERO; KEYS],
    index: [0; INDEX],
    journal: [0; JOURNAL],
    socket_rx: [[0; SOCKET_RX]; CONNS],
    socket_tx: [[0; SOCKET_TX]; CONNS],
    inputs: [[0; INPUT]; CONNS],
    bulk_rx: [[0; BULK_BUF]; 2],
    bulk_tx: [[0; BULK_BUF]; 2],
});

/// The Redis connections' sockets and the two bulk services'.
static SOCKETS: Static<[SocketStorage<'static>; CONNS + 2]> = Static::new([SocketStorage::EMPTY; CONNS + 2]);

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
    /// A commit's write and flush go to the device with one notify (one
    /// exit, not two), and are waited for together.
    fn write_and_flush(&mut self, sector: u64, buf: &[u8]) -> bool {
        self.0.write_and_flush(sector, buf)
    }
}

/// A bulk service's socket: Nagle off, [`BULK_BUF`] each way.
fn bulk_socket(rx: &'static mut [u8], tx: &'static mut [u8]) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    socket.set_nagle_enabled(false);
    socket.set_timeout(Some(guest_rt::net::smoltcp::time::Duration::from_secs(30)));
    socket
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
        Some(j) => (true, store.len(), j.records(), j.sectors_used(), j.sectors_total()),
        None => (false, 0, 0, 0, 0),
    };
    let mut engine = Engine::new(store, journal, INPUT);

    let mut stack = Stack::new(nic, &ip);
    let Some(storage) = SOCKETS.take() else {
        return 1;
    };
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut conns = memory.socket_rx.iter_mut().zip(memory.socket_tx.iter_mut()).zip(memory.inputs.iter_mut()).map(
        |((rx, tx), input)| Conn::new(sockets.add(listening_socket(&mut rx[..], &mut tx[..], PORT)), &mut input[..]),
    );
    let mut slots: [Conn; CONNS] = core::array::from_fn(|_| conns.next().expect("one socket per slot"));
    let [discard_rx, source_rx] = &mut memory.bulk_rx;
    let [discard_tx, source_tx] = &mut memory.bulk_tx;
    let bulk = [
        Bulk::new(&mut sockets, bulk_socket(&mut discard_rx[..], &mut discard_tx[..]), DISCARD_PORT),
        Bulk::new(&mut sockets, bulk_socket(&mut source_rx[..], &mut source_tx[..]), SOURCE_PORT),
    ];

    match disk_note {
        (true, keys, records, used, total) => println!(
            "redis: listening on {}:{} (mac {}, disk: {} keys loaded from {} records, log {} of {} sectors)",
            ip.address.address(),
            PORT,
            MacDisplay(stack.mac()),
            keys,
            records,
            used,
            total
        ),
        (false, ..) => println!(
            "redis: listening on {}:{} (mac {}, disk: none)",
            ip.address.address(),
            PORT,
            MacDisplay(stack.mac())
        ),
    }

    stack.run(&mut sockets, |sockets, _now| {
        let bulk_moved = bulk.iter().fold(false, |moved, b| b.serve(sockets) | moved);
        match serve(sockets, &mut engine, &mut slots, PORT) {
            Round::Busy => Service::Busy,
            Round::Idle if bulk_moved => Service::Busy,
            Round::Idle => Service::Idle,
            Round::Shutdown => {
                println!("redis: shutting down ({} commands served)", engine.commands());
                Service::Exit(0)
            }
            Round::DiskFailed => {
                println!("redis: the disk failed; stopping without sending replies for writes that may not be durable");
                Service::Exit(3)
            }
        }
    })
}
