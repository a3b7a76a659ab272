//! A VM's configuration: everything the builder needs to assemble a
//! [`crate::run::Vmm`], as plain data. The command line ([`crate::cli`])
//! parses and validates into it; nothing here knows about flags.

use crate::host::console::SerialSpec;
use crate::host::tap::NetSpec;
use std::path::PathBuf;
use std::time::Duration;

/// Where the guest image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An embedded guest, by name (`--guest`).
    Embedded(String),
    /// An ELF file (`--kernel`).
    File(PathBuf),
}

/// The virtio disk's storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// A raw image file.
    File(PathBuf),
    /// The image an `ftdisk` server at this address serves: shared storage
    /// with go-live arbitration and fencing.
    Ftdisk(String),
}

impl std::fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskSpec::File(path) => write!(f, "{}", path.display()),
            DiskSpec::Ftdisk(addr) => write!(f, "ftdisk:{addr}"),
        }
    }
}

/// What the VMM does with the guest's inputs, and its part in fault
/// tolerance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A run alone, recording every input to `record` if given.
    Solo { record: Option<PathBuf> },
    /// Replay the log file: every input comes from it.
    Replay { log: PathBuf },
    /// The primary of a pair: wait for a backup on `listen`, then boot (or,
    /// without `wait`, boot at once); later backups may join on `listen`
    /// whenever it has none.
    Primary { listen: String, wait: bool },
    /// The backup of a pair: replay the primary at `connect` in lockstep;
    /// once live, accept backups of its own on `listen`.
    Backup { connect: String, listen: Option<String> },
}

/// Everything a VM is built from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub image: ImageSource,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The command line handed to the guest.
    pub cmdline: String,
    /// The serial port's outside world.
    pub serial: SerialSpec,
    /// Serial input from this file instead of the endpoint.
    pub serial_input: Option<PathBuf>,
    pub disk: Option<DiskSpec>,
    /// The NIC: an existing TAP device and the VM's MAC.
    pub net: Option<NetSpec>,
    /// Give the VM the virtio-console beside COM1 (`--no-virtio-console`:
    /// not).
    pub virtio_console: bool,
    /// An arbiter-only `ftdisk` for go-live arbitration (a pair without a
    /// shared disk on ftdisk).
    pub arbiter: Option<String>,
    pub mode: Mode,
    /// The peer on the logging channel is lost after this long without
    /// traffic from it.
    pub heartbeat: Duration,
    /// The logging channel's busy-poll budget (`--poll-us`; zero: none).
    pub channel_poll: Duration,
    /// A backup gives up reaching its primary after this long.
    pub connect_timeout: Duration,
    /// Kick a guest that has run this long without an exit when an
    /// interrupt is due, and sync there (`--sync-after-us`).
    pub sync_after: Duration,
    /// Testing aid: perturb host timing from this seed.
    pub perturb_seed: Option<u64>,
    /// Print the final state digest.
    pub digest: bool,
    /// Print exit and output-commit statistics.
    pub stats: bool,
    /// Serve metrics and status here (`--metrics`).
    pub metrics: Option<String>,
    /// Save a snapshot when the guest reaches this exit, to this file.
    pub save_snapshot: Option<(u64, PathBuf)>,
    /// Start from this snapshot file instead of booting the image.
    pub restore: Option<PathBuf>,
    /// Log a state digest check every this many ms of guest time (0: never).
    pub check_every_ms: u64,
    /// ... and/or every this many guest-caused exits (0: never).
    pub check_every_exits: u64,
    /// Testing aid: a replaying VM flips a byte of its guest memory here.
    pub inject_divergence_at: Option<u64>,
    /// Testing aid: a primary's disk writer applies ops up to this one only.
    pub disk_stall_after_op: Option<u64>,
    /// Testing aid: a primary dies just before logging its Nth disk read.
    pub die_before_disk_read: Option<u64>,
    /// Mutual TLS on the logging channel and to ftdisk (`None`: plaintext).
    pub tls: Option<credentials::TlsFiles>,
    /// Give up root for this user and group once the VM is built (`--run-as`).
    pub run_as: Option<crate::privileges::RunAs>,
    /// Confine each thread to its system calls once set up (`--no-seccomp`:
    /// not, for debugging).
    pub seccomp: bool,
}

/// Default period of the digest checks, in ms of guest time. A check costs
/// one BLAKE3 pass over guest memory on each side, measured at 35-44 ms for
/// 64 MiB on the project's machines (the vCPU waits meanwhile), so 4 s keeps
/// it near 1% of the run. A guest that reads no time never advances the
/// virtual clock: `--check-every-exits` covers it.
pub const DEFAULT_CHECK_EVERY_MS: u64 = 4000;

impl VmConfig {
    /// A plain run of `image` with the defaults of the command line.
    pub fn new(image: ImageSource) -> Self {
        VmConfig {
            image,
            mem_mib: 64,
            cmdline: String::new(),
            serial: SerialSpec::Stdio,
            serial_input: None,
            disk: None,
            net: None,
            virtio_console: true,
            arbiter: None,
            mode: Mode::Solo { record: None },
            heartbeat: Duration::from_millis(200),
            channel_poll: Duration::ZERO,
            connect_timeout: Duration::from_secs(30),
            sync_after: Duration::from_millis(1),
            perturb_seed: None,
            digest: false,
            stats: false,
            metrics: None,
            save_snapshot: None,
            restore: None,
            check_every_ms: DEFAULT_CHECK_EVERY_MS,
            check_every_exits: 0,
            inject_divergence_at: None,
            disk_stall_after_op: None,
            die_before_disk_read: None,
            tls: None,
            run_as: None,
            seccomp: true,
        }
    }

    /// The VM starts live: it owns the outside world (and the shared disk)
    /// from its first instruction.
    pub fn starts_live(&self) -> bool {
        matches!(self.mode, Mode::Solo { .. } | Mode::Primary { .. })
    }

    /// The run computes the final state digest: asked for, or needed to
    /// check a recording, a replay or a pair against each other.
    pub fn wants_digest(&self) -> bool {
        self.digest || !matches!(self.mode, Mode::Solo { record: None })
    }
}
