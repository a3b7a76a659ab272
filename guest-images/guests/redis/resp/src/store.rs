//! The key space: fixed-size entries in caller-provided memory (a static
//! arena in the guest) and an open-addressing index over them. No heap.
//!
//! Every entry has room for the longest key and value ([`MAX_KEY`] +
//! [`MAX_VALUE`] bytes), so a store of N entries holds N keys whatever their
//! sizes, and an update never moves data. The index is a power-of-two table
//! of u32 (0 empty, 1 deleted, else entry + 2) probed linearly, at least
//! twice the entries; it is rebuilt in place when deleted markers pile up.

/// Longest key and longest value.
pub const MAX_KEY: usize = 512;
pub const MAX_VALUE: usize = 512;

const EMPTY: u32 = 0;
const DELETED: u32 = 1;
const FIRST_ENTRY: u32 = 2;
/// `klen` of an entry on the free list (whose `hash` links to the next).
const FREE: u16 = u16::MAX;
const NONE: u32 = u32::MAX;

/// One key and its value.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Entry {
    hash: u32,
    klen: u16,
    vlen: u16,
    data: [u8; MAX_KEY + MAX_VALUE],
}

impl Entry {
    /// An unused entry: all zero, so an array of them can live in .bss.
    pub const ZERO: Entry = Entry { hash: 0, klen: 0, vlen: 0, data: [0; MAX_KEY + MAX_VALUE] };

    fn key(&self) -> &[u8] {
        &self.data[..usize::from(self.klen)]
    }

    fn value(&self) -> &[u8] {
        let k = usize::from(self.klen);
        &self.data[k..k + usize::from(self.vlen)]
    }
}

/// Why a key could not be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The key or the value is longer than [`MAX_KEY`] / [`MAX_VALUE`].
    TooLong,
    /// Every entry is in use.
    Full,
}

/// The key space.
pub struct Store<'a> {
    entries: &'a mut [Entry],
    index: &'a mut [u32],
    len: usize,
    /// Entries below this have been used at some point.
    high_water: usize,
    free_head: u32,
    deleted: usize,
}

