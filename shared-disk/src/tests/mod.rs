//! Tests over real TCP on 127.0.0.1, with images in temporary directories.
//! Raw `std::net` sockets stand in for broken or hostile peers, and a proxy
//! ([`proxy`]) for a network that breaks connections mid-request.

mod arbiter;
mod bounds;
mod metrics;
mod props;
mod proxy;
mod sessions;
mod tls;

use crate::proto::{self, DiskError, Op, Reply, Request, Response};
use crate::*;
use proxy::{Fate, Proxy};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("shared-disk-test-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// A zero-filled image of `size` bytes in the directory.
    fn image(&self, size: u64) -> PathBuf {
        let path = self.0.join("disk.img");
        fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Shows the server's and client's logs with `--nocapture`.
fn logs() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_max_level(tracing::Level::DEBUG).try_init();
}

fn start(image: &Path) -> Server {
    logs();
    Server::start(image, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
}

/// Starts a server on the address a stopped one used.
fn restart(image: &Path, addr: SocketAddr) -> Server {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return Server::start(image, listener).unwrap(),
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

fn client(server: &Server) -> DiskClient {
    DiskClient::connect(&server.local_addr().to_string(), TIMEOUT).unwrap()
}

fn block(i: usize) -> Vec<u8> {
    (0..512).map(|j| (i * 7 + j) as u8).collect()
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting");
        thread::sleep(Duration::from_millis(5));
    }
}

fn assert_disk_error(result: Result<impl std::fmt::Debug, ClientError>, want: DiskError) {
    match result {
        Err(ClientError::Disk(e)) => assert_eq!(e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[test]
fn read_write_round_trip_and_persistence_across_restart() {
    let dir = TempDir::new("roundtrip");
    let image = dir.image(1 << 20);
    let server = start(&image);
    let addr = server.local_addr();
    let mut c = client(&server);
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.owner().unwrap(), (0, String::new()));
    assert_eq!(c.read(4096, 512).unwrap(), vec![0; 512]);
    // Generation 0: no one has gone live, as in an unreplicated run.
    c.write(4096, &block(1), 0).unwrap();
    c.write(4096 + 512 * 3, &block(2), 0).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(4096, 512).unwrap(), block(1));
    assert_eq!(c.read(4096 + 512 * 3, 512).unwrap(), block(2));
    assert_eq!(c.read(0, 0).unwrap(), Vec::<u8>::new());

    server.stop();
    let server = restart(&image, addr);
    // The same client reconnects on its own.
    assert_eq!(c.read(4096, 512).unwrap(), block(1));
    let mut fresh = client(&server);
    assert_eq!(fresh.read(4096 + 512 * 3, 512).unwrap(), block(2));
    drop(server);
    let on_disk = fs::read(&image).unwrap();
    assert_eq!(&on_disk[4096..4608], &block(1)[..]);
}

#[test]
fn large_transfers_are_split() {
    let dir = TempDir::new("large");
    let image = dir.image(12 << 20);
    let server = start(&image);
    let mut c = client(&server);
    let data: Vec<u8> = (0..(9 << 20) + 512).map(|i: usize| (i / 512) as u8 ^ i as u8).collect();
    c.write(512, &data, 0).unwrap();
    assert_eq!(c.read(512, data.len()).unwrap(), data);
    // Split transfers are range-checked up front: nothing is written.
    let size = c.size();
    assert_disk_error(
        c.write(size - (5 << 20), &vec![0xaa; 6 << 20], 0),
        DiskError::OutOfRange { offset: size - (5 << 20), len: 6 << 20, size },
    );
    assert_eq!(c.read(size - (5 << 20), 5 << 20).unwrap(), fs::read(&image).unwrap()[(7 << 20)..]);
}

#[test]
fn out_of_range_requests_fail_and_write_nothing() {
    let dir = TempDir::new("range");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let mut c = client(&server);
    let size = c.size();
    assert_disk_error(c.read(size - 512, 1024), DiskError::OutOfRange { offset: size - 512, len: 1024, size });
    assert_disk_error(c.read(u64::MAX, 1), DiskError::OutOfRange { offset: u64::MAX, len: 1, size });
    assert_disk_error(c.write(size, &[1; 512], 0), DiskError::OutOfRange { offset: size, len: 512, size });
    assert_disk_error(c.write(size - 1, &[1; 2], 0), DiskError::OutOfRange { offset: size - 1, len: 2, size });
    // Range before fencing: a stale writer out of range learns about the range.
    assert_disk_error(c.write(size, &[1; 512], 9), DiskError::OutOfRange { offset: size, len: 512, size });
    // The last sector is in range.
    c.write(size - 512, &[3; 512], 0).unwrap();
    drop(server);
    let on_disk = fs::read(&image).unwrap();
    assert!(on_disk[..size as usize - 512].iter().all(|b| *b == 0));
    assert!(on_disk[size as usize - 512..].iter().all(|b| *b == 3));
}

#[test]
fn fencing_rejects_superseded_owners() {
    let dir = TempDir::new("fence");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let mut a = client(&server);
    let mut b = client(&server);
    assert_eq!(a.test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 });
    a.write(0, &block(1), 1).unwrap();
    a.flush(1).unwrap();
    // Generation 0 writes stop once someone went live.
    assert_disk_error(b.write(0, &block(9), 0), DiskError::Fenced { yours: 0, current: 1 });
    assert_eq!(b.test_and_set(0, "backup@b").unwrap(), TasOutcome::Lost { generation: 1, owner: "primary@a".into() });
    assert_eq!(b.test_and_set(1, "backup@b").unwrap(), TasOutcome::Won { generation: 2 });

    assert_disk_error(a.write(0, &block(2), 1), DiskError::Fenced { yours: 1, current: 2 });
    assert_disk_error(a.flush(1), DiskError::Fenced { yours: 1, current: 2 });
    assert_eq!(b.read(0, 512).unwrap(), block(1));
    b.write(512, &block(3), 2).unwrap();
    b.flush(2).unwrap();
    assert_eq!(a.read(512, 512).unwrap(), block(3));
    assert_eq!(a.owner().unwrap(), (2, "backup@b".to_string()));
    assert_eq!(a.test_and_set(1, "primary@a").unwrap(), TasOutcome::Lost { generation: 2, owner: "backup@b".into() });
    drop(server);
    assert_eq!(&fs::read(&image).unwrap()[..1024], &[block(1), block(3)].concat()[..]);
}

#[test]
fn invalid_owner_names_are_refused() {
    let dir = TempDir::new("names");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let mut c = client(&server);
    for bad in ["", "two\nlines", &"x".repeat(MAX_OWNER_LEN + 1)] {
        assert!(matches!(c.test_and_set(0, bad), Err(ClientError::Disk(DiskError::Invalid(_)))), "{bad:?}");
    }
    assert_eq!(c.owner().unwrap(), (0, String::new()));
    // The server checks too, for clients that do not.
    let mut raw = raw_connect(server.local_addr());
    let reply = send(&mut raw, 1, Op::TestAndSet { expected_generation: 0, owner: "a\tb".into() });
    assert!(matches!(reply.result, Err(DiskError::Invalid(_))), "{reply:?}");
}

#[test]
fn test_and_set_race_has_one_winner() {
    let dir = TempDir::new("race");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client(&server);
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                (i, c.test_and_set(0, &format!("vmm-{i}")).unwrap())
            })
        })
        .collect();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<_> = outcomes.iter().filter(|(_, o)| matches!(o, TasOutcome::Won { .. })).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let (winner, won) = winners[0];
    assert_eq!(*won, TasOutcome::Won { generation: 1 });
    for (_, outcome) in outcomes.iter().filter(|(i, _)| i != winner) {
        assert_eq!(*outcome, TasOutcome::Lost { generation: 1, owner: format!("vmm-{winner}") });
    }
    assert_eq!(client(&server).owner().unwrap(), (1, format!("vmm-{winner}")));
}

