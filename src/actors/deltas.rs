//! Deltas as a service: computed once per (base, target) pair, off the serving
//! threads, stored as content-addressed objects, and remembered.
//!
//! - **Building** happens on [`DeltaBuilder`], a `SyncArbiter` actor (its own
//!   threads, `delta.workers` of them). Its mailbox is unbounded, so slots in
//!   front of it bound the builds running or waiting: `delta.queue` for builds
//!   that requests ask for (a request that finds them all taken is answered
//!   503 with `Retry-After` at once, never left waiting), and one more that
//!   only the precompute of critical components uses, so requests cannot
//!   starve it. Concurrent requests for one pair share one build (and one
//!   slot). On a relay a build also fetches both ends over the WAN, inside
//!   its slot.
//! - **Storing**: a delta is an object like any other (the store's key is its
//!   SHA-256), so it is served with the same range/ETag semantics, evicted under
//!   the same budget, and rebuilt if asked for after eviction. The pair ->
//!   delta index is one small file per pair under `state/deltas/`, so it
//!   survives restarts.
//! - **Precomputing**: for critical `pattern` components, deltas from each
//!   retained older version to the latest (Trend-style direct increments) and
//!   between consecutive retained versions, as soon as both ends are on disk.
//!
//! Deltas are keyed by the digests of their ends, not by version names: the
//! same bytes under two names share their deltas.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use actix::prelude::*;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::delta::{self, EncodeOptions};
use crate::digest::Digest;
use crate::fill::Filler;
use crate::repo::RepoDir;
use crate::repo::catalog::{Catalog, ObjectInfo};
use crate::repo::manifest::Kind;
use crate::source::Target;
use crate::store::Store;
use crate::store::atomic::write_atomic;
use crate::telemetry;

/// Encode one delta (runs on the builder's own threads).
pub struct Encode {
    pub base: Bytes,
    pub target: Bytes,
}

impl Message for Encode {
    type Result = Result<Vec<u8>, delta::DeltaError>;
}

pub struct DeltaBuilder {
    opts: EncodeOptions,
}

impl DeltaBuilder {
    pub fn start(workers: usize, opts: EncodeOptions) -> Addr<DeltaBuilder> {
        SyncArbiter::start(workers.max(1), move || DeltaBuilder { opts: opts.clone() })
    }
}

impl Actor for DeltaBuilder {
    type Context = SyncContext<Self>;
}

impl Handler<Encode> for DeltaBuilder {
    type Result = Result<Vec<u8>, delta::DeltaError>;

    fn handle(&mut self, m: Encode, _: &mut Self::Context) -> Self::Result {
        delta::encode(&m.base, &m.target, &self.opts)
    }
}

/// A stored delta.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeltaInfo {
    pub sha256: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeltaBuildError {
    #[error("cannot get {what} {digest}: {why}")]
    Object { what: &'static str, digest: Digest, why: String },
    #[error("deltas are only built between versions up to {limit} bytes; this pair has one of {size}")]
    TooLarge { size: u64, limit: u64 },
    #[error("building the delta failed: {0}")]
    Encode(String),
    #[error("cannot store the delta: {0}")]
    Store(String),
    #[error("the delta builder is not running")]
    NoBuilder,
    #[error(
        "{0} delta builds are running or waiting, the most this server takes; ask again shortly (the full file is always a correct plan)"
    )]
    Busy(usize),
}

/// Where a delta's two ends are read from.
pub enum Objects {
    /// A relay: fetched through the fill (and so verified), then read from the store.
    Relay(Arc<Filler>),
    /// An origin: the published repository.
    Origin(RepoDir),
}

type BuildFuture = Shared<BoxFuture<'static, Result<DeltaInfo, DeltaBuildError>>>;

/// Which build slots a build may take.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// One of `delta.queue`: a request asked for it.
    Request,
    /// The one kept for precomputing critical components' deltas.
    Precompute,
}

pub struct DeltaService {
    store: Store,
    index_dir: PathBuf,
    index: RwLock<HashMap<(Digest, Digest), DeltaInfo>>,
    builder: Addr<DeltaBuilder>,
    /// Builds that requests may start (`delta.queue`).
    slots: Arc<Semaphore>,
    queue: usize,
    /// The one build slot of critical precompute.
    precompute_slot: Arc<Semaphore>,
    inflight: Mutex<HashMap<(Digest, Digest), BuildFuture>>,
    objects: Objects,
    max_size: u64,
}

