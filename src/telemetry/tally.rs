//! Counters bumped on every request, kept off the cache lines the workers share.
//!
//! A `metrics` counter is one atomic (two with the Prometheus recorder, which
//! also counts generations) that every worker writes on every request. With two
//! workers on two cores, that cache line moves between the cores on nearly
//! every request. A [`Tally`] has one cell per worker thread instead; a worker
//! only ever writes its own. `/metrics` adds the cells up and hands the totals
//! to the Prometheus counters just before it renders ([`publish`]), so a
//! scrape sees exact counts and the request path shares nothing.
//!
//! Tallies belong to the scope (the server) current where they are made, and
//! a scrape publishes only its own server's (see `scope`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

/// Cells per tally. Threads beyond this share cells (still correct, only
/// contended again); the relay runs one worker per core.
const CELLS: usize = 8;

/// One cell per cache line, so neighbours never share one.
#[repr(align(64))]
#[derive(Default)]
struct Cell(AtomicU64);

/// A monotonic count, summed over threads when published.
pub struct Tally {
    cells: [Cell; CELLS],
    name: &'static str,
    labels: Vec<metrics::Label>,
}

impl Tally {
    #[inline]
    pub fn add(&self, n: u64) {
        self.cells[cell()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// The tally for a series, made (and kept for the life of the process) the
/// first time it is asked for. For set-up, not for the request path: it takes
/// a lock and may allocate.
pub fn tally(name: &'static str, labels: &[(&'static str, &str)]) -> &'static Tally {
    let key = (super::scope::current(), name, labels.iter().map(|(k, v)| (*k, v.to_string())).collect::<Vec<_>>());
    let mut all = registry();
    if let Some(t) = all.get(&key) {
        return t;
    }
    let labels = key.2.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
    let t: &'static Tally = Box::leak(Box::new(Tally { cells: Default::default(), name, labels }));
    all.insert(key, t);
    t
}

/// Hand the current scope's tallies' totals to their Prometheus counters
/// (call before rendering, in the server's scope).
///
/// The counter is looked up by name at each publish rather than kept: a tally
/// made before the recorder was installed would otherwise keep a no-op handle.
pub fn publish() {
    let scope = super::scope::current();
    for ((s, ..), t) in registry().iter() {
        if *s == scope {
            metrics::counter!(t.name, t.labels.clone()).absolute(t.total());
        }
    }
}

type Key = (super::scope::Scope, &'static str, Vec<(&'static str, String)>);

fn registry() -> MutexGuard<'static, HashMap<Key, &'static Tally>> {
    static ALL: LazyLock<Mutex<HashMap<Key, &'static Tally>>> = LazyLock::new(Mutex::default);
    // Nothing panics while the registry is locked; a poisoned lock still guards
    // a consistent map.
    ALL.lock().unwrap_or_else(|e| e.into_inner())
}

/// This thread's cell: threads take cells in turn as they first count.
#[inline]
fn cell() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static CELL: usize = NEXT.fetch_add(1, Ordering::Relaxed) % CELLS;
    }
    CELL.with(|c| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tally_per_series_summing_every_thread() {
        let a = tally("patchrelay_test_tally_total", &[("route", "x")]);
        let b = tally("patchrelay_test_tally_total", &[("route", "x")]);
        assert!(std::ptr::eq(a, b));
        let other = tally("patchrelay_test_tally_total", &[("route", "y")]);
        assert!(!std::ptr::eq(a, other));
        std::thread::scope(|s| {
            for _ in 0..20 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        a.add(3);
                    }
                });
            }
        });
        assert_eq!(a.total(), 60_000);
        assert_eq!(other.total(), 0);
    }
}
