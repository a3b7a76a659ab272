//! The `ftvmm` command line: parses and validates flags into a
//! [`VmConfig`]; assembling the VM is the builder's job.

use crate::config::{DiskSpec, ImageSource, Mode, VmConfig};
use crate::error::{usage, Error};
use crate::host::console::SerialSpec;
use crate::host::tap::NetSpec;
use crate::layout::{CMDLINE_MAX, MAX_MEM_BYTES};
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
/// arbitration (on the shared disk or the arbiter), or a backup halted
/// rather than go live from a diverged state.
///
/// `ftvmm check --help`: does a guest image replay deterministically?
/// `ftvmm status --help`: the state of a running ftvmm or ftdisk.
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

    /// The guest's serial port: `stdio`, or a console server for one client
    /// at a time (the client's bytes are the guest's input): `tcp:ADDR` in
    /// plaintext, `tls:ADDR` over mutual TLS with --tls-cert/--tls-key/--tls-ca
    /// (the client needs a certificate from --tls-ca). A client that connects
    /// while another is connected is refused (see --serial-takeover).
    #[arg(long, value_name = "stdio|tcp:ADDR|tls:ADDR", default_value = "stdio")]
    pub serial: SerialSpec,

    /// With --serial tcp:/tls:, a client that connects while another is
    /// connected takes the console over: the other is disconnected and its
    /// input no longer reaches the guest.
    #[arg(long)]
    pub serial_takeover: bool,

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

    /// Leave out the virtio-console: by default the guest has one beside
    /// COM1 and guest-rt prints through it (a line is one exit, not one per
    /// byte); without it guest-rt prints on COM1. Input is on COM1 either
    /// way. A primary and its backup must agree on it.
    #[arg(long)]
    pub no_virtio_console: bool,

    /// Arbitrate going live on the `ftdisk` at ADDR (`ftdisk --arbiter-only`
    /// serves just that), for a pair without a shared disk on ftdisk: a
    /// partition then never leaves two live copies.
    #[arg(long, value_name = "ftdisk:ADDR")]
    pub arbiter: Option<String>,

    /// At exit, print the output-commit latency (how long outputs were held
    /// for the backup's acknowledgement) on stderr: `ftvmm: stats: ...`.
    #[arg(long)]
    pub stats: bool,

    /// Serve Prometheus metrics (`/metrics`) and the VM's status
    /// (`/status`, what `ftvmm status ADDR` shows) over plain HTTP on ADDR
    /// (host:port; port 0 picks one, said on stderr). Unauthenticated:
    /// listen on loopback or a management network.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

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

    /// Busy-poll the logging channel for up to US microseconds before its
    /// network thread sleeps waiting for the peer (the primary for an ack
    /// while a batch is in flight, the backup for the next batch): shorter
    /// output-commit latency for a core's worth of spinning. 0, the
    /// default, never spins (see docs/benchmarks.md, "Output commit, hop by hop", for the trade).
    #[arg(long, value_name = "US", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub poll_us: u64,

    /// Recording side (a primary, or --record): log a check of the whole
    /// state digest (guest memory, vCPU, devices, clock) every MS of guest
    /// time, which the replaying side (the backup, or --replay) compares
    /// with its own: a divergence no exit shows is caught within one
    /// period. 0 turns the time trigger off.
    #[arg(long, value_name = "MS", default_value_t = crate::config::DEFAULT_CHECK_EVERY_MS)]
    pub check_every_ms: u64,

    /// ... and/or every N guest-caused exits (0: off, the default).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub check_every_exits: u64,

    /// Testing aid for a replaying VM (--backup or --replay): at guest exit
    /// EXIT, flip a byte of guest memory that no exit reveals, so that the
    /// next digest check finds the divergence (and a backup repairs it).
    #[arg(long, value_name = "EXIT", value_parser = clap::value_parser!(u64).range(1..))]
    pub inject_divergence_at: Option<u64>,

    /// Testing aid for a primary: its disk writer applies the guest's disk
    /// ops up to number OP and no more, as if its host died right after
    /// (the ops stay pending: a backup that takes over re-issues them).
    #[arg(long, value_name = "OP", hide_short_help = true)]
    pub testing_disk_stall_after_op: Option<u64>,

    /// Testing aid for a primary: just before it logs the data of its Nth
    /// disk read, it hands its backup the log so far and exits at once
    /// (status 137), as if its host died: the backup's log then ends inside
    /// the exit of that read.
    #[arg(long, value_name = "N", hide_short_help = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub testing_die_before_disk_read: Option<u64>,

    /// Mutual TLS on the logging channel (and the state transfer it carries)
    /// and to ftdisk: this VMM's certificate (PEM). Its peers must present
    /// certificates from --tls-ca; a server's must name the address it is
    /// reached at (an IP or DNS subject alternative name). All three of
    /// --tls-cert, --tls-key and --tls-ca, or none (plaintext, with a
    /// warning).
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// The CA certificate(s) (PEM) that peers' certificates must chain to.
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,

    /// When an interrupt is due and the guest has run this many
    /// microseconds without an exit, kick it and take a state sync there
    /// (a compute-bound guest gets its interrupts this way).
    #[arg(long, value_name = "US", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=10_000_000))]
    pub sync_after_us: u64,

    /// Started as root: once the VM is built (/dev/kvm, the TAP, the disk,
    /// the listeners, the files named here open), give up root for USER
    /// and its group (or GROUP), that group its only one; names or numeric
    /// IDs. The VM then runs, fails over and takes backups unprivileged;
    /// files it opens later (--save-snapshot) must be writable by USER. See
    /// docs/sandbox.md.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub run_as: Option<String>,

    /// Debugging aid: run without the seccomp filters. By default each
    /// thread, once the VM is set up, may make only the system calls its
    /// kind needs, and any other kills the process with a line naming the
    /// call; this gives that confinement up (a compromised VMM thread could
    /// then make any call the process's user may). See docs/sandbox.md.
    #[arg(long)]
    pub no_seccomp: bool,
}

