//! shared-disk: the disk shared by the primary and backup VMMs, the `ftdisk`
//! server that holds it, and go-live arbitration with write fencing.
//!
//! This crate owns:
//!
//! - the storage server ([`Server`], and the `ftdisk` binary around it), which
//!   serves one raw image file (e.g. made by `qemu-img create -f raw`) to any
//!   number of VMMs over TCP; the guest-visible disk is the whole image;
//! - the go-live arbitration record, kept next to the image in the sidecar
//!   file `IMAGE.owner`: an owner generation and the owner's name. A VMM that
//!   wants to go live must first win an atomic test-and-set on it (like SCSI
//!   COMPARE AND WRITE, or VMware FT's atomic test-and-set on shared storage).
//!   Each win bumps the generation; the record is written atomically (temp
//!   file, fsync, rename, fsync of the directory) before the win is
//!   acknowledged, so it survives a restart of the server;
//! - fencing: every write and flush carries the writer's generation and is
//!   refused with [`DiskError::Fenced`] unless it equals the record's current
//!   generation, so a VMM that lost the race (or was superseded) cannot touch
//!   the disk any more. Generation 0 means "no one has gone live yet": writes
//!   tagged 0 are allowed only while the record is still at generation 0,
//!   which is what an unreplicated run (no test-and-set ever) uses;
//! - the blocking client ([`DiskClient`]), usable from a VMM's vCPU thread,
//!   which reconnects and retries across server restarts.
//!
//! # Wire protocol
//!
//! ```text
//! each side, at connect: magic "FTDISK01" | protocol version: u32 LE (1)
//! then frames:           payload length: u32 LE (at most 16 MiB) | payload: bincode (varint, 16 MiB limit)
//! client → server: Request  { id: u64, op: Op }
//! server → client: Response { id: u64, result: Result<Reply, DiskError> }, one per request, in order
//! ```
//!
//! | [`Op`] | [`Reply`] on success |
//! | --- | --- |
//! | `Read { offset, len }` (len ≤ [`MAX_IO`]) | `Data(bytes)` |
//! | `Write { offset, data, generation }` (data ≤ [`MAX_IO`]) | `Done`, once written (not yet durable) |
//! | `Flush { generation }` | `Done`, once fdatasync'd |
//! | `TestAndSet { expected_generation, owner }` | `Won { generation }` or `Lost { generation, owner }` |
//! | `Owner` | `Owner { generation, owner }` |
//! | `Info` | `Info { size }` |
//!
//! A transfer larger than [`MAX_IO`] gets [`DiskError::TooLarge`], one
//! outside the disk [`DiskError::OutOfRange`] (checked before fencing), a
//! write or flush with a stale generation [`DiskError::Fenced`]; nothing is
//! written in any of these cases. A peer with the wrong magic or version, an
//! oversize, truncated or undecodable frame has its connection closed (the
//! server logs one line). The bincode encoding of the types in [`proto`] is
//! the wire format: changing them means bumping [`PROTOCOL_VERSION`].

mod client;
mod owner;
pub mod proto;
mod server;

#[cfg(test)]
mod tests;

pub use client::{ClientError, DiskClient, TasOutcome, DEFAULT_RETRY_FOR};
pub use proto::{DiskError, Op, Reply, Request, Response};
pub use server::{serve, Server, ServerError};

/// Version of the protocol spoken here; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// First bytes each side sends on an ftdisk connection.
pub const MAGIC: &[u8; 8] = b"FTDISK01";
/// Largest frame payload sent or accepted: bounds what a corrupt length can
/// make us allocate.
pub const MAX_FRAME: u32 = 16 << 20;
/// Largest read or write in one request. [`DiskClient`] splits larger
/// transfers.
pub const MAX_IO: u32 = 4 << 20;
/// Image sizes must be a multiple of this.
pub const SECTOR_SIZE: u64 = 512;
/// Longest owner name accepted by a test-and-set, in bytes.
pub const MAX_OWNER_LEN: usize = 256;
