//! kvstore: a remote hashtable (UpRight's workload) on the virtio disk.
//!
//! Commands arrive on the serial port, one per line, and each gets one reply:
//! `set K V` → `OK`, `get K` → `VALUE V` or `NOTFOUND`, `del K` → `OK`;
//! anything else → `ERR <why>`. Keys and values are printable tokens without
//! spaces, up to 64 bytes. A `set` or `del` is on disk (written and flushed)
//! before its `OK` is sent, so a reply the client saw survives a restart (and,
//! under fault tolerance, a failover).
//!
//! On-disk layout: a log of 512-byte sectors, one record each, from sector 0:
//! magic `KVS1`, sequence number (= sector index), op (1 set, 2 del), key
//! length, value length, key, value. At boot the log is replayed until the
//! first sector that is not the next record; new records are appended.
#![no_std]
#![no_main]

use guest_rt::virtio_blk::{self, Disk, SECTOR};
use guest_rt::{console, hw, print_bytes, println};

guest_rt::entry!(main);

const MAGIC: &[u8; 4] = b"KVS1";
const MAX_TOKEN: usize = 64;
const SLOTS: usize = 1024;

#[derive(Clone, Copy)]
struct Slot {
    used: bool,
    key: [u8; MAX_TOKEN],
    klen: u8,
    value: [u8; MAX_TOKEN],
    vlen: u8,
}

const EMPTY: Slot = Slot { used: false, key: [0; MAX_TOKEN], klen: 0, value: [0; MAX_TOKEN], vlen: 0 };

struct Table {
    slots: [Slot; SLOTS],
}

impl Table {
    fn find(&self, key: &[u8]) -> Option<usize> {
        self.slots.iter().position(|s| s.used && &s.key[..usize::from(s.klen)] == key)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        let i = match self.find(key) {
            Some(i) => i,
            None => match self.slots.iter().position(|s| !s.used) {
                Some(i) => i,
                None => return false,
            },
        };
        let s = &mut self.slots[i];
        s.used = true;
        s.key[..key.len()].copy_from_slice(key);
        s.klen = key.len() as u8;
        s.value[..value.len()].copy_from_slice(value);
        s.vlen = value.len() as u8;
        true
    }

    fn del(&mut self, key: &[u8]) {
        if let Some(i) = self.find(key) {
            self.slots[i].used = false;
        }
    }

    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key).map(|i| &self.slots[i].value[..usize::from(self.slots[i].vlen)])
    }
}

static mut TABLE: Table = Table { slots: [EMPTY; SLOTS] };

struct Store {
    disk: Disk,
    next: u64,
}

impl Store {
    /// Replays the on-disk log into the table.
    fn open(mut disk: Disk, table: &mut Table) -> Option<Store> {
        let mut batch = [0u8; 8 * SECTOR];
        let mut next = 0u64;
        'scan: while next < disk.sectors() {
            let count = (disk.sectors() - next).min(8) as usize;
            if !disk.read(next, &mut batch[..count * SECTOR]) {
                return None;
            }
            for rec in batch[..count * SECTOR].chunks(SECTOR) {
                let seq = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
                if &rec[..4] != MAGIC || u64::from(seq) != next {
                    break 'scan;
                }
                let (op, klen, vlen) = (rec[8], usize::from(rec[9]), usize::from(rec[10]));
                let key = &rec[11..11 + klen.min(MAX_TOKEN)];
                let value = &rec[11 + MAX_TOKEN..11 + MAX_TOKEN + vlen.min(MAX_TOKEN)];
                match op {
                    1 => {
                        table.set(key, value);
                    }
                    2 => table.del(key),
                    _ => break 'scan,
                }
                next += 1;
            }
        }
        Some(Store { disk, next })
    }

    fn append(&mut self, op: u8, key: &[u8], value: &[u8]) -> bool {
        if self.next >= self.disk.sectors() {
            return false;
        }
        let mut rec = [0u8; SECTOR];
        rec[..4].copy_from_slice(MAGIC);
        rec[4..8].copy_from_slice(&(self.next as u32).to_le_bytes());
        rec[8] = op;
        rec[9] = key.len() as u8;
        rec[10] = value.len() as u8;
        rec[11..11 + key.len()].copy_from_slice(key);
        rec[11 + MAX_TOKEN..11 + MAX_TOKEN + value.len()].copy_from_slice(value);
        if !self.disk.write(self.next, &rec) || !self.disk.flush() {
            return false;
        }
        self.next += 1;
        true
    }
}

fn valid_token(t: &[u8]) -> bool {
    !t.is_empty() && t.len() <= MAX_TOKEN && t.iter().all(|b| b.is_ascii_graphic())
}

fn main() -> u8 {
    hw::pic_init();
    let Some(disk) = virtio_blk::init() else {
        println!("kvstore: no disk (run with --disk)");
        return 1;
    };
    // SAFETY: the table is only used from this (single) thread of control;
    // interrupt handlers never touch it.
    let table = unsafe { &mut *core::ptr::addr_of_mut!(TABLE) };
    let Some(mut store) = Store::open(disk, table) else {
        println!("kvstore: cannot read the disk");
        return 1;
    };
    console::start_rx_interrupts();
    println!("kvstore: ready ({} records)", store.next);

    let mut lines = console::LineReader::new();
    loop {
        let Some(line) = lines.poll() else {
            guest_rt::wait_for_interrupt();
            continue;
        };
        let mut words = line.split(|c| *c == b' ').filter(|w| !w.is_empty());
        let (cmd, a, b, extra) = (words.next(), words.next(), words.next(), words.next());
        match (cmd, a, b, extra) {
            (Some(b"set"), Some(k), Some(v), None) if valid_token(k) && valid_token(v) => {
                if table.find(k).is_none() && !table.slots.iter().any(|s| !s.used) {
                    println!("ERR table full");
                } else if store.append(1, k, v) {
                    table.set(k, v);
                    println!("OK");
                } else {
                    println!("ERR disk");
                }
            }
            (Some(b"get"), Some(k), None, None) if valid_token(k) => match table.get(k) {
                Some(v) => {
                    print_bytes(b"VALUE ");
                    print_bytes(v);
                    print_bytes(b"\n");
                }
                None => println!("NOTFOUND"),
            },
            (Some(b"del"), Some(k), None, None) if valid_token(k) => {
                if store.append(2, k, b"") {
                    table.del(k);
                    println!("OK");
                } else {
                    println!("ERR disk");
                }
            }
            (Some(b"quit"), None, None, None) => {
                println!("BYE");
                return 0;
            }
            _ => println!("ERR usage: set K V | get K | del K"),
        }
    }
}
