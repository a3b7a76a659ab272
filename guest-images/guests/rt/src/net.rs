//! TCP/IP for guests: smoltcp (no heap) over the virtio-net driver, with
//! the VM's virtual clock as its clock and the PIT as its timer.
//!
//! - [`NetDevice`]: smoltcp's `Device` over [`virtio_net::Nic`].
//! - [`IpConfig::from_cmdline`]: `ip=A.B.C.D/N` and optional `gw=A.B.C.D`.
//! - [`Stack`]: the interface, [`Stack::poll`] and [`Stack::idle`], and
//!   [`Stack::run`], a server's whole main loop.
//!
//! Time: ftvmm turns each RDTSC into an exit answered from the virtual clock
//! (1 GHz), so [`now`] is virtual time and every smoltcp timer (retransmits,
//! delayed ACKs, TIME-WAIT) replays exactly on a backup. Reading it costs an
//! exit, so the loop reads it once per round, and not at all in a round
//! that follows an idle: the idle exit answers the time it woke at.
//!
//! Idling: when smoltcp has nothing to do, PIT channel 0 is armed as a
//! one-shot for smoltcp's next deadline (at most 65535 PIT ticks, about
//! 55 ms, ahead: a later deadline just takes several shots) and the guest
//! waits for an interrupt, the NIC's or the timer's.

use crate::hw;
use crate::virtio_net::{self, Nic, RxFrame, MAX_FRAME};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

pub use smoltcp;

/// The virtual clock as smoltcp time.
pub fn now() -> Instant {
    tsc_instant(hw::rdtsc())
}

/// A virtual TSC reading as smoltcp time.
fn tsc_instant(tsc: u64) -> Instant {
    // The TSC counts virtual nanoseconds under ftvmm (TSC_HZ = 1 GHz).
    Instant::from_micros((tsc / 1000) as i64)
}

/// smoltcp's view of the network card.
pub struct NetDevice {
    nic: Nic,
    /// Where a frame goes that finds the transmit ring full after all (it
    /// is dropped, and TCP retransmits it).
    scratch: [u8; MAX_FRAME],
    dropped: u64,
    runts: u64,
}

/// An Ethernet header: anything shorter is no frame.
const MIN_FRAME: usize = 14;

impl NetDevice {
    pub fn new(nic: Nic) -> Self {
        NetDevice { nic, scratch: [0; MAX_FRAME], dropped: 0, runts: 0 }
    }

    pub fn nic(&mut self) -> &mut Nic {
        &mut self.nic
    }

    /// Frames dropped because the transmit ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Received buffers that held no frame (the device could not use them).
    pub fn runts(&self) -> u64 {
        self.runts
    }
}

/// A received frame for smoltcp; its buffer goes back to the device when
/// the token is consumed or dropped.
pub struct NetRxToken<'a> {
    rx: &'a mut virtio_net::Rx,
    frame: Option<RxFrame>,
}

/// A transmit buffer for smoltcp.
pub struct NetTxToken<'a> {
    tx: &'a mut virtio_net::Tx,
    scratch: &'a mut [u8; MAX_FRAME],
    dropped: &'a mut u64,
}

impl phy::Device for NetDevice {
    type RxToken<'a> = NetRxToken<'a>;
    type TxToken<'a> = NetTxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NetRxToken<'_>, NetTxToken<'_>)> {
        if !self.nic.rx.pending() || !self.nic.tx.reserve() {
            return None;
        }
        let frame = loop {
            let frame = self.nic.rx.take()?;
            // The device completes a buffer it could not use with length 0.
            if frame.len() >= MIN_FRAME {
                break frame;
            }
            self.runts += 1;
            self.nic.rx.repost(frame);
        };
        let rx = NetRxToken { rx: &mut self.nic.rx, frame: Some(frame) };
        let tx = NetTxToken { tx: &mut self.nic.tx, scratch: &mut self.scratch, dropped: &mut self.dropped };
        Some((rx, tx))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<NetTxToken<'_>> {
        if !self.nic.tx.reserve() {
            return None;
        }
        Some(NetTxToken { tx: &mut self.nic.tx, scratch: &mut self.scratch, dropped: &mut self.dropped })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

impl phy::RxToken for NetRxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        let frame = self.frame.take().expect("an unconsumed token holds its frame");
        let result = f(self.rx.frame(&frame));
        self.rx.repost(frame);
        result
    }
}

