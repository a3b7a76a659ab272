//! VM state snapshots: one versioned, checksummed stream format for a
//! snapshot file (`--save-snapshot`, `--restore`) and for a live state
//! transfer to a joining backup (the same items, sent in rounds).
//!
//! ```text
//! magic "FTVMSNAP" | version: u32 LE
//! items: length: u32 LE | CRC-32 of the payload: u32 LE | payload: bincode of a StateItem
//! ```
//!
//! A stream is `Begin`, then memory (`Pages` and `Zeros` runs, in any order
//! and as often as pages changed: a later item overwrites an earlier one),
//! then `Machine` (the vCPU, the devices, the clock, the position), then
//! `End` with the state digest the restored VM must reproduce. Zero pages
//! cost a few bytes however many there are. Before `End` come the outputs
//! the VM had produced and not yet put out (`Pending*`: unapplied disk ops,
//! in op order, undelivered serial output and frames), so that whoever runs
//! the state on loses none of them.

use crate::clock::VirtualClock;
use crate::devices::DevicesState;
use crate::host::disk::DiskOp;
use crate::memory::{GuestMem, PAGE_SIZE};
use crate::output::PendingOutputs;
use crate::vm::VcpuState;
use replay::Digest;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use vm_memory::{Bytes, GuestAddress};

/// First bytes of a snapshot stream.
pub const MAGIC: &[u8; 8] = b"FTVMSNAP";
/// Version of the format written here; another is refused.
pub const VERSION: u32 = 2;
/// Most pages in one `Pages` item (1 MiB).
pub const PAGES_PER_ITEM: u64 = 256;
/// Most bytes of a pending write or serial output in one item.
pub const PENDING_PIECE: usize = 1 << 20;
/// Largest item accepted: a full `Pages` item and its encoding, with room.
const MAX_ITEM: u32 = 4 << 20;

/// One item of a snapshot stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum StateItem {
    /// What the state is of (it must match the VM it is restored into), and
    /// the exit it is at.
    Begin { image_hash: Digest, config: String, mem_size: u64, exits: u64 },
    /// Pages `first..first + data.len() / 4096` hold `data`.
    Pages { first: u64, data: Vec<u8> },
    /// Pages `first..first + count` are zero.
    Zeros { first: u64, count: u64 },
    /// Everything but memory.
    Machine(Box<MachineState>),
    /// Disk op `op`, a write (or a piece of one, of at most
    /// [`PENDING_PIECE`] bytes) not yet applied to the storage.
    PendingWrite {
        op: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Disk op `op`, a flush not yet applied.
    PendingFlush { op: u64 },
    /// Serial output of exit `exit` not yet delivered (or a piece of it).
    PendingSerial {
        exit: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A frame of exit `exit` not yet sent.
    PendingFrame {
        exit: u64,
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// The end of the stream: the digest the VM had — its full state digest
    /// (a snapshot file), or, `memory: false`, that of everything but
    /// memory (a live transfer, taken while the guest is stopped).
    End { digest: Digest, memory: bool },
}

/// Everything of a VM's state but its memory, at a guest-caused exit.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpu: VcpuState,
    pub devices: DevicesState,
    pub clock: VirtualClock,
    /// Guest-caused exits so far: the position the state is at.
    pub exits: u64,
    /// The exit of the last interrupt injection.
    pub injected_at: u64,
    /// Wall-clock time at boot, the RTC's base.
    pub wall_clock_base_ns: u64,
    /// The shared disk's owner generation the VM held.
    pub disk_generation: u64,
}

/// Why a snapshot stream is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an ftvmm snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is not supported (this ftvmm reads version {VERSION})")]
    Version(u32),
    #[error("the snapshot is truncated (it ends before its End item)")]
    Truncated,
    #[error("the snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Mismatch(String),
}

/// Writes a snapshot stream.
pub struct StateWriter<W: Write> {
    out: W,
}

impl<W: Write> StateWriter<W> {
    /// Starts a stream (writes the magic and the version).
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(StateWriter { out })
    }

    pub fn item(&mut self, item: &StateItem) -> std::io::Result<()> {
        let payload = bincode::serialize(item).map_err(std::io::Error::other)?;
        let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("state item too large"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&crc32fast::hash(&payload).to_le_bytes())?;
        self.out.write_all(&payload)
    }

    /// Flushes what the stream buffered to its writer.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Reads a snapshot stream, checking every item.
