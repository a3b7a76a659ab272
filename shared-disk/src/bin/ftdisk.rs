//! The `ftdisk` binary: serves a raw disk image, and its go-live
//! arbitration record, to ftvmm primaries and backups over TCP; or, with
//! `--arbiter-only`, the arbitration record alone.

use clap::{ArgGroup, Parser};
use credentials::{Tls, TlsFiles};
use shared_disk::{read_allow_file, Access, DiskCollector};
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use telemetry::prometheus_client::registry::Registry;
use telemetry::MetricsServer;

/// Serves a raw disk image shared by an ftvmm primary and backup, with
/// test-and-set go-live arbitration and write fencing; the arbitration
/// record is kept in IMAGE.owner. With --arbiter-only it serves no image,
/// only an arbitration record kept in the --state file, for a pair that
/// arbitrates its go-live decision here (ftvmm --arbiter ftdisk:ADDR).
///
/// With --tls-cert, --tls-key and --tls-ca every connection is mutual TLS:
/// clients must present a certificate from the CA (--tls-allow narrows who
/// may read, write and claim).
///
/// Exactly one of --image and --arbiter-only is required. Exit status: 2
/// for a usage error or when the server cannot start (one line on stderr:
/// `ftdisk: error: ...`).
#[derive(Parser, Debug)]
#[command(name = "ftdisk", version)]
#[command(group(ArgGroup::new("mode").required(true).args(["image", "arbiter_only"])))]
struct Cli {
    /// The raw image file to serve (e.g. made by `qemu-img create -f raw`);
    /// its size must be a multiple of 512. Its arbitration record is
    /// IMAGE.owner (created if missing).
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Serve no image, only the arbitration record kept in --state:
    /// test-and-set and reading the record; reads, writes and flushes are
    /// refused with an error reply.
    #[arg(long, requires = "state")]
    arbiter_only: bool,
    /// With --arbiter-only: the file holding the arbitration record
    /// (created, at generation 0, if missing; written durably before each
    /// win is acknowledged, so it survives restarts). Its directory must be
    /// writable: the record is replaced by rename, and PATH.lock keeps a
    /// second server off it.
    #[arg(long, value_name = "PATH", requires = "arbiter_only", conflicts_with = "image")]
    state: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7400 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Mutual TLS: this server's certificate (PEM), which must name the
    /// address clients connect to (an IP or DNS subject alternative name).
    /// With --tls-key and --tls-ca; without all three, traffic is plaintext.
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) whose certificates clients must present.
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// With TLS: a client certificate subject name (CN) that may read,
    /// write and claim (test-and-set); repeatable. Clients with other
    /// certificates from the CA get an error and nothing is executed.
    /// Without --tls-allow and --tls-allow-file, every certificate from the
    /// CA may.
    #[arg(long, value_name = "NAME")]
    tls_allow: Vec<String>,
    /// With TLS: a file of allowed certificate names, one a line (`#` starts
    /// a comment line); adds to --tls-allow.
    #[arg(long, value_name = "PATH")]
    tls_allow_file: Option<PathBuf>,
    /// Serve metrics over HTTP on ADDR (e.g. 127.0.0.1:9400; port 0 picks
    /// a free port): Prometheus's text format on /metrics, a JSON status on
    /// /status (what `ftvmm status ADDR` shows). Plain HTTP, no
    /// authentication: listen on a management network or loopback.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTDISK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    credentials::cli::main("ftdisk", run)
}

/// The TLS configuration and allow list the flags ask for (`None`:
/// plaintext, with a warning).
fn access(cli: &Cli) -> Result<Option<Access>, String> {
    let files = TlsFiles::from_flags(cli.tls_cert.clone(), cli.tls_key.clone(), cli.tls_ca.clone())?;
    let allowing = !cli.tls_allow.is_empty() || cli.tls_allow_file.is_some();
    let Some(files) = files else {
        if allowing {
            return Err("--tls-allow and --tls-allow-file need TLS (--tls-cert, --tls-key, --tls-ca)".into());
        }
        eprintln!(
            "ftdisk: warning: no TLS (--tls-cert, --tls-key, --tls-ca): the disk's traffic is plaintext, and anyone \
             who reaches {} can read, write and claim it",
            cli.listen
        );
        return Ok(None);
    };
    let tls = Tls::load(&files).map_err(|e| e.to_string())?;
    let allowed = if allowing {
        let mut names: BTreeSet<String> = cli.tls_allow.iter().cloned().collect();
        if let Some(path) = &cli.tls_allow_file {
            names.extend(read_allow_file(path)?);
        }
        if names.is_empty() {
            return Err("the allow list is empty: no client could read, write or claim".into());
        }
        eprintln!(
            "ftdisk: TLS as {}; allowed to read, write and claim: {}",
            tls.name(),
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        Some(names)
    } else {
        eprintln!("ftdisk: TLS as {}; every certificate from the CA may read, write and claim", tls.name());
        None
    };
    Ok(Some(Access { tls, allowed }))
}

fn run(cli: &Cli) -> Result<(), String> {
    let access = access(cli)?;
    let listener = TcpListener::bind(&cli.listen).map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let (server, serving) = match (&cli.image, &cli.state) {
        (Some(image), None) => {
            let server = shared_disk::Server::start_secured(image, listener, access).map_err(|e| e.to_string())?;
            let serving = format!("{} ({} bytes)", image.display(), server.size());
            (server, serving)
        }
        (None, Some(state)) if cli.arbiter_only => {
            let server =
                shared_disk::Server::start_arbiter_secured(state, listener, access).map_err(|e| e.to_string())?;
            (server, format!("the arbitration record {} (arbiter only)", state.display()))
        }
        // clap enforces one mode and --state only with --arbiter-only.
        _ => return Err("give either --image PATH or --arbiter-only --state PATH".into()),
    };
    // Started before the server says it serves, so that a bad --metrics
    // address is an error at startup, not a server without its metrics.
    let _metrics = match &cli.metrics {
        Some(addr) => {
            let counters = server.metrics();
            let mut registry = Registry::default();
            registry.register_collector(Box::new(DiskCollector(counters.clone())));
            let metrics = MetricsServer::start(addr, Arc::new(registry), Arc::new(move || counters.status_json()))
                .map_err(|e| e.to_string())?;
            eprintln!("ftdisk: metrics on http://{}/metrics", metrics.local_addr());
            Some(metrics)
        }
        None => None,
    };
    eprintln!("ftdisk: serving {serving} on {}", server.local_addr());
    server.wait();
    Err("the accept thread ended".into())
}
