//! The command engine: runs parsed requests against the store, writes RESP2
//! replies, and logs every write command to the journal.
//!
//! [`Engine::feed`] answers every complete command at the start of a
//! connection's input (pipelining) and says how much input it consumed. It
//! stops, consuming nothing more, at an incomplete command (wait for more
//! bytes) and at a command whose reply would not fit in the output
//! ([`Status::NeedRoom`]: call again once there is room), so no reply byte
//! is ever lost. Replies to write commands are in the output before their
//! records are durable: the caller must [`Engine::commit`] before it lets
//! any output go out (one commit covers the whole round, for all
//! connections: group commit).

use crate::log::{op, BlockDev, Journal, LogError};
use crate::parse::{parse, parse_i64, Parsed, Span, MAX_ARGS};
use crate::store::{Store, StoreError, MAX_KEY, MAX_VALUE};

/// Where replies go: a connection's transmit buffer.
pub trait Sink {
    /// Bytes that can be put now.
    fn room(&self) -> usize;
    /// Bytes that could be put if the buffer were empty.
    fn capacity(&self) -> usize;
    /// Appends `data`; never called with more than `room()` bytes.
    fn put(&mut self, data: &[u8]);
}

/// A sink over a caller's buffer (a fuzzer's, or a test's).
pub struct BufSink<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> BufSink<'b> {
    pub fn new(buf: &'b mut [u8]) -> Self {
        BufSink { buf, len: 0 }
    }

    /// What was put so far.
    pub fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Forgets what was put (as if it had been sent).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Sink for BufSink<'_> {
    fn room(&self) -> usize {
        self.buf.len() - self.len
    }
    fn capacity(&self) -> usize {
        self.buf.len()
    }
    fn put(&mut self, data: &[u8]) {
        let n = data.len().min(self.room());
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
    }
}

/// An unbounded sink (tests).
#[cfg(test)]
impl Sink for Vec<u8> {
    fn room(&self) -> usize {
        usize::MAX / 2
    }
    fn capacity(&self) -> usize {
        usize::MAX / 2
    }
    fn put(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// Why [`Engine::feed`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Every complete command was answered; the rest (if any) is the start
    /// of one that needs more bytes.
    NeedInput,
    /// The next command's reply does not fit in the output yet.
    NeedRoom,
    /// Close the connection once the output is sent (QUIT, or a protocol
    /// error whose reply is the last output).
    Close,
    /// SHUTDOWN: stop the server (once the round's writes are committed).
    Shutdown,
}

/// What [`Engine::feed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fed {
    /// Input bytes consumed (answered); drop them from the input.
    pub consumed: usize,
    pub status: Status,
}

/// Output room every reply but GET, MGET and ECHO fits in.
const SMALL_REPLY: usize = 512;
/// Bytes of a bulk reply besides the data: `$`, length, CRLF, CRLF.
const BULK_OVERHEAD: usize = 16;

enum Exec {
    Done,
    NoRoom,
    Close,
    Shutdown,
}

/// The server's state: the store, the journal, and per-request scratch.
pub struct Engine<'a, D: BlockDev> {
    store: Store<'a>,
    journal: Option<Journal<'a, D>>,
    spans: [Span; MAX_ARGS],
    max_request: usize,
    failed: bool,
    commands: u64,
}

/// Whether a command name (any case) is `name` (lower case).
fn is(arg: &[u8], name: &str) -> bool {
    arg.eq_ignore_ascii_case(name.as_bytes())
}

fn put_int_digits(out: &mut impl Sink, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut m = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        out.put(b"-");
    }
    out.put(&digits[at..]);
}

fn simple(out: &mut impl Sink, text: &str) {
    out.put(b"+");
    out.put(text.as_bytes());
    out.put(b"\r\n");
}

fn error(out: &mut impl Sink, text: &str) {
    out.put(b"-");
    out.put(text.as_bytes());
    out.put(b"\r\n");
}

fn integer(out: &mut impl Sink, n: i64) {
    out.put(b":");
    put_int_digits(out, n);
    out.put(b"\r\n");
}