/// `ftvmm check`: does a guest image replay deterministically?
///
/// Records --runs runs of the guest under timing perturbations (delays
/// before interrupt injections, timer jitter, serial input at random
/// moments), replays each twice and compares output, exit status and state
/// digests (the recordings carry digest checks); checks that recordings of a
/// guest that reads the clock really differ. Prints a short report per run.
///
/// Exit status: 0 when every replay matched; 3 on a divergence (the report
/// gives the first differing exit and what differed); 1 when the
/// recordings of a clock-reading guest were all identical; 2 when a run
/// could not be made.
#[derive(Debug, Parser)]
#[command(name = "ftvmm check", version, about, long_about)]
pub struct CheckCli {
    /// Check the embedded guest NAME (see `ftvmm --list-guests`).
    #[arg(long, value_name = "NAME", conflicts_with = "kernel", required_unless_present = "kernel")]
    pub guest: Option<String>,

    /// Check the ELF guest image at PATH.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Command line passed to the guest.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,

    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=(MAX_MEM_BYTES >> 20)))]
    pub mem_mib: u64,

    /// Recordings to make (each is replayed twice).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,

    /// Cut a recording that is still running after S seconds (a guest that
    /// never ends by itself); its replays must then agree up to the cut.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,

    /// Feed the bytes of FILE to the guest's serial port, in random pieces
    /// at random moments (lines are split at random points).
    #[arg(long, value_name = "FILE")]
    pub serial_input: Option<PathBuf>,

    /// Perturbation seed of the first run (the next runs add 1 each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,

    /// The recordings log a state digest check every N guest exits, so that
    /// a divergence is found near where it happens.
    #[arg(long, value_name = "N", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    pub check_every_exits: u64,

    /// Keep the recordings in DIR (else they go to a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,

    /// Give the guest a virtio-blk disk: a copy of the raw image PATH for
    /// each recording, so that every run starts from the same disk.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
}

