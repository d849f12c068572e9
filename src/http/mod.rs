//! The hot path: routes, RFC 9110 byte serving, and the admin/observability
//! endpoints.
//!
//! Requests read the published catalog (an `ArcSwap` load, no lock), decide what
//! to send from metadata, and only then open bytes through [`Source`]. No actor
//! sits on this path; the only actor message sent from here is the operator's
//! `POST /admin/sync`.

pub mod access;
pub mod body;
pub mod conditional;
pub mod conn;
pub mod console;
pub mod error;
mod fleet;
pub mod proxy;
pub mod range;
pub mod respond;
mod routes;

use std::sync::Arc;

use actix::Recipient;
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::actors::SyncNow;
use crate::actors::deltas::DeltaService;
use crate::actors::status::StatusSource;
use crate::limits::Limits;
use crate::source::Source;
use crate::state::Published;
use crate::telemetry::{self, Tally};

pub use routes::{configure, configure_admin};

/// The control plane as the HTTP room sees it.
pub struct Services {
    pub sync: Option<Recipient<SyncNow>>,
    pub status: Option<Arc<StatusSource>>,
    pub deltas: Option<Arc<DeltaService>>,
    pub limits: Option<&'static Limits>,
}

/// Everything a request handler may use. Shared by all workers.
pub struct AppState {
    pub published: Arc<Published>,
    pub source: Source,
    /// What responses check when they end early (`source::Check`).
    pub checks: &'static crate::source::Checks,
    /// `Cache-Control` for the manifest, its signature and `latest`.
    pub short_cache: HeaderValue,
    pub boundary: String,
    pub admin_token: Option<String>,
    pub sync: Option<Recipient<SyncNow>>,
    /// `/admin/status` (relays).
    pub status: Option<Arc<StatusSource>>,
    /// Deltas and plans (absent when off).
    pub deltas: Option<Arc<DeltaService>>,
    /// Per-agent limits (absent when no policy is configured).
    pub limits: Option<&'static Limits>,
    /// `None` when `[metrics] enabled = false`.
    pub metrics: Option<PrometheusHandle>,
    /// The largest body piece (`body::piece_cap` of `server.send_buffer`).
    pub max_piece: usize,
    /// The access log is on: routes note what the cache did for it.
    pub access_log: bool,
    /// Who an agent is (`crate::identity`), for the fleet inventory.
    pub identify: crate::identity::Identify,
    /// The fleet inventory (absent when `[fleet] enabled = false`).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Downstream sites allowed to report here: (name, token).
    pub site_tokens: Vec<(String, String)>,
    /// The event log (console, `/admin/events`).
    pub events: Option<Arc<crate::events::Events>>,
    /// Requests and bytes a second, for the console.
    pub traffic: console::Traffic,
    routes: Vec<RouteMetrics>,
}

impl AppState {
    pub fn new(
        published: Arc<Published>,
        source: Source,
        manifest_max_age: std::time::Duration,
        admin_token: Option<String>,
        control: Services,
        metrics: Option<PrometheusHandle>,
    ) -> AppState {
        let Services { sync, status, deltas, limits } = control;
        let mut salt = [0u8; 12];
        // A fixed fallback boundary is still valid MIME; randomness only makes a
        // collision with payload bytes less likely.
        let _ = getrandom::fill(&mut salt);
        let short_cache = HeaderValue::from_str(&format!("public, max-age={}", manifest_max_age.as_secs()))
            .unwrap_or_else(|_| HeaderValue::from_static("no-cache"));
        let checks = source.checks(deltas.as_ref().map(|d| d.store()));
        AppState {
            published,
            source,
            checks,
            short_cache,
            boundary: format!("patchrelay-{}", hex::encode(salt)),
            admin_token,
            sync,
            status,
            deltas,
            limits,
            metrics,
            max_piece: body::READ_SIZE,
            access_log: false,
            identify: crate::identity::Identify::new(
                crate::identity::IdentityKind::Header,
                actix_web::http::header::HeaderName::from_static("x-agent-id"),
                Vec::new(),
                crate::identity::Forwarded::XForwardedFor,
            ),
            fleet: None,
            site_tokens: Vec::new(),
            events: None,
            traffic: console::Traffic::default(),
            routes: Route::ALL.iter().map(|r| RouteMetrics::new(r.label())).collect(),
        }
    }

