//! `--run-as USER[:GROUP]`: the VMM gives up root once the VM is built.
//!
//! Everything that needs privileges — `/dev/kvm`, the TAP, the disk, the
//! listeners, the TLS credentials, the log or snapshot files named on the
//! command line — is opened by the builder; then [`RunAs::drop_privileges`]
//! switches the whole process (every thread: glibc's set*id wrappers apply
//! to all of them) to the user and group, with that group as its only one,
//! and checks that root cannot be regained. See docs/sandbox.md.

use std::ffi::CString;
use std::io;

/// Why `--run-as` cannot be honoured: each message names the flag and says
/// what to change.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--run-as {0:?}: want USER[:GROUP] or UID[:GID]")]
    BadSpec(String),
    #[error("--run-as {spec}: no user {name:?} on this host (see /etc/passwd, or give a numeric UID:GID)")]
    UnknownUser { spec: String, name: String },
    #[error("--run-as {spec}: no group {name:?} on this host (see /etc/group, or give a numeric GID)")]
    UnknownGroup { spec: String, name: String },
    #[error("--run-as {spec}: no user has uid {uid} on this host to take a group from: give one (--run-as {uid}:GID)")]
    NoGroupFor { spec: String, uid: u32 },
    #[error("--run-as {spec}: looking up {what}: {err}")]
    Lookup { spec: String, what: String, err: io::Error },
    #[error(
        "--run-as {spec}: ftvmm runs as uid {uid}, not root: it cannot switch to uid {target} gid {gid} \
         (start it as root, or leave --run-as out)"
    )]
    NotRoot { spec: String, uid: u32, target: u32, gid: u32 },
    #[error("--run-as {spec}: {call} failed: {err}")]
    Syscall { spec: String, call: &'static str, err: io::Error },
    #[error("--run-as {spec}: after dropping privileges the {what} is {got}, not {want}: refusing to run")]
    Mismatch { spec: String, what: &'static str, got: String, want: String },
    #[error(
        "--run-as {spec}: setuid(0) still succeeds after dropping to uid {uid}: refusing to run with root regainable"
    )]
    Regainable { spec: String, uid: u32 },
}

/// The user and group a VMM runs as once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As given on the command line (for messages).
    pub spec: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Resolves `USER[:GROUP]` or `UID[:GID]` (names in the host's user
    /// database; a user alone brings its primary group).
    pub fn resolve(spec: &str) -> Result<RunAs, PrivilegeError> {
        let bad = || PrivilegeError::BadSpec(spec.to_string());
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) if !g.is_empty() => (u, Some(g)),
            Some(_) => return Err(bad()),
            None => (spec, None),
        };
        if user.is_empty() || spec.contains('\0') {
            return Err(bad());
        }
        let lookup = |what: String| move |err| PrivilegeError::Lookup { spec: spec.to_string(), what, err };
        let (uid, user_gid) = match user.parse::<u32>() {
            Ok(uid) => (uid, user_by_uid(uid).map_err(lookup(format!("uid {uid}")))?),
            Err(_) => match user_by_name(user).map_err(lookup(format!("user {user:?}")))? {
                Some((uid, gid)) => (uid, Some(gid)),
                None => return Err(PrivilegeError::UnknownUser { spec: spec.to_string(), name: user.to_string() }),
            },
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => match group_by_name(g).map_err(lookup(format!("group {g:?}")))? {
                    Some(gid) => gid,
                    None => return Err(PrivilegeError::UnknownGroup { spec: spec.to_string(), name: g.to_string() }),
                },
            },
            None => user_gid.ok_or_else(|| PrivilegeError::NoGroupFor { spec: spec.to_string(), uid })?,
        };
        Ok(RunAs { spec: spec.to_string(), uid, gid })
    }

    /// Whether the drop can happen, checked before anything is built: as
    /// root, or already running as exactly this user and group.
    pub fn preflight(&self) -> Result<(), PrivilegeError> {
        let (ruid, euid, _) = resuid();
        if euid == 0 || self.already() {
            return Ok(());
        }
        Err(PrivilegeError::NotRoot { spec: self.spec.clone(), uid: ruid, target: self.uid, gid: self.gid })
    }

    /// Whether every user and group ID of the process is already the target.
    fn already(&self) -> bool {
        let (r, e, s) = resuid();
        let (rg, eg, sg) = resgid();
        [r, e, s] == [self.uid; 3] && [rg, eg, sg] == [self.gid; 3]
    }

    /// Switches the process to this user and group, its group as its only
    /// one (`setgroups`, `setgid`, `setuid`, in that order), then checks
    /// the IDs and that `setuid(0)` now fails. Already that user and not
    /// root: nothing to do.
    pub fn drop_privileges(&self) -> Result<(), PrivilegeError> {
        if self.already() && resuid().1 != 0 {
            return Ok(());
        }
        let spec = &self.spec;
        let fail =
            |call: &'static str| PrivilegeError::Syscall { spec: spec.clone(), call, err: io::Error::last_os_error() };
        let groups = [self.gid as libc::gid_t];
        // SAFETY: `groups` is a valid array of one gid_t, read only.
        if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
            return Err(fail("setgroups"));
        }
        // SAFETY: setgid takes a plain integer.
        if unsafe { libc::setgid(self.gid) } != 0 {
            return Err(fail("setgid"));
        }
        // SAFETY: setuid takes a plain integer.
        if unsafe { libc::setuid(self.uid) } != 0 {
            return Err(fail("setuid"));
        }
        self.verify()
    }

    fn verify(&self) -> Result<(), PrivilegeError> {
        let mismatch =
            |what, got: String, want: String| PrivilegeError::Mismatch { spec: self.spec.clone(), what, got, want };
        let (r, e, s) = resuid();
        if [r, e, s] != [self.uid; 3] {
            return Err(mismatch("real/effective/saved uid", format!("{r}/{e}/{s}"), self.uid.to_string()));
        }
        let (r, e, s) = resgid();
        if [r, e, s] != [self.gid; 3] {
            return Err(mismatch("real/effective/saved gid", format!("{r}/{e}/{s}"), self.gid.to_string()));
        }
        let mut groups = [0 as libc::gid_t; 8];
        // SAFETY: getgroups writes at most `groups.len()` entries into it.
        let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
        let got = usize::try_from(n).map_or(&groups[..0], |n| &groups[..n.min(groups.len())]);
        if n < 0 || got.iter().any(|g| *g != self.gid) {
            return Err(mismatch("group list", format!("{got:?} (getgroups: {n})"), format!("[{}]", self.gid)));
        }
        // SAFETY: setuid takes a plain integer; should it succeed, the
        // process is root again and is told to stop just below.
        if self.uid != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err(PrivilegeError::Regainable { spec: self.spec.clone(), uid: self.uid });
        }
        Ok(())
    }
}

