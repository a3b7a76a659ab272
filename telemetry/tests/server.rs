//! The metrics server over real sockets: what it answers, and that no
//! client — garbage, an oversize head, one that sends nothing, a crowd —
//! can make it panic, hang or stop serving the next one.

use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::prometheus_client::metrics::counter::Counter;
use telemetry::prometheus_client::registry::Registry;
use telemetry::{fetch_status, http_get, MetricsServer, TelemetryError, MAX_REQUEST_HEAD, REQUEST_TIMEOUT};

fn server() -> (MetricsServer, Counter) {
    let mut registry = Registry::default();
    let requests: Counter = Counter::default();
    registry.register("demo_requests", "Requests served", requests.clone());
    let calls = Arc::new(AtomicU64::new(0));
    let status = Arc::new(move || {
        let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
        json!({ "program": "demo", "state": "protected", "calls": n })
    });
    let server = MetricsServer::start("127.0.0.1:0", Arc::new(registry), status).expect("start");
    (server, requests)
}

/// Sends `bytes` and returns whatever comes back before the server closes.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    // Done sending: a head without its end is cut short, not waited for.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: SocketAddr, path: &str) -> telemetry::HttpResponse {
    http_get(&addr.to_string(), path, Duration::from_secs(5)).expect("GET")
}

#[test]
fn answers_metrics_status_and_404() {
    let (server, requests) = server();
    let addr = server.local_addr();
    requests.inc_by(3);
    let m = get(addr, "/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(m.content_type.as_deref(), Some(telemetry::METRICS_CONTENT_TYPE));
    let text = String::from_utf8(m.body).unwrap();
    assert!(text.contains("# TYPE demo_requests counter\n"), "{text}");
    assert!(text.contains("\ndemo_requests_total 3\n"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    let s = get(addr, "/status?pretty=no");
    assert_eq!((s.status, s.content_type.as_deref()), (200, Some("application/json")));
    let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
    assert_eq!(v["program"], "demo");
    // The closure runs per request.
    assert_eq!(fetch_status(&addr.to_string()).unwrap()["calls"], 2);
    assert_eq!(fetch_status(&format!("http://{addr}/")).unwrap()["calls"], 3);

    for path in ["/", "/metricsx", "/status/", "/favicon.ico"] {
        assert_eq!(get(addr, path).status, 404, "{path}");
    }
    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
    let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    // A person with netcat: bare LF.
    let nc = exchange(addr, b"GET /status HTTP/1.0\n\n");
    assert!(nc.starts_with("HTTP/1.1 200 OK\r\n") && nc.contains("\"program\":\"demo\""), "{nc}");
}

#[test]
fn survives_garbage_oversize_heads_and_a_panicking_status() {
    let (server, _) = server();
    let addr = server.local_addr();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..50 {
        let mut junk = Vec::new();
        for _ in 0..(round * 37 % 600) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push(seed as u8);
        }
        if round % 2 == 0 {
            junk.extend_from_slice(b"\r\n\r\n");
        }
        if round % 5 == 0 {
            // Connect, send, vanish without reading.
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&junk);
            continue;
        }
        let answer = exchange(addr, &junk);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "round {round}: {answer:?}");
    }
    for bad in [&b"GET\r\n\r\n"[..], b"GET / HTTP/2.0\r\n\r\n", b"\0\0\0\0\r\n\r\n", b"GET  /  HTTP/1.1\r\n\r\n"] {
        let answer = exchange(addr, bad);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{bad:?}: {answer}");
    }
    // An endless head: 431 once the limit is reached, not more read.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Junk: ".to_vec();
    big.resize(MAX_REQUEST_HEAD * 4, b'a');
    let answer = exchange(addr, &big);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert_eq!(get(addr, "/metrics").status, 200);

    let panicking =
        MetricsServer::start("127.0.0.1:0", Arc::new(Registry::default()), Arc::new(|| panic!("status is broken")))
            .unwrap();
    let a = panicking.local_addr();
    assert_eq!(get(a, "/status").status, 500);
    assert_eq!(get(a, "/metrics").status, 200, "the server goes on after a panic");
    assert_eq!(get(a, "/status").status, 500);
}

#[test]
fn clients_that_send_nothing_do_not_stop_the_next() {
    let (server, _) = server();
    let addr = server.local_addr();
    // More silent clients than workers: each holds one for at most
    // REQUEST_TIMEOUT.
    let silent: Vec<TcpStream> = (0..telemetry::WORKERS + 1).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    assert_eq!(get(addr, "/metrics").status, 200);
    let took = start.elapsed();
    assert!(took < REQUEST_TIMEOUT + Duration::from_millis(1500), "the next client waited {took:?}");
    // Each silent one was told it took too long.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    }
    // A slowloris: a byte now and then never gets more than REQUEST_TIMEOUT.
    let mut slow = TcpStream::connect(addr).unwrap();
    let start = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        if slow.write_all(b"G").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = slow.read_to_string(&mut out);
    assert!(closed || out.starts_with("HTTP/1.1 408 "), "{out}");
    assert!(start.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(3));
}

#[test]
fn a_crowd_gets_answers_or_503_never_a_hang() {
    let (server, _) = server();
    let addr = server.local_addr();
    let silent: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let answer = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503 ") || answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(start.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(1), "{:?} {answer}", start.elapsed());
    let start = Instant::now();
    // Once the crowd is gone (its queued connections time out or close),
    // it serves again: the queued ones time out together.
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(2);
    loop {
        let answer = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        if answer.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(start.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(1), "{:?}", start.elapsed());
    drop(silent);
}

#[test]
fn stops_on_drop_and_names_the_address_it_cannot_bind() {
    let (server, _) = server();
    let addr = server.local_addr();
    let _silent = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let err = MetricsServer::start(&busy, Arc::new(Registry::default()), Arc::new(|| json!({}))).err().unwrap();
    assert!(matches!(err, TelemetryError::Bind { .. }));
    assert!(err.to_string().starts_with(&format!("cannot serve metrics on {busy}: ")), "{err}");
    drop(server);
    assert!(start.elapsed() < Duration::from_secs(2), "stopping took {:?}", start.elapsed());
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(), "still listening");
}

#[test]
fn fetch_status_reports_what_went_wrong_in_one_line() {
    // Nothing listening.
    let gone = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let err = fetch_status(&gone).unwrap_err();
    assert!(err.to_string().starts_with(&format!("cannot reach {gone}: ")), "{err}");
    assert!(!err.to_string().contains('\n'));
    assert!(fetch_status("no-such-host.invalid:1").unwrap_err().to_string().starts_with("cannot resolve"));
    assert!(fetch_status("not an address").is_err());

    // Something that is not our server.
    for answer in [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], b"HTTP/1.1 200 OK\r\n\r\nnot json", b"HTTP/1.1 200 OK\r\n\r\n[1]"] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let answer = answer.to_vec();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&answer);
        });
        let err = fetch_status(&addr).unwrap_err().to_string();
        assert!(err.starts_with(&addr) && !err.contains('\n'), "{err}");
        t.join().unwrap();
    }
    let (server, _) = server();
    let err = http_get(&server.local_addr().to_string(), "/nope", Duration::from_secs(5)).unwrap();
    assert_eq!(err.status, 404);
}
