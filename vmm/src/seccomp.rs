//! The seccomp filters: which system calls each kind of ftvmm thread may
//! make once the VM is set up, and what happens when one makes another.
//!
//! This module owns the allow-list of every [`ThreadKind`], their
//! compilation to BPF (once, in [`prepare`], before any thread starts),
//! their installation (each thread installs its own kind's filter on
//! itself as it starts: [`enter`]; the vCPU thread after set-up and the
//! `--run-as` drop, right before the guest runs), and the SIGSYS handler
//! that reports a forbidden call — `ftvmm: seccomp: the <kind> thread made
//! a forbidden system call: <name> (<nr>)` — and ends the process with
//! [`SIGSYS_STATUS`]. The crates whose threads these are (the logging
//! channel, the metrics server) know nothing of seccomp: the VMM hands them
//! a hook to call on each thread they start.
//!
//! A thread inherits the filters of the thread that starts it, and the
//! kernel applies all of a thread's filters: so a kind that starts threads
//! after its own filter is on (the vCPU thread when a backup goes live or a
//! backup joins, the joiner, the console's acceptor) is allowed, as well as
//! its own calls, everything the threads it starts need ([`starts`]).
//! docs/sandbox.md says what each kind may call and why.
//!
//! Filters are on unless `--no-seccomp`. Two hidden environment variables
//! are for the tests and for whoever extends a list: `FTVMM_SECCOMP_SELFTEST
//! =<kind>` makes the threads of that kind make one forbidden call (chroot)
//! right after their filter is on; `FTVMM_SECCOMP_LOG=1` lets forbidden
//! calls through and has the kernel log them instead (`dmesg`: audit
//! `type=1326` lines with `syscall=` and the thread's `comm=`, which is
//! then set to `ftvmm-<kind>`).

use crate::privileges::RunAs;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use syscalls::Sysno;

/// The exit status of a process a filter stopped: as if killed by SIGSYS
/// (128 + 31), as a shell reports it.
pub const SIGSYS_STATUS: i32 = 128 + libc::SIGSYS;

