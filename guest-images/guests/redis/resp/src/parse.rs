//! The RESP2 request parser: multibulk arrays of bulk strings (what every
//! client library and redis-benchmark send) and inline commands (a line of
//! space-separated words, as `redis-cli --pipe`, telnet and redis-benchmark's
//! PING_INLINE send).
//!
//! The parser never copies: it reports where each argument lies in the input.

/// Most arguments a command may have (command name included).
pub const MAX_ARGS: usize = 1024;
/// Longest inline request line.
pub const MAX_INLINE: usize = 64 * 1024;
/// Longest bulk string the parser accepts at all (the engine's limits on
/// keys, values and whole requests are lower).
pub const MAX_BULK: usize = 1 << 20;
/// Longest `*N` / `$N` header line, CRLF included.
const MAX_HEADER_LINE: usize = 24;

/// Where one argument lies in the input: `input[start..end]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn of<'i>(&self, input: &'i [u8]) -> &'i [u8] {
        &input[self.start..self.end]
    }
}

/// What the start of the input holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete command of `len` bytes whose `argc` arguments are in the
    /// first `argc` spans.
    Command { len: usize, argc: usize },
    /// `len` bytes that hold no command (a blank inline line, `*0`, `*-1`).
    Nothing { len: usize },
    /// Not a complete request yet: wait for more bytes.
    Incomplete,
    /// Not RESP: the connection cannot be resynchronised.
    Error(&'static str),
}

/// Parses the request at the start of `input`, filling `spans`.
pub fn parse(input: &[u8], spans: &mut [Span]) -> Parsed {
    match input.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(input, spans),
        Some(_) => parse_inline(input, spans),
    }
}

/// The integer of the header line that starts at `at` (after its type
/// byte): (value, index just past its CRLF).
fn header_line(input: &[u8], at: usize, error: &'static str) -> Result<(i64, usize), Parsed> {
    let rest = &input[at..];
    let Some(cr) = rest.iter().take(MAX_HEADER_LINE).position(|&b| b == b'\r') else {
        return Err(if rest.len() >= MAX_HEADER_LINE { Parsed::Error(error) } else { Parsed::Incomplete });
    };
    match rest.get(cr + 1) {
        None => return Err(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(Parsed::Error(error)),
    }
    let value = parse_i64(&rest[..cr]).ok_or(Parsed::Error(error))?;
    Ok((value, at + cr + 2))
}

fn parse_multibulk(input: &[u8], spans: &mut [Span]) -> Parsed {
    let (count, mut pos) = match header_line(input, 1, "Protocol error: invalid multibulk length") {
        Ok(v) => v,
        Err(p) => return p,
    };
    if count <= 0 {
        return Parsed::Nothing { len: pos };
    }
    let count = count as usize;
    if count > spans.len().min(MAX_ARGS) {
        return Parsed::Error("Protocol error: too many arguments in a request");
    }
    for span in spans.iter_mut().take(count) {
        match input.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Error("Protocol error: expected '$' before a bulk string"),
        }
        let (len, start) = match header_line(input, pos + 1, "Protocol error: invalid bulk length") {
            Ok(v) => v,
            Err(p) => return p,
        };
        if !(0..=MAX_BULK as i64).contains(&len) {
            return Parsed::Error("Protocol error: invalid bulk length");
        }
        let end = start + len as usize;
        if input.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &input[end..end + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk string not followed by CRLF");
        }
        *span = Span { start, end };
        pos = end + 2;
    }
    Parsed::Command { len: pos, argc: count }
}

