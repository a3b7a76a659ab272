//! Property tests of the snapshot stream (src/snapshot.rs): random memory
//! items (`Pages`, `Zeros`) and whole streams (`Begin`, memory, `Machine`,
//! `End`) written by `StateWriter` read back equal through `StateReader`;
//! a stream cut anywhere or with a flipped bit fails cleanly; and applying
//! the items read leaves memory as the items say. No KVM needed.
//!
//! With `FTVMM_FUZZ_SEEDS=DIR` set, `a_whole_stream_round_trips` also
//! writes the seeds of the fuzz target `fuzz/fuzz_targets/snapshot_reader.rs`
//! into DIR/snapshot_reader (fuzz/seeds holds the ones it wrote).

use proptest::collection::vec;
use proptest::prelude::*;
use replay::Digest;
use vm_memory::{Bytes, GuestAddress};
use vmm::clock::VirtualClock;
use vmm::devices::Devices;
use vmm::memory::{GuestMem, PAGE_SIZE};
use vmm::snapshot::{apply_memory, MachineState, SnapshotError, StateItem, StateReader, StateWriter};
use vmm::vm::VcpuState;

const PAGES: u64 = 32;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// A memory item inside `PAGES` pages, or (rarely) anywhere.
fn memory_item() -> impl Strategy<Value = StateItem> {
    prop_oneof![
        4 => (0..PAGES, 1u64..=4, any::<u8>(), vec(any::<u8>(), 1..64)).prop_map(|(first, n, fill, head)| {
            let mut data = vec![fill; (n * PAGE_SIZE) as usize];
            data[..head.len()].copy_from_slice(&head);
            StateItem::Pages { first, data }
        }),
        4 => (0..PAGES, 0..PAGES).prop_map(|(first, count)| StateItem::Zeros { first, count }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(first, count)| StateItem::Zeros { first, count }),
    ]
}

fn machine() -> MachineState {
    let vcpu = VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        msrs: vec![(0x10, 12345), (0xc000_0080, 0x500)],
        events: Default::default(),
        irq_window: true,
    };
    MachineState {
        vcpu,
        devices: Devices::new(PAGES * PAGE_SIZE, Some(1 << 20), Some(MAC)).state(),
        clock: VirtualClock::default(),
        exits: 77,
        injected_at: 70,
        wall_clock_base_ns: 1_700_000_000_000_000_000,
        disk_generation: 3,
    }
}

/// Items have no PartialEq (the machine state holds KVM's structs): equal
/// when they encode the same.
fn same(a: &StateItem, b: &StateItem) -> bool {
    bincode::serialize(a).unwrap() == bincode::serialize(b).unwrap()
}

fn write(items: &[StateItem]) -> Vec<u8> {
    let mut w = StateWriter::new(Vec::new()).unwrap();
    for item in items {
        w.item(item).unwrap();
    }
    w.into_inner()
}

/// The items up to End, the end of the input or the first error.
fn read(bytes: &[u8]) -> (Vec<StateItem>, Option<SnapshotError>) {
    let mut items = Vec::new();
    let mut r = match StateReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return (items, Some(e)),
    };
    loop {
        match r.next_item() {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return (items, None),
            Err(e) => return (items, Some(e)),
        }
    }
}

fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), (PAGES * PAGE_SIZE) as usize)]).unwrap()
}