/// `ftvmm status`: the state of a running ftvmm or ftdisk, from the
/// /status of its --metrics address.
///
/// Shows one screen: role, state and why, since when, peer, lag, log
/// bandwidth, output-commit latency over the last minute, exits per
/// second, the last failover (ftdisk: the disk's owner and generation,
/// sessions, connections) — what the server reports.
///
/// Exit status: 0 when it showed a status; 1 when the server cannot be
/// reached or did not answer with a status (one line on stderr); 2 for a
/// usage error.
#[derive(Debug, Parser)]
#[command(name = "ftvmm status", version, about, long_about)]
pub struct StatusCli {
    /// The --metrics address of an ftvmm or ftdisk (host:port).
    #[arg(value_name = "ADDR")]
    pub addr: String,

    /// Refresh the screen every --interval seconds, like top, until
    /// interrupted (a server that stops answering is retried).
    #[arg(long)]
    pub watch: bool,

    /// Print the status as the server's JSON (with --watch: one line per
    /// refresh), for scripts.
    #[arg(long)]
    pub json: bool,

    /// Seconds between refreshes with --watch (0.1 to 3600).
    #[arg(long, value_name = "SECS", default_value_t = 2.0, value_parser = refresh_interval)]
    pub interval: f64,
}

/// A `--interval`: seconds, 0.1 to 3600.
fn refresh_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 3600")),
    }
}

/// The guest image `--kernel` or `--guest` names (clap requires one), and a
/// check of `--cmdline`'s length: the same for a run and a check.
fn guest_image(kernel: Option<PathBuf>, guest: Option<String>, cmdline: &str) -> Result<ImageSource, Error> {
    if cmdline.len() > CMDLINE_MAX {
        return Err(usage(format!("--cmdline is longer than {CMDLINE_MAX} bytes")));
    }
    match (kernel, guest) {
        (Some(path), _) => Ok(ImageSource::File(path)),
        (None, Some(name)) => Ok(ImageSource::Embedded(name)),
        (None, None) => Err(usage("--guest or --kernel is required")),
    }
}

