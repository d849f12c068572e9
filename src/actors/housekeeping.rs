//! The housekeeping actor: keep the store within its budget, precompute
//! critical deltas, prune the delta index, and (on a relay) retry failed
//! prefetches and clear partial files nobody will resume.
//!
//! Runs on a short tick because checking the budget is one atomic load; the
//! work itself (deleting files) happens only when there is some, off the
//! actor's thread. An origin runs one too when it keeps deltas in a store of
//! its own: its budget binds as a relay's does.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::Stop;
use super::deltas::DeltaService;
use super::prefetch::Prefetcher;
use crate::fill::Filler;
use crate::state::Published;
use crate::store::Store;

const TICK: Duration = Duration::from_secs(2);
/// Prefetch retries every this many ticks (failed ones wait a minute anyway).
const PREFETCH_EVERY: u64 = 15;
/// Delta precompute sweep every this many ticks (cheap when nothing is new).
const DELTAS_EVERY: u64 = 3;
/// Delta index pruning every this many ticks.
const PRUNE_EVERY: u64 = 150;
/// Partial-file cleanup every this many ticks.
const PARTIALS_EVERY: u64 = 300;
/// A partial file of an object no longer in the manifest is kept this long,
/// in case an upstream manifest briefly went back and forth.
const PARTIAL_GRACE: Duration = Duration::from_secs(3600);

/// What only a relay has to look after.
pub struct RelayParts {
    pub filler: Arc<Filler>,
    pub prefetcher: Arc<Prefetcher>,
}

pub struct Housekeeping {
    store: Store,
    /// Deltas to precompute, and how many versions are retained.
    deltas: Option<(Arc<DeltaService>, usize)>,
    relay: Option<RelayParts>,
    published: Arc<Published>,
    ticks: u64,
    evicting: bool,
    probing: bool,
    /// The server's metrics scope (actors of several servers may share a thread).
    scope: crate::telemetry::Scope,
}

impl Housekeeping {
    pub fn new(
        store: Store,
        relay: Option<RelayParts>,
        published: Arc<Published>,
        deltas: Option<(Arc<DeltaService>, usize)>,
    ) -> Self {
        Housekeeping {
            store,
            deltas,
            relay,
            published,
            ticks: 0,
            evicting: false,
            probing: false,
            scope: crate::telemetry::scope::current(),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let _in = crate::telemetry::enter(self.scope);
        self.ticks += 1;
        // A directory listing: off this thread, which other actors share.
        let store = self.store.clone();
        drop(crate::telemetry::spawn_blocking(move || store.count_partial_bytes()));
        if self.store.write_fault().is_some() && !self.probing {
            self.probing = true;
            let store = self.store.clone();
            let work = crate::telemetry::scoped(async move {
                crate::telemetry::spawn_blocking(move || store.probe_writable()).await
            });
            ctx.spawn(work.into_actor(self).map(|_, act, _| act.probing = false));
        }
        if self.store.over_budget() && !self.evicting {
            self.evicting = true;
            let store = self.store.clone();
            let work = crate::telemetry::scoped(async move {
                crate::telemetry::spawn_blocking(move || store.evict_over_budget()).await
            });
            ctx.spawn(work.into_actor(self).map(|_, act, _| act.evicting = false));
        }
        if let Some(relay) = &self.relay
            && self.ticks.is_multiple_of(PREFETCH_EVERY)
        {
            relay.prefetcher.sweep(false);
        }
        if let (Some((deltas, retain)), Some(catalog)) = (&self.deltas, self.published.current()) {
            if self.ticks.is_multiple_of(DELTAS_EVERY) {
                deltas.precompute(&catalog, *retain);
            }
            if self.ticks.is_multiple_of(PRUNE_EVERY) {
                let deltas = deltas.clone();
                ctx.spawn(
                    crate::telemetry::scoped(async move {
                        crate::telemetry::spawn_blocking(move || deltas.prune(&catalog)).await
                    })
                    .into_actor(self)
                    .map(|_, _, _| ()),
                );
            }
        }
        if self.ticks.is_multiple_of(PARTIALS_EVERY) {
            self.clean_partials();
        }
    }

    fn clean_partials(&self) {
        let Some(relay) = &self.relay else { return };
        let catalog = self.published.current();
        for (digest, _, modified) in self.store.partials() {
            if relay.filler.is_filling(&digest) {
                continue;
            }
            let complete = self.store.contains(&digest);
            let wanted = catalog.as_ref().is_some_and(|c| c.object(&digest).is_some());
            let stale = modified.elapsed().unwrap_or_default() > PARTIAL_GRACE;
            if complete || (!wanted && stale) {
                tracing::info!(object = %digest, complete, "removing a partial file nobody will resume");
                self.store.discard_partial(&digest);
            }
        }
    }
}

impl Actor for Housekeeping {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

impl Handler<Stop> for Housekeeping {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
