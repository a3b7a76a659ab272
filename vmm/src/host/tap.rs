//! The NIC's outside world: a host TAP device, created and bridged by the
//! host beforehand (`ip tuntap add dev IFNAME mode tap`), as Firecracker and
//! QEMU's `-netdev tap,script=no` expect. ftvmm only attaches to it, never
//! creates one.
//!
//! - [`Tap::open`] attaches to an existing single-queue TAP (no packet-info
//!   prefix, no vnet header: the device model offers no offloads), with a
//!   distinct error for each way the interface can be wrong.
//! - [`Tap::split`] gives a [`TapRx`] — a host thread reading frames into a
//!   bounded queue that the run loop drains at positions (full: the frame is
//!   dropped, as a NIC drops) — and a [`TapTx`] that writes frames released
//!   by the output rule.
//! - [`NetSpec`] is the `--net` flag's value, [`rarp_announce`] the frame a
//!   side going live sends so that the LAN's switches learn where the VM's
//!   MAC went.

use crate::devices::virtio::net::{MAX_FRAME, MIN_FRAME};
use crate::mac::{format_mac, parse_mac, DEFAULT_MAC};
use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest interface name (IFNAMSIZ less its NUL).
pub const IFNAME_MAX: usize = 15;

/// Why a TAP device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid interface name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("no network interface {0}: create the TAP device first (ip tuntap add dev {0} mode tap)")]
    NotFound(String),
    #[error("network interface {0} is not a TAP device (it is no tun/tap interface at all)")]
    NotTap(String),
    #[error("network interface {0} is a TUN device; ftvmm needs a TAP device (ip tuntap add dev {0} mode tap)")]
    IsTun(String),
    #[error("TAP device {0} is multi-queue; ftvmm needs a single-queue TAP (ip tuntap add dev {0} mode tap)")]
    MultiQueue(String),
    #[error("TAP device {0} is busy: another process has it attached already")]
    Busy(String),
    #[error(
        "no permission to attach TAP device {0}: it needs CAP_NET_ADMIN, or access to /dev/net/tun and to be the TAP's owner or group"
    )]
    PermissionDenied(String),
    #[error("cannot open /dev/net/tun (is the tun driver there?): {0}")]
    NoTunDriver(io::Error),
    #[error("TAP device {ifname}: {what}: {err}")]
    Io { ifname: String, what: &'static str, err: io::Error },
}

/// Checks `name` as the kernel's `dev_valid_name` does: not empty, at most
/// [`IFNAME_MAX`] bytes, not `.` or `..`, no `/`, `:`, whitespace or NUL.
pub fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > IFNAME_MAX {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("not a name");
    }
    if name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace()) {
        return Err("has '/', ':', whitespace or NUL in it");
    }
    Ok(())
}

/// Parses the value of `/sys/class/net/IFNAME/tun_flags` ("0x1002").
fn parse_tun_flags(s: &str) -> Option<i32> {
    let s = s.trim();
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    i32::from_str_radix(hex, 16).ok()
}

/// An attached TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn io_error<'a>(ifname: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> TapError + 'a {
    move |err| TapError::Io { ifname: ifname.to_string(), what, err }
}