proptest! {
    // The failing input is printed; no regression file in the tree.
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Memory items read back equal, and applying them in order gives the
    /// memory a model of it predicts (items outside it are refused).
    #[test]
    fn memory_items_round_trip_and_apply(items in vec(memory_item(), 0..12)) {
        let mut all: Vec<StateItem> = items;
        all.push(StateItem::End { digest: Digest([9; 32]), memory: true });
        let bytes = write(&all);
        let (got, err) = read(&bytes);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(got.len(), all.len());
        let m = mem();
        let mut model = vec![0xeeu8; (PAGES * PAGE_SIZE) as usize];
        m.write_slice(&model, GuestAddress(0)).unwrap();
        for (a, b) in all.iter().zip(&got) {
            prop_assert!(same(a, b), "{:?} read back as {:?}", a, b);
            let applied = apply_memory(&m, PAGES * PAGE_SIZE, b).is_ok();
            // What the item writes where, if it fits in memory.
            let write = match b {
                StateItem::Pages { first, data } => Some((*first, data.clone())),
                StateItem::Zeros { first, count } => count
                    .checked_mul(PAGE_SIZE)
                    .filter(|&n| n <= PAGES * PAGE_SIZE)
                    .map(|n| (*first, vec![0u8; n as usize])),
                _ => {
                    prop_assert!(!applied);
                    continue;
                }
            };
            let fits = write.as_ref().is_some_and(|(first, d)| {
                first
                    .checked_mul(PAGE_SIZE)
                    .and_then(|s| s.checked_add(d.len() as u64))
                    .is_some_and(|e| e <= PAGES * PAGE_SIZE)
            });
            prop_assert_eq!(applied, fits, "{:?}", b);
            if let (true, Some((first, d))) = (fits, write) {
                let at = (first * PAGE_SIZE) as usize;
                model[at..at + d.len()].copy_from_slice(&d);
            }
        }
        let mut actual = vec![0u8; model.len()];
        m.read_slice(&mut actual, GuestAddress(0)).unwrap();
        prop_assert!(actual == model, "memory is not what the items say");
    }

    /// A stream cut at any byte reads as a prefix of its items and then
    /// `Truncated`; a flipped bit anywhere after the version is an error,
    /// after a prefix of the items, never a different item.
    #[test]
    fn cut_or_flipped_streams_fail_cleanly(
        items in vec(memory_item(), 1..6),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut all: Vec<StateItem> = items;
        all.push(StateItem::End { digest: Digest([1; 32]), memory: true });
        let bytes = write(&all);
        let cut = cut.index(bytes.len());
        let (got, err) = read(&bytes[..cut]);
        prop_assert!(matches!(err, Some(SnapshotError::Truncated)), "cut at {}: {:?}", cut, err);
        for (a, b) in all.iter().zip(&got) {
            prop_assert!(same(a, b));
        }
        let mut bad = bytes.clone();
        let at = 12 + flip.index(bytes.len() - 12);
        bad[at] ^= 1 << bit;
        let (got, err) = read(&bad);
        prop_assert!(err.is_some(), "a flip at {} went unnoticed", at);
        for (a, b) in all.iter().zip(&got) {
            prop_assert!(same(a, b), "a flip at {} changed an item", at);
        }
    }

    /// Random bytes, alone and after the magic and version: items or
    /// errors, never a panic.
    #[test]
    fn garbage_never_panics(raw in vec(any::<u8>(), 0..1024)) {
        let mut stream = vmm::snapshot::MAGIC.to_vec();
        stream.extend_from_slice(&vmm::snapshot::VERSION.to_le_bytes());
        stream.extend_from_slice(&raw);
        let (items, _) = read(&stream);
        let m = mem();
        for item in &items {
            let _ = apply_memory(&m, PAGES * PAGE_SIZE, item);
        }
        let _ = read(&raw);
    }
}

/// A whole stream as a snapshot file holds it reads back item for item,
/// and its machine state restores into the devices it came from.
#[test]
fn a_whole_stream_round_trips() {
    let items = vec![
        StateItem::Begin {
            image_hash: Digest([5; 32]),
            config: "mem_mib=1 disk net".into(),
            mem_size: PAGES * PAGE_SIZE,
            exits: 77,
        },
        StateItem::Pages { first: 2, data: (0..PAGE_SIZE).map(|i| i as u8).collect() },
        StateItem::Zeros { first: 3, count: 5 },
        StateItem::Machine(Box::new(machine())),
        StateItem::End { digest: Digest([6; 32]), memory: true },
    ];
    let bytes = write(&items);
    let (got, err) = read(&bytes);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.len(), items.len());
    for (a, b) in items.iter().zip(&got) {
        assert!(same(a, b), "{a:?} read back as {b:?}");
    }
    let StateItem::Machine(m) = &got[3] else { panic!("not the machine: {:?}", got[3]) };
    let mut devices = Devices::new(PAGES * PAGE_SIZE, Some(1 << 20), Some(MAC));
    devices.restore(m.devices.clone()).unwrap();
    assert_eq!((m.exits, m.injected_at, m.disk_generation), (77, 70, 3));

    if let Some(dir) = std::env::var_os("FTVMM_FUZZ_SEEDS") {
        // The fuzz target takes the stream itself, or (first byte 1) its
        // items' payloads as `length: u16 LE | payload`.
        let dir = std::path::Path::new(&dir).join("snapshot_reader");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stream"), &bytes).unwrap();
        let mut framed = vec![1u8];
        for item in &items {
            let payload = bincode::serialize(item).unwrap();
            framed.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_le_bytes());
            framed.extend_from_slice(&payload);
        }
        std::fs::write(dir.join("payloads"), framed).unwrap();
    }
}
