//! Tests over real TCP on 127.0.0.1. Raw `std::net` sockets stand in for
//! broken, hostile or silent peers.

use crate::wire::{self, Message};
use crate::*;
use replay::{Digest, Entry, Event, ExitKind, Header, Position, Record, RecordSink, RecordSource, TimeSource};
use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Slack for timing assertions on a shared 2-core machine.
const MARGIN: Duration = Duration::from_millis(500);

fn header() -> Header {
    Header { image_hash: Digest([1; 32]), config: "mem=64M".into(), wall_clock_base_ns: 1_000, disk_generation: 0 }
}

/// For tests of loss detection: a short heartbeat timeout.
fn fast() -> ChannelConfig {
    ChannelConfig { heartbeat_timeout: Duration::from_millis(100), ..ChannelConfig::default() }
}

/// For everything else: a heartbeat timeout that a loaded machine running
/// unoptimized code does not trip by accident.
fn steady() -> ChannelConfig {
    ChannelConfig { heartbeat_timeout: Duration::from_millis(500), ..ChannelConfig::default() }
}

fn exit_record(exit: u64) -> Record {
    Record {
        position: Position { exit, rip: 0x1000 + exit },
        entry: Entry::Exit(ExitKind::IoIn { port: 0x40, size: 1 }),
    }
}

fn time_record(exit: u64) -> Record {
    Record {
        position: Position { exit, rip: 0x1000 + exit },
        entry: Entry::Event(Event::TimeRead { source: TimeSource::Pit, ns: exit * 7 }),
    }
}

/// A connected primary/backup pair.
fn pair(config: &ChannelConfig) -> (PrimaryLink, BackupLink) {
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let backup_config = config.clone();
    let backup = thread::spawn(move || BackupLink::connect(&addr, &header(), &backup_config, Duration::from_secs(2)));
    let primary = listener.accept(&header(), config).unwrap();
    let (backup, info) = backup.join().unwrap().unwrap();
    assert_eq!(info, PrimaryInfo { header: header(), start: LogStart::Boot });
    (primary, backup)
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// Reads one frame from a raw socket.
fn read_raw_frame(s: &mut TcpStream) -> Message<'static> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut payload).unwrap();
    wire::decode(&payload).unwrap()
}

fn write_raw(s: &mut TcpStream, msg: &Message<'_>) {
    s.write_all(&wire::encode(msg).unwrap()).unwrap();
}

/// Plays a backup by hand up to Welcome; returns the socket.
fn fake_backup(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&wire::preamble()).unwrap();
    let mut pre = [0u8; 12];
    s.read_exact(&mut pre).unwrap();
    assert_eq!(pre, wire::preamble());
    assert!(matches!(read_raw_frame(&mut s), Message::Hello { .. }));
    write_raw(&mut s, &Message::Welcome);
    s
}

/// A primary link whose backup is played by hand.
fn primary_with_fake_backup(config: &ChannelConfig) -> (PrimaryLink, TcpStream) {
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let fake = thread::spawn(move || fake_backup(addr));
    let primary = listener.accept(&header(), config).unwrap();
    (primary, fake.join().unwrap())
}

/// Plays a primary by hand up to Welcome, then runs `then` on the socket.
fn fake_primary(then: impl FnOnce(TcpStream) + Send + 'static) -> (String, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = wire::preamble().to_vec();
        hello.extend(wire::encode(&Message::Hello { header: header(), start: LogStart::Boot }).unwrap());
        s.write_all(&hello).unwrap();
        let mut pre = [0u8; 12];
        s.read_exact(&mut pre).unwrap();
        assert!(matches!(read_raw_frame(&mut s), Message::Welcome));
        then(s)
    });
    (addr, t)
}

/// Collects what tracing logs on the threads it is installed on.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let capture = self.clone();
        tracing_subscriber::fmt().with_ansi(false).with_writer(move || capture.clone()).finish()
    }
}

/// Connects a raw client to `addr`, sends `bytes`, and waits until the
/// primary drops the connection (which it does once it rejected us).
fn bad_peer(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(start.elapsed() < Duration::from_secs(2), "the primary kept a bad peer's connection open");
}

#[test]
fn links_are_send() {
    fn send<T: Send>() {}
    send::<PrimaryLink>();
    send::<BackupLink>();
}

