//! A manifest and its signature in one file, so a relay can persist the last
//! verified pair with a single atomic rename (two files could be caught half
//! replaced by a crash). Loading verifies the pair again: a saved pair is a
//! cache of a verified manifest, not a reason to trust one.
//!
//! Format: `patchrelay-bundle 1\n`, the signature's length in decimal and `\n`,
//! the signature bytes, then the manifest bytes to the end of the file. (The
//! magic predates air-gap bundles, `crate::airgap`, which are another thing:
//! files under `state/` keep it so that existing relays read them.)

use std::path::Path;

use bytes::Bytes;

const MAGIC: &[u8] = b"patchrelay-bundle 1\n";

pub fn encode(manifest: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + signature.len() + manifest.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(format!("{}\n", signature.len()).as_bytes());
    out.extend_from_slice(signature);
    out.extend_from_slice(manifest);
    out
}

/// Split a bundle into `(manifest, signature)`; `None` if it is not one.
pub fn decode(data: Bytes) -> Option<(Bytes, Bytes)> {
    let rest = data.strip_prefix(MAGIC)?;
    let nl = rest.iter().take(8).position(|&b| b == b'\n')?;
    let sig_len: usize = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
    let sig_start = MAGIC.len() + nl + 1;
    let man_start = sig_start.checked_add(sig_len)?;
    if man_start > data.len() {
        return None;
    }
    Some((data.slice(man_start..), data.slice(sig_start..man_start)))
}

/// Write a pair atomically.
pub fn save(path: &Path, manifest: &[u8], signature: &[u8]) -> std::io::Result<()> {
    crate::store::atomic::write_atomic(path, &encode(manifest, signature))
}

/// Why a saved pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{} is not a saved manifest (damaged?)", .0.display())]
    Damaged(std::path::PathBuf),
    #[error("{}: {source}", .path.display())]
    Refused { path: std::path::PathBuf, source: super::VerifyError },
}

/// Read the pair saved at `path` and verify it under `key`; `Ok(None)`: there
/// is none.
pub fn load(path: &Path, key: &super::sign::PublicKey) -> Result<Option<super::catalog::Catalog>, LoadError> {
    let data = match std::fs::read(path) {
        Ok(d) => Bytes::from(d),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path: path.to_path_buf(), source }),
    };
    let (manifest, sig) = decode(data).ok_or_else(|| LoadError::Damaged(path.to_path_buf()))?;
    super::verify(key, manifest, sig)
        .map(Some)
        .map_err(|source| LoadError::Refused { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let b = Bytes::from(encode(b"{\"m\":1}", b"c2ln\n"));
        assert_eq!(decode(b), Some((Bytes::from_static(b"{\"m\":1}"), Bytes::from_static(b"c2ln\n"))));
        assert_eq!(decode(Bytes::from_static(b"nope")), None);
        assert_eq!(decode(Bytes::from_static(b"patchrelay-bundle 1\n999\nshort")), None);
        assert_eq!(decode(Bytes::from_static(b"patchrelay-bundle 1\n99999999999999999999\n")), None);
    }
}
