//! The user table: open addressing (linear probing) over 64-byte slots,
//! one cache line per user holding everything a read needs — the key's
//! hash, the first 32 bytes of the key, home, serving node, session count,
//! availability — and the slot's own version counter (a seqlock).
//!
//! Readers take no lock and write nothing shared: they read a slot's
//! fields between two reads of its version and retry if a writer was
//! there. Writers are serialised per shard by a mutex. Every field is an
//! `AtomicU64`, so a torn read is detected, never undefined behaviour.
//!
//! Deleted slots become tombstones (never empty again in the same table), so
//! a reader walking a probe chain never misses a key because another one
//! left. Growing (or purging tombstones) copies the live slots into a new
//! table and publishes it with an `ArcSwap`; the old table is marked
//! retired, and a reader that finds its table retired reads again in the
//! new one, so nobody answers from a table that writers have left.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};
use parking_lot::{Mutex, MutexGuard};

use super::ConnId;

/// Key bytes kept in the slot (four words); longer keys keep their first
/// 32 bytes there and are confirmed against a session's full JID.
pub(super) const KEY_INLINE: usize = 32;
const KEY_WORDS: usize = KEY_INLINE / 8;
/// `keylen` of a key longer than [`KEY_INLINE`].
const LONG: u64 = 0xff;

/// Hash of a slot never used in this table (ends every probe chain).
const EMPTY: u64 = 0;
/// Hash of a slot whose user left (probe chains go on past it).
const TOMB: u64 = 1;

/// Smallest table per shard.
const MIN_CAP: usize = 16;

/// One user: exactly one cache line.
#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    /// Even: stable; odd: a writer is changing the slot.
    seq: AtomicU64,
    /// The key's hash ([`EMPTY`], [`TOMB`] or ≥ 2).
    hash: AtomicU64,
    /// [`Meta`], packed.
    meta: AtomicU64,
    /// The connection of the user's first session (the others are in the
    /// shard's writer-only `extra` map under this connection).
    first: AtomicU64,
    /// ASCII-lower-cased key bytes, zero-padded (the first 32 of a long key).
    key: [AtomicU64; KEY_WORDS],
}

/// What a read returns about a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub home: u8,
    pub serving: u8,
    pub available: bool,
    pub count: u32,
}

impl Meta {
    fn pack(self, keylen: u64) -> u64 {
        u64::from(self.count)
            | u64::from(self.home) << 32
            | u64::from(self.serving) << 40
            | u64::from(self.available) << 48
            | keylen << 56
    }

    fn unpack(w: u64) -> Meta {
        Meta {
            count: w as u32,
            home: (w >> 32) as u8,
            serving: (w >> 40) as u8,
            available: (w >> 48) & 1 == 1,
        }
    }
}

fn keylen_of(meta: u64) -> u64 {
    meta >> 56
}

/// A key prepared for probing: its hash and its ASCII-lower-cased first 32
/// bytes as the slot stores them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Probe {
    pub hash: u64,
    words: [u64; KEY_WORDS],
    keylen: u64,
}

impl Probe {
    pub(super) fn new(seed: u64, bare: &[u8]) -> Probe {
        let h = super::key::hash_folded(seed, bare);
        Probe {
            hash: h.max(2),
            words: super::key::folded_words(bare),
            keylen: if bare.len() > KEY_INLINE {
                LONG
            } else {
                bare.len() as u64
            },
        }
    }

    fn is_long(&self) -> bool {
        self.keylen == LONG
    }
}

/// One table (a shard's current one, or a retired one a reader still holds).
struct Table {
    slots: Box<[Slot]>,
    /// Set (after the replacement is published) when writers leave it.
    retired: AtomicBool,
}

impl Table {
    fn with_capacity(cap: usize) -> Table {
        Table {
            slots: (0..cap).map(|_| Slot::default()).collect(),
            retired: AtomicBool::new(false),
        }
    }

    /// First slot of `hash`'s probe chain: the high bits of the hash scaled
    /// to the capacity (any capacity, not only powers of two).
    #[inline]
    fn home(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }
}

/// What a lock-free read found.
pub(super) enum Read {
    Miss,
    Hit(Meta),
    /// The hash and the first 32 bytes of a long key match: the caller
    /// confirms under the shard's lock.
    Unsure,
}

/// The writers' side of a shard, under its mutex.
#[derive(Default)]
pub(super) struct Writer {
    /// Live slots plus tombstones of the current table.
    used: usize,
    live: usize,
    /// Further sessions of multi-session users, by the user's first
    /// connection. Empty for single-session users (no allocation).
    pub extra: HashMap<ConnId, Vec<ConnId>>,
}

/// One shard of the user table.
pub(super) struct Shard {
    /// Unique among all shards of all trackers (keys the readers' caches).
    id: u64,
    table: Arc<ArcSwap<Table>>,
    writer: Mutex<Writer>,
}

static NEXT_SHARD: AtomicU64 = AtomicU64::new(0);