/// The kinds of ftvmm thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: runs the guest (KVM_RUN), its devices, the role's
    /// syncs and failover, the ftdisk client, snapshots.
    Vcpu,
    /// Interrupts the vCPU thread when it has run long enough.
    Kicker,
    /// A logging channel link's network thread (a tokio runtime).
    Channel,
    /// Accepts joining backups (the channel's accept loop and handshake)
    /// and starts their links' network threads.
    Joiner,
    /// The NIC's host side: the TAP reader, the go-live MAC announcer.
    Nic,
    /// The serial console: the acceptor, each client's greeter and reader,
    /// the output writer, the input readers and forwarder.
    Console,
    /// Applies released disk writes, to the image file or ftdisk.
    DiskWriter,
    /// Sends a running VM's memory to a joining backup (pre-copy).
    StateSender,
    /// The metrics server's acceptor and workers (`--metrics`).
    Metrics,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Vcpu,
        ThreadKind::Kicker,
        ThreadKind::Channel,
        ThreadKind::Joiner,
        ThreadKind::Nic,
        ThreadKind::Console,
        ThreadKind::DiskWriter,
        ThreadKind::StateSender,
        ThreadKind::Metrics,
    ];

    /// Its name in messages and in `FTVMM_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Kicker => "kicker",
            ThreadKind::Channel => "logging-channel",
            ThreadKind::Joiner => "joiner",
            ThreadKind::Nic => "nic",
            ThreadKind::Console => "console",
            ThreadKind::DiskWriter => "disk-writer",
            ThreadKind::StateSender => "state-sender",
            ThreadKind::Metrics => "metrics",
        }
    }

    fn index(self) -> usize {
        ThreadKind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    /// The kinds of thread this kind starts after its filter is on: they
    /// inherit it, so it must allow what they need.
    pub fn starts(self) -> &'static [ThreadKind] {
        match self {
            // The kicker at the start of the run; a pre-copy for a joining
            // backup; and a backup going live starts its console, its disk
            // writer, the announcer and (with --listen) the joiner.
            ThreadKind::Vcpu => &[
                ThreadKind::Kicker,
                ThreadKind::StateSender,
                ThreadKind::Console,
                ThreadKind::DiskWriter,
                ThreadKind::Nic,
                ThreadKind::Joiner,
            ],
            ThreadKind::Joiner => &[ThreadKind::Channel],
            // A greeter and reader for each client.
            ThreadKind::Console => &[ThreadKind::Console],
            _ => &[],
        }
    }

    /// The system calls this kind makes itself (on top of [`BASE`]).
    #[rustfmt::skip] // Grouped by purpose, each group under its reason.
    fn own(self) -> &'static [Sysno] {
        use Sysno::*;
        match self {
            ThreadKind::Vcpu => &[
                // KVM (run, registers, interrupts, the dirty log), and
                // FIONBIO/SIOCOUTQ-style socket ioctls of the clients.
                ioctl,
                // The disk image, the log (--record/--replay), eventfds,
                // the TAP (frames the guest sends), stdout.
                read, readv, pread64, preadv, write, writev, pwrite64, pwritev, lseek, fsync, fdatasync,
                // --save-snapshot creates its file when the guest gets there;
                // the owner name claimed on ftdisk at go-live reads
                // /proc/sys/kernel/hostname; the resolver's files.
                openat, fstat, newfstatat, statx, fcntl, ftruncate,
                // The ftdisk client and the arbiter: (re)connecting, TLS,
                // requests; the metrics server's wake-up connection at exit.
                socket, connect, setsockopt, getsockopt, getsockname, getpeername, sendto, recvfrom, sendmsg,
                recvmsg, shutdown, poll, ppoll,
                // Resolving ftdisk's name again at a reconnect (glibc reads
                // its files, asks the name server, sorts by route).
                sendmmsg, bind,
            ],
            // pthread_kill: tgkill to the vCPU thread.
            ThreadKind::Kicker => &[tgkill],
            ThreadKind::Channel => &[
                // tokio's event loop (mio: epoll and an eventfd waker).
                epoll_wait, epoll_pwait, epoll_ctl, read, readv, write, writev,
                // The link's socket, plaintext or TLS, and the busy-poll.
                recvfrom, sendto, recvmsg, sendmsg, shutdown, setsockopt, getsockopt, getsockname, getpeername,
                poll, ppoll, fcntl, ioctl,
                // prioritize_network_thread: SCHED_RR 1, else nice -10.
                sched_setscheduler, setpriority,
            ],
            ThreadKind::Joiner => &[
                // Its own runtime for the accept loop and the handshakes.
                epoll_create1, epoll_wait, epoll_pwait, epoll_ctl, eventfd2, accept4, read, readv, write, writev,
                recvfrom, sendto, recvmsg, sendmsg, shutdown, setsockopt, getsockopt, getsockname, getpeername,
                poll, ppoll, fcntl, ioctl,
            ],
            // poll on the TAP and the stop eventfd, read frames; write:
            // the announcer's RARP frames.
            ThreadKind::Nic => &[poll, ppoll, read, readv, write, writev],
            ThreadKind::Console => &[
                accept4, read, readv, write, writev, recvfrom, sendto, recvmsg, sendmsg, poll, ppoll, shutdown,
                setsockopt, getsockopt, getsockname, getpeername, fcntl,
                // SIOCOUTQ (what the client has not taken yet), FIONBIO.
                ioctl,
            ],
            ThreadKind::DiskWriter => &[
                // The image file.
                pwrite64, pwritev, write, writev, pread64, read, lseek, fsync, fdatasync,
                // ftdisk: writes and flushes as requests, reconnects, TLS,
                // and resolving its name again (files, name server).
                socket, connect, setsockopt, getsockopt, getsockname, getpeername, sendto, recvfrom, sendmsg,
                recvmsg, sendmmsg, bind, shutdown, poll, ppoll, fcntl, ioctl, openat, fstat, newfstatat, statx,
            ],
            ThreadKind::StateSender => &[
                // The dirty log (KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG) for
                // each round; the channel's waker (an eventfd).
                ioctl, read, write, writev,
            ],
            ThreadKind::Metrics => &[
                accept4, read, readv, write, writev, recvfrom, sendto, recvmsg, sendmsg, shutdown, setsockopt,
                getsockopt, getsockname, getpeername, poll, ppoll, fcntl, ioctl,
            ],
        }
    }
}

