//! The `ftdisk` binary: serves a raw disk image, and its go-live
//! arbitration record, to ftvmm primaries and backups over TCP; or, with
//! `--arbiter-only`, the arbitration record alone.

use clap::{ArgGroup, Parser};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

/// Serves a raw disk image shared by an ftvmm primary and backup, with
/// test-and-set go-live arbitration and write fencing; the arbitration
/// record is kept in IMAGE.owner. With --arbiter-only it serves no image,
/// only an arbitration record kept in the --state file, for a pair that
/// arbitrates its go-live decision here (ftvmm --arbiter ftdisk:ADDR).
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftdisk: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let listener = TcpListener::bind(&cli.listen).map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let server = match (&cli.image, &cli.state) {
        (Some(image), None) => {
            let server = shared_disk::Server::start(image, listener).map_err(|e| e.to_string())?;
            eprintln!("ftdisk: serving {} ({} bytes) on {}", image.display(), server.size(), server.local_addr());
            server
        }
        (None, Some(state)) if cli.arbiter_only => {
            let server = shared_disk::Server::start_arbiter(state, listener).map_err(|e| e.to_string())?;
            eprintln!(
                "ftdisk: serving the arbitration record {} (arbiter only) on {}",
                state.display(),
                server.local_addr()
            );
            server
        }
        // clap enforces one mode and --state only with --arbiter-only.
        _ => return Err("give either --image PATH or --arbiter-only --state PATH".into()),
    };
    server.wait();
    Err("the accept thread ended".into())
}
