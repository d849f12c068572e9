//! The manifest: what a repository holds, signed by its origin.
//!
//! The manifest's exact bytes are what the origin signed, so patchrelay never
//! re-serialises a manifest it received: it parses a copy to learn what it may
//! serve and passes the original bytes on. Parsing is strict about everything a
//! relay later uses to build paths or allocate memory (names, versions, sizes,
//! chunk sizes), because a manifest can come from a hostile upstream before its
//! signature has been checked, and lenient about everything else (unknown fields
//! are ignored, unknown component kinds are kept) so that a newer origin does not
//! break older relays.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::version::Version;
use crate::digest::Digest;

/// The largest manifest a relay will read from an upstream.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// Chunk sizes are bounded so that verifying a block never needs a large buffer.
pub const MIN_CHUNK_SIZE: u64 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// The default block size for chunk lists (the contract's `chunk_size`).
pub const DEFAULT_CHUNK_SIZE: u64 = 1024 * 1024;
/// Objects larger than this are refused: nobody ships a 1 TiB pattern file.
pub const MAX_OBJECT_SIZE: u64 = 1 << 40;
/// Chunk lists above this are refused (2^21 blocks: 2 TiB at 1 MiB blocks).
pub const MAX_CHUNK_LIST_BYTES: u64 = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version of this document; absent means 1.
    #[serde(default = "one")]
    pub format: u32,
    pub serial: u64,
    /// RFC 3339, as written by `publish`.
    pub generated_at: String,
    pub components: BTreeMap<ComponentName, Component>,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Component {
    pub kind: Kind,
    #[serde(default)]
    pub critical: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub latest: Version,
    pub versions: Vec<VersionEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionEntry {
    pub version: Version,
    pub sha256: Digest,
    pub size: u64,
    pub file_name: String,
    pub chunk_size: u64,
    pub chunks_sha256: Digest,
    /// When this version was first published (RFC 3339). Not in the contract's
    /// list, but allowed as an extra field: it gives every relay in a chain the
    /// same `Last-Modified` for the version, so `If-Range` with a date works
    /// behind a load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
}

/// What a component is; relays treat unknown kinds like `software`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pattern,
    Patch,
    Software,
    Other(String),
}

