//! The one place where errors become HTTP responses.
//!
//! Every error body is a small JSON object, `{"error": "<code>", "message": "…"}`:
//! the code is stable for scripts, the message says what happened and, where
//! it helps, what to do. Faults are classed as pingora does: the client's
//! (4xx), an upstream's (502/504: retry later, maybe elsewhere), or ours (500).

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

use crate::actors::deltas::DeltaBuildError;
use crate::fill::FillError;
use crate::source::SourceError;
use crate::upstream::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("delta: {0}")]
    Delta(#[from] crate::actors::deltas::DeltaBuildError),
    #[error("no verified manifest yet: this relay has not completed its first sync; retry shortly")]
    NotReady,
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("the admin API is disabled: set [admin] token_file (or token) in the config, or PATCHRELAY_ADMIN_TOKEN")]
    AdminDisabled,
    #[error("missing or wrong `Authorization: Bearer <token>` (or HTTP Basic, user `admin`, the token as password)")]
    Unauthorized,
    #[error("sync failed: {0}")]
    SyncFailed(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("range not satisfiable")]
    RangeNotSatisfiable(u64),
    #[error("a precondition (If-Match / If-Unmodified-Since) failed")]
    PreconditionFailed,
    #[error("{}; retry in {} s", .0.message, .0.retry_after.as_secs())]
    Limited(crate::limits::Refusal),
}

impl ApiError {
    /// What a client is told instead of the error itself, when the error is
    /// about this server or its upstreams rather than the request; `None`
    /// when the error's own message is for the client (its request, a limit,
    /// not ready yet) or the caller is the operator (the admin API).
    fn public_message(&self) -> Option<&'static str> {
        match self {
            ApiError::Source(SourceError::Fill(FillError::Offline(_))) => None,
            ApiError::Source(SourceError::Store(_)) | ApiError::Source(SourceError::Fill(FillError::Store(_))) => {
                Some("this server could not read or write its store; the error is in its log under this id")
            }
            ApiError::Source(SourceError::Fill(FillError::StoreFull(_))) => Some(
                "this relay cannot store right now and passes what it can through memory; that is taken: retry later",
            ),
            ApiError::Source(SourceError::Fill(e)) if all_timeouts(e) => {
                Some("no upstream answered in time; retry later (the details are in this server's log under this id)")
            }
            ApiError::Source(SourceError::Fill(_)) => Some(
                "no upstream could supply these bytes intact; retry later (the details are in this server's log under this id)",
            ),
            ApiError::Delta(DeltaBuildError::Object { .. }) => {
                Some("an end of this delta could not be fetched; use the full file, or retry later")
            }
            ApiError::Delta(DeltaBuildError::Encode(_) | DeltaBuildError::Store(_) | DeltaBuildError::NoBuilder) => {
                Some("building this delta failed; use the full file (the error is in this server's log under this id)")
            }
            _ => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Delta(DeltaBuildError::TooLarge { .. }) => "no_delta",
            ApiError::Delta(DeltaBuildError::Object { .. }) => "upstream_failed",
            ApiError::Delta(DeltaBuildError::Busy(_)) => "busy",
            ApiError::Delta(_) => "delta_failed",
            ApiError::NotReady => "not_ready",
            ApiError::Source(SourceError::Store(_)) => "store_error",
            ApiError::Source(SourceError::Fill(FillError::StoreFull(_))) => "store_full",
            ApiError::Source(SourceError::Fill(FillError::Offline(_))) => "not_found",
            ApiError::Source(SourceError::Fill(_)) => "upstream_failed",
            ApiError::AdminDisabled => "admin_disabled",
            ApiError::Unauthorized => "unauthorized",
            ApiError::SyncFailed(_) => "sync_failed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::RangeNotSatisfiable(_) => "range_not_satisfiable",
            ApiError::PreconditionFailed => "precondition_failed",
            ApiError::Limited(r) if r.reason == "window" => "outside_window",
            ApiError::Limited(r) if r.reason == "agents_per_address" => "too_many_agents",
            ApiError::Limited(_) => "too_many_downloads",
        }
    }
}

/// Whether every upstream attempt of a failed fill timed out.
fn all_timeouts(e: &FillError) -> bool {
    match e {
        FillError::Upstream(u) => matches!(u.kind, ErrorKind::Timeout(_)),
        FillError::AllFailed { attempts, timeouts_only, .. } => !attempts.is_empty() && *timeouts_only,
        _ => false,
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Delta(DeltaBuildError::TooLarge { .. }) => StatusCode::NOT_FOUND,
            ApiError::Delta(DeltaBuildError::Object { .. }) => StatusCode::BAD_GATEWAY,
            ApiError::Delta(DeltaBuildError::Busy(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Delta(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotReady | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Source(SourceError::Store(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Source(SourceError::Fill(FillError::Offline(_))) => StatusCode::NOT_FOUND,
            ApiError::Source(SourceError::Fill(e)) if all_timeouts(e) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Source(SourceError::Fill(FillError::Store(_))) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Source(SourceError::Fill(FillError::StoreFull(_))) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Source(SourceError::Fill(_)) => StatusCode::BAD_GATEWAY,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::SyncFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ApiError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let body = match self.public_message() {
            // Our own faults: the details (paths, OS errors, upstream names
            // and addresses) go to the log, not to whoever asked; the id
            // ties the two together.
            Some(message) => {
                let mut id = [0u8; 4];
                let _ = getrandom::fill(&mut id);
                let id = hex::encode(id);
                tracing::warn!(error = %self, status = status.as_u16(), id = %id, "request failed");
                serde_json::json!({ "error": self.code(), "message": message, "id": id })
            }
            None => {
                if status.is_server_error() {
                    tracing::debug!(error = %self, status = status.as_u16(), "request refused");
                }
                serde_json::json!({ "error": self.code(), "message": self.to_string() })
            }
        };
        let mut res = HttpResponse::build(status);
        res.insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
        match self {
            ApiError::NotReady | ApiError::Unavailable(_) => {
                res.insert_header((header::RETRY_AFTER, HeaderValue::from_static("5")));
            }
            ApiError::Delta(DeltaBuildError::Busy(_))
            | ApiError::Source(SourceError::Fill(FillError::StoreFull(_))) => {
                // Spread, so a refused wave does not come back in step.
                let mut b = [0u8; 1];
                let _ = getrandom::fill(&mut b);
                res.insert_header((header::RETRY_AFTER, (5 + u64::from(b[0] % 26)).to_string()));
            }
            ApiError::Limited(r) => {
                res.insert_header((header::RETRY_AFTER, r.retry_after.as_secs().to_string()));
            }
            ApiError::Unauthorized => {
                res.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            ApiError::RangeNotSatisfiable(len) => {
                res.insert_header((header::CONTENT_RANGE, format!("bytes */{len}")));
                res.insert_header((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")));
            }
            _ => {}
        }
        res.json(body)
    }
}
