//! The table of agents' state: a sharded map whose idle entries expire.
//!
//! Why not moka, which the rest of the relay uses for caches: with a
//! time-to-idle, moka records every read in a queue and reorders an access list
//! behind it. One lookup per download made that a tenth of the relay's CPU on
//! small objects (perf, under `loadtest/limits-overhead.sh`). Agents' state
//! needs no eviction order, only "forget what has been idle for `idle_ttl`".
//! So each entry carries its last-seen time, and a sweep of one shard every
//! [`SWEEP_EVERY`] lookups drops the idle entries that have no download in
//! progress. A lookup is a hash and a short, rarely contended lock; memory is
//! bounded by the agents seen within `idle_ttl` plus one sweep round.

use std::borrow::Borrow;
use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

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
    fn touch(&self, now: u64);
    /// Entries in use (a download in progress) never expire.
    fn busy(&self) -> bool;
}

/// `S` hashes keys once per lookup, for the shard and the shard's map alike:
/// a keyed hash for keys a client chooses (addresses), or none at all for keys
/// that already are one (agent ids, stored as their keyed 64-bit hash).
pub struct AgentTable<K, V, S = RandomState> {
    shards: Box<[Mutex<HashMap<K, V, S>>]>,
    hasher: S,
    /// The next shard to sweep (written once per sweep, not per lookup).
    next_sweep: AtomicUsize,
    ttl_ns: u64,
}

impl<K: Hash + Eq, V: Clone + Expiring, S: BuildHasher + Clone + Default> AgentTable<K, V, S> {
    pub fn new(ttl: std::time::Duration) -> Self {
        let hasher = S::default();
        AgentTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::with_hasher(hasher.clone()))).collect(),
            hasher,
            next_sweep: AtomicUsize::new(0),
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, HashMap<K, V, S>> {
        // Nothing panics while a shard is locked, so a poisoned lock still
        // guards a consistent map.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `key`, made by `make` on first sight; marks it seen `now`.
    pub fn get_or_insert_with<Q>(&self, key: &Q, now: u64, make: impl FnOnce() -> (K, V)) -> V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let n = LOOKUPS.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        if n.is_multiple_of(SWEEP_EVERY) {
            self.sweep(self.next_sweep.fetch_add(1, Ordering::Relaxed) % SHARDS, now);
        }
        // Middle bits: the shard's map uses the low bits for its bucket and the
        // top 7 for its control bytes, so those must still vary within a shard.
        let i = ((self.hasher.hash_one(key) >> 32) as usize) % SHARDS;
        let mut shard = self.shard(i);
        let v = match shard.get(key) {
            Some(v) => v.clone(),
            None => {
                let (k, v) = make();
                shard.insert(k, v.clone());
                v
            }
        };
        // Under the lock: a sweep must never see the old time for an entry
        // that is being handed out (it would drop it, and the agent's next
        // request would get a fresh bucket and concurrency count).
        v.touch(now);
        drop(shard);
        v
    }

    fn sweep(&self, i: usize, now: u64) {
        let ttl = self.ttl_ns;
        self.shard(i).retain(|_, v| v.busy() || now.saturating_sub(v.last_seen()) < ttl);
    }

    /// Entries held now (for the memory measurement).
    pub fn count(&self) -> usize {
        self.count_where(|_| true)
    }

    /// Entries for which `f` holds (one shard locked at a time).
    pub fn count_where(&self, f: impl Fn(&V) -> bool) -> usize {
        (0..SHARDS).map(|i| self.shard(i).values().filter(|v| f(v)).count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};

    #[derive(Default)]
    struct Entry {
        seen: AtomicU64,
        busy: AtomicBool,
    }

    impl Expiring for Arc<Entry> {
        fn last_seen(&self) -> u64 {
            self.seen.load(Ordering::Relaxed)
        }
        fn touch(&self, now: u64) {
            self.seen.store(now, Ordering::Relaxed)
        }
        fn busy(&self) -> bool {
            self.busy.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn one_entry_per_key_and_idle_ones_expire_unless_busy() {
        let t: AgentTable<String, Arc<Entry>> = AgentTable::new(std::time::Duration::from_nanos(1000));
        let a = t.get_or_insert_with("a", 0, || ("a".into(), Arc::default()));
        let again = t.get_or_insert_with("a", 10, || ("a".into(), Arc::default()));
        assert!(Arc::ptr_eq(&a, &again));
        a.busy.store(true, Ordering::Relaxed);
        for i in 0..20_000u64 {
            t.get_or_insert_with(format!("k{i}").as_str(), 100, || (format!("k{i}"), Arc::default()));
        }
        assert_eq!(t.count(), 20_001);
        // One agent keeps asking long after: a full round of sweeps forgets
        // every idle entry, but not the busy one.
        for _ in 0..SHARDS * SWEEP_EVERY {
            t.get_or_insert_with("x", 1_000_000, || ("x".into(), Arc::default()));
        }
        assert_eq!(t.count(), 2, "only the busy entry and the active one remain");
        let still = t.get_or_insert_with("a", 1_000_000, || ("a".into(), Arc::default()));
        assert!(Arc::ptr_eq(&a, &still), "a busy entry must not expire");
    }
}
