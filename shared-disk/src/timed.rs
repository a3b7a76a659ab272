//! A socket with a deadline: every read and write waits at most until the
//! deadline, so a peer that trickles bytes cannot stretch one frame, or one
//! answer, past it (a per-call socket timeout alone would allow that: each
//! byte would restart it).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `stream`, with reads and writes that fail with [`io::ErrorKind::TimedOut`]
/// once `deadline` has passed.
#[derive(Debug)]
pub(crate) struct Timed<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Timed<'a> {
    pub(crate) fn new(stream: &'a TcpStream, within: Duration) -> Self {
        Timed { stream, deadline: Instant::now() + within }
    }

    pub(crate) fn until(stream: &'a TcpStream, deadline: Instant) -> Self {
        Timed { stream, deadline }
    }

    /// Moves the deadline to `within` from now.
    pub(crate) fn set_within(&mut self, within: Duration) {
        self.deadline = Instant::now() + within;
    }

    /// What is left until the deadline; nothing left is an error.
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "the deadline passed"))
        } else {
            Ok(left)
        }
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
