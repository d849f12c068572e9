//! The relay's sync actor: get the newest manifest an upstream will vouch for.
//!
//! A sync walks the upstreams in order and takes the first manifest that
//! (1) carries a valid signature under the pinned key, (2) parses, and (3) does
//! not go back: a serial lower than the one we hold is a rollback, and the same
//! serial with different bytes is an equivocation; both are refused, logged with
//! the upstream's name and counted, and the next upstream is tried. Whatever
//! happens, the relay keeps serving the last manifest it verified.
//!
//! The accepted pair is persisted (one file, atomic) before it is served, so a
//! restarted relay starts from it and never accepts an older one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;

use super::prefetch::Prefetcher;
use super::{Stop, SyncError, SyncNow, SyncReport, added_versions};
use crate::repo::catalog::Catalog;
use crate::repo::sign::PublicKey;
use crate::repo::{self, bundle};
use crate::state::Published;
use crate::telemetry;
use crate::upstream::{Upstream, Upstreams};

/// Everything one sync needs, cheap to clone into a future.
#[derive(Clone)]
pub struct SyncContext {
    pub published: Arc<Published>,
    pub upstreams: Arc<Upstreams>,
    pub key: PublicKey,
    /// Where the last verified manifest is kept (`state/manifest.bundle`).
    pub bundle_path: PathBuf,
    /// Pins and fetches critical components after each good sync.
    pub prefetcher: Arc<Prefetcher>,
    /// Serialises syncs: a timer tick and an admin request never interleave.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl SyncContext {
    pub fn new(
        published: Arc<Published>,
        upstreams: Arc<Upstreams>,
        key: PublicKey,
        bundle_path: PathBuf,
        prefetcher: Arc<Prefetcher>,
    ) -> Self {
        SyncContext { published, upstreams, key, bundle_path, prefetcher, lock: Arc::new(tokio::sync::Mutex::new(())) }
    }

