//! The index of complete objects: size, last use, pins, and eviction order.
//!
//! Lookups are on the hot path, so the index is a concurrent map (moka, no
//! capacity bound: the budget is in bytes on disk, which moka's own eviction
//! cannot express together with pins) and "last used" is an atomic stamp on the
//! entry, updated at most once a second per object so that a hot object does
//! not turn every hit into a contended cache-line write. Choosing victims scans
//! and sorts the entries; it runs in housekeeping, not per request.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::digest::{Digest, DigestBuildHasher};
use crate::telemetry;

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub struct Entry {
    pub len: u64,
    last_used: AtomicU64,
}

impl Entry {
    pub fn touch(&self) {
        let now = millis(SystemTime::now());
        if now > self.last_used.load(Ordering::Relaxed) {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }
}

/// What an eviction pass did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct EvictReport {
    pub objects: u64,
    pub bytes: u64,
    /// Bytes held by pinned objects (which eviction never touches).
    pub pinned_bytes: u64,
}

pub struct Index {
    map: moka::sync::Cache<Digest, Arc<Entry>, DigestBuildHasher>,
    bytes: AtomicU64,
    objects: AtomicU64,
    pins: ArcSwap<HashSet<Digest>>,
    budget: Option<u64>,
}

impl Index {
    pub fn new(budget: Option<u64>) -> Self {
        Index {
            map: moka::sync::Cache::builder().build_with_hasher(DigestBuildHasher::default()),
            bytes: AtomicU64::new(0),
            objects: AtomicU64::new(0),
            pins: ArcSwap::from_pointee(HashSet::new()),
            budget,
        }
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub fn insert(&self, digest: Digest, len: u64) {
        self.insert_at(digest, len, SystemTime::now());
    }

    pub fn insert_at(&self, digest: Digest, len: u64, used: SystemTime) {
        let entry = Arc::new(Entry { len, last_used: AtomicU64::new(millis(used)) });
        let mut added = false;
        // `entry()` makes check-and-insert one step, so totals count each object once.
        self.map.entry(digest).or_insert_with(|| {
            added = true;
            entry
        });
        if added {
            self.bytes.fetch_add(len, Ordering::Relaxed);
            self.objects.fetch_add(1, Ordering::Relaxed);
            self.publish_gauges();
        }
    }

    pub fn remove(&self, digest: &Digest) {
        if let Some(e) = self.map.remove(digest) {
            self.bytes.fetch_sub(e.len, Ordering::Relaxed);
            self.objects.fetch_sub(1, Ordering::Relaxed);
            self.publish_gauges();
        }
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<Entry>> {
        self.map.get(digest)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.map.contains_key(digest)
    }

    /// `(objects, bytes)`.
    pub fn totals(&self) -> (u64, u64) {
        (self.objects.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    fn publish_gauges(&self) {
        let (n, b) = self.totals();
        metrics::gauge!(telemetry::STORE_OBJECTS).set(n as f64);
        metrics::gauge!(telemetry::STORE_BYTES).set(b as f64);
    }

    pub fn set_pins(&self, pins: HashSet<Digest>) {
        self.pins.store(Arc::new(pins));
    }

    pub fn add_pins(&self, more: impl IntoIterator<Item = Digest>) {
        let mut pins = HashSet::clone(&self.pins.load());
        pins.extend(more);
        self.pins.store(Arc::new(pins));
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.pins.load().contains(digest)
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.pins.load().iter().filter_map(|d| self.map.get(d)).map(|e| e.len).sum()
    }

    /// Whether the objects and `extra` bytes (partial files, which count but
    /// cannot be evicted) are over the budget.
    pub fn over_budget(&self, extra: u64) -> bool {
        self.budget.is_some_and(|b| self.bytes.load(Ordering::Relaxed).saturating_add(extra) > b)
    }

    /// Least recently used unpinned objects whose removal brings the total
    /// (with `extra` bytes that cannot be evicted) to 95% of the budget.
    /// Empty when under budget.
    pub fn select_victims(&self, extra: u64) -> Vec<(Digest, u64)> {
        let Some(budget) = self.budget else { return Vec::new() };
        let total = self.bytes.load(Ordering::Relaxed).saturating_add(extra);
        if total <= budget {
            return Vec::new();
        }
        let target = budget - budget / 20;
        let pins = self.pins.load();
        let mut candidates: Vec<(u64, Digest, u64)> = self
            .map
            .iter()
            .filter(|(d, _)| !pins.contains(d.as_ref()))
            .map(|(d, e)| (e.last_used.load(Ordering::Relaxed), *d, e.len))
            .collect();
        candidates.sort_unstable_by_key(|(used, d, _)| (*used, *d));
        let mut excess = total - target;
        let mut out = Vec::new();
        for (_, d, len) in candidates {
            if excess == 0 {
                break;
            }
            out.push((d, len));
            excess = excess.saturating_sub(len);
        }
        if excess > 0 {
            metrics::counter!(telemetry::STORE_OVER_BUDGET).increment(1);
            tracing::warn!(
                budget,
                pinned_bytes = self.pinned_bytes(),
                partial_bytes = extra,
                "storage.max_size is smaller than the pinned objects and fills in progress need; raise it or lower sync.retain"
            );
        }
        out
    }
}