/// What every thread may call: memory, locks, clocks and sleeps, signal
/// returns, its own exit, messages on stderr, randomness (hash maps, TLS).
#[rustfmt::skip]
const BASE: &[Sysno] = {
    use Sysno::*;
    &[
        // Allocators.
        brk, mmap, munmap, mremap, mprotect, madvise,
        // Locks, condition variables, channels, parking; yielding.
        futex, sched_yield,
        // Clocks (when the vDSO falls back) and sleeps.
        clock_gettime, clock_getres, gettimeofday, clock_nanosleep, nanosleep,
        // Signal handlers return, interrupted calls restart; the kick
        // signal's and glibc's set*id broadcast's handlers; panics abort.
        rt_sigreturn, restart_syscall, rt_sigprocmask, rt_sigaction, sigaltstack, getpid, gettid, tgkill,
        // Messages (stderr) and descriptors dropped.
        write, writev, close,
        // RandomState (hash maps), rustls.
        getrandom,
        // A thread's or the process's end.
        exit, exit_group,
    ]
};

/// What starting a thread takes (the new thread runs these under its
/// starter's filter until it installs its own).
#[rustfmt::skip]
const SPAWN: &[Sysno] = {
    use Sysno::*;
    &[
        clone, clone3, set_robust_list, rseq, prctl, seccomp, sched_getaffinity, mmap, mprotect, munmap,
        sigaltstack, rt_sigprocmask,
    ]
};

/// Every system call `kind` may make: its own, the base, and those of the
/// threads it starts.
pub fn allowed(kind: ThreadKind) -> BTreeSet<Sysno> {
    let mut set: BTreeSet<Sysno> = BASE.iter().chain(kind.own()).copied().collect();
    for child in kind.starts() {
        if *child != kind {
            set.extend(allowed(*child));
        }
        set.extend(SPAWN);
    }
    set
}

/// Why the filters could not be made or put on.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: building the {kind} thread's filter: {err} (run with --no-seccomp to debug)")]
    Build { kind: &'static str, err: String },
    #[error("seccomp: installing the {kind} thread's filter: {err} (does this kernel have seccomp? --no-seccomp runs without)")]
    Install { kind: &'static str, err: seccompiler::Error },
    #[error("seccomp: installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("FTVMM_SECCOMP_SELFTEST={0:?}: no such thread kind (one of: {1})")]
    BadSelftest(String, String),
}

/// The process's filters, compiled once, and the testing hook.
struct Sandbox {
    /// The programs of each kind, by [`ThreadKind::index`] (its list, and
    /// for a kind that opens no file, [`malloc_probe`]'s); None:
    /// --no-seccomp.
    programs: Option<Vec<Vec<BpfProgram>>>,
    /// `FTVMM_SECCOMP_SELFTEST`: this kind makes a forbidden call.
    selftest: Option<ThreadKind>,
    /// `FTVMM_SECCOMP_LOG`: log forbidden calls, and name the threads.
    log: bool,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

thread_local! {
    /// The calling thread's kind, for the SIGSYS handler (index + 1; 0:
    /// a thread that has not installed its own filter yet).
    static KIND: Cell<usize> = const { Cell::new(0) };
}

/// Compiles every kind's filter (`enabled`: else only the testing hook is
/// armed) and installs the SIGSYS handler. Call once, on the main thread,
/// before any other thread starts. With `run_as`, the threads that install
/// their filters before the drop may make the set*id calls glibc has every
/// thread make for it, with the target IDs only.
pub fn prepare(enabled: bool, run_as: Option<&RunAs>) -> Result<(), SeccompError> {
    let selftest = match std::env::var("FTVMM_SECCOMP_SELFTEST") {
        Ok(name) => Some(
            ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| SeccompError::BadSelftest(name, ThreadKind::ALL.map(ThreadKind::name).join(", ")))?,
        ),
        Err(_) => None,
    };
    let log = std::env::var_os("FTVMM_SECCOMP_LOG").is_some_and(|v| v == "1");
    let programs = if enabled {
        install_sigsys_handler()?;
        quiet_panics();
        let mismatch = if log { SeccompAction::Log } else { SeccompAction::Trap };
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            // The list goes on last: installing a filter takes prctl and
            // seccomp, which most lists forbid.
            let mut mine = Vec::new();
            if !allowed(kind).contains(&Sysno::openat) {
                mine.push(malloc_probe(kind)?);
            }
            mine.push(compile(kind, mismatch.clone(), run_as)?);
            programs.push(mine);
        }
        Some(programs)
    } else {
        None
    };
    let _ = SANDBOX.set(Sandbox { programs, selftest, log });
    Ok(())
}

