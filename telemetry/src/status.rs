//! The client side of `/status`: fetching the document ([`fetch_status`])
//! and rendering it as one screen of plain text for a person
//! ([`render_status`]), which is what `ftvmm status ADDR` prints. The
//! document's fields are in the crate doc; the renderer shows those that
//! are present, in a fixed order, then any other scalar fields.
//!
//! Strings from the server are shown with control characters replaced and
//! cut to [`MAX_FIELD`] characters: a status server cannot move the
//! cursor or flood the screen of whoever watches it.

use crate::http::http_get;
use crate::TelemetryError;
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long [`fetch_status`] waits for an answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest string value shown, in characters.
pub const MAX_FIELD: usize = 200;

/// Fetches `/status` from `addr` (`host:port`, or `http://host:port/`):
/// the JSON object the server answers.
pub fn fetch_status(addr: &str) -> Result<Value, TelemetryError> {
    let addr = addr.strip_prefix("http://").unwrap_or(addr).trim_end_matches('/');
    let answer = http_get(addr, "/status", FETCH_TIMEOUT)?;
    if answer.status != 200 {
        let body = String::from_utf8_lossy(&answer.body);
        let first = body.lines().next().unwrap_or_default();
        return Err(TelemetryError::Status {
            addr: addr.to_string(),
            path: "/status".into(),
            status: answer.status,
            body: clean(first),
        });
    }
    let value: Value = serde_json::from_slice(&answer.body)
        .map_err(|e| TelemetryError::NotJson { addr: addr.to_string(), why: e.to_string() })?;
    if !value.is_object() {
        return Err(TelemetryError::NotJson { addr: addr.to_string(), why: "it is not an object".into() });
    }
    Ok(value)
}

/// One screen of text for a person: [`render_status_at`] against this
/// host's clock (used only when the document has no `now_unix`).
pub fn render_status(status: &Value) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    render_status_at(status, now)
}

/// Fields shown by name, in this order; other scalar fields follow.
const KNOWN: &[&str] = &[
    "program",
    "version",
    "now_unix",
    "uptime_seconds",
    "role",
    "state",
    "reason",
    "since_unix",
    "peer",
    "lag",
    "log_bytes_per_second",
    "commit_latency",
    "exits_per_second",
    "last_failover",
    "disk",
    "sessions",
    "connections",
    "requests",
    "test_and_sets",
];

