//! The catalog: a verified manifest, indexed for serving.
//!
//! Built once per accepted manifest and shared read-only (behind an `ArcSwap`)
//! by every request, so lookups on the hot path are hash-map reads with no lock.
//! It answers: which bytes does this URL mean, how long are they, what is their
//! digest (the ETag), and when did they first appear (`Last-Modified`).

use std::time::SystemTime;

use bytes::Bytes;

use super::manifest::{Component, ComponentName, Manifest, VersionEntry, parse_time};
use crate::digest::{Digest, DigestMap};

/// A manifest that passed signature verification, with its exact bytes.
#[derive(Debug)]
pub struct Catalog {
    pub manifest: Manifest,
    /// The signed bytes, served verbatim.
    pub manifest_bytes: Bytes,
    pub manifest_digest: Digest,
    /// The contents of `manifest.sig`, served verbatim.
    pub signature: Bytes,
    pub signature_digest: Digest,
    pub generated_at: SystemTime,
    /// Header values of the manifest and its signature (the signature's
    /// `chunks_etag` is unused).
    pub manifest_texts: HeaderTexts,
    pub signature_texts: HeaderTexts,
    objects: DigestMap<ObjectInfo>,
}

/// What the catalog knows about one payload.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub sha256: Digest,
    pub size: u64,
    pub chunk_size: u64,
    pub chunks_sha256: Digest,
    /// The earliest `published_at` of any version with these bytes.
    pub modified: SystemTime,
    /// Whether a critical component has a version with these bytes (served
    /// ahead of bulk traffic when `limits.total_rate` binds).
    pub critical: bool,
    /// Response header values, formatted once per manifest instead of per request.
    pub texts: HeaderTexts,
}

/// Header values of an object, ready to send (`Bytes`, so a response takes
/// them without a copy).
#[derive(Debug, Clone)]
pub struct HeaderTexts {
    /// `"<sha256>"`
    pub etag: Bytes,
    /// `"<chunks_sha256>"`
    pub chunks_etag: Bytes,
    /// HTTP date of `modified`.
    pub last_modified: Bytes,
}

/// `modified` as an HTTP date, held to what one can say (httpdate panics on
/// a time before 1970 or after 9999).
fn http_date(modified: SystemTime) -> String {
    const LAST: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = modified.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).min(LAST);
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

impl HeaderTexts {
    pub fn new(sha256: &Digest, chunks: &Digest, modified: SystemTime) -> Self {
        HeaderTexts {
            etag: Bytes::from(sha256.etag()),
            chunks_etag: Bytes::from(chunks.etag()),
            last_modified: Bytes::from(http_date(modified)),
        }
    }
}

impl ObjectInfo {
    /// Length of the chunk list file (32 bytes per block).
    pub fn chunk_list_len(&self) -> u64 {
        super::manifest::chunk_count(self.size, self.chunk_size) * Digest::LEN as u64
    }
}

impl Catalog {
    /// Index a manifest. The caller has verified `signature` over `manifest_bytes`.
    pub fn new(manifest: Manifest, manifest_bytes: Bytes, signature: Bytes) -> Catalog {
        let generated_at = parse_time(&manifest.generated_at).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut objects: DigestMap<ObjectInfo> = DigestMap::default();
        for c in manifest.components.values() {
            for v in &c.versions {
                let modified = v.published_at.as_deref().and_then(parse_time).unwrap_or(generated_at);
                objects
                    .entry(v.sha256)
                    .and_modify(|o| {
                        o.modified = o.modified.min(modified);
                        o.critical |= c.critical;
                    })
                    .or_insert_with(|| ObjectInfo {
                        sha256: v.sha256,
                        size: v.size,
                        chunk_size: v.chunk_size,
                        chunks_sha256: v.chunks_sha256,
                        modified,
                        critical: c.critical,
                        texts: HeaderTexts::new(&v.sha256, &v.chunks_sha256, modified),
                    });
            }
        }
        let (manifest_digest, signature_digest) = (Digest::of(&manifest_bytes), Digest::of(&signature));
        Catalog {
            manifest_texts: HeaderTexts::new(&manifest_digest, &manifest_digest, generated_at),
            signature_texts: HeaderTexts::new(&signature_digest, &signature_digest, generated_at),
            manifest_digest,
            signature_digest,
            manifest,
            manifest_bytes,
            signature,
            generated_at,
            objects,
        }
    }

    pub fn serial(&self) -> u64 {
        self.manifest.serial
    }

    pub fn object(&self, sha256: &Digest) -> Option<&ObjectInfo> {
        self.objects.get(sha256)
    }

    pub fn objects(&self) -> impl Iterator<Item = &ObjectInfo> {
        self.objects.values()
    }

    pub fn component(&self, name: &str) -> Option<(&ComponentName, &Component)> {
        self.manifest.components.get_key_value(name)
    }

    /// The entry for `name` at `version`, and its object.
    pub fn version(&self, name: &str, version: &str) -> Option<(&VersionEntry, &ObjectInfo)> {
        let (_, c) = self.component(name)?;
        let entry = c.versions.iter().find(|e| e.version.as_str() == version)?;
        Some((entry, self.objects.get(&entry.sha256)?))
    }

    /// The latest entry of `name`, and its object.
    pub fn latest(&self, name: &str) -> Option<(&VersionEntry, &ObjectInfo)> {
        let (_, c) = self.component(name)?;
        let entry = c.latest_entry()?;
        Some((entry, self.objects.get(&entry.sha256)?))
    }
}

#[cfg(test)]
mod date_tests {
    use std::time::{Duration, UNIX_EPOCH};

    /// Found by fuzzing (`fuzz/artifacts`, a signed manifest dated 0270):
    /// dates an HTTP date cannot say are held to its range, not a panic.
    #[test]
    fn dates_outside_what_http_can_say_do_not_panic() {
        assert_eq!(super::http_date(UNIX_EPOCH - Duration::from_secs(1)), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert!(super::http_date(UNIX_EPOCH + Duration::from_secs(400_000_000_000)).contains("9999"));
        assert!(crate::repo::manifest::parse_time("0270-11-23T01:00:00Z").is_none());
        assert!(crate::repo::manifest::parse_time("2026-12-02T00:00:00Z").is_some());
    }
}