    fn route(&self, route: Route) -> &RouteMetrics {
        &self.routes[route as usize]
    }

    /// Requests answered, body bytes sent, and 429s, since start (summed
    /// from the routes' tallies: statuses outside the common ones are left
    /// out, which the console's rates can afford).
    pub fn traffic_totals(&self) -> [u64; 3] {
        let mut t = [0u64; 3];
        for r in &self.routes {
            t[1] += r.bytes.total();
            for (status, c) in &r.by_status {
                let n = c.total();
                t[0] += n;
                if *status == 429 {
                    t[2] += n;
                }
            }
        }
        t
    }
}

/// Route labels for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Manifest,
    Signature,
    Object,
    Chunks,
    Version,
    Latest,
    Chain,
    Delta,
    AdminSync,
    AdminStatus,
    AdminFleet,
    AdminFleetAgents,
    AdminFleetReport,
    AdminEvents,
    Console,
    ConsoleAction,
    Metrics,
    Health,
    Ready,
    Unmatched,
}

impl Route {
    const ALL: [Route; 20] = [
        Route::Manifest,
        Route::Signature,
        Route::Object,
        Route::Chunks,
        Route::Version,
        Route::Latest,
        Route::Chain,
        Route::Delta,
        Route::AdminSync,
        Route::AdminStatus,
        Route::AdminFleet,
        Route::AdminFleetAgents,
        Route::AdminFleetReport,
        Route::AdminEvents,
        Route::Console,
        Route::ConsoleAction,
        Route::Metrics,
        Route::Health,
        Route::Ready,
        Route::Unmatched,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Route::Manifest => "manifest",
            Route::Signature => "signature",
            Route::Object => "object",
            Route::Chunks => "chunks",
            Route::Version => "version",
            Route::Latest => "latest",
            Route::Chain => "chain",
            Route::Delta => "delta",
            Route::AdminSync => "admin_sync",
            Route::AdminStatus => "admin_status",
            Route::AdminFleet => "admin_fleet",
            Route::AdminFleetAgents => "admin_fleet_agents",
            Route::AdminFleetReport => "admin_fleet_report",
            Route::AdminEvents => "admin_events",
            Route::Console => "console",
            Route::ConsoleAction => "console_action",
            Route::Metrics => "metrics",
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::Unmatched => "unmatched",
        }
    }
}

/// Tallies for one route, resolved at start so that counting a request costs
/// an add to this worker's cell, not a label lookup (`telemetry::tally`).
/// A response holds a plain `&'static` to its byte tally, not a counter
/// handle whose reference count every response would bump and drop.
struct RouteMetrics {
    route: &'static str,
    bytes: &'static Tally,
    by_status: Vec<(u16, &'static Tally)>,
}

/// Statuses patchrelay answers with; others are counted through a slower path.
const COMMON_STATUSES: [u16; 15] = [200, 206, 304, 400, 401, 403, 404, 405, 412, 416, 429, 500, 502, 503, 504];

impl RouteMetrics {
    fn new(route: &'static str) -> Self {
        let by_status = COMMON_STATUSES
            .iter()
            .map(|&s| (s, telemetry::tally(telemetry::HTTP_REQUESTS, &[("route", route), ("status", &s.to_string())])))
            .collect();
        RouteMetrics { route, bytes: telemetry::tally(telemetry::HTTP_RESPONSE_BYTES, &[("route", route)]), by_status }
    }

    fn count(&self, status: StatusCode) {
        let code = status.as_u16();
        match self.by_status.iter().find(|(s, _)| *s == code) {
            Some((_, c)) => c.add(1),
            None => metrics::counter!(telemetry::HTTP_REQUESTS, "route" => self.route, "status" => code.to_string())
                .increment(1),
        }
    }
}