#[test]
fn batch_round_trips() {
    let records = vec![exit_record(1), time_record(1)];
    let msg = Message::Batch { seq: 3, watermark: 1, released: 0, records: Cow::Borrowed(&records) };
    let frame = wire::encode(&msg).unwrap();
    assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
    match wire::decode(&frame[4..]).unwrap() {
        Message::Batch { seq: 3, watermark: 1, released: 0, records: got } => assert_eq!(got.as_ref(), &records[..]),
        other => panic!("decoded {other:?}"),
    }
}

#[test]
fn records_arrive_in_order_with_watermarks() {
    let (mut primary, mut backup) = pair(&steady());
    primary.append(&exit_record(1)).unwrap();
    primary.append(&time_record(1)).unwrap();
    primary.passed(1).unwrap();
    // acked means received by the backup: then the records are waiting there.
    assert!(wait_until(MARGIN, || primary.acked() >= 1));
    assert!(!backup.passed(1).unwrap(), "records are still waiting");
    assert_eq!(backup.next_record().unwrap(), Some(exit_record(1)));
    assert!(!backup.passed(1).unwrap());
    assert_eq!(backup.next_record().unwrap(), Some(time_record(1)));
    assert!(backup.passed(1).unwrap());
    assert!(!backup.passed(2).unwrap());

    // Many exits, watermark at each: arrives complete and in order.
    let consumer = thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < 2 * 2999 {
            got.push(backup.next_record().unwrap().unwrap());
        }
        (backup, got)
    });
    for exit in 2..=3000 {
        primary.append(&exit_record(exit)).unwrap();
        primary.append(&time_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    let (mut backup, got) = consumer.join().unwrap();
    let want: Vec<Record> = (2..=3000).flat_map(|e| [exit_record(e), time_record(e)]).collect();
    assert_eq!(got, want);
    assert!(wait_until(MARGIN, || backup.passed(3000).unwrap()));
    assert!(!backup.passed(3001).unwrap());
    assert!(primary.backup_lost().is_none() && backup.primary_lost().is_none());
}

#[test]
fn a_large_hand_over_is_split_into_batches() {
    let (mut primary, mut backup) = pair(&steady());
    // More records than one batch carries, all handed over at once: the
    // intermediate batches must not claim the watermark of the last.
    for exit in 1..=20_000 {
        primary.append(&exit_record(exit)).unwrap();
        primary.append(&time_record(exit)).unwrap();
    }
    primary.passed(20_000).unwrap();
    for exit in 1..=20_000 {
        assert!(!backup.passed(exit).unwrap());
        assert_eq!(backup.next_record().unwrap(), Some(exit_record(exit)));
        assert_eq!(backup.next_record().unwrap(), Some(time_record(exit)));
    }
    assert!(wait_until(MARGIN, || backup.passed(20_000).unwrap()));
    assert!(
        wait_until(MARGIN, || primary.acked() == 20_000),
        "{:?} {:?}",
        primary.backup_lost(),
        backup.primary_lost()
    );
}

#[test]
fn acks_advance_acked_and_call_on_ack() {
    let (mut primary, _backup) = pair(&steady());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    primary.on_ack(Box::new(move |w| sink.lock().unwrap().push(w)));
    for exit in 1..=500 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    assert!(wait_until(MARGIN, || primary.acked() == 500));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.last(), Some(&500));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(!seen.contains(&u64::MAX));
}

#[test]
fn released_reaches_the_backup() {
    let (primary, backup) = pair(&steady());
    assert_eq!(backup.released(), 0);
    primary.released(7);
    assert!(wait_until(MARGIN, || backup.released() == 7));
}

#[test]
fn a_dropped_backup_is_lost_promptly() {
    let config = steady();
    let (mut primary, backup) = pair(&config);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    primary.on_ack(Box::new(move |w| {
        let _ = tx.lock().unwrap().send(w);
    }));
    let start = Instant::now();
    drop(backup);
    loop {
        let w = rx.recv_timeout(config.heartbeat_timeout + MARGIN).unwrap();
        if w == u64::MAX {
            break;
        }
    }
    assert!(start.elapsed() < config.heartbeat_timeout + MARGIN);
    let why = primary.backup_lost().unwrap();
    assert!(why.contains("lost the backup"), "{why}");
    assert_eq!(primary.acked(), u64::MAX);
    // Everything is a cheap no-op now.
    primary.throttle(1_000_000_000);
    primary.append(&exit_record(1)).unwrap();
    primary.passed(1).unwrap();
    primary.flush().unwrap();
    // A late registration hears of the loss at once.
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    primary.on_ack(Box::new(move |w| {
        let _ = tx.lock().unwrap().send(w);
    }));
    assert_eq!(rx.try_recv(), Ok(u64::MAX));
    assert!(!primary.finish(Duration::from_secs(1)));
}

