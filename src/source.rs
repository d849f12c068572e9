//! Where a request's bytes come from: the origin's repository files, or the
//! relay's store (filled from upstream on a miss).
//!
//! The HTTP room asks for a [`Target`] (digest, length, and which upstream path
//! holds it) and gets a [`Blob`] to stream; it does not know which role it is in.

use std::sync::Arc;

use crate::digest::Digest;
use crate::fill::{FillError, FillRequest, Filler};
use crate::repo::{self, RepoDir};
use crate::store::{Blob, MemoryCache, Store, StoreError};
use crate::telemetry;

/// What a byte-serving route resolved to.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Digest of the bytes served: the ETag and the store key.
    pub digest: Digest,
    pub len: u64,
    pub kind: TargetKind,
}

#[derive(Debug, Clone, Copy)]
pub enum TargetKind {
    /// The payload itself (`digest` is its SHA-256).
    Payload,
    /// The chunk list of the payload with this digest.
    ChunkList { payload: Digest },
}

impl Target {
    /// The path of these bytes in a repository (on disk and on an upstream).
    fn repo_path(&self) -> String {
        match self.kind {
            TargetKind::Payload => repo::object_path(&self.digest),
            TargetKind::ChunkList { payload } => repo::chunks_path(&payload),
        }
    }

    fn kind_label(&self) -> &'static str {
        match self.kind {
            TargetKind::Payload => "object",
            TargetKind::ChunkList { .. } => "chunks",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fill(#[from] FillError),
}

pub enum Source {
    Origin { repo: RepoDir, memory: MemoryCache },
    Relay { store: Store, filler: Arc<Filler> },
}

impl Source {
    /// Open the target's bytes, fetching them first if this is a relay that
    /// does not hold them yet.
    pub async fn open(&self, target: &Target) -> Result<Blob, SourceError> {
        match self {
            Source::Origin { repo, memory } => {
                let path = repo.root().join(target.repo_path());
                Ok(memory.load(&target.digest, &path, target.len)?)
            }
            Source::Relay { store, filler } => {
                if let Some(blob) = store.get(&target.digest)? {
                    metrics::counter!(telemetry::CACHE_HITS, "kind" => target.kind_label()).increment(1);
                    return Ok(blob);
                }
                metrics::counter!(telemetry::CACHE_MISSES, "kind" => target.kind_label()).increment(1);
                let req = FillRequest { digest: target.digest, len: target.len, path: target.repo_path() };
                filler.ensure(req).await?;
                // Just filled; gone again only if someone deleted it this instant.
                store.get(&target.digest)?.ok_or_else(|| {
                    SourceError::Store(StoreError::Io {
                        action: "object vanished right after it was stored",
                        path: store.path_of(&target.digest),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    })
                })
            }
        }
    }
}
