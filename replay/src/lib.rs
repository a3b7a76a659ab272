//! replay: ftvmm's event log.
//!
//! Owns the model of a recording — [`Position`]s, [`ExitKind`]s, [`Event`]s and
//! [`Record`]s — its on-disk format ([`LogWriter`], [`LogReader`]), and the
//! two halves of deterministic execution: the [`Recorder`], which the primary
//! feeds at every guest-caused exit, and the [`Replayer`], which hands the
//! backup (or `ftvmm --replay`) the same inputs at the same positions and
//! reports the first place where execution departs from the log as a
//! [`Divergence`].
//!
//! A log is the sequence of guest-caused exits, each an `Exit` record, with
//! the external inputs that took effect at that exit as `Event` records after
//! it, and an `End` record carrying the guest's exit status and final state
//! digest. Only external inputs are logged: device models are deterministic
//! functions of their state, the guest's accesses and these inputs.
//!
//! A guest that runs long without exiting is given its interrupts at a
//! *state sync* instead: the primary kicks the vCPU and records, in place of
//! an `Exit`, the guest pages dirtied since the last sync and the complete
//! vCPU state as `Event::Sync` parts ([`SyncPart`]). A sync is a position of
//! its own: it takes the next exit count, and positions after it count from
//! it. Its inputs (the timer check, the interrupt) follow it as for an exit.
//! A replay holds at each exit until it sees what follows: the next `Exit`
//! (it executes up to it) or a sync (it applies it: [`Replayer::next_sync`]).

mod format;

pub use format::{LogError, LogReader, LogWriter, FORMAT_VERSION, MAGIC};

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where in the guest's execution something happened: the number of
/// guest-caused exits so far (the first exit is 1) and the RIP at that exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub exit: u64,
    pub rip: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {} (rip {:#x})", self.exit, self.rip)
    }
}

/// What caused a guest exit. Written data is not part of it: it is a
/// deterministic function of guest state, which the state digest covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExitKind {
    IoIn {
        port: u16,
        size: u8,
    },
    IoOut {
        port: u16,
        size: u8,
    },
    MmioRead {
        addr: u64,
        size: u8,
    },
    MmioWrite {
        addr: u64,
        size: u8,
    },
    Hlt,
    RdMsr {
        index: u32,
    },
    WrMsr {
        index: u32,
    },
    /// An interrupt window the VMM requested at an earlier guest-caused exit.
    IrqWindow,
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::IoIn { port, size } => write!(f, "port read {port:#x}/{size}"),
            ExitKind::IoOut { port, size } => write!(f, "port write {port:#x}/{size}"),
            ExitKind::MmioRead { addr, size } => write!(f, "mmio read {addr:#x}/{size}"),
            ExitKind::MmioWrite { addr, size } => write!(f, "mmio write {addr:#x}/{size}"),
            ExitKind::Hlt => write!(f, "hlt"),
            ExitKind::RdMsr { index } => write!(f, "rdmsr {index:#x}"),
            ExitKind::WrMsr { index } => write!(f, "wrmsr {index:#x}"),
            ExitKind::IrqWindow => write!(f, "interrupt window"),
        }
    }
}

/// Which device read the virtual clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimeSource {
    /// The VMM checked whether a timer is due (no guest read).
    TimerCheck,
    /// The 8254 PIT (counter read, latch, or a count being started).
    Pit,
    /// The CMOS real-time clock.
    Rtc,
    /// A rewritten RDTSC.
    Rdtsc,
    /// RDMSR/WRMSR of IA32_TSC.
    TscMsr,
    /// An idle that asked for the time it woke at (a string read from the
    /// idle port): logged after the exit's interrupt.
    Wake,
}

