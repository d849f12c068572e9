//! Upstreams: the HTTP(S) client that fetches from an origin, another relay, or
//! any static web server hosting a repository.
//!
//! Faults are reported as [`UpstreamError`], which says which upstream, which
//! path, what went wrong and whether trying again (here or on the next upstream)
//! may help, so the fill and the sync can fail over and logs say where to look.
//! Each upstream tracks its own [`health`]; [`Upstreams::candidates`] gives the
//! order in which to try them.
//!
//! hyper 1 speaks `http` 1.x while actix-web speaks 0.2; nothing from an upstream
//! response is passed on to clients (every header patchrelay sends is its own),
//! so the two never meet and no conversion is needed.

mod connect;
pub mod health;
pub mod runtime;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::telemetry;
use connect::Connector;
use health::{Health, HealthReport};

/// Bodies are empty but for the few small POSTs (fleet reports upstream).
type HttpsClient = Client<hyper_rustls::HttpsConnector<Connector>, Full<Bytes>>;

/// The most memory a body read whole reserves before its bytes arrive.
const INITIAL_BODY_BUFFER: u64 = 1 << 20;

/// What relays call themselves upstream; `http::routes` recognises it to keep
/// relays out of the fleet statistics.
pub const RELAY_USER_AGENT: &str = concat!("patchrelay/", env!("CARGO_PKG_VERSION"));
/// What the reference agent calls itself.
pub const AGENT_USER_AGENT: &str = concat!("patchrelay-agent/", env!("CARGO_PKG_VERSION"));

/// What went wrong talking to an upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ErrorKind {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("response is {got} bytes, expected {expected}")]
    Length { expected: u64, got: u64 },
    #[error("response is over the {0}-byte limit")]
    TooLarge(u64),
    #[error("broken response: {0}")]
    Protocol(String),
}

impl ErrorKind {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ErrorKind::Connect(_) => "connect",
            ErrorKind::Timeout(_) => "timeout",
            ErrorKind::Status(_) => "status",
            ErrorKind::Length { .. } => "length",
            ErrorKind::TooLarge(_) => "too_large",
            ErrorKind::Protocol(_) => "protocol",
        }
    }

    /// Whether this says something about the upstream's health (as opposed to
    /// about one object, like a 404).
    fn is_health_fault(&self) -> bool {
        match self {
            ErrorKind::Connect(_) | ErrorKind::Timeout(_) | ErrorKind::Protocol(_) | ErrorKind::Length { .. } => true,
            ErrorKind::Status(s) => *s >= 500,
            ErrorKind::TooLarge(_) => false,
        }
    }
}

/// A fault at an upstream, with where it happened.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {upstream}: GET {path}: {kind}")]
pub struct UpstreamError {
    pub upstream: String,
    pub path: String,
    pub kind: ErrorKind,
}

impl UpstreamError {
    /// Whether asking again (later, or another upstream) may succeed. A 404 from
    /// one upstream may still be found at the next, so only client-side faults
    /// that would repeat everywhere are final.
    pub fn retryable(&self) -> bool {
        !matches!(self.kind, ErrorKind::Status(400 | 401 | 403 | 405 | 410 | 414 | 416))
    }
}

/// One configured upstream.
pub struct Upstream {
    pub name: String,
    pub url: UpstreamUrl,
    pub read_timeout: Duration,
    /// How long a fill may keep resuming (see `fill::task`).
    pub fill_deadline: Duration,
    client: HttpsClient,
    user_agent: &'static str,
    health: Health,
    /// Bounds the fills running against this upstream at once.
    fill_slots: Arc<Semaphore>,
    /// Metric handles resolved once (label lookups are not free per chunk).
    /// Build upstreams after the recorder is installed, or these are no-ops.
    bytes_received: metrics::Counter,
    latency: metrics::Histogram,
    up: metrics::Gauge,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("name", &self.name).field("url", &self.url.base).finish()
    }
}

/// The ordered list of upstreams.
#[derive(Debug)]
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
}

/// An upstream's TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: {source}")]
pub struct TlsSetupError {
    upstream: String,
    source: crate::tls::TlsError,
}

/// The TLS client for one upstream (`ca`, `web_roots`, `client_cert`).
fn tls_config(c: &UpstreamConfig) -> Result<rustls::ClientConfig, TlsSetupError> {
    let name = c.display_name();
    crate::tls::client_config(&crate::tls::UpstreamTls {
        name: &name,
        ca: c.ca.as_deref(),
        web_roots: c.web_roots.unwrap_or(c.ca.is_none()),
        client: c.client_cert.as_deref().zip(c.client_key.as_deref()),
    })
    .map_err(|source| TlsSetupError { upstream: name.clone(), source })
}

impl Upstreams {
    pub fn new(configs: &[UpstreamConfig]) -> Result<Upstreams, TlsSetupError> {
        Self::with_user_agent(configs, RELAY_USER_AGENT)
    }

