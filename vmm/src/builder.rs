//! Turns a [`VmConfig`] into a ready [`Vmm`]: the disk, the serial
//! endpoint, the log or the peer (and with them the inputs and the output
//! regime), the machine, the image with its RDTSCs rewritten, and the boot
//! state.
//!
//! The log or the peer is opened before KVM is touched, so that a bad log or
//! an unreachable peer is reported as such.

use crate::arbiter::{Arbitration, RemoteArbiter};
use crate::boot::{self, VirtioEntry};
use crate::clock::{wall_clock_ns, HostClock};
use crate::config::{DiskSpec, ImageSource, Mode, VmConfig};
use crate::devices::Devices;
use crate::error::{usage, Error, RunError};
use crate::ft::status::{REASON_NAMES, STATE_NAMES};
use crate::ft::{
    owner_name, receive_state, FtRole, FtState, FtStatus, Held, HostNic, Joiner, OutputGate, Reason, Role, Suppressed,
};
use crate::host::console::Endpoint;
use crate::host::disk::{BlockBackend, Claim, DiskPort, FileBackend, FtdiskBackend};
use crate::inputs::{Inputs, LiveInputs};
use crate::log_io::{LogSink, LogSource};
use crate::mac::format_mac;
use crate::metrics::VmMetrics;
use crate::output::{Direct, Outputs};
use crate::run::{check_begin, restore_state, Alone, RoleHooks, Vmm};
use crate::snapshot::{SnapshotError, StateReader};
use crate::watch::{self, Watched};

use crate::{loader, rdtsc, vm};
use credentials::Tls;
use logging_channel::{BackupLink, ChannelConfig, LogStart, PrimaryListener};
use replay::{Header, LogReader, LogWriter, Recorder, Replayer};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

/// The guest image, and a name for messages.
fn image(source: &ImageSource) -> Result<(String, Vec<u8>), Error> {
    match source {
        ImageSource::File(path) => {
            let bytes =
                std::fs::read(path).map_err(|e| usage(format!("cannot read guest image {}: {e}", path.display())))?;
            Ok((path.display().to_string(), bytes))
        }
        ImageSource::Embedded(name) => match guest_images::find(name) {
            Some(g) => Ok((g.name.to_string(), g.image.to_vec())),
            None => {
                let known: Vec<&str> = guest_images::GUESTS.iter().map(|g| g.name).collect();
                Err(usage(format!("no embedded guest named {name:?} (available: {})", known.join(", "))))
            }
        },
    }
}

fn open_disk(spec: &DiskSpec, tls: Option<&Tls>) -> Result<DiskPort, Error> {
    let backend: Box<dyn BlockBackend> = match spec {
        DiskSpec::Ftdisk(addr) => {
            Box::new(FtdiskBackend::connect(addr, tls.cloned()).map_err(|e| usage(format!("--disk {spec}: {e}")))?)
        }
        DiskSpec::File(path) => Box::new(FileBackend::open(path).map_err(|e| usage(format!("--disk {spec}: {e}")))?),
    };
    Ok(DiskPort::new(backend))
}

/// Takes the arbitration record at boot (fencing off any earlier owner);
/// returns the generation (0 when there is nothing to arbitrate on).
fn claim_at_boot(arbitration: Arbitration<'_>, role: &str) -> Result<u64, Error> {
    let fail = |e: std::io::Error| usage(format!("claiming the go-live arbitration record: {e}"));
    let Some(current) = arbitration.generation().map_err(fail)? else { return Ok(0) };
    match arbitration.claim(current, &owner_name(role)).map_err(fail)? {
        Some(Claim::Won { generation }) => Ok(generation),
        Some(Claim::Lost { owner, .. }) => Err(usage(format!("{owner} took the arbitration record while we started"))),
        None => Ok(0),
    }
}

/// The log header: what identifies this VM to a log or a peer.
fn header(image: &[u8], config: &VmConfig, disk: Option<&DiskPort>) -> Header {
    let mut vm = format!("mem_mib={} cmdline={:?}", config.mem_mib, config.cmdline);
    if let Some(d) = disk {
        vm.push_str(&format!(" disk_bytes={}", d.size()));
    }
    if let Some(net) = &config.net {
        // Both sides of a pair give the VM the same MAC.
        vm.push_str(&format!(" net_mac={}", format_mac(&net.mac)));
    }
    if !config.virtio_console {
        // Another device set: a log, peer or snapshot of one VM does not
        // fit the other.
        vm.push_str(" no_virtio_console");
    }
    Header {
        image_hash: replay::Digest(*blake3::hash(image).as_bytes()),
        config: vm,
        wall_clock_base_ns: 0,
        disk_generation: 0,
    }
}

