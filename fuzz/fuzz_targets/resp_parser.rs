//! The redis guest's RESP2 parser and command engine
//! (guest-images/guests/redis/resp): `parse::parse` over arbitrary bytes,
//! and `Engine::feed` over them as a connection delivers them (in chunks,
//! its input buffered and its output drained as the guest does), with the
//! write-ahead log on an in-memory disk. Never a panic; the parser's spans
//! lie inside what it says it consumed and it says the same of that prefix
//! alone; `feed` consumes at most its input; and the journal, committed and
//! replayed into a new store, gives the store the engine had.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resp::log::{BlockDev, Journal, MIN_BUFFER, SECTOR};
use resp::parse::{parse, Parsed, Span, MAX_ARGS};
use resp::{BufSink, Engine, Entry, Status, Store};

const ENTRIES: usize = 32;
const DISK_SECTORS: usize = 512;
/// The guest's connections buffer at most this much input.
const MAX_REQUEST: usize = 8 << 10;

struct MemDisk(Vec<u8>);

impl BlockDev for &mut MemDisk {
    fn sectors(&self) -> u64 {
        (self.0.len() / SECTOR) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> bool {
        let at = sector as usize * SECTOR;
        match self.0.get(at..at + buf.len()) {
            Some(data) => {
                buf.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> bool {
        let at = sector as usize * SECTOR;
        match self.0.get_mut(at..at + buf.len()) {
            Some(data) => {
                data.copy_from_slice(buf);
                true
            }
            None => false,
        }
    }
    fn flush(&mut self) -> bool {
        true
    }
}

fn check_parse(input: &[u8]) {
    let mut spans = vec![Span::default(); MAX_ARGS];
    let parsed = parse(input, &mut spans);
    match parsed {
        Parsed::Command { len, argc } => {
            assert!(len > 0 && len <= input.len(), "a command of {len} bytes in {}", input.len());
            assert!(argc <= MAX_ARGS);
            for s in &spans[..argc] {
                assert!(s.start <= s.end && s.end <= len, "span {s:?} outside a {len}-byte command");
            }
            let mut again = vec![Span::default(); MAX_ARGS];
            assert_eq!(parse(&input[..len], &mut again), parsed, "the command alone parses otherwise");
            assert_eq!(&again[..argc], &spans[..argc]);
        }
        Parsed::Nothing { len } => {
            assert!(len > 0 && len <= input.len(), "nothing of {len} bytes in {}", input.len())
        }
        Parsed::Incomplete | Parsed::Error(_) => {}
    }
}

/// Runs a connection's bytes through an engine; returns the keys' values
/// at the end (for every argument seen, as a key) and the disk.
fn serve(data: &[u8], chunk: usize, out_room: usize) {
    let mut disk = MemDisk(vec![0; DISK_SECTORS * SECTOR]);
    let mut entries = vec![Entry::ZERO; ENTRIES];
    let mut index = vec![0u32; 2 * ENTRIES.next_power_of_two()];
    let mut jbuf = vec![0u8; MIN_BUFFER.div_ceil(SECTOR) * SECTOR];
    let mut store = Store::new(&mut entries, &mut index);
    let (journal, _) = Journal::open(&mut disk, &mut jbuf, &mut store).expect("an empty disk opens");
    let mut engine = Engine::new(store, Some(journal), MAX_REQUEST);
    let mut out = vec![0u8; out_room];
    let mut sink = BufSink::new(&mut out);
    let mut buffered: Vec<u8> = Vec::new();
    let mut closed = false;
    for piece in data.chunks(chunk.max(1)) {
        if closed {
            break;
        }
        buffered.extend_from_slice(piece);
        loop {
            let fed = engine.feed(&buffered, &mut sink);
            assert!(fed.consumed <= buffered.len(), "fed {} of {} bytes", fed.consumed, buffered.len());
            buffered.drain(..fed.consumed);
            match fed.status {
                Status::NeedInput => break,
                // The output goes out; the rest waits for room.
                Status::NeedRoom if !sink.data().is_empty() => sink.clear(),
                Status::NeedRoom => panic!("no room for a reply in an empty {out_room}-byte output"),
                Status::Close | Status::Shutdown => {
                    closed = true;
                    break;
                }
            }
        }
        sink.clear();
        if !engine.commit() {
            // The disk is full: the guest stops serving.
            return;
        }
    }
    // Every key the store holds now, as the engine answers GET for it.
    let keys: Vec<Vec<u8>> = data.split(|b| b" \r\n".contains(b)).map(|k| k.to_vec()).collect();
    let values: Vec<Option<Vec<u8>>> = keys.iter().map(|k| engine.store().get(k).map(|v| v.to_vec())).collect();
    let len = engine.store().len();
    drop(sink);
    drop(engine);

    // Replayed from the disk into a new store: the same keys and values.
    let mut entries = vec![Entry::ZERO; ENTRIES];
    let mut index = vec![0u32; 2 * ENTRIES.next_power_of_two()];
    let mut jbuf = vec![0u8; MIN_BUFFER.div_ceil(SECTOR) * SECTOR];
    let mut store = Store::new(&mut entries, &mut index);
    let (_journal, _) = Journal::open(&mut disk, &mut jbuf, &mut store).expect("the disk reads");
    assert_eq!(store.len(), len, "the replayed store holds another number of keys");
    for (k, v) in keys.iter().zip(&values) {
        assert_eq!(store.get(k).map(|v| v.to_vec()), *v, "key {k:?} replays to another value");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, data)) = data.split_first() else { return };
    check_parse(data);
    // Chunks of 1 to 64 bytes or whole; outputs of 600 bytes to 8 KiB.
    let chunk = if shape & 0x3f == 0 { data.len() } else { usize::from(shape & 0x3f) };
    let out_room = 600 + usize::from(shape >> 6) * 2600;
    serve(data, chunk, out_room);
});
