//! Where a request's bytes come from: the origin's repository files, or the
//! relay's store (filled from upstream on a miss).
//!
//! The HTTP room asks for a [`Target`] (digest, length, and which upstream path
//! holds it) and gets [`Content`] to stream; it does not know which role it is in.

use std::sync::Arc;

use crate::digest::Digest;
use crate::fill::{FillError, FillHandle, FillRequest, Filler, Opened, Verify};
use crate::repo::catalog::ObjectInfo;
use crate::repo::{self, RepoDir};
use crate::store::{Blob, MemoryCache, Store, StoreError, WeakStore};
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
    /// A payload (`digest` is its SHA-256), verified block by block with its
    /// chunk list while it is fetched.
    Payload { chunk_size: u64, chunks_sha256: Digest, chunks_len: u64 },
    /// The chunk list of the payload with this digest.
    ChunkList { payload: Digest },
}

impl Target {
    /// A payload as the catalog describes it.
    pub fn payload(obj: &ObjectInfo) -> Target {
        let kind = TargetKind::Payload {
            chunk_size: obj.chunk_size,
            chunks_sha256: obj.chunks_sha256,
            chunks_len: obj.chunk_list_len(),
        };
        Target { digest: obj.sha256, len: obj.size, kind }
    }

    /// The chunk list of a payload as the catalog describes it.
    pub fn chunk_list(obj: &ObjectInfo) -> Target {
        Target {
            digest: obj.chunks_sha256,
            len: obj.chunk_list_len(),
            kind: TargetKind::ChunkList { payload: obj.sha256 },
        }
    }

    /// The path of these bytes in a repository (on disk and on an upstream).
    pub fn repo_path(&self) -> String {
        match self.kind {
            TargetKind::Payload { .. } => repo::object_path(&self.digest),
            TargetKind::ChunkList { payload } => repo::chunks_path(&payload),
        }
    }

