//! Metrics and logs: every metric name patchrelay exports is declared here, with
//! its help text and unit, so `/metrics` is documented in one place (and the
//! README's table can be checked against it).
//!
//! Each server has a Prometheus recorder of its own (see [`scope`]), so
//! `/metrics` shows that server's counts even when a process runs several, as
//! the integration tests do.

use std::time::Duration;

pub mod scope;
mod tally;
pub use scope::{Scope, enter, scoped, spawn_blocking};
pub use tally::{Tally, publish as publish_tallies, tally};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{LogConfig, LogFormat};

pub const HTTP_REQUESTS: &str = "patchrelay_http_requests_total";
pub const HTTP_RESPONSE_BYTES: &str = "patchrelay_http_response_body_bytes_total";
pub const CACHE_HITS: &str = "patchrelay_cache_hits_total";
pub const CACHE_MISSES: &str = "patchrelay_cache_misses_total";
pub const UPSTREAM_REQUESTS: &str = "patchrelay_upstream_requests_total";
pub const UPSTREAM_BYTES: &str = "patchrelay_upstream_body_bytes_total";
pub const UPSTREAM_ERRORS: &str = "patchrelay_upstream_errors_total";
pub const UPSTREAM_LATENCY: &str = "patchrelay_upstream_response_seconds";
pub const UPSTREAM_UP: &str = "patchrelay_upstream_up";
pub const UPSTREAM_INTEGRITY_FAILURES: &str = "patchrelay_upstream_integrity_failures_total";
pub const FILLS: &str = "patchrelay_fills_total";
pub const FILLS_IN_FLIGHT: &str = "patchrelay_fills_in_flight";
pub const FILL_WAITERS: &str = "patchrelay_fill_waiters_total";
pub const FILL_RESUMES: &str = "patchrelay_fill_resumes_total";
pub const PREFETCHES: &str = "patchrelay_prefetches_total";
pub const DEGRADED: &str = "patchrelay_degraded";
pub const SYNC_CHANGES: &str = "patchrelay_sync_changes_total";
pub const MANIFEST_SERIAL: &str = "patchrelay_manifest_serial";
pub const MANIFEST_REJECTED: &str = "patchrelay_manifest_rejected_total";
pub const SYNCS: &str = "patchrelay_syncs_total";
pub const LAST_GOOD_SYNC: &str = "patchrelay_last_good_sync_timestamp_seconds";
pub const SINCE_GOOD_SYNC: &str = "patchrelay_seconds_since_last_good_sync";
pub const MANIFEST_AGE: &str = "patchrelay_manifest_age_seconds";
pub const STORE_OBJECTS: &str = "patchrelay_store_objects";
pub const STORE_BYTES: &str = "patchrelay_store_bytes";
pub const STORE_EVICTIONS: &str = "patchrelay_store_evictions_total";
pub const STORE_EVICTED_BYTES: &str = "patchrelay_store_evicted_bytes_total";
pub const STORE_OVER_BUDGET: &str = "patchrelay_store_over_budget_total";
pub const DELTAS_BUILT: &str = "patchrelay_deltas_built_total";
pub const DELTA_BUILD_SECONDS: &str = "patchrelay_delta_build_seconds";
pub const DELTA_SYNC: &str = "patchrelay_delta_sync_total";
pub const DELTA_SYNC_BYTES: &str = "patchrelay_delta_sync_bytes_total";
pub const DELTA_SYNC_SAVED: &str = "patchrelay_delta_sync_saved_bytes_total";
pub const AGENT_LAG: &str = "patchrelay_agent_version_lag";
pub const AGENT_UNKNOWN: &str = "patchrelay_agent_unknown_version_total";
pub const PLANS: &str = "patchrelay_plans_total";
pub const LIMIT_ACTIVE_AGENTS: &str = "patchrelay_limit_active_agents";
pub const LIMIT_TRACKED_AGENTS: &str = "patchrelay_limit_tracked_agents";
pub const CONNECTIONS_REFUSED: &str = "patchrelay_connections_refused_total";
pub const STORE_FAULTS: &str = "patchrelay_store_faults_total";
pub const STORE_WRITABLE: &str = "patchrelay_store_writable";
pub const LIMIT_REFUSALS: &str = "patchrelay_limit_refusals_total";
pub const LIMIT_EGRESS: &str = "patchrelay_limit_egress_bytes_total";
pub const LIMIT_THROTTLED_BYTES: &str = "patchrelay_limit_throttled_bytes_total";
pub const LIMIT_WAIT: &str = "patchrelay_limit_wait_seconds";
pub const BUILD_INFO: &str = "patchrelay_build_info";
pub const TLS_RELOADS: &str = "patchrelay_tls_reloads_total";
pub const ACCESS_LOG_DROPPED: &str = "patchrelay_access_log_dropped_total";
pub const ALERTS_SENT: &str = "patchrelay_alerts_sent_total";
pub const ALERTS_FAILED: &str = "patchrelay_alerts_failed_total";
pub const ALERTS_DROPPED: &str = "patchrelay_alerts_dropped_total";

