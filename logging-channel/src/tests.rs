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

/// A call that must block until the test releases what it waits for, run
/// on a thread of its own. That it blocks is checked twice, so that neither
/// a slow machine nor a fast one can pass a call that returns at once:
/// [`Blocked::assert_blocked`] waits 300 ms from a moment when the thread is
/// known to run (not from its spawn, which a loaded machine may delay past
/// any wait), and [`Blocked::returned`] checks that the call returned only
/// after [`Blocked::release`] was called, however long anything took.
struct Blocked<T> {
    what: &'static str,
    released: Arc<std::sync::atomic::AtomicBool>,
    done: mpsc::Receiver<(T, bool)>,
    thread: thread::JoinHandle<()>,
}

impl<T: Send + 'static> Blocked<T> {
    /// Starts `call` on its own thread and returns once that thread runs.
    fn start(what: &'static str, call: impl FnOnce() -> T + Send + 'static) -> Self {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (running_tx, running) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let thread = {
            let released = released.clone();
            thread::spawn(move || {
                running_tx.send(()).unwrap();
                let value = call();
                let after_release = released.load(std::sync::atomic::Ordering::SeqCst);
                let _ = done_tx.send((value, after_release));
            })
        };
        running.recv_timeout(Duration::from_secs(30)).expect("the calling thread never ran");
        Blocked { what, released, done, thread }
    }

    /// The call has not returned 300 ms on.
    fn assert_blocked(&self) {
        assert!(self.done.recv_timeout(Duration::from_millis(300)).is_err(), "{} did not block", self.what);
    }

    /// To be called just before the test does what unblocks the call.
    fn release(&self) {
        self.released.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits up to `limit` for the call to return; checks it returned only
    /// after [`Blocked::release`], and gives its value.
    fn returned(self, limit: Duration) -> T {
        let (value, after_release) =
            self.done.recv_timeout(limit).unwrap_or_else(|_| panic!("{} did not return within {limit:?}", self.what));
        assert!(after_release, "{} returned before what it waits for happened", self.what);
        self.thread.join().unwrap();
        value
    }
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
    fake_primary_starting(LogStart::Boot, then)
}

/// [`fake_primary`], saying that the log starts with `start`.
fn fake_primary_starting(
    start: LogStart,
    then: impl FnOnce(TcpStream) + Send + 'static,
) -> (String, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = wire::preamble().to_vec();
        hello.extend(wire::encode(&Message::Hello { header: header(), start }).unwrap());
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
    fn shared<T: Send + Sync + Clone>() {}
    send::<PrimaryLink>();
    send::<BackupLink>();
    // The VMM accepts the next backup from a background thread, and sends
    // the state from another while the vCPU thread holds the link.
    send::<PrimaryListener>();
    send::<std::sync::Arc<PrimaryListener>>();
    shared::<StateSender>();
}