fn parse_inline(input: &[u8], spans: &mut [Span]) -> Parsed {
    let Some(newline) = input.iter().take(MAX_INLINE).position(|&b| b == b'\n') else {
        return if input.len() >= MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line_end = if newline > 0 && input[newline - 1] == b'\r' { newline - 1 } else { newline };
    let mut argc = 0;
    let mut i = 0;
    while i < line_end {
        if input[i] == b' ' || input[i] == b'\t' {
            i += 1;
            continue;
        }
        let start = i;
        while i < line_end && input[i] != b' ' && input[i] != b'\t' {
            i += 1;
        }
        let Some(span) = spans.get_mut(argc).filter(|_| argc < MAX_ARGS) else {
            return Parsed::Error("Protocol error: too many arguments in a request");
        };
        *span = Span { start, end: i };
        argc += 1;
    }
    if argc == 0 {
        Parsed::Nothing { len: newline + 1 }
    } else {
        Parsed::Command { len: newline + 1, argc }
    }
}

/// A signed decimal integer as Redis accepts it: an optional `-`, then
/// digits without leading zeros (except `0` itself); no spaces, no `+`.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 || (digits[0] == b'0' && (digits.len() > 1 || negative)) {
        return None;
    }
    let mut magnitude: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        if magnitude == 1 << 63 {
            Some(i64::MIN)
        } else {
            i64::try_from(magnitude).ok().map(|m| -m)
        }
    } else {
        i64::try_from(magnitude).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args<'i>(input: &'i [u8]) -> (Parsed, Vec<&'i [u8]>) {
        let mut spans = [Span::default(); 8];
        let parsed = parse(input, &mut spans);
        let argc = match parsed {
            Parsed::Command { argc, .. } => argc,
            _ => 0,
        };
        (parsed, spans[..argc].iter().map(|s| s.of(input)).collect())
    }

    #[test]
    fn multibulk() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n";
        let (parsed, a) = args(input);
        assert_eq!(parsed, Parsed::Command { len: 31, argc: 3 });
        assert_eq!(a, [&b"SET"[..], b"k", b"hello"]);
    }

    #[test]
    fn binary_bulk_with_crlf_inside() {
        let input = b"*2\r\n$4\r\nECHO\r\n$4\r\na\r\nb\r\n";
        let (parsed, a) = args(input);
        assert_eq!(parsed, Parsed::Command { len: input.len(), argc: 2 });
        assert_eq!(a[1], b"a\r\nb");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        for cut in 0..input.len() {
            assert_eq!(args(&input[..cut]).0, Parsed::Incomplete, "prefix of {cut} bytes");
        }
        assert!(matches!(args(input).0, Parsed::Command { .. }));
    }

    #[test]
    fn empty_and_null_arrays_are_nothing() {
        assert_eq!(args(b"*0\r\n").0, Parsed::Nothing { len: 4 });
        assert_eq!(args(b"*-1\r\n").0, Parsed::Nothing { len: 5 });
        assert_eq!(args(b"\r\n").0, Parsed::Nothing { len: 2 });
        assert_eq!(args(b"   \n").0, Parsed::Nothing { len: 4 });
    }

    #[test]
    fn inline() {
        let (parsed, a) = args(b"  set  key\tvalue \r\nPING\r\n");
        assert_eq!(parsed, Parsed::Command { len: 19, argc: 3 });
        assert_eq!(a, [&b"set"[..], b"key", b"value"]);
        assert_eq!(args(b"PING").0, Parsed::Incomplete);
        assert_eq!(args(b"PING\n").1, [&b"PING"[..]]);
    }

    #[test]
    fn malformed() {
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n+PING\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$abc\r\n",
            b"*1\r\n$4\r\nPINGxx",
            b"*1\rx",
            b"*99999999999999999999999\r\n",
            b"*1\r\n$99999999\r\n",
            b"*01\r\n",
        ] {
            assert!(matches!(args(bad).0, Parsed::Error(_)), "{:?}", String::from_utf8_lossy(bad));
        }
        // More arguments than there are spans.
        assert!(matches!(args(b"*9\r\n").0, Parsed::Error(_)));
        assert!(matches!(args(b"a b c d e f g h i\r\n").0, Parsed::Error(_)));
        // A header line that never ends.
        assert!(matches!(args(&[b'*'; 40]).0, Parsed::Error(_)));
        assert!(matches!(args(&vec![b'a'; MAX_INLINE + 1]).0, Parsed::Error(_)));
    }

    #[test]
    fn integers() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-17"), Some(-17));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [&b""[..], b"-", b"+1", b" 1", b"1 ", b"01", b"-0", b"1.5", b"9223372036854775808", b"abc"] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
