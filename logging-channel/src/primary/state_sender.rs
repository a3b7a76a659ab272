//! The state stream of a joining backup (or of a repair): pieces handed to
//! the network thread from any thread, within the backup's window, then the
//! stream's end.

use super::Shared;
use crate::{lock, ChannelError, LogStart, STATE_FRAME};
use std::sync::Arc;

/// A handle on a joining [`PrimaryLink`](super::PrimaryLink)'s state stream, for a thread other
/// than the one that holds the link: `Clone`, `Send` and `Sync`. Its calls
/// fail with [`ChannelError::Lost`] once the link is lost or dropped.
#[derive(Clone)]
pub struct StateSender {
    pub(super) shared: Arc<Shared>,
}

impl StateSender {
    /// [`PrimaryLink::send_state`](super::PrimaryLink::send_state).
    pub fn send_state(&self, chunk: Vec<u8>) -> Result<(), ChannelError> {
        send_state(&self.shared, chunk)
    }

    /// [`PrimaryLink::end_state`](super::PrimaryLink::end_state).
    pub fn end_state(&self, exit: u64) -> Result<(), ChannelError> {
        end_state(&self.shared, exit)
    }

    /// [`PrimaryLink::backup_lost`](super::PrimaryLink::backup_lost).
    pub fn backup_lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }

    /// Blocks until the backup's VMM has consumed every state byte handed
    /// over so far (so that what is sent next goes out at once); fails once
    /// the backup is lost.
    pub fn wait_consumed(&self) -> Result<(), ChannelError> {
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(why) = &st.lost {
                return Err(cut_short(why));
            }
            if st.state.consumed >= st.state.handed {
                return Ok(());
            }
            st = self.shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

fn no_state() -> ChannelError {
    ChannelError::Misuse(
        "this link's log starts at the guest's boot: it carries no state (accept a joining backup with accept_joining)"
            .into(),
    )
}

fn cut_short(why: &str) -> ChannelError {
    ChannelError::Lost(format!("the state transfer was cut short: {why}"))
}

/// Whether the link carries a state stream: a joining link, or one whose
/// stream was restarted for a repair.
pub(super) fn carries_state(shared: &Shared) -> bool {
    shared.start == LogStart::State || lock(&shared.state).state.restarted
}

pub(super) fn send_state(shared: &Shared, chunk: Vec<u8>) -> Result<(), ChannelError> {
    if !carries_state(shared) {
        return Err(no_state());
    }
    // Pieces no larger than the window, so that the window holds exactly.
    let piece = usize::try_from(shared.config.state_window).unwrap_or(usize::MAX).clamp(1, STATE_FRAME);
    let _whole = lock(&shared.sending);
    if chunk.len() <= piece {
        return hand_piece(shared, chunk);
    }
    for part in chunk.chunks(piece) {
        hand_piece(shared, part.to_vec())?;
    }
    Ok(())
}

/// Hands one piece to the writer once the window has room for it.
fn hand_piece(shared: &Shared, piece: Vec<u8>) -> Result<(), ChannelError> {
    let len = piece.len() as u64;
    let mut st = lock(&shared.state);
    loop {
        if let Some(why) = &st.lost {
            return Err(cut_short(why));
        }
        if st.state.end.is_some() {
            return Err(ChannelError::Misuse("send_state after end_state".into()));
        }
        let unconsumed = st.state.handed - st.state.consumed;
        if unconsumed == 0 || unconsumed + len <= shared.config.state_window {
            break;
        }
        st = shared.changed.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    if len == 0 {
        return Ok(());
    }
    st.state.handed += len;
    st.state.pieces.push_back(piece);
    #[cfg(test)]
    {
        st.state.peak_unconsumed = st.state.peak_unconsumed.max(st.state.handed - st.state.consumed);
    }
    drop(st);
    shared.wake.notify_one();
    Ok(())
}

pub(super) fn end_state(shared: &Shared, exit: u64) -> Result<(), ChannelError> {
    if !carries_state(shared) {
        return Err(no_state());
    }
    // After a chunk another thread is sending, never inside it.
    let _after = lock(&shared.sending);
    {
        let mut st = lock(&shared.state);
        if let Some(why) = &st.lost {
            return Err(cut_short(why));
        }
        if let Some(earlier) = st.state.end {
            return Err(ChannelError::Misuse(format!("end_state({exit}) after end_state({earlier})")));
        }
        st.state.end = Some(exit);
        st.resyncing = false;
    }
    shared.wake.notify_one();
    Ok(())
}