impl Tap {
    /// Attaches to the existing TAP device `ifname`, in this process's
    /// network namespace.
    ///
    /// Checked beforehand through `/sys/class/net/IFNAME`: that it exists,
    /// is a tun/tap device, a TAP, and single-queue. TUNSETIFF creates a
    /// missing device (given CAP_NET_ADMIN) and has no attach-only flag
    /// (IFF_TUN_EXCL is the opposite: it refuses an existing device), so a
    /// device that vanished since the check — or a sysfs mounted for
    /// another namespace — could still be created by the attach. Such a
    /// device is not persistent (every `ip tuntap add` device is): it is
    /// refused as missing, and vanishes again as the descriptor closes.
    pub fn open(ifname: &str) -> Result<Tap, TapError> {
        check_ifname(ifname).map_err(|why| TapError::BadName { name: ifname.to_string(), why })?;
        let sys = Path::new("/sys/class/net").join(ifname);
        match fs::symlink_metadata(&sys) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TapError::NotFound(ifname.to_string())),
            Err(e) => return Err(io_error(ifname, "reading /sys/class/net")(e)),
        }
        let flags = match fs::read_to_string(sys.join("tun_flags")) {
            Ok(s) => parse_tun_flags(&s).ok_or_else(|| {
                io_error(ifname, "reading tun_flags")(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected contents {:?}", s.trim()),
                ))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TapError::NotTap(ifname.to_string())),
            Err(e) => return Err(io_error(ifname, "reading tun_flags")(e)),
        };
        if flags & libc::IFF_TAP == 0 {
            return Err(if flags & libc::IFF_TUN != 0 {
                TapError::IsTun(ifname.to_string())
            } else {
                TapError::NotTap(ifname.to_string())
            });
        }
        if flags & libc::IFF_MULTI_QUEUE != 0 {
            return Err(TapError::MultiQueue(ifname.to_string()));
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => TapError::PermissionDenied(ifname.to_string()),
                _ => TapError::NoTunDriver(e),
            })?;
        let fd = OwnedFd::from(file);
        let mut ifr = ifreq(ifname);
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update) a `struct ifreq`; `ifr`
        // is one, alive and exclusively borrowed for the call, and `fd` is
        // an open /dev/net/tun descriptor.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) } < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(ifname.to_string()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(ifname.to_string()),
                Some(libc::EINVAL) => TapError::Io {
                    ifname: ifname.to_string(),
                    what: "attaching (TUNSETIFF; a TAP of another kind, multi-queue say?)",
                    err,
                },
                _ => io_error(ifname, "attaching (TUNSETIFF)")(err),
            });
        }
        let mut got = ifreq(ifname);
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `got`, which is
        // one, alive and exclusively borrowed for the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut got as *mut libc::ifreq) } < 0 {
            return Err(io_error(ifname, "reading its flags (TUNGETIFF)")(io::Error::last_os_error()));
        }
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = i32::from(unsafe { got.ifr_ifru.ifru_flags });
        if flags & libc::IFF_PERSIST == 0 {
            // Created by this very attach: it had not existed here. Closing
            // `fd` removes it again.
            return Err(TapError::NotFound(ifname.to_string()));
        }
        // No offloads: a persistent TAP keeps those a previous user turned
        // on, and with them the kernel would hand over oversized (GSO) or
        // unchecksummed frames that a guest without offloads cannot take.
        // SAFETY: TUNSETOFFLOAD takes an integer argument, no pointer.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(io_error(ifname, "turning offloads off (TUNSETOFFLOAD)")(io::Error::last_os_error()));
        }
        Ok(Tap { fd, name: ifname.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Splits the device into its receiving side, a host thread that reads
    /// frames into a queue of at most `capacity` frames and calls `wake`
    /// after queuing each, and its transmitting side.
    pub fn split(self, capacity: usize, wake: Box<dyn Fn() + Send>) -> Result<(TapRx, TapTx), TapError> {
        // SAFETY: eventfd takes no pointers; the descriptor it returns, if
        // any, is new and owned by nothing else.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io_error(&self.name, "creating the reader's stop eventfd")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a valid descriptor that nothing else owns.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let fd = Arc::new(self.fd);
        let shared = Arc::new(RxShared {
            queue: Mutex::new(RxQueue { frames: VecDeque::new(), discard: false }),
            capacity,
            full: AtomicU64::new(0),
            bad_size: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
        });
        let reader = Reader { fd: Arc::clone(&fd), stop: Arc::clone(&stop), shared: Arc::clone(&shared), wake };
        let thread = std::thread::Builder::new()
            .name(format!("tap-rx-{}", self.name))
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Nic);
                reader.run()
            })
            .map_err(io_error(&self.name, "starting its reader thread"))?;
        let rx = TapRx { shared, stop, thread: Some(thread) };
        let tx = TapTx { fd, counters: Arc::new(TxCounters::default()) };
        Ok((rx, tx))
    }
}

