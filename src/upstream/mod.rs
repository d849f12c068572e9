//! Upstreams: the HTTP(S) client that fetches from an origin, another relay, or
//! any static web server hosting a repository.
//!
//! Faults are reported as [`UpstreamError`], which says which upstream, which
//! path, what went wrong and whether trying again (here or on the next upstream)
//! may help, so the fill and the sync can fail over and logs say where to look.
//!
//! hyper 1 speaks `http` 1.x while actix-web speaks 0.2; nothing from an upstream
//! response is passed on to clients (every header patchrelay sends is its own),
//! so the two never meet and no conversion is needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::telemetry;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

const USER_AGENT: &str = concat!("patchrelay/", env!("CARGO_PKG_VERSION"));

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
    client: HttpsClient,
    /// Metric handles resolved once (label lookups are not free per chunk).
    /// Build upstreams after the recorder is installed, or these are no-ops.
    bytes_received: metrics::Counter,
    latency: metrics::Histogram,
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

/// Building the TLS client configuration failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for upstreams: {0}")]
pub struct TlsSetupError(String);

fn tls_config() -> Result<rustls::ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Upstreams {
    pub fn new(configs: &[UpstreamConfig]) -> Result<Upstreams, TlsSetupError> {
        let tls = tls_config()?;
        let list = configs
            .iter()
            .map(|c| {
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(c.connect_timeout.0));
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls.clone())
                    .https_or_http()
                    .enable_http1()
                    .enable_http2()
                    .wrap_connector(http);
                let client =
                    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(https);
                let name = c.display_name();
                Arc::new(Upstream {
                    bytes_received: metrics::counter!(telemetry::UPSTREAM_BYTES, "upstream" => name.clone()),
                    latency: metrics::histogram!(telemetry::UPSTREAM_LATENCY, "upstream" => name.clone()),
                    name,
                    url: c.url.clone(),
                    read_timeout: c.read_timeout.0,
                    client,
                })
            })
            .collect();
        Ok(Upstreams { list })
    }

    pub fn list(&self) -> &[Arc<Upstream>] {
        &self.list
    }
}

/// A response body being received, with the read timeout applied per frame.
pub struct Body {
    upstream: Arc<Upstream>,
    path: String,
    body: Incoming,
    /// `Content-Length`, when the upstream sent one.
    pub content_length: Option<u64>,
    received: u64,
}

impl Upstream {
    fn err(&self, path: &str, kind: ErrorKind) -> UpstreamError {
        metrics::counter!(telemetry::UPSTREAM_ERRORS, "upstream" => self.name.clone(), "kind" => kind.label())
            .increment(1);
        UpstreamError { upstream: self.name.clone(), path: path.to_string(), kind }
    }

    /// `GET path` (relative to the upstream's base URL); the response's body on 200.
    pub async fn get(self: &Arc<Self>, path: &str) -> Result<Body, UpstreamError> {
        let url = self.url.join(path);
        let req = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .header(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))
            // Bytes are verified by digest: they must arrive exactly as stored.
            .header(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.err(path, ErrorKind::Protocol(e.to_string())))?;
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
        self.latency.record(started.elapsed().as_secs_f64());
        let status = res.status();
        metrics::counter!(telemetry::UPSTREAM_REQUESTS, "upstream" => self.name.clone(), "status" => status.as_str().to_string()).increment(1);
        if status != StatusCode::OK {
            return Err(self.err(path, ErrorKind::Status(status.as_u16())));
        }
        let content_length =
            res.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        Ok(Body { upstream: self.clone(), path: path.to_string(), body: res.into_body(), content_length, received: 0 })
    }

    /// `GET path` and read the whole body, which must not exceed `limit` bytes.
    pub async fn get_bytes(self: &Arc<Self>, path: &str, limit: u64) -> Result<Bytes, UpstreamError> {
        let mut body = self.get(path).await?;
        if let Some(len) = body.content_length
            && len > limit
        {
            return Err(self.err(path, ErrorKind::TooLarge(limit)));
        }
        let mut out = BytesMut::with_capacity(body.content_length.unwrap_or(0).min(limit) as usize);
        while let Some(chunk) = body.next_chunk().await? {
            if (out.len() + chunk.len()) as u64 > limit {
                return Err(self.err(path, ErrorKind::TooLarge(limit)));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }
}

impl Body {
    /// The next piece of the body; `None` at the end. Each wait is bounded by the
    /// upstream's `read_timeout`, so a stalled upstream cannot hold a fill forever.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let frame = match tokio::time::timeout(self.upstream.read_timeout, self.body.frame()).await {
                Err(_) => return Err(self.upstream.err(&self.path, ErrorKind::Timeout(self.upstream.read_timeout))),
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

    pub fn upstream(&self) -> &str {
        &self.upstream.name
    }
}

/// An error and its sources on one line: hyper's top-level messages alone
/// ("client error (Connect)") do not say what happened.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