#[test]
fn owner_record_survives_a_restart() {
    let dir = TempDir::new("record");
    let image = dir.image(64 << 10);
    let record = dir.0.join("disk.img.owner");
    let server = start(&image);
    assert_eq!(fs::read_to_string(&record).unwrap(), "ftdisk-owner 1\ngeneration 0\nowner \n");
    let addr = server.local_addr();
    let mut c = client(&server);
    assert_eq!(c.test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 });
    assert_eq!(c.test_and_set(1, "backup@b").unwrap(), TasOutcome::Won { generation: 2 });
    server.stop();
    assert_eq!(fs::read_to_string(&record).unwrap(), "ftdisk-owner 1\ngeneration 2\nowner backup@b\n");
    assert!(!dir.0.join("disk.img.owner.tmp").exists());

    let _server = restart(&image, addr);
    assert_eq!(c.owner().unwrap(), (2, "backup@b".to_string()));
    assert_disk_error(c.write(0, &block(1), 1), DiskError::Fenced { yours: 1, current: 2 });
    c.write(0, &block(1), 2).unwrap();
    assert_eq!(c.test_and_set(2, "primary@a").unwrap(), TasOutcome::Won { generation: 3 });
}

#[test]
fn start_refuses_bad_images_and_records() {
    let dir = TempDir::new("startup");
    let listener = || TcpListener::bind("127.0.0.1:0").unwrap();
    let missing = Server::start(&dir.0.join("missing.img"), listener());
    assert!(matches!(missing, Err(ServerError::OpenImage { .. })));

    let odd = dir.0.join("odd.img");
    fs::write(&odd, [0u8; 1000]).unwrap();
    assert!(matches!(Server::start(&odd, listener()), Err(ServerError::BadSize { size: 1000, .. })));
    let empty = dir.0.join("empty.img");
    fs::write(&empty, []).unwrap();
    assert!(matches!(Server::start(&empty, listener()), Err(ServerError::BadSize { size: 0, .. })));

    let image = dir.image(64 << 10);
    let server = start(&image);
    let second = Server::start(&image, listener());
    assert!(matches!(second, Err(ServerError::Busy(_))), "{:?}", second.err());
    drop(server);

    // A damaged record is an error, never a silent reset to generation 0.
    let record = dir.0.join("disk.img.owner");
    for damaged in ["", "ftdisk-owner 1\ngeneration x\nowner a\n", "ftdisk-owner 1\ngeneration 3\nowner a", "junk"] {
        fs::write(&record, damaged).unwrap();
        let err = Server::start(&image, listener()).err();
        assert!(matches!(err, Some(ServerError::OwnerRecord(_))), "{damaged:?}: {err:?}");
        let shown = err.unwrap().to_string();
        assert!(!shown.contains('\n'), "{shown}");
    }
}

