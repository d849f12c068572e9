//! Pulling objects through from upstream: one fetch per object however many
//! ask, streamed to all of them as it arrives, nothing unverified passed on.
//!
//! The first request for a missing object registers a fill and starts its task;
//! requests for the same object that arrive while it runs (whole or ranged)
//! attach to it and read from its partial file, but only up to the last byte
//! that has been *verified*: the task checks every block against the object's
//! chunk list (itself checked against the signed manifest) before it advances
//! the verified mark. A range the fill has passed is served at once; one beyond
//! it waits. The task runs on its own, so it completes (and the object is
//! cached) even when every client that asked has gone.
//!
//! See [`task`] for how a fill fetches: resume, failover, integrity failures.

pub mod by_delta;
pub(crate) mod task;

use std::collections::HashMap;
use std::fs::File;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::digest::Digest;
use crate::store::{Blob, Store};
use crate::telemetry;
use crate::upstream::{self, UpstreamError, Upstreams};

/// What to fetch.
#[derive(Debug, Clone)]
pub struct FillRequest {
    /// Digest of the bytes (the store's key).
    pub digest: Digest,
    pub len: u64,
    /// Path on the upstream, e.g. `v1/objects/<sha256>`.
    pub path: String,
    pub verify: Verify,
}

/// How a fill checks bytes before they count.
#[derive(Debug, Clone)]
pub enum Verify {
    /// Block by block against a chunk list (payloads): bytes stream to waiters
    /// as each block verifies.
    Chunks { chunk_size: u64, list: Box<FillRequest> },
    /// Only as a whole (chunk lists themselves, which are small): nothing is
    /// passed on until the whole object verifies.
    Whole,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("upstream {upstream}: {path}: {reason}")]
    Integrity { upstream: String, path: String, reason: String },
    #[error("local store: {0}")]
    Store(String),
    #[error("no upstream could supply {path}: {}", .attempts.join("; "))]
    AllFailed { path: String, attempts: Vec<String>, timeouts_only: bool },
    #[error("fill task for {0} ended abnormally")]
    Aborted(String),
    /// The store cannot write, and the memory for passing objects through
    /// is taken (see `store::full`).
    #[error("{0}")]
    StoreFull(String),
    /// An offline relay (no `[[upstream]]`) does not hold these bytes: only
    /// an import can bring them.
    #[error("{0} is not held here, and this relay has no upstream: a later air-gap bundle must bring it")]
    Offline(String),
}

/// Where a fill is.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Fetching the chunk list, re-verifying a partial file, or waiting for an
    /// upstream slot or response.
    Starting {
        verified: u64,
    },
    /// Receiving: bytes `0..verified` are checked and may be served.
    Running {
        verified: u64,
    },
    /// Complete, verified and in the store.
    Done,
    Failed(Arc<FillError>),
}

struct Shared {
    digest: Digest,
    len: u64,
    path: String,
    file: Arc<File>,
    progress: watch::Sender<Progress>,
    /// The file is in memory (the store cannot write): the object is passed
    /// through, not stored, and its bytes are counted against
    /// [`Filler::memory_budget`] until the last reader lets go.
    in_memory: Option<MemoryHeld>,
}

/// Bytes of an in-memory fill, given back when it is dropped.
struct MemoryHeld {
    budget: Arc<std::sync::atomic::AtomicU64>,
    len: u64,
}

impl Drop for MemoryHeld {
    fn drop(&mut self) {
        self.budget.fetch_add(self.len, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A request's view of a fill in progress.
pub struct FillHandle {
    shared: Arc<Shared>,
    rx: watch::Receiver<Progress>,
    changes: WatchStream<Progress>,
}

impl std::fmt::Debug for FillHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillHandle").field("digest", &self.shared.digest).finish()
    }
}

impl Clone for FillHandle {
    fn clone(&self) -> Self {
        FillHandle::new(self.shared.clone())
    }
}

impl FillHandle {
    fn new(shared: Arc<Shared>) -> Self {
        let rx = shared.progress.subscribe();
        let changes = WatchStream::from_changes(shared.progress.subscribe());
        FillHandle { shared, rx, changes }
    }

