//! Critical components are fetched the moment they are published.
//!
//! After each sync, the retained versions of every critical component (the
//! `sync.retain` most recent, latest included) are pinned in the store, so the
//! disk budget never evicts them, and fetched ahead of any agent asking, through
//! the same fill registry agents use: an agent that asks mid-prefetch attaches
//! to it. A failed prefetch is retried by the housekeeping sweep after a minute.
//! Non-critical components are left to be pulled through on first request,
//! unless the operator pinned a version (from the console): pinned versions
//! are kept and fetched like critical ones, and the pins outlive a restart
//! (in the state database).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::digest::Digest;
use crate::fill::{Filler, by_delta};
use crate::repo::catalog::Catalog;
use crate::source::Target;
use crate::telemetry;

const RETRY_AFTER: Duration = Duration::from_secs(60);

struct Wanted {
    component: String,
    version: String,
    target: Target,
}

/// One retained version, for `/admin/status`.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchStatus {
    pub component: String,
    pub version: String,
    pub sha256: Digest,
    pub size: u64,
    /// `cached`, `filling`, `failed` or `pending`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Prefetcher {
    filler: Arc<Filler>,
    /// The catalog the current plan was made from (the prefetch tasks may run
    /// before the sync publishes it).
    catalog: Mutex<Option<Arc<Catalog>>>,
    retain: usize,
    slots: Arc<Semaphore>,
    wanted: Mutex<Vec<Wanted>>,
    failures: Mutex<HashMap<Digest, (Instant, String)>>,
    started: Mutex<HashSet<Digest>>,
    /// Versions the operator pinned: (component, version).
    held: Mutex<HashSet<(String, String)>>,
    db: Mutex<Option<crate::store::db::StateDb>>,
}

const PINS: crate::store::db::Table = crate::store::db::Table::new("pins");

impl Prefetcher {
    pub fn new(filler: Arc<Filler>, retain: usize, concurrency: usize) -> Arc<Prefetcher> {
        Arc::new(Prefetcher {
            filler,
            catalog: Mutex::new(None),
            retain,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            wanted: Mutex::new(Vec::new()),
            failures: Mutex::new(HashMap::new()),
            started: Mutex::new(HashSet::new()),
            held: Mutex::new(HashSet::new()),
            db: Mutex::new(None),
        })
    }

    /// Keep the operator's pins in `db`, starting with those it kept.
    pub fn keep_pins_in(self: &Arc<Self>, db: crate::store::db::StateDb) {
        match db.scan::<(String, String)>(PINS) {
            Ok(rows) => lock(&self.held).extend(rows.into_iter().map(|(_, v)| v)),
            Err(e) => tracing::warn!(error = %e, "cannot read the pinned versions; starting with none"),
        }
        *lock(&self.db) = Some(db);
        self.replan();
    }

    /// Let go of the state database (the server is stopping).
    pub fn release(&self) {
        lock(&self.db).take();
    }

    /// Versions the operator pinned.
    pub fn held(&self) -> HashSet<(String, String)> {
        lock(&self.held).clone()
    }

    /// Pin (`true`) or unpin a version for the operator: kept from eviction
    /// and fetched now, or left to the budget again. Blocking (a commit).
    pub fn hold(self: &Arc<Self>, component: &str, version: &str, pin: bool) -> Result<(), String> {
        let key = (component.to_string(), version.to_string());
        let id = format!("{component}\u{0}{version}");
        let changed = if pin { lock(&self.held).insert(key.clone()) } else { lock(&self.held).remove(&key) };
        let db = lock(&self.db).clone();
        if changed && let Some(db) = db {
            let mut batch = crate::store::db::Batch::default();
            if pin {
                batch.put(PINS, id.as_bytes(), &key);
            } else {
                batch.delete(PINS, id.as_bytes());
            }
            db.commit(batch).map_err(|e| e.to_string())?;
        }
        self.replan();
        Ok(())
    }

    fn replan(self: &Arc<Self>) {
        let catalog = lock(&self.catalog).clone();
        if let Some(c) = catalog {
            self.plan(&c);
        }
    }