impl CheckCli {
    /// The validated check, or a usage error (exit status 2).
    pub fn into_config(self) -> Result<crate::check::CheckConfig, Error> {
        let image = guest_image(self.kernel, self.guest, &self.cmdline)?;
        let serial_input = match &self.serial_input {
            Some(path) => Some(
                std::fs::read(path).map_err(|e| usage(format!("cannot read serial input {}: {e}", path.display())))?,
            ),
            None => None,
        };
        Ok(crate::check::CheckConfig {
            image,
            cmdline: self.cmdline,
            mem_mib: self.mem_mib,
            runs: self.runs,
            seconds: self.seconds,
            serial_input,
            seed: self.seed,
            check_every_exits: self.check_every_exits,
            keep: self.keep,
            disk: self.disk,
        })
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    ListGuests,
    Run(Box<VmConfig>),
    /// `ftvmm check ...`.
    Check(Box<crate::check::CheckConfig>),
    /// `ftvmm status ...`.
    Status(crate::status::StatusConfig),
}

/// Parses the whole command line (`ftvmm check ...`, `ftvmm status ...` or
/// a VM run). A parse
/// failure is clap's (it prints itself: usage errors with status 2); a
/// validation failure is a usage error message.
pub fn parse(args: Vec<std::ffi::OsString>) -> Result<Result<Command, Error>, clap::Error> {
    if args.get(1).is_some_and(|a| a == "check") {
        let mut rest = args;
        let program = rest.remove(0);
        rest[0] = format!("{} check", program.to_string_lossy()).into();
        let check = CheckCli::try_parse_from(rest)?;
        return Ok(check.into_config().map(|c| Command::Check(Box::new(c))));
    }
    if args.get(1).is_some_and(|a| a == "status") {
        let mut rest = args;
        let program = rest.remove(0);
        rest[0] = format!("{} status", program.to_string_lossy()).into();
        let s = StatusCli::try_parse_from(rest)?;
        return Ok(Ok(Command::Status(crate::status::StatusConfig {
            addr: s.addr,
            watch: s.watch,
            json: s.json,
            interval: Duration::from_secs_f64(s.interval),
        })));
    }
    Ok(Cli::try_parse_from(args)?.into_command())
}

impl Cli {
    /// The validated request, or a usage error (exit status 2).
    pub fn into_command(self) -> Result<Command, Error> {
        if self.list_guests {
            return Ok(Command::ListGuests);
        }
        let image = guest_image(self.kernel, self.guest, &self.cmdline)?;
        if self.listen.is_some() && !self.primary && !self.backup {
            return Err(usage("--listen is for --primary or --backup"));
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
                _ => return Err(usage(format!("--arbiter {spec:?}: want ftdisk:ADDR"))),
            },
            None => None,
        };
        let tls = credentials::TlsFiles::from_flags(self.tls_cert, self.tls_key, self.tls_ca).map_err(usage)?;
        let serial = match self.serial {
            SerialSpec::Tcp { addr, tls: true, .. } if tls.is_none() => {
                return Err(usage(format!(
                    "--serial tls:{addr} serves the console over mutual TLS: it needs --tls-cert, --tls-key and \
                     --tls-ca (or use tcp:{addr} for plaintext)"
                )));
            }
            SerialSpec::Tcp { addr, tls, .. } => SerialSpec::Tcp { addr, tls, takeover: self.serial_takeover },
            SerialSpec::Stdio if self.serial_takeover => {
                return Err(usage("--serial-takeover is for a console server (--serial tcp:ADDR or tls:ADDR)"));
            }
            SerialSpec::Stdio => SerialSpec::Stdio,
        };
        let arbitrated = arbiter.is_some() || matches!(disk, Some(DiskSpec::Ftdisk(_)));
        if self.net.is_some() && (self.primary || self.backup) && !arbitrated {
            return Err(usage(
                "--net with --primary/--backup needs go-live arbitration (--disk ftdisk:ADDR or --arbiter \
                 ftdisk:ADDR): two live copies of one MAC and IP would be split brain on the wire",
            ));
        }
        if arbiter.is_some() && matches!(disk, Some(DiskSpec::Ftdisk(_))) {
            return Err(usage(
                "--arbiter: the shared disk on ftdisk already arbitrates (and fences); give one or the other",
            ));
        }
        let run_as = match self.run_as {
            Some(spec) => {
                let run_as = crate::privileges::RunAs::resolve(&spec)?;
                run_as.preflight()?;
                Some(run_as)
            }
            None => None,
        };
        Ok(Command::Run(Box::new(VmConfig {
            arbiter,
            run_as,
            seccomp: !self.no_seccomp,
            net: self.net,
            virtio_console: !self.no_virtio_console,
            mem_mib: self.mem_mib,
            cmdline: self.cmdline,
            serial,
            serial_input: self.serial_input,
            disk,
            mode,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            channel_poll: Duration::from_micros(self.poll_us),
            sync_after: Duration::from_micros(self.sync_after_us),
            perturb_seed: self.perturb_seed,
            digest: self.digest,
            stats: self.stats,
            metrics: self.metrics,
            save_snapshot: self.save_at_exit.zip(self.save_snapshot),
            restore: self.restore,
            check_every_ms: self.check_every_ms,
            check_every_exits: self.check_every_exits,
            inject_divergence_at: self.inject_divergence_at,
            disk_stall_after_op: self.testing_disk_stall_after_op,
            die_before_disk_read: self.testing_die_before_disk_read,
            tls,
            ..VmConfig::new(image)
        })))
    }
}
