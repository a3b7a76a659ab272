//! Making test credentials (for `ftcert`, the demo and the tests): a CA,
//! and certificates it signs for hosts, each a PEM certificate and key.
//! Real deployments use certificates from their own CA instead; only the
//! rules in the crate's documentation matter to ftvmm and ftdisk.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A CA that can sign host certificates: its certificate and key.
pub struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// The files of one issued certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_public(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl Authority {
    /// A new self-signed CA with the subject common name `name`.
    pub fn new(name: &str) -> Result<Authority, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(|e| format!("generating the CA's key: {e}"))?;
        let cert = params.self_signed(&key).map_err(|e| format!("signing the CA: {e}"))?;
        Ok(Authority { cert, key })
    }

    /// The CA kept in `dir` as `ca.pem` and `ca.key`.
    pub fn load(dir: &Path) -> Result<Authority, String> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&read(&cert_path)?)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        // The same subject and key as the file: what signs with it chains to
        // the file's certificate.
        let cert = params.self_signed(&key).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        Ok(Authority { cert, key })
    }

    /// Writes `ca.pem` and `ca.key` into `dir`; returns the certificate's path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, String> {
        let cert = dir.join("ca.pem");
        write_public(&cert, &self.cert.pem())?;
        write_private(&dir.join("ca.key"), &self.key.serialize_pem())?;
        Ok(cert)
    }

    /// Issues a certificate with the subject common name `name` and the
    /// subject alternative names `sans` (IP addresses or DNS names), valid
    /// for both TLS servers and clients; writes `NAME.pem` and `NAME.key`
    /// into `dir`.
    pub fn issue(&self, dir: &Path, name: &str, sans: &[String]) -> Result<Issued, String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("{name:?}: a host name is letters, digits, '-', '_' and '.'"));
        }
        let mut params = CertificateParams::new(sans.to_vec()).map_err(|e| format!("{name}: a bad SAN: {e}"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(|e| format!("generating {name}'s key: {e}"))?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(|e| format!("signing {name}: {e}"))?;
        let issued = Issued { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        write_public(&issued.cert, &cert.pem())?;
        write_private(&issued.key, &key.serialize_pem())?;
        Ok(issued)
    }
}