impl Drop for NetRxToken<'_> {
    fn drop(&mut self) {
        if let Some(frame) = self.frame.take() {
            self.rx.repost(frame);
        }
    }
}

impl phy::TxToken for NetTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        if let Some(result) = self.tx.send(len, |buf| (f.take().expect("called once"))(buf)) {
            return result;
        }
        // No buffer after all (the token was made when there was one).
        *self.dropped += 1;
        let len = len.min(MAX_FRAME);
        (f.take().expect("not called yet"))(&mut self.scratch[..len])
    }
}

/// The interface's address, from the command line.
#[derive(Clone, Copy, Debug)]
pub struct IpConfig {
    pub address: Ipv4Cidr,
    pub gateway: Option<Ipv4Address>,
}

/// What is wrong with the command line's network settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpConfigError {
    /// No `ip=`.
    Missing,
    /// `ip=` is not `A.B.C.D/N`.
    BadAddress,
    /// `gw=` is not `A.B.C.D`.
    BadGateway,
}

impl IpConfig {
    /// `ip=A.B.C.D/N` (required) and `gw=A.B.C.D` (optional) from the
    /// command line.
    pub fn from_cmdline() -> Result<IpConfig, IpConfigError> {
        let ip = crate::cmdline_str("ip").ok_or(IpConfigError::Missing)?;
        let address = parse_cidr(ip).ok_or(IpConfigError::BadAddress)?;
        let gateway = match crate::cmdline_str("gw") {
            Some(gw) => Some(parse_ipv4(gw).ok_or(IpConfigError::BadGateway)?),
            None => None,
        };
        Ok(IpConfig { address, gateway })
    }
}

/// `A.B.C.D/N`.
pub fn parse_cidr(text: &[u8]) -> Option<Ipv4Cidr> {
    let slash = text.iter().position(|&b| b == b'/')?;
    let prefix = parse_decimal(&text[slash + 1..])?;
    if prefix > 32 {
        return None;
    }
    Some(Ipv4Cidr::new(parse_ipv4(&text[..slash])?, prefix as u8))
}

/// `A.B.C.D`.
pub fn parse_ipv4(text: &[u8]) -> Option<Ipv4Address> {
    let mut octets = [0u8; 4];
    let mut parts = text.split(|&b| b == b'.');
    for octet in &mut octets {
        *octet = u8::try_from(parse_decimal(parts.next()?)?).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Address::from(octets))
}

fn parse_decimal(text: &[u8]) -> Option<u32> {
    if text.is_empty() || text.len() > 3 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(text.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')))
}

/// Whether PIT channel 0 has a one-shot pending (cleared when it fires).
static TIMER_ARMED: AtomicBool = AtomicBool::new(false);
/// One-shots that have fired.
static TIMER_SHOTS: AtomicU64 = AtomicU64::new(0);

fn on_timer(_irq: u8) {
    TIMER_ARMED.store(false, Ordering::Release);
    TIMER_SHOTS.fetch_add(1, Ordering::AcqRel);
}

/// A snapshot of what can wake the stack besides received frames (which
/// are in memory): how often the timer has fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wakeups {
    timer_shots: u64,
}

/// What a server's service step reports to [`Stack::run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// It moved data: poll the stack again before idling.
    Busy,
    /// Nothing to do until the network brings something.
    Idle,
    /// Stop with this exit status.
    Exit(u8),
}

/// The TCP/IP interface over the network card.
pub struct Stack {
    pub iface: Interface,
    pub device: NetDevice,
    mac: [u8; 6],
    /// When the pending one-shot fires (valid while TIMER_ARMED).
    timer_deadline: Instant,
}

