//! The `ftvmm` command line.

use crate::boot::{CMDLINE_MAX, MAX_MEM_BYTES};
use crate::clock::wall_clock_ns;
use crate::inputs::{Inputs, LiveInputs, SerialInput};
use crate::run::{RunError, Stdout, Vmm};
use crate::{boot, loader, rdtsc, vm};
use clap::Parser;
use replay::{Header, LogReader, LogWriter, RecordSink, RecordSource, Recorder, Replayer};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;

/// ftvmm: a fault-tolerant KVM virtual machine monitor.
///
/// Boots a uniprocessor guest whose every nondeterministic input passes
/// through the VMM, so a run can be recorded and replayed exactly.
/// Serial (COM1) output goes to stdout; serial input comes from stdin.
///
/// Exit status: the guest's own status (what it wrote to port 0xf4); 2 for a
/// VMM, guest or input error; 3 for a replay divergence; 4 when a replayed
/// log ends before the guest does.
#[derive(Debug, Parser)]
#[command(name = "ftvmm", version, about, long_about)]
pub struct Cli {
    /// Boot the embedded guest NAME (see --list-guests).
    #[arg(long, value_name = "NAME", conflicts_with = "kernel", required_unless_present_any = ["kernel", "list_guests"])]
    pub guest: Option<String>,

    /// Boot the ELF guest image at PATH.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// List the embedded guests and exit.
    #[arg(long)]
    pub list_guests: bool,

    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=(MAX_MEM_BYTES >> 20)))]
    pub mem_mib: u64,

    /// Command line passed to the guest (e.g. "rounds=100" for compute).
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,

    /// Read serial input from FILE instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub serial_input: Option<PathBuf>,

    /// At exit, print `state-digest: <64 hex digits>` as the last line on stderr.
    #[arg(long)]
    pub digest: bool,

    /// Record every nondeterministic input to the log file LOG.
    #[arg(long, value_name = "LOG", conflicts_with = "replay")]
    pub record: Option<PathBuf>,

    /// Replay the log LOG: every input comes from it, none from the host.
    #[arg(long, value_name = "LOG")]
    pub replay: Option<PathBuf>,

    /// Testing aid: perturb host timing (random delays before interrupt
    /// injections, timer jitter) from this random seed.
    #[arg(long, value_name = "SEED")]
    pub perturb_seed: Option<u64>,
}

/// An error before or during the run, with the exit status reporting it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Run(#[from] RunError),
}

impl CliError {
    pub fn exit_status(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Run(e) => e.exit_status(),
        }
    }
}

fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// The guest image named on the command line, and a name for messages.
fn image(cli: &Cli) -> Result<(String, Vec<u8>), CliError> {
    if let Some(path) = &cli.kernel {
        let bytes =
            std::fs::read(path).map_err(|e| usage(format!("cannot read guest image {}: {e}", path.display())))?;
        return Ok((path.display().to_string(), bytes));
    }
    let name = cli.guest.as_deref().unwrap_or_default();
    match guest_images::find(name) {
        Some(g) => Ok((g.name.to_string(), g.image.to_vec())),
        None => {
            let known: Vec<&str> = guest_images::GUESTS.iter().map(|g| g.name).collect();
            Err(usage(format!("no embedded guest named {name:?} (available: {})", known.join(", "))))
        }
    }
}

/// Runs `ftvmm` as the command line says; returns the process exit status.
pub fn run(cli: Cli) -> Result<u8, CliError> {
    if cli.list_guests {
        for g in guest_images::GUESTS {
            println!("{:<10} {}", g.name, g.description);
        }
        return Ok(0);
    }
    if cli.cmdline.len() > CMDLINE_MAX {
        return Err(usage(format!("--cmdline is longer than {CMDLINE_MAX} bytes")));
    }
    let (name, image) = image(&cli)?;
    let mem_size = cli.mem_mib << 20;
    let config = format!("mem_mib={} cmdline={:?}", cli.mem_mib, cli.cmdline);
    let mut header =
        Header { image_hash: replay::Digest(*blake3::hash(&image).as_bytes()), config, wall_clock_base_ns: 0 };

    // Open the log before touching KVM so a bad log is reported as such.
    let inputs = if let Some(path) = &cli.replay {
        let file = File::open(path).map_err(|e| usage(format!("cannot open log {}: {e}", path.display())))?;
        let (logged, reader) =
            LogReader::new(BufReader::new(file)).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        logged.check_matches(&header).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        header.wall_clock_base_ns = logged.wall_clock_base_ns;
        let source: Box<dyn RecordSource> = Box::new(reader);
        Inputs::Replay(Replayer::new(source))
    } else {
        header.wall_clock_base_ns = wall_clock_ns();
        let recorder = match &cli.record {
            Some(path) => {
                let file =
                    File::create(path).map_err(|e| usage(format!("cannot create log {}: {e}", path.display())))?;
                let writer = LogWriter::new(BufWriter::with_capacity(1 << 16, file), &header)
                    .map_err(|e| usage(format!("cannot write log {}: {e}", path.display())))?;
                let sink: Box<dyn RecordSink> = Box::new(writer);
                Some(Recorder::new(sink))
            }
            None => None,
        };
        let serial = match &cli.serial_input {
            Some(path) => SerialInput::File(
                File::open(path).map_err(|e| usage(format!("cannot open serial input {}: {e}", path.display())))?,
            ),
            None => SerialInput::Stdin,
        };
        Inputs::Live(Box::new(LiveInputs::new(serial, recorder, cli.perturb_seed)))
    };

    let machine = vm::Machine::new(mem_size).map_err(RunError::from)?;
    let loaded = loader::load(&machine.mem, mem_size, &image).map_err(|e| usage(format!("guest image {name}: {e}")))?;
    let rdtsc_sites = rdtsc::rewrite(&machine.mem, &loaded.code_segments)
        .map_err(|e| usage(format!("guest image {name}: rewriting RDTSC: {e}")))?;
    boot::write_boot_structures(&machine.mem, mem_size, cli.cmdline.as_bytes())
        .map_err(|e| usage(format!("writing boot structures: {e}")))?;
    machine.set_boot_state(loaded.entry).map_err(RunError::from)?;

    let want_digest = cli.digest || cli.record.is_some() || cli.replay.is_some();
    let mut vmm =
        Vmm::new(machine, inputs, Box::new(Stdout::default()), rdtsc_sites, header.wall_clock_base_ns, want_digest);
    let outcome = vmm.run()?;
    if cli.digest {
        if let Some(d) = outcome.digest {
            eprintln!("state-digest: {d}");
        }
    }
    Ok(outcome.status)
}
