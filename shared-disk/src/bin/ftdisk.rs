//! The `ftdisk` binary: serves a raw disk image, and its go-live
//! arbitration record, to ftvmm primaries and backups over TCP.

use clap::Parser;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

/// Serves a raw disk image shared by an ftvmm primary and backup, with
/// test-and-set go-live arbitration and write fencing. The arbitration record
/// is kept in IMAGE.owner.
#[derive(Parser, Debug)]
#[command(name = "ftdisk", version)]
struct Cli {
    /// The raw image file to serve (e.g. made by `qemu-img create -f raw`);
    /// its size must be a multiple of 512.
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
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
    let server = shared_disk::Server::start(&cli.image, listener).map_err(|e| e.to_string())?;
    eprintln!("ftdisk: serving {} ({} bytes) on {}", cli.image.display(), server.size(), server.local_addr());
    server.wait();
    Err("the accept thread ended".into())
}
