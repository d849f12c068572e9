//! What the server publishes right now: the verified catalog and how fresh it is.
//!
//! Written by the control plane (the sync or reload actor), read by every request
//! on the hot path. The catalog sits behind an `ArcSwap`, so a reader takes no
//! lock and a new manifest replaces the old one in one atomic store; requests in
//! flight finish with the catalog they started with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use crate::repo::catalog::Catalog;
use crate::telemetry;

#[derive(Default)]
pub struct Published {
    catalog: ArcSwapOption<Catalog>,
    /// Unix seconds of the last sync that produced a verified manifest; 0: never.
    last_good_sync: AtomicU64,
    /// Unix seconds since when no upstream has given an acceptable manifest;
    /// 0: not degraded.
    degraded_since: AtomicU64,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Published {
    pub fn new() -> Arc<Published> {
        Arc::new(Published::default())
    }

    /// The catalog to serve from, if a verified manifest has been loaded.
    pub fn current(&self) -> Option<Arc<Catalog>> {
        self.catalog.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.catalog.load().is_some()
    }

    pub fn serial(&self) -> Option<u64> {
        self.catalog.load().as_ref().map(|c| c.serial())
    }

    /// Serve `catalog` from now on.
    pub fn publish(&self, catalog: Arc<Catalog>) {
        metrics::gauge!(telemetry::MANIFEST_SERIAL).set(catalog.serial() as f64);
        self.catalog.store(Some(catalog));
    }

    pub fn mark_good_sync(&self) {
        let now = unix_now();
        self.last_good_sync.store(now, Ordering::Relaxed);
        metrics::gauge!(telemetry::LAST_GOOD_SYNC).set(now as f64);
        if self.degraded_since.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("an upstream answered again: no longer degraded");
        }
        metrics::gauge!(telemetry::DEGRADED).set(0.0);
    }

    /// Every upstream failed: keep serving what we have, and say so.
    pub fn mark_failed_sync(&self) {
        let now = unix_now();
        if self.degraded_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!("no upstream reachable: degraded, serving the cache and the last verified manifest");
        }
        metrics::gauge!(telemetry::DEGRADED).set(1.0);
    }

    /// Unix seconds since when the relay is degraded, if it is.
    pub fn degraded_since(&self) -> Option<u64> {
        match self.degraded_since.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    /// Unix seconds of the last good sync, if any.
    pub fn last_good_sync(&self) -> Option<u64> {
        match self.last_good_sync.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }
}