/// The status as lines of `label  value`; `now_unix` is the local clock,
/// used when the document has no `now_unix` of its own. Missing fields are
/// left out; a document that is not an object renders as one line saying
/// so.
pub fn render_status_at(status: &Value, now_unix: f64) -> String {
    let Some(doc) = status.as_object() else {
        return format!("(not a status document: {})\n", clean(&status.to_string()));
    };
    let now = num(doc, "now_unix").unwrap_or(now_unix);
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut add = |label: &str, value: String| lines.push((label.to_string(), value));

    match (text(doc, "program"), text(doc, "version")) {
        (Some(p), Some(v)) => add("program", format!("{p} {v}")),
        (Some(p), None) => add("program", p),
        (None, Some(v)) => add("version", v),
        (None, None) => {}
    }
    if let Some(role) = text(doc, "role") {
        add("role", role);
    }
    if let Some(state) = text(doc, "state") {
        add("state", state);
    }
    if let Some(reason) = text(doc, "reason") {
        add("reason", reason);
    }
    if let Some(since) = num(doc, "since_unix") {
        add("since", when(since, now));
    }
    match doc.get("peer") {
        Some(Value::Null) => add("peer", "none".into()),
        Some(_) => add("peer", text(doc, "peer").unwrap_or_default()),
        None => {}
    }
    if let Some(lag) = doc.get("lag").and_then(Value::as_object) {
        let mut parts = Vec::new();
        if let Some(exits) = num(lag, "exits") {
            parts.push(format!("{} exits", count(exits)));
        }
        if let Some(seconds) = num(lag, "seconds") {
            parts.push(duration(seconds));
        }
        if !parts.is_empty() {
            add("lag", parts.join(", "));
        }
    }
    if let Some(rate) = num(doc, "log_bytes_per_second") {
        add("log", format!("{}/s", bytes(rate)));
    }
    if let Some(commit) = doc.get("commit_latency").and_then(Value::as_object) {
        add("commit", latency(commit));
    }
    if let Some(rate) = num(doc, "exits_per_second") {
        add("exits", format!("{}/s", per_second(rate)));
    }
    match doc.get("last_failover") {
        Some(Value::Null) => add("failover", "never".into()),
        Some(Value::Object(failover)) => {
            let mut line = num(failover, "unix").map(|t| when(t, now)).unwrap_or_default();
            if let Some(reason) = text(failover, "reason") {
                line = if line.is_empty() { reason } else { format!("{line}: {reason}") };
            }
            if let Some(from) = text(failover, "from") {
                line = format!("{line} (from {from})").trim_start().to_string();
            }
            add("failover", line);
        }
        _ => {}
    }
    if let Some(disk) = doc.get("disk").and_then(Value::as_object) {
        let mut parts = Vec::new();
        match (text(disk, "owner"), num(disk, "generation")) {
            (_, Some(0.0)) => parts.push("no owner yet (generation 0)".to_string()),
            (Some(owner), Some(g)) => parts.push(format!("owned by {owner} (generation {})", count(g))),
            (Some(owner), None) => parts.push(format!("owned by {owner}")),
            (None, Some(g)) => parts.push(format!("generation {}", count(g))),
            (None, None) => {}
        }
        match num(disk, "size_bytes") {
            Some(0.0) => parts.push("arbiter only, no image".into()),
            Some(size) => parts.push(format!("{} image", bytes(size))),
            None => {}
        }
        if !parts.is_empty() {
            add("disk", parts.join(", "));
        }
    }
    if let Some(sessions) = doc.get("sessions").and_then(Value::as_object) {
        let parts: Vec<String> = [("open", "open"), ("kept", "kept"), ("total", "since start")]
            .iter()
            .filter_map(|(key, what)| num(sessions, key).map(|n| format!("{} {what}", count(n))))
            .collect();
        if !parts.is_empty() {
            add("sessions", parts.join(", "));
        }
    }
    if let Some(n) = num(doc, "connections") {
        add("connections", count(n));
    }
    if let Some(requests) = doc.get("requests").and_then(Value::as_object) {
        let mut parts = Vec::new();
        if let Some(n) = num(requests, "total") {
            parts.push(format!("{} since start", count(n)));
        }
        if let Some(n) = num(requests, "fenced_writes") {
            parts.push(format!("{} fenced writes", count(n)));
        }
        if !parts.is_empty() {
            add("requests", parts.join(", "));
        }
    }
    if let Some(tas) = doc.get("test_and_sets").and_then(Value::as_object) {
        let parts: Vec<String> =
            ["won", "lost"].iter().filter_map(|key| num(tas, key).map(|n| format!("{} {key}", count(n)))).collect();
        if !parts.is_empty() {
            add("test-and-sets", parts.join(", "));
        }
    }
    if let Some(uptime) = num(doc, "uptime_seconds") {
        add("uptime", duration(uptime));
    }
    for (key, value) in doc {
        if KNOWN.contains(&key.as_str()) {
            continue;
        }
        let shown = match value {
            Value::Null => continue,
            Value::String(s) => clean(s),
            Value::Bool(_) | Value::Number(_) => value.to_string(),
            Value::Array(_) | Value::Object(_) => clean(&value.to_string()),
        };
        add(&clean(key), shown);
    }

    let width = lines.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in &lines {
        let _ = writeln!(out, "{label:<width$}  {value}");
    }
    if out.is_empty() {
        out.push_str("(the status document is empty)\n");
    }
    out
}

