//! The run loop: runs the vCPU, turns every guest-caused exit into a
//! [`Position`], lets the device models answer it, and delivers external
//! inputs — live or replayed — only at positions.
//!
//! One exit, in order (identical on a recording and on its replay):
//! 1. the exit is checked in (recorded, or matched against the log);
//! 2. the device model answers the access; a time reading goes through
//!    [`Inputs`] (host clock + log, or log);
//! 3. timers catch up with the virtual clock;
//! 4. external inputs are taken (live: serial bytes, a due timer; replay: the
//!    logged events of this position, in their logged order);
//! 5. a pending PIC interrupt is injected if the guest can take it now, or an
//!    interrupt window is requested so that it is injected at the next exit.

use crate::clock::{HostClock, VirtualClock, TSC_HZ};
use crate::console::Endpoint;
use crate::devices::virtio_blk::{self, DiskIo, Notify, VirtioBlk};
use crate::devices::{self, Devices, PortAction};
use crate::digest;
use crate::disk::{Claim, DiskOp, DiskPort};
use crate::ft::{LogSink, LogSource, OutputGate, SerialOutput};
use crate::inputs::{Inputs, LiveInputs, Woken};
use crate::vm::{Machine, VmError, MSR_IA32_TSC};
use kvm_ioctls::VcpuExit;
use replay::{Divergence, Event, ExitKind, LogError, Position, ReplayError, TimeSource};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Without output waiting for it, the primary ships the lockstep watermark
/// at least every this many exits...
const SHIP_EVERY_EXITS: u64 = 64;
/// ...and at least this often.
const SHIP_EVERY: Duration = Duration::from_millis(5);

/// Why a run ended other than by the guest's own exit.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest did something that ends the VM (triple fault, emulation
    /// failure...).
    #[error("guest stopped: {what} at rip {rip:#x} after {exits} exits")]
    Guest { what: String, rip: u64, exits: u64 },
    #[error("{0}")]
    Divergence(Divergence),
    #[error("replay stopped: the log ends at exit {last_exit} before the guest finished (truncated log?)")]
    EndOfLog { last_exit: u64 },
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{what}: {err}")]
    Io { what: &'static str, err: std::io::Error },
    /// The other side won the go-live arbitration: this one must stop.
    #[error("{0}")]
    Halted(String),
}

impl From<ReplayError> for RunError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Divergence(d) => RunError::Divergence(d),
            ReplayError::EndOfLog { last_exit } => RunError::EndOfLog { last_exit },
            ReplayError::Log(l) => RunError::Log(l),
        }
    }
}

impl RunError {
    /// The process exit status that reports this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            RunError::Divergence(_) => 3,
            RunError::EndOfLog { .. } => 4,
            RunError::Halted(_) => 5,
            _ => 2,
        }
    }
}

fn log_write_error(err: std::io::Error) -> RunError {
    RunError::Io { what: "writing the log", err }
}

/// How a run ended when the guest ended it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub status: u8,
    pub digest: Option<replay::Digest>,
    pub exits: u64,
}

/// A guest-caused exit, copied out of `kvm_run`.
enum GuestExit {
    IoIn { port: u16, size: u8, count: u32 },
    IoOut { port: u16, size: u8, data: Vec<u8> },
    MmioRead { addr: u64, len: u8 },
    MmioWrite { addr: u64, data: [u8; 8], len: u8 },
    Hlt,
    RdMsr { index: u32 },
    WrMsr { index: u32, data: u64 },
    IrqWindow,
}

impl GuestExit {
    fn kind(&self) -> ExitKind {
        match *self {
            GuestExit::IoIn { port, size, .. } => ExitKind::IoIn { port, size },
            GuestExit::IoOut { port, size, .. } => ExitKind::IoOut { port, size },
            GuestExit::MmioRead { addr, len } => ExitKind::MmioRead { addr, size: len },
            GuestExit::MmioWrite { addr, len, .. } => ExitKind::MmioWrite { addr, size: len },
            GuestExit::Hlt => ExitKind::Hlt,
            GuestExit::RdMsr { index } => ExitKind::RdMsr { index },
            GuestExit::WrMsr { index, .. } => ExitKind::WrMsr { index },
            GuestExit::IrqWindow => ExitKind::IrqWindow,
        }
    }
}

