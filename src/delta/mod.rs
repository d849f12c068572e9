//! Binary deltas: take version A of a file to version B in far fewer bytes.
//!
//! A delta is self-describing, so an agent can refuse one that is not for the
//! file it holds before writing anything:
//!
//! ```text
//! "PRD2"            magic and format version
//! algorithm         1 byte: 1 = zstd patch-from, 2 = suffix-array diff
//! base tag          8 bytes: the first 8 bytes of the base's SHA-256
//! target tag        8 bytes: the first 8 bytes of the target's SHA-256
//! base length       LEB128
//! target length     LEB128
//! payload           algorithm-specific
//! ```
//!
//! The tags are for catching mistakes (a delta applied to the wrong file), not
//! for trust: whoever rebuilds a file checks its full SHA-256 against the signed
//! manifest, which a forged delta cannot pass. 64 bits make an accidental match
//! practically impossible, and a delta of a rule list that gained three lines
//! is a few hundred bytes, so the header's size matters (two full digests made
//! psl deltas 1.27x the best reference tool; docs/deltas.md). Format 1
//! ("PRD1", full digests) is still read, so deltas stored by an older relay
//! stay usable.
//!
//! No single method wins everywhere (measured on real releases, docs/deltas.md):
//! zstd's patch-from mode is best on text that changes a little (rule lists,
//! signature files), a suffix-array diff in the bsdiff family is best on
//! executables and databases. [`encode`] tries both where it is affordable and
//! keeps the smaller. [`apply`] checks the base's digest first and the result's
//! digest last, and bounds every allocation by the lengths in the header, so a
//! corrupt or hostile delta gives an error, never a panic or a huge allocation.

pub mod plan;
mod sadiff;
mod zpatch;

use crate::digest::Digest;

pub const MAGIC: &[u8; 4] = b"PRD2";
/// Format 1: the same layout with full 32-byte digests.
const MAGIC_V1: &[u8; 4] = b"PRD1";
const TAG_LEN: usize = 8;
const FIXED_HEADER: usize = 4 + 1 + TAG_LEN + TAG_LEN;

/// The first bytes of a SHA-256: enough to tell files apart, not to trust them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tag([u8; TAG_LEN]);

impl Tag {
    pub fn of(d: &Digest) -> Tag {
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&d.as_bytes()[..TAG_LEN]);
        Tag(t)
    }

    /// Whether `d` is the file this tag names.
    pub fn matches(&self, d: &Digest) -> bool {
        *self == Tag::of(d)
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str("...")
    }
}

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// How the payload encodes the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// zstd with the base as a prefix dictionary ("patch-from").
    ZstdPatch,
    /// bsdiff-style control/diff/extra streams from a suffix-array matcher,
    /// each compressed with zstd.
    SaDiff,
}

impl Algorithm {
    fn id(self) -> u8 {
        match self {
            Algorithm::ZstdPatch => 1,
            Algorithm::SaDiff => 2,
        }
    }

    fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Algorithm::ZstdPatch),
            2 => Some(Algorithm::SaDiff),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("not a patchrelay delta (bad magic or truncated header)")]
    NotADelta,
    #[error("delta algorithm {0} is not known to this patchrelay; upgrade it")]
    UnknownAlgorithm(u8),
    #[error("delta is for base {expected} ({expected_len} bytes), but the file is {actual} ({actual_len} bytes)")]
    WrongBase { expected: Tag, expected_len: u64, actual: Digest, actual_len: u64 },
    #[error("delta builds a {got}-byte target; {expected} bytes were expected")]
    WrongTargetLength { expected: u64, got: u64 },
    #[error("delta result hashes to {actual}, not {expected}")]
    WrongResult { expected: Tag, actual: Digest },
    #[error("delta is corrupt: {0}")]
    Corrupt(String),
    #[error("target of {0} bytes is over the {1}-byte limit")]
    TooLarge(u64, u64),
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// The parsed fixed part of a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub algorithm: Algorithm,
    pub base: Tag,
    pub target: Tag,
    pub base_len: u64,
    pub target_len: u64,
    /// Where the payload starts.
    pub payload_offset: usize,
}

/// What [`encode`] tries.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// zstd level for patch-from on small targets (where 19 is cheap).
    pub small_level: i32,
    /// zstd level for patch-from on large targets.
    pub large_level: i32,
    /// Targets up to this size count as small.
    pub small_limit: usize,
    /// Also try the suffix-array diff (costs O(base) memory and more time).
    pub sadiff: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { small_level: 19, large_level: 12, small_limit: 8 << 20, sadiff: true }
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Read a LEB128 varint at `*pos`.
pub(crate) fn get_varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn header_bytes(alg: Algorithm, base: &[u8], target: &[u8], base_digest: Digest, target_digest: Digest) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_HEADER + 20);
    out.extend_from_slice(MAGIC);
    out.push(alg.id());
    out.extend_from_slice(&Tag::of(&base_digest).0);
    out.extend_from_slice(&Tag::of(&target_digest).0);
    put_varint(&mut out, base.len() as u64);
    put_varint(&mut out, target.len() as u64);
    out
}

