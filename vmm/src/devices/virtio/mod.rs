//! Virtio devices: one virtio-mmio transport ([`mmio`]) carries every
//! device, each a small handler behind [`VirtioDevice`] ([`block`]: the
//! disk; [`net`]: the NIC; [`console`]: the buffered console).
//!
//! A device does its work only when the guest notifies one of its queues —
//! a guest-caused exit — or when the run loop hands it an external input at
//! a position (a received frame), so DMA into guest memory always happens at
//! positions and a replay repeats it exactly.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;

use crate::memory::GuestMem;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// VIRTIO_F_VERSION_1: a virtio 1.x device (the only kind ftvmm has).
pub const F_VERSION_1: u64 = 1 << 32;

/// Virtio device ids.
pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLOCK: u32 = 2;
pub const DEVICE_ID_CONSOLE: u32 = 3;

/// Why a virtio device stopped serving its queues: the guest broke a ring.
/// The device then stops until the driver resets it, as the spec's
/// DEVICE_NEEDS_RESET has it.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("{ring} ring: {err}")]
    Queue { ring: &'static str, err: virtio_queue::Error },
    #[error("{ring} ring: chain head {head} outside a queue of {size}")]
    HeadOutOfRange { ring: &'static str, head: u16, size: u16 },
    #[error("completing {ring} chain {head}: {err}")]
    Used { ring: &'static str, head: u16, err: virtio_queue::Error },
}

/// Why a saved device state cannot be restored into this VM's devices
/// (a snapshot or a transferred state of another configuration, or corrupt).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the saved VM has {saved} {what}, this one {ours}")]
    Mismatch { what: &'static str, saved: String, ours: String },
    #[error("the saved virtio devices are of other kinds than this VM's")]
    DeviceKinds,
    #[error("invalid saved virtqueue: {0}")]
    Queue(virtio_queue::Error),
    #[error("invalid saved UART state: {0}")]
    Uart(String),
}

/// What a virtio device model provides to the transport.
pub trait VirtioDevice {
    /// What a queue notification needs from the run loop beyond guest
    /// memory (the disk's storage and log for the disk, say).
    type Io<'a>: ?Sized;
    /// The device's own part of its saved state.
    type State: Serialize + DeserializeOwned;

    /// The virtio device id ([`DEVICE_ID_BLOCK`], [`DEVICE_ID_NET`]...).
    fn device_id(&self) -> u32;
    /// The features the device offers ([`F_VERSION_1`] included).
    fn features(&self) -> u64;
    /// The largest size of each of its queues; their number is its length.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Reads device config space at `offset`; bytes beyond it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver reset the device: return to the power-on state.
    fn reset(&mut self);
    /// The driver notified queue `index` (a valid, ready queue). Returns
    /// whether the device used buffers and should interrupt the guest, or
    /// why a ring is broken (the device then stops until a reset).
    fn queue_notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMem,
        io: &mut Self::Io<'_>,
    ) -> Result<bool, RingError>;
    /// The device's state, to save or digest.
    fn state(&self) -> Self::State;
    /// Restores a saved state, or says why it cannot be this device's.
    fn restore(&mut self, state: Self::State) -> Result<(), RestoreError>;
}

/// One virtqueue's state, as saved (virtio-queue's [`QueueState`] is not
/// serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl SavedQueue {
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        SavedQueue {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }

    /// The queue this state describes, or why it cannot be one.
    pub fn to_queue(&self) -> Result<Queue, RestoreError> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(RestoreError::Queue)
    }
}