#[test]
fn a_dropped_primary_is_drained_then_ends() {
    let (mut primary, mut backup) = pair(&steady());
    for exit in 1..=100 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    assert!(wait_until(MARGIN, || primary.acked() == 100));
    drop(primary);
    for exit in 1..=100 {
        assert_eq!(backup.next_record().unwrap(), Some(exit_record(exit)));
    }
    assert_eq!(backup.next_record().unwrap(), None);
    assert_eq!(backup.next_record().unwrap(), None);
    let why = backup.primary_lost().unwrap();
    assert!(why.contains("closed the connection"), "{why}");
}

#[test]
fn a_silent_backup_is_caught_by_the_heartbeat_timeout() {
    let config = fast();
    let (primary, _silent) = primary_with_fake_backup(&config);
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    primary.on_ack(Box::new(move |w| {
        let _ = tx.lock().unwrap().send(w);
    }));
    assert_eq!(rx.recv_timeout(config.heartbeat_timeout + MARGIN), Ok(u64::MAX));
    assert!(start.elapsed() < config.heartbeat_timeout + MARGIN);
    let why = primary.backup_lost().unwrap();
    assert!(why.contains("no traffic from the backup"), "{why}");
}

#[test]
fn a_silent_primary_is_caught_by_the_heartbeat_timeout() {
    let config = fast();
    let (release, hold) = mpsc::channel::<()>();
    let (addr, fake) = fake_primary(move |mut s| {
        let records = vec![exit_record(1)];
        write_raw(&mut s, &Message::Batch { seq: 1, watermark: 1, released: 0, records: Cow::Borrowed(&records) });
        // Then silence, with the connection still open (a cut link).
        let _ = hold.recv_timeout(Duration::from_secs(5));
    });
    let (mut backup, _) = BackupLink::connect(&addr, &header(), &config, Duration::from_secs(2)).unwrap();
    assert_eq!(backup.next_record().unwrap(), Some(exit_record(1)));
    let start = Instant::now();
    // Blocks until the heartbeat timeout fires, then ends.
    assert_eq!(backup.next_record().unwrap(), None);
    assert!(start.elapsed() < config.heartbeat_timeout + MARGIN);
    let why = backup.primary_lost().unwrap();
    assert!(why.contains("no traffic from the primary"), "{why}");
    release.send(()).unwrap();
    fake.join().unwrap();
}

#[test]
fn an_undecodable_frame_from_the_primary_ends_the_link() {
    let (addr, fake) = fake_primary(|mut s| {
        s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        thread::sleep(Duration::from_millis(300));
    });
    let (mut backup, _) = BackupLink::connect(&addr, &header(), &fast(), Duration::from_secs(2)).unwrap();
    assert_eq!(backup.next_record().unwrap(), None);
    let why = backup.primary_lost().unwrap();
    assert!(why.contains("does not decode"), "{why}");
    fake.join().unwrap();
}