    pub fn with_user_agent(configs: &[UpstreamConfig], user_agent: &'static str) -> Result<Upstreams, TlsSetupError> {
        let list = configs
            .iter()
            .map(|c| {
                let tls = tls_config(c)?;
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(c.connect_timeout.0));
                let proxy = c.proxy.as_ref().and_then(|p| p.base.parse::<http::Uri>().ok());
                let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
                // Checked a valid name by config validation; one that is not
                // (an embedder's config) leaves the URL's host in use.
                let fixed =
                    c.server_name.as_ref().and_then(|n| rustls::pki_types::ServerName::try_from(n.clone()).ok());
                let builder = match fixed {
                    Some(name) => builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name)),
                    None => builder,
                };
                let https = builder.enable_http1().enable_http2().wrap_connector(Connector::new(http, proxy));
                let client =
                    Client::builder(runtime::UpstreamExecutor).pool_idle_timeout(Duration::from_secs(60)).build(https);
                let name = c.display_name();
                let up = metrics::gauge!(telemetry::UPSTREAM_UP, "upstream" => name.clone());
                up.set(1.0);
                Ok(Arc::new(Upstream {
                    bytes_received: metrics::counter!(telemetry::UPSTREAM_BYTES, "upstream" => name.clone()),
                    latency: metrics::histogram!(telemetry::UPSTREAM_LATENCY, "upstream" => name.clone()),
                    up,
                    name,
                    url: c.url.clone(),
                    read_timeout: c.read_timeout.0,
                    fill_deadline: c.fill_deadline.0,
                    client,
                    user_agent,
                    health: Health::default(),
                    fill_slots: Arc::new(Semaphore::new(c.max_concurrent_fills.max(1))),
                }))
            })
            .collect::<Result<_, TlsSetupError>>()?;
        Ok(Upstreams { list })
    }

    pub fn list(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    /// The order to try upstreams in now: the available ones in configured
    /// order, then the backed-off ones, soonest retry first.
    pub fn candidates(&self) -> Vec<Arc<Upstream>> {
        let now = Instant::now();
        let (mut ready, mut waiting): (Vec<_>, Vec<_>) =
            self.list.iter().cloned().partition(|u| u.health.available(now));
        waiting.sort_by_key(|u| u.health.next_try(now));
        ready.append(&mut waiting);
        ready
    }

    /// How long a fill may take in all: the longest `fill_deadline`.
    pub fn fill_deadline(&self) -> Duration {
        self.list.iter().map(|u| u.fill_deadline).max().unwrap_or(Duration::from_secs(1800))
    }

    /// Whether every upstream is currently backed off.
    pub fn all_down(&self) -> bool {
        let now = Instant::now();
        !self.list.iter().any(|u| u.health.available(now))
    }
}

/// A response body being received, with the read timeout applied per frame.
pub struct Body {
    upstream: Arc<Upstream>,
    path: String,
    body: Incoming,
    /// `Content-Length`, when the upstream sent one.
    pub content_length: Option<u64>,
    /// Offset in the object of the first body byte: the requested offset for a
    /// 206, 0 for a 200 (an upstream may ignore `Range`).
    pub start: u64,
    /// The upstream's own validator, for `If-Range` on a later resume.
    pub etag: Option<String>,
    received: u64,
}

impl Upstream {
    fn err(&self, path: &str, kind: ErrorKind) -> UpstreamError {
        metrics::counter!(telemetry::UPSTREAM_ERRORS, "upstream" => self.name.clone(), "kind" => kind.label())
            .increment(1);
        if kind.is_health_fault() {
            self.health.record_failure(&kind.to_string());
            self.up.set(0.0);
        }
        UpstreamError { upstream: self.name.clone(), path: path.to_string(), kind }
    }

    /// Report bytes that failed verification: the upstream becomes suspect.
    pub fn record_integrity_failure(&self, what: &str) {
        metrics::counter!(telemetry::UPSTREAM_INTEGRITY_FAILURES, "upstream" => self.name.clone()).increment(1);
        self.health.record_integrity_failure(what);
        self.up.set(0.0);
        tracing::error!(upstream = %self.name, "upstream sent bytes that failed verification: {what}; marked suspect");
    }

    pub fn health(&self) -> HealthReport {
        self.health.report()
    }

