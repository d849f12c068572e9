//! The relay's sync actor: get the newest manifest the upstreams will vouch for.
//!
//! A sync asks every available upstream for its manifest at once (they are
//! small), each fetch bounded by a total deadline, and takes the highest
//! serial among those that (1) carry a valid signature under the pinned key,
//! (2) parse, and (3) do not go back: a serial lower than the one we hold is a
//! rollback, and the same serial with different bytes is an equivocation;
//! both are refused, logged with the upstream's name and counted. Asking only
//! the first upstream that answers would let a lagging parent hide a newer
//! manifest that another upstream has. Whatever happens, the relay keeps
//! serving the last manifest it verified.
//!
//! The accepted pair is persisted (one file, atomic) before it is served, so a
//! restarted relay starts from it and never accepts an older one.
//!
//! Syncs run at start, every `sync.interval`, and on demand; one that fails is
//! retried after a jittered backoff (1 s, doubling, up to the interval), so a
//! relay started before its network or its parent is up becomes ready soon
//! after they are, not an interval later.
//!
//! Imports (`crate::airgap`) are the other way a manifest arrives: every
//! second the actor looks for one staged and verified by `patchrelay import`
//! and adopts it under the same lock, with the same rollback and
//! equivocation rules. An offline relay (no upstream) does only that.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::deltas::{DeltaInfo, DeltaService};
use super::prefetch::Prefetcher;
use super::{Stop, SyncError, SyncNow, SyncReport, added_versions};
use crate::airgap::stage::{self, StagedDelta, Staging};
use crate::repo::catalog::Catalog;
use crate::repo::history::History;
use crate::repo::sign::PublicKey;
use crate::repo::{self, pair};
use crate::state::Published;
use crate::store::Store;
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
    /// The relay's store, where imports are adopted.
    store: Store,
    /// Imported deltas are recorded here, for the planner.
    deltas: Option<Arc<DeltaService>>,
    /// Serialises syncs: a timer tick and an admin request never interleave.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Refused manifests and imports are told here (`crate::events`).
    events: Option<Arc<crate::events::Events>>,
}

impl SyncContext {
    pub fn new(
        published: Arc<Published>,
        upstreams: Arc<Upstreams>,
        key: PublicKey,
        prefetcher: Arc<Prefetcher>,
        store: Store,
        deltas: Option<Arc<DeltaService>>,
    ) -> Self {
        SyncContext {
            published,
            upstreams,
            key,
            bundle_path: store.state_dir().join(stage::SAVED_MANIFEST),
            prefetcher,
            store,
            deltas,
            lock: Arc::new(tokio::sync::Mutex::new(())),
            events: None,
        }
    }

    /// Tell refused manifests and imports to `events`.
    pub fn with_events(mut self, events: Arc<crate::events::Events>) -> Self {
        self.events = Some(events);
        self
    }

    /// Whether the relay has no upstream (its only source is an import).
    pub fn offline(&self) -> bool {
        self.upstreams.list().is_empty()
    }

    /// Load the persisted manifest, if there is one and it still verifies.
    /// Returns its serial.
    pub fn restore(&self) -> Option<u64> {
        match pair::load(&self.bundle_path, &self.key) {
            Ok(Some(catalog)) => {
                let serial = catalog.serial();
                let catalog = Arc::new(catalog);
                // Pin before anything can evict; fetching waits for the runtime.
                self.prefetcher.plan(&catalog);
                self.published.publish(catalog);
                if self.offline() {
                    tracing::info!(serial, "offline relay: serving the saved manifest (imports bring new ones)");
                } else {
                    tracing::info!(serial, "serving the saved manifest until the first sync");
                }
                Some(serial)
            }
            Ok(None) => None,
            Err(e @ pair::LoadError::Refused { .. }) => {
                tracing::warn!(error = %e, "saved manifest does not verify under the configured key (key changed?); ignoring it");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the saved manifest; waiting for the first sync");
                None
            }
        }
    }

