//! The table of agents' state: a sharded map whose idle entries expire.
//!
//! Why not moka, which the rest of the relay uses for caches: with a
//! time-to-idle, moka records every read in a queue and reorders an access list
//! behind it. One lookup per download made that a tenth of the relay's CPU on
//! small objects (perf, under `loadtest/limits-overhead.sh`). Agents' state
//! needs no eviction order, only "forget what has been idle for `idle_ttl`".
//! So each entry carries its last-seen time, and a sweep of one shard every
//! [`SWEEP_EVERY`] lookups drops the idle entries that have no download in
//! progress.
//!
//! Entries live inside the table, not behind an `Arc`, and are only ever read
//! or changed under their shard's lock. With 100,000 agents a lookup misses
//! the CPU cache at every line it touches, and each miss was about a third of
//! the lookup's cost (perf). A std `HashMap` with the entry behind an `Arc`
//! touched three lines: control bytes, bucket, entry. Here a shard is open
//! addressing over 32-byte slots that hold the key beside the entry, so a
//! lookup touches one line, and no agent costs an allocation of its own. A
//! download keeps its agent's key, not a pointer; the entry cannot go while
//! the download is counted in it, because a sweep keeps busy entries.
//! (The product's core under load, and small: why it is not a crate.)
//!
//! That one line is still a miss to main memory with 100,000 agents (their
//! slots are megabytes), and waiting for it was most of what the limits cost
//! (perf: 2.5% of the relay's CPU on small objects). So a request asks for its
//! agent's line as soon as it knows who the agent is ([`AgentTable::prefetch`]),
//! and the memory fetch runs while the request is routed and its preconditions
//! are checked, instead of stalling the lookup that comes after. And the slots
//! are in huge pages once a shard's array is large enough ([`SHARDS`]): with
//! 4 KiB pages, finding where a random slot is in memory (a page walk, under a
//! hypervisor a nested one) cost as much again, and a prefetch waits for it.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::huge::HugeArray;

/// Few shards, so that each holds a large array: at 100,000 agents each
/// shard's slots are 2 MiB, one huge page (`huge`), and the whole table is 4
/// TLB entries instead of 2,000. Lock contention does not need more: a lookup
/// holds its shard for well under a microsecond in every ten or so that a
/// worker spends on a request, so even 16 workers on 4 shards rarely meet.
const SHARDS: usize = 4;
/// Lookups between sweeps of one shard: every shard is swept once per
/// `SHARDS * SWEEP_EVERY` lookups (262,144, whatever the shard count). A sweep
/// walks a whole shard in order, so this keeps its cost at about one slot per
/// lookup, and the time a sweep holds its shard (a 2 MiB shard: about 0.2 ms)
/// rare.
const SWEEP_EVERY: usize = (1 << 18) / SHARDS;

thread_local! {
    /// Lookups made on this thread, for all tables. Counted per thread: a
    /// shared counter would be one more cache line that every worker writes on
    /// every request. Each table is still swept in proportion to its lookups.
    static LOOKUPS: Cell<usize> = const { Cell::new(0) };
}

/// What the table needs to know of an entry to expire it.
pub trait Expiring {
    /// When the entry was last used (nanoseconds on the table's clock).
    fn last_seen(&self) -> u64;
    fn touch(&mut self, now: u64);
    /// Entries in use (a download in progress) never expire.
    fn busy(&self) -> bool;
}

/// A key and its entry, never across two cache lines.
#[repr(C, align(32))]
#[derive(Default)]
struct Slot<V> {
    /// 0: the slot is free.
    key: u64,
    value: V,
}

/// One shard's entries: linear probing from the key's low bits, at most half
/// full, so a lookup usually reads one slot and rarely a second.
struct Slots<V> {
    slots: HugeArray<Slot<V>>,
    len: usize,
}

/// Fewest slots a shard allocates once it holds anything.
const MIN_SLOTS: usize = 16;

impl<V: Default> Slots<V> {
    fn new() -> Self {
        Slots { slots: HugeArray::new(0), len: 0 }
    }