impl Default for Shard {
    fn default() -> Self {
        Shard {
            id: NEXT_SHARD.fetch_add(1, Ordering::Relaxed),
            table: Arc::new(ArcSwap::from_pointee(Table::with_capacity(MIN_CAP))),
            writer: Mutex::new(Writer::default()),
        }
    }
}

/// Per-thread cached tables, by shard id modulo the size: a reader finds
/// its shard's table with one plain load of the shard's pointer (no
/// read-modify-write, no fence: `ArcSwap::load` takes a `SeqCst` debt slot,
/// which keeps the misses of a batch of reads from overlapping). A cached
/// table is released when the thread next reads that shard, or the slot is
/// taken by another shard.
const CACHED: usize = 256;

type TableCache = Cache<Arc<ArcSwap<Table>>, Arc<Table>>;

thread_local! {
    static TABLES: RefCell<Vec<Option<(u64, TableCache)>>> =
        RefCell::new((0..CACHED).map(|_| None).collect());
}

/// Reads `s` consistently: (hash, packed meta, key words).
#[inline]
fn read_slot(s: &Slot) -> (u64, u64, [u64; KEY_WORDS]) {
    loop {
        let v1 = s.seq.load(Ordering::Acquire);
        if v1 & 1 == 0 {
            let hash = s.hash.load(Ordering::Relaxed);
            let meta = s.meta.load(Ordering::Relaxed);
            let key = [
                s.key[0].load(Ordering::Relaxed),
                s.key[1].load(Ordering::Relaxed),
                s.key[2].load(Ordering::Relaxed),
                s.key[3].load(Ordering::Relaxed),
            ];
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) == v1 {
                return (hash, meta, key);
            }
        }
        std::hint::spin_loop();
    }
}

/// Changes `s` under the seqlock (the caller holds the shard's writer lock).
fn write_slot(s: &Slot, f: impl FnOnce(&Slot)) {
    let v = s.seq.load(Ordering::Relaxed);
    s.seq.store(v.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    f(s);
    s.seq.store(v.wrapping_add(2), Ordering::Release);
}

fn key_matches(p: &Probe, meta: u64, key: &[u64; KEY_WORDS]) -> bool {
    keylen_of(meta) == p.keylen && *key == p.words
}

impl Shard {
    /// Lock-free read of the user `p`.
    #[inline]
    pub(super) fn read(&self, p: &Probe) -> Read {
        loop {
            let (r, retired) = self.with_table(|t| {
                let r = Self::read_in(t, p);
                (r, t.retired.load(Ordering::Acquire))
            });
            // A table writers have left may be behind the current one.
            if !retired {
                return r;
            }
        }
    }

    /// Runs `f` on the shard's current table, from this thread's cache.
    #[inline]
    fn with_table<R>(&self, f: impl Fn(&Table) -> R) -> R {
        TABLES
            .try_with(|c| {
                let mut c = c.borrow_mut();
                let e = &mut c[(self.id % CACHED as u64) as usize];
                if !matches!(e, Some((id, _)) if *id == self.id) {
                    *e = Some((self.id, Cache::new(self.table.clone())));
                }
                e.as_mut().map(|(_, cache)| f(cache.load()))
            })
            .ok()
            .flatten()
            // Only while the thread is being torn down: no cache.
            .unwrap_or_else(|| f(&self.table.load()))
    }

    #[inline]
    fn read_in(t: &Table, p: &Probe) -> Read {
        let mut i = t.home(p.hash);
        for _ in 0..t.slots.len() {
            let s = &t.slots[i];
            let h = s.hash.load(Ordering::Relaxed);
            if h == EMPTY {
                return Read::Miss;
            }
            if h == p.hash {
                let (h, meta, key) = read_slot(s);
                if h == p.hash && key_matches(p, meta, &key) {
                    return if p.is_long() {
                        Read::Unsure
                    } else {
                        Read::Hit(Meta::unpack(meta))
                    };
                }
            }
            i = t.next(i);
        }
        Read::Miss
    }

    /// Starts loading the slot where `p`'s probe chain begins, so that a
    /// read soon after finds it in cache: a plain load whose value nobody
    /// waits for (the core keeps several such misses in flight at once; no
    /// `unsafe` prefetch intrinsic needed).
    #[inline]
    pub(super) fn touch(&self, p: &Probe) -> u64 {
        self.with_table(|t| t.slots[t.home(p.hash)].hash.load(Ordering::Relaxed))
    }

    pub(super) fn lock(&self) -> Locked<'_> {
        let w = self.writer.lock();
        Locked {
            table: self.table.load_full(),
            shard: self,
            w,
        }
    }
}

/// A shard under its writer lock.
pub(super) struct Locked<'a> {
    shard: &'a Shard,
    table: Arc<Table>,
    pub w: MutexGuard<'a, Writer>,
}