    pub fn len(&self) -> u64 {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    /// The partial file (same inode as the final object once committed).
    pub fn file(&self) -> &Arc<File> {
        &self.shared.file
    }

    /// Whether the fill is in memory (the store cannot write): its file is
    /// then the only copy of the bytes.
    pub fn in_memory(&self) -> bool {
        self.shared.in_memory.is_some()
    }

    /// Bytes that may be served now, or why there will be no more.
    pub fn available(&self) -> Result<u64, Arc<FillError>> {
        match &*self.rx.borrow() {
            Progress::Starting { verified } | Progress::Running { verified } => Ok(*verified),
            Progress::Done => Ok(self.shared.len),
            Progress::Failed(e) => Err(e.clone()),
        }
    }

    /// Wait for a change of progress (`Pending` until there is one).
    pub fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<Progress>> {
        Pin::new(&mut self.changes).poll_next(cx)
    }

    /// Wait until the fill has an upstream response (or ended): a request
    /// answers with an error rather than a truncated 200 when no upstream can
    /// supply the object at all.
    pub async fn started(&mut self) -> Result<(), Arc<FillError>> {
        loop {
            match &*self.rx.borrow_and_update() {
                Progress::Starting { .. } => {}
                Progress::Failed(e) => return Err(e.clone()),
                Progress::Running { .. } | Progress::Done => return Ok(()),
            }
            if self.rx.changed().await.is_err() {
                return self.available().map(|_| ());
            }
        }
    }

    /// Wait until the object is complete and stored.
    pub async fn done(&mut self) -> Result<(), Arc<FillError>> {
        loop {
            match &*self.rx.borrow_and_update() {
                Progress::Done => return Ok(()),
                Progress::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if self.rx.changed().await.is_err() {
                return Err(Arc::new(FillError::Aborted(self.shared.path.clone())));
            }
        }
    }
}

/// What [`Filler::attach`] found.
pub enum Opened {
    /// Already complete in the store.
    Stored(Blob),
    /// Being filled (by this request or an earlier one).
    Filling(FillHandle),
}

/// A fill in flight, for `/admin/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InFlight {
    pub digest: Digest,
    pub path: String,
    pub len: u64,
    pub verified: u64,
}

/// The registry of fills in flight.
pub struct Filler {
    store: Store,
    upstreams: Arc<Upstreams>,
    inflight: Mutex<HashMap<Digest, Arc<Shared>>>,
    in_flight_gauge: metrics::Gauge,
    waiters: metrics::Counter,
    /// Bytes that fills in memory may still take (while the store cannot
    /// write): objects passed through are held whole while anyone reads them.
    memory_budget: Arc<std::sync::atomic::AtomicU64>,
    /// Fills ended well and badly since start: the alert on the error rate
    /// reads these (`crate::alerts::watch`), not the process-wide metrics.
    ended_ok: std::sync::atomic::AtomicU64,
    ended_failed: std::sync::atomic::AtomicU64,
}

impl Filler {
    /// `memory` bounds the objects passed through in memory at once while
    /// the store cannot write (`storage.memory_cache`).
    pub fn new(store: Store, upstreams: Arc<Upstreams>, memory: u64) -> Arc<Filler> {
        Arc::new(Filler {
            store,
            upstreams,
            inflight: Mutex::new(HashMap::new()),
            in_flight_gauge: metrics::gauge!(telemetry::FILLS_IN_FLIGHT),
            waiters: metrics::counter!(telemetry::FILL_WAITERS),
            memory_budget: Arc::new(std::sync::atomic::AtomicU64::new(memory)),
            ended_ok: Default::default(),
            ended_failed: Default::default(),
        })
    }

