//! The errors that end a run, and the exit status that reports each.

use crate::vm::VmError;
use replay::{Divergence, LogError, ReplayError};

/// Why a run ended other than by the guest's own exit.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest did something that ends the VM (triple fault, emulation
    /// failure...).
    #[error("guest stopped: {what} at rip {rip:#x} after {exits} exits")]
    Guest { what: String, rip: u64, exits: u64 },
    #[error("{0}")]
    Divergence(Divergence),
    #[error("replay stopped: the log ends at exit {last_exit} before the guest finished (truncated log?)")]
    EndOfLog { last_exit: u64 },
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{what}: {err}")]
    Io { what: &'static str, err: std::io::Error },
    /// The other side won the go-live arbitration: this one must stop.
    #[error("{0}")]
    Halted(String),
}

impl From<crate::memory::MemoryError> for RunError {
    fn from(e: crate::memory::MemoryError) -> Self {
        RunError::Vm(e.into())
    }
}

impl From<ReplayError> for RunError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Divergence(d) => RunError::Divergence(d),
            ReplayError::EndOfLog { last_exit } => RunError::EndOfLog { last_exit },
            ReplayError::Log(l) => RunError::Log(l),
        }
    }
}

impl RunError {
    /// The process exit status that reports this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            RunError::Divergence(_) => 3,
            RunError::EndOfLog { .. } => 4,
            RunError::Halted(_) => 5,
            _ => 2,
        }
    }
}

/// A failure to append to the log (a file, or the logging channel).
pub(crate) fn log_write_error(err: std::io::Error) -> RunError {
    RunError::Io { what: "writing the log", err }
}

/// Why a VM could not be built or run, with the exit status reporting it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags, input files or peers: status 2.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Run(#[from] RunError),
    /// `--run-as` could not be honoured: status 2.
    #[error("{0}")]
    Privileges(#[from] crate::privileges::PrivilegeError),
    /// The seccomp filters could not be made or installed: status 2.
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

impl Error {
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Privileges(_) | Error::Seccomp(_) => 2,
            Error::Run(e) => e.exit_status(),
        }
    }
}

pub(crate) fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}