/// Encode with one algorithm.
pub fn encode_with(alg: Algorithm, base: &[u8], target: &[u8], level: i32) -> Result<Vec<u8>, DeltaError> {
    let mut out = header_bytes(alg, base, target, Digest::of(base), Digest::of(target));
    match alg {
        Algorithm::ZstdPatch => zpatch::encode(base, target, level, &mut out)?,
        Algorithm::SaDiff => sadiff::encode(base, target, &mut out)?,
    }
    Ok(out)
}

/// Encode `base -> target` with the methods `opts` allows; the smallest wins.
pub fn encode(base: &[u8], target: &[u8], opts: &EncodeOptions) -> Result<Vec<u8>, DeltaError> {
    let level = if target.len() <= opts.small_limit { opts.small_level } else { opts.large_level };
    let mut best = encode_with(Algorithm::ZstdPatch, base, target, level)?;
    if opts.sadiff && !base.is_empty() && !target.is_empty() {
        // A suffix-array diff that cannot be made (controls over what a
        // decoder accepts) leaves the zstd delta, which is always valid.
        match encode_with(Algorithm::SaDiff, base, target, level) {
            Ok(sa) if sa.len() < best.len() => best = sa,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "suffix-array diff not used"),
        }
    }
    Ok(best)
}

/// Parse and check the fixed header (format 2, or format 1 from older relays).
pub fn read_header(delta: &[u8]) -> Result<Header, DeltaError> {
    let digest_len = match delta.get(..4) {
        Some(m) if m == MAGIC => TAG_LEN,
        Some(m) if m == MAGIC_V1 => 32,
        _ => return Err(DeltaError::NotADelta),
    };
    let id = *delta.get(4).ok_or(DeltaError::NotADelta)?;
    let algorithm = Algorithm::from_id(id).ok_or(DeltaError::UnknownAlgorithm(id))?;
    let tag = |at: usize| -> Result<Tag, DeltaError> {
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(delta.get(at..at + TAG_LEN).ok_or(DeltaError::NotADelta)?);
        Ok(Tag(t))
    };
    let (base, target) = (tag(5)?, tag(5 + digest_len)?);
    let mut pos = 5 + 2 * digest_len;
    let base_len = get_varint(delta, &mut pos).ok_or(DeltaError::NotADelta)?;
    let target_len = get_varint(delta, &mut pos).ok_or(DeltaError::NotADelta)?;
    Ok(Header { algorithm, base, target, base_len, target_len, payload_offset: pos })
}

/// Rebuild the target from `base` and `delta`. `max_target` bounds memory
/// (callers pass the size the manifest gives for the target). The base is
/// checked before any work, the result after.
pub fn apply(base: &[u8], delta: &[u8], max_target: u64) -> Result<Vec<u8>, DeltaError> {
    let h = read_header(delta)?;
    check_base(&h, base)?;
    if h.target_len > max_target {
        return Err(DeltaError::TooLarge(h.target_len, max_target));
    }
    let payload = &delta[h.payload_offset..];
    let out = match h.algorithm {
        Algorithm::ZstdPatch => zpatch::decode(base, payload, h.target_len)?,
        Algorithm::SaDiff => sadiff::decode(base, payload, h.target_len)?,
    };
    if out.len() as u64 != h.target_len {
        return Err(DeltaError::WrongTargetLength { expected: h.target_len, got: out.len() as u64 });
    }
    let actual = Digest::of(&out);
    if !h.target.matches(&actual) {
        return Err(DeltaError::WrongResult { expected: h.target, actual });
    }
    Ok(out)
}

