//! Guest-caused exits: what KVM reports, copied out of `kvm_run`, and the
//! exits that end the VM instead (triple fault, emulation failure...).

use crate::error::RunError;
use crate::layout;
use crate::metrics::ExitClass;
use crate::run::Vmm;
use crate::vm::VmError;
use kvm_ioctls::VcpuExit;
use replay::ExitKind;

/// A guest-caused exit, copied out of `kvm_run`.
pub(super) enum GuestExit {
    IoIn {
        port: u16,
        size: u8,
        count: u32,
    },
    IoOut {
        port: u16,
        size: u8,
        data: Vec<u8>,
    },
    MmioRead {
        addr: u64,
        len: u8,
    },
    MmioWrite {
        addr: u64,
        data: [u8; 8],
        len: u8,
    },
    Hlt,
    RdMsr {
        index: u32,
    },
    WrMsr {
        index: u32,
        data: u64,
    },
    IrqWindow,
    /// Not an exit: a state sync, the next position (a live vCPU kicked
    /// after a long stretch with an interrupt due, or a sync from the log
    /// applied instead of executing).
    Sync,
}

impl GuestExit {
    pub(super) fn kind(&self) -> ExitKind {
        match *self {
            GuestExit::IoIn { port, size, .. } => ExitKind::IoIn { port, size },
            GuestExit::IoOut { port, size, .. } => ExitKind::IoOut { port, size },
            GuestExit::MmioRead { addr, len } => ExitKind::MmioRead { addr, size: len },
            GuestExit::MmioWrite { addr, len, .. } => ExitKind::MmioWrite { addr, size: len },
            GuestExit::Hlt => ExitKind::Hlt,
            GuestExit::RdMsr { index } => ExitKind::RdMsr { index },
            GuestExit::WrMsr { index, .. } => ExitKind::WrMsr { index },
            GuestExit::IrqWindow => ExitKind::IrqWindow,
            GuestExit::Sync => unreachable!("a sync is a position, not an exit: the run loop takes it apart"),
        }
    }
}

impl GuestExit {
    /// What it counts as in the metrics.
    pub(super) fn class(&self) -> ExitClass {
        match *self {
            GuestExit::IoIn { port, .. } if is_clock_port(port) => ExitClass::ClockRead,
            GuestExit::IoIn { port, .. } | GuestExit::IoOut { port, .. } if port == layout::IDLE_PORT => {
                ExitClass::Idle
            }
            GuestExit::IoOut { port, .. } if layout::PIT_PORTS.contains(&port) => ExitClass::Timer,
            GuestExit::IoIn { port, .. } | GuestExit::IoOut { port, .. } => port_class(port),
            GuestExit::MmioRead { .. } | GuestExit::MmioWrite { .. } => ExitClass::Mmio,
            GuestExit::Hlt => ExitClass::Idle,
            GuestExit::RdMsr { .. } | GuestExit::WrMsr { .. } => ExitClass::Msr,
            GuestExit::IrqWindow => ExitClass::InterruptWindow,
            GuestExit::Sync => ExitClass::Sync,
        }
    }
}

/// A port access of neither a clock read, an idle nor the timer.
fn port_class(port: u16) -> ExitClass {
    if layout::COM1_PORTS.contains(&port) {
        ExitClass::Serial
    } else if layout::PIC_MASTER_PORTS.contains(&port) || layout::PIC_SLAVE_PORTS.contains(&port) {
        ExitClass::Pic
    } else {
        ExitClass::Port
    }
}

/// The ports a guest reads the time through (an IN): the TSC port (a
/// rewritten RDTSC), the PIT's and the RTC's.
fn is_clock_port(port: u16) -> bool {
    port == layout::TSC_PORT || layout::PIT_PORTS.contains(&port) || layout::CMOS_PORTS.contains(&port)
}

impl Vmm {
    /// Runs the vCPU until the next guest-caused exit, or the next sync: a
    /// replay's from the log (before running anything), or a live run's
    /// kick.
    pub(super) fn next_exit(&mut self) -> Result<GuestExit, RunError> {
        if self.replay_sync()? {
            return Ok(GuestExit::Sync);
        }
        if let (Some(at), Some(kicker)) = (self.kick_deadline(), &self.kicker) {
            kicker.arm(at);
        }
        let exit = self.run_vcpu();
        if let Some(kicker) = &self.kicker {
            kicker.disarm();
        }
        // The threshold counts from the last exit, not the last sync: a
        // guest that has not exited for that long gets each later interrupt
        // as it falls due.
        if !matches!(exit, Ok(GuestExit::Sync)) {
            self.stretch_started = std::time::Instant::now();
        }
        exit
    }

    /// Runs the vCPU until a guest-caused exit or a kick that calls for a sync.
    fn run_vcpu(&mut self) -> Result<GuestExit, RunError> {
        loop {
            let exit = match self.machine.vcpu.run() {
                Ok(exit) => exit,
                // A signal: not a position; a sync if an interrupt is due
                // after a long stretch, else nothing to do but resume.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if self.sync_due() {
                        return Ok(GuestExit::Sync);
                    }
                    continue;
                }
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
                VcpuExit::Intr => {
                    if self.sync_due() {
                        return Ok(GuestExit::Sync);
                    }
                    continue;
                }
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
}