/// Sets `PR_SET_NO_NEW_PRIVS` on the calling thread and the threads and
/// processes it starts afterwards: no later `execve` could gain privileges
/// (set-user-ID binaries, file capabilities). ftvmm never executes anything;
/// this is a backstop, called before the VM's threads start so they all
/// inherit it.
pub fn forbid_new_privileges() -> Result<(), PrivilegeError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::Syscall {
            spec: String::from("(before the drop)"),
            call: "prctl(PR_SET_NO_NEW_PRIVS)",
            err: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The logging channel's network thread of a link made after the drop (a
/// backup that joins, or one a live former backup accepts) asks for
/// SCHED_RR priority 1, which root has by right; an unprivileged process
/// has it only up to `RLIMIT_RTPRIO`. Called while still root, this raises
/// that limit to 1 when lower (soft and hard): the process can then give
/// its threads the lowest real-time priority, no higher (the kernel's RT
/// throttling still leaves other tasks 5% of each CPU). Raising a hard
/// limit takes CAP_SYS_RESOURCE: without it (some containers) this fails,
/// and such threads keep their normal priority.
pub fn allow_realtime_priority() -> io::Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_RTPRIO, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= 1 {
        return Ok(());
    }
    let raised = libc::rlimit { rlim_cur: 1, rlim_max: lim.rlim_max.max(1) };
    // SAFETY: setrlimit reads one valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_RTPRIO, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn resuid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three uid_t through valid pointers; it
    // cannot fail with valid pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

fn resgid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: as in `resuid`, for gid_t.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// Calls a `get*_r` lookup with a buffer that grows while it is too small
/// (up to 1 MiB): Ok(None) when there is no such entry.
fn with_buffer<T>(mut call: impl FnMut(&mut [u8]) -> (libc::c_int, Option<T>)) -> io::Result<Option<T>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match call(&mut buf) {
            (0, found) => return Ok(found),
            // Not found, as some databases say it.
            (libc::ENOENT | libc::ESRCH, _) => return Ok(None),
            (libc::ERANGE, _) if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            (e, _) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The uid and primary gid of the user `name`.
fn user_by_name(name: &str) -> io::Result<Option<(u32, u32)>> {
    let name = CString::new(name).map_err(io::Error::other)?;
    with_buffer(|buf| {
        // SAFETY: passwd is plain integers and pointers: all-zero is valid.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the NUL-terminated
        // name, `pwd`, `buf` of `buf.len()` bytes (the strings `pwd` points
        // into, not read here), `result`.
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        (rc, (!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
    })
}

/// The primary gid of the user with uid `uid`, if there is one.
fn user_by_uid(uid: u32) -> io::Result<Option<u32>> {
    with_buffer(|buf| {
        // SAFETY: as in `user_by_name`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: as in `user_by_name`, with an integer for the name.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        (rc, (!result.is_null()).then_some(pwd.pw_gid))
    })
}

/// The gid of the group `name`.
fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let name = CString::new(name).map_err(io::Error::other)?;
    with_buffer(|buf| {
        // SAFETY: group is plain integers and pointers: all-zero is valid.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_by_name`, for a group entry.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        (rc, (!result.is_null()).then_some(grp.gr_gid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        let root = RunAs::resolve("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(RunAs::resolve("0:0").map(|r| (r.uid, r.gid)).ok(), Some((0, 0)));
        assert_eq!(RunAs::resolve("1234:5678").map(|r| (r.uid, r.gid)).ok(), Some((1234, 5678)));
        assert_eq!(RunAs::resolve("root:root").map(|r| r.gid).ok(), Some(0));
    }

    #[test]
    fn bad_specs_are_refused() {
        for spec in ["", ":", "root:", ":root", "a\0b"] {
            assert!(matches!(RunAs::resolve(spec), Err(PrivilegeError::BadSpec(_))), "{spec:?}");
        }
        assert!(matches!(RunAs::resolve("no-such-user-ftvmm"), Err(PrivilegeError::UnknownUser { .. })));
        assert!(matches!(RunAs::resolve("root:no-such-group-ftvmm"), Err(PrivilegeError::UnknownGroup { .. })));
        // A uid nobody has (probably) and no group: which group is unclear.
        assert!(matches!(RunAs::resolve("3999999"), Err(PrivilegeError::NoGroupFor { .. })));
    }
}