/// Live serial input — the endpoint's, or `--serial-input`'s file — and the
/// serial output port.
fn start_serial(
    endpoint: Endpoint,
    input_file: Option<&Path>,
) -> Result<(Receiver<Vec<u8>>, crate::host::console::OutputPort), Error> {
    endpoint.start_with_input(input_file).map_err(|e| {
        let path = input_file.unwrap_or(Path::new("")).display();
        usage(format!("cannot open serial input {path}: {e}"))
    })
}

/// Where a VM's inputs come from and its outputs go, for its mode.
struct Wiring {
    inputs: Inputs,
    output: Box<dyn Outputs>,
    /// Its part in fault tolerance (None: alone).
    role: Option<Role>,
    /// A backup joining a running VM: its state comes over the channel.
    joining: bool,
    /// Its FT state as it starts.
    status: Arc<FtStatus>,
}

/// Opens the log or reaches the peer, and wires inputs and outputs.
#[allow(clippy::too_many_arguments)]
fn wire(
    config: &VmConfig,
    header: &mut Header,
    endpoint: Endpoint,
    disk: Option<&mut DiskPort>,
    restored_at: Option<u64>,
    nic: Option<HostNic>,
    channel: &ChannelConfig,
    metrics: &Arc<VmMetrics>,
) -> Result<Wiring, Error> {
    let status =
        |role, state, reason, detail: &str| Arc::new(FtStatus::new(role, state, reason, detail, metrics.clone()));
    let wiring = match &config.mode {
        Mode::Replay { log } => {
            let file = File::open(log).map_err(|e| usage(format!("cannot open log {}: {e}", log.display())))?;
            let (logged, reader) =
                LogReader::new(BufReader::new(file)).map_err(|e| usage(format!("{}: {e}", log.display())))?;
            let mut replayer = Replayer::new(LogSource::File(reader));
            match restored_at {
                // A log recorded from this snapshot on.
                Some(exit) if logged.config == restored_config(&header.config, exit) => {
                    header.config = logged.config.clone();
                }
                // A log recorded from boot: replay the part after the snapshot.
                Some(exit) => {
                    logged.check_matches(header).map_err(|e| usage(format!("{}: {e}", log.display())))?;
                    let more = replayer.skip_through(exit).map_err(|e| usage(format!("{}: {e}", log.display())))?;
                    if !more {
                        return Err(usage(format!(
                            "{}: the log ends before exit {exit}, the snapshot's",
                            log.display()
                        )));
                    }
                }
                None => {}
            }
            logged.check_matches(header).map_err(|e| usage(format!("{}: {e}", log.display())))?;
            header.wall_clock_base_ns = logged.wall_clock_base_ns;
            Wiring {
                inputs: Inputs::Replay(replayer),
                // A replay sends no frame.
                output: Box::new(Direct { port: endpoint.start_output_only(), net: None }),
                role: None,
                joining: false,
                status: status("solo", FtState::NotConfigured, Reason::None, ""),
            }
        }
        Mode::Backup { connect, listen } => {
            // Bound now, so that a bad address is reported before anything runs.
            let listener = match listen {
                Some(addr) => Some(
                    PrimaryListener::bind(addr)
                        .map_err(|e| usage(format!("backup: logging channel on {addr}: {e}")))?,
                ),
                None => None,
            };
            let (link, primary) = BackupLink::connect(connect, header, channel, config.connect_timeout)
                .map_err(|e| usage(format!("backup: logging channel to {connect}: {e}")))?;
            header.wall_clock_base_ns = primary.header.wall_clock_base_ns;
            // The primary's generation of the shared disk, to claim it from
            // when going live (a joining backup's comes with the state).
            header.disk_generation = primary.header.disk_generation;
            let joining = primary.start == LogStart::State;
            let status = if joining {
                eprintln!("ftvmm: backup: joining the running VM at {connect}: receiving its state");
                status(
                    "backup",
                    FtState::Joining,
                    Reason::Initializing,
                    &format!("receiving the state of the VM at {connect}"),
                )
            } else {
                eprintln!("ftvmm: backup: attached to the primary at {connect}; replaying in lockstep");
                status(
                    "backup",
                    FtState::Replaying,
                    Reason::BackupAttached,
                    &format!("replaying the primary at {connect}"),
                )
            };
            status.set_peer(Some(connect.to_string()));
            // Opened now (before any --run-as drop), used when the backup goes live.
            let serial_input = match &config.serial_input {
                Some(path) => Some(
                    File::open(path).map_err(|e| usage(format!("cannot open serial input {}: {e}", path.display())))?,
                ),
                None => None,
            };
            if let Some(nic) = &nic {
                // Frames come from the log: what arrives on our TAP is drained.
                nic.rx.set_discard(true);
            }
            Wiring {
                inputs: Inputs::Replay(Replayer::new(LogSource::Backup(link))),
                output: Box::new(Suppressed::default()),
                role: Some(Role::backup(endpoint, serial_input, nic, listener)),
                joining,
                status,
            }
        }
        Mode::Primary { listen, wait } => {
            header.wall_clock_base_ns = wall_clock_ns();
            let listener = PrimaryListener::bind(listen)
                .map_err(|e| usage(format!("primary: logging channel on {listen}: {e}")))?;
            let link = if *wait {
                eprintln!("ftvmm: primary: waiting for a backup on {}", listener.local_addr());
                let link = listener
                    .accept(header, channel)
                    .map_err(|e| usage(format!("primary: logging channel on {listen}: {e}")))?;
                eprintln!("ftvmm: primary: backup attached; booting");
                Some(link)
            } else {
                eprintln!("ftvmm: primary: booting without a backup; backups may join on {}", listener.local_addr());
                None
            };
            let status = match &link {
                Some(link) => {
                    let s =
                        status("primary", FtState::Protected, Reason::BackupAttached, "the backup attached at boot");
                    s.set_peer(Some(link.peer().to_string()));
                    s
                }
                None => status(
                    "primary",
                    FtState::NeedsSecondary,
                    Reason::Initializing,
                    &format!("booted without a backup; backups may join on {}", listener.local_addr()),
                ),
            };
            let (input, port) = start_serial(endpoint, config.serial_input.as_deref())?;
            let gate = OutputGate::for_primary(&port, disk, nic.as_ref().map(|n| n.tx.clone()), metrics.clone());
            match &link {
                Some(link) => link.on_ack(OutputGate::ack_callback(&gate)),
                // Unprotected until a backup joins: nothing is held.
                None => gate.acked(u64::MAX),
            }
            let joiner = Joiner::start(listener, header.clone(), channel.clone(), link.is_none());
            let recorder = link.map(|link| Recorder::new(LogSink::Primary(link)));
            let mut live = LiveInputs::new(HostClock::start(), Some(input), recorder, None);
            if let Some(nic) = &nic {
                live.attach_nic(nic.rx.clone(), &nic.waker);
            }
            let role = Role::primary(&gate, &port, channel, joiner, 0);
            Wiring {
                inputs: Inputs::Live(Box::new(live)),
                output: Box::new(Held { gate, port }),
                role: Some(role),
                joining: false,
                status,
            }
        }
        Mode::Solo { record } => {
            header.wall_clock_base_ns = wall_clock_ns();
            if let Some(exit) = restored_at {
                // A recording from a snapshot replays only from that snapshot.
                header.config = restored_config(&header.config, exit);
            }
            let recorder = match record {
                Some(path) => {
                    let file =
                        File::create(path).map_err(|e| usage(format!("cannot create log {}: {e}", path.display())))?;
                    let writer = LogWriter::new(BufWriter::with_capacity(1 << 16, file), header)
                        .map_err(|e| usage(format!("cannot write log {}: {e}", path.display())))?;
                    Some(Recorder::new(LogSink::File(writer)))
                }
                None => None,
            };
            let (input, port) = start_serial(endpoint, config.serial_input.as_deref())?;
            let mut live = LiveInputs::new(HostClock::start(), Some(input), recorder, config.perturb_seed);
            if let Some(nic) = &nic {
                live.attach_nic(nic.rx.clone(), &nic.waker);
            }
            let output = Direct { port, net: nic.as_ref().map(|n| n.tx.clone()) };
            Wiring {
                inputs: Inputs::Live(Box::new(live)),
                output: Box::new(output),
                role: None,
                joining: false,
                status: status("solo", FtState::NotConfigured, Reason::None, ""),
            }
        }
    };
    Ok(wiring)
}

