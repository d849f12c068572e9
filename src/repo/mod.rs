//! The repository format: manifest, signatures, the static tree, publishing.
//!
//! A repository is a plain directory tree that any static web server can serve:
//!
//! ```text
//! v1/manifest            manifest JSON (the exact bytes that were signed)
//! v1/manifest.sig        detached Ed25519 signature over them (base64)
//! v1/objects/<sha256>    payloads, named by the SHA-256 of their bytes
//! v1/chunks/<sha256>     a payload's chunk list: the raw SHA-256 of each block
//! ```
//!
//! The same relative paths are used on disk and in URLs, so this module is the
//! one place that spells them.

pub mod bundle;
pub mod catalog;
pub mod manifest;
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