pub struct StateReader<R: Read> {
    input: R,
    ended: bool,
}

impl<R: Read> StateReader<R> {
    /// Checks the stream's magic and version.
    pub fn new(mut input: R) -> Result<Self, SnapshotError> {
        let mut head = [0u8; 12];
        read_exact_or_truncated(&mut input, &mut head)?;
        if &head[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        Ok(StateReader { input, ended: false })
    }

    /// The stream the items came from.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The next item; `None` after `End`.
    pub fn next_item(&mut self) -> Result<Option<StateItem>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        let mut head = [0u8; 8];
        read_exact_or_truncated(&mut self.input, &mut head)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_ITEM {
            return Err(SnapshotError::Corrupt(format!("an item of {len} bytes (the limit is {MAX_ITEM})")));
        }
        let mut payload = vec![0u8; len as usize];
        read_exact_or_truncated(&mut self.input, &mut payload)?;
        if crc32fast::hash(&payload) != crc {
            return Err(SnapshotError::Corrupt("an item's checksum does not match".into()));
        }
        let item: StateItem = bincode::deserialize(&payload)
            .map_err(|e| SnapshotError::Corrupt(format!("an item does not decode: {e}")))?;
        if matches!(item, StateItem::End { .. }) {
            self.ended = true;
        }
        Ok(Some(item))
    }
}

fn read_exact_or_truncated(input: &mut impl Read, buf: &mut [u8]) -> Result<(), SnapshotError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
        _ => SnapshotError::Io(e),
    })
}

/// The items of `pending`, in order (long writes and serial output in
/// pieces of at most [`PENDING_PIECE`] bytes). `emit` gets each item.
pub fn pending_items<E>(pending: &PendingOutputs, mut emit: impl FnMut(StateItem) -> Result<(), E>) -> Result<(), E> {
    for (op, disk_op) in &pending.disk {
        match disk_op {
            DiskOp::Write { offset, data } => {
                let mut at = 0;
                for piece in data.chunks(PENDING_PIECE) {
                    emit(StateItem::PendingWrite { op: *op, offset: offset + at, data: piece.to_vec() })?;
                    at += piece.len() as u64;
                }
            }
            DiskOp::Flush => emit(StateItem::PendingFlush { op: *op })?,
        }
    }
    for (exit, bytes) in &pending.serial {
        for piece in bytes.chunks(PENDING_PIECE) {
            emit(StateItem::PendingSerial { exit: *exit, bytes: piece.to_vec() })?;
        }
    }
    for (exit, frame) in &pending.frames {
        emit(StateItem::PendingFrame { exit: *exit, frame: frame.clone() })?;
    }
    Ok(())
}

/// Adds a `Pending*` item to `pending` (anything else is not pending output).
pub fn add_pending(pending: &mut PendingOutputs, item: StateItem) -> Result<(), SnapshotError> {
    match item {
        StateItem::PendingWrite { op, offset, data } => {
            pending.disk.push((op, DiskOp::Write { offset, data: std::sync::Arc::new(data) }))
        }
        StateItem::PendingFlush { op } => pending.disk.push((op, DiskOp::Flush)),
        StateItem::PendingSerial { exit, bytes } => pending.serial.push((exit, bytes)),
        StateItem::PendingFrame { exit, frame } => pending.frames.push((exit, frame)),
        _ => return Err(SnapshotError::Corrupt("not a pending output".into())),
    }
    if let [.., (a, _), (b, _)] = pending.disk.as_slice() {
        if b < a {
            return Err(SnapshotError::Corrupt("pending disk ops out of order".into()));
        }
    }
    Ok(())
}