#[test]
fn batch_round_trips() {
    let records = vec![exit_record(1), time_record(1)];
    let msg = Message::Batch { seq: 3, watermark: 1, released: 0, disk_applied: 0, records: Cow::Borrowed(&records) };
    let frame = wire::encode(&msg).unwrap();
    assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
    match wire::decode(&frame[4..]).unwrap() {
        Message::Batch { seq: 3, watermark: 1, released: 0, records: got, .. } => {
            assert_eq!(got.as_ref(), &records[..])
        }
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
    primary.on_ack(Box::new(move |a| sink.lock().unwrap().push(a.watermark)));
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
fn each_ack_says_when_the_batches_it_retires_went_out() {
    let (mut primary, _backup) = pair(&steady());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    primary.on_ack(Box::new(move |a| {
        let batches: Vec<BatchTimes> = a.batches.to_vec();
        sink.lock().unwrap().push((a.watermark, batches, a.received));
    }));
    let start = Instant::now();
    for exit in 1..=200 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    assert!(wait_until(MARGIN, || primary.acked() == 200));
    let seen = seen.lock().unwrap().clone();
    let mut last_watermark = 0;
    for (watermark, batches, received) in &seen {
        assert!(!batches.is_empty(), "an ack that retires no batch");
        for b in batches {
            assert!(start <= b.handed && b.handed <= b.sent && b.sent <= *received, "{b:?} received {received:?}");
            assert!(b.watermark > last_watermark && b.watermark <= *watermark, "{b:?} in an ack of {watermark}");
            last_watermark = b.watermark;
        }
        assert_eq!(batches.last().map(|b| b.watermark), Some(*watermark));
    }
    assert_eq!(last_watermark, 200);
}

#[test]
fn busy_polling_links_carry_everything_and_never_hold_an_ack_back() {
    // A budget far beyond any round trip: a spin that kept the backup from
    // writing its ack (the writer shares its thread) would cost each of
    // these sequential round trips the whole budget.
    let config = ChannelConfig { heartbeat_timeout: Duration::from_secs(20), poll: Duration::from_secs(5), ..steady() };
    assert_eq!(config.busy_poll_budget(), Duration::from_millis(1250));
    let (mut primary, mut backup) = pair(&config);
    let start = Instant::now();
    for exit in 1..=40 {
        primary.append(&time_record(exit)).unwrap();
        primary.passed(exit).unwrap();
        assert!(wait_until(Duration::from_secs(10), || primary.acked() == exit), "exit {exit} never acknowledged");
    }
    assert!(start.elapsed() < Duration::from_secs(20), "40 round trips took {:?}", start.elapsed());
    for exit in 1..=40 {
        assert_eq!(backup.next_record().unwrap(), Some(time_record(exit)));
    }
    assert!(primary.finish(Duration::from_secs(5)));
}

#[test]
fn released_reaches_the_backup() {
    let (primary, backup) = pair(&steady());
    assert_eq!(backup.released(), 0);
    primary.released(7);
    assert!(wait_until(MARGIN, || backup.released() == 7));
}

#[test]
fn disk_applied_reaches_the_backup_on_its_own() {
    let (primary, backup) = pair(&steady());
    assert_eq!(backup.disk_applied(), 0);
    // Nothing else changes: the report alone makes a batch go out.
    primary.disk_applied(12);
    assert!(wait_until(MARGIN, || backup.disk_applied() == 12));
    assert_eq!(backup.released(), 0);
    primary.disk_applied(5);
    primary.released(3);
    assert!(wait_until(MARGIN, || backup.released() == 3));
    assert_eq!(backup.disk_applied(), 12, "a stale report does not go backwards");
}

#[test]
fn a_dropped_backup_is_lost_promptly() {
    let config = steady();
    let (mut primary, backup) = pair(&config);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    primary.on_ack(Box::new(move |a| {
        let _ = tx.lock().unwrap().send(a.watermark);
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
    primary.on_ack(Box::new(move |a| {
        let _ = tx.lock().unwrap().send(a.watermark);
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
    primary.on_ack(Box::new(move |a| {
        let _ = tx.lock().unwrap().send(a.watermark);
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
        write_raw(
            &mut s,
            &Message::Batch { seq: 1, watermark: 1, released: 0, disk_applied: 0, records: Cow::Borrowed(&records) },
        );
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
    // A handshake timeout of 10 s: the silent peer below would hold a good
    // backup up that long if handshakes were taken one at a time.
    let config = ChannelConfig { heartbeat_timeout: Duration::from_secs(2), ..ChannelConfig::default() };
    assert_eq!(config.handshake_timeout(), Duration::from_secs(10));
    let accepting = {
        let config = config.clone();
        thread::spawn(move || {
            tracing::subscriber::with_default(subscriber, || listener.accept(&header(), &config).map(|_| ()))
        })
    };
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
    let (_backup, _) = BackupLink::connect(&addr.to_string(), &header(), &config, Duration::from_secs(5)).unwrap();
    accepting.join().unwrap().unwrap();
    // Well under the 10 s the silent peer could hold it up, however loaded
    // the machine; and the silent peer's handshake never timed out.
    let took = start.elapsed();
    assert!(took < config.handshake_timeout() / 2, "the good backup was accepted after {took:?}");
    let log = capture.text();
    assert!(!log.contains("no handshake"), "the silent peer held the accept up:\n{log}");
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
    assert!(err.to_string().contains(&format!("version 1; this ftvmm speaks version {PROTOCOL_VERSION}")), "{err}");
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
    let throttling = {
        let primary = primary.clone();
        Blocked::start("throttle", move || primary.throttle(100))
    };
    throttling.assert_blocked();
    let mut last = None;
    while last.map(|(_, w)| w) != Some(100) {
        if let Message::Batch { seq, watermark, .. } = read_raw_frame(&mut fake) {
            last = Some((seq, watermark));
        }
    }
    let (seq, watermark) = last.unwrap();
    throttling.release();
    write_raw(&mut fake, &Message::Ack { seq, watermark });
    throttling.returned(MARGIN);
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

// ---- Joining a running VM: the state stream ----

/// The state stream's byte at `offset`: a pattern in which a piece out of
/// place, lost or repeated shows.
fn state_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn state_bytes(from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64).map(state_byte).collect()
}

/// Reads the state stream to its end, checking it against the pattern
/// (sleeping `pause` after each piece, a slow VMM); returns its length.
fn read_state(backup: &mut BackupLink, pause: Duration) -> Result<u64, ChannelError> {
    let mut offset = 0u64;
    while let Some(piece) = backup.next_state_chunk()? {
        assert!(!piece.is_empty() && piece.len() <= STATE_FRAME, "a piece of {} bytes", piece.len());
        assert!(piece == state_bytes(offset, piece.len()), "wrong state bytes from offset {offset}");
        offset += piece.len() as u64;
        thread::sleep(pause);
    }
    Ok(offset)
}

/// A connected primary/backup pair for a running VM.
fn joining_pair(config: &ChannelConfig) -> (PrimaryLink, BackupLink) {
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let backup_config = config.clone();
    let backup = thread::spawn(move || BackupLink::connect(&addr, &header(), &backup_config, Duration::from_secs(2)));
    let primary = listener.accept_joining(&header(), config).unwrap();
    let (backup, info) = backup.join().unwrap().unwrap();
    assert_eq!(info, PrimaryInfo { header: header(), start: LogStart::State });
    assert_eq!(primary.log_start(), LogStart::State);
    (primary, backup)
}

/// Plays a joining backup by hand up to Welcome.
fn primary_with_fake_joining_backup(config: &ChannelConfig) -> (PrimaryLink, TcpStream) {
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let fake = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&wire::preamble()).unwrap();
        let mut pre = [0u8; 12];
        s.read_exact(&mut pre).unwrap();
        assert!(matches!(read_raw_frame(&mut s), Message::Hello { start: LogStart::State, .. }));
        write_raw(&mut s, &Message::Welcome);
        s
    });
    let primary = listener.accept_joining(&header(), config).unwrap();
    (primary, fake.join().unwrap())
}

/// The next frame that is not a heartbeat.
fn read_raw_non_heartbeat(s: &mut TcpStream) -> Message<'static> {
    loop {
        match read_raw_frame(s) {
            Message::Heartbeat => {}
            other => return other,
        }
    }
}

/// Reads State frames from a raw socket until `upto` bytes arrived.
fn read_raw_state(s: &mut TcpStream, mut offset: u64, upto: u64) {
    while offset < upto {
        match read_raw_non_heartbeat(s) {
            Message::State { offset: got, data } => {
                assert_eq!(got, offset);
                assert!(data.0.len() <= STATE_FRAME);
                assert!(data.0.as_ref() == state_bytes(offset, data.0.len()), "wrong state bytes at {offset}");
                offset += data.0.len() as u64;
            }
            other => panic!("expected State, got {other:?}"),
        }
    }
    assert_eq!(offset, upto, "a State frame went past {upto}");
}

fn disk_read_record(exit: u64, len: usize) -> Record {
    Record {
        position: Position { exit, rip: 0x1000 + exit },
        entry: Entry::Event(Event::DiskRead { data: vec![0xd5; len] }),
    }
}

#[test]
fn a_state_stream_arrives_whole_and_in_order_then_the_records() {
    // A short heartbeat timeout and a backup VMM that takes far longer than
    // it to consume the state: heartbeats must keep both sides alive.
    let config = ChannelConfig { state_window: 4 << 20, ..fast() };
    let (mut primary, mut backup) = joining_pair(&config);
    const MIB: usize = 1 << 20;
    const TOTAL: u64 = 64 << 20;
    const K: u64 = 1_000_000;
    let start = Instant::now();
    let consumer = thread::spawn(move || {
        let len = read_state(&mut backup, Duration::from_millis(3)).unwrap();
        (backup, len, Instant::now())
    });
    // Pre-copy from a background thread, as the VMM does.
    let sender = primary.state_sender();
    let sending = thread::spawn(move || {
        for i in 0..TOTAL / MIB as u64 {
            sender.send_state(state_bytes(i * MIB as u64, MIB)).unwrap();
        }
        sender.end_state(K).unwrap();
    });
    // Meanwhile the vCPU thread logs the exits after K: the records wait
    // behind the state, and throttle does not hold the guest for them.
    for exit in K + 1..=K + 100 {
        primary.append(&exit_record(exit)).unwrap();
        primary.append(&time_record(exit)).unwrap();
        primary.passed(exit).unwrap();
        primary.throttle(exit);
    }
    sending.join().unwrap();
    let (mut backup, len, consumed_at) = consumer.join().unwrap();
    assert_eq!(len, TOTAL);
    assert!(consumed_at - start > config.heartbeat_timeout * 5, "the transfer was too quick to test heartbeats");
    assert_eq!(backup.state_exit(), Some(K));
    assert_eq!(backup.next_state_chunk().unwrap(), None, "the end is reported again");
    for exit in K + 1..=K + 100 {
        assert_eq!(backup.next_record().unwrap(), Some(exit_record(exit)));
        assert_eq!(backup.next_record().unwrap(), Some(time_record(exit)));
    }
    assert!(wait_until(MARGIN, || primary.acked() == K + 100), "acked {}", primary.acked());
    assert!(backup.passed(K + 100).unwrap());
    assert!(primary.backup_lost().is_none(), "{:?}", primary.backup_lost());
    assert!(backup.primary_lost().is_none(), "{:?}", backup.primary_lost());
    // The window held on both sides.
    assert!(primary.peak_unconsumed_state() <= config.state_window, "{}", primary.peak_unconsumed_state());
    assert!(primary.peak_unconsumed_state() > config.state_window / 2, "{}", primary.peak_unconsumed_state());
    assert!(backup.peak_state_queued() <= config.state_window, "{}", backup.peak_state_queued());
}

#[test]
fn send_state_blocks_at_the_window_until_the_backup_consumes() {
    // The hand-played backup does not heartbeat: a long timeout.
    let config =
        ChannelConfig { heartbeat_timeout: Duration::from_secs(3), state_window: 1 << 20, ..ChannelConfig::default() };
    let (primary, mut fake) = primary_with_fake_joining_backup(&config);
    let sender = primary.state_sender();
    // One chunk larger than the window: sent in pieces as room appears.
    let sending = Blocked::start("send_state", move || sender.send_state(state_bytes(0, 3 << 20)));
    read_raw_state(&mut fake, 0, 1 << 20);
    sending.assert_blocked();
    assert_eq!(primary.peak_unconsumed_state(), 1 << 20);
    write_raw(&mut fake, &Message::StateAck { consumed: 1 << 20 });
    read_raw_state(&mut fake, 1 << 20, 2 << 20);
    // The last megabyte may go only once the second is acknowledged.
    sending.release();
    write_raw(&mut fake, &Message::StateAck { consumed: 2 << 20 });
    read_raw_state(&mut fake, 2 << 20, 3 << 20);
    sending.returned(MARGIN).unwrap();
    assert_eq!(primary.peak_unconsumed_state(), 1 << 20);
    primary.end_state(9).unwrap();
    assert!(matches!(read_raw_non_heartbeat(&mut fake), Message::StateEnd { exit: 9, len } if len == 3 << 20));
    // Acknowledging bytes never sent is a protocol error.
    write_raw(&mut fake, &Message::StateAck { consumed: 4 << 20 });
    assert!(wait_until(MARGIN, || primary.backup_lost().is_some()));
    let why = primary.backup_lost().unwrap();
    assert!(why.contains("protocol error") && why.contains("acknowledged 4194304 state bytes"), "{why}");
}

#[test]
fn a_backup_lost_mid_transfer_fails_send_state_and_the_next_backup_joins() {
    let config = ChannelConfig { state_window: 1 << 20, ..fast() };
    let listener = Arc::new(PrimaryListener::bind("127.0.0.1:0").unwrap());
    let addr = listener.local_addr().to_string();
    // The VMM accepts in the background while its guest runs.
    let accept = |listener: &Arc<PrimaryListener>| {
        let (listener, config) = (listener.clone(), config.clone());
        thread::spawn(move || listener.accept_joining(&header(), &config))
    };

    let accepting = accept(&listener);
    let (backup_config, backup_addr) = (config.clone(), addr.clone());
    let (dropped_tx, dropped) = mpsc::channel();
    let doomed = thread::spawn(move || {
        let (mut backup, info) =
            BackupLink::connect(&backup_addr, &header(), &backup_config, Duration::from_secs(2)).unwrap();
        assert_eq!(info.start, LogStart::State);
        for _ in 0..3 {
            assert!(backup.next_state_chunk().unwrap().is_some());
        }
        drop(backup); // the backup dies mid-transfer
        dropped_tx.send(Instant::now()).unwrap();
    });
    let primary = accepting.join().unwrap().unwrap();
    let mut offset = 0u64;
    let err = loop {
        match primary.send_state(state_bytes(offset, 1 << 20)) {
            Ok(()) => offset += 1 << 20,
            Err(e) => break e,
        }
        assert!(offset < 64 << 20, "send_state went on after the backup died");
    };
    let failed_at = Instant::now();
    doomed.join().unwrap();
    let dropped_at = dropped.recv().unwrap();
    assert!(failed_at.saturating_duration_since(dropped_at) < config.heartbeat_timeout + MARGIN);
    assert!(matches!(err, ChannelError::Lost(_)), "{err}");
    let why = err.to_string();
    assert!(why.contains("cut short") && why.contains("lost the backup"), "{why}");
    assert!(matches!(primary.end_state(5), Err(ChannelError::Lost(_))));
    assert_eq!(primary.acked(), u64::MAX);
    drop(primary);

    // The same listener takes the next backup, which gets everything.
    let accepting = accept(&listener);
    let backup_config = config.clone();
    let next = thread::spawn(move || {
        let (mut backup, info) = BackupLink::connect(&addr, &header(), &backup_config, Duration::from_secs(2)).unwrap();
        assert_eq!(info.start, LogStart::State);
        let len = read_state(&mut backup, Duration::ZERO).unwrap();
        (len, backup.next_record().unwrap(), backup.state_exit())
    });
    let mut primary = accepting.join().unwrap().unwrap();
    for i in 0..8u64 {
        primary.send_state(state_bytes(i << 20, 1 << 20)).unwrap();
    }
    primary.end_state(41).unwrap();
    primary.append(&exit_record(42)).unwrap();
    primary.passed(42).unwrap();
    let (len, first, exit) = next.join().unwrap();
    assert_eq!((len, first, exit), (8 << 20, Some(exit_record(42)), Some(41)));
}

#[test]
fn a_primary_lost_mid_transfer_fails_next_state_chunk() {
    let config = ChannelConfig { state_window: 1 << 20, ..fast() };
    let (primary, mut backup) = joining_pair(&config);
    primary.send_state(state_bytes(0, 512 << 10)).unwrap();
    let mut got = 0;
    while got < 512 << 10 {
        got += backup.next_state_chunk().unwrap().unwrap().len();
    }
    let start = Instant::now();
    drop(primary); // the primary dies mid-transfer
    let err = backup.next_state_chunk().err().unwrap();
    assert!(start.elapsed() < config.heartbeat_timeout + MARGIN);
    assert!(matches!(err, ChannelError::Lost(_)), "{err}");
    let why = err.to_string();
    // Whichever half noticed first: the reader (closed) or the writer of
    // the acks for what the VMM just consumed (broken pipe, reset).
    assert!(why.contains("cut short") && why.contains("lost the primary"), "{why}");
    // Still an error, and records cannot be read past a half state.
    assert!(matches!(backup.next_state_chunk(), Err(ChannelError::Lost(_))));
    let err = backup.next_record().err().unwrap();
    assert!(err.to_string().contains("read it to the end with next_state_chunk"), "{err}");
}

#[test]
fn a_primary_silent_mid_transfer_is_caught_by_the_heartbeat_timeout() {
    let config = fast();
    let (release, hold) = mpsc::channel::<()>();
    let (addr, fake) = fake_primary_starting(LogStart::State, move |mut s| {
        write_raw(&mut s, &Message::State { offset: 0, data: wire::Bytes(Cow::Owned(state_bytes(0, 1000))) });
        let _ = hold.recv_timeout(Duration::from_secs(5));
    });
    let (mut backup, info) = BackupLink::connect(&addr, &header(), &config, Duration::from_secs(2)).unwrap();
    assert_eq!(info.start, LogStart::State);
    assert_eq!(backup.next_state_chunk().unwrap(), Some(state_bytes(0, 1000)));
    let start = Instant::now();
    let err = backup.next_state_chunk().err().unwrap();
    assert!(start.elapsed() < config.heartbeat_timeout + MARGIN);
    assert!(err.to_string().contains("no traffic from the primary"), "{err}");
    release.send(()).unwrap();
    fake.join().unwrap();
}

#[test]
fn bad_state_frames_end_the_link_with_a_clear_error() {
    let state =
        |offset: u64, len: usize| Message::State { offset, data: wire::Bytes(Cow::Owned(state_bytes(offset, len))) };
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![wire::encode(&state(5, 10)).unwrap()], "offset 5 arrived where offset 0 was due"),
        (
            vec![wire::encode(&state(0, 10)).unwrap(), wire::encode(&state(20, 10)).unwrap()],
            "offset 20 arrived where offset 10 was due",
        ),
        (
            vec![
                wire::encode(&state(0, 10)).unwrap(),
                wire::encode(&Message::Batch {
                    seq: 1,
                    watermark: 1,
                    released: 0,
                    disk_applied: 0,
                    records: Cow::Owned(vec![]),
                })
                .unwrap(),
            ],
            "before the end of the state",
        ),
        (
            vec![wire::encode(&state(0, 10)).unwrap(), wire::encode(&Message::StateEnd { exit: 3, len: 999 }).unwrap()],
            "the state ended at 999 bytes, but 10 arrived",
        ),
        (vec![wire::encode(&Message::StateAck { consumed: 0 }).unwrap()], "unexpected StateAck"),
        // A State frame whose length claims more than arrives.
        (vec![vec![100, 0, 0, 0, 7, 0, 1, 2]], "in the middle of a frame"),
        // A State frame whose byte string claims more than the frame holds.
        (vec![vec![4, 0, 0, 0, 7, 0, 100, 1]], "does not decode"),
        (vec![vec![3, 0, 0, 0, 0xff, 0xff, 0xff]], "does not decode"),
        (vec![u32::MAX.to_le_bytes().to_vec()], "frame of 4294967295 bytes"),
    ];
    for (frames, want) in cases {
        let (addr, fake) = fake_primary_starting(LogStart::State, move |mut s| {
            for frame in frames {
                s.write_all(&frame).unwrap();
            }
            // Then close our side (a truncated frame ends there) and drain
            // the backup's heartbeats until it hangs up: closing with
            // unread bytes would be a reset, not an end.
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let (mut backup, _) = BackupLink::connect(&addr, &header(), &fast(), Duration::from_secs(2)).unwrap();
        let err = loop {
            match backup.next_state_chunk() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the state ended; wanted {want:?}"),
                Err(e) => break e,
            }
        };
        let why = err.to_string();
        assert!(why.contains("cut short") && why.contains(want), "wanted {want:?}: {why}");
        fake.join().unwrap();
    }
}

#[test]
fn state_frames_to_a_booting_backup_are_a_protocol_error() {
    let (addr, fake) = fake_primary(|mut s| {
        write_raw(&mut s, &Message::State { offset: 0, data: wire::Bytes(Cow::Owned(vec![1, 2, 3])) });
        thread::sleep(Duration::from_millis(300));
    });
    let (mut backup, info) = BackupLink::connect(&addr, &header(), &fast(), Duration::from_secs(2)).unwrap();
    assert_eq!(info.start, LogStart::Boot);
    assert_eq!(backup.next_record().unwrap(), None);
    let why = backup.primary_lost().unwrap();
    assert!(why.contains("protocol error") && why.contains("starts at the guest's boot"), "{why}");
    fake.join().unwrap();
}

#[test]
fn the_state_calls_are_refused_where_they_do_not_apply() {
    // A booting pair has no state.
    let (primary, mut backup) = pair(&steady());
    assert_eq!(primary.log_start(), LogStart::Boot);
    assert!(matches!(primary.send_state(vec![1]), Err(ChannelError::Misuse(_))));
    assert!(matches!(primary.end_state(1), Err(ChannelError::Misuse(_))));
    let err = backup.next_state_chunk().err().unwrap();
    assert!(matches!(err, ChannelError::Misuse(_)) && err.to_string().contains("no state"), "{err}");
    assert!(primary.backup_lost().is_none() && backup.primary_lost().is_none());

    // A joining pair: records only after the state; nothing after its end.
    let (mut primary, mut backup) = joining_pair(&steady());
    let err = backup.next_record().err().unwrap();
    assert!(err.to_string().contains("next_state_chunk"), "{err}");
    assert!(backup.passed(1).is_err());
    primary.send_state(vec![7; 10]).unwrap();
    primary.send_state(Vec::new()).unwrap();
    primary.end_state(100).unwrap();
    assert!(matches!(primary.send_state(vec![1]), Err(ChannelError::Misuse(_))));
    let err = primary.end_state(101).err().unwrap();
    assert!(err.to_string().contains("end_state(101) after end_state(100)"), "{err}");
    assert_eq!(backup.next_state_chunk().unwrap(), Some(vec![7; 10]));
    assert_eq!(backup.next_state_chunk().unwrap(), None);
    assert!(!backup.passed(100).unwrap());
    // A record the state already covers is the VMM's bug: the link ends.
    primary.append(&exit_record(100)).unwrap();
    primary.passed(100).unwrap();
    assert!(wait_until(MARGIN, || primary.backup_lost().is_some()));
    let why = primary.backup_lost().unwrap();
    assert!(why.contains("a record at exit 100 follows the state taken at exit 100"), "{why}");
    assert_eq!(backup.next_record().unwrap(), None);
}

#[test]
fn a_joining_link_throttles_by_exits_from_the_state_exit() {
    let config =
        ChannelConfig { heartbeat_timeout: Duration::from_secs(3), max_lag_exits: 10, ..ChannelConfig::default() };
    let (mut primary, mut fake) = primary_with_fake_joining_backup(&config);
    // Before the end of the state, the lag in exits is not counted.
    primary.throttle(5_000_000);
    primary.send_state(state_bytes(0, 100)).unwrap();
    primary.end_state(1_000_000).unwrap();
    for exit in 1_000_001..=1_000_020 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    primary.throttle(1_000_010); // 10 exits after the state: within the lag
    let primary = Arc::new(primary);
    let throttling = {
        let primary = primary.clone();
        Blocked::start("throttle", move || primary.throttle(1_000_020))
    };
    throttling.assert_blocked();
    read_raw_state(&mut fake, 0, 100);
    assert!(matches!(read_raw_non_heartbeat(&mut fake), Message::StateEnd { exit: 1_000_000, len: 100 }));
    let mut last = None;
    while last.map(|(_, w)| w) != Some(1_000_020) {
        if let Message::Batch { seq, watermark, records, .. } = read_raw_non_heartbeat(&mut fake) {
            assert!(records.iter().all(|r| r.position.exit > 1_000_000));
            last = Some((seq, watermark));
        }
    }
    let (seq, watermark) = last.unwrap();
    throttling.release();
    write_raw(&mut fake, &Message::Ack { seq, watermark });
    throttling.returned(MARGIN);
    assert_eq!(primary.acked(), 1_000_020);
}

#[test]
fn throttle_bounds_the_bytes_queued_for_a_stalled_backup() {
    // A backup that stops dead: reads nothing, sends nothing.
    let config = ChannelConfig {
        heartbeat_timeout: Duration::from_secs(1),
        max_lag_bytes: 1 << 20,
        max_lag_exits: u64::MAX,
        ..ChannelConfig::default()
    };
    let (mut primary, stalled) = primary_with_fake_backup(&config);
    let start = Instant::now();
    let vcpu = thread::spawn(move || {
        let mut exit = 0;
        loop {
            exit += 1;
            primary.append(&exit_record(exit)).unwrap();
            primary.append(&disk_read_record(exit, 64 << 10)).unwrap();
            primary.passed(exit).unwrap();
            primary.throttle(exit);
            // Each throttle within the lag returns at once; the one that
            // blocks returns only when the backup is declared lost.
            if primary.backup_lost().is_some() {
                return (primary, exit);
            }
            assert!(exit < 1000, "throttle never blocked");
        }
    });
    let (primary, blocked_at) = vcpu.join().unwrap();
    // 1 MiB of 64 KiB disk reads, and the exit that went over: however
    // slowly this thread ran, it blocked there and nowhere before.
    assert!((16..=18).contains(&blocked_at), "throttle blocked at exit {blocked_at}");
    assert!(start.elapsed() < config.heartbeat_timeout + MARGIN, "{:?}", start.elapsed());
    let why = primary.backup_lost().unwrap();
    assert!(why.contains("no traffic from the backup"), "{why}");
    let one_exit = (2 * std::mem::size_of::<Record>() + (64 << 10)) as u64;
    assert!(primary.peak_unacked_bytes() <= config.max_lag_bytes + one_exit, "{}", primary.peak_unacked_bytes());
    assert!(primary.peak_unacked_bytes() > config.max_lag_bytes);
    drop(stalled);
}

#[test]
fn acks_release_the_byte_bound() {
    let config = ChannelConfig { max_lag_bytes: 256 << 10, max_lag_exits: u64::MAX, ..steady() };
    let (mut primary, mut backup) = pair(&config);
    let consumer = thread::spawn(move || {
        for exit in 1..=200 {
            assert_eq!(backup.next_record().unwrap(), Some(disk_read_record(exit, 64 << 10)));
        }
        backup
    });
    for exit in 1..=200 {
        primary.append(&disk_read_record(exit, 64 << 10)).unwrap();
        primary.passed(exit).unwrap();
        primary.throttle(exit);
        assert!(primary.unacked_bytes() <= config.max_lag_bytes + (64 << 10) + 64);
    }
    let _backup = consumer.join().unwrap();
    assert!(wait_until(MARGIN, || primary.unacked_bytes() == 0), "{}", primary.unacked_bytes());
    assert!(primary.peak_unacked_bytes() <= config.max_lag_bytes + (64 << 10) + 64);
    assert!(primary.backup_lost().is_none());
}

#[test]
fn chunks_sent_from_several_threads_do_not_interleave() {
    let config = ChannelConfig { state_window: 1 << 20, ..steady() };
    let (primary, mut backup) = joining_pair(&config);
    const CHUNK: usize = 3 << 20; // 12 pieces each
    let senders: Vec<_> = (1..=3u8)
        .map(|tag| {
            let sender = primary.state_sender();
            thread::spawn(move || {
                for _ in 0..4 {
                    sender.send_state(vec![tag; CHUNK]).unwrap();
                }
            })
        })
        .collect();
    let mut stream = Vec::new();
    while stream.len() < 12 * CHUNK {
        stream.extend(backup.next_state_chunk().unwrap().unwrap());
    }
    senders.into_iter().for_each(|s| s.join().unwrap());
    primary.end_state(1).unwrap();
    assert_eq!(backup.next_state_chunk().unwrap(), None);
    let mut count = [0; 4];
    for chunk in stream.chunks(CHUNK) {
        assert!(chunk.iter().all(|&b| b == chunk[0]), "two chunks interleaved");
        count[chunk[0] as usize] += 1;
    }
    assert_eq!(count, [0, 4, 4, 4]);
}

#[test]
fn a_backup_holding_its_window_stops_reading_and_both_stay_alive() {
    // The backup's window is smaller than the primary's: it stops reading
    // while it holds 1 MiB, and its VMM then pauses for several heartbeat
    // timeouts. Neither side may declare the other lost meanwhile.
    let primary_config = ChannelConfig { state_window: 16 << 20, ..fast() };
    let backup_config = ChannelConfig { state_window: 1 << 20, ..fast() };
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let connecting =
        thread::spawn(move || BackupLink::connect(&addr, &header(), &backup_config, Duration::from_secs(2)));
    let primary = listener.accept_joining(&header(), &primary_config).unwrap();
    let (mut backup, _) = connecting.join().unwrap().unwrap();
    let sender = primary.state_sender();
    let sending = thread::spawn(move || {
        sender.send_state(state_bytes(0, 16 << 20)).unwrap();
        sender.end_state(3).unwrap();
    });
    let first = backup.next_state_chunk().unwrap().unwrap();
    assert_eq!(first, state_bytes(0, first.len()));
    thread::sleep(primary_config.heartbeat_timeout * 5);
    assert!(backup.primary_lost().is_none(), "{:?}", backup.primary_lost());
    assert!(primary.backup_lost().is_none(), "{:?}", primary.backup_lost());
    let mut offset = first.len() as u64;
    while let Some(piece) = backup.next_state_chunk().unwrap() {
        assert!(piece == state_bytes(offset, piece.len()), "wrong state bytes from offset {offset}");
        offset += piece.len() as u64;
    }
    sending.join().unwrap();
    assert_eq!(offset, 16 << 20);
    assert!(backup.peak_state_queued() <= (1 << 20) + STATE_FRAME as u64, "{}", backup.peak_state_queued());
    assert!(backup.primary_lost().is_none() && primary.backup_lost().is_none());
}

#[test]
fn a_backup_whose_replay_lags_stops_reading_and_the_primary_throttles() {
    let config = ChannelConfig { heartbeat_timeout: Duration::from_millis(500), ..ChannelConfig::default() };
    let (primary, mut backup) = pair(&config);
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vcpu = {
        let (progress, stop) = (progress.clone(), stop.clone());
        thread::spawn(move || {
            let mut primary = primary;
            let mut exit = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && primary.backup_lost().is_none() {
                exit += 1;
                primary.append(&exit_record(exit)).unwrap();
                primary.passed(exit).unwrap();
                progress.store(exit, std::sync::atomic::Ordering::Relaxed);
                primary.throttle(exit);
            }
            primary
        })
    };
    // The backup's VMM takes nothing for a while: its queue stops growing at
    // the bound, it stops acknowledging, and the primary's throttle holds
    // its guest back.
    thread::sleep(Duration::from_secs(2));
    let (queued, at) = (backup.queued_records(), progress.load(std::sync::atomic::Ordering::Relaxed));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(progress.load(std::sync::atomic::Ordering::Relaxed), at, "the primary ran on unthrottled");
    assert!(
        queued <= crate::backup::MAX_QUEUED_RECORDS + 16 * 1024,
        "the backup holds {queued} records (bound {})",
        crate::backup::MAX_QUEUED_RECORDS
    );
    assert!(backup.primary_lost().is_none(), "neither side is lost while the backup holds back");
    // Once it replays, records flow again and the primary moves on.
    for _ in 0..queued + 1000 {
        backup.next_record().unwrap().unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || progress.load(std::sync::atomic::Ordering::Relaxed) > at));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Keep taking records so that the primary's last throttle returns.
    let drain = thread::spawn(move || while let Ok(Some(_)) = backup.next_record() {});
    let primary = vcpu.join().unwrap();
    assert!(primary.backup_lost().is_none(), "{:?}", primary.backup_lost());
    drop(primary);
    let _ = drain.join();
}

#[test]
fn a_diverged_backup_gets_the_whole_state_again_on_the_same_link() {
    let (mut primary, mut backup) = pair(&steady());
    for exit in 1..=10 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    for exit in 1..=5 {
        assert_eq!(backup.next_record().unwrap(), Some(exit_record(exit)));
    }
    // The backup's replay diverged at exit 5.
    backup.request_resync(5);
    let mut asked = None;
    assert!(wait_until(MARGIN, || {
        asked = asked.or_else(|| primary.take_resync_request());
        asked.is_some()
    }));
    assert_eq!(asked, Some(5));
    assert_eq!(primary.take_resync_request(), None, "a request is taken once");
    // The primary ran on meanwhile: these batches reach a diverged backup,
    // which drops them without acknowledging them.
    for exit in 11..=20 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
    }
    thread::sleep(Duration::from_millis(200));
    assert!(primary.acked() <= 10, "a diverged backup acknowledged exit {}", primary.acked());
    // The whole state at exit 20, then the log from exit 21 on.
    primary.restart_state();
    primary.send_state(state_bytes(0, 3 << 20)).unwrap();
    primary.end_state(20).unwrap();
    for exit in 21..=30 {
        primary.append(&exit_record(exit)).unwrap();
        primary.passed(exit).unwrap();
        // Not held back by the unacknowledged batches of the resync.
        primary.throttle(exit);
    }
    assert_eq!(read_state(&mut backup, Duration::ZERO).unwrap(), 3 << 20);
    assert_eq!(backup.state_exit(), Some(20));
    for exit in 21..=30 {
        assert_eq!(backup.next_record().unwrap(), Some(exit_record(exit)));
    }
    assert!(wait_until(MARGIN, || primary.acked() == 30), "acked {}", primary.acked());
    assert!(primary.backup_lost().is_none(), "{:?}", primary.backup_lost());
    assert!(backup.primary_lost().is_none(), "{:?}", backup.primary_lost());
}

#[test]
fn a_restarted_state_nobody_asked_for_is_a_protocol_error() {
    let (primary, mut fake) = primary_with_fake_joining_backup(&ChannelConfig {
        heartbeat_timeout: Duration::from_secs(3),
        ..ChannelConfig::default()
    });
    // The primary side: a StateRestart is only ever sent after restart_state.
    primary.restart_state();
    assert!(matches!(read_raw_non_heartbeat(&mut fake), Message::StateRestart));
    // The backup side: a real backup that did not ask refuses one.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake_primary = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&wire::preamble()).unwrap();
        let mut pre = [0u8; 12];
        s.read_exact(&mut pre).unwrap();
        write_raw(&mut s, &Message::Hello { header: header(), start: LogStart::Boot });
        assert!(matches!(read_raw_frame(&mut s), Message::Welcome));
        write_raw(&mut s, &Message::StateRestart);
        s
    });
    let (mut backup, _) = BackupLink::connect(&addr, &header(), &steady(), Duration::from_secs(2)).unwrap();
    let _s = fake_primary.join().unwrap();
    assert_eq!(backup.next_record().unwrap(), None);
    let why = backup.primary_lost().unwrap();
    assert!(why.contains("no resync was asked for"), "{why}");
}
