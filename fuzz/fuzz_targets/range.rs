//! Guards `Range` resolution: ranges inside the representation, none overlapping or touching, at most MAX_RANGES.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchrelay::http::range::{MAX_RANGES, RangeOutcome, resolve};

// Input: a flag byte; the length (8 bytes little-endian if the flag's low bit
// is set, else 2, so small lengths are common); the rest is the header value.
fuzz_target!(|data: &[u8]| {
    let Some((&flag, rest)) = data.split_first() else { return };
    let (len, header) = if flag & 1 == 1 {
        let Some((n, header)) = rest.split_first_chunk::<8>() else { return };
        (u64::from_le_bytes(*n), header)
    } else {
        let Some((n, header)) = rest.split_first_chunk::<2>() else { return };
        (u64::from(u16::from_le_bytes(*n)), header)
    };

    let RangeOutcome::Partial(ranges) = resolve(header, len) else { return };
    // A zero-length representation has no byte to address.
    assert!(len > 0, "ranges of an empty representation: {ranges:?}");
    assert!(!ranges.is_empty(), "206 with no range");
    assert!(ranges.len() <= MAX_RANGES, "{} ranges, over the cap", ranges.len());
    let asked = header.iter().filter(|&&b| b == b',').count() + 1;
    assert!(ranges.len() <= asked, "{} ranges from {asked} asked for", ranges.len());
    let mut total = 0u128;
    for r in &ranges {
        assert!(r.start <= r.end && r.end < len, "{r:?} is outside 0..{len}");
        total += u128::from(r.len());
    }
    assert!(total <= u128::from(len), "{total} bytes of a {len}-byte representation");
    // Merged: no two overlap or touch. The client's order is kept only when
    // nothing had to be merged, so check in sorted order.
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| r.start);
    for w in sorted.windows(2) {
        assert!(w[0].end.saturating_add(1) < w[1].start, "overlapping or touching: {:?} and {:?}", w[0], w[1]);
    }
});