fn bulk(out: &mut impl Sink, data: &[u8]) {
    out.put(b"$");
    put_int_digits(out, data.len() as i64);
    out.put(b"\r\n");
    out.put(data);
    out.put(b"\r\n");
}

fn nil(out: &mut impl Sink) {
    out.put(b"$-1\r\n");
}

fn array(out: &mut impl Sink, len: usize) {
    out.put(b"*");
    put_int_digits(out, len as i64);
    out.put(b"\r\n");
}

/// Puts `text` with CR, LF and quotes replaced, cut at `max` bytes (for
/// echoing client bytes in an error line).
fn sanitized(out: &mut impl Sink, text: &[u8], max: usize) {
    for &b in text.iter().take(max) {
        out.put(&[if b == b'\r' || b == b'\n' || b == b'\'' { b' ' } else { b }]);
    }
}

fn arity(out: &mut impl Sink, name: &[u8]) {
    out.put(b"-ERR wrong number of arguments for '");
    for &b in name.iter().take(32) {
        out.put(&[b.to_ascii_lowercase()]);
    }
    out.put(b"' command\r\n");
}

fn unknown(out: &mut impl Sink, args: &[&[u8]]) {
    out.put(b"-ERR unknown command '");
    sanitized(out, args[0], 128);
    out.put(b"', with args beginning with: ");
    let mut budget = 128usize;
    for arg in args[1..].iter().take(8) {
        if budget == 0 {
            break;
        }
        let n = arg.len().min(budget);
        out.put(b"'");
        sanitized(out, arg, n);
        out.put(b"' ");
        budget -= n;
    }
    out.put(b"\r\n");
}

fn log_error(out: &mut impl Sink, failed: &mut bool, e: LogError) {
    match e {
        LogError::Full => error(out, "ERR disk full: the write was not done"),
        LogError::TooLarge => error(out, "ERR request too large to log: the write was not done"),
        LogError::Io => {
            *failed = true;
            error(out, "ERR disk I/O error: the write was not done");
        }
    }
}

impl<'a, D: BlockDev> Engine<'a, D> {
    /// An engine over `store` (already loaded from the journal, if any).
    /// `max_request` is the largest request a connection can buffer: an
    /// incomplete request that long is a protocol error.
    pub fn new(store: Store<'a>, journal: Option<Journal<'a, D>>, max_request: usize) -> Self {
        Engine { store, journal, spans: [Span::default(); MAX_ARGS], max_request, failed: false, commands: 0 }
    }

