//! resp: what the `redis` guest serves, apart from the network: the RESP2
//! request parser ([`parse`]), the key space ([`store`]), the write-ahead
//! log on the disk ([`log`]) and the command engine ([`engine`]).
//!
//! `no_std` and without a heap, so the guest links it; an ordinary library
//! on the host, so its unit tests run there. From `guest-images/guests`:
//!
//! ```text
//! cargo test -p resp --target-dir target/host
//! ```
//!
//! (The guests' .cargo/config.toml only adds codegen flags that host test
//! binaries tolerate; the freestanding link flags are given to the guest
//! binaries alone, by rt/link.rs. A separate target dir keeps the host
//! build from invalidating the guest one.)
//!
//! The entry point for a fuzzer is [`Engine::feed`]: any bytes in, replies
//! out (into a [`Sink`], e.g. a [`BufSink`] over a fixed buffer), never a
//! panic; [`parse::parse`] alone for the parser. A store for it:
//! `Store::new(&mut entries, &mut index)` over `[Entry::ZERO; N]` and
//! `[0u32; M]` (M a power of two, at least 2N).
#![cfg_attr(not(test), no_std)]

pub mod engine;
pub mod log;
pub mod parse;
pub mod store;

pub use engine::{BufSink, Engine, Fed, Sink, Status};
pub use log::{BlockDev, Journal, Loaded, LogError, NoDisk};
pub use store::{Entry, Store, StoreError, MAX_KEY, MAX_VALUE};

#[cfg(test)]
mod tests;
