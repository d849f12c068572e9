//! The repository format: manifest, signatures, the static tree, publishing.
//!
//! A repository is a plain directory tree that any static web server can serve:
//!
//! ```text
//! v1/manifest            manifest JSON (the exact bytes that were signed)
//! v1/manifest.sig        detached Ed25519 signature over them (base64)
//! v1/objects/<sha256>    payloads, named by the SHA-256 of their bytes
//! v1/chunks/<sha256>     a payload's chunk list: the raw SHA-256 of each block
//! v1/signatures/<sha256> the signature of the manifest whose bytes hash to <sha256>
//! state/manifests/<n>    every manifest published, by serial (not served; for
//!                        `export --since`, `crate::airgap`)
//! ```
//!
//! The same relative paths are used on disk and in URLs, so this module is the
//! one place that spells them.
//!
//! Why `v1/signatures/`: the manifest and its signature are two files, and no
//! rename replaces two files at once. `publish` writes the new manifest's
//! signature under its digest first, then renames the manifest into place,
//! then `manifest.sig`. A publish killed between those two renames leaves the
//! new manifest beside the old `manifest.sig`; every reader here ([`read_pair`]
//! on disk, [`signature_path`] over HTTP) then finds the signature that goes
//! with the manifest it read, so the repository is the new one, valid, and not
//! a broken one. The same covers a reader that fetches the two files while a
//! publish is between them.

pub mod catalog;
pub mod history;
pub mod manifest;
pub mod pair;
pub mod publish;
pub mod sign;
pub mod version;

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::digest::Digest;
use catalog::Catalog;
use manifest::{Manifest, ManifestError};
use sign::{PublicKey, SignatureError};

pub const MANIFEST_PATH: &str = "v1/manifest";
pub const SIGNATURE_PATH: &str = "v1/manifest.sig";

/// URL path (relative, no leading slash) of a payload.
pub fn object_path(sha256: &Digest) -> String {
    format!("v1/objects/{sha256}")
}

/// URL path (relative) of the signature of the manifest whose bytes hash to
/// `manifest_sha256`.
pub fn signature_path(manifest_sha256: &Digest) -> String {
    format!("v1/signatures/{manifest_sha256}")
}

/// Signatures kept under `v1/signatures/` besides the current one: readers
/// that fetched a manifest a few publishes ago still find its signature.
pub const SIGNATURES_KEPT: usize = 16;

/// URL path (relative) of a payload's chunk list.
pub fn chunks_path(sha256: &Digest) -> String {
    format!("v1/chunks/{sha256}")
}

/// Paths inside a published repository on disk.
#[derive(Debug, Clone)]
pub struct RepoDir {
    root: PathBuf,
}

impl RepoDir {
    pub fn new(root: &Path) -> Self {
        RepoDir { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn v1(&self) -> PathBuf {
        self.root.join("v1")
    }

    pub fn manifest(&self) -> PathBuf {
        self.root.join(MANIFEST_PATH)
    }

    pub fn signature(&self) -> PathBuf {
        self.root.join(SIGNATURE_PATH)
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("v1/objects")
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join("v1/chunks")
    }

    pub fn object(&self, sha256: &Digest) -> PathBuf {
        self.root.join(object_path(sha256))
    }

    pub fn chunks(&self, sha256: &Digest) -> PathBuf {
        self.root.join(chunks_path(sha256))
    }

    pub fn signatures_dir(&self) -> PathBuf {
        self.root.join("v1/signatures")
    }

    /// Files of patchrelay's own beside the served tree (`state/manifests/`:
    /// the manifests published, for `export --since`). Not part of what
    /// agents or relays read.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Where the signature of the manifest hashing to `manifest_sha256` is kept.
    pub fn signature_for(&self, manifest_sha256: &Digest) -> PathBuf {
        self.root.join(signature_path(manifest_sha256))
    }
}

/// The repository's manifest and the signature that goes with it: the one
/// kept under the manifest's digest if there is one (see the module comment),
/// else `manifest.sig` (repositories published before `v1/signatures/`).
/// `Ok(None)`: no manifest yet.
/// Errors name the file.
pub fn read_pair(repo: &RepoDir) -> std::io::Result<Option<(Bytes, Bytes)>> {
    use std::io::{Error, ErrorKind};
    fn named(path: &Path) -> impl FnOnce(Error) -> Error + '_ {
        move |e| Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
    let manifest = match std::fs::read(repo.manifest()) {
        Ok(m) => Bytes::from(m),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(named(&repo.manifest())(e)),
    };
    let by_digest = repo.signature_for(&Digest::of(&manifest));
    let sig = match std::fs::read(&by_digest) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::read(repo.signature()).map_err(named(&repo.signature()))?
        }
        Err(e) => return Err(named(&by_digest)(e)),
    };
    Ok(Some((manifest, Bytes::from(sig))))
}

/// Why a manifest and signature pair was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl VerifyError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Signature(SignatureError::Malformed) => "signature_malformed",
            VerifyError::Signature(SignatureError::Mismatch) => "signature_mismatch",
            VerifyError::Manifest(_) => "manifest_invalid",
        }
    }
}

/// Fetch an upstream's manifest and its signature and verify them under `key`.
///
/// The two are fetched one after the other, so a publish can fall between
/// them (or have been killed between its two renames, on a static host): when
/// the signature does not match, the one kept under the manifest's digest
/// (`v1/signatures/`) is tried before giving up. The whole fetch is bounded
/// by a total deadline (four read timeouts), so an upstream that trickles a
/// byte now and then cannot hold a sync forever. On failure: a metric reason
/// and a message.
pub async fn fetch_verified(
    up: &std::sync::Arc<crate::upstream::Upstream>,
    key: &PublicKey,
) -> Result<Catalog, (&'static str, String)> {
    let deadline = up.read_timeout.saturating_mul(4);
    let fetch = async {
        let fetched = |e: crate::upstream::UpstreamError| ("fetch_failed", e.to_string());
        let manifest = up.get_bytes(MANIFEST_PATH, manifest::MAX_MANIFEST_BYTES).await.map_err(fetched)?;
        let sig = up.get_bytes(SIGNATURE_PATH, 1024).await.map_err(fetched)?;
        match verify(key, manifest.clone(), sig) {
            Err(VerifyError::Signature(SignatureError::Mismatch)) => {
                let mismatch = VerifyError::Signature(SignatureError::Mismatch);
                match up.get_bytes(&signature_path(&Digest::of(&manifest)), 1024).await {
                    Ok(sig) => verify(key, manifest, sig).map_err(|e| (e.reason(), e.to_string())),
                    Err(_) => Err((mismatch.reason(), mismatch.to_string())),
                }
            }
            other => other.map_err(|e| (e.reason(), e.to_string())),
        }
    };
    match tokio::time::timeout(deadline, fetch).await {
        Ok(result) => result,
        Err(_) => Err((
            "fetch_failed",
            format!("upstream {}: manifest and signature not fetched within {deadline:?}", up.name),
        )),
    }
}

/// Check the signature first, then parse: nothing in an unsigned document is
/// looked at beyond its length.
pub fn verify(key: &PublicKey, manifest: Bytes, signature: Bytes) -> Result<Catalog, VerifyError> {
    if manifest.len() as u64 > manifest::MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(manifest.len() as u64).into());
    }
    key.verify(&manifest, &signature)?;
    let parsed = Manifest::parse(&manifest)?;
    Ok(Catalog::new(parsed, manifest, signature))
}
