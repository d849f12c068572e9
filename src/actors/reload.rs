//! The origin's reload actor: notice a new publish and serve it.
//!
//! `publish` writes the manifest and then the signature, each by atomic rename,
//! so a consistent pair has a signature at least as new as the manifest. The
//! actor polls the two files' metadata (cheap) and reloads when the signature
//! changed and is not older than the manifest; anything else is a publish in
//! progress, retried on the next tick. With `[trust] public_key` set, the origin
//! also verifies the pair before serving it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use bytes::Bytes;

use super::deltas::DeltaService;
use super::{Stop, SyncError, SyncNow, SyncReport, added_versions};
use crate::repo::catalog::Catalog;
use crate::repo::manifest::Manifest;
use crate::repo::sign::PublicKey;
use crate::repo::{self, RepoDir};
use crate::state::Published;

/// Identity of a file version: (modified, length, inode).
type Stamp = (SystemTime, u64, u64);

fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.modified()?, m.len(), m.ino()))
}

pub struct OriginReload {
    repo: RepoDir,
    /// Deltas to precompute after each publish, and the retained versions.
    deltas: Option<(Arc<DeltaService>, usize)>,
    key: Option<PublicKey>,
    published: Arc<Published>,
    interval: Duration,
    seen: Option<Stamp>,
}

impl OriginReload {
    pub fn new(
        repo: RepoDir,
        key: Option<PublicKey>,
        published: Arc<Published>,
        interval: Duration,
        deltas: Option<(Arc<DeltaService>, usize)>,
    ) -> Self {
        OriginReload { repo, deltas, key, published, interval, seen: None }
    }

    /// Load the repository's manifest if it changed since the last load.
    pub fn reload(&mut self) -> Result<SyncReport, SyncError> {
        let err = |what: &str, e: &dyn std::fmt::Display| SyncError::Repository(format!("{what}: {e}"));
        let sig_path = self.repo.signature();
        let man_path = self.repo.manifest();
        let sig_stamp = stamp(&sig_path).map_err(|e| err(&format!("cannot stat {}", sig_path.display()), &e))?;
        let man_stamp = stamp(&man_path).map_err(|e| err(&format!("cannot stat {}", man_path.display()), &e))?;
        let current = self.published.current();
        if self.seen == Some(sig_stamp)
            && let Some(cur) = &current
        {
            return Ok(report("unchanged", cur, Some(cur.serial()), Vec::new()));
        }
        if sig_stamp.0 < man_stamp.0 {
            return Err(SyncError::Repository(
                "a publish is in progress (signature older than manifest); will retry".into(),
            ));
        }
        let manifest = std::fs::read(&man_path).map_err(|e| err(&format!("cannot read {}", man_path.display()), &e))?;
        let sig = std::fs::read(&sig_path).map_err(|e| err(&format!("cannot read {}", sig_path.display()), &e))?;
        if stamp(&sig_path).ok() != Some(sig_stamp) || stamp(&man_path).ok() != Some(man_stamp) {
            return Err(SyncError::Repository("the repository changed while it was read; will retry".into()));
        }
        let (manifest, sig) = (Bytes::from(manifest), Bytes::from(sig));
        let catalog = match &self.key {
            Some(key) => repo::verify(key, manifest, sig).map_err(|e| err("repository manifest refused", &e))?,
            None => {
                let parsed = Manifest::parse(&manifest).map_err(|e| err("repository manifest refused", &e))?;
                Catalog::new(parsed, manifest, sig)
            }
        };
        if let Some(cur) = &current
            && catalog.serial() < cur.serial()
        {
            return Err(SyncError::Repository(format!(
                "repository manifest serial {} is older than the {} being served; not going back",
                catalog.serial(),
                cur.serial()
            )));
        }
        let added = added_versions(current.as_ref().map(|c| &c.manifest), &catalog.manifest);
        let catalog = Arc::new(catalog);
        self.published.publish(catalog.clone());
        if let Some((deltas, retain)) = &self.deltas {
            deltas.precompute(&catalog, *retain);
        }
        self.published.mark_good_sync();
        self.seen = Some(sig_stamp);
        tracing::info!(serial = catalog.serial(), added = ?added, "serving repository manifest");
        Ok(report("updated", &catalog, current.map(|c| c.serial()), added))
    }
}

fn report(result: &'static str, cat: &Catalog, previous: Option<u64>, added: Vec<String>) -> SyncReport {
    SyncReport {
        result,
        serial: cat.serial(),
        previous_serial: previous,
        source: "repository".into(),
        added,
        skipped: Vec::new(),
    }
}

impl Actor for OriginReload {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |act, _| {
            if let Err(e) = act.reload() {
                tracing::warn!(error = %e, "repository reload");
            }
        });
    }
}

impl Handler<SyncNow> for OriginReload {
    type Result = Result<SyncReport, SyncError>;

    fn handle(&mut self, _: SyncNow, _: &mut Self::Context) -> Self::Result {
        self.reload()
    }
}

impl Handler<Stop> for OriginReload {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
