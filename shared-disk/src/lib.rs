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
//! - the arbiter-only server ([`Server::start_arbiter`], `ftdisk
//!   --arbiter-only --listen ADDR --state PATH`): no image, only an
//!   arbitration record, kept in the file PATH exactly as `IMAGE.owner` is
//!   (created at generation 0 if missing, replaced atomically, surviving
//!   restarts). It answers test-and-set and record reads; reads, writes and
//!   flushes get [`DiskError::NoImage`]. It arbitrates who may go live, but
//!   fences nothing: storage elsewhere knows nothing of its generations;
//! - the blocking clients, usable from a VMM's vCPU thread, which reconnect
//!   and retry across server restarts: [`DiskClient`] for a disk, and
//!   [`Arbiter`] for arbitration alone, on either kind of server;
//! - request sessions ([`session`]): each client has a random session id and
//!   numbers its requests; the server executes each (session, number) at
//!   most once, answers a retry with the remembered outcome, and never
//!   executes a request after a newer one of its session, so a write retried
//!   after a lost connection is applied once and never overtaken by its own
//!   original (still queued in the server, or still in the network).
//!
//! - its metrics ([`metrics`]): counters of requests by kind, fencing,
//!   test-and-sets won and lost, sessions and connections, kept as atomics
//!   ([`Server::metrics`]), exposed to Prometheus and as a `/status`
//!   document by `ftdisk --metrics ADDR`;
//!
//! - transport security ([`secure`]): optionally mutual TLS on every
//!   connection (`ftdisk --tls-cert --tls-key --tls-ca`,
//!   [`Server::start_secured`], [`DiskClient::connect_secured`],
//!   [`Arbiter::connect_secured`]), and authorization by the client
//!   certificate's subject name (`--tls-allow`): an unlisted certificate
//!   may not read, write, flush or test-and-set ([`DiskError::Forbidden`]).
//!
//! # Arbitration from a VMM
//!
//! The API a VMM uses for go-live arbitration is the same on both kinds of
//! server (`--arbiter ftdisk:ADDR` or the record of `--disk ftdisk:ADDR`):
//!
//! ```no_run
//! use shared_disk::{Arbiter, ServerKind, TasOutcome};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), shared_disk::ClientError> {
//! // Waits up to 10 s for a server that is not up yet.
//! let mut arbiter = Arbiter::connect("10.0.0.3:7100", Duration::from_secs(10))?;
//! assert!(matches!(arbiter.kind(), ServerKind::ArbiterOnly | ServerKind::Disk { .. }));
//! // At boot: the generation the pair starts from, and a claim on it.
//! let expected = arbiter.generation()?;
//! match arbiter.test_and_set(expected, "backup pid 42 on host-b")? {
//!     TasOutcome::Won { generation } => println!("live at generation {generation}"),
//!     TasOutcome::Lost { generation, owner } => println!("{owner} won generation {generation}: halt"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`Arbiter::connect`], [`Arbiter::kind`], [`Arbiter::generation`],
//! [`Arbiter::owner`] and [`Arbiter::test_and_set`] block, retrying across
//! connection failures for [`Arbiter::retry_for`] (default
//! [`DEFAULT_RETRY_FOR`]) and then fail with [`ClientError::Unreachable`]:
//! the caller decides whether to keep trying (a side that cannot reach the
//! arbiter must not go live). [`DiskClient`] has the same `generation`,
//! `owner` and `test_and_set`; [`DiskClient::connect`] refuses an
//! arbiter-only server ([`ClientError::NoDisk`]).
//!
//! # Wire protocol (version 2)
//!
//! ```text
//! each side, at connect: magic "FTDISK01" | protocol version: u32 LE (2)
//! then frames:           payload length: u32 LE (at most MAX_FRAME) | payload: bincode (varint, MAX_FRAME limit)
//! client → server: Request  { session: u64, seq: u64, op: Op }
//! server → client: Response { seq: u64, result: Result<Reply, DiskError> }, one per request, in order
//! ```
//!
//! | [`Op`] | [`Reply`] on success |
//! | --- | --- |
//! | `Read { offset, len }` (len ≤ [`MAX_IO`]) | `Data(bytes)` |
//! | `Write { offset, data, generation }` (data ≤ [`MAX_IO`]) | `Done`, once written (not yet durable) |
//! | `Flush { generation }` | `Done`, once fdatasync'd |
//! | `TestAndSet { expected_generation, owner }` | `Won { generation }` or `Lost { generation, owner }` |
//! | `Owner` | `Owner { generation, owner }` |
//! | `Info` | `Info { size, arbiter_only }`: a disk server's size and false, or 0 and true |
//!
//! A transfer larger than [`MAX_IO`] gets [`DiskError::TooLarge`], one
//! outside the disk [`DiskError::OutOfRange`] (checked before fencing), a
//! write or flush with a stale generation [`DiskError::Fenced`], a read,
//! write or flush on an arbiter-only server [`DiskError::NoImage`]; nothing
//! is written in any of these cases. A request its session has moved past
//! gets its remembered outcome or [`DiskError::Stale`], and is not executed
//! ([`session`]). A peer with the wrong magic or version, an oversize,
//! truncated or undecodable frame has its connection closed (the server
//! logs one line). The bincode encoding of the types in [`proto`] is the
//! wire format: changing them means bumping [`PROTOCOL_VERSION`].
//!
//! With TLS the connection starts with a TLS handshake, and everything
//! above runs inside it. [`DiskError::Forbidden`] (appended to the error
//! enum, so every earlier encoding is unchanged) is sent only by a server
//! with an allow list.
//!
//! Version 2 (this one) added the session and sequence number to
//! requests (replacing version 1's request id), `arbiter_only` to the Info
//! reply, and the errors `NoImage`, `Stale` and `Busy`. Version 1 and 2
//! peers refuse each other at the preamble, each with a one-line error
//! naming both versions (a version-1 client reports the server as breaking
//! the protocol and does not retry), so a pair of VMMs and its ftdisk are
//! upgraded together. The arbitration record's file format is unchanged:
//! an `IMAGE.owner` written by a version-1 server is read as it is.