/// The VMM's part in fault tolerance.
pub enum Role {
    /// Alone: a plain run, a recording or a replay (or a former backup, live).
    Solo,
    /// The primary: inputs go to the backup, outputs wait for its acks.
    Primary {
        gate: Arc<OutputGate>,
        /// The exit up to which serial output has reached the outside world.
        delivered: Arc<AtomicU64>,
        /// The exit up to which released disk writes have been applied.
        disk_delivered: Arc<AtomicU64>,
        finish_timeout: Duration,
        /// Our owner generation of the shared disk (0: none).
        generation: u64,
        /// When the watermark was last shipped: (exit, time).
        shipped: (u64, Instant),
    },
    /// The backup: replays the primary's log; when it ends (the primary is
    /// gone) it goes live and serves `endpoint`, with serial input from
    /// `serial_input` if given (`--serial-input`), else from the endpoint.
    Backup {
        endpoint: Option<Endpoint>,
        serial_input: Option<std::path::PathBuf>,
        /// The primary's generation of the shared disk, to claim it from.
        expected_generation: u64,
    },
}

/// A running VM: the machine, its devices, its clock and its inputs.
pub struct Vmm {
    pub machine: Machine,
    pub devices: Devices,
    pub clock: VirtualClock,
    pub inputs: Inputs,
    output: Box<dyn SerialOutput>,
    role: Role,
    /// The disk's storage, if the VM has a disk.
    disk: Option<DiskPort>,
    /// The exit at which an interrupt was last injected (one per exit).
    injected_at: u64,
    backup_loss_reported: bool,
    /// RIPs of RDTSC instructions the loader rewrote into TSC port reads.
    rdtsc_sites: HashSet<u64>,
    /// Wall-clock time at boot, the RTC's base.
    wall_clock_base_ns: u64,
    exits: u64,
    /// Compute the final state digest (for `--digest`, recording and replay).
    want_digest: bool,
}

