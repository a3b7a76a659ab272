//! A socket with a deadline: every read and write waits at most until the
//! deadline, so a peer that trickles bytes cannot stretch one frame, or one
//! answer, past it (a per-call socket timeout alone would allow that: each
//! byte would restart it).

use std::borrow::Borrow;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// `stream` (a `TcpStream` or a reference to one), with reads and writes
/// that fail with [`io::ErrorKind::TimedOut`] once `deadline` has passed.
#[derive(Debug)]
pub(crate) struct Timed<S> {
    stream: S,
    deadline: Instant,
}

impl<S: Borrow<TcpStream>> Timed<S> {
    pub(crate) fn new(stream: S, within: Duration) -> Self {
        Timed { stream, deadline: Instant::now() + within }
    }

    /// Moves the deadline to `deadline`.
    pub(crate) fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
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

impl<S: Borrow<TcpStream>> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        let mut stream: &TcpStream = self.stream.borrow();
        stream.set_read_timeout(Some(left))?;
        stream.read(buf)
    }
}

impl<S: Borrow<TcpStream>> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        let mut stream: &TcpStream = self.stream.borrow();
        stream.set_write_timeout(Some(left))?;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
