//! The clock the harness reads the processes' logs by (microseconds since
//! the epoch, and tracing's UTC timestamps converted to them), and a
//! scenario's transcript: timestamped lines from every process, the client
//! and the harness, in full or condensed.

use crate::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (the ftdisk log's clock).
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-01T23:22:39.007191Z` (tracing's UTC timestamps) as
/// microseconds since the epoch.
pub(crate) fn parse_utc_us(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut micros = 0i64;
    if b.get(19) == Some(&b'.') {
        let frac: String = s[20..].chars().take_while(char::is_ascii_digit).collect();
        let mut f = frac.chars().take(6).collect::<String>();
        while f.len() < 6 {
            f.push('0');
        }
        micros = f.parse().ok()?;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    u64::try_from(secs * 1_000_000 + micros).ok()
}

/// A scenario's transcript: timestamped lines from every process, the
/// client and the harness.
#[derive(Clone)]
pub(crate) struct Transcript {
    pub(crate) start: Instant,
    lines: Arc<Mutex<Vec<(bool, String)>>>,
}

impl Transcript {
    pub(crate) fn new() -> Self {
        Transcript { start: Instant::now(), lines: Arc::default() }
    }

    fn line(&self, op: bool, msg: &str) {
        let t = self.start.elapsed().as_secs_f64();
        lock(&self.lines).push((op, format!("[{t:8.3}] {msg}")));
    }

    /// A notable event.
    pub(crate) fn say(&self, msg: impl AsRef<str>) {
        self.line(false, msg.as_ref());
    }

    /// One client operation (left out of the condensed transcript).
    pub(crate) fn op(&self, msg: impl AsRef<str>) {
        self.line(true, msg.as_ref());
    }

    pub(crate) fn full(&self) -> String {
        lock(&self.lines).iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// Every event, and only the last few operations before each one.
    pub(crate) fn condensed(&self) -> String {
        let lines = lock(&self.lines);
        let mut out = String::new();
        let mut pending: VecDeque<&str> = VecDeque::new();
        let mut skipped = 0;
        for (op, l) in lines.iter() {
            if *op {
                pending.push_back(l);
                if pending.len() > 6 {
                    pending.pop_front();
                    skipped += 1;
                }
                continue;
            }
            if skipped > 0 {
                out.push_str(&format!("           ... {skipped} client operations ...\n"));
                skipped = 0;
            }
            for p in pending.drain(..) {
                out.push_str(p);
                out.push('\n');
            }
            out.push_str(l);
            out.push('\n');
        }
        if skipped > 0 {
            out.push_str(&format!("           ... {skipped} client operations ...\n"));
        }
        for p in pending {
            out.push_str(p);
            out.push('\n');
        }
        out
    }
}