#[test]
fn bad_peers_at_accept_are_logged_and_skipped() {
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let capture = Capture::default();
    let subscriber = capture.subscriber();
    let accepting = thread::spawn(move || {
        tracing::subscriber::with_default(subscriber, || listener.accept(&header(), &fast()).map(|_| ()))
    });
    let good = |version: u32| {
        let mut p = MAGIC.to_vec();
        p.extend(version.to_le_bytes());
        p
    };
    bad_peer(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    bad_peer(addr, b"FTVMMXXX\x01\x00\x00\x00");
    bad_peer(addr, &good(7));
    let mut truncated = good(PROTOCOL_VERSION);
    truncated.extend([100, 0, 0, 0, 1, 2, 3]);
    bad_peer(addr, &truncated);
    let mut oversize = good(PROTOCOL_VERSION);
    oversize.extend(u32::MAX.to_le_bytes());
    bad_peer(addr, &oversize);
    let mut undecodable = good(PROTOCOL_VERSION);
    undecodable.extend([3, 0, 0, 0, 0xff, 0xff, 0xff]);
    bad_peer(addr, &undecodable);
    let mut ack_first = good(PROTOCOL_VERSION);
    ack_first.extend(wire::encode(&Message::Ack { seq: 1, watermark: 1 }).unwrap());
    bad_peer(addr, &ack_first);
    // A silent peer does not hold up a good backup behind it.
    let _silent = TcpStream::connect(addr).unwrap();
    let start = Instant::now();
    let (_backup, _) = BackupLink::connect(&addr.to_string(), &header(), &fast(), Duration::from_secs(2)).unwrap();
    accepting.join().unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_millis(900));
    let log = capture.text();
    for want in [
        "bad magic",
        "protocol version 7",
        "in the middle of a frame",
        &format!("frame of {} bytes", u32::MAX),
        "does not decode",
        "expected Welcome or Reject, got Ack",
    ] {
        assert!(log.contains(want), "no {want:?} in the log:\n{log}");
    }
    // One line per bad peer, each a warning.
    assert_eq!(log.lines().filter(|l| l.contains("WARN") && l.contains("failed the handshake")).count(), 7, "{log}");
    assert_eq!(log.lines().count(), 8, "{log}");
}

#[test]
fn connecting_to_a_garbage_server_fails_clearly() {
    let server = |reply: Vec<u8>| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // Read what the backup sends, so that closing is a FIN, not a RST.
            let mut preamble = [0u8; 12];
            s.read_exact(&mut preamble).unwrap();
            s.write_all(&reply).unwrap();
            thread::sleep(Duration::from_millis(200));
        });
        (addr, t)
    };
    let (addr, t) = server(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec());
    let err = BackupLink::connect(&addr, &header(), &fast(), Duration::from_secs(1)).err().unwrap();
    assert!(matches!(err, ChannelError::BadMagic), "{err}");
    assert_eq!(err.to_string(), "the peer is not an ftvmm logging channel (bad magic)");
    t.join().unwrap();

    // An ftvmm of protocol version 1 (no state transfer).
    let mut wrong_version = MAGIC.to_vec();
    wrong_version.extend(1u32.to_le_bytes());
    let (addr, t) = server(wrong_version);
    let err = BackupLink::connect(&addr, &header(), &fast(), Duration::from_secs(1)).err().unwrap();
    assert!(matches!(err, ChannelError::Version { found: 1 }), "{err}");
    assert!(err.to_string().contains("version 1; this ftvmm speaks version 2"), "{err}");
    t.join().unwrap();

    let mut truncated = wire::preamble().to_vec();
    truncated.extend([50, 0, 0, 0, 9]);
    let (addr, t) = server(truncated);
    let err = BackupLink::connect(&addr, &header(), &fast(), Duration::from_secs(1)).err().unwrap();
    assert!(matches!(err, ChannelError::Truncated(_)), "{err}");
    t.join().unwrap();
}

#[test]
fn a_silent_server_times_the_handshake_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let start = Instant::now();
    let err = BackupLink::connect(&addr, &header(), &fast(), Duration::from_millis(100)).err().unwrap();
    assert!(matches!(err, ChannelError::Timeout(_)), "{err}");
    assert!(err.to_string().contains("no handshake"), "{err}");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(1) + MARGIN, "{took:?}");
}

#[test]
fn a_mismatched_backup_is_refused_and_accept_goes_on() {
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let capture = Capture::default();
    let subscriber = capture.subscriber();
    let accepting = thread::spawn(move || {
        tracing::subscriber::with_default(subscriber, || listener.accept(&header(), &fast()).map(|_| ()))
    });
    let other_image = Header { image_hash: Digest([2; 32]), ..header() };
    let err = BackupLink::connect(&addr, &other_image, &fast(), Duration::from_secs(2)).err().unwrap();
    match &err {
        ChannelError::Mismatch(why) => assert!(why.contains("another guest image"), "{why}"),
        other => panic!("{other}"),
    }
    let other_config = Header { config: "mem=128M".into(), ..header() };
    let err = BackupLink::connect(&addr, &other_config, &fast(), Duration::from_secs(2)).err().unwrap();
    assert!(matches!(&err, ChannelError::Mismatch(why) if why.contains("another VM configuration")), "{err}");
    // Another boot time is fine: the primary's is authoritative.
    let ours = Header { wall_clock_base_ns: 99, ..header() };
    let (_backup, theirs) = BackupLink::connect(&addr, &ours, &fast(), Duration::from_secs(2)).unwrap();
    assert_eq!(theirs.header.wall_clock_base_ns, header().wall_clock_base_ns);
    accepting.join().unwrap().unwrap();
    let log = capture.text();
    assert!(log.contains("the peer refused us: the log was recorded from another guest image"), "{log}");
}

