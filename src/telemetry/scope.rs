//! Which server a metric belongs to.
//!
//! The `metrics` crate has one global recorder per process. A process that
//! runs several servers (the integration tests run an origin and relays side
//! by side, and tests in parallel) would have them all count into one
//! registry, and `/metrics` of one would show the others' counts. So the
//! global recorder is a [`Router`]: each server gets a Prometheus recorder of
//! its own and a scope number, and a metric goes to the recorder of the scope
//! current on the thread that records it.
//!
//! The scope is set where a server's code runs: on its HTTP workers for good
//! (they serve nothing else), around its actors' callbacks, and carried into
//! every task it spawns ([`scoped`], [`spawn_blocking`]), since the upstream
//! runtime and the blocking pool are shared by every server in the process.
//! Metric handles resolved once (most of the hot ones) are resolved while the
//! server starts, inside its scope. In production there is one server per
//! process and all of this routes to the one recorder.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;

/// A server's scope. 0: code outside any server (set-up, tests); [`OFF`]: a
/// server with `[metrics] enabled = false`, whose metrics go nowhere.
pub type Scope = u32;
pub const OFF: Scope = u32::MAX;

thread_local! {
    static CURRENT: Cell<Scope> = const { Cell::new(0) };
}

/// The scope current on this thread.
pub fn current() -> Scope {
    CURRENT.with(|c| c.get())
}

/// Make `scope` current on this thread from now on (an HTTP worker, which
/// serves one server for its whole life).
pub fn set_thread(scope: Scope) {
    CURRENT.with(|c| c.set(scope));
}

/// Make `scope` current until the guard is dropped.
pub fn enter(scope: Scope) -> Entered {
    Entered(CURRENT.with(|c| c.replace(scope)))
}

/// See [`enter`].
pub struct Entered(Scope);

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// `fut`, polled in the scope current now (wherever and whenever it runs).
pub fn scoped<F: Future>(fut: F) -> Scoped<F> {
    Scoped { scope: current(), fut: Box::pin(fut) }
}

/// See [`scoped`]. Boxed: spawned tasks (fills, syncs, builds) are few.
pub struct Scoped<F> {
    scope: Scope,
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let _in = enter(this.scope);
        this.fut.as_mut().poll(cx)
    }
}

/// `tokio::task::spawn_blocking`, in the scope current now.
pub fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let scope = current();
    tokio::task::spawn_blocking(move || {
        let _in = enter(scope);
        f()
    })
}

/// The process's global recorder: hands each metric to its scope's recorder.
pub struct Router {
    recorders: RwLock<Vec<Arc<PrometheusRecorder>>>,
}

static ROUTER: OnceLock<&'static Router> = OnceLock::new();

impl Router {
    /// The router, installed as the global recorder on first use, with the
    /// recorder of scope 0 (`default`).
    pub fn get(default: impl FnOnce() -> PrometheusRecorder) -> Result<&'static Router, String> {
        if let Some(r) = ROUTER.get() {
            return Ok(r);
        }
        let router: &'static Router = Box::leak(Box::new(Router { recorders: RwLock::new(vec![Arc::new(default())]) }));
        match ROUTER.set(router) {
            Ok(()) => {
                metrics::set_global_recorder(router)
                    .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
                Ok(router)
            }
            // Another thread won: use its router (this one is leaked, unused).
            Err(_) => ROUTER.get().copied().ok_or_else(|| "no metrics router".to_string()),
        }
    }

    /// Give `recorder` a scope of its own.
    pub fn add(&self, recorder: PrometheusRecorder) -> Scope {
        let mut all = self.recorders.write().unwrap_or_else(|p| p.into_inner());
        all.push(Arc::new(recorder));
        (all.len() - 1) as Scope
    }

    fn with<T>(&self, none: impl FnOnce() -> T, f: impl FnOnce(&PrometheusRecorder) -> T) -> T {
        let scope = current();
        if scope == OFF {
            return none();
        }
        let all = self.recorders.read().unwrap_or_else(|p| p.into_inner());
        match all.get(scope as usize).or_else(|| all.first()) {
            Some(r) => f(r),
            None => none(),
        }
    }
}

impl Recorder for &'static Router {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.with(|| (), |r| r.describe_counter(key, unit, description));
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.with(|| (), |r| r.describe_gauge(key, unit, description));
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.with(|| (), |r| r.describe_histogram(key, unit, description));
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.with(Counter::noop, |r| r.register_counter(key, metadata))
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.with(Gauge::noop, |r| r.register_gauge(key, metadata))
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.with(Histogram::noop, |r| r.register_histogram(key, metadata))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_follow_futures() {
        assert_eq!(current(), 0);
        {
            let _a = enter(3);
            assert_eq!(current(), 3);
            let fut = scoped(async { current() });
            {
                let _b = enter(5);
                assert_eq!(current(), 5);
                // Polled elsewhere, in the scope it was made in.
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(rt.block_on(fut), 3);
            }
            assert_eq!(current(), 3);
        }
        assert_eq!(current(), 0);
    }
}