/// `p50 .., p99 .., max .. (N outputs, last 60 s)`.
fn latency(commit: &Map<String, Value>) -> String {
    let mut parts = Vec::new();
    for (key, label) in [("p50_seconds", "p50"), ("p99_seconds", "p99"), ("max_seconds", "max")] {
        if let Some(s) = num(commit, key) {
            parts.push(format!("{label} {}", duration(s)));
        }
    }
    let mut line = parts.join(", ");
    let window = num(commit, "window_seconds").map(|w| format!("last {w:.0} s"));
    let outputs = num(commit, "count").map(|n| format!("{} outputs", count(n)));
    let context: Vec<String> = [outputs, window].into_iter().flatten().collect();
    if num(commit, "count") == Some(0.0) {
        line = "no outputs".into();
        if let Some(w) = num(commit, "window_seconds") {
            line.push_str(&format!(" in the last {w:.0} s"));
        }
    } else if !context.is_empty() {
        line = format!("{line} ({})", context.join(", ")).trim_start().to_string();
    }
    line
}

/// A string field, cleaned; numbers and booleans are shown as text too.
fn text(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) => Some(clean(s)),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A numeric field (finite only).
fn num(map: &Map<String, Value>, key: &str) -> Option<f64> {
    map.get(key)?.as_f64().filter(|v| v.is_finite())
}

/// Control characters replaced, cut to [`MAX_FIELD`] characters.
fn clean(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_FIELD).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().nth(MAX_FIELD).is_some() {
        out.push('…');
    }
    out
}

/// An instant, in UTC, and how long before `now` it was.
fn when(unix: f64, now: f64) -> String {
    let ago = now - unix;
    let ago = if ago >= 0.0 { format!("{} ago", duration(ago)) } else { "in the future: clocks differ".into() };
    format!("{} ({ago})", utc(unix))
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(unix: f64) -> String {
    if !(0.0..1e11).contains(&unix) {
        return format!("{unix} (Unix time)");
    }
    let secs = unix as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A duration for a person: `850 us`, `2.31 ms`, `4.20 s`, `3m12s`, `2h05m`, `3d04h`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 60.0 {
        format!("{s:.2} s")
    } else {
        let whole = s as u64;
        let (d, h, m, sec) = (whole / 86_400, whole / 3600 % 24, whole / 60 % 60, whole % 60);
        match (d, h) {
            (0, 0) => format!("{m}m{sec:02}s"),
            (0, _) => format!("{h}h{m:02}m"),
            _ => format!("{d}d{h:02}h"),
        }
    }
}

/// A byte count: `512 B`, `1.5 KiB`, `12.0 MiB`, `1.25 GiB`.
fn bytes(n: f64) -> String {
    let n = n.max(0.0);
    match n {
        n if n < 1024.0 => format!("{n:.0} B"),
        n if n < 1024.0 * 1024.0 => format!("{:.1} KiB", n / 1024.0),
        n if n < 1024.0 * 1024.0 * 1024.0 => format!("{:.1} MiB", n / (1024.0 * 1024.0)),
        n => format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0)),
    }
}

/// A count: whole numbers without a fraction.
fn count(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n:.1}")
    }
}