/// A raw connection that has done the handshake.
fn raw_connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&proto::preamble()).unwrap();
    proto::read_preamble(&mut s).unwrap();
    s
}

/// The session of the raw connections of tests.
const RAW_SESSION: u64 = 0x5e55_10e0;

fn send(s: &mut TcpStream, seq: u64, op: Op) -> Response {
    send_in(s, RAW_SESSION, seq, op)
}

fn send_in(s: &mut TcpStream, session: u64, seq: u64, op: Op) -> Response {
    s.write_all(&proto::encode(&Request { session, seq, op }).unwrap()).unwrap();
    let mut buf = Vec::new();
    proto::read_frame(s, &mut buf).unwrap();
    let response: Response = proto::decode(&buf).unwrap();
    assert_eq!(response.seq, seq);
    response
}

/// Sends `bytes` on a fresh connection and returns what the server sent
/// back before closing it: the server must close it, not hang.
fn hostile(addr: SocketAddr, bytes: &[u8], then_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(bytes).unwrap();
    if then_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // Closing with our bytes unread makes the server's kernel reset.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close the connection after {bytes:02x?}: {e}"),
        }
    }
}

fn with_preamble(rest: &[u8]) -> Vec<u8> {
    [&proto::preamble()[..], rest].concat()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    [&(payload.len() as u32).to_le_bytes()[..], payload].concat()
}

