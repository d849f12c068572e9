//! The origin's reload actor: notice a new publish and serve it.
//!
//! The actor polls the metadata of the manifest and `manifest.sig` (cheap)
//! and reloads when either changed. It reads the pair as every reader of a
//! repository does ([`repo::read_pair`]): the signature kept under the
//! manifest's digest, so a publish caught (or killed) between renaming the
//! manifest and renaming `manifest.sig` still gives a matching pair. With
//! `[trust] public_key` set, the origin also verifies the pair before serving
//! it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

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
    /// The manifest's and `manifest.sig`'s stamps at the last load.
    seen: Option<(Stamp, Option<Stamp>)>,
    /// The server's metrics scope (actors of several servers may share a thread).
    scope: crate::telemetry::Scope,
}

impl OriginReload {
    pub fn new(
        repo: RepoDir,
        key: Option<PublicKey>,
        published: Arc<Published>,
        interval: Duration,
        deltas: Option<(Arc<DeltaService>, usize)>,
    ) -> Self {
        OriginReload { repo, deltas, key, published, interval, seen: None, scope: crate::telemetry::scope::current() }
    }

    /// Load the repository's manifest if it changed since the last load.
    pub fn reload(&mut self) -> Result<SyncReport, SyncError> {
        let err = |what: &str, e: &dyn std::fmt::Display| SyncError::Repository(format!("{what}: {e}"));
        let man_path = self.repo.manifest();
        let stamps = || -> Result<(Stamp, Option<Stamp>), SyncError> {
            let man = stamp(&man_path).map_err(|e| err(&format!("cannot stat {}", man_path.display()), &e))?;
            Ok((man, stamp(&self.repo.signature()).ok()))
        };
        let before = stamps()?;
        let current = self.published.current();
        if self.seen == Some(before)
            && let Some(cur) = &current
        {
            return Ok(report("unchanged", cur, Some(cur.serial()), Vec::new()));
        }
        let (manifest, sig) = repo::read_pair(&self.repo)
            .map_err(|e| err("cannot read the repository", &e))?
            .ok_or_else(|| SyncError::Repository(format!("{} is missing", man_path.display())))?;
        if stamps()? != before {
            return Err(SyncError::Repository("the repository changed while it was read; will retry".into()));
        }
        let catalog = match &self.key {
            Some(key) => repo::verify(key, manifest, sig).map_err(|e| err("repository manifest refused", &e))?,
            None => {
                let parsed = Manifest::parse(&manifest).map_err(|e| err("repository manifest refused", &e))?;
                Catalog::new(parsed, manifest, sig)
            }
        };
        if let Some(cur) = &current {
            if catalog.serial() < cur.serial() {
                return Err(SyncError::Repository(format!(
                    "repository manifest serial {} is older than the {} being served; not going back",
                    catalog.serial(),
                    cur.serial()
                )));
            }
            // The same pair (a repaired `manifest.sig`, a touched file): nothing to do.
            if catalog.manifest_digest == cur.manifest_digest && catalog.signature == cur.signature {
                self.seen = Some(before);
                return Ok(report("unchanged", cur, Some(cur.serial()), Vec::new()));
            }
        }
        let added = added_versions(current.as_ref().map(|c| &c.manifest), &catalog.manifest);
        let catalog = Arc::new(catalog);
        self.published.publish(catalog.clone());
        if let Some((deltas, retain)) = &self.deltas {
            deltas.precompute(&catalog, *retain);
        }
        self.published.mark_good_sync();
        self.seen = Some(before);
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
            let _in = crate::telemetry::enter(act.scope);
            if let Err(e) = act.reload() {
                tracing::warn!(error = %e, "repository reload");
            }
        });
    }
}

impl Handler<SyncNow> for OriginReload {
    type Result = Result<SyncReport, SyncError>;

    fn handle(&mut self, _: SyncNow, _: &mut Self::Context) -> Self::Result {
        let _in = crate::telemetry::enter(self.scope);
        self.reload()
    }
}

impl Handler<Stop> for OriginReload {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