fn recorder() -> Result<metrics_exporter_prometheus::PrometheusRecorder, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(Matcher::Full(AGENT_LAG.into()), &[0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0])
        .map_err(|e| e.to_string())?;
    Ok(builder.build_recorder())
}

/// A new server's metrics: its scope, and the handle that renders them
/// (`None`, and the scope that records nothing, when `enabled` is false).
pub fn new_scope(enabled: bool) -> Result<(Scope, Option<PrometheusHandle>), String> {
    if !enabled {
        return Ok((scope::OFF, None));
    }
    let mut first = None;
    let router = scope::Router::get(|| {
        let r = recorder();
        let fallback = PrometheusBuilder::new().build_recorder();
        match r {
            Ok(r) => r,
            Err(e) => {
                first = Some(e);
                fallback
            }
        }
    })?;
    if let Some(e) = first {
        return Err(e);
    }
    let rec = recorder()?;
    let handle = rec.handle();
    let scope = router.add(rec);
    let _in = enter(scope);
    describe();
    Ok((scope, Some(handle)))
}

fn describe() {
    describe_counter!(ACCESS_LOG_DROPPED, "Access log lines dropped because the writer could not keep up.");
    describe_counter!(ALERTS_SENT, "Alerts delivered, by channel.");
    describe_counter!(ALERTS_FAILED, "Alert deliveries given up after their retries, by channel.");
    describe_counter!(ALERTS_DROPPED, "Alerts not queued because the channels were that far behind.");
    describe_counter!(TLS_RELOADS, "Loads of changed TLS files for the listeners, by result (ok, refused).");
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status.");
    describe_counter!(HTTP_RESPONSE_BYTES, Unit::Bytes, "Response body bytes sent to clients, by route.");
    describe_counter!(CACHE_HITS, "Object requests served from the local store, by kind (object, chunks).");
    describe_counter!(CACHE_MISSES, "Object requests that needed an upstream fetch, by kind.");
    describe_counter!(UPSTREAM_REQUESTS, "Requests sent upstream, by upstream and status.");
    describe_counter!(UPSTREAM_BYTES, Unit::Bytes, "Body bytes received from upstreams, by upstream.");
    describe_counter!(UPSTREAM_ERRORS, "Failed upstream requests, by upstream and kind.");
    describe_histogram!(
        UPSTREAM_LATENCY,
        Unit::Seconds,
        "Time from sending an upstream request to its response headers."
    );
    describe_gauge!(UPSTREAM_UP, "1 while the upstream is not backed off, 0 while it is (failures or suspect).");
    describe_counter!(
        UPSTREAM_INTEGRITY_FAILURES,
        "Blocks or objects from an upstream that failed SHA-256 verification, by upstream."
    );
    describe_counter!(FILLS, "Objects pulled through from upstream, by result (ok, failed).");
    describe_gauge!(FILLS_IN_FLIGHT, "Upstream fetches running now.");
    describe_counter!(FILL_WAITERS, "Requests that attached to a fill already running instead of starting one.");
    describe_counter!(
        FILL_RESUMES,
        "Fetches resumed from a byte offset (after a cut, a failover or a restart), by upstream."
    );
    describe_counter!(PREFETCHES, "Prefetches of critical components' versions, by result (ok, failed).");
    describe_gauge!(DEGRADED, "1 while no upstream gives an acceptable manifest (serving from cache), else 0.");
    describe_counter!(SYNC_CHANGES, "Versions added to or removed from the manifest by syncs, by change.");
    describe_gauge!(MANIFEST_SERIAL, "Serial of the manifest being served.");
    describe_counter!(MANIFEST_REJECTED, "Manifests refused, by upstream and reason.");
    describe_counter!(SYNCS, "Sync attempts, by result (updated, unchanged, failed).");
    describe_gauge!(LAST_GOOD_SYNC, Unit::Seconds, "Unix time of the last sync that got a verified manifest.");
    describe_gauge!(SINCE_GOOD_SYNC, Unit::Seconds, "Seconds since the last sync that got a verified manifest.");
    describe_gauge!(
        MANIFEST_AGE,
        Unit::Seconds,
        "Seconds since the manifest being served was published (its generated_at)."
    );
    describe_gauge!(STORE_OBJECTS, "Complete objects in the local store.");
    describe_gauge!(STORE_BYTES, Unit::Bytes, "Bytes of complete objects in the local store.");
    describe_counter!(STORE_EVICTIONS, "Objects evicted to stay under storage.max_size.");
    describe_counter!(STORE_EVICTED_BYTES, Unit::Bytes, "Bytes evicted to stay under storage.max_size.");
    describe_counter!(
        STORE_OVER_BUDGET,
        "Eviction passes that could not get under storage.max_size because pinned objects fill it."
    );
    describe_counter!(DELTAS_BUILT, "Deltas computed and stored.");
    describe_histogram!(DELTA_BUILD_SECONDS, Unit::Seconds, "Time to compute and store one delta.");
    describe_counter!(DELTA_SYNC, "Relay syncs of a version by delta from its upstream, by result (ok, fallback).");
    describe_counter!(DELTA_SYNC_BYTES, Unit::Bytes, "Delta bytes fetched from upstreams by relay syncs.");
    describe_counter!(
        DELTA_SYNC_SAVED,
        Unit::Bytes,
        "Upstream bytes relay syncs avoided by fetching deltas instead of full files."
    );
    describe_histogram!(
        AGENT_LAG,
        "Versions behind the latest that agents report when they ask for an update plan, by component."
    );
    describe_counter!(AGENT_UNKNOWN, "Plan requests from a version not in the manifest, by component.");
    describe_counter!(PLANS, "Update plans served, by kind of cheapest first step (none, delta, full).");
    describe_gauge!(LIMIT_ACTIVE_AGENTS, "Agents with a download in progress (under a limit policy).");
    describe_counter!(
        STORE_FAULTS,
        "Stored objects found damaged or gone (missing, length, read_error), and writes the store could not make (write)."
    );
    describe_gauge!(STORE_WRITABLE, "1 while the store can write; 0 while misses are passed through from memory.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections shut as they were accepted (per_address: over server.max_connections_per_address)."
    );
    describe_gauge!(LIMIT_TRACKED_AGENTS, "Agents whose state the limits hold (seen within limits.idle_ttl).");
    describe_counter!(LIMIT_REFUSALS, "Downloads refused with 429, by policy and reason (concurrency, window).");
    describe_counter!(LIMIT_EGRESS, Unit::Bytes, "Bytes sent under each limit policy.");
    describe_counter!(
        LIMIT_THROTTLED_BYTES,
        Unit::Bytes,
        "Bytes that had to wait for their agent's (or the total) rate, by policy."
    );
    describe_histogram!(
        LIMIT_WAIT,
        Unit::Seconds,
        "Waits imposed on pieces of a download by rate limits, by policy; the sum is the total time throttled."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which patchrelay this is.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Housekeeping the exporter needs (it drains histogram buffers); run it on a timer.
pub fn upkeep_interval() -> Duration {
    Duration::from_secs(5)
}

/// Start logging to stderr. Later calls (several servers in one test process)
/// keep the first subscriber.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PATCHRELAY_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match cfg.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