#[test]
fn hostile_peers_are_dropped_and_change_nothing() {
    let dir = TempDir::new("hostile");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let addr = server.local_addr();
    let mut good = client(&server);

    let version = |v: u32| {
        let mut preamble = proto::preamble();
        preamble[8..].copy_from_slice(&v.to_le_bytes());
        preamble.to_vec()
    };
    let valid = proto::encode(&Request { session: 1, seq: 1, op: Op::Info }).unwrap();
    let write = proto::encode(&Request {
        session: 1,
        seq: 1,
        op: Op::Write { offset: 0, data: vec![0xee; 512], generation: 0 },
    })
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false),
        ("wrong magic", b"FTDISK02\x01\0\0\0".to_vec(), false),
        ("version 1", version(1), false),
        ("a newer version", version(PROTOCOL_VERSION + 1), false),
        ("short preamble", b"FTDI".to_vec(), true),
        ("oversize length", with_preamble(&(MAX_FRAME + 1).to_le_bytes()), false),
        ("maximal length", with_preamble(&u32::MAX.to_le_bytes()), false),
        ("truncated length", with_preamble(&[5, 0]), true),
        ("truncated frame", with_preamble(&[&100u32.to_le_bytes()[..], &[1; 10]].concat()), true),
        ("truncated write", with_preamble(&write[..write.len() - 1]), true),
        ("undecodable payload", with_preamble(&frame(&[0xff; 8])), false),
        ("unknown op", with_preamble(&frame(&[1, 1, 42])), false),
        ("empty payload", with_preamble(&frame(&[])), false),
        ("trailing bytes", with_preamble(&frame(&[&valid[4..], &[0][..]].concat())), false),
        // A write whose data length claims more than the frame holds.
        ("lying length", with_preamble(&frame(&[1, 1, 1, 0, 0xfc, 0xff, 0xff, 0xff, 0x0f])), false),
    ];
    for (name, bytes, then_close) in &cases {
        let got = hostile(addr, bytes, *then_close);
        // At most the server's preamble: no response to anything.
        assert!(got.len() <= 12, "{name}: the server sent {got:02x?}");
        assert_eq!(good.read(0, 512).unwrap(), vec![0; 512], "{name}");
    }

    // Well-formed requests that are wrong get error responses, and the
    // connection stays usable.
    let mut raw = raw_connect(addr);
    let size = 64 << 10;
    let refused = [
        (
            Op::Read { offset: 0, len: MAX_IO + 1 },
            DiskError::TooLarge { len: u64::from(MAX_IO) + 1, max: MAX_IO.into() },
        ),
        (Op::Read { offset: size, len: 1 }, DiskError::OutOfRange { offset: size, len: 1, size }),
        (
            Op::Write { offset: size - 256, data: vec![1; 512], generation: 0 },
            DiskError::OutOfRange { offset: size - 256, len: 512, size },
        ),
        (Op::Write { offset: 0, data: vec![1; 512], generation: 7 }, DiskError::Fenced { yours: 7, current: 0 }),
        (Op::Flush { generation: 7 }, DiskError::Fenced { yours: 7, current: 0 }),
        (
            Op::Write { offset: 0, data: vec![1; MAX_IO as usize + 1], generation: 0 },
            DiskError::TooLarge { len: u64::from(MAX_IO) + 1, max: MAX_IO.into() },
        ),
    ];
    for (i, (op, want)) in refused.into_iter().enumerate() {
        let kind = op.kind();
        assert_eq!(send(&mut raw, i as u64 + 1, op).result, Err(want), "{kind}");
    }
    assert_eq!(send(&mut raw, 99, Op::Info).result, Ok(Reply::Info { size, arbiter_only: false }));

    assert_eq!(good.owner().unwrap(), (0, String::new()));
    good.write(512, &block(5), 0).unwrap();
    assert_eq!(good.read(512, 512).unwrap(), block(5));
    drop(server);
    let on_disk = fs::read(&image).unwrap();
    assert!(on_disk[..512].iter().chain(&on_disk[1024..]).all(|b| *b == 0));
}

#[test]
fn writes_acknowledged_across_a_server_restart_are_all_there() {
    let dir = TempDir::new("restart");
    let image = dir.image(4 << 20);
    let server = start(&image);
    let addr = server.local_addr();
    let written = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut c = client(&server);
        let (written, done) = (written.clone(), done.clone());
        thread::spawn(move || {
            let mut i = 0;
            while !done.load(Ordering::SeqCst) && i < 8192 {
                c.write(i as u64 * 512, &block(i), 0).unwrap();
                i += 1;
                written.store(i, Ordering::SeqCst);
            }
            i
        })
    };
    wait_until(|| written.load(Ordering::SeqCst) >= 20);
    server.stop();
    // The writer is now retrying.
    thread::sleep(Duration::from_millis(100));
    let before = written.load(Ordering::SeqCst);
    let server = restart(&image, addr);
    wait_until(|| written.load(Ordering::SeqCst) >= before + 20);
    done.store(true, Ordering::SeqCst);
    let n = writer.join().unwrap();
    let mut c = client(&server);
    let all = c.read(0, n * 512).unwrap();
    for i in 0..n {
        assert_eq!(&all[i * 512..(i + 1) * 512], &block(i)[..], "block {i}");
    }
}

