//! The kick: stops a vCPU that has run too long without an exit when an
//! interrupt is due, so that the run loop can take a state sync there and
//! inject it. A guest in a long CPL3 loop never exits on its own, and
//! interrupts otherwise reach it only at exits.
//!
//! A thread of its own sleeps until the deadline the vCPU thread armed
//! before entering the guest, then signals the vCPU thread, which makes
//! `KVM_RUN` return `EINTR`. A signal that lands just before the vCPU
//! thread enters `KVM_RUN` is lost for that entry: the kicker repeats it
//! every [`REKICK`] until the vCPU thread disarms, so none is lost for good.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// How often an unanswered kick is repeated.
const REKICK: Duration = Duration::from_micros(200);

/// The signal that kicks the vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_signal: libc::c_int) {
    // Nothing to do: the signal's arrival interrupts KVM_RUN (EINTR).
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and no SA_RESTART
        // (KVM_RUN must return EINTR) is a well-formed argument; the handler
        // is async-signal-safe (it does nothing).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
        }
    });
}

struct State {
    /// When to kick, while the vCPU thread is in the guest.
    armed: Option<Instant>,
    /// What the kicker thread sleeps until (None: until armed).
    sleeping_until: Option<Instant>,
    quit: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Kicks the thread that created it (the vCPU thread).
pub struct Kicker {
    shared: Arc<Shared>,
}

impl Kicker {
    /// A kicker for the calling thread.
    pub fn for_this_thread() -> Kicker {
        install_handler();
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { armed: None, sleeping_until: None, quit: false }),
            wake: Condvar::new(),
        });
        let theirs = shared.clone();
        std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Kicker);
            kicker(theirs, target)
        });
        Kicker { shared }
    }

    /// The vCPU thread enters the guest: kick it at `at` unless it has
    /// disarmed by then.
    pub fn arm(&self, at: Instant) {
        let mut st = self.shared.lock();
        st.armed = Some(at);
        // The kicker sleeps past `at` (or indefinitely): wake it to re-aim.
        if st.sleeping_until.is_none_or(|t| t > at) {
            self.shared.wake.notify_one();
        }
    }

    /// The vCPU thread is back from the guest.
    pub fn disarm(&self) {
        self.shared.lock().armed = None;
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.wake.notify_one();
    }
}

fn kicker(shared: Arc<Shared>, target: libc::pthread_t) {
    let mut st = shared.lock();
    loop {
        if st.quit {
            return;
        }
        let now = Instant::now();
        match st.armed {
            Some(at) if at <= now => {
                // SAFETY: the vCPU thread outlives its Kicker, which stops
                // this thread (quit) before that thread ends.
                unsafe { libc::pthread_kill(target, kick_signal()) };
                st.sleeping_until = Some(now + REKICK);
                st = shared.wake.wait_timeout(st, REKICK).unwrap_or_else(|e| e.into_inner()).0;
            }
            Some(at) => {
                st.sleeping_until = Some(at);
                st = shared.wake.wait_timeout(st, at - now).unwrap_or_else(|e| e.into_inner()).0;
            }
            None => {
                st.sleeping_until = None;
                st = shared.wake.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }
}
