//! A real Prometheus server for tests: Debian's `prometheus` binary,
//! started on a free loopback port with a scrape and evaluation interval of
//! 1 s, scraping the targets a test names, and queried through its HTTP
//! API (`/api/v1/query`). It is killed, and its directory removed, when
//! dropped.
//!
//! A machine without `prometheus` fails the test that wants it, saying that
//! `.ci/run` installs it: tests never skip silently.

use crate::Scratch;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long Prometheus may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
    /// Its configuration, data and log; removed after the process is gone
    /// (dropping kills it first).
    _dir: Option<Scratch>,
}

/// The `prometheus` binary on PATH; panics saying how to get it.
pub fn prometheus_bin() -> PathBuf {
    find_on_path("prometheus").unwrap_or_else(|| {
        panic!(
            "the `prometheus` binary is not installed: `.ci/run` installs it (the Debian package `prometheus`; by \
             hand: apt-get install prometheus)"
        )
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// A free port on 127.0.0.1 (free when asked: another process may take it
/// before it is used, which [`Prometheus::start`] retries).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// The Prometheus configuration: one scrape job per distinct job name, in
/// the order first named.
fn config(targets: &[(&str, SocketAddr)]) -> String {
    let mut out = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
    );
    let mut jobs: Vec<&str> = Vec::new();
    for (job, _) in targets {
        if !jobs.contains(job) {
            jobs.push(job);
        }
    }
    for job in jobs {
        let addrs: Vec<String> =
            targets.iter().filter(|(j, _)| *j == job).map(|(_, addr)| format!("'{addr}'")).collect();
        out.push_str(&format!("  - job_name: '{job}'\n    static_configs:\n      - targets: [{}]\n", addrs.join(", ")));
    }
    out
}

impl Prometheus {
    /// Starts Prometheus scraping each `(job, address)` every second
    /// (`/metrics` on the address), and waits until it is ready.
    pub fn start(targets: &[(&str, SocketAddr)]) -> Prometheus {
        let bin = prometheus_bin();
        let dir = Scratch::new("prometheus");
        let config_path = dir.0.join("prometheus.yml");
        std::fs::write(&config_path, config(targets)).expect("write the Prometheus config");
        let log = dir.0.join("prometheus.log");
        let mut last_log = String::new();
        // The port is free when picked; if another process takes it first,
        // Prometheus exits, and we try another.
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let log_file = std::fs::File::create(&log).expect("create the Prometheus log");
            let child = Command::new(&bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--storage.tsdb.retention.time=1h")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut prometheus = Prometheus { child, addr, log: log.clone(), _dir: None };
            match prometheus.wait_ready() {
                Ok(()) => {
                    prometheus._dir = Some(dir);
                    return prometheus;
                }
                Err(why) => {
                    last_log = prometheus.log_tail();
                    if !last_log.contains("address already in use") {
                        panic!("Prometheus did not start: {why}\n--- its log ---\n{last_log}");
                    }
                }
            }
        }
        panic!("Prometheus did not start: every port tried was taken\n--- its log ---\n{last_log}");
    }

    /// Polls `/-/ready` until it answers 200.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("it exited ({status})"));
            }
            if let Ok(answer) = telemetry::http_get(&self.addr, "/-/ready", Duration::from_secs(2)) {
                if answer.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready after {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its HTTP address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Evaluates `promql` now: the value of the first series of a vector
    /// (use `sum(...)` and the like for one series), or of a scalar;
    /// `None` for an empty result. Panics on an API error (a bad query).
    pub fn query(&self, promql: &str) -> Option<f64> {
        let answer = self.api(&format!("/api/v1/query?query={}", percent_encode(promql)));
        let data = &answer["data"];
        let value = match data["resultType"].as_str() {
            Some("vector") => data["result"].get(0).map(|series| &series["value"])?,
            Some("scalar") => &data["result"],
            other => panic!("query {promql:?}: unexpected result type {other:?}: {answer}"),
        };
        let text = value.get(1).and_then(|v| v.as_str()).unwrap_or_else(|| panic!("no value in {answer}"));
        Some(text.parse().unwrap_or_else(|_| panic!("query {promql:?}: value {text:?} is not a number")))
    }

    /// Waits until `promql` has a value for which `want` holds, and returns
    /// it; panics after `timeout` with the last value, the targets'
    /// health and Prometheus's log.
    pub fn wait_for(&self, promql: &str, timeout: Duration, want: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.query(promql);
            if let Some(v) = value.filter(|v| want(*v)) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{promql} never had the wanted value in {timeout:?} (last: {value:?})\ntargets: {}\n--- log ---\n{}",
                    self.targets(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Each target's job, address, health and last error, one per line.
    pub fn targets(&self) -> String {
        let answer = self.api("/api/v1/targets?state=active");
        let Some(active) = answer["data"]["activeTargets"].as_array() else { return answer.to_string() };
        active
            .iter()
            .map(|t| {
                format!(
                    "{} {} {} {}",
                    t["labels"]["job"].as_str().unwrap_or("?"),
                    t["scrapeUrl"].as_str().unwrap_or("?"),
                    t["health"].as_str().unwrap_or("?"),
                    t["lastError"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// GET `path` from the API: its JSON, which must say `"status":
    /// "success"`.
    fn api(&self, path: &str) -> serde_json::Value {
        let answer = telemetry::http_get(&self.addr, path, API_TIMEOUT)
            .unwrap_or_else(|e| panic!("Prometheus API {path}: {e}\n--- log ---\n{}", self.log_tail()));
        let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
            panic!("Prometheus API {path}: not JSON ({e}): {}", String::from_utf8_lossy(&answer.body))
        });
        assert_eq!(json["status"], "success", "Prometheus API {path} (HTTP {}): {json}", answer.status);
        json
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_job_per_name() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let text = config(&[("ftvmm", a), ("ftdisk", b), ("ftvmm", b)]);
        assert!(text
            .contains("  - job_name: 'ftvmm'\n    static_configs:\n      - targets: ['127.0.0.1:1', '127.0.0.1:2']\n"));
        assert!(text.contains("  - job_name: 'ftdisk'\n    static_configs:\n      - targets: ['127.0.0.1:2']\n"));
        assert_eq!(percent_encode("up{job=\"x\"} == 1"), "up%7Bjob%3D%22x%22%7D%20%3D%3D%201");
    }
}