/// A rate: whole above 100, one decimal below.
fn per_second(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_every_field_of_an_ftvmm_status() {
        let doc = json!({
            "program": "ftvmm", "version": "0.1.0", "now_unix": 1_765_000_200.0, "uptime_seconds": 3725.0,
            "role": "primary", "state": "protected", "reason": "backup attached", "since_unix": 1_765_000_008.0,
            "peer": "10.0.0.2:7000", "lag": {"exits": 12, "seconds": 0.0004},
            "log_bytes_per_second": 1_572_864.0,
            "commit_latency": {"p50_seconds": 0.00021, "p99_seconds": 0.00103, "max_seconds": 0.0021, "count": 1234, "window_seconds": 60},
            "exits_per_second": 12345.4,
            "last_failover": {"unix": 1_765_000_000.0, "reason": "the primary's heartbeat stopped", "from": "10.0.0.1:7000"},
            "extra_line": "shown at the end"
        });
        let text = render_status_at(&doc, 0.0);
        let want = "\
program     ftvmm 0.1.0
role        primary
state       protected
reason      backup attached
since       2025-12-06 05:46:48 UTC (3m12s ago)
peer        10.0.0.2:7000
lag         12 exits, 400 us
log         1.5 MiB/s
commit      p50 210 us, p99 1.03 ms, max 2.10 ms (1234 outputs, last 60 s)
exits       12345/s
failover    2025-12-06 05:46:40 UTC (3m20s ago): the primary's heartbeat stopped (from 10.0.0.1:7000)
uptime      1h02m
extra_line  shown at the end
";
        assert_eq!(text, want);
    }

    #[test]
    fn renders_an_ftdisk_status_and_tolerates_missing_fields() {
        let doc = json!({
            "program": "ftdisk", "role": "disk",
            "disk": {"owner": "backup@b", "generation": 2, "size_bytes": 67_108_864},
            "sessions": {"open": 1, "kept": 3, "total": 3}, "connections": 1,
            "requests": {"total": 120, "fenced_writes": 2}, "test_and_sets": {"won": 1, "lost": 1},
            "peer": null, "last_failover": null, "lag": {}, "commit_latency": {"count": 0, "window_seconds": 60}
        });
        let text = render_status_at(&doc, 0.0);
        assert!(text.contains("disk           owned by backup@b (generation 2), 64.0 MiB image\n"), "{text}");
        assert!(text.contains("sessions       1 open, 3 kept, 3 since start\n"), "{text}");
        assert!(text.contains("requests       120 since start, 2 fenced writes\n"), "{text}");
        assert!(text.contains("test-and-sets  1 won, 1 lost\n"), "{text}");
        assert!(text.contains("peer           none\n"), "{text}");
        assert!(text.contains("failover       never\n"), "{text}");
        assert!(text.contains("commit         no outputs in the last 60 s\n"), "{text}");
        assert!(!text.contains("lag"), "{text}");
        assert_eq!(render_status_at(&json!({}), 0.0), "(the status document is empty)\n");
        assert!(render_status_at(&json!([1, 2]), 0.0).starts_with("(not a status document"));
        // Wrong types are skipped, not trusted.
        let odd = json!({"state": {"x": 1}, "since_unix": "yesterday", "lag": 3, "connections": "many"});
        assert_eq!(render_status_at(&odd, 0.0), "(the status document is empty)\n");
    }

    #[test]
    fn cleans_strings_from_the_server() {
        let doc = json!({"reason": "a\u{1b}[2Jb\nc", "peer": "x".repeat(500)});
        let text = render_status_at(&doc, 0.0);
        assert!(text.contains("reason  a?[2Jb?c\n"), "{text}");
        assert!(!text.contains('\u{1b}'));
        let peer_line = text.lines().find(|l| l.starts_with("peer")).unwrap();
        assert_eq!(peer_line.chars().count(), "peer    ".len() + MAX_FIELD + 1);
    }

    #[test]
    fn formats_durations_dates_and_sizes() {
        assert_eq!(duration(0.00085), "850 us");
        assert_eq!(duration(0.00231), "2.31 ms");
        assert_eq!(duration(4.2), "4.20 s");
        assert_eq!(duration(7500.0), "2h05m");
        assert_eq!(duration(3.0 * 86400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(4_102_444_799.0), "2099-12-31 23:59:59 UTC");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(count(3.0), "3");
        assert_eq!(when(100.0, 50.0), "1970-01-01 00:01:40 UTC (in the future: clocks differ)");
    }
}
