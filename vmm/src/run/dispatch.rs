//! Exit dispatch: each guest-caused exit goes to the device or handler that
//! owns it — port I/O to the port bus, MMIO to the virtio transport (and a
//! queue notification to its device), MSRs and the TSC port to the virtual
//! clock — with the time readings and disk reads it needs taken through the
//! run's inputs (live and logged, or from the log).

use crate::clock::VirtualClock;
use crate::devices::virtio::block::{DiskIo, DiskIoError};
use crate::devices::virtio::net::NetIo;
use crate::devices::{MmioAction, PortAction, VirtioSlot};
use crate::error::{log_write_error, RunError};
use crate::host::disk::{DiskOp, DiskPort, OpSeq};
use crate::inputs::Inputs;
use crate::layout;
use crate::output::Outputs;
use crate::run::exit::GuestExit;
use crate::run::Vmm;
use crate::vm::{VmError, MSR_IA32_TSC};
use replay::{Event, Position, TimeSource};
use std::sync::Arc;

impl Vmm {
    /// Step 2: the device model (or handler) that owns `exit` answers it.
    pub(super) fn dispatch(&mut self, exit: GuestExit, position: Position) -> Result<PortAction, RunError> {
        let mut action = PortAction::None;
        match exit {
            GuestExit::IoIn { port, size, count } => {
                let mut data = vec![0u8; usize::from(size) * count as usize];
                if port == layout::TSC_PORT && size == 4 {
                    let tsc = self.read_time(TimeSource::Rdtsc)?;
                    // A rewritten RDTSC gets RDTSC's EDX too. (A string IN
                    // of more than 4 bytes reads zeros after the first.)
                    data[..4].copy_from_slice(&(tsc as u32).to_le_bytes());
                    self.answer_tsc(&data, tsc, self.rdtsc_sites.contains(&position.rip))?;
                } else if port == layout::IDLE_PORT && size == 4 && count == 2 {
                    // An idle that wants the time it wakes at: answered
                    // once the wait is over ([`Vmm::answer_wake_clock`]).
                    self.wake_clock_due = true;
                    action = PortAction::Idle;
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
                let mut data = [0u8; 8];
                self.devices.mmio_read(addr, &mut data[..usize::from(len.min(8))]);
                self.machine.complete_mmio_read(&data);
            }
            GuestExit::MmioWrite { addr, data, len } => {
                if let MmioAction::QueueNotify { slot, queue } =
                    self.devices.mmio_write(addr, &data[..usize::from(len)])
                {
                    self.queue_notify(slot, queue, position)?;
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
            GuestExit::IrqWindow | GuestExit::Sync => {}
        }
        Ok(action)
    }

    /// The guest notified queue `queue` of the virtio device in `slot`: the
    /// device does its work now, at this position.
    fn queue_notify(&mut self, slot: usize, queue: usize, position: Position) -> Result<(), RunError> {
        // A backup whose log ends inside a disk read goes live right after
        // this exit: it performs the read itself ([`DiskInputs::read`]).
        let may_go_live = self.role.may_go_live();
        let Vmm { devices, inputs, machine, disk: port, output, die_before_disk_read, .. } = self;
        let raise = match devices.virtio.get_mut(slot) {
            Some(VirtioSlot::Block(disk)) => {
                // Reads from the disk and logged, or from the log.
                let mut io = DiskInputs {
                    inputs,
                    port: port.as_ref(),
                    output: output.as_mut(),
                    position,
                    failed: None,
                    may_go_live,
                    log_ended: None,
                    die_before_read: die_before_disk_read,
                };
                let raise = disk.notify(queue, &machine.mem, &mut io);
                if let Some(e) = io.failed.or(io.log_ended) {
                    self.end_of_log(e)?;
                }
                self.disk_served_at = position.exit;
                raise
            }
            Some(VirtioSlot::Net(nic)) => {
                // Transmitted frames are outputs of this position.
                let mut sent = SentFrames(Vec::new());
                let raise = nic.notify(queue, &machine.mem, &mut sent);
                for frame in sent.0 {
                    output.frame(position, frame);
                }
                raise
            }
            Some(VirtioSlot::Console(console)) => {
                // Transmitted bytes join the UART's in the console output of
                // this position: the same output rule, suppression on a
                // replay and re-emit at go-live.
                let mut bytes = Vec::new();
                let raise = console.notify(queue, &machine.mem, &mut bytes);
                devices.tx.push(&bytes);
                raise
            }
            None => false,
        };
        if raise {
            self.devices.virtio_interrupt(slot);
        }
        Ok(())
    }

    /// Before an exit's own work: the NIC transmits what the guest queued
    /// since its last exit without notifying
    /// ([`crate::devices::virtio::net::Net::poll`]).
    ///
    /// Those frames are what the guest wrote before it stopped at this
    /// exit, so they depend on the inputs of the exits before it only —
    /// none of this exit's, which are all taken after this (hence before
    /// dispatch, whose DMA could change the ring). So they are outputs of
    /// the previous exit: released once the backup has the log through it,
    /// which it gets while the guest idles here ([`Vmm::wait_for_host_input`]
    /// passes the previous exit). Stamped with this exit, a reply sent at
    /// an idle would wait for the next input to end the idle: for the next
    /// request, which waits for the reply.
    pub(super) fn poll_nic(&mut self, position: Position) {
        let Vmm { devices, machine, output, .. } = self;
        let Some((slot, nic)) = devices.nic() else { return };
        let mut sent = SentFrames(Vec::new());
        let raise = nic.with_device(&machine.mem, |net, queues| net.poll(queues, &machine.mem, &mut sent));
        let before = Position { exit: position.exit.saturating_sub(1), ..position };
        for frame in sent.0 {
            output.frame(before, frame);
        }
        if raise {
            devices.virtio_interrupt(slot);
        }
    }

    /// After an exit's own work: a disk whose last notification left
    /// requests in its ring (over one exit's budget) serves the next share
    /// of them at this exit, the same on a replay.
    pub(super) fn serve_disk_backlog(&mut self, position: Position) -> Result<(), RunError> {
        if self.disk_served_at == position.exit {
            return Ok(());
        }
        let slot = self
            .devices
            .virtio
            .iter()
            .position(|v| matches!(v, VirtioSlot::Block(disk) if disk.device().has_backlog()));
        match slot {
            Some(slot) => self.queue_notify(slot, 0, position),
            None => Ok(()),
        }
    }

    /// Reads the virtual clock for `source` at the current position.
    /// Completes an IN of the TSC with `data` (its low half first): EAX
    /// gets the low half (zero-extended) and, with `edx`, EDX the high
    /// half of `tsc`, as RDTSC would.
    fn answer_tsc(&mut self, data: &[u8], tsc: u64, edx: bool) -> Result<(), RunError> {
        self.machine.complete_io_in(data);
        if edx {
            // Once the IN has completed: setting registers earlier would
            // race KVM's completion of the emulated IN.
            self.machine.complete_pending_io()?;
            let mut regs =
                self.machine.vcpu.get_regs().map_err(|err| VmError::Kvm { what: "reading registers", err })?;
            regs.rdx = tsc >> 32;
            self.machine.vcpu.set_regs(&regs).map_err(|err| VmError::Kvm { what: "setting registers", err })?;
        }
        Ok(())
    }

    /// The guest idled with a string read of two doublewords from the idle
    /// port (`rep insd`) and has been woken (its interrupt, if any,
    /// injected): it gets the virtual TSC of now, a time reading logged
    /// after that interrupt — on a replay, the one [`Vmm::take_inputs`]
    /// found there. KVM stores the 8 bytes in guest memory as it completes
    /// the exit: no register ioctls (a 32-bit IN's EDX would take three,
    /// each a vcpu_load on a nested host).
    pub(super) fn answer_wake_clock(&mut self) -> Result<(), RunError> {
        let tsc = match self.logged_wake_ns.take() {
            Some(ns) => ns,
            None => self.read_time(TimeSource::Wake)?,
        };
        self.machine.complete_io_in(&tsc.to_le_bytes());
        Ok(())
    }

    pub(super) fn read_time(&mut self, source: TimeSource) -> Result<u64, RunError> {
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
}

/// The frames the guest transmitted at the current exit.
struct SentFrames(Vec<Vec<u8>>);

impl NetIo for SentFrames {
    fn transmit(&mut self, frame: Vec<u8>) {
        self.0.push(frame);
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
    output: &'a mut dyn Outputs,
    position: Position,
    failed: Option<RunError>,
    /// A backup that goes live when its log ends.
    may_go_live: bool,
    /// Its log ended inside this exit: it goes live after it.
    log_ended: Option<RunError>,
    /// Testing aid: reads before this primary dies.
    die_before_read: &'a mut Option<u64>,
}

impl DiskInputs<'_> {
    fn issue(&mut self, seq: OpSeq, op: DiskOp) -> Result<(), DiskIoError> {
        let Some(port) = self.port else { return Err(DiskIoError::NoDisk) };
        if self.output.holds_disk() {
            if matches!(self.inputs, Inputs::Live(_)) {
                // Reads must see it until it is applied; recorded before
                // the gate can release it to the writer.
                port.defer(seq, &op);
            }
            self.output.disk(self.position, seq, &op);
            return Ok(());
        }
        match self.inputs {
            Inputs::Live(_) => Ok(port.apply(&op)?),
            // A replay's writes went to the disk when they were recorded.
            Inputs::Replay(_) => Ok(()),
        }
    }

    /// A backup whose primary died before logging this read: the data the
    /// guest must see is the storage with the writes this backup keeps (and
    /// re-issues when it goes live) laid over. Nothing the primary applied
    /// can be missing from the two: it applies a write only once this
    /// backup acknowledged its exit, and this exit it never acknowledged.
    /// The storage is retried until it answers, as going live would.
    fn read_for_going_live(&mut self, port: &DiskPort, offset: u64, len: usize) -> Vec<u8> {
        let mut reported = false;
        loop {
            match port.read(offset, len) {
                Ok(mut data) => {
                    self.output.lay_kept_writes(offset, &mut data);
                    return data;
                }
                Err(e) => {
                    if !reported {
                        eprintln!("ftvmm: backup: cannot read the disk to go live ({e}); retrying");
                        reported = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
    }
}

impl DiskIo for DiskInputs<'_> {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, DiskIoError> {
        if self.failed.is_some() {
            return Err(DiskIoError::EarlierFailure);
        }
        let port = self.port;
        if let (Some(_), Some(port)) = (&self.log_ended, port) {
            return Ok(self.read_for_going_live(port, offset, len));
        }
        let result = match (&mut *self.inputs, port) {
            (Inputs::Live(live), Some(port)) => match port.read(offset, len) {
                Ok(_) if testing_dies_now(self.die_before_read) => {
                    // Everything logged so far goes to the backup, this
                    // read's data not: then the host "dies".
                    if let Some(r) = &mut live.recorder {
                        let _ = r.flush();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    eprintln!("ftvmm: testing: the primary dies before logging a disk read");
                    std::process::exit(137);
                }
                Ok(data) => live.record(Event::DiskRead { data: data.clone() }).map(|_| data).map_err(log_write_error),
                Err(e) => return Err(DiskIoError::Storage(e)),
            },
            (Inputs::Replay(r), _) => match r.disk_read(len).map_err(RunError::from) {
                Err(e @ RunError::EndOfLog { .. }) if self.may_go_live && port.is_some() => {
                    self.log_ended = Some(e);
                    return self.read(offset, len);
                }
                other => other,
            },
            (Inputs::Live(_), None) => return Err(DiskIoError::NoDisk),
        };
        result.map_err(|e| {
            let error = DiskIoError::Log(e.to_string());
            self.failed = Some(e);
            error
        })
    }

    fn write(&mut self, op: u64, offset: u64, data: Vec<u8>) -> Result<(), DiskIoError> {
        self.issue(op, DiskOp::Write { offset, data: Arc::new(data) })
    }

    fn flush(&mut self, op: u64) -> Result<(), DiskIoError> {
        self.issue(op, DiskOp::Flush)
    }
}

/// Counts a disk read down on `left`; true when it reaches zero.
fn testing_dies_now(left: &mut Option<u64>) -> bool {
    match left {
        Some(n) => {
            *n -= 1;
            *n == 0
        }
        None => false,
    }
}

/// A time reading at the current position: the virtual clock through the
/// inputs (host clock and log, or log), as wall time for the RTC. Errors are parked in `failed` (device models take
/// infallible clocks) and surface after the access.
pub(super) fn take_time_reading(
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