/// The flags of glibc's own read-only opens (`__open_nocancel`).
const READ_ONLY_CLOEXEC: u64 = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;

fn arg_is(build: impl Fn(String) -> SeccompError, arg: u8, value: u64) -> Result<SeccompRule, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| build(e.to_string()))
}

fn compile(kind: ThreadKind, mismatch: SeccompAction, run_as: Option<&RunAs>) -> Result<BpfProgram, SeccompError> {
    let build = |err: String| SeccompError::Build { kind: kind.name(), err };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).into_iter().map(|s| (i64::from(s.id()), Vec::new())).collect();
    if let std::collections::btree_map::Entry::Vacant(open) = rules.entry(i64::from(Sysno::openat.id())) {
        // Let through to [`malloc_probe`]'s filter, which fails it.
        open.insert(vec![arg_is(build, 2, READ_ONLY_CLOEXEC)?]);
    }
    if let Some(run_as) = run_as {
        // glibc's setgroups/setgid/setuid run on every thread (SIGSETXID):
        // the drop's own arguments, and the check's setuid(0), which fails
        // by then.
        let arg0 = |value: u64| arg_is(build, 0, value);
        rules.insert(i64::from(Sysno::setgroups.id()), vec![arg0(1)?]);
        rules.insert(i64::from(Sysno::setgid.id()), vec![arg0(u64::from(run_as.gid))?]);
        rules.insert(i64::from(Sysno::setuid.id()), vec![arg0(u64::from(run_as.uid))?, arg0(0)?]);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| build(e.to_string()))
}

/// glibc's malloc reads /proc/sys/vm/overcommit_memory once per process,
/// from whichever thread first shrinks a heap (and any thread may): for a
/// kind whose list opens no file, this second filter fails a read-only
/// open with ENOENT instead of the list killing the process for it (glibc
/// then takes the default, and nothing else such a thread runs opens a
/// file). Any other open is still forbidden by the list.
fn malloc_probe(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |err: String| SeccompError::Build { kind: kind.name(), err };
    let rules = BTreeMap::from([(i64::from(Sysno::openat.id()), vec![arg_is(build, 2, READ_ONLY_CLOEXEC)?])]);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOENT as u32), TargetArch::x86_64)
            .map_err(|e| build(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| build(e.to_string()))
}

/// Puts the calling thread under `kind`'s filter (nothing with
/// `--no-seccomp`, or in a process that did not [`prepare`]), then runs
/// the testing hook if it names `kind`.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(sandbox) = SANDBOX.get() else { return Ok(()) };
    if let Some(programs) = &sandbox.programs {
        if sandbox.log {
            let name = format!("ftvmm-{}\0", kind.name());
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most
            // 16 bytes (longer ones are cut); `name` is one, alive.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        }
        KIND.with(|k| k.set(kind.index() + 1));
        for program in &programs[kind.index()] {
            seccompiler::apply_filter(program).map_err(|err| SeccompError::Install { kind: kind.name(), err })?;
        }
    }
    if sandbox.selftest == Some(kind) {
        // The forbidden call: under the filter, SIGSYS ends the process
        // here; without one, chroot to a path that does not exist fails.
        // SAFETY: chroot reads a NUL-terminated path.
        unsafe { libc::chroot(c"/nonexistent-ftvmm-seccomp-selftest".as_ptr()) };
    }
    Ok(())
}