/// The logging channel's settings for `config`.
fn channel_config(config: &VmConfig, tls: Option<&Tls>) -> ChannelConfig {
    ChannelConfig {
        heartbeat_timeout: config.heartbeat,
        poll: config.channel_poll,
        tls: tls.cloned(),
        // The links' network threads go under their seccomp filter.
        on_thread_start: Some(logging_channel::ThreadHook(crate::seccomp::hook(crate::seccomp::ThreadKind::Channel))),
        ..Default::default()
    }
}

/// Loads the TLS credentials, if any; without them, warns once that what
/// this VMM sends to other hosts (the logging channel, ftdisk) is plaintext.
fn load_tls(config: &VmConfig) -> Result<Option<Tls>, Error> {
    match &config.tls {
        Some(files) => Tls::load(files).map(Some).map_err(|e| usage(format!("TLS: {e}"))),
        None => {
            let networked = matches!(config.mode, Mode::Primary { .. } | Mode::Backup { .. })
                || config.arbiter.is_some()
                || matches!(config.disk, Some(DiskSpec::Ftdisk(_)));
            if networked {
                eprintln!(
                    "ftvmm: warning: no TLS (--tls-cert, --tls-key, --tls-ca): the logging channel and ftdisk \
                     traffic are plaintext and unauthenticated"
                );
            }
            Ok(None)
        }
    }
}