/// An external input that took effect at a position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The VMM injected this interrupt vector when the guest resumed.
    Interrupt { vector: u8 },
    /// The virtual clock was read by `source` and answered `ns`
    /// (nanoseconds since boot).
    TimeRead { source: TimeSource, ns: u64 },
    /// Bytes arrived on the serial port.
    SerialRx { bytes: Vec<u8> },
    /// The disk answered a read with `data` (a replay never reads the disk).
    DiskRead { data: Vec<u8> },
    /// An Ethernet frame from the NIC's host side, delivered into the
    /// guest's receive ring at this position (a replay reads no TAP).
    NetRx { frame: Vec<u8> },
    /// A part of the state sync at this position (the first record of the
    /// position, instead of an `Exit`); the `Vcpu` part ends it.
    Sync(SyncPart),
    /// A periodic digest check: `digest` is the recording VM's state digest
    /// (memory, vCPU, devices, clock, exit count) at this position, taken
    /// before any other input of the position is applied. A replay whose
    /// digest differs here has diverged, even if its exits still match.
    DigestCheck { digest: Digest },
}

/// One record's worth of a state sync: guest memory in runs of at most
/// [`SYNC_PAGES_PER_PART`] pages (zero runs cost a few bytes), then the
/// vCPU state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncPart {
    /// Pages `first..first + data.len() / 4096` hold `data`. (Bytes are
    /// encoded as one block, not element by element: a sync's pages are
    /// most of the log of a compute-bound guest.)
    Pages {
        first: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Pages `first..first + count` are zero.
    Zeros { first: u64, count: u64 },
    /// The vCPU's complete state, in the VMM's encoding; the last part.
    Vcpu {
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
}

/// Most pages in one [`SyncPart::Pages`] (1 MiB): a sync of any size is
/// many records, each far below the log's and the channel's frame limits.
pub const SYNC_PAGES_PER_PART: u64 = 256;

/// A whole state sync, as [`Replayer::next_sync`] hands it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    pub position: Position,
    /// `Pages` and `Zeros` parts, in log order.
    pub memory: Vec<SyncPart>,
    /// The vCPU state (the `Vcpu` part's).
    pub vcpu: Vec<u8>,
}

impl Sync {
    /// Bytes of page data it carries.
    pub fn page_bytes(&self) -> u64 {
        self.memory.iter().map(|p| if let SyncPart::Pages { data, .. } = p { data.len() as u64 } else { 0 }).sum()
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Interrupt { vector } => write!(f, "interrupt {vector:#x}"),
            Event::TimeRead { source, ns } => write!(f, "time read {source:?} = {ns} ns"),
            Event::SerialRx { bytes } => write!(f, "{} serial byte(s) received", bytes.len()),
            Event::DiskRead { data } => write!(f, "a disk read of {} bytes", data.len()),
            Event::NetRx { frame } => write!(f, "a received frame of {} bytes", frame.len()),
            Event::Sync(SyncPart::Pages { first, data }) => {
                write!(f, "a state sync of pages {first}+{}", data.len() / 4096)
            }
            Event::Sync(SyncPart::Zeros { first, count }) => write!(f, "a state sync of zero pages {first}+{count}"),
            Event::Sync(SyncPart::Vcpu { .. }) => write!(f, "a state sync's vCPU state"),
            Event::DigestCheck { digest } => write!(f, "a digest check (state digest {digest})"),
        }
    }
}

/// A state digest: BLAKE3 over guest memory, vCPU and device state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a record says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// The guest exited to the VMM.
    Exit(ExitKind),
    /// An external input at the position of the preceding `Exit`.
    Event(Event),
    /// The guest ended the run with `status`; `digest` is the final state.
    End { status: u8, digest: Digest },
}

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub position: Position,
    pub entry: Entry,
}

/// What a log was recorded from; a replay must match it exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// BLAKE3 of the guest image file.
    pub image_hash: Digest,
    /// The VM configuration in canonical text form (memory, command line...).
    pub config: String,
    /// Wall-clock time at boot (ns since the Unix epoch): the RTC's base.
    pub wall_clock_base_ns: u64,
    /// The shared disk's owner generation the recording VM holds (0: none):
    /// a backup claims the disk from exactly this generation.
    pub disk_generation: u64,
}

