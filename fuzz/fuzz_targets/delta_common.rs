//! Shared by `delta_zstd` and `delta_sadiff` (not a target itself).
//!
//! Input: a mode byte. Odd mode: round trip, `[a length: 2 bytes LE][a][b]`:
//! `encode_with(alg, a, b, 1)` then `apply` must give back `b`. Even mode:
//! decode, `[target length: 3 bytes LE][base length: 2 bytes LE][base][payload]`,
//! behind a valid header for that base (the right base tag and length), so
//! the payload decoders are reached; for the suffix-array diff, mode bit 1
//! makes the payload `[control length: 2][control][difference length: 2]
//! [difference][extra]`, each stream zstd-compressed as the format wants, so
//! the control interpreter is reached too.

use patchrelay::delta::{self, Algorithm, DeltaError};
use patchrelay::digest::Digest;

/// The largest target `apply` may build here (callers pass the manifest's size).
pub const MAX_TARGET: u64 = 1 << 20;

pub fn run(alg: Algorithm, data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 1 {
        round_trip(alg, rest);
    } else {
        decode(alg, mode, rest);
    }
}

fn round_trip(alg: Algorithm, data: &[u8]) {
    let Some((a, b)) = split(data) else { return };
    let d = match delta::encode_with(alg, a, b, 1) {
        Ok(d) => d,
        // The suffix-array diff may decline (more controls than a decoder
        // accepts); the relay then keeps the zstd delta.
        Err(DeltaError::Encode(_)) if alg == Algorithm::SaDiff => return,
        Err(e) => panic!("{alg:?} cannot encode: {e}"),
    };
    let h = delta::read_header(&d).expect("our own delta's header");
    assert_eq!((h.algorithm, h.base_len, h.target_len), (alg, a.len() as u64, b.len() as u64));
    assert!(h.base.matches(&Digest::of(a)) && h.target.matches(&Digest::of(b)));
    match delta::apply(a, &d, b.len() as u64) {
        Ok(out) => assert!(out == b, "{alg:?}: the round trip changed the target"),
        Err(e) => panic!("{alg:?}: our own delta does not apply: {e}"),
    }
    if let Some(less) = (b.len() as u64).checked_sub(1) {
        assert!(matches!(delta::apply(a, &d, less), Err(DeltaError::TooLarge(..))));
    }
}

fn decode(alg: Algorithm, mode: u8, data: &[u8]) {
    let Some((t, data)) = data.split_first_chunk::<3>() else { return };
    // Now and then over the limit, which must be refused before any work.
    let target_len = u64::from(u32::from_le_bytes([t[0], t[1], t[2], 0])) % (MAX_TARGET + 4096);
    let Some((base, rest)) = split(data) else { return };
    let payload = if alg == Algorithm::SaDiff && mode & 2 != 0 { sadiff_payload(rest) } else { rest.to_vec() };

    // The target's tag cannot be known before decoding: zeros first.
    let d = with_header(alg, base, [0; 8], target_len, &payload);
    let h = delta::read_header(&d).expect("the header we built");
    assert_eq!((h.algorithm, h.base_len, h.target_len), (alg, base.len() as u64, target_len));
    match delta::apply(base, &d, MAX_TARGET) {
        Ok(out) => assert_eq!(out.len() as u64, target_len),
        Err(DeltaError::TooLarge(got, max)) => assert!(got == target_len && target_len > max),
        Err(DeltaError::WrongResult { actual, .. }) => {
            // It decoded to the declared length; with the right tag the same
            // delta must now be accepted, giving the same bytes.
            let tag: [u8; 8] = actual.as_bytes()[..8].try_into().expect("8 bytes");
            let fixed = with_header(alg, base, tag, target_len, &payload);
            match delta::apply(base, &fixed, MAX_TARGET) {
                Ok(out) => assert!(out.len() as u64 == target_len && Digest::of(&out) == actual),
                Err(e) => panic!("decoded once, then refused: {e}"),
            }
        }
        Err(e @ (DeltaError::NotADelta | DeltaError::UnknownAlgorithm(_) | DeltaError::WrongBase { .. })) => {
            panic!("a valid header for this base was refused: {e}")
        }
        Err(_) => {}
    }
    if target_len > MAX_TARGET {
        assert!(matches!(delta::apply(base, &d, MAX_TARGET), Err(DeltaError::TooLarge(..))));
    }
}

/// `[n: 2 bytes LE][n bytes][rest]`, `n` cut to what there is.
fn split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, rest) = data.split_first_chunk::<2>()?;
    Some(rest.split_at(usize::from(u16::from_le_bytes(*n)).min(rest.len())))
}

/// The header as src/delta/mod.rs documents it: "PRD2", algorithm, base and
/// target tags (the first 8 bytes of their SHA-256), LEB128 lengths.
fn with_header(alg: Algorithm, base: &[u8], target_tag: [u8; 8], target_len: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = delta::MAGIC.to_vec();
    out.push(match alg {
        Algorithm::ZstdPatch => 1,
        Algorithm::SaDiff => 2,
    });
    out.extend_from_slice(&Digest::of(base).as_bytes()[..8]);
    out.extend_from_slice(&target_tag);
    put_varint(&mut out, base.len() as u64);
    put_varint(&mut out, target_len);
    out.extend_from_slice(payload);
    out
}

/// Control, difference and extra streams, each a zstd frame (with its
/// content size, which the decoder needs) behind its LEB128 length.
fn sadiff_payload(data: &[u8]) -> Vec<u8> {
    let (control, rest) = split(data).unwrap_or((data, &[][..]));
    let (difference, extra) = split(rest).unwrap_or((rest, &[][..]));
    let mut out = Vec::new();
    for stream in [control, difference, extra] {
        let frame = zstd::bulk::compress(stream, 1).expect("zstd compresses");
        put_varint(&mut out, frame.len() as u64);
        out.extend_from_slice(&frame);
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