#[test]
fn throttle_blocks_until_acks_catch_up() {
    // A long heartbeat timeout: the hand-played backup does not heartbeat.
    let config =
        ChannelConfig { heartbeat_timeout: Duration::from_secs(3), max_lag_exits: 10, ..ChannelConfig::default() };
    let (mut primary, mut fake) = primary_with_fake_backup(&config);
    for exit in 1..=100 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    primary.throttle(5); // within the lag: returns at once
    let primary = Arc::new(primary);
    let (done, throttled) = mpsc::channel();
    let throttling = {
        let primary = primary.clone();
        thread::spawn(move || {
            primary.throttle(100);
            done.send(()).unwrap();
        })
    };
    assert!(throttled.recv_timeout(Duration::from_millis(300)).is_err(), "throttle did not block");
    let mut last = None;
    while last.map(|(_, w)| w) != Some(100) {
        if let Message::Batch { seq, watermark, .. } = read_raw_frame(&mut fake) {
            last = Some((seq, watermark));
        }
    }
    let (seq, watermark) = last.unwrap();
    write_raw(&mut fake, &Message::Ack { seq, watermark });
    throttled.recv_timeout(MARGIN).unwrap();
    throttling.join().unwrap();
    assert_eq!(primary.acked(), 100);
}

#[test]
fn a_bogus_ack_loses_the_backup() {
    let config = steady();
    let (primary, mut fake) = primary_with_fake_backup(&config);
    write_raw(&mut fake, &Message::Ack { seq: 42, watermark: 1 });
    assert!(wait_until(MARGIN, || primary.backup_lost().is_some()));
    let why = primary.backup_lost().unwrap();
    assert!(why.contains("protocol error") && why.contains("batch 42"), "{why}");
}

#[test]
fn finish_waits_for_the_final_ack() {
    let (mut primary, mut backup) = pair(&steady());
    for exit in 1..=50 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    let end = Record {
        position: Position { exit: 50, rip: 0x1050 },
        entry: Entry::End { status: 0, digest: Digest([9; 32]) },
    };
    primary.append(&end).unwrap();
    primary.passed(50).unwrap();
    assert!(primary.finish(Duration::from_secs(2)));
    for exit in 1..=50 {
        assert_eq!(backup.next_record().unwrap(), Some(exit_record(exit)));
    }
    assert_eq!(backup.next_record().unwrap(), Some(end));
    assert_eq!(backup.next_record().unwrap(), None);
    let why = backup.primary_lost().unwrap();
    assert!(why.contains("ended the run"), "{why}");
}

#[test]
fn finish_gives_up_when_nothing_is_acked() {
    let config = ChannelConfig { heartbeat_timeout: Duration::from_secs(3), ..ChannelConfig::default() };
    let (mut primary, _fake) = primary_with_fake_backup(&config);
    primary.append(&exit_record(1)).unwrap();
    primary.passed(1).unwrap();
    let start = Instant::now();
    assert!(!primary.finish(Duration::from_millis(200)));
    assert!(start.elapsed() < Duration::from_millis(200) + MARGIN);
}

#[test]
fn connect_retries_until_the_listener_appears() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let backup_addr = addr.clone();
    let backup = thread::spawn(move || {
        BackupLink::connect(&backup_addr, &header(), &fast(), Duration::from_secs(3)).map(|_| ())
    });
    thread::sleep(Duration::from_millis(300));
    let listener = PrimaryListener::bind(&addr).unwrap();
    let _primary = listener.accept(&header(), &fast()).unwrap();
    backup.join().unwrap().unwrap();
}

#[test]
fn connect_gives_up_when_nobody_listens() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let start = Instant::now();
    let err = BackupLink::connect(&format!("127.0.0.1:{port}"), &header(), &fast(), Duration::from_millis(200))
        .err()
        .unwrap();
    assert!(matches!(err, ChannelError::Timeout(_)), "{err}");
    assert!(err.to_string().contains("nothing accepted the connection"), "{err}");
    assert!(start.elapsed() < Duration::from_millis(200) + MARGIN);
}