    /// Pin and fetch the retained versions of critical components in `catalog`.
    ///
    /// An offline relay (no upstream) pins every listed object instead and
    /// fetches nothing: what the disk budget evicted there no fill could
    /// bring back; only deltas (rebuilt from what is held) may go.
    pub fn plan(self: &Arc<Self>, catalog: &Arc<Catalog>) {
        let mut wanted = Vec::new();
        let mut pins = HashSet::new();
        if self.filler.upstreams().list().is_empty() {
            for obj in catalog.objects() {
                pins.insert(obj.sha256);
                pins.insert(obj.chunks_sha256);
            }
            *lock(&self.catalog) = Some(catalog.clone());
            self.filler.store().set_pins(pins);
            lock(&self.wanted).clear();
            return;
        }
        let held = lock(&self.held).clone();
        for (name, c) in &catalog.manifest.components {
            let mut versions: Vec<_> = c.versions.iter().collect();
            versions.sort_by(|a, b| b.version.cmp(&a.version));
            let retained = if c.critical { self.retain } else { 0 };
            for (i, v) in versions.into_iter().enumerate() {
                if i >= retained && !held.contains(&(name.to_string(), v.version.to_string())) {
                    continue;
                }
                let Some(obj) = catalog.object(&v.sha256) else { continue };
                pins.insert(obj.sha256);
                pins.insert(obj.chunks_sha256);
                wanted.push(Wanted {
                    component: name.to_string(),
                    version: v.version.to_string(),
                    target: Target::payload(obj),
                });
            }
        }
        *lock(&self.catalog) = Some(catalog.clone());
        self.filler.store().set_pins(pins);
        *lock(&self.wanted) = wanted;
        self.sweep(true);
    }

    /// Start fetches for retained versions that are missing. `force` retries
    /// recent failures too (a new manifest may have fixed them).
    pub fn sweep(self: &Arc<Self>, force: bool) {
        let store = self.filler.store();
        // Nothing fetched now could be kept: wait until the store can write.
        if store.write_fault().is_some() {
            return;
        }
        let targets: Vec<(String, String, Target)> =
            lock(&self.wanted).iter().map(|w| (w.component.clone(), w.version.clone(), w.target)).collect();
        for (component, version, target) in targets {
            if store.contains(&target.digest) || self.filler.is_filling(&target.digest) {
                continue;
            }
            if !force && lock(&self.failures).get(&target.digest).is_some_and(|(at, _)| at.elapsed() < RETRY_AFTER) {
                continue;
            }
            if !lock(&self.started).insert(target.digest) {
                continue; // queued for a slot already
            }
            let this = self.clone();
            crate::upstream::runtime::spawn(async move {
                let _slot = this.slots.clone().acquire_owned().await;
                // A newer version of something we hold: try its delta first.
                let catalog = lock(&this.catalog).clone();
                if let Some(catalog) = catalog {
                    // Bounded in all, as a fill is: a trickling upstream
                    // cannot hold this prefetch (and its slot) for ever.
                    let deadline = this.filler.upstreams().fill_deadline();
                    let synced =
                        tokio::time::timeout(deadline, by_delta::sync(&this.filler, &catalog, &component, &version))
                            .await
                            .unwrap_or_else(|_| Err(format!("no delta sync within fill_deadline ({deadline:?})")));
                    match synced {
                        Ok(_) => {}
                        Err(e) => {
                            metrics::counter!(telemetry::DELTA_SYNC, "result" => "fallback").increment(1);
                            tracing::warn!(component, version, error = %e, "sync by delta failed; fetching the full file");
                        }
                    }
                }
                let result = this.filler.ensure(target.fill_request()).await;
                lock(&this.started).remove(&target.digest);
                match result {
                    Ok(()) => {
                        metrics::counter!(telemetry::PREFETCHES, "result" => "ok").increment(1);
                        lock(&this.failures).remove(&target.digest);
                    }
                    Err(e) => {
                        metrics::counter!(telemetry::PREFETCHES, "result" => "failed").increment(1);
                        tracing::warn!(object = %target.repo_path(), error = %e, "prefetch failed; will retry");
                        lock(&this.failures).insert(target.digest, (Instant::now(), e.to_string()));
                    }
                }
            });
        }
    }

    pub fn report(&self) -> Vec<PrefetchStatus> {
        let store = self.filler.store();
        let in_flight: HashMap<Digest, u64> =
            self.filler.in_flight().into_iter().map(|f| (f.digest, f.verified)).collect();
        let failures = lock(&self.failures);
        lock(&self.wanted)
            .iter()
            .map(|w| {
                let d = w.target.digest;
                let (state, verified, error) = if store.contains(&d) {
                    ("cached", None, None)
                } else if let Some(v) = in_flight.get(&d) {
                    ("filling", Some(*v), None)
                } else if let Some((_, e)) = failures.get(&d) {
                    ("failed", None, Some(e.clone()))
                } else {
                    ("pending", None, None)
                };
                PrefetchStatus {
                    component: w.component.clone(),
                    version: w.version.clone(),
                    sha256: d,
                    size: w.target.len,
                    state,
                    verified,
                    error,
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
