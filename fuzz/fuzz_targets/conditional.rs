//! Guards conditional requests: RFC 9110 §13.2.2 precedence and strong-ETag rules hold for any header values.
#![no_main]

use std::time::{Duration, SystemTime};

use actix_web::http::header::{
    HeaderMap, HeaderName, HeaderValue, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE,
};
use libfuzzer_sys::fuzz_target;
use patchrelay::digest::Digest;
use patchrelay::http::conditional::{Precondition, evaluate, if_range_allows};

/// Seconds up to the end of year 9999, the last an HTTP date can name.
const MAX_SECS: u64 = 253_402_300_800;

/// The first value of `name`, if it is text (what the module reads).
fn readable(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn without(h: &HeaderMap, name: &HeaderName) -> HeaderMap {
    let mut h = h.clone();
    h.remove(name);
    h
}

// Input: a flag byte (bit 0: the representation is immutable), 8 bytes of
// Last-Modified seconds (little-endian), then `name: value` lines; lines that
// are not a valid header are skipped. The representation's ETag is the
// SHA-256 of "patchrelay".
fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((secs, lines)) = rest.split_first_chunk::<8>() else { return };
    let immutable = flags & 1 == 1;
    let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from_le_bytes(*secs) % MAX_SECS);
    let etag = Digest::of(b"patchrelay");
    let ours = etag.etag();
    let mut h = HeaderMap::new();
    for line in lines.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii_start());
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(name, value);
        }
    }

    let safe = evaluate(&h, &etag, modified, true);
    let unsafe_ = evaluate(&h, &etag, modified, false);
    let if_match = readable(&h, &IF_MATCH);
    let if_none_match = readable(&h, &IF_NONE_MATCH);

    // No preconditions: proceed.
    if ![IF_MATCH, IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE].iter().any(|n| h.contains_key(n)) {
        assert_eq!(safe, Precondition::Proceed);
    }
    // Only a safe method (GET, HEAD) is answered 304: for others a matching
    // If-None-Match fails instead, and If-Modified-Since is not consulted.
    let expected_unsafe = match safe {
        Precondition::NotModified if if_none_match.is_some() => Precondition::Failed,
        Precondition::NotModified => Precondition::Proceed,
        other => other,
    };
    assert_eq!(unsafe_, expected_unsafe, "GET gave {safe:?}");
    // If-Match makes If-Unmodified-Since irrelevant, If-None-Match makes
    // If-Modified-Since irrelevant (§13.2.2 steps 2 and 4).
    if if_match.is_some() {
        assert_eq!(evaluate(&without(&h, &IF_UNMODIFIED_SINCE), &etag, modified, true), safe);
    }
    if if_none_match.is_some() {
        assert_eq!(evaluate(&without(&h, &IF_MODIFIED_SINCE), &etag, modified, true), safe);
    }
    // `*` and our own strong ETag match: If-Match passes, If-None-Match does
    // not let the request proceed.
    let is = |v: &Option<String>, what: &str| v.as_deref().map(str::trim) == Some(what);
    if is(&if_match, "*") || is(&if_match, ours.as_str()) {
        assert_ne!(safe, Precondition::Failed);
    }
    if is(&if_none_match, "*") || is(&if_none_match, ours.as_str()) {
        assert_ne!(safe, Precondition::Proceed);
    }

    // If-Range: absent allows the range; present, only a value naming our
    // strong ETag, or (for an immutable representation only) a date.
    let allowed = if_range_allows(&h, &etag, modified, immutable);
    match h.get(IF_RANGE) {
        None => assert!(allowed),
        Some(v) if allowed => {
            let v = v.to_str().expect("an unreadable If-Range allowed a range").trim();
            if v.starts_with('"') || v.starts_with("W/") {
                assert!(v.contains(&ours) && v != format!("W/{ours}"), "If-Range {v:?} allowed a range");
            } else {
                assert!(immutable, "If-Range {v:?} allowed a range of a mutable representation");
            }
        }
        Some(_) => {}
    }
    // Whatever validates a mutable representation validates an immutable one.
    assert!(!if_range_allows(&h, &etag, modified, false) || if_range_allows(&h, &etag, modified, true));
});
