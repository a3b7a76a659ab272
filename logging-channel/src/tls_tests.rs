//! Tests of the channel over mutual TLS on 127.0.0.1, with credentials made
//! by `credentials::issue`: a pair streams its log and state, and peers
//! without the right certificate are refused while the primary keeps
//! waiting for the right backup.

use crate::*;
use credentials::issue::Authority;
use credentials::rustls;
use credentials::{Tls, TlsFiles};
use replay::{Digest, Entry, Event, Header, Position, Record, RecordSink, RecordSource};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

fn header() -> Header {
    Header { image_hash: Digest([7; 32]), config: "mem=64M".into(), wall_clock_base_ns: 5, disk_generation: 0 }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Dir {
    let dir = std::env::temp_dir().join(format!("lc-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Dir(dir)
}

/// A CA in `dir` and certificates for `names` (SANs 127.0.0.1 and
/// localhost unless given).
fn credentials(dir: &Path, names: &[(&str, &[&str])]) -> Vec<Tls> {
    let ca = Authority::new("test ca").unwrap();
    let ca_path = ca.save(dir).unwrap();
    names
        .iter()
        .map(|(name, sans)| {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let issued = ca.issue(dir, name, &sans).unwrap();
            Tls::load(&TlsFiles { cert: issued.cert, key: issued.key, ca: ca_path.clone() }).unwrap()
        })
        .collect()
}

const LOCAL: &[&str] = &["127.0.0.1", "localhost"];

fn with_tls(tls: &Tls) -> ChannelConfig {
    ChannelConfig { heartbeat_timeout: Duration::from_millis(500), tls: Some(tls.clone()), ..ChannelConfig::default() }
}

fn serial_record(exit: u64, bytes: &[u8]) -> Record {
    Record { position: Position { exit, rip: 0x1000 }, entry: Entry::Event(Event::SerialRx { bytes: bytes.to_vec() }) }
}

#[test]
fn a_tls_pair_streams_the_state_and_the_log() {
    let dir = scratch("pair");
    let tls = credentials(&dir.0, &[("primary", LOCAL), ("backup", LOCAL)]);
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let backup_config = with_tls(&tls[1]);
    let backup = thread::spawn(move || {
        let (mut link, info) = BackupLink::connect(&addr, &header(), &backup_config, Duration::from_secs(5)).unwrap();
        assert_eq!(info.start, LogStart::State);
        let mut state = Vec::new();
        while let Some(piece) = link.next_state_chunk().unwrap() {
            state.extend(piece);
        }
        let mut records = Vec::new();
        while let Some(record) = link.next_record().unwrap() {
            records.push(record);
        }
        (state, records)
    });
    let mut primary = listener.accept_joining(&header(), &with_tls(&tls[0])).unwrap();
    // Larger than the socket buffers: writes that cannot go out at once
    // must still go out without another write behind them.
    let state: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    primary.send_state(state.clone()).unwrap();
    primary.end_state(10).unwrap();
    let records: Vec<Record> = (11..2011).map(|exit| serial_record(exit, b"secret")).collect();
    for record in &records {
        primary.append(record).unwrap();
    }
    primary.passed(2011).unwrap();
    assert!(primary.finish(Duration::from_secs(10)), "the backup acknowledged everything over TLS");
    let (got_state, got_records) = backup.join().unwrap();
    assert!(got_state == state, "the state arrived whole");
    assert_eq!(got_records, records);
}

/// Connects and sends what `speak` sends; returns once the primary hung up
/// or the handshake failed on our side.
fn intruder(addr: String, speak: impl FnOnce(TcpStream) + Send + 'static) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        speak(s);
    })
}

/// A TLS client handshake over `s` with `config`, then the channel's
/// preamble; true if the primary let it through to its preamble.
fn tls_client(s: TcpStream, config: Arc<rustls::ClientConfig>) -> bool {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    if tls.write_all(b"FTVMMLCH\x02\0\0\0").and_then(|()| tls.flush()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    tls.read_exact(&mut buf).is_ok()
}

#[test]
fn strangers_are_refused_and_the_right_backup_still_attaches() {
    let dir = scratch("strangers");
    let ours = credentials(&dir.0, &[("primary", LOCAL), ("backup", LOCAL)]);
    let foreign_dir = scratch("strangers-foreign");
    let foreign = credentials(&foreign_dir.0, &[("backup", LOCAL)]);
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let primary_config = with_tls(&ours[0]);
    let accepting = {
        let config = primary_config.clone();
        thread::spawn(move || listener.accept(&header(), &config).map(|link| (link, listener)))
    };
    // A plaintext backup: the primary sees no ClientHello.
    let plaintext = {
        let addr = addr.clone();
        thread::spawn(move || BackupLink::connect(&addr, &header(), &ChannelConfig::default(), Duration::from_secs(5)))
    };
    // A backup with a certificate from another CA.
    let other_ca = {
        let (addr, config) = (addr.clone(), with_tls(&foreign[0]));
        thread::spawn(move || BackupLink::connect(&addr, &header(), &config, Duration::from_secs(5)))
    };
    // A TLS client that trusts our CA but presents no certificate.
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(dir.0.join("ca.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(ca.unwrap()).unwrap();
    }
    let anonymous = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let no_cert = {
        let addr = addr.clone();
        thread::spawn(move || {
            let s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            tls_client(s, anonymous)
        })
    };
    // Garbage.
    let garbage = intruder(addr.clone(), |mut s| {
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]);
        let _ = s.read(&mut [0u8; 64]);
    });

    match plaintext.join().unwrap() {
        Err(_) => {}
        Ok(_) => panic!("a plaintext backup attached to a TLS primary"),
    }
    match other_ca.join().unwrap() {
        Err(ChannelError::Tls(why)) => assert!(why.contains("certificate"), "{why}"),
        Err(e) => panic!("a backup from another CA failed otherwise: {e}"),
        Ok(_) => panic!("a backup from another CA attached"),
    }
    assert!(!no_cert.join().unwrap(), "a client without a certificate got past the TLS handshake");
    garbage.join().unwrap();
    assert!(!accepting.is_finished(), "the primary stopped waiting after the strangers");

    // The right backup still attaches.
    let (addr2, config) = (addr.clone(), with_tls(&ours[1]));
    let backup = thread::spawn(move || BackupLink::connect(&addr2, &header(), &config, Duration::from_secs(5)));
    let (mut primary, _listener) = accepting.join().unwrap().unwrap();
    let (mut backup, _) = backup.join().unwrap().unwrap();
    primary.append(&serial_record(1, b"hello")).unwrap();
    primary.passed(1).unwrap();
    assert_eq!(backup.next_record().unwrap(), Some(serial_record(1, b"hello")));
}

#[test]
fn a_primary_whose_certificate_does_not_name_the_address_is_refused() {
    let dir = scratch("names");
    let tls = credentials(&dir.0, &[("primary", &["10.123.0.1", "elsewhere"]), ("backup", LOCAL)]);
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().to_string();
    let primary_config = with_tls(&tls[0]);
    let _accepting = thread::spawn(move || {
        let _ = listener.accept(&header(), &primary_config);
    });
    match BackupLink::connect(&addr, &header(), &with_tls(&tls[1]), Duration::from_secs(5)) {
        Err(ChannelError::Tls(why)) => {
            assert!(why.contains("not valid for name") || why.contains("NotValidForName"), "{why}")
        }
        Err(e) => panic!("failed otherwise: {e}"),
        Ok(_) => panic!("the backup accepted a primary certificate for another address"),
    }
}

/// A TCP relay to `to` for one connection, whose [`Relay::cut`] ends both
/// sides with a FIN and nothing else (no TLS close_notify), as a host that
/// dies does.
struct Relay {
    addr: String,
    sockets: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: String) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sockets = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = sockets.clone();
        thread::spawn(move || {
            let (a, _) = listener.accept().unwrap();
            let b = TcpStream::connect(&to).unwrap();
            let copies =
                [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b.try_clone().unwrap(), a.try_clone().unwrap())];
            // Kept open until the test ends: a socket closed with unread
            // bytes would send a reset, not the FIN a dead host's kernel
            // sends.
            kept.lock().unwrap().extend([a, b]);
            for (mut from, mut to) in copies {
                thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                });
            }
        });
        Relay { addr, sockets }
    }

    fn cut(&self) {
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_tls_primary_that_dies_without_close_notify_reads_as_a_closed_connection() {
    let dir = scratch("death");
    let tls = credentials(&dir.0, &[("primary", LOCAL), ("backup", LOCAL)]);
    let listener = PrimaryListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::start(listener.local_addr().to_string());
    let primary_config = with_tls(&tls[0]);
    let accepting = thread::spawn(move || listener.accept(&header(), &primary_config).unwrap());
    let (mut backup, _) =
        BackupLink::connect(&relay.addr, &header(), &with_tls(&tls[1]), Duration::from_secs(5)).unwrap();
    let mut primary = accepting.join().unwrap();
    primary.append(&serial_record(1, b"hello")).unwrap();
    primary.passed(1).unwrap();
    assert_eq!(backup.next_record().unwrap(), Some(serial_record(1, b"hello")));
    // The primary's host dies: its kernel closes the TCP connection, and
    // no TLS close_notify is sent.
    relay.cut();
    assert_eq!(backup.next_record().unwrap(), None);
    let why = backup.primary_lost().unwrap();
    // As on a plaintext link, and without rustls' explanation of a missing
    // close_notify (and its documentation link).
    assert!(why.contains("the peer closed the connection"), "{why}");
    assert!(!why.contains("close_notify") && !why.contains("https://"), "{why}");
    drop(primary);
}