    /// Adopt an import staged by `patchrelay import`, if one waits (see the
    /// module comment). Returns whether one was adopted.
    pub async fn adopt_import(&self) -> bool {
        let staging = Staging::of(self.store.root());
        if !staging.pending() {
            return false;
        }
        let _serial = self.lock.lock().await;
        let current = self.published.current();
        let (store, key, deltas, st) = (self.store.clone(), self.key.clone(), self.deltas.clone(), staging.clone());
        let cur = current.clone();
        let result = crate::telemetry::spawn_blocking(move || {
            let mut record = |d: &StagedDelta| -> std::io::Result<()> {
                let info = DeltaInfo { sha256: d.sha256, size: d.size };
                match &deltas {
                    Some(service) => service.record(&d.from, &d.to, info),
                    None => crate::actors::deltas::save_index_entry(&store.state_dir(), &d.from, &d.to, &info),
                }
            };
            stage::adopt(&st, &store, &key, cur.as_deref(), &mut record)
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(e) => Err(Box::new(stage::Refused {
                id: None,
                serial: None,
                error: crate::airgap::AirgapError::Failed(format!("the adoption task failed: {e}")),
            })),
        };
        let outcome = stage::outcome(&result);
        match result {
            Ok(None) => return false,
            Ok(Some(adopted)) if adopted.changed => {
                let added = added_versions(current.as_ref().map(|c| &c.manifest), &adopted.catalog.manifest);
                metrics::counter!(telemetry::SYNC_CHANGES, "change" => "added").increment(added.len() as u64);
                let catalog = Arc::new(adopted.catalog);
                self.prefetcher.plan(&catalog);
                self.published.publish(catalog.clone());
                self.published.mark_good_sync();
                tracing::info!(serial = catalog.serial(), previous = ?adopted.previous, added = ?added, "imported manifest verified and published");
                if let Some(events) = &self.events {
                    events.happened(crate::events::Say {
                        kind: "import",
                        severity: crate::events::Severity::Info,
                        key: format!("import:{}", catalog.serial()),
                        title: format!("import adopted: serial {}", catalog.serial()),
                        detail: format!("from serial {:?}; {} versions added", adopted.previous, added.len()),
                        action: "",
                        notify: false,
                    });
                }
            }
            Ok(Some(adopted)) => {
                tracing::info!(
                    serial = adopted.catalog.serial(),
                    "import of the serial already held: files it lacked taken in"
                );
            }
            Err(r) => {
                tracing::warn!(error = %r.error, "a staged import was refused");
                if let Some(events) = &self.events {
                    events.happened(crate::events::Say {
                        kind: "import_refused",
                        severity: crate::events::Severity::Warning,
                        key: format!("import_refused:{:?}", r.serial),
                        title: "a staged import was refused".into(),
                        detail: r.error.to_string(),
                        action: "`patchrelay import --status` says what the relay holds; bring a bundle that follows it.",
                        notify: true,
                    });
                }
            }
        }
        if let Some(o) = outcome {
            staging.finish(&o);
        }
        true
    }

    /// One sync: see the module comment.
    pub async fn run(&self) -> Result<SyncReport, SyncError> {
        if self.offline() {
            return Err(SyncError::Offline);
        }
        let _serial = self.lock.lock().await;
        let current = self.published.current();
        // Every available upstream, at once; when none is available, all of
        // them (a relay keeps trying rather than give up).
        let mut asked: Vec<Arc<Upstream>> = self.upstreams.candidates();
        if !self.upstreams.all_down() {
            asked.retain(|u| u.health().available);
        }
        let fetches = asked.iter().map(|up| {
            let (up, key) = (up.clone(), self.key.clone());
            // On the upstream runtime, where its connections live.
            crate::upstream::runtime::spawn(async move { repo::fetch_verified(&up, &key).await })
        });
        let results = futures_util::future::join_all(fetches).await;
        let mut skipped = Vec::new();
        // The best offer so far: (catalog, upstream); ties go to the earlier upstream.
        let mut best: Option<(Catalog, &Arc<Upstream>)> = None;
        for (up, result) in asked.iter().zip(results) {
            let catalog = match result {
                Ok(Ok(c)) => c,
                Ok(Err((reason, why))) => {
                    reject(self.events.as_deref(), up, reason, &why, &mut skipped);
                    continue;
                }
                Err(e) => {
                    reject(
                        self.events.as_deref(),
                        up,
                        "fetch_failed",
                        &format!("the fetch task failed: {e}"),
                        &mut skipped,
                    );
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
                    reject(self.events.as_deref(), up, "rollback", &why, &mut skipped);
                    continue;
                }
                if catalog.serial() == cur.serial() && catalog.manifest_digest != cur.manifest_digest {
                    let why = format!(
                        "offers different bytes under the serial {} we hold (equivocation refused)",
                        cur.serial()
                    );
                    reject(self.events.as_deref(), up, "equivocation", &why, &mut skipped);
                    continue;
                }
            }
            match &best {
                Some((b, _)) if catalog.serial() == b.serial() && catalog.manifest_digest != b.manifest_digest => {
                    let why = format!(
                        "offers different bytes than upstream {} under serial {} (equivocation refused)",
                        best.as_ref().map(|(_, u)| u.name.as_str()).unwrap_or_default(),
                        catalog.serial()
                    );
                    reject(self.events.as_deref(), up, "equivocation", &why, &mut skipped);
                }
                Some((b, _)) if catalog.serial() <= b.serial() => {}
                _ => best = Some((catalog, up)),
            }
        }
        let Some((catalog, up)) = best else {
            metrics::counter!(telemetry::SYNCS, "result" => "failed").increment(1);
            self.published.mark_failed_sync();
            tracing::warn!(serving = ?current.as_ref().map(|c| c.serial()), "sync failed on every upstream; still serving the last verified manifest");
            return Err(SyncError::NoAcceptableManifest(skipped));
        };
        if let Some(cur) = &current
            && catalog.manifest_digest == cur.manifest_digest
        {
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
        Ok(SyncReport {
            result: "updated",
            serial,
            previous_serial: current.as_ref().map(|c| c.serial()),
            source: up.name.clone(),
            added,
            skipped,
        })
    }

    async fn persist(&self, catalog: &Catalog) {
        let (path, m, s) = (self.bundle_path.clone(), catalog.manifest_bytes.clone(), catalog.signature.clone());
        let (history, serial) = (History::in_state(&self.store.state_dir()), catalog.serial());
        let result = crate::telemetry::spawn_blocking(move || {
            pair::save(&path, &m, &s)?;
            // For `export --since` (crate::airgap); the sync stands without it.
            if let Err(e) = history.save(serial, &m, &s) {
                tracing::warn!(dir = %history.dir().display(), error = %e, "cannot keep this manifest for `export --since`");
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = result.map_err(std::io::Error::other) {
            // Serve it anyway: failing to persist costs rollback protection across
            // a restart, not correctness now. Say so loudly.
            tracing::error!(path = %self.bundle_path.display(), error = %e, "cannot save the verified manifest (disk full?)");
        }
    }
}

fn reject(
    events: Option<&crate::events::Events>,
    up: &Upstream,
    reason: &'static str,
    why: &str,
    skipped: &mut Vec<String>,
) {
    metrics::counter!(telemetry::MANIFEST_REJECTED, "upstream" => up.name.clone(), "reason" => reason).increment(1);
    tracing::warn!(upstream = %up.name, reason, "manifest refused: {why}");
    // An upstream out of reach is the watcher's `upstream_down`; a manifest
    // that arrived and was refused is an attack or a broken publish.
    if let Some(events) = events
        && reason != "fetch_failed"
    {
        events.happened(crate::events::Say {
            kind: "manifest_rejected",
            severity: crate::events::Severity::Critical,
            key: format!("manifest_rejected:{}:{reason}", up.name),
            title: format!("manifest from upstream {} refused ({reason})", up.name),
            detail: why.to_string(),
            action: "The relay keeps serving its last verified manifest. Check that the upstream publishes with the key in [trust], and that nothing between alters or replays what it serves.",
            notify: true,
        });
    }
    skipped.push(format!("{}: {why}", up.name));
}

/// Runs [`SyncContext::run`] at start, every `interval`, on [`SyncNow`], and
/// again after a backoff when a run fails.
pub struct RelaySync {
    ctx: SyncContext,
    interval: Duration,
    /// Failed runs in a row (0 after a good one).
    failures: u32,
    /// An import is being adopted (the next look waits for it).
    adopting: bool,
    /// The server's metrics scope (actors of several servers may share a thread).
    scope: telemetry::Scope,
}

/// How often the actor looks for a staged import (one `stat` each time).
const IMPORT_LOOK: Duration = Duration::from_secs(1);

/// The first retry after a failed sync; doubling from there.
const RETRY_FIRST: Duration = Duration::from_secs(1);

impl RelaySync {
    pub fn new(ctx: SyncContext, interval: Duration) -> Self {
        RelaySync { ctx, interval, failures: 0, adopting: false, scope: telemetry::scope::current() }
    }

    /// When to run next: the interval after a good run; after `failures` bad
    /// ones in a row, 1 s doubling, plus up to a quarter at random (so a fleet
    /// of relays whose parent went down does not come back in step), never
    /// more than the interval.
    fn next_delay(&self) -> Duration {
        if self.failures == 0 {
            return self.interval;
        }
        let base = RETRY_FIRST.saturating_mul(1u32 << (self.failures - 1).min(20));
        let mut b = [0u8; 2];
        let _ = getrandom::fill(&mut b);
        let jitter = base.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 4.0);
        (base + jitter).min(self.interval)
    }

    fn run_after(&mut self, delay: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(delay, |act, ctx| {
            let _in = telemetry::enter(act.scope);
            let sync = act.ctx.clone();
            // Errors are logged and counted inside run().
            let run = telemetry::scoped(async move { sync.run().await.is_ok() });
            ctx.spawn(run.into_actor(act).map(|ok, act, ctx| {
                act.failures = if ok { 0 } else { act.failures.saturating_add(1) };
                let next = act.next_delay();
                if !ok {
                    tracing::info!(retry_in_ms = next.as_millis() as u64, "sync failed; retrying");
                }
                act.run_after(next, ctx);
            }));
        });
    }
}

impl Actor for RelaySync {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if !self.ctx.offline() {
            self.run_after(Duration::ZERO, ctx);
        }
        ctx.run_interval(IMPORT_LOOK, |act, ctx| {
            if act.adopting {
                return;
            }
            let _in = telemetry::enter(act.scope);
            act.adopting = true;
            let sync = act.ctx.clone();
            let look = telemetry::scoped(async move { sync.adopt_import().await });
            ctx.spawn(look.into_actor(act).map(|_, act, _| act.adopting = false));
        });
    }
}

impl Handler<SyncNow> for RelaySync {
    type Result = ResponseFuture<Result<SyncReport, SyncError>>;

    fn handle(&mut self, _: SyncNow, _: &mut Self::Context) -> Self::Result {
        let _in = telemetry::enter(self.scope);
        let sync = self.ctx.clone();
        Box::pin(telemetry::scoped(async move { sync.run().await }))
    }
}

impl Handler<Stop> for RelaySync {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