impl Stack {
    /// The interface with `config`'s address and default route on `nic`;
    /// installs the PIT's interrupt handler (after `hw::pic_init`).
    pub fn new(nic: Nic, config: &IpConfig) -> Stack {
        let mac = nic.mac();
        let mut device = NetDevice::new(nic);
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        // Initial sequence numbers and ephemeral ports: the virtual clock is
        // a logged input, so a backup draws the same ones.
        iface_config.random_seed =
            hw::rdtsc() ^ u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]);
        let mut iface = Interface::new(iface_config, &mut device, now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::Ipv4(config.address));
        });
        if let Some(gateway) = config.gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        }
        crate::set_irq_handler(0, on_timer);
        hw::pic_unmask(0);
        Stack { iface, device, mac, timer_deadline: Instant::ZERO }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// One round of the stack at `now`: every received frame in, whatever
    /// the sockets have to send out, then one notify for the batch.
    pub fn poll(&mut self, now: Instant, sockets: &mut SocketSet<'_>) -> PollResult {
        let result = self.iface.poll(now, &mut self.device, sockets);
        self.device.nic().flush();
        result
    }

    /// A snapshot of the stack's wake-up sources, to take before a round
    /// of polling and pass to [`Self::idle`] after it.
    pub fn wakeups(&self) -> Wakeups {
        Wakeups { timer_shots: TIMER_SHOTS.load(Ordering::Acquire) }
    }

    /// Waits for an interrupt unless there is work already: a frame is
    /// waiting, the timer fired since `seen` was taken (before the caller
    /// last polled), or smoltcp wants a poll now. Arms the PIT for
    /// smoltcp's next deadline first.
    ///
    /// Only the network and the timer count as work: an interrupt for
    /// something else (the NIC completing transmits, say) does not keep
    /// the guest from idling.
    ///
    /// Returns the time it woke at if it waited (the idle exit answers it),
    /// so that the next round needs no clock read of its own.
    pub fn idle(&mut self, now: Instant, sockets: &SocketSet<'_>, seen: Wakeups) -> Option<Instant> {
        match self.iface.poll_delay(now, sockets) {
            Some(Duration::ZERO) => return None,
            Some(delay) => self.arm_timer(now, delay),
            None => {}
        }
        // The PIT writes were exits, where frames and the timer may have
        // come: check after them. After this check the only exit is the
        // idle port read itself, which wakes on any later interrupt.
        if self.wakeups() != seen || self.device.nic().rx.pending() {
            return None;
        }
        Some(tsc_instant(crate::wait_for_interrupt_clock()))
    }

    /// Arms the one-shot for `now + delay`, unless one that fires no later
    /// is pending already (waking early only costs a poll).
    fn arm_timer(&mut self, now: Instant, delay: Duration) {
        let wanted = now + delay;
        if TIMER_ARMED.load(Ordering::Acquire) && self.timer_deadline <= wanted {
            return;
        }
        let ticks = (delay.total_micros().saturating_mul(hw::PIT_HZ).div_ceil(1_000_000)).clamp(1, 0xffff);
        // Armed before the writes: a previous shot that fires during them
        // clears it, which costs at most a needless re-arm later.
        TIMER_ARMED.store(true, Ordering::Release);
        hw::pit_one_shot(ticks as u16);
        self.timer_deadline = now + Duration::from_micros(ticks * 1_000_000 / hw::PIT_HZ);
    }

    /// A server's main loop: poll, let `service` work on the sockets (again
    /// and again while it is busy), idle when it is not. Returns the status
    /// `service` asks to exit with.
    pub fn run(
        &mut self,
        sockets: &mut SocketSet<'_>,
        mut service: impl FnMut(&mut SocketSet<'_>, Instant) -> Service,
    ) -> u8 {
        let mut woke_at = None;
        loop {
            let seen = self.wakeups();
            // After an idle, the time it woke at is now enough: nothing
            // ran since but the interrupt handler.
            let now = woke_at.take().unwrap_or_else(now);
            self.poll(now, sockets);
            loop {
                match service(sockets, now) {
                    Service::Busy => {
                        self.poll(now, sockets);
                    }
                    Service::Idle => break,
                    Service::Exit(status) => {
                        // What the last round queued (replies, the FINs or
                        // resets of connections it closed) goes out first.
                        self.poll(now, sockets);
                        return status;
                    }
                }
            }
            woke_at = self.idle(now, sockets, seen);
        }
    }
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub struct MacDisplay(pub [u8; 6]);

impl core::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}