fn index_name(base: &Digest, target: &Digest) -> String {
    format!("{base}-{target}")
}

/// The directory of the pair index under a store's `state/`.
pub fn index_dir(state: &std::path::Path) -> PathBuf {
    state.join("deltas")
}

/// The delta `base -> target` recorded under a store's `state/`, if any (its
/// bytes may have been evicted since: check before use).
pub fn load_index_entry(state: &std::path::Path, base: &Digest, target: &Digest) -> Option<DeltaInfo> {
    let raw = std::fs::read(index_dir(state).join(index_name(base, target))).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// Remember that the delta `base -> target` is `info` (its bytes stored as an
/// object): one small file, written atomically, read by [`DeltaService::open`].
/// Blocking.
pub fn save_index_entry(
    state: &std::path::Path,
    base: &Digest,
    target: &Digest,
    info: &DeltaInfo,
) -> std::io::Result<()> {
    let dir = index_dir(state);
    std::fs::create_dir_all(&dir)?;
    write_atomic(&dir.join(index_name(base, target)), &serde_json::to_vec(info).map_err(std::io::Error::other)?)
}

impl DeltaService {
    /// Open the service; loads the pair index from `store`'s `state/deltas`.
    pub fn open(
        store: Store,
        objects: Objects,
        builder: Addr<DeltaBuilder>,
        queue: usize,
        max_size: u64,
    ) -> std::io::Result<Arc<DeltaService>> {
        let index_dir = index_dir(&store.state_dir());
        std::fs::create_dir_all(&index_dir)?;
        let mut index = HashMap::new();
        for e in std::fs::read_dir(&index_dir)?.flatten() {
            let name = e.file_name();
            let Some((b, t)) = name.to_str().and_then(|n| n.split_once('-')) else { continue };
            let (Ok(b), Ok(t)) = (b.parse::<Digest>(), t.parse::<Digest>()) else { continue };
            let info = std::fs::read(e.path()).ok().and_then(|raw| serde_json::from_slice::<DeltaInfo>(&raw).ok());
            match info {
                Some(info) => {
                    index.insert((b, t), info);
                }
                None => tracing::warn!(path = %e.path().display(), "ignoring a damaged delta index entry"),
            }
        }
        Ok(Arc::new(DeltaService {
            store,
            index_dir,
            index: RwLock::new(index),
            builder,
            slots: Arc::new(Semaphore::new(queue.max(1))),
            queue: queue.max(1),
            precompute_slot: Arc::new(Semaphore::new(1)),
            inflight: Mutex::new(HashMap::new()),
            objects,
            max_size,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The stored delta `base -> target`, if there is one whose bytes are
    /// still on disk.
    pub fn get(&self, base: &Digest, target: &Digest) -> Option<DeltaInfo> {
        let info = *self.index.read().unwrap_or_else(|p| p.into_inner()).get(&(*base, *target))?;
        if self.store.contains(&info.sha256) {
            Some(info)
        } else {
            None // evicted: forgotten by the planner until rebuilt
        }
    }

    /// Take in a delta whose bytes are in the store already (adopted from an
    /// import): indexed on disk and for the planner. Blocking.
    pub fn record(&self, base: &Digest, target: &Digest, info: DeltaInfo) -> std::io::Result<()> {
        save_index_entry(&self.store.state_dir(), base, target, &info)?;
        self.index.write().unwrap_or_else(|p| p.into_inner()).insert((*base, *target), info);
        Ok(())
    }

    /// All stored deltas between objects in `digests` (for the planner).
    pub fn between(&self, digests: &HashMap<Digest, usize>) -> Vec<(usize, usize, DeltaInfo)> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        index
            .iter()
            .filter_map(|((b, t), info)| Some((*digests.get(b)?, *digests.get(t)?, *info)))
            .filter(|(_, _, info)| self.store.contains(&info.sha256))
            .collect()
    }

    /// The delta `base -> target`: the stored one, or built now (sharing a
    /// build already running for the pair). [`DeltaBuildError::Busy`] when
    /// it would have to wait for a slot.
    pub async fn build(self: &Arc<Self>, base: &ObjectInfo, target: &ObjectInfo) -> Result<DeltaInfo, DeltaBuildError> {
        // Built already (the common case): no future to make.
        if let Some(info) = self.get(&base.sha256, &target.sha256) {
            return Ok(info);
        }
        self.start(base, target, Slot::Request)?.await
    }

    /// The stored delta, the build running for the pair, or a new build in
    /// one of `slot`'s kind (taken now or not at all).
    fn start(
        self: &Arc<Self>,
        base: &ObjectInfo,
        target: &ObjectInfo,
        slot: Slot,
    ) -> Result<BuildFuture, DeltaBuildError> {
        if let Some(info) = self.get(&base.sha256, &target.sha256) {
            return Ok(futures_util::future::ready(Ok(info)).boxed().shared());
        }
        // Both ends are held in memory, and the suffix-array diff's memory
        // grows with the base: the limit is on either.
        if target.size > self.max_size || base.size > self.max_size {
            return Err(DeltaBuildError::TooLarge { size: target.size.max(base.size), limit: self.max_size });
        }
        // Nothing built now could be kept (and on a relay both ends would be
        // fetched for nothing).
        if self.store.write_fault().is_some() {
            return Err(DeltaBuildError::Store("the store cannot write now; use the full file".into()));
        }
        let key = (base.sha256, target.sha256);
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = inflight.get(&key) {
            return Ok(f.clone());
        }
        let pool = match slot {
            Slot::Request => &self.slots,
            Slot::Precompute => &self.precompute_slot,
        };
        let permit = pool.clone().try_acquire_owned().map_err(|_| DeltaBuildError::Busy(self.queue))?;
        let (this, b, t) = (self.clone(), base.clone(), target.clone());
        let task = crate::upstream::runtime::spawn(async move {
            let r = this.build_now(&b, &t).await;
            drop(permit);
            this.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&(b.sha256, t.sha256));
            r
        });
        let f = async move { task.await.unwrap_or(Err(DeltaBuildError::NoBuilder)) }.boxed().shared();
        inflight.insert(key, f.clone());
        Ok(f)
    }

    /// Start building `base -> target` unless it exists, is being built, or
    /// no slot of `slot`'s kind is free (then a later request or sweep tries
    /// again).
    fn build_in_background_as(self: &Arc<Self>, base: &ObjectInfo, target: &ObjectInfo, slot: Slot) {
        if base.sha256 == target.sha256 {
            return;
        }
        let Ok(build) = self.start(base, target, slot) else { return };
        let (b, t) = (base.sha256, target.sha256);
        crate::upstream::runtime::spawn(async move {
            if let Err(e) = build.await {
                tracing::warn!(base = %b, target = %t, error = %e, "background delta build failed");
            }
        });
    }

    /// [`Self::build_in_background_as`] for a request (a plan that found no
    /// direct delta).
    pub fn build_in_background(self: &Arc<Self>, base: &ObjectInfo, target: &ObjectInfo) {
        self.build_in_background_as(base, target, Slot::Request);
    }

    async fn build_now(&self, base: &ObjectInfo, target: &ObjectInfo) -> Result<DeltaInfo, DeltaBuildError> {
        let started = std::time::Instant::now();
        let base_bytes = self.read(base, "base").await?;
        let target_bytes = self.read(target, "target").await?;
        let encoded = self
            .builder
            .send(Encode { base: base_bytes, target: target_bytes })
            .await
            .map_err(|_| DeltaBuildError::NoBuilder)?
            .map_err(|e| DeltaBuildError::Encode(e.to_string()))?;
        let info = DeltaInfo { sha256: Digest::of(&encoded), size: encoded.len() as u64 };
        let (store, b, t) = (self.store.clone(), base.sha256, target.sha256);
        crate::telemetry::spawn_blocking(move || -> Result<(), String> {
            if !store.contains(&info.sha256) {
                store.put(info.sha256, &encoded).map_err(|e| e.to_string())?;
            }
            save_index_entry(&store.state_dir(), &b, &t, &info).map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| DeltaBuildError::NoBuilder)?
        .map_err(DeltaBuildError::Store)?;
        self.index.write().unwrap_or_else(|p| p.into_inner()).insert((base.sha256, target.sha256), info);
        metrics::counter!(telemetry::DELTAS_BUILT).increment(1);
        metrics::histogram!(telemetry::DELTA_BUILD_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::info!(
            base = %base.sha256,
            target = %target.sha256,
            delta_bytes = info.size,
            target_bytes = target.size,
            seconds = started.elapsed().as_secs_f64(),
            "delta built"
        );
        Ok(info)
    }

    async fn read(&self, obj: &ObjectInfo, what: &'static str) -> Result<Bytes, DeltaBuildError> {
        let err = |why: String| DeltaBuildError::Object { what, digest: obj.sha256, why };
        let path = match &self.objects {
            Objects::Relay(filler) => {
                filler.ensure(Target::payload(obj).fill_request()).await.map_err(|e| err(e.to_string()))?;
                // From the file, not a mapping (see `Store::read_all`).
                let (store, digest) = (self.store.clone(), obj.sha256);
                return match crate::telemetry::spawn_blocking(move || store.read_all(&digest)).await {
                    Ok(Ok(Some(b))) => Ok(b),
                    Ok(Ok(None)) => Err(err("evicted (or found damaged) while building".into())),
                    Ok(Err(e)) => Err(err(e.to_string())),
                    Err(_) => Err(err("read task failed".into())),
                };
            }
            Objects::Origin(repo) => repo.object(&obj.sha256),
        };
        let expected = obj.sha256;
        crate::telemetry::spawn_blocking(move || -> Result<Bytes, String> {
            let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // The origin's files are not verified by a fill: check them here,
            // since the delta will name this digest as its base or target.
            if Digest::of(&data) != expected {
                return Err(format!("{} does not hash to its name", path.display()));
            }
            Ok(Bytes::from(data))
        })
        .await
        .map_err(|_| err("read task failed".into()))?
        .map_err(err)
    }

    /// Forget the deltas nobody can ask for any more: those whose bytes were
    /// evicted (the planner ignores them already), and those between
    /// versions the manifest no longer lists (their bytes go too). Blocking
    /// (file removals): housekeeping runs it off its thread.
    pub fn prune(&self, catalog: &Catalog) -> usize {
        let stale: Vec<((Digest, Digest), DeltaInfo)> = {
            let index = self.index.read().unwrap_or_else(|p| p.into_inner());
            index
                .iter()
                .filter(|((b, t), info)| {
                    !self.store.contains(&info.sha256) || catalog.object(b).is_none() || catalog.object(t).is_none()
                })
                .map(|(k, v)| (*k, *v))
                .collect()
        };
        for ((b, t), info) in &stale {
            self.index.write().unwrap_or_else(|p| p.into_inner()).remove(&(*b, *t));
            let path = self.index_dir.join(index_name(b, t));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a delta index entry");
            }
            // Its bytes, unless another pair or a payload has the same digest.
            let shared = catalog.object(&info.sha256).is_some()
                || self.index.read().unwrap_or_else(|p| p.into_inner()).values().any(|i| i.sha256 == info.sha256);
            if !shared {
                self.store.remove(&info.sha256);
            }
        }
        if !stale.is_empty() {
            tracing::info!(entries = stale.len(), "pruned the delta index");
        }
        stale.len()
    }

    /// Whether both ends of a delta can be read without a WAN fetch.
    fn local(&self, obj: &ObjectInfo) -> bool {
        match &self.objects {
            Objects::Relay(_) => self.store.contains(&obj.sha256),
            Objects::Origin(_) => true,
        }
    }

    /// Queue the deltas worth having ahead of demand: for every critical
    /// `pattern` component, each retained older version -> latest, and each
    /// retained version -> the next, once both ends are on disk.
    pub fn precompute(self: &Arc<Self>, catalog: &Catalog, retain: usize) {
        for c in catalog.manifest.components.values() {
            if !c.critical || c.kind != Kind::Pattern {
                continue;
            }
            let mut versions: Vec<_> = c.versions.iter().collect();
            versions.sort_by(|a, b| a.version.cmp(&b.version));
            let kept: Vec<&ObjectInfo> =
                versions.iter().rev().take(retain.max(2)).rev().filter_map(|v| catalog.object(&v.sha256)).collect();
            let Some(latest) = kept.last() else { continue };
            let mut pairs: Vec<(&ObjectInfo, &ObjectInfo)> = kept.iter().map(|o| (*o, *latest)).collect();
            pairs.extend(kept.windows(2).map(|w| (w[0], w[1])));
            for (b, t) in pairs {
                if b.sha256 != t.sha256 && self.local(b) && self.local(t) {
                    self.build_in_background_as(b, t, Slot::Precompute);
                }
            }
        }
    }
}