impl Header {
    /// Checks that `self` (the log's) describes the same VM as `ours`.
    pub fn check_matches(&self, ours: &Header) -> Result<(), String> {
        if self.image_hash != ours.image_hash {
            return Err(format!(
                "the log was recorded from another guest image (image hash {}, this image {})",
                self.image_hash, ours.image_hash
            ));
        }
        if self.config != ours.config {
            return Err(format!(
                "the log was recorded with another VM configuration ({}; this run: {})",
                self.config, ours.config
            ));
        }
        Ok(())
    }
}

/// Where recorded records go: a log file, or the logging channel.
pub trait RecordSink {
    fn append(&mut self, record: &Record) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
    /// The recording VM has passed exit `exit`: every record at a position
    /// up to it has been appended (the lockstep watermark). A file ignores it.
    fn passed(&mut self, _exit: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where replayed records come from. `Ok(None)` is the end of the log.
pub trait RecordSource {
    /// The next record, waiting for it if the source is live.
    fn next_record(&mut self) -> Result<Option<Record>, LogError>;
    /// Whether the source already knows, without waiting, that no record at
    /// a position up to `exit` is still to come (the recorder's watermark has
    /// reached it and every record before it was handed out). A file answers
    /// false: its next record is always at hand.
    fn passed(&mut self, _exit: u64) -> Result<bool, LogError> {
        Ok(false)
    }
}

impl<T: RecordSink + ?Sized> RecordSink for Box<T> {
    fn append(&mut self, record: &Record) -> std::io::Result<()> {
        (**self).append(record)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (**self).flush()
    }
    fn passed(&mut self, exit: u64) -> std::io::Result<()> {
        (**self).passed(exit)
    }
}

impl<T: RecordSource + ?Sized> RecordSource for Box<T> {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        (**self).next_record()
    }
    fn passed(&mut self, exit: u64) -> Result<bool, LogError> {
        (**self).passed(exit)
    }
}

/// Records a run: one `Exit` per guest-caused exit, the inputs taken there.
pub struct Recorder<S: RecordSink> {
    sink: S,
    position: Position,
}

impl<S: RecordSink> Recorder<S> {
    pub fn new(sink: S) -> Self {
        Recorder { sink, position: Position { exit: 0, rip: 0 } }
    }

    /// The guest exited at `position` for `kind`.
    pub fn exit(&mut self, position: Position, kind: ExitKind) -> std::io::Result<()> {
        self.position = position;
        self.append(Entry::Exit(kind))
    }

    /// An external input took effect at the current position.
    pub fn event(&mut self, event: Event) -> std::io::Result<()> {
        self.append(Entry::Event(event))
    }

    /// A part of the state sync at `position` (a new position: the one
    /// after the current one). Its inputs follow as [`Recorder::event`]s.
    pub fn sync(&mut self, position: Position, part: SyncPart) -> std::io::Result<()> {
        self.position = position;
        self.append(Entry::Event(Event::Sync(part)))
    }

    /// The guest ended the run.
    pub fn end(&mut self, status: u8, digest: Digest) -> std::io::Result<()> {
        self.append(Entry::End { status, digest })?;
        self.sink.flush()
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }

    /// The VM has passed the current exit: all its records are appended.
    pub fn passed(&mut self) -> std::io::Result<()> {
        self.sink.passed(self.position.exit)
    }

    /// The VM has passed the exit before the current one (it is still
    /// taking inputs at the current one).
    pub fn passed_previous(&mut self) -> std::io::Result<()> {
        self.sink.passed(self.position.exit.saturating_sub(1))
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    pub fn into_sink(self) -> S {
        self.sink
    }

    fn append(&mut self, entry: Entry) -> std::io::Result<()> {
        self.sink.append(&Record { position: self.position, entry })
    }
}

/// Execution departed from the log: the first differing exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// The exit count at which it was noticed.
    pub exit: u64,
    pub expected: String,
    pub got: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "divergence at exit {}: expected {}, got {}", self.exit, self.expected, self.got)
    }
}

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Divergence(Divergence),
    /// The log holds no more records (a truncated log, or a primary that died).
    #[error("the log ends at exit {last_exit}: replayed everything it holds")]
    EndOfLog { last_exit: u64 },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Hands out a log's inputs at the positions where they were recorded and