mod client;
pub mod metrics;
mod owner;
pub mod proto;
pub mod secure;
mod server;
pub mod session;
mod timed;

#[cfg(test)]
mod tests;

pub use client::{Arbiter, ClientError, DiskClient, ServerKind, TasOutcome, DEFAULT_RETRY_FOR};
pub use metrics::{DiskCollector, DiskMetrics, DiskSnapshot};
pub use proto::{DiskError, Op, Reply, Request, Response};
pub use secure::{read_allow_file, Access};
pub use server::{
    serve, serve_arbiter, Server, ServerError, ServerStats, FRAME_TIMEOUT, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT,
    MAX_CONNECTIONS, RETAINED_BUFFER,
};

/// Version of the protocol spoken here; a peer speaking another is refused.
pub const PROTOCOL_VERSION: u32 = 2;
/// First bytes each side sends on an ftdisk connection.
pub const MAGIC: &[u8; 8] = b"FTDISK01";
/// Largest read or write in one request. [`DiskClient`] splits larger
/// transfers.
pub const MAX_IO: u32 = 4 << 20;
/// Largest frame payload sent or accepted: room for [`MAX_IO`] bytes of data
/// and the message around them. Bounds what a corrupt length can make
/// either side allocate, and the frame buffer of each connection.
pub const MAX_FRAME: u32 = MAX_IO + (64 << 10);
/// Image sizes must be a multiple of this.
pub const SECTOR_SIZE: u64 = 512;
/// Longest owner name accepted by a test-and-set, in bytes.
pub const MAX_OWNER_LEN: usize = 256;