    fn kind_label(&self) -> &'static str {
        match self.kind {
            TargetKind::Payload { .. } => "object",
            TargetKind::ChunkList { .. } => "chunks",
        }
    }

    /// How to fetch and verify these bytes.
    pub fn fill_request(&self) -> FillRequest {
        let verify = match self.kind {
            TargetKind::Payload { chunk_size, chunks_sha256, chunks_len } => Verify::Chunks {
                chunk_size,
                list: Box::new(FillRequest {
                    digest: chunks_sha256,
                    len: chunks_len,
                    path: repo::chunks_path(&self.digest),
                    verify: Verify::Whole,
                }),
            },
            TargetKind::ChunkList { .. } => Verify::Whole,
        };
        FillRequest { digest: self.digest, len: self.len, path: self.repo_path(), verify }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fill(#[from] FillError),
}

/// Bytes ready to stream.
#[derive(Debug, Clone)]
pub enum Content {
    Stored(Blob),
    /// Arriving from upstream; readable up to the verified mark.
    Filling(FillHandle),
}

fn origin_load(repo: &RepoDir, memory: &MemoryCache, target: &Target) -> Result<Blob, SourceError> {
    let path = repo.root().join(target.repo_path());
    checked(memory.load(&target.digest, &path, target.len)?, target)
}

/// A stored object must be exactly as long as the manifest says: the response
/// was sized from the manifest. (Same digest means same bytes, so this only
/// fails when a manifest's `size` contradicts its `sha256`.)
fn checked(blob: Blob, target: &Target) -> Result<Blob, SourceError> {
    if blob.len() == target.len {
        Ok(blob)
    } else {
        Err(SourceError::Store(StoreError::Length {
            expected: target.digest,
            expected_len: target.len,
            actual: blob.len(),
        }))
    }
}

/// Hit and miss counters, resolved once per thread and server (a label
/// lookup per request is not free; a worker serves one server for good).
fn cache_counter(name: &'static str, target: &Target) -> &'static telemetry::Tally {
    type Tallies = [&'static telemetry::Tally; 4];
    thread_local! {
        static COUNTERS: std::cell::Cell<Option<(telemetry::Scope, Tallies)>> = const { std::cell::Cell::new(None) };
    }
    let scope = telemetry::scope::current();
    let c = COUNTERS.with(|cell| match cell.get() {
        Some((s, c)) if s == scope => c,
        _ => {
            let c = [
                telemetry::tally(telemetry::CACHE_HITS, &[("kind", "object")]),
                telemetry::tally(telemetry::CACHE_HITS, &[("kind", "chunks")]),
                telemetry::tally(telemetry::CACHE_MISSES, &[("kind", "object")]),
                telemetry::tally(telemetry::CACHE_MISSES, &[("kind", "chunks")]),
            ];
            cell.set(Some((scope, c)));
            c
        }
    });
    let miss = usize::from(name == telemetry::CACHE_MISSES) * 2;
    c[miss + usize::from(target.kind_label() == "chunks")]
}

pub enum Source {
    Origin { repo: RepoDir, memory: MemoryCache },
    Relay { store: Store, filler: Arc<Filler> },
}

/// Where a server's stored bytes are, for [`Check`] (see [`Source::checks`]).
pub struct Checks {
    place: Place,
    deltas: Option<WeakStore>,
}

enum Place {
    Relay(WeakStore),
    Origin { repo: RepoDir, memory: MemoryCache },
}

/// Which stored bytes a response sent.
#[derive(Debug, Clone, Copy)]
pub enum Kept {
    Target(Target),
    /// A delta, in the delta store.
    Delta(Digest),
}

/// What a response from a stored file or mapping checks when it ends early
/// (`http::body::PieceStream`). Most such ends are a client hanging up; some
/// are the store failing under the response (a mapped page the kernel could
/// not read ends the connection with nothing else to show). Copied into the
/// response: no allocation, no reference count.
#[derive(Clone, Copy)]
pub struct Check {
    pub checks: &'static Checks,
    pub kept: Kept,
}

impl Check {
    /// Look at the object: a relay drops a damaged one from its store (the
    /// next request fetches it again); an origin forgets its mapping, so the
    /// next request finds the damage and answers 500. Counted either way
    /// (`store_faults_total`). Blocking (a `stat`): run it off the event loop.
    pub fn run(self, read_failed: bool) {
        match (self.kept, &self.checks.place) {
            (Kept::Delta(d), _) => {
                if let Some(store) = self.checks.deltas.as_ref().and_then(WeakStore::upgrade) {
                    store.check(&d, read_failed);
                }
            }
            (Kept::Target(t), Place::Relay(store)) => {
                if let Some(store) = store.upgrade() {
                    store.check(&t.digest, read_failed);
                }
            }
            (Kept::Target(t), Place::Origin { repo, memory }) => {
                let path = repo.root().join(t.repo_path());
                let kind = match std::fs::metadata(&path) {
                    Ok(m) if m.len() == t.len && !read_failed => return,
                    Ok(m) if m.len() != t.len => "length",
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing",
                    _ => "read_error",
                };
                tracing::error!(path = %path.display(), kind, "a repository object is damaged or gone; answering 500 for it until it is put back");
                metrics::counter!(telemetry::STORE_FAULTS, "kind" => kind).increment(1);
                memory.invalidate(&t.digest);
            }
        }
    }
}

impl Source {
    /// Since when, and why, a relay's store cannot write (`store::full`).
    pub fn write_fault(&self) -> Option<(std::time::SystemTime, String)> {
        match self {
            Source::Relay { store, .. } => store.write_fault(),
            Source::Origin { .. } => None,
        }
    }

    /// What a response from this source checks when it ends early (see
    /// [`Check`]); made once per server and kept for the process's life, so a
    /// response holds a plain reference. It holds the relay's store (and the
    /// delta store) weakly: a stopped server's directory lock is not kept.
    pub fn checks(&self, deltas: Option<&Store>) -> &'static Checks {
        let place = match self {
            Source::Relay { store, .. } => Place::Relay(store.downgrade()),
            Source::Origin { repo, memory } => Place::Origin { repo: repo.clone(), memory: memory.clone() },
        };
        Box::leak(Box::new(Checks { place, deltas: deltas.map(Store::downgrade) }))
    }

    /// Open the target's bytes, starting (or joining) a fill if this is a relay
    /// that does not hold them yet. Returns once the fill has an upstream
    /// response, so a request for an object no upstream can supply gets an
    /// error status instead of a truncated body.
    pub async fn open(&self, target: &Target) -> Result<Content, SourceError> {
        match self.stored(target)? {
            Some(blob) => Ok(Content::Stored(blob)),
            None => self.fill(target).await,
        }
    }

    /// The target's bytes if they are already here, without fetching
    /// anything: what an origin has, or what a relay's store holds.
    pub fn stored(&self, target: &Target) -> Result<Option<Blob>, SourceError> {
        match self {
            Source::Origin { repo, memory } => Ok(Some(origin_load(repo, memory, target)?)),
            Source::Relay { store, .. } => match store.get(&target.digest)? {
                Some(blob) => {
                    cache_counter(telemetry::CACHE_HITS, target).add(1);
                    Ok(Some(checked(blob, target)?))
                }
                None => Ok(None),
            },
        }
    }

    /// Fetch what [`Source::stored`] did not find (a relay's cache miss):
    /// start or join the fill.
    pub async fn fill(&self, target: &Target) -> Result<Content, SourceError> {
        match self {
            // An origin has everything it publishes: nothing to fetch.
            Source::Origin { repo, memory } => Ok(Content::Stored(origin_load(repo, memory, target)?)),
            Source::Relay { filler, store } => {
                cache_counter(telemetry::CACHE_MISSES, target).add(1);
                let mut tries = 0;
                loop {
                    tries += 1;
                    match filler.attach(target.fill_request())? {
                        Opened::Stored(blob) => return Ok(Content::Stored(checked(blob, target)?)),
                        Opened::Filling(mut handle) => match handle.started().await {
                            Ok(()) => return Ok(Content::Filling(handle)),
                            // The disk filled up under this fill before it
                            // sent anything: once more, now in memory.
                            Err(e) if tries == 1 && !handle.in_memory() && store.write_fault().is_some() => {
                                tracing::debug!(error = %e, "retrying a fill in memory");
                            }
                            Err(e) => return Err(SourceError::Fill((*e).clone())),
                        },
                    }
                }
            }
        }
    }
}