    /// Load the persisted manifest, if there is one and it still verifies.
    /// Returns its serial.
    pub fn restore(&self) -> Option<u64> {
        let data = match std::fs::read(&self.bundle_path) {
            Ok(d) => Bytes::from(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.bundle_path.display(), error = %e, "cannot read the saved manifest; waiting for the first sync");
                return None;
            }
        };
        let Some((manifest, sig)) = bundle::decode(data) else {
            tracing::warn!(path = %self.bundle_path.display(), "saved manifest is damaged; ignoring it");
            return None;
        };
        match repo::verify(&self.key, manifest, sig) {
            Ok(catalog) => {
                let serial = catalog.serial();
                let catalog = Arc::new(catalog);
                // Pin before anything can evict; fetching waits for the runtime.
                self.prefetcher.plan(&catalog);
                self.published.publish(catalog);
                tracing::info!(serial, "serving the saved manifest until the first sync");
                Some(serial)
            }
            Err(e) => {
                tracing::warn!(error = %e, "saved manifest does not verify under the configured key (key changed?); ignoring it");
                None
            }
        }
    }

    /// One sync: see the module comment.
    pub async fn run(&self) -> Result<SyncReport, SyncError> {
        let _serial = self.lock.lock().await;
        let current = self.published.current();
        let mut skipped = Vec::new();
        for up in self.upstreams.list() {
            let catalog = match repo::fetch_verified(up, &self.key).await {
                Ok(c) => c,
                Err((reason, why)) => {
                    reject(up, reason, &why, &mut skipped);
                    continue;
                }
            };
            if let Some(cur) = &current {
                if catalog.serial() < cur.serial() {
                    let why = format!(
                        "offers serial {}, older than the {} we hold (rollback refused)",
                        catalog.serial(),
                        cur.serial()
                    );
                    reject(up, "rollback", &why, &mut skipped);
                    continue;
                }
                if catalog.serial() == cur.serial() {
                    if catalog.manifest_digest != cur.manifest_digest {
                        let why = format!(
                            "offers different bytes under the serial {} we hold (equivocation refused)",
                            cur.serial()
                        );
                        reject(up, "equivocation", &why, &mut skipped);
                        continue;
                    }
                    self.published.mark_good_sync();
                    self.prefetcher.plan(cur);
                    metrics::counter!(telemetry::SYNCS, "result" => "unchanged").increment(1);
                    tracing::debug!(upstream = %up.name, serial = cur.serial(), "manifest unchanged");
                    return Ok(SyncReport {
                        result: "unchanged",
                        serial: cur.serial(),
                        previous_serial: Some(cur.serial()),
                        source: up.name.clone(),
                        added: Vec::new(),
                        skipped,
                    });
                }
            }
            let added = added_versions(current.as_ref().map(|c| &c.manifest), &catalog.manifest);
            let removed =
                current.as_ref().map(|c| added_versions(Some(&catalog.manifest), &c.manifest)).unwrap_or_default();
            metrics::counter!(telemetry::SYNC_CHANGES, "change" => "added").increment(added.len() as u64);
            metrics::counter!(telemetry::SYNC_CHANGES, "change" => "removed").increment(removed.len() as u64);
            self.persist(&catalog).await;
            let serial = catalog.serial();
            let catalog = Arc::new(catalog);
            self.prefetcher.plan(&catalog);
            self.published.publish(catalog);
            self.published.mark_good_sync();
            metrics::counter!(telemetry::SYNCS, "result" => "updated").increment(1);
            tracing::info!(
                upstream = %up.name,
                serial,
                previous = ?current.as_ref().map(|c| c.serial()),
                added = ?added,
                removed = ?removed,
                "new manifest verified and published"
            );
            return Ok(SyncReport {
                result: "updated",
                serial,
                previous_serial: current.as_ref().map(|c| c.serial()),
                source: up.name.clone(),
                added,
                skipped,
            });
        }
        metrics::counter!(telemetry::SYNCS, "result" => "failed").increment(1);
        self.published.mark_failed_sync();
        tracing::warn!(serving = ?current.as_ref().map(|c| c.serial()), "sync failed on every upstream; still serving the last verified manifest");
        Err(SyncError::NoAcceptableManifest(skipped))
    }

    async fn persist(&self, catalog: &Catalog) {
        let (path, m, s) = (self.bundle_path.clone(), catalog.manifest_bytes.clone(), catalog.signature.clone());
        let result = tokio::task::spawn_blocking(move || bundle::save(&path, &m, &s)).await;
        if let Ok(Err(e)) | Err(e) = result.map_err(std::io::Error::other) {
            // Serve it anyway: failing to persist costs rollback protection across
            // a restart, not correctness now. Say so loudly.
            tracing::error!(path = %self.bundle_path.display(), error = %e, "cannot save the verified manifest (disk full?)");
        }
    }
}

fn reject(up: &Upstream, reason: &'static str, why: &str, skipped: &mut Vec<String>) {
    metrics::counter!(telemetry::MANIFEST_REJECTED, "upstream" => up.name.clone(), "reason" => reason).increment(1);
    tracing::warn!(upstream = %up.name, reason, "manifest refused: {why}");
    skipped.push(format!("{}: {why}", up.name));
}

/// Runs [`SyncContext::run`] at start, every `interval`, and on [`SyncNow`].
pub struct RelaySync {
    ctx: SyncContext,
    interval: Duration,
}

impl RelaySync {
    pub fn new(ctx: SyncContext, interval: Duration) -> Self {
        RelaySync { ctx, interval }
    }
}

impl Actor for RelaySync {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let run = |act: &mut Self, ctx: &mut Context<Self>| {
            let sync = act.ctx.clone();
            // Errors are logged and counted inside run().
            ctx.spawn(async move { sync.run().await.map(|_| ()).unwrap_or(()) }.into_actor(act));
        };
        run(self, ctx);
        ctx.run_interval(self.interval, run);
    }
}

impl Handler<SyncNow> for RelaySync {
    type Result = ResponseFuture<Result<SyncReport, SyncError>>;

    fn handle(&mut self, _: SyncNow, _: &mut Self::Context) -> Self::Result {
        let sync = self.ctx.clone();
        Box::pin(async move { sync.run().await })
    }
}

impl Handler<Stop> for RelaySync {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
