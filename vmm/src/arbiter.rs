//! Go-live arbitration: the test-and-set a side must win before it goes live
//! (the backup when its primary is gone, the primary when its backup is),
//! so that a partition never leaves two live copies. It is done on the
//! shared disk's record (`--disk ftdisk:ADDR`), or on an arbiter-only
//! `ftdisk` (`--arbiter ftdisk:ADDR`) for a pair without a shared disk.

use crate::host::disk::{Claim, DiskPort};
use std::sync::Mutex;
use std::time::Duration;

/// An arbiter-only (or any) ftdisk's arbitration record.
pub struct RemoteArbiter(Mutex<shared_disk::Arbiter>);

impl RemoteArbiter {
    pub fn connect(addr: &str, tls: Option<credentials::Tls>) -> std::io::Result<Self> {
        let arbiter = shared_disk::Arbiter::connect_secured(addr, Duration::from_secs(10), tls)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(RemoteArbiter(Mutex::new(arbiter)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, shared_disk::Arbiter> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where this VMM arbitrates, if anywhere.
pub enum Arbitration<'a> {
    Remote(&'a RemoteArbiter),
    Disk(&'a DiskPort),
    /// Each side goes live on its own detection (a warning says so).
    None,
}

impl Arbitration<'_> {
    /// The record's generation (None: nothing to arbitrate on).
    pub fn generation(&self) -> std::io::Result<Option<u64>> {
        match self {
            Arbitration::Remote(a) => a.lock().generation().map(Some).map_err(|e| std::io::Error::other(e.to_string())),
            Arbitration::Disk(d) => d.generation(),
            Arbitration::None => Ok(None),
        }
    }

    /// The test-and-set from generation `expected` (None: nothing to
    /// arbitrate on).
    pub fn claim(&self, expected: u64, owner: &str) -> std::io::Result<Option<Claim>> {
        match self {
            Arbitration::Remote(a) => match a.lock().test_and_set(expected, owner) {
                Ok(shared_disk::TasOutcome::Won { generation }) => Ok(Some(Claim::Won { generation })),
                Ok(shared_disk::TasOutcome::Lost { generation, owner }) => Ok(Some(Claim::Lost { generation, owner })),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            },
            Arbitration::Disk(d) => d.claim(expected, owner),
            Arbitration::None => Ok(None),
        }
    }
}
