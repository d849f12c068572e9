//! The control plane: actors that keep what the hot path serves up to date.
//!
//! - [`sync::RelaySync`] (relay role): fetches and verifies upstream manifests
//!   on start, on a timer and on demand;
//! - [`prefetch::Prefetcher`]: pins and fetches critical components;
//! - [`housekeeping::Housekeeping`] (relay role): the disk budget, prefetch
//!   retries and stale partial files;
//! - [`reload::OriginReload`] (origin role): picks up a new publish in the
//!   repository directory.
//!
//! Both answer [`SyncNow`], which is what `POST /admin/sync` sends. Actors never
//! sit on the request path: they replace the published catalog, and requests
//! read it.

pub mod deltas;
pub mod housekeeping;
pub mod prefetch;
pub mod reload;
pub mod status;
pub mod sync;

use actix::Message;
use serde::Serialize;

/// Sync (or reload) now and report what happened.
#[derive(Debug, Clone, Copy)]
pub struct SyncNow;

impl Message for SyncNow {
    type Result = Result<SyncReport, SyncError>;
}

/// Stop the actor (used when a server shuts down).
#[derive(Debug, Clone, Copy)]
pub struct Stop;

impl Message for Stop {
    type Result = ();
}

/// What a sync did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// `updated` or `unchanged`.
    pub result: &'static str,
    pub serial: u64,
    pub previous_serial: Option<u64>,
    /// Which upstream supplied it (relay), or `repository` (origin).
    pub source: String,
    /// `component version` pairs that are new in this manifest.
    pub added: Vec<String>,
    /// Upstreams tried before this one, and why each was passed over.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    #[error("no upstream offered an acceptable manifest: {}", .0.join("; "))]
    NoAcceptableManifest(Vec<String>),
    #[error("{0}")]
    Repository(String),
    /// An offline relay has nothing to sync from.
    #[error("this relay has no [[upstream]]: it is updated by `patchrelay import`, not by syncing")]
    Offline,
}

/// `component version` pairs in `new` that are not in `old`.
pub fn added_versions(
    old: Option<&crate::repo::manifest::Manifest>,
    new: &crate::repo::manifest::Manifest,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, c) in &new.components {
        let before = old.and_then(|m| m.components.get(name));
        for v in &c.versions {
            if before.is_none_or(|b| b.version(&v.version).is_none()) {
                out.push(format!("{name} {}", v.version));
            }
        }
    }
    out
}
