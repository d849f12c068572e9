//! Conditional requests (RFC 9110 §13): `If-Match`, `If-None-Match`,
//! `If-Modified-Since`, `If-Unmodified-Since` and `If-Range`.
//!
//! Every representation patchrelay serves has a strong validator, the SHA-256 of
//! its bytes, so these checks are exact: an agent resuming with `If-Range` gets
//! the rest of the same bytes or the whole new ones, never a splice of two.

use std::time::SystemTime;

use actix_web::http::header::{self, HeaderMap};

use crate::digest::Digest;

/// What the preconditions decide, before any range handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    Proceed,
    NotModified,
    Failed,
}

/// One entity tag from a list, e.g. `W/"abc"` or `"abc"`.
#[derive(Debug, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    opaque: &'a str,
}

/// Parse `#entity-tag` or `*`. Returns `None` for `*`; malformed members are
/// skipped (a tag we cannot read cannot match).
fn parse_list(value: &str) -> Option<Vec<EntityTag<'_>>> {
    if value.trim() == "*" {
        return None;
    }
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (weak, after) = match rest.strip_prefix("W/") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let Some(after_quote) = after.strip_prefix('"') else {
            // Not a tag: skip to the next comma.
            rest = after.split_once(',').map(|(_, r)| r).unwrap_or("");
            continue;
        };
        let Some(end) = after_quote.find('"') else { break };
        tags.push(EntityTag { weak, opaque: &after_quote[..end] });
        rest = &after_quote[end + 1..];
    }
    Some(tags)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn matches_any(value: &str, etag: &Digest, strong: bool) -> bool {
    let ours = etag.to_hex();
    match parse_list(value) {
        None => true,
        Some(tags) => tags.iter().any(|t| t.opaque == ours && (!strong || !t.weak)),
    }
}

fn parse_date(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value.trim()).ok()
}

/// Truncate to whole seconds: HTTP dates have no finer resolution.
fn seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Evaluate the preconditions in RFC 9110 §13.2.2 order. `safe` is true for GET
/// and HEAD (the only methods patchrelay serves bytes for).
pub fn evaluate(headers: &HeaderMap, etag: &Digest, modified: SystemTime, safe: bool) -> Precondition {
    if let Some(v) = header_str(headers, header::IF_MATCH) {
        if !matches_any(v, etag, true) {
            return Precondition::Failed;
        }
    } else if let Some(date) = header_str(headers, header::IF_UNMODIFIED_SINCE).and_then(parse_date)
        && seconds(modified) > seconds(date)
    {
        return Precondition::Failed;
    }
    if let Some(v) = header_str(headers, header::IF_NONE_MATCH) {
        if matches_any(v, etag, false) {
            return if safe { Precondition::NotModified } else { Precondition::Failed };
        }
    } else if safe
        && let Some(date) = header_str(headers, header::IF_MODIFIED_SINCE).and_then(parse_date)
        && seconds(modified) <= seconds(date)
    {
        return Precondition::NotModified;
    }
    Precondition::Proceed
}

/// Whether a `Range` header may be honoured given `If-Range` (RFC 9110 §13.1.5):
/// yes without `If-Range`; with it, only if it names our strong ETag or exactly
/// our `Last-Modified`.
pub fn if_range_allows(headers: &HeaderMap, etag: &Digest, modified: SystemTime, immutable: bool) -> bool {
    let Some(v) = headers.get(header::IF_RANGE) else {
        return true;
    };
    let Ok(v) = v.to_str() else { return false };
    let v = v.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        return match parse_list(v) {
            Some(tags) => tags.len() == 1 && !tags[0].weak && tags[0].opaque == etag.to_hex(),
            None => false,
        };
    }
    immutable && parse_date(v).is_some_and(|d| seconds(d) == seconds(modified))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};
    use std::time::Duration;

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn etag_lists() {
        let d = Digest::of(b"x");
        let ours = d.etag();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let eval = |pairs: &[(HeaderName, &str)]| evaluate(&headers(pairs), &d, t, true);
        assert_eq!(eval(&[]), Precondition::Proceed);
        assert_eq!(eval(&[(header::IF_NONE_MATCH, &ours)]), Precondition::NotModified);
        assert_eq!(eval(&[(header::IF_NONE_MATCH, &format!("\"a\", W/{ours}"))]), Precondition::NotModified);
        assert_eq!(eval(&[(header::IF_NONE_MATCH, "*")]), Precondition::NotModified);
        assert_eq!(eval(&[(header::IF_NONE_MATCH, "\"other\"")]), Precondition::Proceed);
        assert_eq!(eval(&[(header::IF_NONE_MATCH, "garbage, \"unterminated")]), Precondition::Proceed);
        assert_eq!(eval(&[(header::IF_MATCH, "\"other\"")]), Precondition::Failed);
        assert_eq!(eval(&[(header::IF_MATCH, &format!("W/{ours}"))]), Precondition::Failed);
        assert_eq!(eval(&[(header::IF_MATCH, &ours)]), Precondition::Proceed);
        let later = httpdate::fmt_http_date(t + Duration::from_secs(10));
        let earlier = httpdate::fmt_http_date(t - Duration::from_secs(10));
        assert_eq!(eval(&[(header::IF_MODIFIED_SINCE, &later)]), Precondition::NotModified);
        assert_eq!(eval(&[(header::IF_MODIFIED_SINCE, &earlier)]), Precondition::Proceed);
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(
            eval(&[(header::IF_NONE_MATCH, "\"o\""), (header::IF_MODIFIED_SINCE, &later)]),
            Precondition::Proceed
        );
        assert_eq!(eval(&[(header::IF_UNMODIFIED_SINCE, &earlier)]), Precondition::Failed);
    }

    #[test]
    fn if_range() {
        let d = Digest::of(b"x");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ok = |v: &str| if_range_allows(&headers(&[(header::IF_RANGE, v)]), &d, t, true);
        assert!(if_range_allows(&HeaderMap::new(), &d, t, true));
        // A date never validates a representation that can change.
        assert!(!if_range_allows(&headers(&[(header::IF_RANGE, &httpdate::fmt_http_date(t))]), &d, t, false));
        assert!(ok(&d.etag()));
        assert!(!ok(&format!("W/{}", d.etag())));
        assert!(!ok("\"stale\""));
        assert!(ok(&httpdate::fmt_http_date(t)));
        assert!(!ok(&httpdate::fmt_http_date(t + Duration::from_secs(1))));
        assert!(!ok("not a date"));
    }
}
