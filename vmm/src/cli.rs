//! The `ftvmm` command line.

use crate::boot::{CMDLINE_MAX, MAX_MEM_BYTES};
use crate::clock::{wall_clock_ns, HostClock};
use crate::console::{Endpoint, SerialSpec};
use crate::disk::{BlockBackend, Claim, DiskPort, FileBackend, FtdiskBackend};
use crate::ft::{Direct, Held, LogSink, LogSource, OutputGate, SerialOutput, Suppressed};
use crate::inputs::{Inputs, LiveInputs};
use crate::run::{Role, RunError, Vmm};
use crate::{boot, loader, rdtsc, vm};
use clap::Parser;
use logging_channel::{BackupLink, ChannelConfig, PrimaryListener};
use replay::{Header, LogReader, LogWriter, Recorder, Replayer};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::time::Duration;

/// How long a backup keeps trying to reach its primary.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// ftvmm: a fault-tolerant KVM virtual machine monitor.
///
/// Boots a uniprocessor guest whose every nondeterministic input passes
/// through the VMM, so a run can be recorded and replayed exactly.
/// Serial (COM1) output goes to stdout; serial input comes from stdin.
///
/// Exit status: the guest's own status (what it wrote to port 0xf4); 2 for a
/// VMM, guest or input error; 3 for a replay divergence; 4 when a replayed
/// log ends before the guest does; 5 when this side lost the go-live
/// arbitration on the shared disk and halted.
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

    /// The guest's serial port: `stdio`, or `tcp:ADDR` to serve it to one TCP
    /// client at a time (the client's bytes are the guest's input).
    #[arg(long, value_name = "stdio|tcp:ADDR", default_value = "stdio")]
    pub serial: SerialSpec,

    /// Run as the primary of a fault-tolerant pair: wait for a backup on
    /// --listen, then boot, stream the log to it and release each output only
    /// once the backup has acknowledged the log up to it.
    #[arg(long, requires = "listen", conflicts_with_all = ["backup", "record", "replay"])]
    pub primary: bool,

    /// Run as the backup: connect to the primary at --connect, replay its log
    /// in lockstep with outputs suppressed, and go live when it is gone.
    #[arg(long, requires = "connect", conflicts_with_all = ["record", "replay"])]
    pub backup: bool,

    /// The primary's logging-channel address (host:port) to listen on.
    #[arg(long, value_name = "ADDR", requires = "primary")]
    pub listen: Option<String>,

    /// The primary's logging-channel address (host:port) to connect to.
    #[arg(long, value_name = "ADDR", requires = "backup")]
    pub connect: Option<String>,

    /// Give the guest a virtio-blk disk backed by the raw image file PATH
    /// (e.g. made by `qemu-img create -f raw PATH 64M`), or by the image an
    /// `ftdisk` server at ADDR serves (`ftdisk:ADDR`: shared storage with
    /// go-live arbitration and fencing). A primary and its backup name the
    /// same disk: only the live side writes it, and the backup never reads it
    /// while it replays.
    #[arg(long, value_name = "PATH|ftdisk:ADDR")]
    pub disk: Option<PathBuf>,

    /// At exit, print the output-commit latency (how long outputs were held
    /// for the backup's acknowledgement) on stderr: `ftvmm: stats: ...`.
    #[arg(long)]
    pub stats: bool,

    /// Declare the peer on the logging channel lost after this many
    /// milliseconds without traffic from it.
    #[arg(long, value_name = "MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub heartbeat_ms: u64,
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

/// How this VMM calls itself in the arbitration record.
pub fn owner_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role} pid {} on {}", std::process::id(), host.trim())
}

