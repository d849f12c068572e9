//! zstd "patch-from": compress the target with the base as a prefix, so every
//! unchanged stretch becomes a cheap back-reference into the base.
//!
//! Parameters as measured on real releases: window large enough to reach the
//! whole base (highbit(max(base, target)) + 1), long-distance matching on. No
//! zstd checksum and no content size in the frame: the delta header carries
//! the target's length and SHA-256 tag, `apply` checks both, and on a rule list
//! that gained a few lines every byte counts (docs/deltas.md).

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter};

use super::DeltaError;

fn window_log(n: usize) -> u32 {
    let bits = usize::BITS - n.max(1).leading_zeros();
    (bits + 1).clamp(10, 31)
}

fn zerr(what: &str, code: usize) -> DeltaError {
    DeltaError::Encode(format!("zstd {what}: {}", zstd_safe::get_error_name(code)))
}

fn overlaps(a: &[u8], b: &[u8]) -> bool {
    let (a0, b0) = (a.as_ptr() as usize, b.as_ptr() as usize);
    !a.is_empty() && !b.is_empty() && a0 < b0 + b.len() && b0 < a0 + a.len()
}

pub fn encode(base: &[u8], target: &[u8], level: i32, out: &mut Vec<u8>) -> Result<(), DeltaError> {
    let mut c = CCtx::try_create().ok_or_else(|| DeltaError::Encode("zstd: out of memory".into()))?;
    let wlog = window_log(base.len().max(target.len()));
    c.set_parameter(CParameter::CompressionLevel(level)).map_err(|e| zerr("level", e))?;
    c.set_parameter(CParameter::WindowLog(wlog)).map_err(|e| zerr("window", e))?;
    c.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(|e| zerr("ldm", e))?;
    c.set_parameter(CParameter::ChecksumFlag(false)).map_err(|e| zerr("checksum", e))?;
    c.set_parameter(CParameter::ContentSizeFlag(false)).map_err(|e| zerr("content size", e))?;
    // zstd ignores a prefix that overlaps the input in memory (it cannot be
    // both), which would silently turn the delta into a plain compression.
    let copy;
    let target = if overlaps(base, target) {
        copy = target.to_vec();
        &copy[..]
    } else {
        target
    };
    c.ref_prefix(base).map_err(|e| zerr("prefix", e))?;
    let mut frame = Vec::with_capacity(zstd_safe::compress_bound(target.len()));
    c.compress2(&mut frame, target).map_err(|e| zerr("compress", e))?;
    out.extend_from_slice(&frame);
    Ok(())
}

pub fn decode(base: &[u8], payload: &[u8], target_len: u64) -> Result<Vec<u8>, DeltaError> {
    // A frame that states its content size (format 1 wrote one) must agree
    // with the header. Either way the output buffer is exactly the header's
    // length, and zstd refuses to write past it.
    match zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n != target_len => {
            return Err(DeltaError::WrongTargetLength { expected: target_len, got: n });
        }
        Ok(_) => {}
        Err(_) => return Err(DeltaError::Corrupt("not a zstd frame".into())),
    }
    let len = usize::try_from(target_len).map_err(|_| DeltaError::Corrupt("target too large".into()))?;
    let mut d = DCtx::try_create().ok_or_else(|| DeltaError::Corrupt("zstd: out of memory".into()))?;
    // The window a delta of these two files needs, and no more: a frame that
    // asks for a larger one is refused rather than given the memory.
    let needed = window_log(base.len().max(len));
    d.set_parameter(DParameter::WindowLogMax(needed))
        .map_err(|e| DeltaError::Corrupt(zstd_safe::get_error_name(e).into()))?;
    d.ref_prefix(base).map_err(|e| DeltaError::Corrupt(zstd_safe::get_error_name(e).into()))?;
    let mut out = Vec::with_capacity(len);
    let n = d
        .decompress(&mut out, payload)
        .map_err(|e| DeltaError::Corrupt(format!("zstd: {}", zstd_safe::get_error_name(e))))?;
    if n != len {
        return Err(DeltaError::WrongTargetLength { expected: target_len, got: n as u64 });
    }
    Ok(out)
}