/// Whether page `page` is set in a dirty bitmap of u64 words.
pub fn page_is_set(words: &[u64], page: u64) -> bool {
    words.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// The memory items for the pages set in `dirty` (None: every page), in
/// page order: runs of zero pages as `Zeros`, others as `Pages` of at most
/// [`PAGES_PER_ITEM`]. `emit` gets each item; its error stops the walk.
/// Reads guest memory as it is now (the guest may be running: a page it
/// changes meanwhile is dirty again and sent in a later round).
pub fn memory_items<E>(
    mem: &GuestMem,
    mem_size: u64,
    dirty: Option<&[u64]>,
    mut emit: impl FnMut(StateItem) -> Result<(), E>,
) -> Result<MemoryStats, E> {
    let pages = mem_size / PAGE_SIZE;
    let mut stats = MemoryStats::default();
    let mut page_buf = vec![0u8; PAGE_SIZE as usize];
    let mut run: Option<StateItem> = None;
    let flush = |run: &mut Option<StateItem>, emit: &mut dyn FnMut(StateItem) -> Result<(), E>| match run.take() {
        Some(item) => emit(item),
        None => Ok(()),
    };
    for page in 0..pages {
        if !dirty.is_none_or(|d| page_is_set(d, page)) {
            flush(&mut run, &mut emit)?;
            continue;
        }
        stats.pages += 1;
        // Guest memory is one region of mem_size bytes; a page inside it
        // always reads.
        if mem.read_slice(&mut page_buf, GuestAddress(page * PAGE_SIZE)).is_err() {
            continue;
        }
        let zero = page_buf.iter().all(|&b| b == 0);
        match (&mut run, zero) {
            (Some(StateItem::Zeros { first, count }), true) if *first + *count == page => *count += 1,
            (Some(StateItem::Pages { first, data }), false)
                if *first + data.len() as u64 / PAGE_SIZE == page
                    && (data.len() as u64) < PAGES_PER_ITEM * PAGE_SIZE =>
            {
                data.extend_from_slice(&page_buf)
            }
            _ => {
                flush(&mut run, &mut emit)?;
                run = Some(if zero {
                    StateItem::Zeros { first: page, count: 1 }
                } else {
                    StateItem::Pages { first: page, data: page_buf.clone() }
                });
            }
        }
        if zero {
            stats.zero_pages += 1;
        }
    }
    flush(&mut run, &mut emit)?;
    Ok(stats)
}

/// What a memory walk sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStats {
    pub pages: u64,
    pub zero_pages: u64,
}

