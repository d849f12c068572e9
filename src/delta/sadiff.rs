//! Suffix-array diff: bsdiff's method, with better packing.
//!
//! Matching is the `qbsdiff` crate's (a suffix array over the base; for each
//! stretch of the target, the longest approximate match). Its output is the
//! classic bsdiff 4 triple stream: *add* `n` bytes (target = base + difference,
//! mostly zeros), *copy* `m` new bytes, *seek* in the base. bsdiff packs the
//! three streams with bzip2 and the control triples as 8-byte integers; here the
//! triples become three columns of varints and each stream is compressed with
//! zstd (long-distance matching on the big ones), which on executables makes
//! deltas about 15% smaller than bsdiff's own and faster to apply.
//!
//! qbsdiff only emits its bzip2 container, so encoding unpacks it (at bzip2's
//! fastest level, a small share of the time) before repacking. Applying is
//! ours: every length is checked against the header before it is used.

use std::io::{Cursor, Read};

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx};

use super::{DeltaError, get_varint, put_varint};

const BSDIFF_MAGIC: &[u8; 8] = b"BSDIFF40";

fn zerr(what: &str, code: usize) -> DeltaError {
    DeltaError::Encode(format!("zstd {what}: {}", zstd_safe::get_error_name(code)))
}

/// bsdiff's sign-magnitude 64-bit integers.
fn bs_int(b: &[u8]) -> i64 {
    let mut y = i64::from(b[7] & 0x7f);
    for i in (0..7).rev() {
        y = (y << 8) | i64::from(b[i]);
    }
    if b[7] & 0x80 != 0 { -y } else { y }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn compress(data: &[u8], level: i32, long: bool) -> Result<Vec<u8>, DeltaError> {
    let mut c = CCtx::try_create().ok_or_else(|| DeltaError::Encode("zstd: out of memory".into()))?;
    c.set_parameter(CParameter::CompressionLevel(level)).map_err(|e| zerr("level", e))?;
    c.set_parameter(CParameter::ContentSizeFlag(true)).map_err(|e| zerr("content size", e))?;
    if long {
        let bits = usize::BITS - data.len().max(1).leading_zeros();
        c.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(|e| zerr("ldm", e))?;
        c.set_parameter(CParameter::WindowLog(bits.clamp(10, 27))).map_err(|e| zerr("window", e))?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    c.compress2(&mut out, data).map_err(|e| zerr("compress", e))?;
    Ok(out)
}

/// Decompress one stream whose content size must not exceed `limit`.
fn decompress(frame: &[u8], limit: u64, what: &str) -> Result<Vec<u8>, DeltaError> {
    let corrupt = |m: String| DeltaError::Corrupt(format!("{what} stream: {m}"));
    let n = match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n <= limit => n,
        Ok(Some(n)) => return Err(corrupt(format!("{n} bytes, over the {limit} this target allows"))),
        _ => return Err(corrupt("no readable content size".into())),
    };
    let mut d = DCtx::try_create().ok_or_else(|| corrupt("out of memory".into()))?;
    let mut out = Vec::with_capacity(n as usize);
    let got = d.decompress(&mut out, frame).map_err(|e| corrupt(zstd_safe::get_error_name(e).into()))?;
    if got as u64 != n {
        return Err(corrupt(format!("{got} bytes, frame says {n}")));
    }
    Ok(out)
}

pub fn encode(base: &[u8], target: &[u8], out: &mut Vec<u8>) -> Result<(), DeltaError> {
    let mut bs = Vec::new();
    qbsdiff::Bsdiff::new(base, target)
        .parallel_scheme(qbsdiff::ParallelScheme::Never)
        .compression_level(1)
        .compare(Cursor::new(&mut bs))
        .map_err(|e| DeltaError::Encode(format!("bsdiff: {e}")))?;
    if bs.len() < 32 || &bs[..8] != BSDIFF_MAGIC {
        return Err(DeltaError::Encode("bsdiff produced no patch".into()));
    }
    let (clen, dlen) = (bs_int(&bs[8..16]) as usize, bs_int(&bs[16..24]) as usize);
    let unbz = |range: std::ops::Range<usize>| -> Result<Vec<u8>, DeltaError> {
        let mut v = Vec::new();
        bzip2::read::BzDecoder::new(bs.get(range).ok_or_else(|| DeltaError::Encode("bsdiff: short patch".into()))?)
            .read_to_end(&mut v)
            .map_err(|e| DeltaError::Encode(format!("bsdiff: {e}")))?;
        Ok(v)
    };
    let ctrl = unbz(32..32 + clen)?;
    let diff = unbz(32 + clen..32 + clen + dlen)?;
    let extra = unbz(32 + clen + dlen..bs.len())?;

    // Controls as three columns of varints: lengths compress far better apart.
    let triples = ctrl.len() / 24;
    let (mut adds, mut copies, mut seeks) = (Vec::new(), Vec::new(), Vec::new());
    let mut columns = Vec::with_capacity(ctrl.len() / 3);
    put_varint(&mut columns, triples as u64);
    for t in ctrl.chunks_exact(24) {
        put_varint(&mut adds, bs_int(&t[0..8]) as u64);
        put_varint(&mut copies, bs_int(&t[8..16]) as u64);
        put_varint(&mut seeks, zigzag(bs_int(&t[16..24])));
    }
    columns.extend_from_slice(&adds);
    columns.extend_from_slice(&copies);
    columns.extend_from_slice(&seeks);
    // What `decode` accepts; the caller keeps the other algorithm's delta.
    if columns.len() as u64 > control_limit(target.len() as u64) {
        return Err(DeltaError::Encode(format!(
            "{} bytes of controls for a {}-byte target: more than a decoder accepts",
            columns.len(),
            target.len()
        )));
    }
    for (stream, long) in [(&columns, false), (&diff, true), (&extra, true)] {
        let z = compress(stream, 19, long)?;
        put_varint(out, z.len() as u64);
        out.extend_from_slice(&z);
    }
    Ok(())
}

/// The most a control stream may hold once decompressed: the target's length
/// and a little. A matcher that merges short matches (qbsdiff does) spends far
/// fewer control bytes than the target bytes they cover, and [`encode`]
/// refuses to produce anything over this, so no delta of ours is refused by
/// it. Without it a 10 KB frame of zeros declares hundreds of megabytes of
/// controls (and expanded into arrays, gigabytes).
fn control_limit(target_len: u64) -> u64 {
    target_len.saturating_add(CONTROL_SLACK)
}

const CONTROL_SLACK: u64 = 64 * 1024;

pub fn decode(base: &[u8], payload: &[u8], target_len: u64) -> Result<Vec<u8>, DeltaError> {
    let corrupt = |m: &str| DeltaError::Corrupt(m.to_string());
    let mut pos = 0;
    let mut frame = |what: &str| -> Result<&[u8], DeltaError> {
        let n = get_varint(payload, &mut pos).ok_or_else(|| corrupt(&format!("{what} length")))?;
        let end = usize::try_from(n).ok().and_then(|n| pos.checked_add(n)).filter(|&e| e <= payload.len());
        let end = end.ok_or_else(|| corrupt(&format!("{what} stream truncated")))?;
        let f = &payload[pos..end];
        pos = end;
        Ok(f)
    };
    let (cf, df, ef) = (frame("control")?, frame("difference")?, frame("extra")?);
    // What the target allows: controls about as long as it, and difference
    // and extra bytes that together make it up exactly.
    let ctrl = decompress(cf, control_limit(target_len), "control")?;
    let diff = decompress(df, target_len, "difference")?;
    let extra = decompress(ef, target_len - diff.len() as u64, "extra")?;

    // The three columns are read in step, each with its own cursor, so the
    // controls are never expanded into arrays (three u64s per triple would be
    // 24 bytes of memory per control byte).
    let mut cpos = 0;
    let triples = get_varint(&ctrl, &mut cpos).ok_or_else(|| corrupt("control count"))?;
    if triples.saturating_mul(3) > (ctrl.len() - cpos) as u64 {
        return Err(corrupt("control count larger than the control stream"));
    }
    let skip_column = |mut at: usize| -> Result<usize, DeltaError> {
        for _ in 0..triples {
            get_varint(&ctrl, &mut at).ok_or_else(|| corrupt("control stream truncated"))?;
        }
        Ok(at)
    };
    let mut copies_pos = skip_column(cpos)?;
    let mut seeks_pos = skip_column(copies_pos)?;
    let mut adds_pos = cpos;
    let next = |at: &mut usize| get_varint(&ctrl, at).ok_or_else(|| corrupt("control stream truncated"));

    let len = usize::try_from(target_len).map_err(|_| corrupt("target too large"))?;
    let mut out = Vec::with_capacity(len);
    let (mut dpos, mut epos) = (0usize, 0usize);
    let mut old: i64 = 0;
    for _ in 0..triples {
        let (add, copy, seek) = (next(&mut adds_pos)?, next(&mut copies_pos)?, next(&mut seeks_pos)?);
        let room = (len - out.len()) as u64;
        if add > room || copy > room - add {
            return Err(corrupt("controls run past the target length"));
        }
        let (add, copy) = (add as usize, copy as usize);
        let d = diff.get(dpos..dpos + add).ok_or_else(|| corrupt("difference stream too short"))?;
        dpos += add;
        // Base bytes outside the base read as zero (bsdiff's rule).
        let start = out.len();
        out.extend_from_slice(d);
        let lo = old.clamp(0, base.len() as i64) as usize;
        let hi = old.saturating_add(add as i64).clamp(0, base.len() as i64) as usize;
        if lo < hi {
            let skip = (lo as i64 - old) as usize;
            for (o, b) in out[start + skip..start + skip + (hi - lo)].iter_mut().zip(&base[lo..hi]) {
                *o = o.wrapping_add(*b);
            }
        }
        let e = extra.get(epos..epos + copy).ok_or_else(|| corrupt("extra stream too short"))?;
        epos += copy;
        out.extend_from_slice(e);
        old = old
            .checked_add(add as i64)
            .and_then(|o| o.checked_add(unzigzag(seek)))
            .ok_or_else(|| corrupt("seek out of range"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips() {
        for v in [0i64, 1, -1, 12345, -98765, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
