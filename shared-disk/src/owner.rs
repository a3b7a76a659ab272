//! The go-live arbitration record and its file: `IMAGE.owner` beside a
//! served image, or the `--state` file of an arbiter-only server (the same
//! format, the same guarantees).
//!
//! The file is three text lines, so an operator can read it:
//!
//! ```text
//! ftdisk-owner 1
//! generation 2
//! owner backup@host-b
//! ```
//!
//! It is replaced atomically (temp file, fsync, rename, fsync of the
//! directory): after a crash it holds either the old or the new record,
//! never a mix. A server holds a lock on `RECORD.lock` (an empty file
//! beside the record, left in place) while it serves the record, so two
//! servers cannot arbitrate on one record.

use crate::MAX_OWNER_LEN;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The first line of every record file.
const HEADER: &str = "ftdisk-owner 1";

/// Who owns the disk, and since which generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OwnerRecord {
    /// Bumped by every won test-and-set; 0 until the first.
    pub(crate) generation: u64,
    /// The last winner's name; empty at generation 0.
    pub(crate) owner: String,
}

/// `IMAGE.owner`, next to the image.
pub(crate) fn sidecar_path(image: &Path) -> PathBuf {
    let mut name = OsString::from(image.as_os_str());
    name.push(".owner");
    PathBuf::from(name)
}

/// `RECORD.lock`, the file a server locks while it serves the record at
/// `record` (the record itself is replaced by rename, so it cannot carry
/// the lock).
pub(crate) fn lock_path(record: &Path) -> PathBuf {
    let mut name = OsString::from(record.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

/// Why a name cannot be recorded as an owner: it must be a non-empty line of
/// at most [`MAX_OWNER_LEN`] bytes without control characters (the record
/// file is line-based, and the name ends up in logs).
pub(crate) fn check_owner(owner: &str) -> Result<(), String> {
    if owner.is_empty() {
        return Err("the owner name is empty".into());
    }
    if owner.len() > MAX_OWNER_LEN {
        return Err(format!("the owner name is {} bytes long (the limit is {MAX_OWNER_LEN})", owner.len()));
    }
    if owner.chars().any(char::is_control) {
        return Err("the owner name contains control characters".into());
    }
    Ok(())
}

/// Reads the record at `path`; creates it (generation 0, no owner) if the
/// file does not exist. A record that exists but does not parse is an
/// error, never a reset: resetting the generation would let a fenced VMM
/// write again.
pub(crate) fn load_or_create(path: &Path) -> Result<OwnerRecord, String> {
    match fs::read(path) {
        Ok(bytes) => parse(&bytes).map_err(|why| format!("{}: {why}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let record = OwnerRecord { generation: 0, owner: String::new() };
            persist(path, &record).map_err(|e| format!("creating {}: {e}", path.display()))?;
            Ok(record)
        }
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// The record as the file holds it.
pub(crate) fn render(record: &OwnerRecord) -> String {
    format!("{HEADER}\ngeneration {}\nowner {}\n", record.generation, record.owner)
}

/// Decodes a record file's bytes.
pub(crate) fn parse(bytes: &[u8]) -> Result<OwnerRecord, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not an ftdisk owner record (not UTF-8)".to_string())?;
    let body = text.strip_suffix('\n').ok_or("the owner record is truncated (no final newline)")?;
    let lines: Vec<&str> = body.split('\n').collect();
    let [header, generation, owner] = lines[..] else {
        return Err(format!("the owner record has {} lines instead of 3", lines.len()));
    };
    if header != HEADER {
        return Err(format!("not an ftdisk owner record (its first line is not {HEADER:?})"));
    }
    let generation = generation
        .strip_prefix("generation ")
        .and_then(|g| g.parse::<u64>().ok())
        .ok_or("the owner record's generation line is malformed")?;
    let owner = owner.strip_prefix("owner ").ok_or("the owner record's owner line is malformed")?;
    if generation == 0 && !owner.is_empty() {
        return Err("the owner record names an owner at generation 0".into());
    }
    if generation > 0 {
        check_owner(owner).map_err(|why| format!("the owner record is malformed: {why}"))?;
    }
    Ok(OwnerRecord { generation, owner: owner.to_string() })
}

/// Replaces the record at `path` with `record`, durably: when this returns
/// Ok the new record survives a crash of the server or the host.
pub(crate) fn persist(path: &Path, record: &OwnerRecord) -> io::Result<()> {
    let mut tmp_name = OsString::from(path.as_os_str());
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let text = render(record);
    {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // The rename itself is only durable once the directory is.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