/// Applies a memory item to `mem`; anything else is not memory.
pub fn apply_memory(mem: &GuestMem, mem_size: u64, item: &StateItem) -> Result<(), SnapshotError> {
    let pages = mem_size / PAGE_SIZE;
    let (first, count) = match item {
        StateItem::Pages { first, data } => {
            if data.is_empty() || !(data.len() as u64).is_multiple_of(PAGE_SIZE) {
                return Err(SnapshotError::Corrupt(format!("a page run of {} bytes", data.len())));
            }
            (*first, data.len() as u64 / PAGE_SIZE)
        }
        StateItem::Zeros { first, count } => (*first, *count),
        _ => return Err(SnapshotError::Corrupt("expected memory".into())),
    };
    if first.checked_add(count).is_none_or(|end| end > pages) {
        return Err(SnapshotError::Corrupt(format!("pages {first}+{count} beyond guest memory ({pages} pages)")));
    }
    let at = GuestAddress(first * PAGE_SIZE);
    let result = match item {
        StateItem::Pages { data, .. } => mem.write_slice(data, at),
        _ => {
            let zeros = vec![0u8; PAGE_SIZE as usize];
            (0..count).try_for_each(|i| mem.write_slice(&zeros, GuestAddress((first + i) * PAGE_SIZE)))
        }
    };
    result.map_err(|e| SnapshotError::Corrupt(format!("writing guest memory: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(pages: u64) -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), (pages * PAGE_SIZE) as usize)]).unwrap()
    }

    #[test]
    fn memory_round_trips_and_zero_pages_cost_nothing() {
        let src = mem(1024);
        src.write_slice(&[7u8; 5000], GuestAddress(3 * PAGE_SIZE)).unwrap();
        src.write_slice(&[9u8; 10], GuestAddress(1000 * PAGE_SIZE)).unwrap();
        let mut items = Vec::new();
        let stats = memory_items::<()>(&src, 1024 * PAGE_SIZE, None, |i| {
            items.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(stats.pages, 1024);
        assert_eq!(stats.zero_pages, 1021);
        let mut stream = StateWriter::new(Vec::new()).unwrap();
        for i in &items {
            stream.item(i).unwrap();
        }
        let bytes = stream.into_inner();
        assert!(bytes.len() < 3 * PAGE_SIZE as usize + 200, "zero pages cost a few bytes: {}", bytes.len());
        let dst = mem(1024);
        dst.write_slice(&[1u8; 64], GuestAddress(500 * PAGE_SIZE)).unwrap();
        let mut reader = StateReader::new(&bytes[..]).unwrap();
        while let Ok(Some(item)) = reader.next_item() {
            apply_memory(&dst, 1024 * PAGE_SIZE, &item).unwrap();
        }
        let (mut a, mut b) = (vec![0u8; 1024 * 4096], vec![0u8; 1024 * 4096]);
        src.read_slice(&mut a, GuestAddress(0)).unwrap();
        dst.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "the copy equals the original, the stale page zeroed");
    }

    #[test]
    fn only_dirty_pages_are_walked() {
        let src = mem(256);
        let mut dirty = vec![0u64; 4];
        dirty[1] = 0b101; // pages 64 and 66
        let mut pages = Vec::new();
        memory_items::<()>(&src, 256 * PAGE_SIZE, Some(&dirty), |i| {
            if let StateItem::Zeros { first, count } = i {
                pages.push((first, count));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(pages, vec![(64, 1), (66, 1)]);
    }

    #[test]
    fn bad_streams_are_refused_clearly() {
        assert!(matches!(StateReader::new(&b"FTVMSNA"[..]), Err(SnapshotError::Truncated)));
        assert!(matches!(StateReader::new(&b"NOTASNAPSHOT"[..]), Err(SnapshotError::BadMagic)));
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&99u32.to_le_bytes());
        assert!(matches!(StateReader::new(&v[..]), Err(SnapshotError::Version(99))));
        let mut w = StateWriter::new(Vec::new()).unwrap();
        w.item(&StateItem::Zeros { first: 0, count: 1 }).unwrap();
        let good = w.into_inner();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut r = StateReader::new(&flipped[..]).unwrap();
        assert!(matches!(r.next_item(), Err(SnapshotError::Corrupt(_))));
        let mut r = StateReader::new(&good[..good.len() - 2]).unwrap();
        assert!(matches!(r.next_item(), Err(SnapshotError::Truncated)));
        let mut r = StateReader::new(&good[..]).unwrap();
        r.next_item().unwrap();
        assert!(matches!(r.next_item(), Err(SnapshotError::Truncated)), "a stream without End is truncated");
        let dst = mem(4);
        let beyond = StateItem::Zeros { first: 3, count: 2 };
        assert!(apply_memory(&dst, 4 * PAGE_SIZE, &beyond).is_err());
        let ragged = StateItem::Pages { first: 0, data: vec![1; 100] };
        assert!(apply_memory(&dst, 4 * PAGE_SIZE, &ragged).is_err());
    }

    #[test]
    fn pending_outputs_round_trip_in_pieces_and_in_order() {
        let big = std::sync::Arc::new((0..(PENDING_PIECE * 2 + 100)).map(|i| i as u8).collect::<Vec<u8>>());
        let pending = PendingOutputs {
            disk: vec![(7, DiskOp::Write { offset: 4096, data: big.clone() }), (8, DiskOp::Flush)],
            serial: vec![(3, b"ok\n".to_vec())],
            frames: vec![(4, vec![0xff; 60])],
        };
        let mut w = StateWriter::new(Vec::new()).unwrap();
        let mut items = 0;
        pending_items(&pending, |item| {
            items += 1;
            w.item(&item)
        })
        .unwrap();
        assert_eq!(items, 3 + 1 + 1 + 1, "a write of two pieces and a bit is three items");
        let bytes = w.into_inner();
        let mut r = StateReader::new(&bytes[..]).unwrap();
        let mut back = PendingOutputs::default();
        while let Ok(Some(item)) = r.next_item() {
            add_pending(&mut back, item).unwrap();
        }
        // The pieces of op 7, laid in order, are the whole write.
        let mut disk = vec![0u8; big.len() + 4096];
        crate::host::disk::overlay(back.disk.iter().map(|(_, op)| op), 0, &mut disk);
        assert_eq!(&disk[4096..], &big[..]);
        assert!(back.disk.iter().take(3).all(|(seq, _)| *seq == 7));
        assert_eq!(back.disk[3], (8, DiskOp::Flush));
        assert_eq!((back.serial, back.frames), (pending.serial, pending.frames));
        let mut out_of_order = PendingOutputs::default();
        add_pending(&mut out_of_order, StateItem::PendingFlush { op: 9 }).unwrap();
        assert!(add_pending(&mut out_of_order, StateItem::PendingFlush { op: 8 }).is_err());
    }
}
