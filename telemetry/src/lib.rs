//! telemetry: how a person or a Prometheus server watches `ftvmm` and
//! `ftdisk` run. This crate owns:
//!
//! - [`MetricsServer`] ([`server`]): a small HTTP/1.1 server on one address
//!   (`--metrics ADDR`) answering `GET /metrics` with a
//!   [`prometheus_client`] registry in the OpenMetrics text format, and
//!   `GET /status` with a JSON document made on demand by the program;
//!   every other path gets 404. It is bounded in every direction: request
//!   heads of at most [`MAX_REQUEST_HEAD`] bytes, a whole request within
//!   [`REQUEST_TIMEOUT`], at most [`WORKERS`] connections served at once
//!   and [`QUEUED`] waiting (more are answered 503 and closed), and garbage
//!   on the socket gets a 4xx answer and a closed connection, never a
//!   panic;
//! - the client side of `/status` ([`status`]): [`fetch_status`] (a
//!   blocking GET with timeouts, [`http_get`] underneath, also usable for
//!   any small HTTP GET such as Prometheus's query API) and
//!   [`render_status`], one screen of plain text for a person (what
//!   `ftvmm status ADDR` prints);
//! - [`LatencyWindow`] ([`window`]): latencies of the last minute (p50,
//!   p99, max, count) in bounded memory, for `/status`; and [`RateWindow`],
//!   a per-second rate of a counter over the last few seconds;
//! - [`StateSet`] ([`state`]): one of a fixed list of states (the FT
//!   state), exposed as a gauge per state, 1 for the current one.
//!
//! The crate re-exports [`prometheus_client`], so a program registers its
//! metrics with the same version the server encodes.
//!
//! # Serving
//!
//! ```no_run
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use telemetry::prometheus_client::{metrics::counter::Counter, registry::Registry};
//!
//! # fn main() -> Result<(), telemetry::TelemetryError> {
//! let mut registry = Registry::default();
//! let exits: Counter = Counter::default();
//! registry.register("ftvmm_guest_exits", "Guest-caused exits", exits.clone()); // ftvmm_guest_exits_total
//! let server = telemetry::MetricsServer::start(
//!     "127.0.0.1:9400",
//!     Arc::new(registry),
//!     Arc::new(|| serde_json::json!({ "program": "ftvmm", "role": "primary", "state": "protected" })),
//! )?;
//! println!("metrics on http://{}/metrics", server.local_addr());
//! exits.inc();
//! # Ok(())
//! # }
//! ```
//!
//! The status closure runs on the server's thread for every `/status`
//! request: it should only read (atomics, a short lock), never block. A
//! closure that panics gets the request a 500 answer; the server goes on.
//!
//! # The `/status` document
//!
//! One JSON object. Every field is optional: [`render_status`] shows what
//! is there and skips what is not (and fields of the wrong type), so a
//! program fills what it knows. `null` reads as absent, except for `peer`
//! (shown as "none": there is no peer) and `last_failover` ("never"). Times are seconds (floats
//! where a fraction matters), instants are Unix times in seconds.
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `program` | string | `"ftvmm"` or `"ftdisk"` |
//! | `version` | string | the program's version |
//! | `now_unix` | number | the server's clock when it answered: "since" and "ago" are computed against it, so a client with a skewed clock shows the right durations |
//! | `uptime_seconds` | number | since the program started |
//! | `role` | string | ftvmm: `"primary"`, `"backup"`, `"solo"`, `"replay"`, ...; ftdisk: `"disk"` or `"arbiter"` |
//! | `state` | string | ftvmm: the FT state, e.g. `"protected"`, `"unprotected"`, `"going_live"`, `"halted"` |
//! | `reason` | string | why it is in that state, one line (e.g. `"backup attached"`, `"the backup's heartbeat stopped"`) |
//! | `since_unix` | number | when it entered that state |
//! | `peer` | string | the other VMM's address; absent or null when there is none |
//! | `lag.exits` | integer | how many guest exits the backup is behind the primary |
//! | `lag.seconds` | number | the same, as time |
//! | `log_bytes_per_second` | number | logging-channel bandwidth, recent |
//! | `commit_latency.p50_seconds`, `.p99_seconds`, `.max_seconds` | number | output-commit latency over the last minute ([`LatencyWindow::summary`] as [`WindowSummary::to_json`] makes it) |
//! | `commit_latency.count` | integer | outputs in that window |
//! | `commit_latency.window_seconds` | number | the window's length |
//! | `exits_per_second` | number | guest-caused exits per second, recent |
//! | `last_failover.unix` | number | when this VM last failed over (went live, or lost its backup) |
//! | `last_failover.reason` | string | why |
//! | `last_failover.from` | string | who it took over from (e.g. the old primary's address) |
//! | `disk.owner`, `disk.generation` | string, integer | ftdisk: the go-live arbitration record |
//! | `disk.size_bytes` | integer | ftdisk: the image's size (0: arbiter only) |
//! | `sessions.open`, `.kept`, `.total` | integer | ftdisk: client sessions in use by an open connection, kept, created since start |
//! | `connections` | integer | ftdisk: connections open now |
//! | `requests.total`, `requests.fenced_writes` | integer | ftdisk: requests received since start, and writes refused by fencing |
//! | `test_and_sets.won`, `.lost` | integer | ftdisk: go-live claims executed, by result |
//!
//! Fields the renderer does not know are shown at the end, `key: value`,
//! when they are scalars (so a program can add a line without touching
//! the renderer).

pub mod http;
pub mod server;
pub mod state;
pub mod status;
pub mod window;

pub use http::{http_get, HttpResponse, MAX_RESPONSE};
pub use prometheus_client;
pub use server::{MetricsServer, OnThreadStart, StatusFn, MAX_REQUEST_HEAD, QUEUED, REQUEST_TIMEOUT, WORKERS};
pub use state::StateSet;
pub use status::{fetch_status, render_status, render_status_at};
pub use window::{LatencyWindow, RateWindow, WindowSummary};

/// The content type of `/metrics`: the OpenMetrics text format, which
/// [`prometheus_client`] encodes and Prometheus (2.x and later) scrapes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What went wrong serving or fetching telemetry. Every message is one
/// line and names the address involved.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The metrics address cannot be listened on.
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A thread of the server could not be started.
    #[error("cannot start the metrics server's threads: {0}")]
    Spawn(#[source] std::io::Error),
    /// The address does not resolve to a socket address.
    #[error("cannot resolve {addr}: {why}")]
    Resolve { addr: String, why: String },
    /// Nothing answers at the address.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection failed or timed out while talking.
    #[error("{addr}: {what}: {source}")]
    Io {
        addr: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP, or not what was asked for.
    #[error("{addr}: {why}")]
    Malformed { addr: String, why: String },
    /// The server answered with an HTTP error.
    #[error("{addr}{path} answered HTTP {status}: {body}")]
    Status { addr: String, path: String, status: u16, body: String },
    /// The answer is larger than [`MAX_RESPONSE`].
    #[error("{addr}: the answer is larger than {MAX_RESPONSE} bytes")]
    TooLarge { addr: String },
    /// `/status` is not a JSON object.
    #[error("{addr}/status is not a JSON object: {why}")]
    NotJson { addr: String, why: String },
}