    pub fn store(&self) -> &Store<'a> {
        &self.store
    }

    /// Whether writes go to a disk.
    pub fn persistent(&self) -> bool {
        self.journal.is_some()
    }

    pub fn journal(&mut self) -> Option<&mut Journal<'a, D>> {
        self.journal.as_mut()
    }

    /// Commands answered so far.
    pub fn commands(&self) -> u64 {
        self.commands
    }

    /// Whether the disk failed: replies already in outputs may claim writes
    /// that are not durable, so the server must stop without sending them.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Makes every write answered so far durable (one disk write and flush
    /// for all of them). False if the disk failed (see [`Self::failed`]).
    pub fn commit(&mut self) -> bool {
        if let Some(journal) = self.journal.as_mut() {
            if journal.commit().is_err() {
                self.failed = true;
            }
        }
        !self.failed
    }

    /// Answers the complete commands at the start of `input` into `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut impl Sink) -> Fed {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match parse(rest, &mut self.spans) {
                Parsed::Incomplete => {
                    if rest.len() < self.max_request {
                        return Fed { consumed: pos, status: Status::NeedInput };
                    }
                    return self.protocol_error(pos, input.len(), "Protocol error: request too large", out);
                }
                Parsed::Error(why) => return self.protocol_error(pos, input.len(), why, out),
                Parsed::Nothing { len } => pos += len,
                Parsed::Command { len, argc } => {
                    let mut args: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
                    for (arg, span) in args.iter_mut().zip(&self.spans[..argc]) {
                        *arg = span.of(rest);
                    }
                    match self.execute(&args[..argc], out) {
                        Exec::Done => {
                            self.commands += 1;
                            pos += len;
                        }
                        Exec::NoRoom => return Fed { consumed: pos, status: Status::NeedRoom },
                        Exec::Close => {
                            self.commands += 1;
                            return Fed { consumed: pos + len, status: Status::Close };
                        }
                        Exec::Shutdown => {
                            self.commands += 1;
                            return Fed { consumed: pos + len, status: Status::Shutdown };
                        }
                    }
                }
            }
        }
    }

    /// Replies `-ERR why` and closes, the rest of the input unread.
    fn protocol_error(&mut self, pos: usize, all: usize, why: &str, out: &mut impl Sink) -> Fed {
        if out.room() < SMALL_REPLY {
            return Fed { consumed: pos, status: Status::NeedRoom };
        }
        out.put(b"-ERR ");
        out.put(why.as_bytes());
        out.put(b"\r\n");
        Fed { consumed: all, status: Status::Close }
    }

    /// One command. Checks the room its reply needs before it changes
    /// anything, so that a NoRoom leaves no trace.
    fn execute(&mut self, args: &[&[u8]], out: &mut impl Sink) -> Exec {
        let argc = args.len();
        // The name in lower case (no command name is longer than 16 bytes).
        let mut lower = [0u8; 16];
        let name: &[u8] = match args[0].len() {
            n @ 1..=16 => {
                for (l, c) in lower.iter_mut().zip(args[0]) {
                    *l = c.to_ascii_lowercase();
                }
                &lower[..n]
            }
            _ => b"",
        };
        let need = match name {
            b"get" if argc == 2 => self.store.get(args[1]).map_or(0, <[u8]>::len) + BULK_OVERHEAD,
            b"echo" | b"ping" if argc == 2 => args[1].len() + BULK_OVERHEAD,
            b"mget" => {
                let values: usize =
                    args[1..].iter().map(|k| self.store.get(k).map_or(5, |v| v.len() + BULK_OVERHEAD)).sum();
                values + BULK_OVERHEAD
            }
            _ => 0,
        }
        .max(SMALL_REPLY);
        if out.room() < need {
            if out.capacity() >= need || out.room() < SMALL_REPLY {
                return Exec::NoRoom;
            }
            error(out, "ERR reply too large for this server");
            return Exec::Done;
        }

        // (fewest, most) arguments, the name included.
        let arity_range = match name {
            b"ping" => (1, 2),
            b"echo" | b"get" | b"incr" | b"decr" | b"select" => (2, 2),
            b"set" | b"incrby" | b"decrby" => (3, 3),
            b"del" | b"exists" | b"mget" => (2, usize::MAX),
            b"mset" => (3, usize::MAX),
            b"dbsize" => (1, 1),
            b"flushall" | b"flushdb" | b"info" => (1, 2),
            b"config" => (2, usize::MAX),
            _ => (1, usize::MAX),
        };
        if argc < arity_range.0 || argc > arity_range.1 || (name == b"mset" && argc.is_multiple_of(2)) {
            // SET with options has the right arity for Redis; say why it fails.
            if name == b"set" && argc > 3 {
                error(out, "ERR syntax error: SET options (EX, PX, NX, XX, GET, ...) are not supported");
            } else {
                arity(out, args[0]);
            }
            return Exec::Done;
        }

        match name {
            b"ping" if argc == 1 => simple(out, "PONG"),
            b"ping" | b"echo" => bulk(out, args[1]),
            b"set" => self.set(args[1], args[2], out),
            b"get" => match self.store.get(args[1]) {
                Some(value) => bulk(out, value),
                None => nil(out),
            },
            b"del" => self.del(&args[1..], out),
            b"exists" => integer(out, args[1..].iter().filter(|k| self.store.contains(k)).count() as i64),
            b"incr" => self.incr_by(args[1], Ok(1), out),
            b"decr" => self.incr_by(args[1], Ok(-1), out),
            b"incrby" => self.incr_by(args[1], parse_i64(args[2]).ok_or(()), out),
            b"decrby" => {
                let delta = parse_i64(args[2]).ok_or(()).and_then(|d| d.checked_neg().ok_or(()));
                self.incr_by(args[1], delta, out)
            }
            b"mset" => self.mset(&args[1..], out),
            b"mget" => {
                array(out, argc - 1);
                for key in &args[1..] {
                    match self.store.get(key) {
                        Some(value) => bulk(out, value),
                        None => nil(out),
                    }
                }
            }
            b"dbsize" => integer(out, self.store.len() as i64),
            b"flushall" | b"flushdb" => self.flushall(out),
            b"command" if argc == 2 && is(args[1], "count") => integer(out, 0),
            b"command" => array(out, 0),
            b"config" => self.config(args, out),
            b"info" => self.info(out),
            b"hello" if argc >= 2 && args[1] != b"2" => {
                error(out, "NOPROTO sorry, this protocol version is not supported")
            }
            b"hello" => hello(out),
            b"client" => simple(out, "OK"),
            b"select" if args[1] == b"0" => simple(out, "OK"),
            b"select" => error(out, "ERR DB index is out of range"),
            b"reset" => simple(out, "RESET"),
            // Real Redis sends no reply when it shuts down.
            b"shutdown" => return Exec::Shutdown,
            b"quit" => {
                simple(out, "OK");
                return Exec::Close;
            }
            _ => unknown(out, args),
        }
        Exec::Done
    }

    fn del(&mut self, keys: &[&[u8]], out: &mut impl Sink) {
        // Logged only if it changes something.
        if keys.iter().any(|k| self.store.contains(k)) {
            if let Some(journal) = self.journal.as_mut() {
                if let Err(e) = journal.append(op::DEL, keys.iter().copied()) {
                    return log_error(out, &mut self.failed, e);
                }
            }
        }
        let removed = keys.iter().filter(|k| self.store.del(k)).count();
        integer(out, removed as i64);
    }

    fn flushall(&mut self, out: &mut impl Sink) {
        if let Some(journal) = self.journal.as_mut() {
            if let Err(e) = journal.append(op::FLUSHALL, core::iter::empty()) {
                return log_error(out, &mut self.failed, e);
            }
        }
        self.store.clear();
        simple(out, "OK");
    }

    fn set(&mut self, key: &[u8], value: &[u8], out: &mut impl Sink) {
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return error(out, TOO_LONG);
        }
        if !self.store.has_room_for(key) {
            return error(out, FULL);
        }
        if let Some(journal) = self.journal.as_mut() {
            if let Err(e) = journal.append(op::SET, [key, value].into_iter()) {
                return log_error(out, &mut self.failed, e);
            }
        }
        match self.store.set(key, value) {
            Ok(()) => simple(out, "OK"),
            // Checked above; kept for a store that could refuse anyway.
            Err(StoreError::Full) => error(out, FULL),
            Err(StoreError::TooLong) => error(out, TOO_LONG),
        }
    }

    fn incr_by(&mut self, key: &[u8], delta: Result<i64, ()>, out: &mut impl Sink) {
        let Ok(delta) = delta else {
            return error(out, NOT_INTEGER);
        };
        let current = match self.store.get(key) {
            None => 0,
            Some(value) => match parse_i64(value) {
                Some(n) => n,
                None => return error(out, NOT_INTEGER),
            },
        };
        let Some(new) = current.checked_add(delta) else {
            return error(out, "ERR increment or decrement would overflow");
        };
        if key.len() > MAX_KEY {
            return error(out, TOO_LONG);
        }
        if !self.store.has_room_for(key) {
            return error(out, FULL);
        }
        let mut text = Digits::default();
        put_int_digits(&mut text, new);
        let value = text.as_bytes();
        if let Some(journal) = self.journal.as_mut() {
            if let Err(e) = journal.append(op::SET, [key, value].into_iter()) {
                return log_error(out, &mut self.failed, e);
            }
        }
        match self.store.set(key, value) {
            Ok(()) => integer(out, new),
            Err(_) => error(out, FULL),
        }
    }

    fn mset(&mut self, pairs: &[&[u8]], out: &mut impl Sink) {
        if pairs.chunks(2).any(|kv| kv[0].len() > MAX_KEY || kv[1].len() > MAX_VALUE) {
            return error(out, TOO_LONG);
        }
        // New keys, each counted once however often it repeats.
        let new_keys = (0..pairs.len())
            .step_by(2)
            .filter(|&i| !self.store.contains(pairs[i]) && !(0..i).step_by(2).any(|j| pairs[j] == pairs[i]))
            .count();
        if new_keys > self.store.free() {
            return error(out, FULL);
        }
        if let Some(journal) = self.journal.as_mut() {
            if let Err(e) = journal.append(op::MSET, pairs.iter().copied()) {
                return log_error(out, &mut self.failed, e);
            }
        }
        for kv in pairs.chunks(2) {
            // Cannot fail: lengths and room were checked.
            let _ = self.store.set(kv[0], kv[1]);
        }
        simple(out, "OK");
    }

    fn config(&mut self, args: &[&[u8]], out: &mut impl Sink) {
        match args.get(1) {
            Some(sub) if is(sub, "get") && args.len() >= 3 => {
                let appendonly = if self.persistent() { "yes" } else { "no" };
                let known = [("save", ""), ("appendonly", appendonly), ("databases", "1")];
                let matches = |param: &[u8], k: &str| param == b"*" || is(param, k);
                let count = known.iter().filter(|(k, _)| args[2..].iter().any(|p| matches(p, k))).count();
                array(out, 2 * count);
                for (k, v) in known {
                    if args[2..].iter().any(|p| matches(p, k)) {
                        bulk(out, k.as_bytes());
                        bulk(out, v.as_bytes());
                    }
                }
            }
            Some(sub) if is(sub, "set") || is(sub, "resetstat") || is(sub, "rewrite") => simple(out, "OK"),
            Some(_) => error(out, "ERR unsupported CONFIG subcommand"),
            None => arity(out, args[0]),
        }
    }

    fn info(&mut self, out: &mut impl Sink) {
        let mut text = Text::default();
        text.push(b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nos:ftvmm\r\narch_bits:64\r\n");
        text.push(b"\r\n# Persistence\r\nloading:0\r\naof_enabled:");
        text.push(if self.persistent() { b"1" } else { b"0" });
        text.push(b"\r\n\r\n# Stats\r\ntotal_commands_processed:");
        put_int_digits(&mut text, self.commands as i64);
        text.push(b"\r\n\r\n# Keyspace\r\n");
        if !self.store.is_empty() {
            text.push(b"db0:keys=");
            put_int_digits(&mut text, self.store.len() as i64);
            text.push(b",expires=0,avg_ttl=0\r\n");
        }
        bulk(out, text.as_bytes());
    }
}