/// checks every exit against it.
pub struct Replayer<S: RecordSource> {
    source: S,
    peeked: Option<Record>,
    position: Position,
}

impl<S: RecordSource> Replayer<S> {
    pub fn new(source: S) -> Self {
        Replayer { source, peeked: None, position: Position { exit: 0, rip: 0 } }
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    fn peek(&mut self) -> Result<Option<&Record>, LogError> {
        if self.peeked.is_none() {
            self.peeked = self.source.next_record()?;
        }
        Ok(self.peeked.as_ref())
    }

    fn end_of_log(&self) -> ReplayError {
        ReplayError::EndOfLog { last_exit: self.position.exit.saturating_sub(1) }
    }

    fn diverge(&self, expected: impl fmt::Display, got: impl fmt::Display) -> ReplayError {
        ReplayError::Divergence(Divergence {
            exit: self.position.exit,
            expected: expected.to_string(),
            got: got.to_string(),
        })
    }

    /// The replay goes on from a state taken at exit `exit` (a snapshot, or
    /// a joining backup's transferred state): the next position is
    /// `exit + 1`, which may be a sync.
    pub fn resume_after(&mut self, exit: u64) {
        self.position = Position { exit, rip: 0 };
    }

    /// Skips the log's records up to and including exit `exit`: a replay
    /// that starts from a snapshot taken there. Returns false when the log
    /// ends first.
    pub fn skip_through(&mut self, exit: u64) -> Result<bool, LogError> {
        self.resume_after(exit);
        loop {
            match self.peek()? {
                Some(record) if record.position.exit <= exit => self.peeked = None,
                Some(_) => return Ok(true),
                None => return Ok(false),
            }
        }
    }

    /// The guest exited at `position` for `kind`: it must be the log's next exit.
    /// Inputs of the previous position that nobody consumed are a divergence.
    pub fn exit(&mut self, position: Position, kind: ExitKind) -> Result<(), ReplayError> {
        self.position = position;
        let Some(record) = self.peek()?.cloned() else {
            return Err(self.end_of_log());
        };
        match &record.entry {
            Entry::Exit(logged) if record.position == position && *logged == kind => {
                self.peeked = None;
                Ok(())
            }
            Entry::Exit(logged) => Err(self.diverge(
                format_args!("{logged} at rip {:#x} (exit {})", record.position.rip, record.position.exit),
                format_args!("{kind} at rip {:#x}", position.rip),
            )),
            Entry::Event(Event::Sync(_)) => Err(self.diverge(
                format_args!("a state sync at {}", record.position),
                format_args!("{kind} at rip {:#x} (the stretch was executed instead)", position.rip),
            )),
            Entry::Event(event) => Err(self.diverge(
                format_args!("{event} at exit {}", record.position.exit),
                format_args!("{kind} at rip {:#x} (the input was never taken)", position.rip),
            )),
            Entry::End { status, .. } => Err(self.diverge(
                format_args!("the guest to end with status {status}"),
                format_args!("{kind} at rip {:#x}", position.rip),
            )),
        }
    }

    /// The virtual clock read by `source` at the current exit.
    pub fn time(&mut self, source: TimeSource) -> Result<u64, ReplayError> {
        match self.take_event()? {
            Some(Event::TimeRead { source: logged, ns }) if logged == source => Ok(ns),
            Some(other) => Err(self.diverge(other, format_args!("a time read by {source:?}"))),
            None => Err(self.diverge("no further input at this exit", format_args!("a time read by {source:?}"))),
        }
    }

    /// The data of a disk read of `len` bytes at the current exit.
    pub fn disk_read(&mut self, len: usize) -> Result<Vec<u8>, ReplayError> {
        match self.take_event()? {
            Some(Event::DiskRead { data }) if data.len() == len => Ok(data),
            Some(other) => Err(self.diverge(other, format_args!("a disk read of {len} bytes"))),
            None => Err(self.diverge("no further input at this exit", format_args!("a disk read of {len} bytes"))),
        }
    }

    /// The next input logged at the current exit, if any.
    pub fn take_event(&mut self) -> Result<Option<Event>, ReplayError> {
        let position = self.position;
        if self.peeked.is_none() && self.source.passed(position.exit)? {
            return Ok(None);
        }
        match self.peek()? {
            Some(Record { entry: Entry::Event(Event::Sync(_)), .. }) => return Ok(None),
            Some(Record { position: p, entry: Entry::Event(_) }) if *p == position => {}
            Some(_) => return Ok(None),
            // The primary may have died mid-exit: the log ends without the
            // inputs of this exit being known complete.
            None => return Err(self.end_of_log()),
        }
        match self.peeked.take() {
            Some(Record { entry: Entry::Event(event), .. }) => Ok(Some(event)),
            _ => Ok(None),
        }
    }

    /// The lockstep rule at the end of the current exit: waits until the log
    /// shows what follows it. A state sync at the next position is read
    /// whole (at most `max_page_bytes` of pages) and handed out: the caller
    /// applies it instead of executing, and the current position becomes
    /// the sync's. The next exit (or the end record) is `None`: the caller
    /// executes. A log that ends here or inside a sync is the end of the
    /// log, known before anything runs: a backup must go live here, as the
    /// stretch may be one that only a kick would end.
    pub fn next_sync(&mut self, max_page_bytes: u64) -> Result<Option<Sync>, ReplayError> {
        let position = match self.peek()? {
            Some(Record { position, entry: Entry::Event(Event::Sync(_)) }) => *position,
            Some(_) => return Ok(None),
            None => return Err(ReplayError::EndOfLog { last_exit: self.position.exit }),
        };
        if position.exit != self.position.exit + 1 {
            return Err(self.diverge(
                format_args!("a state sync at {position}"),
                format_args!("exit {} done (a sync must be the next position)", self.position.exit),
            ));
        }
        let mut memory = Vec::new();
        let mut bytes = 0u64;
        loop {
            let Some(record) = self.peek()? else {
                return Err(ReplayError::EndOfLog { last_exit: self.position.exit });
            };
            if !(matches!(record.entry, Entry::Event(Event::Sync(_))) && record.position == position) {
                let got = format!("{:?} at {}", record.entry, record.position);
                return Err(self.diverge(format_args!("the rest of the state sync at {position}"), got));
            }
            let Some(Record { entry: Entry::Event(Event::Sync(part)), .. }) = self.peeked.take() else {
                unreachable!("peeked above")
            };
            match part {
                SyncPart::Vcpu { state } => {
                    self.position = position;
                    return Ok(Some(Sync { position, memory, vcpu: state }));
                }
                SyncPart::Pages { ref data, .. } => {
                    bytes += data.len() as u64;
                    if bytes > max_page_bytes {
                        return Err(self.diverge(
                            format_args!("a state sync of at most {max_page_bytes} bytes of pages"),
                            format_args!("more at {position}"),
                        ));
                    }
                    memory.push(part);
                }
                SyncPart::Zeros { .. } => memory.push(part),
            }
        }
    }

    /// The guest ended with `status` and final state `digest`: the log must agree.
    pub fn end(&mut self, position: Position, status: u8, digest: Digest) -> Result<(), ReplayError> {
        self.position = position;
        let Some(record) = self.peek()?.cloned() else {
            return Err(self.end_of_log());
        };
        match record.entry {
            Entry::End { status: s, digest: d } if s == status && d == digest && record.position == position => Ok(()),
            Entry::End { status: s, digest: d } => Err(self.diverge(
                format_args!("the guest to end with status {s}, state digest {d} at {}", record.position),
                format_args!("status {status}, state digest {digest} at {position}"),
            )),
            other => Err(self.diverge(
                match other {
                    Entry::Exit(kind) => format!("{kind} at rip {:#x}", record.position.rip),
                    Entry::Event(event) => event.to_string(),
                    Entry::End { .. } => unreachable!("matched above"),
                },
                format_args!("the guest to end with status {status}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct VecSource(std::vec::IntoIter<Record>);

    impl RecordSource for VecSource {
        fn next_record(&mut self) -> Result<Option<Record>, LogError> {
            Ok(self.0.next())
        }
    }

    fn rec(exit: u64, rip: u64, entry: Entry) -> Record {
        Record { position: Position { exit, rip }, entry }
    }

    fn pos(exit: u64, rip: u64) -> Position {
        Position { exit, rip }
    }

    const OUT80: ExitKind = ExitKind::IoOut { port: 0x80, size: 1 };

    #[test]
    fn replays_inputs_at_their_positions() {
        let log = vec![
            rec(1, 0x1000, Entry::Exit(OUT80)),
            rec(1, 0x1000, Entry::Event(Event::TimeRead { source: TimeSource::Pit, ns: 42 })),
            rec(1, 0x1000, Entry::Event(Event::Interrupt { vector: 0x20 })),
            rec(2, 0x1010, Entry::Exit(ExitKind::Hlt)),
            rec(2, 0x1010, Entry::End { status: 0, digest: Digest([7; 32]) }),
        ];
        let mut r = Replayer::new(VecSource(log.into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        assert_eq!(r.time(TimeSource::Pit).unwrap(), 42);
        assert_eq!(r.take_event().unwrap(), Some(Event::Interrupt { vector: 0x20 }));
        assert_eq!(r.take_event().unwrap(), None);
        r.exit(pos(2, 0x1010), ExitKind::Hlt).unwrap();
        assert_eq!(r.take_event().unwrap(), None);
        r.end(pos(2, 0x1010), 0, Digest([7; 32])).unwrap();
    }

    #[test]
    fn reports_the_first_differing_exit() {
        let log = vec![rec(1, 0x1000, Entry::Exit(OUT80)), rec(2, 0x1004, Entry::Exit(OUT80))];
        let mut r = Replayer::new(VecSource(log.into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        let err = r.exit(pos(2, 0x1008), OUT80).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("divergence at exit 2: expected port write 0x80/1 at rip 0x1004"), "{text}");
        assert!(text.contains("got port write 0x80/1 at rip 0x1008"), "{text}");
    }

    #[test]
    fn unconsumed_input_and_wrong_time_source_diverge() {
        let log = vec![
            rec(1, 0x1000, Entry::Exit(OUT80)),
            rec(1, 0x1000, Entry::Event(Event::SerialRx { bytes: b"x".to_vec() })),
            rec(2, 0x1004, Entry::Exit(OUT80)),
        ];
        let mut r = Replayer::new(VecSource(log.clone().into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        assert!(matches!(r.time(TimeSource::Rtc), Err(ReplayError::Divergence(_))));
        let mut r = Replayer::new(VecSource(log.into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        let err = r.exit(pos(2, 0x1004), OUT80).unwrap_err();
        assert!(err.to_string().contains("never taken"), "{err}");
    }

    #[test]
    fn end_of_log_is_not_a_divergence() {
        let log = vec![rec(1, 0x1000, Entry::Exit(OUT80))];
        let mut r = Replayer::new(VecSource(log.into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        assert!(matches!(r.take_event(), Err(ReplayError::EndOfLog { last_exit: 0 })));
        assert!(matches!(r.exit(pos(2, 0x1004), OUT80), Err(ReplayError::EndOfLog { last_exit: 1 })));
    }

    #[test]
    fn end_checks_status_and_digest() {
        let log = vec![rec(1, 0x1000, Entry::End { status: 0, digest: Digest([1; 32]) })];
        let mut r = Replayer::new(VecSource(log.into_iter()));
        let err = r.end(pos(1, 0x1000), 0, Digest([2; 32])).unwrap_err();
        assert!(matches!(err, ReplayError::Divergence(_)), "{err}");
    }

    #[test]
    fn a_sync_is_the_next_position_and_is_read_whole() {
        let sync_at = pos(2, 0x2000);
        let log = vec![
            rec(1, 0x1000, Entry::Exit(OUT80)),
            rec(1, 0x1000, Entry::Event(Event::Interrupt { vector: 0x20 })),
            rec(2, 0x2000, Entry::Event(Event::Sync(SyncPart::Pages { first: 3, data: vec![1; 4096] }))),
            rec(2, 0x2000, Entry::Event(Event::Sync(SyncPart::Zeros { first: 9, count: 4 }))),
            rec(2, 0x2000, Entry::Event(Event::Sync(SyncPart::Vcpu { state: vec![5, 6] }))),
            rec(2, 0x2000, Entry::Event(Event::Interrupt { vector: 0x20 })),
            rec(3, 0x1000, Entry::Exit(OUT80)),
        ];
        let mut r = Replayer::new(VecSource(log.clone().into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        assert_eq!(r.take_event().unwrap(), Some(Event::Interrupt { vector: 0x20 }));
        assert_eq!(r.take_event().unwrap(), None, "the sync is not an input of exit 1");
        let sync = r.next_sync(1 << 20).unwrap().expect("a sync follows exit 1");
        assert_eq!(sync.position, sync_at);
        assert_eq!(sync.memory.len(), 2);
        assert_eq!(sync.page_bytes(), 4096);
        assert_eq!(sync.vcpu, vec![5, 6]);
        assert_eq!(r.take_event().unwrap(), Some(Event::Interrupt { vector: 0x20 }), "the sync's own input");
        assert_eq!(r.next_sync(1 << 20).unwrap(), None, "an exit follows");
        r.exit(pos(3, 0x1000), OUT80).unwrap();

        // Executing instead of applying the sync is a divergence...
        let mut r = Replayer::new(VecSource(log.clone().into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        r.take_event().unwrap();
        let err = r.exit(pos(2, 0x1008), OUT80).unwrap_err();
        assert!(err.to_string().contains("expected a state sync at exit 2"), "{err}");
        // ...as is a sync bigger than the guest's memory.
        let mut r = Replayer::new(VecSource(log.clone().into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        r.take_event().unwrap();
        assert!(matches!(r.next_sync(4095), Err(ReplayError::Divergence(_))));
        // A log cut inside a sync ends there: nothing of it is handed out.
        let cut: Vec<Record> = log[..4].to_vec();
        let mut r = Replayer::new(VecSource(cut.into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        r.take_event().unwrap();
        assert!(matches!(r.next_sync(1 << 20), Err(ReplayError::EndOfLog { last_exit: 1 })));
        // So is one that ends right after an exit's inputs.
        let cut: Vec<Record> = log[..2].to_vec();
        let mut r = Replayer::new(VecSource(cut.into_iter()));
        r.exit(pos(1, 0x1000), OUT80).unwrap();
        r.take_event().unwrap();
        assert!(matches!(r.next_sync(1 << 20), Err(ReplayError::EndOfLog { last_exit: 1 })));
    }

    #[test]
    fn a_replay_resumed_from_a_state_may_begin_with_a_sync() {
        let log = vec![
            rec(8, 0x2000, Entry::Event(Event::Sync(SyncPart::Vcpu { state: vec![1] }))),
            rec(9, 0x1000, Entry::Exit(OUT80)),
        ];
        let mut r = Replayer::new(VecSource(log.into_iter()));
        r.resume_after(7);
        assert_eq!(r.next_sync(0).unwrap().map(|s| s.position), Some(pos(8, 0x2000)));
        assert_eq!(r.next_sync(0).unwrap(), None);
        r.exit(pos(9, 0x1000), OUT80).unwrap();
    }

    #[test]
    fn header_mismatch_names_the_difference() {
        let ours =
            Header { image_hash: Digest([1; 32]), config: "mem=64".into(), wall_clock_base_ns: 5, disk_generation: 0 };
        let other_image = Header { image_hash: Digest([2; 32]), ..ours.clone() };
        assert!(other_image.check_matches(&ours).unwrap_err().contains("another guest image"));
        let other_config = Header { config: "mem=128".into(), ..ours.clone() };
        assert!(other_config.check_matches(&ours).unwrap_err().contains("another VM configuration"));
        let other_time = Header { wall_clock_base_ns: 9, ..ours.clone() };
        assert!(other_time.check_matches(&ours).is_ok());
    }
}