/// [`enter`] for a thread the VMM starts: a thread that cannot be confined
/// stops the process rather than run unconfined.
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("ftvmm: error: {e}");
        std::process::exit(2);
    }
}

/// The hook for the threads other crates start (the logging channel's,
/// the metrics server's).
pub fn hook(kind: ThreadKind) -> std::sync::Arc<dyn Fn() + Send + Sync> {
    std::sync::Arc::new(move || enter_or_exit(kind))
}

/// A panic prints its message as usual, but no backtrace: making one
/// reads the executable's debug information from its file, which no list
/// allows (a thread that panics would be killed for the attempt instead).
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        eprintln!("thread '{name}' {info}");
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("note: no backtrace under the seccomp filters: run with --no-seccomp for one");
        }
    }));
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: sigaction is plain data: all-zero is valid, then filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t to empty; sigaction
    // reads a valid struct, and `on_sigsys` is async-signal-safe.
    let rc = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where the system call's number is in a SIGSYS's siginfo, in `i32`s:
/// after si_signo, si_errno, si_code, padding and `_sigsys.call_addr`.
const SI_OFF_SYSCALL: usize = 6;

/// The SIGSYS handler: says which thread made which call, and ends the
/// process. Async-signal-safe: formats into a stack buffer, then write(2)
/// and _exit(2), both on every list.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // for SIGSYS its `_sigsys` member holds the call's number at this offset.
    let nr = unsafe { *(info as *const i32).add(SI_OFF_SYSCALL) };
    let kind = KIND.with(|k| k.get());
    let mut line = Line::default();
    line.push(b"ftvmm: seccomp: the ");
    match kind.checked_sub(1).and_then(|i| ThreadKind::ALL.get(i)) {
        Some(k) => line.push(k.name().as_bytes()),
        None => line.push(b"(starting)"),
    }
    line.push(b" thread made a forbidden system call: ");
    match usize::try_from(nr).ok().and_then(Sysno::new) {
        Some(s) => line.push(s.name().as_bytes()),
        None => line.push(b"unknown"),
    }
    line.push(b" (");
    line.number(i64::from(nr));
    line.push(b"); run with --no-seccomp to debug\n");
    // SAFETY: write(2) reads `line.len` initialized bytes of the buffer;
    // _exit(2) ends the process at once, without running anything else.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(SIGSYS_STATUS);
    }
}

/// A line built without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line { buf: [0; 256], len: 0 }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        let run_as = RunAs { spec: "nobody".into(), uid: 65534, gid: 65534 };
        for kind in ThreadKind::ALL {
            compile(kind, SeccompAction::Trap, None).expect("compiles");
            compile(kind, SeccompAction::Trap, Some(&run_as)).expect("compiles with --run-as");
            malloc_probe(kind).expect("compiles");
        }
    }

    #[test]
    fn a_starter_allows_what_it_starts() {
        for kind in ThreadKind::ALL {
            let mine = allowed(kind);
            for child in kind.starts() {
                let missing: Vec<_> = allowed(*child).difference(&mine).copied().collect();
                assert!(missing.is_empty(), "{} starts {} but forbids {missing:?}", kind.name(), child.name());
                let spawn: Vec<_> = SPAWN.iter().filter(|s| !mine.contains(s)).collect();
                assert!(spawn.is_empty(), "{} starts threads but forbids {spawn:?}", kind.name());
            }
        }
    }

    #[test]
    fn the_selftest_call_is_on_no_list() {
        for kind in ThreadKind::ALL {
            assert!(!allowed(kind).contains(&Sysno::chroot), "{}", kind.name());
        }
    }

    #[test]
    fn lines_format_numbers() {
        let mut line = Line::default();
        line.number(0);
        line.push(b" ");
        line.number(435);
        line.push(b" ");
        line.number(-1);
        assert_eq!(&line.buf[..line.len], b"0 435 -1");
    }
}
