//! `ftvmm status ADDR`: shows the `/status` of a running `ftvmm` or
//! `ftdisk` (its `--metrics ADDR`) to a person, as one screen of text, or
//! as its raw JSON for a script; with `--watch`, refreshed in place like
//! `top`. The HTTP client and the rendering are the `telemetry` crate's;
//! this module owns only the command's loop and its exit status.

use std::io::Write;
use std::time::Duration;

/// What `ftvmm status` was asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusConfig {
    /// The server's address, `host:port` (or `http://host:port/`).
    pub addr: String,
    /// Refresh until interrupted.
    pub watch: bool,
    /// Print the JSON document instead of the rendering (one line per
    /// refresh with `watch`).
    pub json: bool,
    /// Time between refreshes with `watch`.
    pub interval: Duration,
}

/// Clears a terminal and puts the cursor at its top left.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// Runs the command; returns the exit status: 0 when it showed a status
/// (for `--watch`: when its output was closed), 1 when the first fetch
/// failed (one line on stderr: `ftvmm: error: ...`).
pub fn run(config: &StatusConfig) -> u8 {
    let first = match telemetry::fetch_status(&config.addr) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("ftvmm: error: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut fetched = Ok(first);
    loop {
        let shown = match (&fetched, config.json, config.watch) {
            (Ok(status), true, _) => writeln!(out, "{status}"),
            (Ok(status), false, false) => write!(out, "{}", telemetry::render_status(status)),
            (Ok(status), false, true) => {
                write!(out, "{CLEAR}{}{}", header(config), telemetry::render_status(status))
            }
            // Later failures, while watching: shown, and tried again.
            (Err(e), true, _) => {
                eprintln!("ftvmm: error: {e} (retrying)");
                Ok(())
            }
            (Err(e), false, _) => write!(out, "{CLEAR}{}{e}\n(retrying)\n", header(config)),
        };
        // A closed output (`| head`) ends the command, quietly.
        if shown.and_then(|()| out.flush()).is_err() || !config.watch {
            return 0;
        }
        std::thread::sleep(config.interval);
        fetched = telemetry::fetch_status(&config.addr);
    }
}

/// The first line of a `--watch` screen.
fn header(config: &StatusConfig) -> String {
    format!("ftvmm status {}: every {:.1} s (Ctrl-C quits)\n\n", config.addr, config.interval.as_secs_f64())
}
