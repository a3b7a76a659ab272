//! Request sessions: how the server executes each request at most once, and
//! never lets an old request of a session execute after a newer one.
//!
//! A client picks a random 64-bit session id when it is created and numbers
//! its requests 1, 2, 3, ...; a request it retries on a new connection keeps
//! its number. For each session the server keeps a slot: the highest
//! sequence number executed so far (the *applied mark*) and the outcomes of
//! the last [`REPLY_CACHE`] requests. A request of the session is handled
//! under the slot's lock, so requests of one session never execute
//! concurrently (whichever connection they came on), and:
//!
//! - a sequence number above the applied mark is executed, becomes the
//!   applied mark, and its outcome is remembered;
//! - a number at or below it is not executed again: it is answered with the
//!   remembered outcome, or, if that was forgotten,
//!   [`DiskError::Stale`]. Reads are the exception: their data is not kept
//!   (it would cost up to [`crate::MAX_IO`] per entry), so a retry of a
//!   session's latest request that was a read reads again — harmless, a read
//!   changes nothing — and an older read is stale.
//!
//! So when a client's connection fails after it sent a write, and the write
//! is still queued in the server on the old connection (behind a
//! test-and-set, say) while the retry arrives on a new one, whichever of the
//! two gets the slot first executes the write and the other gets its
//! outcome; and if the client gave up on the write and wrote again, the old
//! copy finds the applied mark past it and does nothing.
//!
//! Bounds: at most [`MAX_SESSIONS`] sessions are kept. When a new session
//! arrives at a full table, the least recently used session that no open
//! connection uses is forgotten (a connection keeps the session of its
//! last request in use until it closes); if every session is in use the new
//! one is refused with [`DiskError::Busy`] (which a client retries). That
//! cannot happen in practice: a connection keeps at most one session in
//! use, and [`MAX_SESSIONS`] is above the server's connection limit
//! ([`crate::MAX_CONNECTIONS`]). A forgotten session, like
//! every session after a server restart, starts again from an applied mark
//! of 0: a retry of a request whose answer was lost then executes a second
//! time. That is harmless, because no newer request of the session can have
//! executed in between (a client sends its next request only after the
//! answer to this one, and a session is forgotten only when none of its
//! connections is open), writes are idempotent, and the client recognises
//! its own repeated test-and-set win (see [`crate::DiskClient::test_and_set`]).

use crate::proto::{DiskError, Op, Reply};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tracing::info;

/// Most sessions the server keeps.
pub const MAX_SESSIONS: usize = 1024;
/// Outcomes remembered per session: those of its latest requests. One would
/// do for [`crate::DiskClient`], which has one request outstanding at a
/// time; a few more cost little (no read data is kept).
pub const REPLY_CACHE: usize = 8;

/// What came of a request, as far as sessions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// It was new: executed.
    Executed,
    /// A retry of the session's latest request, a read: read again.
    ReadAgain,
    /// A retry: answered with the remembered outcome, not executed.
    Remembered,
    /// Older than the applied mark with its outcome forgotten, or
    /// inconsistent with what was remembered: not executed.
    Refused,
}

/// All sessions.
pub(crate) struct Sessions {
    table: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Orders uses, for least-recently-used eviction.
    clock: AtomicU64,
    evicted: AtomicU64,
    /// Sessions created since the server started.
    created: AtomicU64,
}

/// One session.
pub(crate) struct Slot {
    id: u64,
    /// The [`Sessions::clock`] at its last use.
    last_used: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The highest sequence number executed.
    applied: u64,
    /// (sequence number, op kind, outcome) of the latest requests, oldest
    /// first, at most [`REPLY_CACHE`].
    outcomes: VecDeque<(u64, &'static str, Outcome)>,
}

enum Outcome {
    Reply(Result<Reply, DiskError>),
    /// A read: its data is not kept.
    Read,
}

impl Sessions {
    pub(crate) fn new() -> Self {
        Sessions {
            table: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            created: AtomicU64::new(0),
        }
    }

    /// How many sessions are kept, and how many were evicted so far.
    pub(crate) fn counts(&self) -> (usize, u64) {
        (lock(&self.table).len(), self.evicted.load(Ordering::Relaxed))
    }

    /// How many sessions were created since the server started.
    pub(crate) fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// How many sessions an open connection uses now (holds a reference to,
    /// besides the table's).
    pub(crate) fn in_use(&self) -> usize {
        lock(&self.table).values().filter(|slot| Arc::strong_count(slot) > 1).count()
    }

    /// The slot of session `id`, created if new. The caller keeps the
    /// returned Arc while its connection is open: that keeps the session
    /// from being evicted.
    pub(crate) fn slot(&self, id: u64) -> Result<Arc<Slot>, DiskError> {
        let mut table = lock(&self.table);
        if let Some(slot) = table.get(&id) {
            let slot = slot.clone();
            self.touch(&slot);
            return Ok(slot);
        }
        if table.len() >= MAX_SESSIONS {
            // Held only by the table (count 1) means no connection uses it;
            // and no one can take a new reference without the table lock.
            let victim = table
                .values()
                .filter(|slot| Arc::strong_count(slot) == 1)
                .min_by_key(|slot| slot.last_used.load(Ordering::Relaxed))
                .map(|slot| slot.id);
            let Some(victim) = victim else {
                return Err(DiskError::Busy(format!(
                    "it keeps {MAX_SESSIONS} sessions, all in use by open connections"
                )));
            };
            table.remove(&victim);
            self.evicted.fetch_add(1, Ordering::Relaxed);
            info!(session = format_args!("{victim:016x}"), "forgot the least recently used session: the table is full");
        }
        let slot = Arc::new(Slot { id, last_used: AtomicU64::new(0), state: Mutex::new(State::default()) });
        self.created.fetch_add(1, Ordering::Relaxed);
        self.touch(&slot);
        table.insert(id, slot.clone());
        Ok(slot)
    }

    /// Marks `slot` as used now.
    pub(crate) fn touch(&self, slot: &Slot) {
        slot.last_used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Slot {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Handles request `seq` of this session: executes `op` with `execute`
    /// if it is new, else answers it from memory (see the module doc).
    /// Requests of one session are handled one at a time.
    pub(crate) fn handle(
        &self,
        seq: u64,
        op: Op,
        execute: impl FnOnce(Op) -> Result<Reply, DiskError>,
    ) -> (Result<Reply, DiskError>, Disposition) {
        let mut state = lock(&self.state);
        let kind = op.kind();
        if seq > state.applied {
            let is_read = matches!(op, Op::Read { .. });
            let result = execute(op);
            state.applied = seq;
            let outcome = if is_read { Outcome::Read } else { Outcome::Reply(result.clone()) };
            if state.outcomes.len() >= REPLY_CACHE {
                state.outcomes.pop_front();
            }
            state.outcomes.push_back((seq, kind, outcome));
            return (result, Disposition::Executed);
        }
        let applied = state.applied;
        match state.outcomes.iter().find(|(s, _, _)| *s == seq) {
            Some((_, was, _)) if *was != kind => (
                Err(DiskError::Invalid(format!("request {seq} of this session was a {was}, not a {kind}"))),
                Disposition::Refused,
            ),
            Some((_, _, Outcome::Reply(result))) => (result.clone(), Disposition::Remembered),
            Some((_, _, Outcome::Read)) if seq == applied => (execute(op), Disposition::ReadAgain),
            _ => (Err(DiskError::Stale { seq, applied }), Disposition::Refused),
        }
    }
}

/// Locks a mutex, ignoring poisoning: what it guards is consistent after
/// every statement.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
