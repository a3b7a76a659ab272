//! `ftcert`: makes test TLS credentials for ftvmm and ftdisk — a CA and a
//! certificate per host, each a PEM certificate and key in one directory —
//! so that the demo and the tests run with TLS from a clean clone. For real
//! deployments use certificates from your own CA (docs/tls.md).

use clap::Parser;
use credentials::issue::Authority;
use std::path::PathBuf;
use std::process::ExitCode;

/// Makes test credentials: DIR/ca.pem and DIR/ca.key (a new CA, unless
/// they exist already: then hosts are added to that CA), and for each HOST
/// DIR/NAME.pem and DIR/NAME.key, a certificate with the subject common
/// name NAME, valid as a TLS server and client, with the subject
/// alternative names NAME, the SANs given after `=` (IP addresses or DNS
/// names, comma-separated), 127.0.0.1 and localhost.
///
/// Example: ftcert --dir creds primary=10.0.0.1 backup=10.0.0.2 storage=10.0.0.4
///
/// Exit status 2 on a usage error or a failure (one line on stderr).
#[derive(Parser, Debug)]
#[command(name = "ftcert", version)]
struct Cli {
    /// Where the files go (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The new CA's subject common name.
    #[arg(long, value_name = "NAME", default_value = "ftvmm test CA")]
    ca_name: String,
    /// The hosts to issue certificates for: NAME or NAME=SAN[,SAN...].
    #[arg(value_name = "HOST")]
    hosts: Vec<String>,
}

fn run(cli: &Cli) -> Result<(), String> {
    std::fs::create_dir_all(&cli.dir).map_err(|e| format!("cannot create {}: {e}", cli.dir.display()))?;
    let ca = if cli.dir.join("ca.pem").exists() || cli.dir.join("ca.key").exists() {
        Authority::load(&cli.dir)?
    } else {
        let ca = Authority::new(&cli.ca_name)?;
        let path = ca.save(&cli.dir)?;
        eprintln!("ftcert: a new CA {:?}: {}", cli.ca_name, path.display());
        ca
    };
    for host in &cli.hosts {
        let (name, extra) = match host.split_once('=') {
            Some((name, sans)) => (name, sans.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>()),
            None => (host.as_str(), Vec::new()),
        };
        let mut sans = vec![name.to_string()];
        sans.extend(extra.iter().map(|s| s.to_string()));
        for always in ["127.0.0.1", "localhost"] {
            if !sans.iter().any(|s| s == always) {
                sans.push(always.to_string());
            }
        }
        let issued = ca.issue(&cli.dir, name, &sans)?;
        eprintln!("ftcert: {name}: {} and {} (SANs {})", issued.cert.display(), issued.key.display(), sans.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    credentials::cli::main("ftcert", run)
}
