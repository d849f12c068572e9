//! The runtime that does upstream I/O and runs fills.
//!
//! hyper drives each pooled connection from a task on the runtime that opened
//! it. actix-web gives each HTTP worker its own single-threaded runtime, and
//! the actors live on another; a connection opened by a sync on the actor
//! thread and later reused by a fill would then only make progress when that
//! thread is free. So all upstream connections, and the fill tasks that read
//! them, live on one small multi-threaded runtime of their own: WAN-side work
//! never waits on agent-side work, and the other way round.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

/// Threads for upstream I/O, hashing and writing fills.
const THREADS: usize = 2;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The upstream runtime's handle (created on first use, one per process).
pub fn handle() -> Handle {
    RUNTIME
        .get_or_init(|| {
            Builder::new_multi_thread()
                .worker_threads(THREADS)
                .thread_name("patchrelay-upstream")
                .enable_all()
                .build()
                // Without threads there is nothing a relay can do; this only
                // fails when the OS refuses to create them at start-up.
                .unwrap_or_else(|e| panic!("cannot start the upstream runtime: {e}"))
        })
        .handle()
        .clone()
}

/// Run a task on the upstream runtime (in the metrics scope of the caller:
/// the runtime serves every server in the process).
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(crate::telemetry::scoped(f))
}

/// hyper's executor: connection tasks go to the upstream runtime.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamExecutor;

impl<F> hyper::rt::Executor<F> for UpstreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        spawn(fut);
    }
}