/// Builds the VM `config` describes, booted from its image.
pub fn build(config: &VmConfig) -> Result<Vmm, Error> {
    let (name, image) = image(&config.image)?;
    let mem_size = config.mem_mib << 20;
    let tls = load_tls(config)?;
    let mut disk = config.disk.as_ref().map(|spec| open_disk(spec, tls.as_ref())).transpose()?;
    if let (Some(disk), Some(op)) = (disk.as_mut(), config.disk_stall_after_op) {
        disk.stall_after(op);
    }
    let mut header = header(&image, config, disk.as_ref());

    let endpoint =
        Endpoint::bind(&config.serial, tls.as_ref()).map_err(|e| usage(format!("--serial {}: {e}", config.serial)))?;
    if let Some(addr) = endpoint.local_addr() {
        eprintln!("ftvmm: serial console on {addr}");
    }
    let arbiter = match &config.arbiter {
        Some(addr) => Some(
            RemoteArbiter::connect(addr, tls.clone()).map_err(|e| usage(format!("--arbiter ftdisk:{addr}: {e}")))?,
        ),
        None => None,
    };
    let arbitration = match (&arbiter, &disk) {
        (Some(a), _) => Arbitration::Remote(a),
        (None, Some(d)) if matches!(config.disk, Some(DiskSpec::Ftdisk(_))) => Arbitration::Disk(d),
        _ => Arbitration::None,
    };
    let unarbitrated = matches!(arbitration, Arbitration::None);
    // A VM that starts live owns the arbitration record: claim it (fencing
    // off any earlier owner of a shared disk). A replay never writes; a
    // backup claims it when it goes live.
    if config.starts_live() {
        let role = if matches!(config.mode, Mode::Primary { .. }) { "primary" } else { "vmm" };
        header.disk_generation = claim_at_boot(arbitration, role)?;
    }
    // A snapshot to start from: checked against this VM before anything runs.
    let mut snapshot = match &config.restore {
        Some(path) => {
            let bad = |e: SnapshotError| usage(format!("--restore {}: {e}", path.display()));
            let file = File::open(path).map_err(|e| usage(format!("--restore {}: {e}", path.display())))?;
            let mut reader = StateReader::new(BufReader::with_capacity(1 << 20, file)).map_err(bad)?;
            let exit = check_begin(reader.next_item().map_err(bad)?, &header, mem_size).map_err(bad)?;
            Some((reader, exit))
        }
        None => None,
    };
    let restored_at = snapshot.as_ref().map(|(_, exit)| *exit);
    // The NIC's TAP (a replay takes frames only from the log: it opens none).
    let nic = match (&config.net, &config.mode) {
        (Some(spec), Mode::Solo { .. } | Mode::Primary { .. } | Mode::Backup { .. }) => {
            Some(HostNic::open(spec).map_err(|e| usage(format!("--net {spec}: {e}")))?)
        }
        _ => None,
    };
    let (metrics, registry) = VmMetrics::new(&STATE_NAMES, &REASON_NAMES);
    // One channel configuration: every link counts into its counters.
    let channel = channel_config(config, tls.as_ref());
    let watched_nic = nic.as_ref().map(|n| (n.rx.clone(), n.tx.clone()));
    let watched_disk = disk.as_ref().map(|d| (d.counters(), d.pending_view()));
    let Wiring { mut inputs, output, role, joining, status } =
        wire(config, &mut header, endpoint, disk.as_mut(), restored_at, nic, &channel, &metrics)?;
    if unarbitrated && matches!(config.mode, Mode::Primary { .. } | Mode::Backup { .. }) {
        eprintln!(
            "ftvmm: warning: no go-live arbitration (neither --disk ftdisk:ADDR nor --arbiter ftdisk:ADDR): \
             a partition between primary and backup can leave two live copies"
        );
    }

    let machine = vm::Machine::new(mem_size).map_err(RunError::from)?;
    let loaded = loader::load(&machine.mem, mem_size, &image).map_err(|e| usage(format!("guest image {name}: {e}")))?;
    let rdtsc_sites = rdtsc::rewrite(&machine.mem, &loaded.code_segments)
        .map_err(|e| usage(format!("guest image {name}: rewriting RDTSC: {e}")))?;
    let devices = Devices::with_virtio_console(
        mem_size,
        disk.as_ref().map(|d| d.size()),
        config.net.as_ref().map(|n| n.mac),
        config.virtio_console,
    );
    let virtio: Vec<VirtioEntry> =
        devices.virtio_table().into_iter().map(|(slot, device_id)| VirtioEntry { slot, device_id }).collect();
    boot::write_boot_structures(&machine.mem, mem_size, config.cmdline.as_bytes(), &virtio)
        .map_err(|e| usage(format!("writing boot structures: {e}")))?;
    machine.set_boot_state(loaded.entry).map_err(RunError::from)?;

    let mut machine = machine;
    let mut devices = devices;
    // The second entry point: a VM built from a snapshot instead of its
    // image — a file, or a running primary's state sent to a joining backup.
    let (restored, from) = match (snapshot.as_mut(), &config.restore) {
        (Some((reader, _)), Some(path)) => {
            let from = format!("--restore {}", path.display());
            let restored =
                restore_state(&mut machine, &mut devices, reader).map_err(|e| usage(format!("{from}: {e}")))?;
            (Some(restored), from)
        }
        _ if joining => {
            let from = "backup: joining the running VM".to_string();
            let link = inputs.backup_link().ok_or_else(|| usage(format!("{from}: not a backup")))?;
            let restored = receive_state(link, &header, mem_size, &mut machine, &mut devices)
                .map_err(|e| usage(format!("{from}: {e}")))?;
            (Some(restored), from)
        }
        _ => (None, String::new()),
    };
    let role: Box<dyn RoleHooks> = match role {
        Some(role) => Box::new(FtRole::new(role, arbiter, channel.clone(), status.clone())),
        None => Box::new(Alone),
    };
    let mut vmm = Vmm::new(
        machine,
        devices,
        inputs,
        output,
        role,
        disk,
        rdtsc_sites,
        header,
        config.wants_digest(),
        metrics.clone(),
    );
    vmm.set_checks(
        crate::run::CheckPolicy { every_ms: config.check_every_ms, every_exits: config.check_every_exits },
        config.inject_divergence_at,
    );
    vmm.sync_after = config.sync_after;
    vmm.die_before_disk_read = config.die_before_disk_read;
    if let Some(restored) = restored {
        let exit = restored.exits;
        if joining {
            // The primary's generation now (it may have changed since the
            // handshake: a primary that lost a backup claims anew).
            vmm.header.disk_generation = restored.disk_generation;
        }
        vmm.adopt(restored).map_err(|e| usage(format!("{from}: {e}")))?;
        eprintln!("ftvmm: {from}: restored at exit {exit}");
        if joining {
            status.set(FtState::Replaying, Reason::BackupJoined, format!("joined at exit {exit}"));
        }
    }
    if let Some(addr) = &config.metrics {
        let watched = Watched { status, channel: channel.counters.clone(), nic: watched_nic, disk: watched_disk };
        let server =
            watch::serve(addr, metrics, registry, watched).map_err(|e| usage(format!("--metrics {addr}: {e}")))?;
        eprintln!("ftvmm: metrics on http://{}/metrics", server.local_addr());
        vmm.keep_serving(server);
    }
    if let Some((exit, path)) = &config.save_snapshot {
        vmm.save_snapshot_at(*exit, path.clone());
    }
    Ok(vmm)
}

/// The configuration a recording begun from a snapshot at `exit` carries:
/// it replays only from that snapshot.
fn restored_config(config: &str, exit: u64) -> String {
    format!("{config} restored_at_exit={exit}")
}