    /// Where `key` is, or the free slot where it would go.
    fn probe(&self, key: u64) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = key as usize & mask;
        loop {
            match self.slots[i].key {
                k if k == key => return Ok(i),
                0 => return Err(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        if self.slots.is_empty() {
            return None;
        }
        let i = self.probe(key).ok()?;
        Some(&mut self.slots[i].value)
    }

    /// Whether one more entry would make the slots more than half full.
    fn needs_room(&self) -> bool {
        (self.len + 1) * 2 > self.slots.len()
    }

    /// How many slots the shard grows to.
    fn grown_len(&self) -> usize {
        (self.slots.len() * 2).max(MIN_SLOTS)
    }

    fn grow(&mut self) {
        self.rebuild(self.grown_len(), |_| true);
    }

    fn get_or_insert_with(&mut self, key: u64, make: impl FnOnce() -> V) -> &mut V {
        let i = self.slot_for(key, || Some(make())).unwrap_or_else(|i| i);
        &mut self.slots[i].value
    }

    /// The entry for `key`, or a new one from `make`; none if `make` refuses.
    fn get_or_try_insert_with(&mut self, key: u64, make: impl FnOnce() -> Option<V>) -> Option<&mut V> {
        let i = self.slot_for(key, make).ok()?;
        Some(&mut self.slots[i].value)
    }

    /// The index of `key`'s slot, filled by `make` if it was free; `Err`
    /// with the free slot if `make` refused.
    fn slot_for(&mut self, key: u64, make: impl FnOnce() -> Option<V>) -> Result<usize, usize> {
        if self.needs_room() {
            self.grow();
        }
        match self.probe(key) {
            Ok(i) => Ok(i),
            Err(i) => match make() {
                Some(value) => {
                    self.slots[i] = Slot { key, value };
                    self.len += 1;
                    Ok(i)
                }
                None => Err(i),
            },
        }
    }

    /// Keep the entries for which `keep` holds, in `cap` slots (a power of
    /// two, more than twice the entries kept).
    fn rebuild(&mut self, cap: usize, keep: impl FnMut(&V) -> bool) {
        self.rebuild_into(HugeArray::new(cap), keep);
    }

    /// [`Slots::rebuild`] into slots made beforehand (all free).
    fn rebuild_into(&mut self, fresh: HugeArray<Slot<V>>, mut keep: impl FnMut(&V) -> bool) {
        let mut old = std::mem::replace(&mut self.slots, fresh);
        self.len = 0;
        for slot in old.iter_mut().map(std::mem::take).filter(|s| s.key != 0 && keep(&s.value)) {
            if let Err(i) = self.probe(slot.key) {
                self.slots[i] = slot;
                self.len += 1;
            }
        }
    }

    /// Drop the entries for which `keep` fails (telling `dropped` of each),
    /// and give back the memory of a shard that is now mostly empty.
    fn retain(&mut self, keep: impl Fn(&V) -> bool, mut dropped: impl FnMut(&V)) {
        let live = self.values().filter(|v| keep(v)).count();
        if live == self.len {
            return;
        }
        for v in self.values().filter(|v| !keep(v)) {
            dropped(v);
        }
        let cap = if live == 0 { 0 } else { (live * 4).next_power_of_two().max(MIN_SLOTS).min(self.slots.len()) };
        if cap == 0 {
            *self = Slots::new();
        } else {
            self.rebuild(cap, keep);
        }
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().filter(|s| s.key != 0).map(|s| &s.value)
    }
}

/// One shard on a cache line of its own: the two workers lock different shards
/// at once, and a lock word shared with a neighbour would bounce between them.
#[repr(align(64))]
struct Shard<V>(Mutex<Slots<V>>);

/// Where a shard's slots are and their index mask, for
/// [`AgentTable::prefetch`] to read without the lock. Republished under the
/// lock whenever the slots move, which is rare: kept apart from the shards,
/// whose lines every lookup writes, so that reading a hint finds it in cache
/// instead of in the other core's. Only ever a hint: the address may be stale
/// by the time it is used, and is never read through.
struct Hint<V> {
    base: AtomicPtr<Slot<V>>,
    mask: AtomicUsize,
}

impl<V> Hint<V> {
    fn publish(&self, slots: &mut Slots<V>) {
        let base = if slots.slots.is_empty() { std::ptr::null_mut() } else { slots.slots.as_mut_ptr() };
        if self.base.load(Ordering::Relaxed) != base {
            self.base.store(base, Ordering::Relaxed);
            self.mask.store(slots.slots.len().saturating_sub(1), Ordering::Relaxed);
        }
    }
}

/// See [`AgentTable::on_expire`].
type OnExpire<V> = Box<dyn Fn(&V) + Send + Sync>;

/// Keys are already uniformly random 64-bit values (a keyed hash of who the
/// agent is), so the table hashes them no further.
pub struct AgentTable<V> {
    shards: Box<[Shard<V>]>,
    hints: Box<[Hint<V>]>,
    /// The next shard to sweep (written once per sweep, not per lookup).
    next_sweep: AtomicUsize,
    ttl_ns: u64,
    /// Told of each entry a sweep drops, under its shard's lock (so it must
    /// not lock this table again).
    on_expire: Option<OnExpire<V>>,
}

impl<V: Expiring + Default> AgentTable<V> {
    pub fn new(ttl: std::time::Duration) -> Self {
        AgentTable {
            shards: (0..SHARDS).map(|_| Shard(Mutex::new(Slots::new()))).collect(),
            hints: (0..SHARDS)
                .map(|_| Hint { base: AtomicPtr::new(std::ptr::null_mut()), mask: AtomicUsize::new(0) })
                .collect(),
            next_sweep: AtomicUsize::new(0),
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
            on_expire: None,
        }
    }

    /// How long an idle entry is kept.
    pub fn ttl_ns(&self) -> u64 {
        self.ttl_ns
    }

    /// Have sweeps tell `f` of every entry they drop.
    pub fn on_expire(mut self, f: impl Fn(&V) + Send + Sync + 'static) -> Self {
        self.on_expire = Some(Box::new(f));
        self
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Slots<V>> {
        self.lock(shard_of(key))
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Slots<V>> {
        // Nothing panics while a shard is locked, so a poisoned lock still
        // guards a consistent map.
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start fetching the line that `key`'s slot is on into the CPU cache,
    /// without waiting for it and without the lock (the hint may be stale: a
    /// shard that grew since only costs a wasted fetch). Call it as early as
    /// the key is known; the lookup that follows then finds the line in cache.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        let key = nonzero(key);
        let hint = &self.hints[shard_of(key)];
        let base = hint.base.load(Ordering::Relaxed);
        if !base.is_null() {
            let i = key as usize & hint.mask.load(Ordering::Relaxed);
            prefetch_line(base.wrapping_add(i).cast());
        }
    }

    /// Runs `f` on the entry for `key`, made by `make` on first sight, and
    /// marks it seen `now`.
    pub fn update<R>(&self, key: u64, now: u64, make: impl FnOnce() -> V, f: impl FnOnce(&mut V) -> R) -> R {
        let key = nonzero(key);
        let mut shard = self.shard_with_room(key, now);
        let entry = shard.get_or_insert_with(key, make);
        // Under the lock: see `try_update`.
        entry.touch(now);
        f(entry)
    }

    /// [`AgentTable::update`], where `make` may refuse to make a new entry
    /// (then `None`, and nothing is stored). `make` runs under the shard's
    /// lock: it may lock another table, never this one.
    pub fn try_update<R>(
        &self,
        key: u64,
        now: u64,
        make: impl FnOnce() -> Option<V>,
        f: impl FnOnce(&mut V) -> R,
    ) -> Option<R> {
        let key = nonzero(key);
        let mut shard = self.shard_with_room(key, now);
        let entry = shard.get_or_try_insert_with(key, make)?;
        // Under the lock: a sweep must never see the old time for an entry
        // that is being handed out (it would drop it, and the agent's next
        // request would get a fresh bucket and concurrency count).
        entry.touch(now);
        Some(f(entry))
    }

    /// `key`'s shard, locked, with room for one more entry (and a sweep of
    /// some shard first, every [`SWEEP_EVERY`] lookups on this thread).
    fn shard_with_room(&self, key: u64, now: u64) -> MutexGuard<'_, Slots<V>> {
        let n = LOOKUPS.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        if n.is_multiple_of(SWEEP_EVERY) {
            self.sweep(self.next_sweep.fetch_add(1, Ordering::Relaxed) % SHARDS, now);
        }
        let i = shard_of(key);
        let mut shard = self.lock(i);
        while shard.needs_room() {
            // The new slots are made with the lock let go: at 100,000 agents
            // they are 4 MiB, in huge pages the kernel may first have to
            // compact memory for, and the shard holds a quarter of all agents.
            let len = shard.grown_len();
            drop(shard);
            let fresh = HugeArray::new(len);
            shard = self.lock(i);
            if shard.needs_room() && shard.grown_len() == len {
                shard.rebuild_into(fresh, |_| true);
                self.hints[i].publish(&mut shard);
            }
        }
        shard
    }

    /// Runs `f` on the entry for `key`, if there is one.
    pub fn with<R>(&self, key: u64, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let key = nonzero(key);
        self.shard(key).get_mut(key).map(f)
    }

    /// Sweep every shard now (see `Limits::sweep_idle`).
    pub fn sweep_all(&self, now: u64) {
        for i in 0..SHARDS {
            self.sweep(i, now);
        }
    }

    fn sweep(&self, i: usize, now: u64) {
        let ttl = self.ttl_ns;
        let mut shard = self.lock(i);
        let keep = |v: &V| v.busy() || now.saturating_sub(v.last_seen()) < ttl;
        match &self.on_expire {
            Some(told) => shard.retain(keep, |v| told(v)),
            None => shard.retain(keep, |_| {}),
        }
        self.hints[i].publish(&mut shard);
    }

    /// Entries held now (for the memory measurement).
    pub fn count(&self) -> usize {
        self.count_where(|_| true)
    }

    /// Entries for which `f` holds (one shard locked at a time).
    pub fn count_where(&self, f: impl Fn(&V) -> bool) -> usize {
        (0..SHARDS).map(|i| self.lock(i).values().filter(|v| f(v)).count()).sum()
    }
}

/// The shard for a key: from its high bits, because a shard probes from the
/// low ones, so those must still vary within a shard.
fn shard_of(key: u64) -> usize {
    ((key >> 32) as usize) % SHARDS
}

/// Ask the CPU to bring the line at `p` into its caches. A hint: it never
/// faults and never changes memory, whatever the address (so a stale one is
/// harmless); a no-op where there is no such instruction to hand.
#[inline]
#[allow(unsafe_code)]
fn prefetch_line(p: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 reads nothing the program can observe and cannot
    // fault, even on an unmapped address; SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// 0 marks a free slot, so key 0 is stored as 1 (two agents share a bucket
/// only if their keyed 64-bit hashes are 0 and 1).
fn nonzero(key: u64) -> u64 {
    key.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Entry {
        seen: u64,
        busy: bool,
        uses: u32,
    }

    impl Expiring for Entry {
        fn last_seen(&self) -> u64 {
            self.seen
        }
        fn touch(&mut self, now: u64) {
            self.seen = now
        }
        fn busy(&self) -> bool {
            self.busy
        }
    }

    /// Keys as the limits make them: spread over all 64 bits.
    fn key(i: u64) -> u64 {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
    }

    /// The slots against a std map, through growth, probing runs that wrap
    /// around the end, and sweeps that shrink them.
    #[test]
    fn slots_agree_with_a_map() {
        let mut slots: Slots<u32> = Slots::new();
        let mut model = std::collections::HashMap::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct low bits: long probing runs, many of them wrapping.
            let k = nonzero((x & 0xff) << 56 | (x & 0x7) | ((x >> 40) & 0xf) << 3);
            *slots.get_or_insert_with(k, || 0) += 1;
            *model.entry(k).or_insert(0u32) += 1;
            if round % 5000 == 4999 {
                slots.retain(|v| v % 2 == 0, |_| {});
                model.retain(|_, v| *v % 2 == 0);
            }
            assert_eq!(slots.len, model.len());
            assert!(slots.len * 2 <= slots.slots.len().max(1));
        }
        for (k, v) in &model {
            assert_eq!(slots.get_mut(*k).copied(), Some(*v));
        }
        assert_eq!(slots.values().count(), model.len());
        slots.retain(|_| false, |_| {});
        assert!(slots.slots.is_empty(), "an empty shard holds no memory");
        assert_eq!(slots.get_mut(1), None);
    }

    /// The prefetch hints follow the slots as shards grow and shrink: a hint
    /// left behind would not be unsafe, but every prefetch would fetch the
    /// wrong line and the lookup would wait on memory again.
    #[test]
    fn prefetch_hints_follow_the_slots() {
        let t: AgentTable<Entry> = AgentTable::new(std::time::Duration::from_nanos(1000));
        let check = |t: &AgentTable<Entry>| {
            for i in 0..SHARDS {
                let mut slots = t.lock(i);
                let base = if slots.slots.is_empty() { std::ptr::null_mut() } else { slots.slots.as_mut_ptr() };
                assert_eq!(t.hints[i].base.load(Ordering::Relaxed), base, "shard {i}");
                if !base.is_null() {
                    assert_eq!(t.hints[i].mask.load(Ordering::Relaxed), slots.slots.len() - 1, "shard {i}");
                }
            }
        };
        check(&t);
        t.prefetch(key(1));
        for i in 0..20_000u64 {
            t.update(key(i), 0, Entry::default, |_| ());
            t.prefetch(key(i + 1));
        }
        check(&t);
        // Sweeps empty and shrink the shards.
        for _ in 0..SHARDS * SWEEP_EVERY {
            t.update(key(5), 1_000_000, Entry::default, |_| ());
        }
        assert_eq!(t.count(), 1);
        check(&t);
        t.prefetch(key(7));
    }

    #[test]
    fn sweeps_tell_of_every_entry_they_drop() {
        use std::sync::Arc;
        let dropped = Arc::new(AtomicUsize::new(0));
        let told = dropped.clone();
        let t: AgentTable<Entry> =
            AgentTable::new(std::time::Duration::from_nanos(1000)).on_expire(move |e: &Entry| {
                assert!(!e.busy);
                told.fetch_add(1, Ordering::Relaxed);
            });
        t.update(key(1), 0, Entry::default, |e| e.busy = true);
        for i in 0..1000u64 {
            t.update(key(i + 10), 100, Entry::default, |_| ());
        }
        for _ in 0..SHARDS * SWEEP_EVERY {
            t.update(key(5), 1_000_000, Entry::default, |_| ());
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 1000, "one call per entry dropped, none for the busy one");
        assert_eq!(t.count(), 2);
    }

    #[test]
    fn one_entry_per_key_and_idle_ones_expire_unless_busy() {
        let t: AgentTable<Entry> = AgentTable::new(std::time::Duration::from_nanos(1000));
        let a = key(1);
        t.update(a, 0, Entry::default, |e| e.uses += 1);
        assert_eq!(t.update(a, 10, Entry::default, |e| e.uses), 1, "the same entry, not a new one");
        t.with(a, |e| e.busy = true);
        for i in 0..20_000u64 {
            t.update(key(i + 10), 100, Entry::default, |_| ());
        }
        assert_eq!(t.count(), 20_001);
        // One agent keeps asking long after: a full round of sweeps forgets
        // every idle entry, but not the busy one.
        for _ in 0..SHARDS * SWEEP_EVERY {
            t.update(key(5), 1_000_000, Entry::default, |_| ());
        }
        assert_eq!(t.count(), 2, "only the busy entry and the active one remain");
        assert_eq!(t.with(a, |e| e.uses), Some(1), "a busy entry must not expire");
        assert_eq!(t.with(key(6), |e| e.uses), None);
    }
}
