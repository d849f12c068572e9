//! The relay's housekeeping actor: keep the store within its budget, retry
//! failed prefetches, and clear partial files nobody will resume.
//!
//! Runs on a short tick because checking the budget is one atomic load; the
//! work itself (deleting files) happens only when there is some, off the
//! actor's thread.

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
/// Partial-file cleanup every this many ticks.
const PARTIALS_EVERY: u64 = 300;
/// A partial file of an object no longer in the manifest is kept this long,
/// in case an upstream manifest briefly went back and forth.
const PARTIAL_GRACE: Duration = Duration::from_secs(3600);

pub struct Housekeeping {
    store: Store,
    /// Deltas to precompute, and how many versions are retained.
    deltas: Option<(Arc<DeltaService>, usize)>,
    filler: Arc<Filler>,
    prefetcher: Arc<Prefetcher>,
    published: Arc<Published>,
    ticks: u64,
    evicting: bool,
}

impl Housekeeping {
    pub fn new(
        store: Store,
        filler: Arc<Filler>,
        prefetcher: Arc<Prefetcher>,
        published: Arc<Published>,
        deltas: Option<(Arc<DeltaService>, usize)>,
    ) -> Self {
        Housekeeping { store, deltas, filler, prefetcher, published, ticks: 0, evicting: false }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.ticks += 1;
        if self.store.over_budget() && !self.evicting {
            self.evicting = true;
            let store = self.store.clone();
            let work = async move { tokio::task::spawn_blocking(move || store.evict_over_budget()).await };
            ctx.spawn(work.into_actor(self).map(|_, act, _| act.evicting = false));
        }
        if self.ticks.is_multiple_of(PREFETCH_EVERY) {
            self.prefetcher.sweep(false);
        }
        if self.ticks.is_multiple_of(DELTAS_EVERY)
            && let (Some((deltas, retain)), Some(catalog)) = (&self.deltas, self.published.current())
        {
            deltas.precompute(&catalog, *retain);
        }
        if self.ticks.is_multiple_of(PARTIALS_EVERY) {
            self.clean_partials();
        }
    }

    fn clean_partials(&self) {
        let catalog = self.published.current();
        for (digest, _, modified) in self.store.partials() {
            if self.filler.is_filling(&digest) {
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
