//! The `ftvmm` command line: parses and validates flags into a
//! [`VmConfig`]; assembling the VM is the builder's job.

use crate::config::{DiskSpec, ImageSource, Mode, VmConfig};
use crate::console::SerialSpec;
use crate::layout::{CMDLINE_MAX, MAX_MEM_BYTES};
use crate::tap::NetSpec;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// ftvmm: a fault-tolerant KVM virtual machine monitor.
///
/// Boots a uniprocessor guest whose every nondeterministic input passes
/// through the VMM, so a run can be recorded and replayed exactly.
/// Serial (COM1) output goes to stdout; serial input comes from stdin.
///
/// Exit status: the guest's own status (what it wrote to port 0xf4); 2 for a
/// VMM, guest or input error; 3 for a replay divergence; 4 when a replayed
/// log ends before the guest does; 5 when this side lost the go-live
/// arbitration (on the shared disk or the arbiter) and halted.
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
    /// --listen (unless --no-wait), then boot, stream the log to it and
    /// release each output only once the backup has acknowledged the log up
    /// to it. Whenever it has no backup, a new one may join on --listen.
    #[arg(long, requires = "listen", conflicts_with_all = ["backup", "record", "replay"])]
    pub primary: bool,

    /// Run as the backup: connect to the primary at --connect, replay its log
    /// in lockstep with outputs suppressed, and go live when it is gone.
    #[arg(long, requires = "connect", conflicts_with_all = ["record", "replay"])]
    pub backup: bool,

    /// The logging-channel address (host:port) to listen on: a primary's,
    /// for its backup and for the backups that join it later (whenever it
    /// has none); a backup's, for backups of its own once it has gone live.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// With --primary: boot at once without waiting for a backup; the VM
    /// runs unprotected until one joins (by live state transfer).
    #[arg(long, requires = "primary")]
    pub no_wait: bool,

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

    /// Give the guest a virtio-net NIC on the EXISTING TAP device IFNAME
    /// (made with `ip tuntap add dev IFNAME mode tap` and bridged onto the
    /// LAN), with MAC address MAC (default 52:54:00:12:34:56). A primary and
    /// its backup give the VM the same MAC, each on a TAP of its own host;
    /// a pair with a NIC needs go-live arbitration (--disk ftdisk: or
    /// --arbiter).
    #[arg(long, value_name = "tap:IFNAME[,mac=MAC]")]
    pub net: Option<NetSpec>,

    /// Arbitrate going live on the `ftdisk` at ADDR (`ftdisk --arbiter-only`
    /// serves just that), for a pair without a shared disk on ftdisk: a
    /// partition then never leaves two live copies.
    #[arg(long, value_name = "ftdisk:ADDR")]
    pub arbiter: Option<String>,

    /// At exit, print the output-commit latency (how long outputs were held
    /// for the backup's acknowledgement) on stderr: `ftvmm: stats: ...`.
    #[arg(long)]
    pub stats: bool,

    /// Save a snapshot of the whole VM (memory, vCPU, devices, clock) to
    /// PATH when the guest reaches exit --save-at-exit, and run on.
    #[arg(long, value_name = "PATH", requires = "save_at_exit")]
    pub save_snapshot: Option<PathBuf>,

    /// The guest-caused exit at which --save-snapshot saves (see --stats
    /// for a run's exit count).
    #[arg(long, value_name = "N", requires = "save_snapshot", value_parser = clap::value_parser!(u64).range(1..))]
    pub save_at_exit: Option<u64>,

    /// Start from the snapshot at PATH (taken of the same image and
    /// configuration) instead of booting. With --replay, replays the rest of
    /// a log recorded from boot, or a log recorded from this snapshot; with
    /// --record, the log records from the snapshot on.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["primary", "backup"])]
    pub restore: Option<PathBuf>,

    /// Declare the peer on the logging channel lost after this many
    /// milliseconds without traffic from it.
    #[arg(long, value_name = "MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub heartbeat_ms: u64,

    /// When an interrupt is due and the guest has run this many
    /// microseconds without an exit, kick it and take a state sync there
    /// (a compute-bound guest gets its interrupts this way).
    #[arg(long, value_name = "US", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=10_000_000))]
    pub sync_after_us: u64,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    ListGuests,
    Run(Box<VmConfig>),
}

impl Cli {
    /// The validated request, or a usage error (exit status 2).
    pub fn into_command(self) -> Result<Command, String> {
        if self.list_guests {
            return Ok(Command::ListGuests);
        }
        if self.cmdline.len() > CMDLINE_MAX {
            return Err(format!("--cmdline is longer than {CMDLINE_MAX} bytes"));
        }
        let image = match (self.kernel, self.guest) {
            (Some(path), _) => ImageSource::File(path),
            (None, Some(name)) => ImageSource::Embedded(name),
            // clap requires one of --guest, --kernel, --list-guests.
            (None, None) => return Err("--guest or --kernel is required".into()),
        };
        if self.listen.is_some() && !self.primary && !self.backup {
            return Err("--listen is for --primary or --backup".into());
        }
        let mode = if self.primary {
            Mode::Primary { listen: self.listen.unwrap_or_default(), wait: !self.no_wait }
        } else if self.backup {
            Mode::Backup { connect: self.connect.unwrap_or_default(), listen: self.listen }
        } else if let Some(log) = self.replay {
            Mode::Replay { log }
        } else {
            Mode::Solo { record: self.record }
        };
        let disk = self.disk.map(|path| {
            let spec = path.display().to_string();
            match spec.strip_prefix("ftdisk:") {
                Some(addr) => DiskSpec::Ftdisk(addr.to_string()),
                None => DiskSpec::File(path),
            }
        });
        let arbiter = match self.arbiter {
            Some(spec) => match spec.strip_prefix("ftdisk:") {
                Some(addr) if !addr.is_empty() => Some(addr.to_string()),
                _ => return Err(format!("--arbiter {spec:?}: want ftdisk:ADDR")),
            },
            None => None,
        };
        let arbitrated = arbiter.is_some() || matches!(disk, Some(DiskSpec::Ftdisk(_)));
        if self.net.is_some() && (self.primary || self.backup) && !arbitrated {
            return Err("--net with --primary/--backup needs go-live arbitration (--disk ftdisk:ADDR or --arbiter \
                        ftdisk:ADDR): two live copies of one MAC and IP would be split brain on the wire"
                .into());
        }
        if arbiter.is_some() && matches!(disk, Some(DiskSpec::Ftdisk(_))) {
            return Err(
                "--arbiter: the shared disk on ftdisk already arbitrates (and fences); give one or the other".into()
            );
        }
        Ok(Command::Run(Box::new(VmConfig {
            arbiter,
            net: self.net,
            mem_mib: self.mem_mib,
            cmdline: self.cmdline,
            serial: self.serial,
            serial_input: self.serial_input,
            disk,
            mode,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            sync_after: Duration::from_micros(self.sync_after_us),
            perturb_seed: self.perturb_seed,
            digest: self.digest,
            stats: self.stats,
            save_snapshot: self.save_at_exit.zip(self.save_snapshot),
            restore: self.restore,
            ..VmConfig::new(image)
        })))
    }
}