    /// Take `len` bytes of the pass-through budget, or say why not.
    fn hold_memory(&self, len: u64, path: &str) -> Result<MemoryHeld, FillError> {
        use std::sync::atomic::Ordering;
        let taken = self.memory_budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(len));
        match taken {
            Ok(_) => Ok(MemoryHeld { budget: self.memory_budget.clone(), len }),
            Err(left) => Err(FillError::StoreFull(format!(
                "the store cannot write, and passing {path} ({len} bytes) through memory would take more than the {left} bytes left for that; retry later"
            ))),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<Shared>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attach to the fill of `req`, starting it if none is running.
    pub fn attach(self: &Arc<Self>, req: FillRequest) -> Result<Opened, FillError> {
        // The registry lock is only ever held for map operations: no I/O, no
        // await. Disk work (the store lookup, opening the partial file) happens
        // between two short critical sections, and the second one re-checks.
        if let Some(shared) = self.registry().get(&req.digest) {
            self.waiters.increment(1);
            return Ok(Opened::Filling(FillHandle::new(shared.clone())));
        }
        if let Some(blob) = self.store.get(&req.digest).map_err(|e| FillError::Store(e.to_string()))? {
            return Ok(Opened::Stored(blob));
        }
        if self.upstreams.list().is_empty() {
            return Err(FillError::Offline(req.path));
        }
        let (file, in_memory) = self.store.open_partial(&req.digest).map_err(|e| FillError::Store(e.to_string()))?;
        let in_memory = if in_memory { Some(self.hold_memory(req.len, &req.path)?) } else { None };
        let (progress, _) = watch::channel(Progress::Starting { verified: 0 });
        let shared = Arc::new(Shared {
            digest: req.digest,
            len: req.len,
            path: req.path.clone(),
            file: Arc::new(file),
            progress,
            in_memory,
        });
        {
            let mut inflight = self.registry();
            if let Some(existing) = inflight.get(&req.digest) {
                // Another request registered it meanwhile: join that one.
                self.waiters.increment(1);
                return Ok(Opened::Filling(FillHandle::new(existing.clone())));
            }
            if self.store.contains(&req.digest) {
                // ...or finished it meanwhile.
                drop(inflight);
                return match self.store.get(&req.digest).map_err(|e| FillError::Store(e.to_string()))? {
                    Some(blob) => Ok(Opened::Stored(blob)),
                    None => Err(FillError::Store(format!("{} vanished right after it was stored", req.path))),
                };
            }
            inflight.insert(req.digest, shared.clone());
        }
        self.in_flight_gauge.increment(1.0);
        let handle = FillHandle::new(shared.clone());
        let this = self.clone();
        // Fills run on the upstream runtime (see `upstream::runtime`).
        upstream::runtime::spawn(async move {
            // Run the fill as its own task so that even a panic in it ends in
            // `Failed` for its waiters instead of leaving them waiting forever.
            let work = {
                let (this, shared, req) = (this.clone(), shared.clone(), req.clone());
                upstream::runtime::spawn(async move { task::run(&this, &shared, &req).await })
            };
            let result = work.await.unwrap_or_else(|e| Err(FillError::Aborted(format!("{}: {e}", req.path))));
            // Committed (or failed) first, then unregistered: a request arriving
            // in between attaches and sees the final progress at once.
            this.registry().remove(&req.digest);
            this.in_flight_gauge.decrement(1.0);
            match result {
                Ok(()) => {
                    this.ended_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!(telemetry::FILLS, "result" => "ok").increment(1);
                    shared.progress.send_replace(Progress::Done);
                }
                Err(e) => {
                    this.ended_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!(telemetry::FILLS, "result" => "failed").increment(1);
                    tracing::warn!(object = %req.path, error = %e, "fill failed");
                    shared.progress.send_replace(Progress::Failed(Arc::new(e)));
                }
            }
        });
        Ok(Opened::Filling(handle))
    }

    /// Make sure the object is complete in the store, fetching it if needed.
    pub async fn ensure(self: &Arc<Self>, req: FillRequest) -> Result<(), Arc<FillError>> {
        if self.store.contains(&req.digest) {
            return Ok(());
        }
        match self.attach(req).map_err(Arc::new)? {
            Opened::Stored(_) => Ok(()),
            Opened::Filling(mut h) => h.done().await,
        }
    }

    pub fn is_filling(&self, digest: &Digest) -> bool {
        self.registry().contains_key(digest)
    }

    pub fn in_flight(&self) -> Vec<InFlight> {
        self.registry()
            .values()
            .map(|s| {
                let verified = match &*s.progress.borrow() {
                    Progress::Starting { verified } | Progress::Running { verified } => *verified,
                    Progress::Done => s.len,
                    Progress::Failed(_) => 0,
                };
                InFlight { digest: s.digest, path: s.path.clone(), len: s.len, verified }
            })
            .collect()
    }

    /// Fills that ended (ok, failed) since start.
    pub fn outcomes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ended_ok.load(Relaxed), self.ended_failed.load(Relaxed))
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }
}
