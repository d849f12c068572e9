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
//! Entries live inside the map, not behind an `Arc`, and are only ever read or
//! changed under their shard's lock. With 100,000 agents a lookup misses the
//! CPU cache at every pointer it follows, and each miss was about a third of
//! the lookup (perf): inline, a lookup is the map's control bytes and the
//! entry, two misses instead of three, and no allocation per agent. A download
//! keeps its agent's key, not a pointer; the entry cannot go while the download
//! is counted in it, because a sweep keeps busy entries.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::digest::DigestBuildHasher;

const SHARDS: usize = 64;
/// Lookups between sweeps of one shard: every shard is swept once per
/// `SHARDS * SWEEP_EVERY` lookups. A sweep walks a shard (a cache miss per
/// entry, about 100 µs for 1,500 entries), so it must be rare per lookup.
const SWEEP_EVERY: usize = 4096;

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

/// One shard on a cache line of its own: the two workers lock different shards
/// at once, and a lock word shared with a neighbour would bounce between them.
#[repr(align(64))]
struct Shard<V>(Mutex<HashMap<u64, V, DigestBuildHasher>>);

/// Keys are already uniformly random 64-bit values (a keyed hash of who the
/// agent is), so the maps hash them no further.
pub struct AgentTable<V> {
    shards: Box<[Shard<V>]>,
    /// The next shard to sweep (written once per sweep, not per lookup).
    next_sweep: AtomicUsize,
    ttl_ns: u64,
}

impl<V: Expiring> AgentTable<V> {
    pub fn new(ttl: std::time::Duration) -> Self {
        AgentTable {
            shards: (0..SHARDS).map(|_| Shard(Mutex::new(HashMap::default()))).collect(),
            next_sweep: AtomicUsize::new(0),
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, V, DigestBuildHasher>> {
        // Middle bits: the shard's map uses the low bits for its bucket and the
        // top 7 for its control bytes, so those must still vary within a shard.
        self.lock(((key >> 32) as usize) % SHARDS)
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, HashMap<u64, V, DigestBuildHasher>> {
        // Nothing panics while a shard is locked, so a poisoned lock still
        // guards a consistent map.
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the entry for `key`, made by `make` on first sight, and
    /// marks it seen `now`.
    pub fn update<R>(&self, key: u64, now: u64, make: impl FnOnce() -> V, f: impl FnOnce(&mut V) -> R) -> R {
        let n = LOOKUPS.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        if n.is_multiple_of(SWEEP_EVERY) {
            self.sweep(self.next_sweep.fetch_add(1, Ordering::Relaxed) % SHARDS, now);
        }
        let mut shard = self.shard(key);
        let entry = shard.entry(key).or_insert_with(make);
        // Under the lock: a sweep must never see the old time for an entry
        // that is being handed out (it would drop it, and the agent's next
        // request would get a fresh bucket and concurrency count).
        entry.touch(now);
        f(entry)
    }

    /// Runs `f` on the entry for `key`, if there is one.
    pub fn with<R>(&self, key: u64, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.shard(key).get_mut(&key).map(f)
    }

    fn sweep(&self, i: usize, now: u64) {
        let ttl = self.ttl_ns;
        self.lock(i).retain(|_, v| v.busy() || now.saturating_sub(v.last_seen()) < ttl);
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