#[test]
fn a_client_gives_up_after_retry_for() {
    let dir = TempDir::new("unreachable");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let mut c = client(&server);
    c.set_retry_for(Duration::from_millis(300));
    server.stop();
    let started = Instant::now();
    let err = c.read(0, 512).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(!err.to_string().contains('\n'));

    let started = Instant::now();
    let err = DiskClient::connect(c.addr(), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(DiskClient::connect("no-port", TIMEOUT), Err(ClientError::BadAddress { .. })));
}

#[test]
fn a_client_refuses_a_server_that_is_not_ftdisk() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
        let _ = s.read(&mut [0u8; 64]);
    });
    let started = Instant::now();
    let err = DiskClient::connect(&addr.to_string(), TIMEOUT).unwrap_err();
    assert!(matches!(err, ClientError::Protocol { .. }), "{err}");
    assert!(started.elapsed() < TIMEOUT);
    fake.join().unwrap();
}

/// Forwards connections to `target`, and loses the answer to the
/// `lose_frame`th request (counting from 1, over all connections): the
/// request was executed, but its answer is lost with the connection.
fn lossy_proxy(target: SocketAddr, lose_frame: usize) -> Proxy {
    let mut n = 0;
    Proxy::start(target, move |_| {
        n += 1;
        if n == lose_frame {
            Fate::LoseAnswer
        } else {
            Fate::Pass
        }
    })
}

#[test]
fn a_test_and_set_whose_answer_was_lost_still_wins_once() {
    let dir = TempDir::new("tas-lost");
    let image = dir.image(64 << 10);
    let server = start(&image);
    // Frame 1 answers Info (in connect), frame 2 the test-and-set.
    let proxy = lossy_proxy(server.local_addr(), 2);
    let mut c = DiskClient::connect(&proxy.addr().to_string(), TIMEOUT).unwrap();
    assert_eq!(c.test_and_set(0, "backup@b").unwrap(), TasOutcome::Won { generation: 1 });
    // Won once: a blind retry would have reported Lost, or won twice.
    assert_eq!(c.owner().unwrap(), (1, "backup@b".to_string()));
    c.write(0, &block(1), 1).unwrap();
}

#[test]
fn a_lost_answer_to_someone_elses_win_is_not_taken_for_ours() {
    let dir = TempDir::new("tas-other");
    let image = dir.image(64 << 10);
    let server = start(&image);
    let proxy = lossy_proxy(server.local_addr(), 2);
    let mut c = DiskClient::connect(&proxy.addr().to_string(), TIMEOUT).unwrap();
    // Our test-and-set from generation 0 loses and its answer is lost; the
    // record then shows generation 1, expected + 1, but not our name.
    assert_eq!(client(&server).test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 });
    assert_eq!(c.test_and_set(0, "backup@b").unwrap(), TasOutcome::Lost { generation: 1, owner: "primary@a".into() });
}

#[test]
fn errors_display_on_one_line() {
    let errors: Vec<Box<dyn std::error::Error>> = vec![
        Box::new(DiskError::Fenced { yours: 1, current: 2 }),
        Box::new(DiskError::OutOfRange { offset: 1, len: 2, size: 3 }),
        Box::new(ClientError::Unreachable { addr: "h:1".into(), waited: Duration::from_secs(10), last: "x".into() }),
        Box::new(ServerError::BadSize { path: "/x".into(), size: 3 }),
    ];
    for e in errors {
        let shown = e.to_string();
        assert!(!shown.is_empty() && !shown.contains('\n'), "{shown:?}");
    }
}

#[test]
fn a_client_can_move_to_the_vcpu_thread() {
    fn send<T: Send>() {}
    send::<DiskClient>();
    send::<Arbiter>();
    send::<Server>();
}
