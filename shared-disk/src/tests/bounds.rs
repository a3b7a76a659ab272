//! Bounds: what a slow, silent or absent peer can make either side hold,
//! and for how long.

use super::*;
use crate::server::Timeouts;

const SHORT: Timeouts =
    Timeouts { handshake: Duration::from_secs(1), frame: Duration::from_secs(1), idle: Duration::from_secs(60) };

fn start_short(image: &Path) -> Server {
    logs();
    Server::start_with(image, TcpListener::bind("127.0.0.1:0").unwrap(), SHORT).unwrap()
}

/// The most a kernel buffers on one loopback connection, both ends: the
/// sender's largest send buffer and the receiver's largest receive buffer.
fn kernel_buffering() -> u64 {
    let max = |path: &str| -> u64 {
        fs::read_to_string(path)
            .ok()
            .and_then(|text| text.split_whitespace().last().and_then(|n| n.parse().ok()))
            .unwrap_or(64 << 20)
    };
    max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem")
}

fn wait_for_connections(server: &Server, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    while server.connections() != n {
        assert!(started.elapsed() < within, "still {} connections after {within:?}", server.connections());
        thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

#[test]
fn a_client_that_sends_but_never_reads_costs_one_answer_and_is_dropped() {
    let dir = TempDir::new("never-reads");
    let image = dir.image(8 << 20);
    let server = start_short(&image);
    let mut good = client(&server);
    let before = server.stats().executed;

    let mut greedy = raw_connect(server.local_addr());
    greedy.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    // Requests for 4 MiB answers, sent as fast as the server takes them.
    let batch: Vec<u8> = (1..=4096u64)
        .flat_map(|seq| proto::encode(&Request { session: 77, seq, op: Op::Read { offset: 0, len: MAX_IO } }).unwrap())
        .collect();
    let mut sent = 0u64;
    let blocked = loop {
        if sent > 256 << 20 {
            break false;
        }
        match greedy.write_all(&batch) {
            Ok(()) => sent += batch.len() as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break true,
            // The server already dropped us.
            Err(_) => break true,
        }
    };
    assert!(blocked, "the server kept taking requests: {sent} bytes");
    // The server stopped reading once its answers could not go out: it
    // executed no more requests than the kernel can buffer answers for,
    // plus the one it holds.
    let executed = server.stats().executed - before;
    let bound = kernel_buffering() / u64::from(MAX_IO) + 2;
    assert!(executed <= bound, "executed {executed} requests (bound {bound}) after {sent} bytes");
    // Others are served meanwhile.
    assert_eq!(good.read(0, 512).unwrap(), vec![0; 512]);
    // The answer that does not go out within the frame timeout ends the
    // connection (the good client's stays).
    let took = wait_for_connections(&server, 1, Duration::from_secs(5));
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(good.read(0, 512).unwrap(), vec![0; 512]);
    assert_eq!(server.stats().connection_panics, 0);
}

#[test]
fn a_frame_trickled_byte_by_byte_is_cut_off_at_the_frame_timeout() {
    let dir = TempDir::new("trickle-in");
    let image = dir.image(64 << 10);
    let server = start_short(&image);
    let mut s = raw_connect(server.local_addr());
    s.write_all(&1000u32.to_le_bytes()).unwrap();
    let started = Instant::now();
    // A byte every 200 ms: each read is quick, the frame never completes.
    while server.connections() > 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the trickling peer was kept");
        if s.write_all(&[0]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    wait_for_connections(&server, 0, Duration::from_secs(5));
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
}

#[test]
fn a_preamble_that_never_comes_is_cut_off_at_the_handshake_timeout() {
    let dir = TempDir::new("silent");
    let image = dir.image(64 << 10);
    let server = start_short(&image);
    let _silent = TcpStream::connect(server.local_addr()).unwrap();
    wait_for_connections(&server, 1, Duration::from_secs(2));
    let took = wait_for_connections(&server, 0, Duration::from_secs(4));
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A fake ftdisk: does the handshake, then feeds each connection to `then`.
fn fake_server(then: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let then = Arc::new(then);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let then = then.clone();
            thread::spawn(move || {
                if stream.write_all(&proto::preamble()).is_ok() && proto::read_preamble(&mut stream).is_ok() {
                    then(stream);
                }
            });
        }
    });
    addr
}

#[test]
fn a_client_gives_up_on_a_server_that_never_answers() {
    // Reads every request, answers none.
    let addr = fake_server(|mut s| {
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    let started = Instant::now();
    let err = DiskClient::connect(&addr.to_string(), Duration::from_millis(500)).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[test]
fn a_client_gives_up_on_a_server_that_trickles_its_answer() {
    // Answers with a long frame, a byte every 100 ms.
    let addr = fake_server(|mut s| {
        let mut buf = Vec::new();
        if proto::read_frame(&mut s, &mut buf).is_err() {
            return;
        }
        let _ = s.write_all(&1000u32.to_le_bytes());
        for _ in 0..1000 {
            if s.write_all(&[0]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let started = Instant::now();
    let err = Arbiter::connect(&addr.to_string(), Duration::from_millis(500)).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}
