//! Alerts as JSON to an HTTP(S) endpoint (chat and paging tools take these).
//!
//! The body (README, "Alerts"):
//!
//! ```json
//! {"source": "patchrelay", "server": {"name": "site-a", "role": "relay"},
//!  "time": "2026-12-07T10:00:00Z",
//!  "event": {"seq": 7, "at": 1796637600, "kind": "critical_version",
//!            "severity": "info", "key": "...", "phase": "happened",
//!            "title": "...", "detail": "...", "action": "...", "notify": true},
//!  "text": "the same, as plain text"}
//! ```
//!
//! With a `secret_file`, `X-Patchrelay-Signature: sha256=<hex>` carries the
//! HMAC-SHA256 of the body under that key: the receiver recomputes it over
//! the bytes it got (and may refuse a `time` too far in the past).

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use super::{AlertError, DeliveryError, Sender};
use crate::config::WebhookConfig;
use crate::events::Event;

/// A receiver gets this long to answer.
const TIMEOUT: Duration = Duration::from_secs(15);

pub struct Webhook {
    uri: http::Uri,
    secret: Option<String>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Webhook {
    pub fn new(c: &WebhookConfig) -> Result<Webhook, AlertError> {
        let setup = |message: String| AlertError::WebhookSetup { url: c.url.clone(), message };
        let uri: http::Uri = c.url.parse().map_err(|e| setup(format!("not a URL: {e}")))?;
        let tls = crate::tls::client_config(&crate::tls::UpstreamTls {
            name: &c.url,
            ca: c.ca.as_deref(),
            web_roots: c.ca.is_none(),
            client: None,
        })
        .map_err(|e| setup(e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        Ok(Webhook { uri, secret: c.secret.as_ref().map(|s| s.0.clone()), client })
    }

    /// The channel's name in logs and metrics: the URL without its path,
    /// which may hold a chat tool's secret.
    pub fn name(&self) -> String {
        format!(
            "webhook {}://{}",
            self.uri.scheme_str().unwrap_or("http"),
            self.uri.authority().map(|a| a.as_str()).unwrap_or("")
        )
    }

    pub async fn deliver(&self, event: &Event, from: &Sender) -> Result<(), DeliveryError> {
        let body = Bytes::from(body(event, from));
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&self.uri)
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(header::USER_AGENT, HeaderValue::from_static(concat!("patchrelay/", env!("CARGO_PKG_VERSION"))))
            .header("x-patchrelay-event", event.kind.as_str())
            .header("x-patchrelay-delivery", event.seq.to_string());
        if let Some(secret) = &self.secret {
            req = req.header("x-patchrelay-signature", format!("sha256={}", sign(secret.as_bytes(), &body)));
        }
        let req = req.body(Full::new(body)).map_err(|e| DeliveryError { message: e.to_string(), permanent: true })?;
        let res = match tokio::time::timeout(TIMEOUT, self.client.request(req)).await {
            Err(_) => return Err(transient(format!("{}: no answer within {TIMEOUT:?}", self.name()))),
            Ok(Err(e)) => return Err(transient(format!("{}: {}", self.name(), crate::upstream::error_chain(&e)))),
            Ok(Ok(res)) => res,
        };
        let status = res.status();
        let _ = tokio::time::timeout(TIMEOUT, res.into_body().collect()).await;
        match status.as_u16() {
            200..=299 => Ok(()),
            // Throttled, or the receiver's own trouble: worth another try.
            408 | 429 | 500..=599 => Err(transient(format!("{} answered {status}", self.name()))),
            _ => Err(DeliveryError {
                message: format!("{} answered {status}: the URL or its secret is wrong", self.name()),
                permanent: true,
            }),
        }
    }
}

fn transient(message: String) -> DeliveryError {
    DeliveryError { message, permanent: false }
}

/// The JSON body (see the module comment).
pub fn body(event: &Event, from: &Sender) -> Vec<u8> {
    let doc = serde_json::json!({
        "source": "patchrelay",
        "server": from,
        "time": super::rfc3339(event.at),
        "event": event,
        "text": super::plain_text(event, from),
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// HMAC-SHA256 of `body` under `key`, in hex.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
