//! A tiny blocking HTTP client: one GET, with a timeout on the whole of it
//! and a bound on the answer. Enough for `/status`, and for Prometheus's
//! query API in tests; not a general client (no redirects, no TLS, no
//! keep-alive).
//!
//! It speaks HTTP/1.0, so that servers delimit the body by closing the
//! connection rather than by chunked encoding; a chunked body is decoded
//! all the same, for a server that sends one anyway.

use crate::TelemetryError;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest answer (head and body) accepted, in bytes.
pub const MAX_RESPONSE: usize = 4 << 20;

/// An HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// `GET path` (with its query string, already percent-encoded) from the
/// server at `addr` (`host:port`): connecting, sending and reading the
/// whole answer must all be done within `timeout`. Any status code is a
/// success here; the caller judges it.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<HttpResponse, TelemetryError> {
    let deadline = Instant::now() + timeout;
    let target = resolve(addr)?;
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|source| TelemetryError::Connect { addr: addr.to_string(), source })?;
    let io = |what: &'static str| move |source| TelemetryError::Io { addr: addr.to_string(), what, source };
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_write_timeout(Some(left)).map_err(io("setting a timeout"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io("sending the request"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io("reading the answer")(std::io::Error::new(ErrorKind::TimedOut, "timed out")));
        }
        stream.set_read_timeout(Some(left)).map_err(io("setting a timeout"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                if raw.len() + n > MAX_RESPONSE {
                    return Err(TelemetryError::TooLarge { addr: addr.to_string() });
                }
                raw.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(io("reading the answer")(std::io::Error::new(ErrorKind::TimedOut, "timed out")));
            }
            Err(e) => return Err(io("reading the answer")(e)),
        }
    }
    parse_response(&raw).map_err(|why| TelemetryError::Malformed { addr: addr.to_string(), why })
}

/// The first socket address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr, TelemetryError> {
    let resolve_err = |why: String| TelemetryError::Resolve { addr: addr.to_string(), why };
    addr.to_socket_addrs()
        .map_err(|e| resolve_err(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_err("it resolves to no address".into()))
}

/// Splits a raw HTTP answer into status, content type and body.
fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let (head_len, sep) = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (i, 4),
        None => match raw.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (i, 2),
            None if raw.is_empty() => return Err("the server closed the connection without answering".into()),
            None => return Err("the answer is not HTTP (no end of its head)".into()),
        },
    };
    let head = std::str::from_utf8(&raw[..head_len]).map_err(|_| "the answer's head is not UTF-8".to_string())?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => {
            code.parse::<u16>().map_err(|_| format!("the status line {status_line:?} has no status code"))?
        }
        _ => return Err(format!("the answer is not HTTP (it starts {:?})", truncate(status_line, 40))),
    };
    let mut content_type = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = &raw[head_len + sep..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok(HttpResponse { status, content_type, body })
}

/// Decodes a chunked body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").ok_or("a chunk size line is unterminated")?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| "a chunk size is not text")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            return Err("a chunk is truncated".into());
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).ok_or("a chunk is unterminated")?;
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}\n").unwrap();
        assert_eq!((r.status, r.content_type.as_deref(), &r.body[..]), (200, Some("application/json"), &b"{}\n"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"").unwrap_err().contains("without answering"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap_err().contains("not HTTP"));
        assert!(parse_response(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nab").is_err());
    }
}