    /// Wait for a fill slot on this upstream.
    pub async fn fill_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.fill_slots.clone().acquire_owned().await.ok()
    }

    /// `GET path` (relative to the upstream's base URL); the body on 200.
    pub async fn get(self: &Arc<Self>, path: &str) -> Result<Body, UpstreamError> {
        self.get_from(path, 0, None).await
    }

    /// `GET path` from byte `from` on (`Range: bytes=from-`, with `If-Range`
    /// when we hold this upstream's validator). The body on 200 or 206.
    pub async fn get_from(
        self: &Arc<Self>,
        path: &str,
        from: u64,
        if_range: Option<&str>,
    ) -> Result<Body, UpstreamError> {
        let url = self.url.join(path);
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .header(header::USER_AGENT, HeaderValue::from_static(self.user_agent))
            // Bytes are verified by digest: they must arrive exactly as stored.
            .header(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        if from > 0 {
            req = req.header(header::RANGE, format!("bytes={from}-"));
            if let Some(tag) = if_range {
                req = req.header(header::IF_RANGE, tag);
            }
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| self.err(path, ErrorKind::Protocol(e.to_string())))?;
        let started = Instant::now();
        let res = match tokio::time::timeout(self.read_timeout, self.client.request(req)).await {
            Err(_) => return Err(self.err(path, ErrorKind::Timeout(self.read_timeout))),
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    ErrorKind::Connect(error_chain(&e))
                } else {
                    ErrorKind::Protocol(error_chain(&e))
                };
                return Err(self.err(path, kind));
            }
            Ok(Ok(res)) => res,
        };
        let took = started.elapsed().as_secs_f64();
        self.latency.record(took);
        self.health.record_latency(took);
        let status = res.status();
        metrics::counter!(telemetry::UPSTREAM_REQUESTS, "upstream" => self.name.clone(), "status" => status.as_str().to_string())
            .increment(1);
        let start = match status {
            StatusCode::OK => 0,
            StatusCode::PARTIAL_CONTENT if from > 0 => {
                let range = res.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
                match parse_content_range_start(range) {
                    Some(s) if s == from => from,
                    _ => {
                        let why = format!("asked for bytes {from}-, got Content-Range {range:?}");
                        return Err(self.err(path, ErrorKind::Protocol(why)));
                    }
                }
            }
            s => return Err(self.err(path, ErrorKind::Status(s.as_u16()))),
        };
        if status.is_success() {
            self.health.record_ok();
            self.up.set(1.0);
        }
        let content_length =
            res.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let etag = res
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|t| t.starts_with('"'))
            .map(str::to_string);
        Ok(Body {
            upstream: self.clone(),
            path: path.to_string(),
            body: res.into_body(),
            content_length,
            start,
            etag,
            received: 0,
        })
    }

    /// `POST path` with a JSON body (and a bearer token); the status it
    /// answered. For the small reports a relay sends its parent, not bytes
    /// anyone waits on: bounded by the read timeout, the answer's body read
    /// and dropped.
    pub async fn post_json(
        self: &Arc<Self>,
        path: &str,
        json: Bytes,
        bearer: Option<&str>,
    ) -> Result<u16, UpstreamError> {
        let url = self.url.join(path);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(header::USER_AGENT, HeaderValue::from_static(self.user_agent))
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(token) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(json)).map_err(|e| self.err(path, ErrorKind::Protocol(e.to_string())))?;
        let res = match tokio::time::timeout(self.read_timeout, self.client.request(req)).await {
            Err(_) => return Err(self.err(path, ErrorKind::Timeout(self.read_timeout))),
            Ok(Err(e)) => return Err(self.err(path, ErrorKind::Connect(error_chain(&e)))),
            Ok(Ok(res)) => res,
        };
        let status = res.status().as_u16();
        let _ = tokio::time::timeout(self.read_timeout, res.into_body().collect()).await;
        Ok(status)
    }

    /// `GET path` and read the whole body, which must not exceed `limit` bytes.
    pub async fn get_bytes(self: &Arc<Self>, path: &str, limit: u64) -> Result<Bytes, UpstreamError> {
        let mut body = self.get(path).await?;
        if let Some(len) = body.content_length
            && len > limit
        {
            return Err(self.err(path, ErrorKind::TooLarge(limit)));
        }
        // Content-Length is the upstream's word: it may say a terabyte and
        // send nothing. The buffer starts at most at INITIAL_BODY_BUFFER and
        // grows with what actually arrives (never past `limit`).
        let mut out =
            BytesMut::with_capacity(body.content_length.unwrap_or(0).min(limit).min(INITIAL_BODY_BUFFER) as usize);
        while let Some(chunk) = body.next_chunk().await? {
            if (out.len() + chunk.len()) as u64 > limit {
                return Err(self.err(path, ErrorKind::TooLarge(limit)));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }
}

/// The first byte position of `bytes a-b/len`.
fn parse_content_range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

impl Body {
    /// The next piece of the body; `None` at the end. Each wait is bounded by the
    /// upstream's `read_timeout`, so a stalled upstream cannot hold a fill forever.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let frame = match tokio::time::timeout(self.upstream.read_timeout, self.body.frame()).await {
                Err(_) => {
                    return Err(self.upstream.err(&self.path, ErrorKind::Timeout(self.upstream.read_timeout)));
                }
                Ok(None) => {
                    if let Some(expected) = self.content_length
                        && expected != self.received
                    {
                        return Err(self.upstream.err(&self.path, ErrorKind::Length { expected, got: self.received }));
                    }
                    return Ok(None);
                }
                Ok(Some(Err(e))) => return Err(self.upstream.err(&self.path, ErrorKind::Protocol(error_chain(&e)))),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if data.is_empty() {
                    continue;
                }
                self.received += data.len() as u64;
                self.upstream.bytes_received.increment(data.len() as u64);
                return Ok(Some(data));
            }
            // Trailers: nothing we use.
        }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

/// An error and its sources on one line: hyper's top-level messages alone
/// ("client error (Connect)") do not say what happened.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_range_start() {
        assert_eq!(super::parse_content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(super::parse_content_range_start("bytes */1000"), None);
        assert_eq!(super::parse_content_range_start("items 1-2/3"), None);
    }
}
