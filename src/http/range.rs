//! `Range: bytes=…` (RFC 9110 §14.2): which bytes of a representation to send.
//!
//! Syntax is parsed by the `http-range-header` crate; what the ranges *mean*
//! against a representation's length is decided here, because the crate's
//! `validate` refuses things RFC 9110 allows (overlapping ranges, a suffix longer
//! than the file, one unsatisfiable range among good ones) and serving ranges
//! is the core of resuming downloads.
//!
//! Decisions, in the order they are applied:
//! - a unit other than `bytes` is ignored (RFC 9110: MUST ignore): full response;
//! - a syntactically invalid set, or a reversed range (`5-3`), is answered 416,
//!   as nginx does, so a broken client learns it is broken;
//! - more than [`MAX_RANGES`] ranges is ignored (full response): the RFC allows
//!   it, and it caps the work one request can ask for;
//! - ranges starting at or past the end are dropped; if none is left, 416;
//! - overlapping or touching ranges are merged (RFC 9110 §15.3.7.2 allows it),
//!   which bounds the response at the representation's size;
//! - a zero-length representation ignores ranges (there is no byte to address).

use http_range_header::{EndPosition, StartPosition};

/// The most ranges one request may ask for before we send the whole thing.
pub const MAX_RANGES: usize = 64;

/// An inclusive byte range `start..=end`, already checked against the length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Send the whole representation (200).
    Full,
    /// Send these ranges (206); one range, or several as multipart/byteranges.
    Partial(Vec<ByteRange>),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Decide what a `Range` header value asks for, for a representation of `len` bytes.
pub fn resolve(header: &[u8], len: u64) -> RangeOutcome {
    let Ok(text) = std::str::from_utf8(header) else {
        return RangeOutcome::Unsatisfiable;
    };
    let Some((unit, set)) = text.split_once('=') else {
        return RangeOutcome::Unsatisfiable;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeOutcome::Full;
    }
    if len == 0 {
        return RangeOutcome::Full;
    }
    // Cheap count before parsing, so a header of a million commas costs nothing.
    if set.bytes().filter(|&b| b == b',').count() >= MAX_RANGES {
        return RangeOutcome::Full;
    }
    let normalised = format!("bytes={}", set.trim_start());
    let Ok(parsed) = http_range_header::parse_range_header(&normalised) else {
        return RangeOutcome::Unsatisfiable;
    };
    let mut ranges = Vec::with_capacity(parsed.ranges.len());
    for r in &parsed.ranges {
        let (start, end) = match (r.start, r.end) {
            (StartPosition::FromLast(n), _) => (len.saturating_sub(n), len - 1),
            (StartPosition::Index(s), EndPosition::LastByte) => (s, len - 1),
            (StartPosition::Index(s), EndPosition::Index(e)) => {
                if e < s {
                    return RangeOutcome::Unsatisfiable;
                }
                (s, e.min(len - 1))
            }
        };
        if start < len {
            ranges.push(ByteRange { start, end });
        }
    }
    if ranges.is_empty() {
        return RangeOutcome::Unsatisfiable;
    }
    RangeOutcome::Partial(coalesce(ranges))
}

/// Merge overlapping or adjacent ranges. When nothing overlaps, keep the order
/// the client asked for (RFC 9110 says SHOULD); otherwise sort and merge.
fn coalesce(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    if ranges.len() < 2 {
        return ranges;
    }
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| r.start);
    let touching = sorted.windows(2).any(|w| w[1].start <= w[0].end.saturating_add(1));
    if !touching {
        return ranges;
    }
    ranges.clear();
    for r in sorted {
        match ranges.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(1) => last.end = last.end.max(r.end),
            _ => ranges.push(r),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    fn partial(h: &str, len: u64) -> Vec<ByteRange> {
        match resolve(h.as_bytes(), len) {
            RangeOutcome::Partial(v) => v,
            other => panic!("{h}: {other:?}"),
        }
    }

    #[test]
    fn rfc_9110_examples() {
        // §14.1.2, a 10000-byte representation.
        assert_eq!(partial("bytes=0-499", 10000), [r(0, 499)]);
        assert_eq!(partial("bytes=500-999", 10000), [r(500, 999)]);
        assert_eq!(partial("bytes=-500", 10000), [r(9500, 9999)]);
        assert_eq!(partial("bytes=9500-", 10000), [r(9500, 9999)]);
        assert_eq!(partial("bytes=0-0,-1", 10000), [r(0, 0), r(9999, 9999)]);
        assert_eq!(partial("bytes=500-600,601-999", 10000), [r(500, 999)]);
        assert_eq!(partial("bytes=500-700,601-999", 10000), [r(500, 999)]);
    }

    #[test]
    fn clamping_dropping_and_refusing() {
        assert_eq!(partial("bytes=0-99999", 100), [r(0, 99)]);
        assert_eq!(partial("bytes=-1000", 100), [r(0, 99)]);
        assert_eq!(partial("bytes=200-300, 0-9", 100), [r(0, 9)]);
        assert_eq!(partial("Bytes=0-1", 100), [r(0, 1)]);
        assert_eq!(partial("bytes=50-59, 0-9", 100), [r(50, 59), r(0, 9)]);
        assert_eq!(resolve(b"bytes=100-", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"bytes=5-3", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"bytes=abc", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"bytes=-0", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"bytes=", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"0-5", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"bytes=\xff", 100), RangeOutcome::Unsatisfiable);
        assert_eq!(resolve(b"items=0-5", 100), RangeOutcome::Full);
        assert_eq!(resolve(b"bytes=0-5", 0), RangeOutcome::Full);
        let many = (0..100).map(|i| format!("{}-{}", i * 2, i * 2)).collect::<Vec<_>>().join(",");
        assert_eq!(resolve(format!("bytes={many}").as_bytes(), 1000), RangeOutcome::Full);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Any header at all gives a well-formed decision: ranges inside the
        /// representation, non-overlapping, no bigger in total than it.
        #[test]
        fn any_header_gives_a_valid_outcome(header in proptest::collection::vec(any::<u8>(), 0..64), len in 0u64..5000) {
            check(&header, len)?;
        }

        #[test]
        fn plausible_headers_give_valid_outcomes(
            specs in proptest::collection::vec((proptest::option::of(0u64..6000), proptest::option::of(0u64..6000)), 1..8),
            len in 0u64..5000,
        ) {
            let set: Vec<String> = specs.iter().map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => format!("{a}-{b}"),
                (Some(a), None) => format!("{a}-"),
                (None, Some(b)) => format!("-{b}"),
                (None, None) => "-".to_string(),
            }).collect();
            check(format!("bytes={}", set.join(", ")).as_bytes(), len)?;
        }
    }

    fn check(header: &[u8], len: u64) -> Result<(), TestCaseError> {
        if let RangeOutcome::Partial(ranges) = resolve(header, len) {
            prop_assert!(!ranges.is_empty());
            let mut total = 0;
            for r in &ranges {
                prop_assert!(r.start <= r.end && r.end < len, "{r:?} of {len}");
                total += r.len();
            }
            prop_assert!(total <= len);
            let mut sorted = ranges.clone();
            sorted.sort_by_key(|r| r.start);
            for w in sorted.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
        }
        Ok(())
    }
}