/// FNV-1a (32 bit) of a key.
fn hash(key: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in key {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

enum Probe {
    /// The key is at `index[slot]`, entry `entry`.
    Found { slot: usize, entry: usize },
    /// The key is absent; it would go in `index[slot]`.
    Absent { slot: usize },
}

impl<'a> Store<'a> {
    /// A store of `entries.len()` keys. `index.len()` must be a power of two
    /// and at least twice `entries.len()`. Both are cleared.
    pub fn new(entries: &'a mut [Entry], index: &'a mut [u32]) -> Store<'a> {
        assert!(index.len().is_power_of_two() && index.len() >= 2 * entries.len(), "index too small");
        assert!(entries.len() < (NONE - FIRST_ENTRY) as usize, "too many entries");
        index.fill(EMPTY);
        Store { entries, index, len: 0, high_water: 0, free_head: NONE, deleted: 0 }
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most keys the store can hold.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Keys that can still be added.
    pub fn free(&self) -> usize {
        self.capacity() - self.len
    }

    fn probe(&self, key: &[u8], h: u32) -> Probe {
        let mask = self.index.len() - 1;
        let mut slot = h as usize & mask;
        let mut first_deleted = None;
        loop {
            match self.index[slot] {
                EMPTY => return Probe::Absent { slot: first_deleted.unwrap_or(slot) },
                DELETED => {
                    first_deleted.get_or_insert(slot);
                }
                v => {
                    let entry = (v - FIRST_ENTRY) as usize;
                    let e = &self.entries[entry];
                    if e.hash == h && e.key() == key {
                        return Probe::Found { slot, entry };
                    }
                }
            }
            // Terminates: at most 3/4 of the index is in use (`rebuild_if_crowded`).
            slot = (slot + 1) & mask;
        }
    }

    fn find(&self, key: &[u8]) -> Option<usize> {
        if key.len() > MAX_KEY {
            return None;
        }
        match self.probe(key, hash(key)) {
            Probe::Found { entry, .. } => Some(entry),
            Probe::Absent { .. } => None,
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key).map(|e| self.entries[e].value())
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.find(key).is_some()
    }

    /// Whether `set(key, ..)` would find room (the key exists or an entry is free).
    pub fn has_room_for(&self, key: &[u8]) -> bool {
        self.free() > 0 || self.contains(key)
    }

    /// Stores `value` under `key`. On error the store is unchanged.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return Err(StoreError::TooLong);
        }
        let h = hash(key);
        let entry = match self.probe(key, h) {
            Probe::Found { entry, .. } => entry,
            Probe::Absent { slot } => {
                let entry = self.allocate().ok_or(StoreError::Full)?;
                if self.index[slot] == DELETED {
                    self.deleted -= 1;
                }
                self.index[slot] = entry as u32 + FIRST_ENTRY;
                self.len += 1;
                let e = &mut self.entries[entry];
                e.hash = h;
                e.klen = key.len() as u16;
                e.data[..key.len()].copy_from_slice(key);
                self.rebuild_if_crowded();
                entry
            }
        };
        let e = &mut self.entries[entry];
        let k = usize::from(e.klen);
        e.data[k..k + value.len()].copy_from_slice(value);
        e.vlen = value.len() as u16;
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn del(&mut self, key: &[u8]) -> bool {
        if key.len() > MAX_KEY {
            return false;
        }
        let Probe::Found { slot, entry } = self.probe(key, hash(key)) else {
            return false;
        };
        self.index[slot] = DELETED;
        self.deleted += 1;
        self.len -= 1;
        let e = &mut self.entries[entry];
        e.klen = FREE;
        e.hash = self.free_head;
        self.free_head = entry as u32;
        self.rebuild_if_crowded();
        true
    }

    /// Removes every key.
    pub fn clear(&mut self) {
        self.index.fill(EMPTY);
        self.len = 0;
        self.high_water = 0;
        self.free_head = NONE;
        self.deleted = 0;
    }

    fn allocate(&mut self) -> Option<usize> {
        if self.free_head != NONE {
            let entry = self.free_head as usize;
            self.free_head = self.entries[entry].hash;
            return Some(entry);
        }
        if self.high_water < self.entries.len() {
            self.high_water += 1;
            return Some(self.high_water - 1);
        }
        None
    }

    /// Keeps at least a quarter of the index empty, so that every probe
    /// ends: rebuilding leaves only the live keys (at most half of it).
    fn rebuild_if_crowded(&mut self) {
        if (self.len + self.deleted) * 4 > self.index.len() * 3 {
            self.rebuild();
        }
    }

    /// Re-indexes every entry, dropping the deleted markers.
    fn rebuild(&mut self) {
        self.index.fill(EMPTY);
        self.deleted = 0;
        let mask = self.index.len() - 1;
        for entry in 0..self.high_water {
            let e = &self.entries[entry];
            if e.klen == FREE {
                continue;
            }
            let mut slot = e.hash as usize & mask;
            while self.index[slot] != EMPTY {
                slot = (slot + 1) & mask;
            }
            self.index[slot] = entry as u32 + FIRST_ENTRY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(n: usize) -> Store<'static> {
        let entries = Box::leak(vec![Entry::ZERO; n].into_boxed_slice());
        let index = Box::leak(vec![0u32; (2 * n).next_power_of_two()].into_boxed_slice());
        Store::new(entries, index)
    }

    #[test]
    fn set_get_del() {
        let mut s = store(4);
        assert_eq!(s.get(b"a"), None);
        s.set(b"a", b"1").unwrap();
        s.set(b"", b"empty key").unwrap();
        assert_eq!(s.get(b"a"), Some(&b"1"[..]));
        assert_eq!(s.get(b""), Some(&b"empty key"[..]));
        s.set(b"a", b"longer value").unwrap();
        assert_eq!(s.get(b"a"), Some(&b"longer value"[..]));
        assert_eq!(s.len(), 2);
        assert!(s.del(b"a"));
        assert!(!s.del(b"a"));
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn limits() {
        let mut s = store(2);
        let long = [b'x'; MAX_KEY + 1];
        assert_eq!(s.set(&long, b"v"), Err(StoreError::TooLong));
        assert_eq!(s.set(b"k", &long), Err(StoreError::TooLong));
        s.set(&long[..MAX_KEY], &long[..MAX_VALUE]).unwrap();
        assert_eq!(s.get(&long[..MAX_KEY]).map(<[u8]>::len), Some(MAX_VALUE));
        s.set(b"b", b"2").unwrap();
        assert_eq!(s.set(b"c", b"3"), Err(StoreError::Full));
        // Full, but existing keys can still change.
        s.set(b"b", b"22").unwrap();
        assert_eq!(s.get(b"b"), Some(&b"22"[..]));
        assert_eq!(s.get(b"c"), None);
        assert!(s.del(b"b"));
        s.set(b"c", b"3").unwrap();
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn churn_reuses_entries_and_rebuilds() {
        let mut s = store(64);
        for round in 0..200u32 {
            for i in 0..64u32 {
                let key = format!("k{}", (round * 64 + i) % 97);
                let _ = s.set(key.as_bytes(), &round.to_le_bytes());
            }
            for i in 0..97u32 {
                if (i + round) % 3 == 0 {
                    s.del(format!("k{i}").as_bytes());
                }
            }
            assert!(s.len() <= 64);
        }
        let count = (0..97).filter(|i| s.contains(format!("k{i}").as_bytes())).count();
        assert_eq!(count, s.len());
        s.clear();
        assert!(s.is_empty());
        for i in 0..64 {
            s.set(format!("n{i}").as_bytes(), b"v").unwrap();
        }
        assert_eq!(s.set(b"more", b"v"), Err(StoreError::Full));
    }
}
