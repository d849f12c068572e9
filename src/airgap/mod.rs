//! Across an air gap: signed, incremental bundles, exported on the connected
//! side and imported by a relay that has no route to its origin.
//!
//! A bundle is a plain tar ([`format`]): a header (what it brings, every
//! entry's size and SHA-256) and its checksum, the origin's manifest and
//! signature verbatim, then objects with their chunk lists and deltas, under
//! the paths a published repository uses. `tar xf` of a full bundle is a
//! static repository any web server can host.
//!
//! Trust: nothing in a bundle counts but the origin's signature. The header
//! is a table of contents (its checksum catches damaged media, not forgers);
//! the importer verifies the manifest under `trust.public_key` and the
//! rollback and equivocation rules a sync applies, then every object, chunk
//! list and rebuilt delta target against that manifest, before anything is
//! adopted.
//!
//! Who writes what ([`stage`]): `import` verifies the bundle into a staging
//! area, `storage.dir/import/`, whose files are named by digest only once
//! verified, and marks it ready. Adopting it (moving the files into the
//! store, then persisting the manifest, the one atomic step that makes the
//! new serial real, then serving it) is done by whoever holds the store: the
//! import command itself when the relay is stopped, the running relay
//! otherwise (it looks for a ready import every second), so one process at
//! a time writes a store and a running relay never serves anything partial.
//! A verified file left in staging by an import that failed or was killed
//! makes the next import faster; nothing in staging is ever served.

pub mod export;
pub mod format;
mod hashing;
pub mod import;
mod parts;
pub mod progress;
pub mod stage;

use crate::digest::Digest;

/// How an export or import failed; each kind has its exit code (the
/// contract's: 3 rollback or equivocation, 5 verification failed, 6 gap).
#[derive(Debug, thiserror::Error)]
pub enum AirgapError {
    /// The bundle would take the relay back (an older serial).
    #[error(
        "this bundle brings serial {bundle}, older than the serial {relay} this relay holds: refused as a rollback (export a newer bundle on the connected side)"
    )]
    Rollback { bundle: u64, relay: u64 },
    /// The same serial with other bytes: an origin (or someone) signed two
    /// manifests under one serial, or the bundle was made against another.
    #[error("{0}")]
    Equivocation(String),
    /// The bundle assumes versions this relay does not hold.
    #[error("{0}")]
    Gap(String),
    /// Bytes that do not verify: a damaged, truncated or forged bundle.
    #[error("{entry}: {why}")]
    Verification { entry: String, why: String },
    /// Asked for something that cannot be done with these arguments or this
    /// configuration.
    #[error("{0}")]
    Usage(String),
    /// Local disk, network, or a peer failing.
    #[error("{0}")]
    Failed(String),
    /// The relay that adopts a staged import refused it (its message, and
    /// the exit code of the error it met).
    #[error("{message}")]
    Adoption { message: String, exit: u8 },
}

impl AirgapError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AirgapError::Rollback { .. } | AirgapError::Equivocation(_) => 3,
            AirgapError::Gap(_) => 6,
            AirgapError::Verification { .. } => 5,
            AirgapError::Usage(_) => 2,
            AirgapError::Failed(_) => 1,
            AirgapError::Adoption { exit, .. } => *exit,
        }
    }

    /// A short code for JSON output and the staged result.
    pub fn code(&self) -> &'static str {
        match self {
            AirgapError::Rollback { .. } => "rollback",
            AirgapError::Equivocation(_) => "equivocation",
            AirgapError::Gap(_) => "gap",
            AirgapError::Verification { .. } => "verification_failed",
            AirgapError::Usage(_) => "usage",
            AirgapError::Failed(_) => "failed",
            AirgapError::Adoption { .. } => "refused",
        }
    }

    pub(crate) fn verification(entry: impl Into<String>, why: impl Into<String>) -> AirgapError {
        AirgapError::Verification { entry: entry.into(), why: why.into() }
    }

    pub(crate) fn io(what: impl std::fmt::Display, e: std::io::Error) -> AirgapError {
        AirgapError::Failed(format!("{what}: {e}"))
    }
}

/// One version a bundle brings, for summaries.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Brought {
    pub component: String,
    pub version: String,
    pub sha256: Digest,
    pub size: u64,
    /// How it crosses: `object` (whole) or `delta` (rebuilt from a version
    /// the other side holds).
    pub carried: Carried,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Carried {
    Object,
    Delta,
}

/// A version a manifest lists and a store does not hold.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Lack {
    pub component: String,
    pub version: String,
    pub sha256: Digest,
}

/// Versions a manifest lists whose objects are not among `held`: what a
/// relay will answer 404 for (offline) or fetch (connected).
pub fn lacking(manifest: &crate::repo::manifest::Manifest, held: impl Fn(&Digest) -> bool) -> Vec<Lack> {
    let mut out = Vec::new();
    for (name, c) in &manifest.components {
        for v in &c.versions {
            if !held(&v.sha256) {
                out.push(Lack { component: name.to_string(), version: v.version.to_string(), sha256: v.sha256 });
            }
        }
    }
    out
}
