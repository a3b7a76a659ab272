//! credentials: ftvmm's TLS identity — a PEM certificate chain, its private
//! key and the cluster's CA — loaded into the mutual-TLS rustls
//! configurations that the logging channel and the shared-disk protocol
//! speak, and the identity (the certificate's subject common name) of a
//! peer that completed a handshake.
//!
//! The rules, the same on every connection of ftvmm and ftdisk:
//!
//! - both sides present their certificate, and each accepts only a peer whose
//!   certificate chains to the CA (`--tls-ca`): a peer without one, or with
//!   one from another CA, fails the handshake;
//! - the connecting side also checks that the server's certificate names the
//!   address it connected to: a subject alternative name equal to the host
//!   part of `host:port` (an IP address SAN for an IP, a DNS SAN for a name),
//!   as HTTPS does. Host certificates are therefore issued with SANs of the
//!   host's addresses and names (`ftcert` does);
//! - a peer's identity, for ftdisk's authorization, is its certificate's
//!   subject common name (CN).
//!
//! Only TLS 1.3 and 1.2 with rustls' safe defaults, over the `ring` provider.
//!
//! [`issue`] makes test credentials (a CA and host certificates) with rcgen.
//! [`cli`] is the command-line frame that `ftdisk` and `ftcert` share.

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod cli;
pub mod issue;

pub use rustls;

/// The three files of a TLS configuration, as given on the command line
/// (`--tls-cert`, `--tls-key`, `--tls-ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate (then any intermediates), PEM.
    pub cert: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates peers must chain to, PEM.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The configuration the three optional flags make: none of them is a
    /// plaintext run (`Ok(None)`); all three are TLS; anything in between is
    /// a usage error that names what is missing.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> =
                    [("--tls-cert", cert.is_none()), ("--tls-key", key.is_none()), ("--tls-ca", ca.is_none())]
                        .into_iter()
                        .filter_map(|(flag, absent)| absent.then_some(flag))
                        .collect();
                Err(format!("TLS needs all of --tls-cert, --tls-key and --tls-ca; missing {}", missing.join(" and ")))
            }
        }
    }
}

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{what} {path}: {why}")]
    File { what: &'static str, path: PathBuf, why: String },
    #[error("the certificate {cert} and the key {key} do not make a TLS identity: {why}")]
    Identity { cert: PathBuf, key: PathBuf, why: String },
    #[error("the CA {path}: {why}")]
    Ca { path: PathBuf, why: String },
}

/// A loaded TLS identity: the server and client configurations of mutual
/// TLS with this side's certificate and the CA, and this side's own name.
/// Cheap to clone (the configurations are shared).
#[derive(Clone)]
pub struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("name", &self.name).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(path).map_err(|e| CredentialError::File { what, path: path.to_path_buf(), why: e.to_string() })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    let pem = read_file(what, path)?;
    let bad = |why: String| CredentialError::File { what, path: path.to_path_buf(), why };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certs)
}

impl Tls {
    /// Reads and checks the three files: the certificate chain, a private
    /// key that matches its first certificate, and at least one CA
    /// certificate. Every failure names the file and what is wrong with it.
    pub fn load(files: &TlsFiles) -> Result<Tls, CredentialError> {
        let chain = certificates("the certificate", &files.cert)?;
        let key_pem = read_file("the key", &files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CredentialError::File {
            what: "the key",
            path: files.key.clone(),
            why: format!("no PEM private key in it: {e}"),
        })?;
        let name = common_name(&chain[0]).ok_or_else(|| CredentialError::File {
            what: "the certificate",
            path: files.cert.clone(),
            why: "it does not parse as X.509, or its subject has no common name (CN)".into(),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("the CA", &files.ca)? {
            roots.add(ca).map_err(|e| CredentialError::Ca {
                path: files.ca.clone(),
                why: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let ca_err = |e: &dyn std::fmt::Display| CredentialError::Ca { path: files.ca.clone(), why: e.to_string() };
        let identity_err = |e: rustls::Error| CredentialError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            why: e.to_string(),
        };
        let clients =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build().map_err(|e| ca_err(&e))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_err(&e))?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(identity_err)?;
        // No resumption tickets: connections are few and long-lived, and the
        // first bytes after the handshake should be the application's.
        server.send_tls13_tickets = 0;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider()).build().map_err(|e| ca_err(&e))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_err(&e))?
            .with_webpki_verifier(servers)
            .with_client_auth_cert(chain, key)
            .map_err(identity_err)?;
        Ok(Tls { server: Arc::new(server), client: Arc::new(client), name })
    }

    /// The configuration for accepting connections (client certificates
    /// required, verified against the CA).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The configuration for connecting (the server verified against the CA
    /// and the address; our certificate presented).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// This side's name: its certificate's subject common name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The name a server at `addr` (`host:port`, `[v6]:port`) must hold in its
/// certificate: the host part, as an IP address or a DNS name.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host,
        _ => return Err(format!("{addr:?} is not host:port")),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
}

/// The subject common name of a DER certificate, if it parses and has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The identity of the peer of a connection whose handshake completed: the
/// common name of the first certificate it presented.
pub fn peer_name(certificates: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certificates.and_then(|chain| chain.first()).and_then(common_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS handshake in memory between a server with `server` and a
    /// client with `client` that connects to `host`; the server's view of
    /// the client's name, or the first error.
    fn handshake(server: &Tls, client: &Tls, host: &str) -> Result<Option<String>, rustls::Error> {
        let mut s = rustls::ServerConnection::new(server.server_config())?;
        let name = ServerName::try_from(host.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(client.client_config(), name)?;
        for _ in 0..20 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()?;
            }
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()?;
            }
            if !s.is_handshaking() && !c.is_handshaking() {
                return Ok(peer_name(s.peer_certificates()));
            }
        }
        panic!("the handshake did not end");
    }