/// A `struct ifreq` naming `ifname` (checked: at most 15 bytes, no NUL).
fn ifreq(ifname: &str) -> libc::ifreq {
    // SAFETY: `struct ifreq` is plain old data (a name and a union of
    // integers, addresses and pointers) for which all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes().iter().take(IFNAME_MAX)) {
        *dst = src as libc::c_char;
    }
    ifr
}

/// What the receiving side shares with its reader thread.
struct RxShared {
    queue: Mutex<RxQueue>,
    capacity: usize,
    full: AtomicU64,
    bad_size: AtomicU64,
    discarded: AtomicU64,
}

/// The queue, and whether it takes frames: one lock, so that no frame is
/// queued after discard mode was turned on.
struct RxQueue {
    frames: VecDeque<Vec<u8>>,
    discard: bool,
}

impl RxShared {
    fn queue(&self) -> MutexGuard<'_, RxQueue> {
        // A panic elsewhere while holding the lock leaves a queue of whole
        // frames: still good.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The receiving side: frames the TAP delivered, oldest first.
pub struct TapRx {
    shared: Arc<RxShared>,
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl TapRx {
    /// The oldest queued frame.
    pub fn pop(&self) -> Option<Vec<u8>> {
        self.shared.queue().frames.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.queue().frames.is_empty()
    }

    /// Frames dropped so far: because the queue was full, and because they
    /// were shorter than 14 or longer than 1518 bytes.
    pub fn dropped(&self) -> (u64, u64) {
        (self.shared.full.load(Ordering::Relaxed), self.shared.bad_size.load(Ordering::Relaxed))
    }

    /// Frames discarded in discard mode (those queued when it was turned on
    /// included).
    pub fn discarded(&self) -> u64 {
        self.shared.discarded.load(Ordering::Relaxed)
    }

    /// Discard mode, for a backup while it replays: the TAP is still
    /// drained, but what arrives is discarded, not queued; turning it on
    /// also discards what is queued. A backup going live turns it off.
    pub fn set_discard(&self, discard: bool) {
        let mut queue = self.shared.queue();
        queue.discard = discard;
        if discard {
            self.shared.discarded.fetch_add(queue.frames.len() as u64, Ordering::Relaxed);
            queue.frames.clear();
        }
    }
}

impl Drop for TapRx {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer of 8 to the eventfd.
        // It cannot fail (the counter is far from overflowing); if it did,
        // the reader would not learn to stop, so it is left running rather
        // than joined forever.
        let n = unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n == one.len() as isize {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The reader thread's part.
struct Reader {
    fd: Arc<OwnedFd>,
    stop: Arc<OwnedFd>,
    shared: Arc<RxShared>,
    wake: Box<dyn Fn() + Send>,
}

/// The back-off after an error, doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Frames read in one go before looking at the stop signal again.
const BURST: usize = 64;

enum Woken {
    Stop,
    Readable,
    /// An error on the TAP (POLLERR: its interface went away, say).
    Error,
}

impl Reader {
    fn run(self) {
        // Larger than any frame a TAP can hold (its MTU is at most 65535),
        // so an oversized frame is seen whole and counted, never truncated.
        let mut buf = vec![0u8; 65536 + 64];
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.wait(None) {
                Woken::Stop => return,
                Woken::Error => {
                    if self.back_off(&mut backoff) {
                        return;
                    }
                    continue;
                }
                Woken::Readable => {}
            }
            for _ in 0..BURST {
                // SAFETY: reads at most `buf.len()` bytes into `buf`, which
                // is alive and exclusively borrowed for the call.
                let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n >= 0 {
                    backoff = BACKOFF_MIN;
                    // A TAP reports a frame's whole length even when it did
                    // not fit; clamp, and such a frame is oversized anyway.
                    let len = (n as usize).min(buf.len());
                    self.take(&buf[..len], n as usize);
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    // EIO (no carrier), EBADFD (interface gone) and the rest:
                    // wait, then look again, without spinning.
                    _ => {
                        if self.back_off(&mut backoff) {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// One frame read from the TAP, `len` bytes long as the TAP said.
    fn take(&self, frame: &[u8], len: usize) {
        {
            let mut queue = self.shared.queue();
            if queue.discard {
                self.shared.discarded.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !(MIN_FRAME..=MAX_FRAME).contains(&len) || frame.len() != len {
                self.shared.bad_size.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if queue.frames.len() >= self.shared.capacity {
                self.shared.full.fetch_add(1, Ordering::Relaxed);
                return;
            }
            queue.frames.push_back(frame.to_vec());
        }
        (self.wake)();
    }

    /// Waits for the TAP to be readable (unless `timeout` is given: then
    /// only for the stop signal, at most that long).
    fn wait(&self, timeout: Option<Duration>) -> Woken {
        let mut fds = [
            libc::pollfd { fd: self.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let (nfds, ms) = match timeout {
            Some(t) => (1, t.as_millis().min(i32::MAX as u128) as libc::c_int),
            None => (2, -1),
        };
        // SAFETY: `fds` is an array of `nfds` (at most 2) pollfds, alive and
        // exclusively borrowed for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
        if r < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => Woken::Readable,
                _ => Woken::Error,
            };
        }
        if fds[0].revents != 0 {
            return Woken::Stop;
        }
        if timeout.is_none() && fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Woken::Error;
        }
        Woken::Readable
    }

    /// Sleeps for the back-off (doubling it), or until told to stop:
    /// returns whether to stop.
    fn back_off(&self, backoff: &mut Duration) -> bool {
        let stop = matches!(self.wait(Some(*backoff)), Woken::Stop);
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        stop
    }
}

#[derive(Debug, Default)]
struct TxCounters {
    full: AtomicU64,
    link_down: AtomicU64,
}

/// The transmitting side: cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct TapTx {
    fd: Arc<OwnedFd>,
    counters: Arc<TxCounters>,
}

impl TapTx {
    /// Writes one Ethernet frame. Never blocks: a frame the TAP cannot take
    /// now (EAGAIN, ENOBUFS) is dropped and counted, as a NIC drops on a
    /// full queue, and so is one sent while the interface is down (EIO), as
    /// a NIC without link drops. Other errors are returned.
    pub fn write(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: writes `frame.len()` bytes from `frame`, which is
            // alive for the call.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                if n as usize != frame.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("TAP took {n} of a {}-byte frame", frame.len()),
                    ));
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                    self.counters.full.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Some(libc::EIO) => {
                    self.counters.link_down.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                _ => return Err(err),
            }
        }
    }

    /// Frames dropped so far: because the TAP's queue was full, and because
    /// its interface was down.
    pub fn dropped(&self) -> (u64, u64) {
        (self.counters.full.load(Ordering::Relaxed), self.counters.link_down.load(Ordering::Relaxed))
    }
}

/// Why a `--net` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetSpecError {
    #[error("invalid network backend {0:?}: expected tap:IFNAME[,mac=52:54:00:xx:xx:xx]")]
    Backend(String),
    #[error("invalid TAP interface name {name:?}: {why}")]
    Interface { name: String, why: String },
    #[error("mac= given twice in {0:?}")]
    MacTwice(String),
    #[error("unknown network option {option:?} in {spec:?}: expected tap:IFNAME[,mac=52:54:00:xx:xx:xx]")]
    Option { option: String, spec: String },
    #[error(transparent)]
    Mac(#[from] crate::mac::MacError),
}

/// The value of the `--net` flag: `tap:IFNAME[,mac=52:54:00:xx:xx:xx]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub ifname: String,
    pub mac: [u8; 6],
}

impl FromStr for NetSpec {
    type Err = NetSpecError;

    fn from_str(s: &str) -> Result<Self, NetSpecError> {
        let Some(rest) = s.strip_prefix("tap:") else {
            return Err(NetSpecError::Backend(s.to_string()));
        };
        let mut parts = rest.split(',');
        let ifname = parts.next().unwrap_or_default();
        check_ifname(ifname)
            .map_err(|why| NetSpecError::Interface { name: ifname.to_string(), why: why.to_string() })?;
        let mut mac = None;
        for option in parts {
            match option.split_once('=') {
                Some(("mac", value)) => {
                    if mac.is_some() {
                        return Err(NetSpecError::MacTwice(s.to_string()));
                    }
                    mac = Some(parse_mac(value)?);
                }
                _ => return Err(NetSpecError::Option { option: option.to_string(), spec: s.to_string() }),
            }
        }
        Ok(NetSpec { ifname: ifname.to_string(), mac: mac.unwrap_or(DEFAULT_MAC) })
    }
}

impl fmt::Display for NetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tap:{},mac={}", self.ifname, format_mac(&self.mac))
    }
}

/// The frame QEMU's announce-self sends for `mac`: a broadcast RARP
/// "request reverse" whose sender and target hardware addresses are `mac`
/// and protocol addresses 0, padded to the 60-byte Ethernet minimum (FCS
/// excluded). Switches learn the MAC's new port from it; nobody answers.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    const ETH_P_RARP: u16 = 0x8035;
    const HTYPE_ETHERNET: u16 = 1;
    const PTYPE_IPV4: u16 = 0x0800;
    const OP_REQUEST_REVERSE: u16 = 3;
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_RARP.to_be_bytes());
    f.extend_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    f.extend_from_slice(&PTYPE_IPV4.to_be_bytes());
    f.push(6);
    f.push(4);
    f.extend_from_slice(&OP_REQUEST_REVERSE.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    #[test]
    fn net_specs_parse_with_clear_errors() {
        let spec: NetSpec = "tap:tap0".parse().unwrap();
        assert_eq!(spec, NetSpec { ifname: "tap0".into(), mac: DEFAULT_MAC });
        let spec: NetSpec = "tap:ft-tap.1,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(spec.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(spec.to_string(), "tap:ft-tap.1,mac=52:54:00:aa:bb:cc");
        assert_eq!(spec.to_string().parse::<NetSpec>(), Ok(spec));
        let err = |s: &str| s.parse::<NetSpec>().unwrap_err().to_string();
        assert!(err("tap0").contains("expected tap:IFNAME"));
        assert!(err("user:x").contains("expected tap:IFNAME"));
        assert!(err("tap:").contains("empty"));
        assert!(err("tap:,mac=52:54:00:12:34:56").contains("empty"));
        assert!(err("tap:0123456789abcdef").contains("15 bytes"));
        assert!("tap:0123456789abcde".parse::<NetSpec>().is_ok());
        assert!(err("tap:a/b").contains("'/'"));
        assert!(err("tap:..").contains("not a name"));
        assert!(err("tap:t0,mac=53:54:00:12:34:56").contains("multicast"));
        assert!(err("tap:t0,mac=52:54:00:12:34").contains("six hex pairs"));
        assert!(err("tap:t0,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57").contains("twice"));
        assert!(err("tap:t0,vhost=on").contains("unknown network option \"vhost=on\""));
        assert!(err("tap:t0,").contains("unknown network option"));
    }

    #[test]
    fn the_rarp_announcement_is_qemus() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_announce(mac);
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // source: the VM
            0x80, 0x35,                         // RARP
            0x00, 0x01, 0x08, 0x00, 6, 4,       // Ethernet, IPv4, lengths
            0x00, 0x03,                         // request reverse
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target
        ];
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..42], &want);
        assert!(f[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn both_sides_go_to_other_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<TapRx>();
        send_sync::<TapTx>();
    }

    #[test]
    fn tun_flags_and_names() {
        assert_eq!(parse_tun_flags("0x1802\n"), Some(0x1802));
        assert_eq!(parse_tun_flags("1902"), Some(0x1902));
        assert_eq!(parse_tun_flags("junk"), None);
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("a b").is_err());
        assert!(check_ifname("a:b").is_err());
        assert!(check_ifname("a\0b").is_err());
        assert!(check_ifname(".").is_err());
        assert!(matches!(Tap::open("../../etc"), Err(TapError::BadName { .. })));
        let ifr = ifreq("0123456789abcde");
        assert_eq!(ifr.ifr_name[14], b'e' as libc::c_char);
        assert_eq!(ifr.ifr_name[15], 0);
    }

    // --- As root, in a network namespace of the test's own. ---

    const CHILD_ENV: &str = "FTVMM_TAP_TEST_IN_NETNS";

    /// Runs `body` inside a network namespace made for it: the test runs
    /// again as a child process under `ip netns exec` (which also mounts
    /// that namespace's /sys), and the namespace — with every interface the
    /// body made in it — is deleted afterwards, also when the body fails.
    fn in_netns(test: &str, body: impl FnOnce()) {
        if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
            body();
            return;
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test needs root: it makes a network namespace and TAP devices in it");
        struct Netns(String);
        impl Drop for Netns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).stderr(Stdio::null()).status();
            }
        }
        let ns = Netns(format!("ftvmm-{}-{test}", std::process::id()));
        let made = Command::new("ip").args(["netns", "add", &ns.0]).status().expect("running ip (iproute2)");
        assert!(made.success(), "ip netns add {} failed", ns.0);
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(exe)
            // The test's full name: this module's path without the crate's.
            .args([&format!("{}::{test}", module_path!().split_once("::").map_or("", |(_, m)| m)), "--exact"])
            .args(["--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, test)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running the test in its namespace");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("waiting for the test").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("the test's output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed"),
            "{test} in network namespace {}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            ns.0,
            out.status
        );
    }

    fn sh(cmd: &str) {
        let out = Command::new("sh").args(["-c", cmd]).output().expect("running sh");
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A TAP made as the host would, IPv6 off so that the kernel sends
    /// nothing on its own.
    fn make_tap(name: &str) {
        sh(&format!("ip tuntap add dev {name} mode tap"));
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An AF_PACKET socket on one interface: it sees every frame there and
    /// sends frames out of it (into the TAP's descriptor, for a TAP).
    struct PacketSocket(OwnedFd);

    impl PacketSocket {
        fn bind(ifname: &str) -> PacketSocket {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket takes no pointers.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
            assert!(raw >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: `raw` is a new descriptor owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let name = std::ffi::CString::new(ifname).unwrap();
            // SAFETY: `name` is a NUL-terminated string alive for the call.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index != 0, "no interface {ifname}");
            // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `sll` is a sockaddr_ll of `len` bytes, alive for the call.
            let r = unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), len) };
            assert_eq!(r, 0, "binding to {ifname}: {}", io::Error::last_os_error());
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            // SAFETY: SO_RCVTIMEO reads a timeval of the given size from a
            // live one.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
            PacketSocket(fd)
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: sends `frame.len()` bytes from `frame`, alive for the call.
            let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize, "packet send: {}", io::Error::last_os_error());
        }

        /// The next frame seen within the receive timeout.
        fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 65536];
            // SAFETY: receives at most `buf.len()` bytes into `buf`, alive
            // and exclusively borrowed for the call.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            (n >= 0).then(|| {
                buf.truncate(n as usize);
                buf
            })
        }
    }

    /// A test frame: broadcast, ethertype 0x88b5 (local experimental), its
    /// payload `tag` repeated.
    fn marker(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        f.resize(len, tag);
        f
    }

    fn cpu_time() -> Duration {
        // SAFETY: rusage is plain data; all zeroes is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one rusage into `ru`, alive and
        // exclusively borrowed for the call.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
    }

    #[test]
    fn tap_open_tells_each_wrong_interface_apart() {
        in_netns("tap_open_tells_each_wrong_interface_apart", || {
            make_tap("ftt0");
            sh("ip tuntap add dev ftu0 mode tun");
            sh("ip tuntap add dev ftm0 mode tap multi_queue");
            let err = |name: &str| Tap::open(name).unwrap_err();
            assert!(matches!(err("ftnone0"), TapError::NotFound(_)));
            assert!(!Path::new("/sys/class/net/ftnone0").exists(), "a missing device is never created");
            assert!(matches!(err("lo"), TapError::NotTap(_)));
            assert!(matches!(err("ftu0"), TapError::IsTun(_)));
            assert!(matches!(err("ftm0"), TapError::MultiQueue(_)));
            assert!(matches!(err(""), TapError::BadName { .. }));
            let msgs: Vec<String> = ["ftnone0", "lo", "ftu0", "ftm0"].iter().map(|n| err(n).to_string()).collect();
            assert!(msgs[0].contains("no network interface ftnone0"), "{}", msgs[0]);
            assert!(msgs[1].contains("lo is not a TAP"), "{}", msgs[1]);
            assert!(msgs[2].contains("TUN device"), "{}", msgs[2]);
            assert!(msgs[3].contains("multi-queue"), "{}", msgs[3]);
            assert!(msgs.iter().all(|m| !m.contains('\n')));

            // Without CAP_NET_ADMIN: a thread that dropped root (the raw
            // syscall changes only the calling thread's credentials).
            let denied = std::thread::spawn(|| {
                // SAFETY: setresuid takes integers; it affects this thread
                // only, which ends right after.
                let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
                assert_eq!(r, 0, "setresuid: {}", io::Error::last_os_error());
                Tap::open("ftt0").unwrap_err()
            })
            .join()
            .unwrap();
            assert!(matches!(denied, TapError::PermissionDenied(_)), "{denied}");

            let tap = Tap::open("ftt0").unwrap();
            assert_eq!(tap.name(), "ftt0");
            let busy = err("ftt0");
            assert!(matches!(busy, TapError::Busy(_)), "{busy}");
            assert!(busy.to_string().contains("busy"));
            drop(tap);
            let tap = Tap::open("ftt0").expect("free again once closed");
            // Split, then dropped: the reader stops and the descriptor
            // closes.
            let (rx, tx) = tap.split(4, Box::new(|| {})).unwrap();
            assert!(matches!(err("ftt0"), TapError::Busy(_)));
            drop(rx);
            assert!(matches!(err("ftt0"), TapError::Busy(_)), "TapTx still holds it");
            drop(tx);
            Tap::open("ftt0").expect("free again once both sides are dropped");
        });
    }

    #[test]
    fn tap_receives_and_transmits_frames() {
        in_netns("tap_receives_and_transmits_frames", || {
            make_tap("ftt0");
            let tap = Tap::open("ftt0").unwrap();
            let woken = Arc::new(AtomicUsize::new(0));
            let w = Arc::clone(&woken);
            let (rx, tx) = tap
                .split(
                    64,
                    Box::new(move || {
                        w.fetch_add(1, Ordering::SeqCst);
                    }),
                )
                .unwrap();
            // Written while the interface is down: dropped, counted.
            tx.write(&marker(9, 60)).unwrap();
            assert_eq!(tx.dropped(), (0, 1));
            sh("ip addr add 10.213.7.1/24 dev ftt0 && ip link set ftt0 mtu 3000 up");

            // The host resolves a neighbour: its ARP request comes out of
            // the TAP.
            let udp = std::net::UdpSocket::bind("10.213.7.1:0").unwrap();
            udp.send_to(b"hello", "10.213.7.2:9").unwrap();
            let mut arp = None;
            wait_until("an ARP request from the TAP", || {
                while let Some(f) = rx.pop() {
                    if f.len() >= 42 && f[12..14] == [0x08, 0x06] {
                        arp = Some(f);
                    }
                }
                arp.is_some()
            });
            let arp = arp.unwrap();
            assert_eq!(&arp[..6], &[0xff; 6], "broadcast");
            assert_eq!(&arp[20..22], &[0, 1], "request");
            assert_eq!(&arp[38..42], &[10, 213, 7, 2], "for the address asked");
            assert!(woken.load(Ordering::SeqCst) >= 1);

            // Frames the host sends arrive whole, in order; oversized ones
            // are dropped and counted.
            let sock = PacketSocket::bind("ftt0");
            for (tag, len) in [(1u8, 14usize), (2, 60), (3, 1518)] {
                sock.send(&marker(tag, len));
            }
            sock.send(&marker(4, 1519));
            sock.send(&marker(5, 2000));
            let mut got = vec![];
            wait_until("three frames", || {
                while let Some(f) = rx.pop() {
                    if f[12..14] == [0x88, 0xb5] {
                        got.push(f);
                    }
                }
                got.len() == 3 && rx.dropped().1 == 2
            });
            assert_eq!(got, vec![marker(1, 14), marker(2, 60), marker(3, 1518)]);
            assert_eq!(rx.dropped(), (0, 2));

            // What TapTx writes, the host receives.
            let sent = marker(7, 100);
            tx.write(&sent).unwrap();
            let tx2 = tx.clone();
            std::thread::spawn(move || tx2.write(&marker(8, 64)).unwrap()).join().unwrap();
            let mut seen = vec![];
            wait_until("the frames TapTx wrote", || {
                if let Some(f) = sock.recv() {
                    if f[12..14] == [0x88, 0xb5] && (f[14] == 7 || f[14] == 8) {
                        seen.push(f);
                    }
                }
                seen.len() == 2
            });
            assert_eq!(seen, vec![sent, marker(8, 64)]);
            assert_eq!(tx.dropped(), (0, 1));

            // The interface deleted under the reader: it backs off instead
            // of spinning, and still stops when dropped.
            sh("ip link del ftt0");
            let before = cpu_time();
            std::thread::sleep(Duration::from_secs(1));
            let used = cpu_time() - before;
            assert!(used < Duration::from_millis(200), "reader used {used:?} of CPU in 1 s");
            let started = Instant::now();
            drop(rx);
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(tx.write(&marker(1, 60)).is_err(), "the interface is gone");
        });
    }

    #[test]
    fn tap_drops_when_full_and_discards_on_request() {
        in_netns("tap_drops_when_full_and_discards_on_request", || {
            make_tap("ftt1");
            let tap = Tap::open("ftt1").unwrap();
            let (rx, _tx) = tap.split(2, Box::new(|| {})).unwrap();
            sh("ip link set ftt1 up");
            let sock = PacketSocket::bind("ftt1");
            for tag in 0..5 {
                sock.send(&marker(tag, 60));
            }
            wait_until("three frames dropped for a full queue", || rx.dropped().0 == 3);
            assert_eq!(rx.pop(), Some(marker(0, 60)));
            assert_eq!(rx.pop(), Some(marker(1, 60)));
            assert_eq!(rx.pop(), None);
            assert!(rx.is_empty());

            // Discard mode: drained, nothing queued, what was queued goes.
            sock.send(&marker(10, 60));
            wait_until("a frame queued", || !rx.is_empty());
            rx.set_discard(true);
            assert!(rx.is_empty());
            assert_eq!(rx.discarded(), 1);
            for tag in 11..15 {
                sock.send(&marker(tag, 60));
            }
            wait_until("four frames discarded", || rx.discarded() == 5);
            assert!(rx.is_empty());
            assert_eq!(rx.dropped(), (3, 0), "discarded frames are not drops");
            rx.set_discard(false);
            sock.send(&marker(20, 60));
            wait_until("a frame queued after discard mode", || !rx.is_empty());
            assert_eq!(rx.pop(), Some(marker(20, 60)));
        });
    }
}