impl Locked<'_> {
    /// The slot of the user `p`; `confirm(first)` settles long keys (whose
    /// slot holds only their first 32 bytes) by the user's first session.
    pub(super) fn find(&self, p: &Probe, confirm: impl Fn(ConnId) -> bool) -> Option<usize> {
        let t = &self.table;
        let mut i = t.home(p.hash);
        for _ in 0..t.slots.len() {
            let s = &t.slots[i];
            let h = s.hash.load(Ordering::Relaxed);
            if h == EMPTY {
                return None;
            }
            if h == p.hash {
                let meta = s.meta.load(Ordering::Relaxed);
                let key = std::array::from_fn(|k| s.key[k].load(Ordering::Relaxed));
                if key_matches(p, meta, &key)
                    && (!p.is_long() || confirm(s.first.load(Ordering::Relaxed)))
                {
                    return Some(i);
                }
            }
            i = t.next(i);
        }
        None
    }

    /// The slot of the user with hash `hash` that has a session on `conn`.
    pub(super) fn find_by_conn(&self, hash: u64, conn: ConnId) -> Option<usize> {
        let t = &self.table;
        let mut i = t.home(hash);
        for _ in 0..t.slots.len() {
            let s = &t.slots[i];
            let h = s.hash.load(Ordering::Relaxed);
            if h == EMPTY {
                return None;
            }
            if h == hash {
                let first = s.first.load(Ordering::Relaxed);
                if first == conn || self.w.extra.get(&first).is_some_and(|v| v.contains(&conn)) {
                    return Some(i);
                }
            }
            i = t.next(i);
        }
        None
    }

    pub(super) fn meta(&self, i: usize) -> Meta {
        Meta::unpack(self.table.slots[i].meta.load(Ordering::Relaxed))
    }

    pub(super) fn first(&self, i: usize) -> ConnId {
        self.table.slots[i].first.load(Ordering::Relaxed)
    }

    /// Every connection of the user in slot `i`, first one first.
    pub(super) fn conns(&self, i: usize) -> Vec<ConnId> {
        let first = self.first(i);
        let mut v = vec![first];
        if let Some(more) = self.w.extra.get(&first) {
            v.extend_from_slice(more);
        }
        v
    }

    pub(super) fn set(&mut self, i: usize, meta: Meta, first: ConnId) {
        let s = &self.table.slots[i];
        write_slot(s, |s| {
            let keylen = keylen_of(s.meta.load(Ordering::Relaxed));
            s.meta.store(meta.pack(keylen), Ordering::Relaxed);
            s.first.store(first, Ordering::Relaxed);
        });
    }

    /// Inserts a user known to be absent.
    pub(super) fn insert(&mut self, p: &Probe, meta: Meta, first: ConnId) {
        if (self.w.used + 1) * 4 > self.table.slots.len() * 3 {
            self.rebuild();
        }
        let t = &self.table;
        let mut i = t.home(p.hash);
        loop {
            let h = t.slots[i].hash.load(Ordering::Relaxed);
            if h == EMPTY || h == TOMB {
                if h == EMPTY {
                    self.w.used += 1;
                }
                break;
            }
            i = t.next(i);
        }
        self.w.live += 1;
        write_slot(&t.slots[i], |s| {
            fill(s, p.hash, meta.pack(p.keylen), first, &p.words)
        });
    }

    /// Removes the user in slot `i` (its sessions are gone).
    pub(super) fn remove(&mut self, i: usize) {
        write_slot(&self.table.slots[i], |s| {
            s.hash.store(TOMB, Ordering::Relaxed)
        });
        self.w.live -= 1;
    }

    /// Copies the live slots into a new table sized for twice of them (or
    /// the same size, if tombstones were what filled it) and publishes it.
    fn rebuild(&mut self) {
        let cap = ((self.w.live + 1) * 2).max(MIN_CAP);
        let new = Table::with_capacity(cap);
        for s in self.table.slots.iter() {
            let h = s.hash.load(Ordering::Relaxed);
            if h == EMPTY || h == TOMB {
                continue;
            }
            let mut i = new.home(h);
            while new.slots[i].hash.load(Ordering::Relaxed) != EMPTY {
                i = new.next(i);
            }
            let key = std::array::from_fn(|k| s.key[k].load(Ordering::Relaxed));
            fill(
                &new.slots[i],
                h,
                s.meta.load(Ordering::Relaxed),
                s.first.load(Ordering::Relaxed),
                &key,
            );
        }
        let new = Arc::new(new);
        self.shard.table.store(new.clone());
        self.table.retired.store(true, Ordering::Release);
        self.w.used = self.w.live;
        self.table = new;
    }

    /// Bytes held by the table (for the memory split).
    pub(super) fn table_bytes(&self) -> usize {
        self.table.slots.len() * std::mem::size_of::<Slot>()
    }
}

fn fill(s: &Slot, hash: u64, meta: u64, first: ConnId, key: &[u64; KEY_WORDS]) {
    s.hash.store(hash, Ordering::Relaxed);
    s.meta.store(meta, Ordering::Relaxed);
    s.first.store(first, Ordering::Relaxed);
    for (d, w) in s.key.iter().zip(key) {
        d.store(*w, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::align_of::<Slot>(), 64);
    }

    #[test]
    fn meta_round_trips() {
        let m = Meta {
            home: 1,
            serving: 0,
            available: true,
            count: 70_000,
        };
        let w = m.pack(LONG);
        assert_eq!(Meta::unpack(w), m);
        assert_eq!(keylen_of(w), LONG);
    }
}
