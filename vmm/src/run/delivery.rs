//! Input delivery at positions (steps 4 and 5 of an exit): live inputs from
//! the host — serial bytes, due timers, and a wait when the guest idles — or
//! the logged events of this position in their logged order; then the
//! interrupt decision.

use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::error::{log_write_error, RunError};
use crate::inputs::{Inputs, Woken};
use crate::memory::GuestMem;
use crate::run::{Idle, Vmm};
use replay::{Event, Position, TimeSource};
use std::time::{Duration, Instant};

impl Vmm {
    /// Steps 4 and 5: external inputs and interrupt delivery at `position`.
    pub(super) fn take_inputs(&mut self, position: Position, idle: bool) -> Result<(), RunError> {
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
            match self.with_role(|role, vm| role.idling(vm, position))? {
                // (A spurious wake-up: the guest idles again.)
                Idle::Resume => return Ok(false),
                Idle::Wait { watch_peer } => self.wait_for_host_input(position, watch_peer)?,
            }
        }
    }

    /// Takes what the host has for the guest now: serial bytes the UART has
    /// room for, frames the NIC has receive buffers for, and the timer if it
    /// is due.
    fn poll_host(&mut self) -> Result<(), RunError> {
        let Inputs::Live(live) = &mut self.inputs else {
            return Ok(());
        };
        if let Some(bytes) = live.take_serial(self.devices.serial_rx_room()) {
            live.record(Event::SerialRx { bytes: bytes.clone() }).map_err(log_write_error)?;
            self.devices.serial_receive(&bytes);
        }
        // Frames: DMA into the guest's receive ring at this position.
        let mem = &self.machine.mem;
        if let Some((slot, nic)) = self.devices.nic() {
            let mut raise = false;
            while rx_ready(nic, mem) {
                let Some(frame) = live.take_frame() else { break };
                raise |= nic.with_device(mem, |net, queues| net.deliver(queues, mem, &frame));
                live.record(Event::NetRx { frame }).map_err(log_write_error)?;
            }
            if raise {
                self.devices.virtio_interrupt(slot);
            }
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

    /// The guest idles: block until the host has an input for it (waking
    /// every few milliseconds when `watch_peer`, for the role).
    fn wait_for_host_input(&mut self, position: Position, watch_backup: bool) -> Result<(), RunError> {
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
        let frames_deliverable = match self.devices.nic() {
            Some((_, nic)) => rx_ready(nic, &self.machine.mem),
            None => false,
        };
        let Inputs::Live(live) = &mut self.inputs else {
            return Ok(());
        };
        match live.wait(deadline, frames_deliverable) {
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
                Event::TimeRead { source: TimeSource::Wake, ns } if self.wake_clock_due => {
                    self.clock.set(ns);
                    self.logged_wake_ns = Some(self.clock.now_ns());
                }
                Event::TimeRead { source, .. } => {
                    return Err(self.diverged(format_args!("a time read by {source:?}"), "no device reading time"));
                }
                Event::NetRx { frame } => {
                    let mem = &self.machine.mem;
                    let mut raise = None;
                    if let Some((slot, nic)) = self.devices.nic() {
                        if rx_ready(nic, mem) {
                            raise = Some((slot, nic.with_device(mem, |net, queues| net.deliver(queues, mem, &frame))));
                        }
                    }
                    if let Some((slot, true)) = raise {
                        self.devices.virtio_interrupt(slot);
                    }
                    let delivered = raise.is_some();
                    if !delivered {
                        return Err(self.diverged(
                            format_args!("a received frame of {} bytes", frame.len()),
                            "no NIC receive buffer for it",
                        ));
                    }
                }
                Event::DiskRead { data } => {
                    return Err(self.diverged(format_args!("a disk read of {} bytes", data.len()), "no disk request"));
                }
                Event::DigestCheck { digest } => self.verify_digest_check(digest)?,
                Event::Sync(_) => {
                    return Err(self.diverged("a state sync (the next position)", "an input of this exit"));
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
}

/// Whether the guest has posted a receive buffer the NIC can fill now.
fn rx_ready(nic: &mut MmioTransport<Net>, mem: &GuestMem) -> bool {
    let mut ready = false;
    nic.with_device(mem, |net, queues| {
        ready = net.rx_ready(queues, mem);
        Ok(false)
    });
    ready
}