impl Vmm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        machine: Machine,
        inputs: Inputs,
        output: Box<dyn SerialOutput>,
        role: Role,
        disk: Option<DiskPort>,
        rdtsc_sites: HashSet<u64>,
        wall_clock_base_ns: u64,
        want_digest: bool,
    ) -> Self {
        let devices = Devices::new(machine.mem_size, disk.as_ref().map(|d| d.size()));
        Vmm {
            machine,
            devices,
            clock: VirtualClock::default(),
            inputs,
            output,
            role,
            disk,
            injected_at: 0,
            backup_loss_reported: false,
            rdtsc_sites,
            wall_clock_base_ns,
            exits: 0,
            want_digest,
        }
    }

    /// Guest-caused exits so far.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// Runs the guest until it ends the VM or something goes wrong.
    pub fn run(mut self) -> Result<Outcome, RunError> {
        let result = self.run_loop();
        // Whatever happened, what was recorded and what the guest printed stays.
        if let Inputs::Live(live) = &mut self.inputs {
            if let Some(recorder) = &mut live.recorder {
                let flushed = recorder.flush();
                if result.is_ok() {
                    flushed.map_err(log_write_error)?;
                }
            }
        }
        self.output.close();
        if let Some(disk) = &mut self.disk {
            // Released writes reach the disk before the VMM is gone.
            disk.close();
        }
        result
    }

    fn run_loop(&mut self) -> Result<Outcome, RunError> {
        loop {
            let exit = self.next_exit()?;
            self.exits += 1;
            let position = Position { exit: self.exits, rip: self.machine.exit_rip()? };
            tracing::trace!(exit = self.exits, rip = format_args!("{:#x}", position.rip), kind = %exit.kind());
            self.check_in(position, exit.kind())?;

            let mut action = PortAction::None;
            match exit {
                GuestExit::IoIn { port, size, count } => {
                    let mut data = vec![0u8; usize::from(size) * count as usize];
                    if port == devices::TSC_PORT && size == 4 {
                        let tsc = self.read_time(TimeSource::Rdtsc)?;
                        data[..4].copy_from_slice(&(tsc as u32).to_le_bytes());
                        self.machine.complete_io_in(&data);
                        if self.rdtsc_sites.contains(&position.rip) {
                            // A rewritten RDTSC: the 32-bit IN put the low half in
                            // EAX (zero-extended); EDX gets the high half, once the
                            // IN has completed (setting registers earlier would
                            // race KVM's completion of the emulated IN).
                            self.machine.complete_pending_io()?;
                            let mut regs = self
                                .machine
                                .vcpu
                                .get_regs()
                                .map_err(|err| VmError::Kvm { what: "reading registers", err })?;
                            regs.rdx = tsc >> 32;
                            self.machine
                                .vcpu
                                .set_regs(&regs)
                                .map_err(|err| VmError::Kvm { what: "setting registers", err })?;
                        }
                    } else {
                        for chunk in data.chunks_mut(usize::from(size.max(1))) {
                            self.port_read(port, chunk)?;
                        }
                        self.machine.complete_io_in(&data);
                    }
                }
                GuestExit::IoOut { port, size, data } => {
                    for chunk in data.chunks(usize::from(size.max(1))) {
                        action = self.port_write(port, chunk)?;
                    }
                }
                GuestExit::MmioRead { addr, len } => {
                    // Unclaimed MMIO floats high.
                    let mut data = [0xffu8; 8];
                    if let Some(disk) = self.devices.disk.as_ref().filter(|_| VirtioBlk::contains(addr)) {
                        disk.read(addr, &mut data[..usize::from(len.min(8))]);
                    }
                    self.machine.complete_mmio_read(&data);
                }
                GuestExit::MmioWrite { addr, data, len } => {
                    let notify = match self.devices.disk.as_mut().filter(|_| VirtioBlk::contains(addr)) {
                        Some(disk) => disk.write(addr, &data[..usize::from(len)]),
                        None => Notify::None,
                    };
                    if notify == Notify::Queue {
                        self.serve_disk(position)?;
                    }
                }
                GuestExit::Hlt => action = PortAction::Idle,
                GuestExit::RdMsr { index } => {
                    let value = if index == MSR_IA32_TSC {
                        self.read_time(TimeSource::TscMsr)?;
                        Some(self.clock.tsc())
                    } else {
                        None
                    };
                    self.machine.complete_msr(value);
                }
                GuestExit::WrMsr { index, data } => {
                    let accepted = if index == MSR_IA32_TSC {
                        self.read_time(TimeSource::TscMsr)?;
                        self.clock.set_tsc(data);
                        Some(0)
                    } else {
                        None
                    };
                    self.machine.complete_msr(accepted);
                }
                GuestExit::IrqWindow => {}
            }

            let output = self.devices.tx.take();
            if !output.is_empty() {
                self.output.output(position, output);
            }
            if let PortAction::Exit(status) = action {
                return self.finish(position, status);
            }
            self.devices.advance_timers(self.clock.now_ns());
            self.take_inputs(position, action == PortAction::Idle)?;
            self.passed(position)?;
        }
    }

    /// The VMM is done with exit `position` and resumes the guest: tell the
    /// backup (the lockstep watermark), keep pace with it, keep its view of
    /// released output current.
    fn passed(&mut self, position: Position) -> Result<(), RunError> {
        if let Some(why) = self.disk.as_ref().and_then(|d| d.failure()) {
            return Err(RunError::Halted(format!("writing the shared disk failed ({why}); halting")));
        }
        match &mut self.inputs {
            Inputs::Live(live) => {
                let Some(recorder) = &mut live.recorder else { return Ok(()) };
                if let Role::Primary { gate, shipped, .. } = &mut self.role {
                    // Ship the watermark at once when output waits for it,
                    // else every few exits or milliseconds: each message
                    // wakes threads on both sides, which a guest that exits
                    // often but outputs little should not pay for every exit.
                    let due = gate.held() > 0
                        || position.exit >= shipped.0 + SHIP_EVERY_EXITS
                        || shipped.1.elapsed() >= SHIP_EVERY;
                    if !due {
                        return Ok(());
                    }
                    *shipped = (position.exit, Instant::now());
                }
                recorder.passed().map_err(log_write_error)?;
                if let (LogSink::Primary(link), Role::Primary { gate, delivered, disk_delivered, .. }) =
                    (recorder.sink_mut(), &self.role)
                {
                    link.released(
                        gate.released(delivered.load(Ordering::Acquire), disk_delivered.load(Ordering::Acquire)),
                    );
                    link.throttle(position.exit);
                }
                if let Some(why) = self.newly_lost_backup() {
                    return self.backup_lost(position, &why);
                }
            }
            Inputs::Replay(r) => {
                if let LogSource::Backup(link) = r.source_mut() {
                    self.output.prune(link.released());
                }
            }
        }
        Ok(())
    }

    /// The primary's logging channel to its backup, if this VMM is one.
    fn primary_link(&mut self) -> Option<&mut logging_channel::PrimaryLink> {
        match (&mut self.inputs, &self.role) {
            (Inputs::Live(live), Role::Primary { .. }) => match live.recorder.as_mut()?.sink_mut() {
                LogSink::Primary(link) => Some(link),
                LogSink::File(_) => None,
            },
            _ => None,
        }
    }

    /// Why the backup was lost, the first time the primary notices.
    fn newly_lost_backup(&mut self) -> Option<String> {
        if self.backup_loss_reported {
            return None;
        }
        let why = self.primary_link()?.backup_lost()?;
        self.backup_loss_reported = true;
        Some(why)
    }

    /// The primary lost its backup: win the shared disk (if there is one to
    /// arbitrate on), then stop holding output and run alone.
    fn backup_lost(&mut self, position: Position, why: &str) -> Result<(), RunError> {
        eprintln!("ftvmm: primary: backup lost ({why}) at exit {}", position.exit);
        let Role::Primary { gate, generation, .. } = &self.role else { return Ok(()) };
        let (gate, expected) = (gate.clone(), *generation);
        if let Some(generation) = self.arbitrate("primary", expected)? {
            if let Role::Primary { generation: g, .. } = &mut self.role {
                *g = generation;
            }
        }
        eprintln!("ftvmm: primary: running alone");
        gate.acked(u64::MAX);
        Ok(())
    }

    /// Go-live arbitration: the test-and-set on the shared disk from
    /// generation `expected`. Returns the new generation (None: the disk
    /// cannot arbitrate, or there is none, and each side goes live on its own
    /// detection). Losing halts this VMM; unreachable storage is retried for
    /// as long as it takes, without going live.
    fn arbitrate(&mut self, role: &str, expected: u64) -> Result<Option<u64>, RunError> {
        let Some(disk) = &self.disk else { return Ok(None) };
        let owner = crate::cli::owner_name(role);
        loop {
            match disk.claim(expected, &owner) {
                Ok(None) => return Ok(None),
                Ok(Some(Claim::Won { generation })) => {
                    eprintln!("ftvmm: {role}: won the shared disk (generation {generation})");
                    return Ok(Some(generation));
                }
                Ok(Some(Claim::Lost { generation, owner })) => {
                    return Err(RunError::Halted(format!(
                        "{role}: lost the go-live arbitration to {owner} (generation {generation}); halting"
                    )));
                }
                Err(e) => {
                    eprintln!(
                        "ftvmm: {role}: cannot reach the shared disk to arbitrate ({e}); not going live, retrying"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// A replay ran out of log. For a backup that means the primary is gone:
    /// go live — serve the outside world, take inputs from the host, and
    /// re-emit the output the primary may not have released — and carry on
    /// from exactly here. For anything else it is the end of the run.
    fn end_of_log(&mut self, err: RunError) -> Result<(), RunError> {
        let RunError::EndOfLog { .. } = err else { return Err(err) };
        let Role::Backup { endpoint, serial_input, expected_generation } = &mut self.role else { return Err(err) };
        let Some(endpoint) = endpoint.take() else { return Err(err) };
        let expected = *expected_generation;
        let Inputs::Replay(r) = &mut self.inputs else { return Err(err) };
        let (released, why) = match r.source_mut() {
            LogSource::Backup(link) => (link.released(), link.primary_lost().unwrap_or_else(|| "log ended".into())),
            LogSource::File(_) => (0, "log ended".into()),
        };
        let serial_input = serial_input.take();
        eprintln!("ftvmm: backup: primary lost ({why}) at exit {}", self.exits);
        self.arbitrate("backup", expected)?;
        eprintln!("ftvmm: backup: going live at exit {}", self.exits);
        let (input, port) = endpoint
            .start_with_input(serial_input.as_deref())
            .map_err(|err| RunError::Io { what: "opening --serial-input", err })?;
        self.output
            .go_live(released, port, self.disk.as_ref())
            .map_err(|err| RunError::Io { what: "re-issuing the primary's disk writes", err })?;
        let host = HostClock::resume_at(self.clock.now_ns());
        self.inputs = Inputs::Live(Box::new(LiveInputs::new(host, Some(input), None, None)));
        self.role = Role::Solo;
        Ok(())
    }

    /// Runs the vCPU until the next guest-caused exit.
    fn next_exit(&mut self) -> Result<GuestExit, RunError> {
        loop {
            let exit = match self.machine.vcpu.run() {
                Ok(exit) => exit,
                // A signal: not a position, nothing to do but resume.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(err) => return Err(VmError::Kvm { what: "running the vCPU", err }.into()),
            };
            let stop = match exit {
                VcpuExit::IoIn(port, _) => {
                    let (size, count) = self.io_geometry();
                    return Ok(GuestExit::IoIn { port, size, count });
                }
                VcpuExit::IoOut(port, data) => {
                    let data = data.to_vec();
                    let (size, _) = self.io_geometry();
                    return Ok(GuestExit::IoOut { port, size, data });
                }
                VcpuExit::MmioRead(addr, data) => return Ok(GuestExit::MmioRead { addr, len: data.len() as u8 }),
                VcpuExit::MmioWrite(addr, data) => {
                    let mut bytes = [0u8; 8];
                    let len = data.len().min(8);
                    bytes[..len].copy_from_slice(&data[..len]);
                    return Ok(GuestExit::MmioWrite { addr, data: bytes, len: len as u8 });
                }
                VcpuExit::Hlt => return Ok(GuestExit::Hlt),
                VcpuExit::IrqWindowOpen => return Ok(GuestExit::IrqWindow),
                VcpuExit::X86Rdmsr(msr) => return Ok(GuestExit::RdMsr { index: msr.index }),
                VcpuExit::X86Wrmsr(msr) => return Ok(GuestExit::WrMsr { index: msr.index, data: msr.data }),
                VcpuExit::Intr => continue,
                VcpuExit::Shutdown => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
                VcpuExit::InternalError => String::new(),
                VcpuExit::FailEntry(reason, _) => {
                    format!("VM entry failed (hardware reason {reason:#x})")
                }
                VcpuExit::SystemEvent(kind, _) => {
                    format!("unhandled system event {kind} (KVM_EXIT_SYSTEM_EVENT)")
                }
                VcpuExit::Exception => "unhandled exception exit (KVM_EXIT_EXCEPTION)".to_string(),
                VcpuExit::Debug(_) => "unhandled debug exit (KVM_EXIT_DEBUG)".to_string(),
                VcpuExit::Hypercall(_) => "unhandled hypercall (KVM_EXIT_HYPERCALL)".to_string(),
                VcpuExit::Unsupported(reason) => format!("unhandled exit reason {reason}"),
                other => format!("unhandled exit {other:?}"),
            };
            let what = if stop.is_empty() {
                match self.machine.internal_error_suberror() {
                    1 => "KVM internal error: emulation failure".to_string(),
                    2 => "KVM internal error: exception while delivering an exception".to_string(),
                    3 => "KVM internal error: cannot deliver an event".to_string(),
                    4 => "KVM internal error: unexpected exit".to_string(),
                    n => format!("KVM internal error (suberror {n})"),
                }
            } else {
                stop
            };
            let rip = self.machine.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            return Err(RunError::Guest { what, rip, exits: self.exits });
        }
    }

    fn io_geometry(&mut self) -> (u8, u32) {
        let run = self.machine.run_area();
        // SAFETY: called right after a KVM_EXIT_IO, when `io` is the active union member.
        let io = unsafe { run.__bindgen_anon_1.io };
        (io.size, io.count)
    }

    /// Step 1: the exit becomes a position in the log, or is checked against it.
    fn check_in(&mut self, position: Position, kind: ExitKind) -> Result<(), RunError> {
        match &mut self.inputs {
            Inputs::Live(live) => match &mut live.recorder {
                Some(r) => r.exit(position, kind).map_err(log_write_error),
                None => Ok(()),
            },
            Inputs::Replay(r) => match r.exit(position, kind) {
                Ok(()) => Ok(()),
                Err(e) => self.end_of_log(e.into()),
            },
        }
    }

    /// The guest notified the disk's queue: serve its requests now, at this
    /// position (reads from the disk and logged, or from the log).
    fn serve_disk(&mut self, position: Position) -> Result<(), RunError> {
        let Vmm { devices, inputs, machine, disk: port, output, .. } = self;
        let Some(disk) = devices.disk.as_mut() else { return Ok(()) };
        let mut io = DiskInputs { inputs, port: port.as_ref(), output: output.as_mut(), position, failed: None };
        let raise = disk.process(&machine.mem, &mut io);
        if let Some(e) = io.failed {
            self.end_of_log(e)?;
        }
        if raise {
            self.devices.pic.pulse_irq(virtio_blk::IRQ);
        }
        Ok(())
    }

    /// Reads the virtual clock for `source` at the current position.
    fn read_time(&mut self, source: TimeSource) -> Result<u64, RunError> {
        let mut failed = None;
        take_time_reading(&mut self.inputs, &mut self.clock, 0, source, &mut failed);
        if let Some(e) = failed {
            // A backup whose primary died mid-exit answers from the last
            // time it knows, then goes live.
            self.end_of_log(e)?;
        }
        Ok(self.clock.now_ns())
    }

    fn port_read(&mut self, port: u16, data: &mut [u8]) -> Result<(), RunError> {
        let Vmm { devices, inputs, clock, wall_clock_base_ns, .. } = self;
        let mut failed = None;
        let mut time = |source| take_time_reading(inputs, clock, *wall_clock_base_ns, source, &mut failed);
        devices.port_read(port, data, &mut time);
        failed.map_or(Ok(()), |e| self.end_of_log(e))
    }

    fn port_write(&mut self, port: u16, data: &[u8]) -> Result<PortAction, RunError> {
        let Vmm { devices, inputs, clock, wall_clock_base_ns, .. } = self;
        let mut failed = None;
        let mut time = |source| take_time_reading(inputs, clock, *wall_clock_base_ns, source, &mut failed);
        let action = devices.port_write(port, data, &mut time);
        match failed {
            Some(e) => self.end_of_log(e).map(|_| action),
            None => Ok(action),
        }
    }

    /// Steps 4 and 5: external inputs and interrupt delivery at `position`.
    fn take_inputs(&mut self, position: Position, idle: bool) -> Result<(), RunError> {
        let (ready, if_flag) = {
            let run = self.machine.run_area();
            (run.ready_for_interrupt_injection != 0, run.if_flag != 0)
        };
        if idle && !if_flag {
            // HLT with interrupts off never wakes: report it instead of hanging.
            return Err(RunError::Guest {
                what: "idle with interrupts disabled".into(),
                rip: position.rip,
                exits: self.exits,
            });
        }
        let mut injected = false;
        if matches!(self.inputs, Inputs::Replay(_)) {
            match self.take_logged_inputs(position, idle, ready && if_flag) {
                Ok(i) => injected = i,
                Err(e) => self.end_of_log(e)?,
            }
        }
        if matches!(self.inputs, Inputs::Live(_)) {
            injected = self.take_live_inputs(position, idle, ready)?;
        }
        let want_window = !injected && self.devices.pic.has_pending();
        self.machine.run_area().request_interrupt_window = u8::from(want_window);
        Ok(())
    }

    /// Live: serial input and due timers from the host; when idle, wait for
    /// one of them. Returns whether an interrupt was injected.
    fn take_live_inputs(&mut self, position: Position, idle: bool, ready: bool) -> Result<bool, RunError> {
        loop {
            self.poll_host()?;
            if self.injected_at == position.exit {
                // A backup that just went live may have injected this exit's
                // interrupt from the log already.
                return Ok(true);
            }
            if self.devices.pic.has_pending() {
                if !ready {
                    return Ok(false);
                }
                let Inputs::Live(live) = &mut self.inputs else { unreachable!("live inputs") };
                live.injection_delay();
                let Some(vector) = self.devices.pic.acknowledge() else {
                    return Ok(false);
                };
                live.record(Event::Interrupt { vector }).map_err(log_write_error)?;
                self.machine.inject_interrupt(vector)?;
                self.injected_at = position.exit;
                return Ok(true);
            }
            if !idle {
                return Ok(false);
            }
            self.wait_for_host_input(position)?;
        }
    }

    /// Takes what the host has for the guest now: serial bytes the UART has
    /// room for, and the timer if it is due.
    fn poll_host(&mut self) -> Result<(), RunError> {
        let Inputs::Live(live) = &mut self.inputs else {
            return Ok(());
        };
        if let Some(bytes) = live.take_serial(self.devices.serial_rx_room()) {
            live.record(Event::SerialRx { bytes: bytes.clone() }).map_err(log_write_error)?;
            self.devices.serial_receive(&bytes);
        }
        if let Some(deadline) = self.devices.pit.next_irq0_deadline() {
            let now = live.host.elapsed_ns().saturating_sub(live.timer_jitter_ns());
            if now >= deadline {
                self.read_time(TimeSource::TimerCheck)?;
                self.devices.advance_timers(self.clock.now_ns());
            }
        }
        Ok(())
    }

    /// The guest idles: block until the host has an input for it.
    fn wait_for_host_input(&mut self, position: Position) -> Result<(), RunError> {
        if let Some(why) = self.newly_lost_backup() {
            return self.backup_lost(position, &why);
        }
        // Keep an eye on the backup while the guest idles.
        let watch_backup = self.primary_link().is_some();
        let Inputs::Live(live) = &mut self.inputs else {
            return Ok(());
        };
        if let Some(r) = &mut live.recorder {
            // Nothing else will happen for a while: make the log durable, and
            // let a backup catch up to this exit while the guest idles.
            r.passed_previous().map_err(log_write_error)?;
            r.flush().map_err(log_write_error)?;
        }
        let mut deadline = self.devices.pit.next_irq0_deadline().map(|ns| live.host.instant_at(ns));
        if watch_backup {
            let soon = Instant::now() + Duration::from_millis(20);
            deadline = Some(deadline.map_or(soon, |d| d.min(soon)));
        }
        match live.wait(deadline) {
            Woken::Input | Woken::Deadline => Ok(()),
            Woken::Nothing => Err(RunError::Guest {
                what: "idle with no interrupt source left (no timer armed, serial input closed)".into(),
                rip: position.rip,
                exits: self.exits,
            }),
        }
    }

    /// Replay: apply the inputs logged at this position, in their order.
    /// Returns whether an interrupt was injected.
    fn take_logged_inputs(&mut self, position: Position, idle: bool, can_inject: bool) -> Result<bool, RunError> {
        let mut injected = false;
        loop {
            let Inputs::Replay(r) = &mut self.inputs else { unreachable!("replay inputs") };
            let Some(event) = r.take_event()? else { break };
            match event {
                Event::SerialRx { bytes } => {
                    if bytes.len() > self.devices.serial_rx_room() {
                        return Err(self.diverged("serial input the UART has room for", "a full receive FIFO"));
                    }
                    self.devices.serial_receive(&bytes);
                }
                Event::TimeRead { source: TimeSource::TimerCheck, ns } => {
                    self.clock.set(ns);
                    self.devices.advance_timers(self.clock.now_ns());
                }
                Event::TimeRead { source, .. } => {
                    return Err(self.diverged(format_args!("a time read by {source:?}"), "no device reading time"));
                }
                Event::DiskRead { data } => {
                    return Err(self.diverged(format_args!("a disk read of {} bytes", data.len()), "no disk request"));
                }
                Event::Interrupt { vector } => {
                    if injected || !can_inject {
                        return Err(self.diverged(format_args!("interrupt {vector:#x}"), "a guest that cannot take it"));
                    }
                    match self.devices.pic.acknowledge() {
                        Some(v) if v == vector => {}
                        got => {
                            let got = got.map_or("no pending interrupt".to_string(), |v| format!("interrupt {v:#x}"));
                            return Err(self.diverged(format_args!("interrupt {vector:#x}"), got));
                        }
                    }
                    self.machine.inject_interrupt(vector)?;
                    self.injected_at = position.exit;
                    injected = true;
                }
            }
        }
        if !injected && can_inject && self.devices.pic.has_pending() {
            return Err(self.diverged("no interrupt", "a pending interrupt the guest can take"));
        }
        if idle && !injected && !self.devices.pic.has_pending() {
            return Err(self.diverged("an input to wake the idle guest", format_args!("none at {position}")));
        }
        Ok(injected)
    }

    fn diverged(&self, expected: impl std::fmt::Display, got: impl std::fmt::Display) -> RunError {
        RunError::Divergence(Divergence { exit: self.exits, expected: expected.to_string(), got: got.to_string() })
    }

    /// The guest wrote its exit status.
    fn finish(&mut self, position: Position, status: u8) -> Result<Outcome, RunError> {
        let digest = if self.want_digest { Some(digest::state_digest(self)?) } else { None };
        match &mut self.inputs {
            Inputs::Live(live) => {
                if let (Some(mut r), Some(d)) = (live.recorder.take(), digest) {
                    r.end(status, d).map_err(log_write_error)?;
                    r.passed().map_err(log_write_error)?;
                    if let (LogSink::Primary(link), Role::Primary { finish_timeout, .. }) = (r.into_sink(), &self.role)
                    {
                        // Let the backup have the whole log, so it can end as we do.
                        if !link.finish(*finish_timeout) {
                            eprintln!("ftvmm: primary: the backup did not acknowledge the end of the log");
                        }
                    }
                }
            }
            Inputs::Replay(r) => {
                let d = digest.unwrap_or(replay::Digest([0; 32]));
                if let Err(e) = r.end(position, status, d) {
                    self.end_of_log(e.into())?;
                }
            }
        }
        Ok(Outcome { status, digest, exits: self.exits })
    }
}

/// The disk I/O of the current exit. Reads: from the disk (with writes not
/// yet applied laid over) and logged, or, on a replay, from the log. Writes
/// and flushes: outputs — held for the backup's ack on a primary, kept by a
/// backup until the primary reports them done, applied at once otherwise,
/// and never applied by a replay of a log file.
struct DiskInputs<'a> {
    inputs: &'a mut Inputs,
    port: Option<&'a DiskPort>,
    output: &'a mut dyn SerialOutput,
    position: Position,
    failed: Option<RunError>,
}

impl DiskInputs<'_> {
    fn issue(&mut self, op: DiskOp) -> Result<(), String> {
        let Some(port) = self.port else { return Err("no disk".into()) };
        if self.output.disk(self.position, &op) {
            if matches!(self.inputs, Inputs::Live(_)) {
                // Held for the backup: reads must see it meanwhile.
                port.defer(self.position.exit, &op);
            }
            return Ok(());
        }
        match self.inputs {
            Inputs::Live(_) => port.apply(&op).map_err(|e| e.to_string()),
            // A replay's writes went to the disk when they were recorded.
            Inputs::Replay(_) => Ok(()),
        }
    }
}

impl DiskIo for DiskInputs<'_> {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        if self.failed.is_some() {
            return Err("earlier failure".into());
        }
        let result = match (&mut *self.inputs, self.port) {
            (Inputs::Live(live), Some(port)) => match port.read(offset, len) {
                Ok(data) => live.record(Event::DiskRead { data: data.clone() }).map(|_| data).map_err(log_write_error),
                Err(e) => return Err(e.to_string()),
            },
            (Inputs::Replay(r), _) => r.disk_read(len).map_err(RunError::from),
            (Inputs::Live(_), None) => return Err("no disk".into()),
        };
        result.map_err(|e| {
            let text = e.to_string();
            self.failed = Some(e);
            text
        })
    }

    fn write(&mut self, offset: u64, data: Vec<u8>) -> Result<(), String> {
        self.issue(DiskOp::Write { offset, data: Arc::new(data) })
    }

    fn flush(&mut self) -> Result<(), String> {
        self.issue(DiskOp::Flush)
    }
}

/// A time reading at the current position: the virtual clock through the
/// inputs (host clock and log, or log), as wall time for the RTC. Errors are parked in `failed` (device models take
/// infallible clocks) and surface after the access.
fn take_time_reading(
    inputs: &mut Inputs,
    clock: &mut VirtualClock,
    wall_clock_base_ns: u64,
    source: TimeSource,
    failed: &mut Option<RunError>,
) -> u64 {
    if failed.is_some() {
        return clock.now_ns();
    }
    let reading = match inputs {
        Inputs::Live(live) => {
            let ns = live.host.elapsed_ns().max(clock.now_ns());
            live.record(Event::TimeRead { source, ns }).map(|_| ns).map_err(log_write_error)
        }
        Inputs::Replay(r) => r.time(source).map_err(RunError::from),
    };
    match reading {
        Ok(ns) => clock.set(ns),
        Err(e) => *failed = Some(e),
    }
    let ns = clock.now_ns();
    match source {
        TimeSource::Rtc => wall_clock_base_ns.saturating_add(ns),
        _ => ns,
    }
}

// TSC_HZ is 1 GHz, which is what lets TSC values be virtual nanoseconds.
const _: () = assert!(TSC_HZ == 1_000_000_000);