impl Kind {
    pub fn as_str(&self) -> &str {
        match self {
            Kind::Pattern => "pattern",
            Kind::Patch => "patch",
            Kind::Software => "software",
            Kind::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> Kind {
        match s {
            "pattern" => Kind::Pattern,
            "patch" => Kind::Patch,
            "software" => Kind::Software,
            other => Kind::Other(other.to_string()),
        }
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
            return Err(serde::de::Error::custom(format!("invalid component kind {s:?}")));
        }
        Ok(Kind::parse(&s))
    }
}

/// A component name: safe in a URL path segment, a metric label and a log line.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid component name {0:?}: use 1 to 128 characters from [0-9A-Za-z._-], starting with a letter or digit")]
pub struct BadComponentName(pub String);

impl ComponentName {
    pub fn parse(s: &str) -> Result<Self, BadComponentName> {
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid { Ok(ComponentName(s.to_string())) } else { Err(BadComponentName(s.chars().take(80).collect())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by name be searched with a `&str` from a URL, no allocation.
impl std::borrow::Borrow<str> for ComponentName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ComponentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ComponentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for ComponentName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ComponentName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ComponentName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("manifest is not valid JSON for layout v1: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest format {0} is newer than this patchrelay understands (1); upgrade patchrelay")]
    UnsupportedFormat(u32),
    #[error("manifest generated_at {0:?} is not an RFC 3339 time")]
    BadTime(String),
    #[error("component {component}: {problem}")]
    Component { component: String, problem: String },
}

fn component_err(component: &ComponentName, problem: impl Into<String>) -> ManifestError {
    ManifestError::Component { component: component.to_string(), problem: problem.into() }
}

/// Parse an RFC 3339 time into a `SystemTime`; `None` for a time that is
/// not one, or is outside what an HTTP date can say (1970 to 9999): such a
/// time in a (signed) manifest must not bring down whoever formats it as
/// `Last-Modified` (fuzzing found that a signed manifest dated 0270 did).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    (1970..=9999).contains(&t.year()).then(|| SystemTime::from(t))
}

/// Format a `SystemTime` as RFC 3339 in UTC, to the second.
pub fn format_time(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t).replace_nanosecond(0).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// Whether `name` is usable as a payload's file name on every platform we ship to.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == '\\' || c.is_control())
}

impl Manifest {
    /// Parse and validate manifest bytes. This does not check the signature.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len() as u64));
        }
        let m: Manifest = serde_json::from_slice(bytes)?;
        m.validate()?;
        Ok(m)
    }

    /// Check the invariants that everything downstream relies on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != 1 {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        if parse_time(&self.generated_at).is_none() {
            return Err(ManifestError::BadTime(self.generated_at.clone()));
        }
        for (name, c) in &self.components {
            if c.versions.is_empty() {
                return Err(component_err(name, "has no versions"));
            }
            let mut seen = std::collections::HashSet::new();
            for v in &c.versions {
                if !seen.insert(&v.version) {
                    return Err(component_err(name, format!("version {} is listed twice", v.version)));
                }
                if v.size > MAX_OBJECT_SIZE {
                    return Err(component_err(
                        name,
                        format!("version {} is {} bytes, over the limit", v.version, v.size),
                    ));
                }
                if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&v.chunk_size) {
                    return Err(component_err(
                        name,
                        format!(
                            "version {} has chunk_size {}, outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                            v.version, v.chunk_size
                        ),
                    ));
                }
                if v.size > 0 && v.chunks_sha256 == v.sha256 {
                    // The chunk list is itself an object named by its digest; one
                    // that claims the payload's own name would have a fill wait on
                    // itself.
                    return Err(component_err(
                        name,
                        format!("version {} has chunks_sha256 equal to its sha256", v.version),
                    ));
                }
                if chunk_count(v.size, v.chunk_size) * Digest::LEN as u64 > MAX_CHUNK_LIST_BYTES {
                    return Err(component_err(
                        name,
                        format!(
                            "version {} needs a chunk list over {MAX_CHUNK_LIST_BYTES} bytes; use a larger chunk_size",
                            v.version
                        ),
                    ));
                }
                if !valid_file_name(&v.file_name) {
                    return Err(component_err(
                        name,
                        format!("version {} has an unsafe file_name {:?}", v.version, v.file_name),
                    ));
                }
                if let Some(p) = &v.published_at
                    && parse_time(p).is_none()
                {
                    return Err(component_err(
                        name,
                        format!("version {} published_at {p:?} is not RFC 3339", v.version),
                    ));
                }
            }
            if !seen.contains(&c.latest) {
                return Err(component_err(name, format!("latest {} is not among its versions", c.latest)));
            }
            if let Some(d) = &c.description
                && d.len() > 4096
            {
                return Err(component_err(name, "description is longer than 4096 bytes"));
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

impl Component {
    /// The entry for `latest`; validation guarantees it exists.
    pub fn latest_entry(&self) -> Option<&VersionEntry> {
        self.versions.iter().find(|v| v.version == self.latest)
    }

    pub fn version(&self, v: &Version) -> Option<&VersionEntry> {
        self.versions.iter().find(|e| &e.version == v)
    }
}

/// Number of blocks an object of `size` bytes has with blocks of `chunk_size`.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        let d = Digest::of(b"x");
        let c = Digest::of(b"chunks");
        format!(
            r#"{{"serial": 3, "generated_at": "2026-11-23T01:00:00Z", "future_field": [1,2],
               "components": {{"engine": {{"kind": "pattern", "critical": true, "latest": "173",
               "versions": [{{"version": "171", "sha256": "{d}", "size": 1, "file_name": "p.bin",
                              "chunk_size": 1048576, "chunks_sha256": "{c}", "new": 1}},
                            {{"version": "173", "sha256": "{d}", "size": 1, "file_name": "p.bin",
                              "chunk_size": 1048576, "chunks_sha256": "{c}"}}]}},
               "tool": {{"kind": "driver", "latest": "1", "versions": [{{"version": "1", "sha256": "{d}",
                 "size": 1, "file_name": "t", "chunk_size": 4096, "chunks_sha256": "{c}"}}]}}}}}}"#
        )
    }

    #[test]
    fn parses_and_ignores_unknown_fields() {
        let m = Manifest::parse(sample().as_bytes()).unwrap();
        assert_eq!(m.serial, 3);
        let engine = &m.components[&ComponentName::parse("engine").unwrap()];
        assert_eq!(engine.kind, Kind::Pattern);
        assert_eq!(engine.latest_entry().unwrap().version.as_str(), "173");
        let tool = &m.components[&ComponentName::parse("tool").unwrap()];
        assert_eq!(tool.kind, Kind::Other("driver".into()));
    }

    #[test]
    fn refuses_hostile_manifests() {
        let cases = [
            sample().replace("\"latest\": \"173\"", "\"latest\": \"999\""),
            sample().replace("\"p.bin\"", "\"../../etc/passwd\""),
            sample().replace("\"engine\"", "\"../engine\""),
            sample().replace("\"171\"", "\"../171\""),
            sample().replace("1048576", "1"),
            sample().replace("\"size\": 1,", "\"size\": 18446744073709551615,"),
            sample().replace("2026-11-23T01:00:00Z", "yesterday"),
            sample().replace("\"171\"", "\"173\""),
            sample().replace("\"serial\": 3", "\"serial\": -3"),
            "[]".to_string(),
            String::new(),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert!(Manifest::parse(c.as_bytes()).is_err(), "case {i} accepted");
        }
    }

    #[test]
    fn time_round_trip() {
        let t = parse_time("2026-11-23T01:02:03Z").unwrap();
        assert_eq!(format_time(t), "2026-11-23T01:02:03Z");
    }
}
