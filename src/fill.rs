//! Pulling an object through from upstream: once, however many ask at once.
//!
//! The first request for a missing object starts a fetch; requests for the same
//! object that arrive meanwhile wait for that fetch instead of starting their
//! own. The fetch runs as its own task, so it completes (and the object is
//! cached) even if every client that asked for it has gone away. Upstreams are
//! tried in order; the bytes are written through a [`BlobWriter`], which only
//! lets them into the store if they hash to the digest the signed manifest gives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use crate::digest::Digest;
use crate::store::{BlobWriter, Store, StoreError};
use crate::telemetry;
use crate::upstream::{Upstream, UpstreamError, Upstreams};

/// What to fetch.
#[derive(Debug, Clone)]
pub struct FillRequest {
    /// Digest of the bytes (the store's key).
    pub digest: Digest,
    pub len: u64,
    /// Path on the upstream, e.g. `v1/objects/<sha256>`.
    pub path: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("upstream {upstream}: {path}: {reason}")]
    Rejected { upstream: String, path: String, reason: String },
    #[error("local store: {0}")]
    Store(String),
    #[error("no upstream could supply {path}: {}", .attempts.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    AllFailed { path: String, attempts: Vec<FillError> },
    #[error("fill task for {0} ended abnormally")]
    Aborted(String),
}

type FillFuture = Shared<BoxFuture<'static, Result<(), FillError>>>;

/// The registry of fetches in flight.
pub struct Filler {
    store: Store,
    upstreams: Arc<Upstreams>,
    inflight: Mutex<HashMap<Digest, FillFuture>>,
}

impl Filler {
    pub fn new(store: Store, upstreams: Arc<Upstreams>) -> Arc<Filler> {
        Arc::new(Filler { store, upstreams, inflight: Mutex::new(HashMap::new()) })
    }

    /// Make sure the object is in the store, fetching it if needed.
    pub async fn ensure(self: &Arc<Self>, req: FillRequest) -> Result<(), FillError> {
        if self.store.contains(&req.digest) {
            return Ok(());
        }
        let fut = {
            // Held only to look up or insert; never across an await.
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = inflight.get(&req.digest) {
                f.clone()
            } else {
                let this = self.clone();
                let digest = req.digest;
                let path = req.path.clone();
                let task = tokio::spawn(async move {
                    let result = this.fetch(&req).await;
                    this.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&req.digest);
                    result
                });
                let fut = async move { task.await.unwrap_or(Err(FillError::Aborted(path))) }.boxed().shared();
                inflight.insert(digest, fut.clone());
                fut
            }
        };
        fut.await
    }

    async fn fetch(&self, req: &FillRequest) -> Result<(), FillError> {
        let mut attempts = Vec::new();
        for up in self.upstreams.list() {
            match self.fetch_from(up, req).await {
                Ok(()) => {
                    metrics::counter!(telemetry::FILLS, "result" => "ok").increment(1);
                    tracing::info!(upstream = %up.name, object = %req.path, bytes = req.len, "cached");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fill attempt failed; trying the next upstream");
                    attempts.push(e);
                }
            }
        }
        metrics::counter!(telemetry::FILLS, "result" => "failed").increment(1);
        Err(FillError::AllFailed { path: req.path.clone(), attempts })
    }

    async fn fetch_from(&self, up: &Arc<Upstream>, req: &FillRequest) -> Result<(), FillError> {
        let rejected =
            |reason: String| FillError::Rejected { upstream: up.name.clone(), path: req.path.clone(), reason };
        let mut body = up.get(&req.path).await.map_err(FillError::Upstream)?;
        if let Some(len) = body.content_length
            && len != req.len
        {
            return Err(rejected(format!("Content-Length {len}, but the manifest says {}", req.len)));
        }
        let mut writer: BlobWriter =
            self.store.writer(req.digest, req.len).map_err(|e| FillError::Store(e.to_string()))?;
        while let Some(chunk) = body.next_chunk().await.map_err(FillError::Upstream)? {
            writer.write(&chunk).map_err(|e| match e {
                StoreError::Length { .. } => rejected(format!("sent more than the manifest's {} bytes", req.len)),
                other => FillError::Store(other.to_string()),
            })?;
        }
        // Hashing is done; fsync and rename block, so leave the async thread.
        let committed = tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|_| FillError::Aborted(req.path.clone()))?;
        committed.map_err(|e| match e {
            StoreError::DigestMismatch { .. } | StoreError::Length { .. } => rejected(e.to_string()),
            other => FillError::Store(other.to_string()),
        })
    }
}
