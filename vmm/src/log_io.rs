//! Where the log goes and comes from: a file (`--record`, `--replay`) or
//! the logging channel (a primary's link to its backup, a backup's to its
//! primary). The run's inputs record into a [`LogSink`] and replay from a
//! [`LogSource`].

use logging_channel::{BackupLink, PrimaryLink};
use replay::{LogError, LogReader, LogWriter, Record, RecordSink, RecordSource};
use std::fs::File;
use std::io::{BufReader, BufWriter};

/// Where recorded records go.
pub enum LogSink {
    File(LogWriter<BufWriter<File>>),
    Primary(PrimaryLink),
}

impl RecordSink for LogSink {
    fn append(&mut self, record: &Record) -> std::io::Result<()> {
        match self {
            LogSink::File(w) => w.append(record),
            LogSink::Primary(l) => l.append(record),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogSink::File(w) => w.flush(),
            LogSink::Primary(l) => l.flush(),
        }
    }
    fn passed(&mut self, exit: u64) -> std::io::Result<()> {
        match self {
            LogSink::File(w) => w.passed(exit),
            LogSink::Primary(l) => l.passed(exit),
        }
    }
}

/// Where replayed records come from.
pub enum LogSource {
    File(LogReader<BufReader<File>>),
    Backup(BackupLink),
}

impl RecordSource for LogSource {
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        match self {
            LogSource::File(r) => r.next_record(),
            LogSource::Backup(l) => l.next_record(),
        }
    }
    fn passed(&mut self, exit: u64) -> Result<bool, LogError> {
        match self {
            LogSource::File(r) => r.passed(exit),
            LogSource::Backup(l) => l.passed(exit),
        }
    }
}