/// Takes ownership of a shared disk at boot; returns the generation (0 when
/// the disk cannot arbitrate).
fn claim_at_boot(disk: &DiskPort, role: &str) -> Result<u64, CliError> {
    let fail = |e: std::io::Error| usage(format!("--disk: claiming the shared disk: {e}"));
    let Some(current) = disk.generation().map_err(fail)? else { return Ok(0) };
    match disk.claim(current, &owner_name(role)).map_err(fail)? {
        Some(Claim::Won { generation }) => Ok(generation),
        Some(Claim::Lost { owner, .. }) => Err(usage(format!("--disk: {owner} took the shared disk while we started"))),
        None => Ok(0),
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
    let mut disk = match &cli.disk {
        Some(path) => {
            let spec = path.display().to_string();
            let backend: Box<dyn BlockBackend> = match spec.strip_prefix("ftdisk:") {
                Some(addr) => Box::new(FtdiskBackend::connect(addr).map_err(|e| usage(format!("--disk {spec}: {e}")))?),
                None => Box::new(FileBackend::open(path).map_err(|e| usage(format!("--disk {spec}: {e}")))?),
            };
            Some(DiskPort::new(backend))
        }
        None => None,
    };
    let mut config = format!("mem_mib={} cmdline={:?}", cli.mem_mib, cli.cmdline);
    if let Some(d) = &disk {
        config.push_str(&format!(" disk_bytes={}", d.size()));
    }
    let mut header = Header {
        image_hash: replay::Digest(*blake3::hash(&image).as_bytes()),
        config,
        wall_clock_base_ns: 0,
        disk_generation: 0,
    };

    let channel = ChannelConfig { heartbeat_timeout: Duration::from_millis(cli.heartbeat_ms), ..Default::default() };
    let endpoint = Endpoint::bind(&cli.serial).map_err(|e| usage(format!("--serial {:?}: {e}", cli.serial)))?;
    if let Some(addr) = endpoint.local_addr() {
        eprintln!("ftvmm: serial console on {addr}");
    }
    // A VM that starts live owns the shared disk: claim it (fencing off any
    // earlier owner). A replay never writes; a backup claims it when it goes live.
    if cli.replay.is_none() && !cli.backup {
        if let Some(d) = &disk {
            header.disk_generation = claim_at_boot(d, if cli.primary { "primary" } else { "vmm" })?;
        }
    }

    // Live serial input: the endpoint's, or --serial-input's file.
    let serial_input = |endpoint: Endpoint| -> Result<_, CliError> {
        endpoint.start_with_input(cli.serial_input.as_deref()).map_err(|e| {
            let path = cli.serial_input.as_deref().unwrap_or(std::path::Path::new("")).display();
            usage(format!("cannot open serial input {path}: {e}"))
        })
    };

    // Open the log (or reach the peer) before touching KVM, so that a bad log
    // or peer is reported as such.
    let (inputs, output, role): (Inputs, Box<dyn SerialOutput>, Role) = if let Some(path) = &cli.replay {
        let file = File::open(path).map_err(|e| usage(format!("cannot open log {}: {e}", path.display())))?;
        let (logged, reader) =
            LogReader::new(BufReader::new(file)).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        logged.check_matches(&header).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        header.wall_clock_base_ns = logged.wall_clock_base_ns;
        let port = endpoint.start_output_only();
        (Inputs::Replay(Replayer::new(LogSource::File(reader))), Box::new(Direct(port)), Role::Solo)
    } else if cli.backup {
        let addr = cli.connect.as_deref().unwrap_or_default();
        let (link, primary) = BackupLink::connect(addr, &header, &channel, CONNECT_TIMEOUT)
            .map_err(|e| usage(format!("backup: logging channel to {addr}: {e}")))?;
        header.wall_clock_base_ns = primary.wall_clock_base_ns;
        eprintln!("ftvmm: backup: attached to the primary at {addr}; replaying in lockstep");
        if let Some(path) = &cli.serial_input {
            // Checked now, used when the backup goes live.
            File::open(path).map_err(|e| usage(format!("cannot open serial input {}: {e}", path.display())))?;
        }
        let role = Role::Backup {
            endpoint: Some(endpoint),
            serial_input: cli.serial_input.clone(),
            expected_generation: primary.disk_generation,
        };
        (Inputs::Replay(Replayer::new(LogSource::Backup(link))), Box::new(Suppressed::default()), role)
    } else if cli.primary {
        header.wall_clock_base_ns = wall_clock_ns();
        let addr = cli.listen.as_deref().unwrap_or_default();
        let listener =
            PrimaryListener::bind(addr).map_err(|e| usage(format!("primary: logging channel on {addr}: {e}")))?;
        eprintln!("ftvmm: primary: waiting for a backup on {}", listener.local_addr());
        let link = listener
            .accept(&header, &channel)
            .map_err(|e| usage(format!("primary: logging channel on {addr}: {e}")))?;
        eprintln!("ftvmm: primary: backup attached; booting");
        let (input, port) = serial_input(endpoint)?;
        let gate = OutputGate::new(port.sender(), disk.as_mut().map(|d| d.releaser()));
        let acks = gate.clone();
        // Losing the backup is not an ack: the run loop releases held output
        // once it has won the disk (or has no disk to arbitrate on).
        link.on_ack(Box::new(move |watermark| {
            if watermark != u64::MAX {
                acks.acked(watermark)
            }
        }));
        let live = LiveInputs::new(HostClock::start(), Some(input), Some(Recorder::new(LogSink::Primary(link))), None);
        let delivered = port.delivered();
        let disk_delivered = disk.as_ref().map_or_else(Default::default, |d| d.delivered());
        let role = Role::Primary {
            gate: gate.clone(),
            delivered,
            disk_delivered,
            finish_timeout: channel.heartbeat_timeout * 5,
            generation: header.disk_generation,
            shipped: (0, std::time::Instant::now()),
        };
        (Inputs::Live(Box::new(live)), Box::new(Held { gate, port }), role)
    } else {
        header.wall_clock_base_ns = wall_clock_ns();
        let recorder = match &cli.record {
            Some(path) => {
                let file =
                    File::create(path).map_err(|e| usage(format!("cannot create log {}: {e}", path.display())))?;
                let writer = LogWriter::new(BufWriter::with_capacity(1 << 16, file), &header)
                    .map_err(|e| usage(format!("cannot write log {}: {e}", path.display())))?;
                Some(Recorder::new(LogSink::File(writer)))
            }
            None => None,
        };
        let (input, port) = serial_input(endpoint)?;
        let live = LiveInputs::new(HostClock::start(), Some(input), recorder, cli.perturb_seed);
        (Inputs::Live(Box::new(live)), Box::new(Direct(port)), Role::Solo)
    };

    let machine = vm::Machine::new(mem_size).map_err(RunError::from)?;
    let loaded = loader::load(&machine.mem, mem_size, &image).map_err(|e| usage(format!("guest image {name}: {e}")))?;
    let rdtsc_sites = rdtsc::rewrite(&machine.mem, &loaded.code_segments)
        .map_err(|e| usage(format!("guest image {name}: rewriting RDTSC: {e}")))?;
    boot::write_boot_structures(&machine.mem, mem_size, cli.cmdline.as_bytes())
        .map_err(|e| usage(format!("writing boot structures: {e}")))?;
    machine.set_boot_state(loaded.entry).map_err(RunError::from)?;

    let want_digest = cli.digest || cli.record.is_some() || cli.replay.is_some() || cli.primary || cli.backup;
    let gate = match &role {
        Role::Primary { gate, .. } => Some(gate.clone()),
        _ => None,
    };
    let vmm = Vmm::new(machine, inputs, output, role, disk, rdtsc_sites, header.wall_clock_base_ns, want_digest);
    let outcome = vmm.run()?;
    if cli.stats {
        eprintln!("ftvmm: stats: {} guest exits", outcome.exits);
        if let Some((n, p50, p99, max)) = gate.and_then(|g| g.latency_stats()) {
            eprintln!("ftvmm: stats: output-commit latency over {n} outputs: p50 {p50} us, p99 {p99} us, max {max} us");
        }
    }
    if cli.digest {
        if let Some(d) = outcome.digest {
            eprintln!("state-digest: {d}");
        }
    }
    Ok(outcome.status)
}