    #[test]
    fn half_a_configuration_names_what_is_missing() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_flags(None, None, None), Ok(None));
        assert!(TlsFiles::from_flags(p("c"), p("k"), p("a")).is_ok_and(|f| f.is_some()));
        let err = TlsFiles::from_flags(p("c"), None, None).unwrap_err();
        assert!(err.contains("missing --tls-key and --tls-ca"), "{err}");
        let err = TlsFiles::from_flags(None, None, p("a")).unwrap_err();
        assert!(err.contains("missing --tls-cert and --tls-key"), "{err}");
    }

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(server_name("10.0.0.1:7000").unwrap(), ServerName::try_from("10.0.0.1").unwrap());
        assert_eq!(server_name("storage:7100").unwrap(), ServerName::try_from("storage").unwrap());
        assert_eq!(server_name("[::1]:7100").unwrap(), ServerName::try_from("::1").unwrap());
        assert!(server_name("10.0.0.1").is_err());
        assert!(server_name(":7000").is_err());
    }

    #[test]
    fn an_issued_identity_loads_and_a_foreign_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("credentials-issue-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = issue::Authority::new("test ca").unwrap();
        let ca_path = ca.save(&dir).unwrap();
        let sans = vec!["10.0.0.1".to_string()];
        let host = ca.issue(&dir, "host", &sans).unwrap();
        let other = ca.issue(&dir, "other", &sans).unwrap();
        let tls = Tls::load(&TlsFiles { cert: host.cert.clone(), key: host.key, ca: ca_path.clone() }).unwrap();
        assert_eq!(tls.name(), "host");
        // A CA reloaded from its files signs certificates that chain to it.
        let again = issue::Authority::load(&dir).unwrap().issue(&dir, "later", &sans).unwrap();
        let later = Tls::load(&TlsFiles { cert: again.cert, key: again.key, ca: ca_path.clone() }).unwrap();
        assert_eq!(handshake(&tls, &later, "10.0.0.1"), Ok(Some("later".to_string())));
        assert_eq!(handshake(&later, &tls, "10.0.0.1"), Ok(Some("host".to_string())));
        // The server's certificate must name the address.
        assert!(handshake(&tls, &later, "10.0.0.2").is_err());
        // Another CA's certificates are refused, either way round.
        let foreign_dir = dir.join("foreign");
        std::fs::create_dir_all(&foreign_dir).unwrap();
        let foreign_ca = issue::Authority::new("foreign ca").unwrap();
        let foreign_ca_path = foreign_ca.save(&foreign_dir).unwrap();
        let f = foreign_ca.issue(&foreign_dir, "host", &sans).unwrap();
        let foreign = Tls::load(&TlsFiles { cert: f.cert, key: f.key, ca: foreign_ca_path }).unwrap();
        assert!(handshake(&tls, &foreign, "10.0.0.1").is_err());
        assert!(handshake(&foreign, &tls, "10.0.0.1").is_err());
        let err = Tls::load(&TlsFiles { cert: host.cert, key: other.key, ca: ca_path }).unwrap_err().to_string();
        assert!(err.contains("do not make a TLS identity"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("credentials-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let files = TlsFiles { cert: junk.clone(), key: junk.clone(), ca: junk.clone() };
        let err = Tls::load(&files).unwrap_err().to_string();
        assert!(err.contains("the certificate") && err.contains("junk.pem"), "{err}");
        let files = TlsFiles { cert: dir.join("absent.pem"), key: junk.clone(), ca: junk };
        let err = Tls::load(&files).unwrap_err().to_string();
        assert!(err.contains("absent.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
