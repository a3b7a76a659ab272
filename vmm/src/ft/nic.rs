//! The host side of a VM's NIC, paired with the FT role: a backup drains
//! its TAP while it replays, and announces the VM's MAC when it goes live.

use crate::host::tap::{NetSpec, TapError, TapRx, TapTx};
use crate::inputs::FrameWaker;
use std::sync::Arc;

/// The host side of a VM's NIC: its TAP's receive queue and sender, the
/// waker of whichever run takes its frames, and the VM's MAC.
pub struct HostNic {
    pub rx: Arc<TapRx>,
    pub tx: TapTx,
    pub waker: FrameWaker,
    pub mac: [u8; 6],
}

/// Frames a TAP's receive queue holds before it drops (as a NIC does).
pub const RX_QUEUE_FRAMES: usize = 256;

impl HostNic {
    /// Opens the existing TAP `spec` names.
    pub fn open(spec: &NetSpec) -> Result<HostNic, TapError> {
        let waker = FrameWaker::default();
        let (rx, tx) = crate::host::tap::Tap::open(&spec.ifname)?.split(RX_QUEUE_FRAMES, waker.callback())?;
        Ok(HostNic { rx: Arc::new(rx), tx, waker, mac: spec.mac })
    }

    /// Going live: tells the LAN's bridges where the VM's MAC now is, with
    /// the RARP frames QEMU's announce-self sends, three times (now, then
    /// 50 and 150 ms later, in case one is lost).
    pub fn announce(&self) {
        let (tx, frame) = (self.tx.clone(), crate::host::tap::rarp_announce(self.mac));
        let _ = tx.write(&frame);
        std::thread::spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Nic);
            for delay in [50, 100] {
                std::thread::sleep(std::time::Duration::from_millis(delay));
                let _ = tx.write(&frame);
            }
        });
    }
}