/// HELLO (RESP2): the server's properties as a flat array of pairs.
fn hello(out: &mut impl Sink) {
    array(out, 14);
    for (k, v) in [("server", "redis"), ("version", "7.0.0")] {
        bulk(out, k.as_bytes());
        bulk(out, v.as_bytes());
    }
    for (k, v) in [("proto", 2), ("id", 1)] {
        bulk(out, k.as_bytes());
        integer(out, v);
    }
    for (k, v) in [("mode", "standalone"), ("role", "master")] {
        bulk(out, k.as_bytes());
        bulk(out, v.as_bytes());
    }
    bulk(out, b"modules");
    array(out, 0);
}

const TOO_LONG: &str = "ERR key or value too long (at most 512 bytes each)";
const FULL: &str = "ERR store full: the write was not done";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";

/// A small text buffer (formatted integers, the INFO reply).
struct Text {
    buf: [u8; 400],
    len: usize,
}

type Digits = Text;

impl Default for Text {
    fn default() -> Self {
        Text { buf: [0; 400], len: 0 }
    }
}

impl Text {
    fn push(&mut self, data: &[u8]) {
        let n = data.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
    }
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Sink for Text {
    fn room(&self) -> usize {
        self.buf.len() - self.len
    }
    fn capacity(&self) -> usize {
        self.buf.len()
    }
    fn put(&mut self, data: &[u8]) {
        self.push(data);
    }
}