/// Refuse a delta made for another base.
pub fn check_base(h: &Header, base: &[u8]) -> Result<(), DeltaError> {
    let actual = Digest::of(base);
    if !h.base.matches(&actual) || base.len() as u64 != h.base_len {
        return Err(DeltaError::WrongBase {
            expected: h.base,
            expected_len: h.base_len,
            actual,
            actual_len: base.len() as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn release(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..3000u64 {
            let rev = if i % 97 == n % 97 { n } else { 0 };
            out.extend_from_slice(format!("sig:{i:06}:{:x}:rev{rev}\n", i.wrapping_mul(2654435761)).as_bytes());
        }
        out
    }

    #[test]
    fn both_algorithms_round_trip_and_are_small() {
        let (a, b) = (release(1), release(2));
        for alg in [Algorithm::ZstdPatch, Algorithm::SaDiff] {
            let d = encode_with(alg, &a, &b, 19).unwrap();
            assert!(d.len() < b.len() / 20, "{alg:?}: {} of {}", d.len(), b.len());
            assert_eq!(apply(&a, &d, b.len() as u64).unwrap(), b);
            let h = read_header(&d).unwrap();
            assert_eq!((h.algorithm, h.base, h.target), (alg, Tag::of(&Digest::of(&a)), Tag::of(&Digest::of(&b))));
        }
        let best = encode(&a, &b, &EncodeOptions::default()).unwrap();
        assert_eq!(apply(&a, &best, u64::MAX).unwrap(), b);
    }

    #[test]
    fn reads_format_1() {
        let (a, b) = (release(1), release(2));
        let d = encode_with(Algorithm::ZstdPatch, &a, &b, 3).unwrap();
        let h = read_header(&d).unwrap();
        // The same delta as format 1 wrote it: full digests.
        let mut v1 = MAGIC_V1.to_vec();
        v1.push(Algorithm::ZstdPatch.id());
        v1.extend_from_slice(Digest::of(&a).as_bytes());
        v1.extend_from_slice(Digest::of(&b).as_bytes());
        put_varint(&mut v1, a.len() as u64);
        put_varint(&mut v1, b.len() as u64);
        v1.extend_from_slice(&d[h.payload_offset..]);
        assert_eq!(apply(&a, &v1, u64::MAX).unwrap(), b);
        assert!(matches!(apply(&b, &v1, u64::MAX), Err(DeltaError::WrongBase { .. })));
        assert_eq!(d.len() + 48, v1.len());
    }

    #[test]
    fn refuses_the_wrong_base_and_bad_limits() {
        let (a, b) = (release(1), release(2));
        let d = encode(&a, &b, &EncodeOptions::default()).unwrap();
        assert!(matches!(apply(&b, &d, u64::MAX), Err(DeltaError::WrongBase { .. })));
        assert!(matches!(apply(&a, &d, 10), Err(DeltaError::TooLarge(..))));
        assert_eq!(apply(&a, b"nonsense", 100), Err(DeltaError::NotADelta));
        let mut other = d.clone();
        other[4] = 99;
        assert_eq!(apply(&a, &other, u64::MAX), Err(DeltaError::UnknownAlgorithm(99)));
    }

    fn file() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..3000),
            proptest::collection::vec(0u8..4, 0..3000),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// apply(diff(a, b)) == b, for both algorithms, including empty,
        /// identical and unrelated files, and edits of one into the other.
        #[test]
        fn round_trip(a in file(), b in file(), edit in any::<bool>(), cut in any::<prop::sample::Index>()) {
            let b = if edit && !a.is_empty() {
                let mut x = a.clone();
                let at = cut.index(x.len());
                x.splice(at..at, b.iter().copied().take(50));
                x
            } else {
                b
            };
            for alg in [Algorithm::ZstdPatch, Algorithm::SaDiff] {
                let d = encode_with(alg, &a, &b, 3).unwrap();
                prop_assert_eq!(apply(&a, &d, b.len() as u64).unwrap(), b.clone());
                // Identical files make tiny deltas.
                let same = encode_with(alg, &a, &a, 3).unwrap();
                prop_assert!(same.len() <= FIXED_HEADER + 64 + a.len() / 50, "{:?}: {}", alg, same.len());
            }
        }

        /// Truncated or corrupted deltas give an error (or, for a flip the
        /// digest cannot see, the right result), never a panic.
        #[test]
        fn damage_is_an_error(seed in 0u64..1000, cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (a, b) = (release(seed), release(seed + 1));
            for alg in [Algorithm::ZstdPatch, Algorithm::SaDiff] {
                let d = encode_with(alg, &a, &b, 3).unwrap();
                let truncated = &d[..cut.index(d.len())];
                prop_assert!(apply(&a, truncated, b.len() as u64).is_err());
                let mut corrupt = d.clone();
                let at = flip.index(corrupt.len());
                corrupt[at] ^= byte | 1;
                if let Ok(out) = apply(&a, &corrupt, b.len() as u64) {
                    prop_assert_eq!(out, b.clone());
                }
            }
        }

        /// Garbage after a valid header never allocates beyond the limit or panics.
        #[test]
        fn garbage_payloads(payload in proptest::collection::vec(any::<u8>(), 0..2000), target_len in 0u64..(1 << 40)) {
            let a = release(1);
            for alg in [Algorithm::ZstdPatch, Algorithm::SaDiff] {
                let mut d = header_bytes(alg, &a, b"", Digest::of(&a), Digest::of(b"x"));
                // Overwrite the target length with the fuzzed one.
                d.truncate(FIXED_HEADER);
                put_varint(&mut d, a.len() as u64);
                put_varint(&mut d, target_len);
                d.extend_from_slice(&payload);
                prop_assert!(apply(&a, &d, 1 << 20).is_err());
            }
        }
    }
}
