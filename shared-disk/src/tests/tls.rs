//! Mutual TLS and authorization: a TLS client and server work as over
//! plaintext (across a server restart too); strangers — plaintext, another
//! CA, garbage — are refused without harm; a certificate that is not on the
//! allow list cannot read, write or claim, and the image and the record are
//! unchanged.

use super::*;
use credentials::issue::Authority;
use credentials::{Tls, TlsFiles};
use std::collections::BTreeSet;

/// A CA and certificates for `names` (SANs 127.0.0.1 and localhost) in `dir`.
fn credentials(dir: &Path, names: &[&str]) -> Vec<Tls> {
    let ca = Authority::new("test ca").unwrap();
    let ca_path = ca.save(dir).unwrap();
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    names
        .iter()
        .map(|name| {
            let issued = ca.issue(dir, name, &sans).unwrap();
            Tls::load(&TlsFiles { cert: issued.cert, key: issued.key, ca: ca_path.clone() }).unwrap()
        })
        .collect()
}

fn start_tls(image: &Path, tls: &Tls, allowed: &[&str]) -> Server {
    logs();
    let allowed = (!allowed.is_empty()).then(|| allowed.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
    let access = Access { tls: tls.clone(), allowed };
    Server::start_secured(image, TcpListener::bind("127.0.0.1:0").unwrap(), Some(access)).unwrap()
}

#[test]
fn a_tls_client_reads_writes_and_claims_across_a_restart() {
    let dir = TempDir::new("tls-basic");
    let creds = credentials(&dir.0, &["storage", "primary"]);
    let image = dir.image(8 << 20);
    let server = start_tls(&image, &creds[0], &["primary"]);
    let addr = server.local_addr();
    let mut client = DiskClient::connect_secured(&addr.to_string(), TIMEOUT, Some(creds[1].clone())).unwrap();
    assert_eq!(client.size(), 8 << 20);
    let data = block(3);
    client.write(4096, &data, 0).unwrap();
    assert_eq!(client.read(4096, data.len()).unwrap(), data);
    assert_eq!(client.test_and_set(0, "primary").unwrap(), TasOutcome::Won { generation: 1 });
    // A large transfer: many TLS records each way.
    let big: Vec<u8> = (0..MAX_IO as usize).map(|i| (i % 253) as u8).collect();
    client.write(0, &big, 1).unwrap();
    drop(server);
    let listener = TcpListener::bind(addr).unwrap();
    let access = Access { tls: creds[0].clone(), allowed: None };
    let _server = Server::start_secured(&image, listener, Some(access)).unwrap();
    assert_eq!(client.read(0, big.len()).unwrap(), big, "the client reconnected over TLS");
}

#[test]
fn an_unlisted_certificate_cannot_read_write_or_claim_and_nothing_changes() {
    let dir = TempDir::new("tls-unlisted");
    let creds = credentials(&dir.0, &["storage", "primary", "intruder"]);
    let image = dir.image(1 << 20);
    fs::write(&image, vec![0x5a; 1 << 20]).unwrap();
    let server = start_tls(&image, &creds[0], &["primary"]);
    let addr = server.local_addr().to_string();
    let forbidden = |e: ClientError| match e {
        ClientError::Disk(DiskError::Forbidden { name }) => assert_eq!(name, "intruder"),
        other => panic!("expected Forbidden, got {other}"),
    };
    let mut intruder = DiskClient::connect_secured(&addr, TIMEOUT, Some(creds[2].clone())).unwrap();
    forbidden(intruder.write(0, &[0u8; 512], 0).unwrap_err());
    forbidden(intruder.flush(0).unwrap_err());
    forbidden(intruder.read(0, 512).unwrap_err());
    forbidden(intruder.test_and_set(0, "intruder").unwrap_err());
    let mut arbiter = Arbiter::connect_secured(&addr, TIMEOUT, Some(creds[2].clone())).unwrap();
    forbidden(arbiter.test_and_set(0, "intruder").unwrap_err());
    // Nothing was written, nothing claimed.
    assert_eq!(arbiter.owner().unwrap(), (0, String::new()));
    assert_eq!(server.stats().writes_applied, 0);
    drop(server);
    assert!(fs::read(&image).unwrap().iter().all(|&b| b == 0x5a), "the image changed");
    // The listed certificate may.
    let server = start_tls(&image, &creds[0], &["primary"]);
    let mut primary =
        DiskClient::connect_secured(&server.local_addr().to_string(), TIMEOUT, Some(creds[1].clone())).unwrap();
    assert_eq!(primary.test_and_set(0, "primary").unwrap(), TasOutcome::Won { generation: 1 });
}

#[test]
fn strangers_are_refused_and_the_server_goes_on() {
    let dir = TempDir::new("tls-strangers");
    let creds = credentials(&dir.0, &["storage", "primary"]);
    let foreign_dir = TempDir::new("tls-strangers-foreign");
    let foreign = credentials(&foreign_dir.0, &["primary"]);
    let image = dir.image(1 << 20);
    let server = start_tls(&image, &creds[0], &[]);
    let addr = server.local_addr().to_string();

    // A certificate from another CA: refused at the handshake, at once
    // (not retried for the client's whole retry time).
    let started = Instant::now();
    match DiskClient::connect_secured(&addr, TIMEOUT, Some(foreign[0].clone())) {
        Err(ClientError::Tls { why, .. }) => assert!(!why.is_empty()),
        other => panic!("a client from another CA: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    // Plaintext to the TLS port.
    match DiskClient::connect(&addr, Duration::from_secs(2)) {
        Err(_) => {}
        Ok(_) => panic!("a plaintext client got an answer from a TLS server"),
    }
    // Garbage, and a connection that closes at once.
    for bytes in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0][..], &[][..]] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        assert!(!sink.windows(8).any(|w| w == MAGIC), "the server spoke its protocol to a non-TLS peer");
    }
    // A TLS client against a plaintext server fails clearly too.
    let plain_dir = TempDir::new("tls-plain-server");
    let plain = start(&plain_dir.image(1 << 20));
    match DiskClient::connect_secured(&plain.local_addr().to_string(), TIMEOUT, Some(creds[1].clone())) {
        Err(ClientError::Tls { .. }) => {}
        other => panic!("a TLS client against a plaintext server: {other:?}"),
    }
    // The right client is still served.
    let mut client = DiskClient::connect_secured(&addr, TIMEOUT, Some(creds[1].clone())).unwrap();
    client.write(0, &[7u8; 512], 0).unwrap();
    assert_eq!(client.read(0, 512).unwrap(), vec![7u8; 512]);
    assert_eq!(server.stats().connection_panics, 0);
}
