//! The staging area of imports, `storage.dir/import/`, and adoption: moving a
//! verified import into the store and making its manifest the relay's.
//!
//! ```text
//! import/lock           held by the import command (one import at a time)
//! import/tmp/           files being written and checked
//! import/objects/<hex>  verified files (objects, chunk lists, deltas), named by
//!                       digest only once their bytes were checked
//! import/manifest       the bundle's manifest and signature (a saved pair)
//! import/ready.json     written last: the import is verified and complete
//! import/adopting.json  ready.json, renamed by the adopter as it starts
//! import/result.json    what adoption did, for the import command waiting on it
//! ```
//!
//! Adoption is done by the process that holds the store: the import command
//! when the relay is stopped, the relay itself when it runs ([`adopt`] from
//! `actors::sync`, which looks for `ready.json` every second). It moves the
//! staged files into `objects/` (renames on one file system), syncs the file
//! system once, records the deltas, and then saves the manifest: that rename
//! is the commit. A crash before it leaves the previous serial (and objects
//! no manifest lists, which nothing serves); a crash after it, the new one.
//! `adopting.json` left by a crash is adopted again at start: every step is
//! idempotent.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{AirgapError, Brought};
use crate::actors::deltas::DeltaInfo;
use crate::digest::Digest;
use crate::repo::catalog::Catalog;
use crate::repo::history::History;
use crate::repo::pair;
use crate::repo::sign::PublicKey;
use crate::store::Store;

/// Where a relay keeps its last verified manifest, under `state/`.
pub const SAVED_MANIFEST: &str = "manifest.bundle";

/// A staged file: its digest names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagedFile {
    pub sha256: Digest,
    pub size: u64,
}

/// A staged delta, for the relay's delta index.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct StagedDelta {
    pub from: Digest,
    pub to: Digest,
    pub sha256: Digest,
    pub size: u64,
}

/// `ready.json`: a verified import, complete in staging.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    /// Ties the result to the import command that waits for it.
    pub id: String,
    pub serial: u64,
    pub manifest_sha256: Digest,
    pub files: Vec<StagedFile>,
    pub deltas: Vec<StagedDelta>,
    pub brings: Vec<Brought>,
}

/// `result.json`: what adoption did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    /// `adopted`, `unchanged` (the relay held this serial already; files it
    /// lacked were taken in) or `refused`.
    pub result: String,
    pub serial: Option<u64>,
    pub previous_serial: Option<u64>,
    /// For `refused`: the error's code and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Exit code for the import command.
    pub exit_code: u8,
}

/// Why [`adopt`] refused a staged import, and which.
#[derive(Debug)]
pub struct Refused {
    pub id: Option<String>,
    pub serial: Option<u64>,
    pub error: AirgapError,
}

/// What [`adopt`] did.
pub struct Adopted {
    pub ready: Ready,
    pub catalog: Catalog,
    pub previous: Option<u64>,
    /// False when the relay held this manifest already.
    pub changed: bool,
}

/// The staging area of one store.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// The staging area of the store at `storage_dir`.
    pub fn of(storage_dir: &Path) -> Staging {
        Staging { dir: storage_dir.join("import") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn objects(&self) -> PathBuf {
        self.dir.join("objects")
    }

    pub fn file(&self, digest: &Digest) -> PathBuf {
        self.objects().join(digest.to_hex())
    }

    fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn ready_path(&self) -> PathBuf {
        self.dir.join("ready.json")
    }

    fn adopting_path(&self) -> PathBuf {
        self.dir.join("adopting.json")
    }

    pub fn result_path(&self) -> PathBuf {
        self.dir.join("result.json")
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest")
    }

    /// Whether an import waits for adoption (or was being adopted).
    pub fn pending(&self) -> bool {
        self.ready_path().exists() || self.adopting_path().exists()
    }

    /// Create the area and take its lock (held while the returned file is
    /// open); clears `tmp/`.
    pub fn lock(&self) -> Result<File, AirgapError> {
        for d in [self.objects(), self.tmp()] {
            fs::create_dir_all(&d).map_err(|e| AirgapError::io(format!("cannot create {}", d.display()), e))?;
        }
        let path = self.dir.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| AirgapError::io(format!("cannot open {}", path.display()), e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(AirgapError::Failed(format!(
                    "another import is running on this relay ({} is locked); wait for it to finish",
                    path.display()
                )));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(AirgapError::io(format!("cannot lock {}", path.display()), e));
            }
        }
        if let Ok(rd) = fs::read_dir(self.tmp()) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(f)
    }

    /// Whether a file of `size` bytes is staged under `digest`. Files staged
    /// by this run are verified; one left by an earlier run is trusted only
    /// after [`Staging::recheck`].
    pub fn has(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.file(digest)).is_ok_and(|m| m.len() == size)
    }

    /// Hash a file an earlier, interrupted import staged (a power cut may
    /// have left its name without its bytes); one that does not match is
    /// removed. Returns whether it is good. Blocking.
    pub fn recheck(&self, digest: &Digest, size: u64) -> bool {
        let path = self.file(digest);
        let good = (|| -> io::Result<bool> {
            let mut f = File::open(&path)?;
            crate::store::read_ahead(&f);
            let mut h = crate::digest::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n_total = 0u64;
            loop {
                let n = io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                n_total += n as u64;
                h.update(&buf[..n]);
            }
            Ok(n_total == size && h.finish() == *digest)
        })()
        .unwrap_or(false);
        if !good {
            let _ = fs::remove_file(&path);
        }
        good
    }

    /// Remove staged files that are not in `keep` (left by an import of
    /// another bundle).
    pub fn keep_only(&self, keep: &std::collections::HashSet<Digest>) {
        let Ok(rd) = fs::read_dir(self.objects()) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            let wanted = name.to_str().and_then(|n| n.parse::<Digest>().ok()).is_some_and(|d| keep.contains(&d));
            if !wanted {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Start writing a file that becomes `digest` once its bytes check out.
    pub fn writer(&self, digest: Digest, size: u64) -> Result<StagedWriter, AirgapError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.tmp().join(format!("{}-{n}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| AirgapError::io(format!("cannot create {}", tmp.display()), e))?;
        Ok(StagedWriter { tmp, file: Some(file), written: 0, digest, size, dest: self.file(&digest) })
    }

    /// Mark the import verified and complete: the file system is synced (the
    /// staged files are durable), then the manifest and `ready.json` are
    /// written atomically.
    pub fn mark_ready(&self, ready: &Ready, manifest: &[u8], signature: &[u8]) -> Result<(), AirgapError> {
        let ctx = |what: &str| format!("staging {}: {what}", self.dir.display());
        crate::store::sync_file_system(&self.dir).map_err(|e| AirgapError::io(ctx("cannot sync"), e))?;
        let _ = fs::remove_file(self.result_path());
        pair::save(&self.manifest_path(), manifest, signature).map_err(|e| AirgapError::io(ctx("manifest"), e))?;
        let json = serde_json::to_vec_pretty(ready).map_err(|e| AirgapError::Failed(ctx(&e.to_string())))?;
        crate::store::atomic::write_atomic(&self.ready_path(), &json).map_err(|e| AirgapError::io(ctx("ready.json"), e))
    }

    /// The import to adopt, claimed: `ready.json` renamed to `adopting.json`
    /// (or one a crash left there). `Ok(None)`: nothing pending.
    fn claim(&self) -> Result<Option<(Ready, Bytes, Bytes)>, AirgapError> {
        let ctx = |what: &str| format!("staging {}: {what}", self.dir.display());
        match fs::rename(self.ready_path(), self.adopting_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !self.adopting_path().exists() {
                    return Ok(None);
                }
            }
            Err(e) => return Err(AirgapError::io(ctx("cannot claim ready.json"), e)),
        }
        let raw = fs::read(self.adopting_path()).map_err(|e| AirgapError::io(ctx("adopting.json"), e))?;
        let ready: Ready = serde_json::from_slice(&raw)
            .map_err(|e| AirgapError::verification("import/adopting.json", format!("not readable: {e}")))?;
        let data = fs::read(self.manifest_path()).map_err(|e| AirgapError::io(ctx("manifest"), e))?;
        let (m, s) =
            pair::decode(Bytes::from(data)).ok_or_else(|| AirgapError::verification("import/manifest", "damaged"))?;
        Ok(Some((ready, m, s)))
    }

    /// Adoption is over: say how it went, for the waiting import command.
    pub fn finish(&self, outcome: &Outcome) {
        let json = serde_json::to_vec_pretty(outcome).unwrap_or_default();
        if let Err(e) = crate::store::atomic::write_atomic(&self.result_path(), &json) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the import's result");
        }
        let _ = fs::remove_file(self.adopting_path());
        let _ = fs::remove_file(self.manifest_path());
    }

    /// The result written for the import `id`, if adoption is over.
    pub fn result_for(&self, id: &str) -> Option<Outcome> {
        let raw = fs::read(self.result_path()).ok()?;
        serde_json::from_slice::<Outcome>(&raw).ok().filter(|o| o.id == id)
    }
}

/// A staged file being written, named by its digest only if the bytes are
/// the ones expected (the caller hashes them: see `airgap::hashing`).
/// Dropped unfinished, it leaves nothing.
pub struct StagedWriter {
    tmp: PathBuf,
    file: Option<File>,
    written: u64,
    digest: Digest,
    size: u64,
    dest: PathBuf,
}

impl StagedWriter {
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        match &mut self.file {
            Some(f) => f.write_all(data),
            None => Err(io::Error::other("staged file already finished")),
        }
    }

    /// The bytes written hash to `actual`: check length and digest, then
    /// give the file its name.
    pub fn finish(mut self, actual: Digest) -> Result<(), StageError> {
        drop(self.file.take());
        if self.written != self.size {
            return Err(StageError::Mismatch(format!("{} bytes, {} expected", self.written, self.size)));
        }
        if actual != self.digest {
            return Err(StageError::Mismatch(format!("content hashes to {actual}, the manifest says {}", self.digest)));
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| StageError::Io(format!("cannot move into staging: {e}")))
    }
}

/// Why a staged file was not kept: its bytes, or the local disk.
#[derive(Debug)]
pub enum StageError {
    Mismatch(String),
    Io(String),
}

impl StageError {
    /// As the import reports it: bad bytes are the bundle's (`path`), a disk
    /// that failed is ours.
    pub fn at(self, path: &str, context: &str) -> AirgapError {
        match self {
            StageError::Mismatch(why) => {
                AirgapError::verification(path, format!("{context}{why}: the bundle is damaged"))
            }
            StageError::Io(why) => AirgapError::Failed(format!("{path}: {why}")),
        }
    }
}

impl Drop for StagedWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Adopt the pending import into `store`, if there is one: check its
/// manifest again (signature under `key`, no rollback or equivocation
/// against `current`), move its files in, record its deltas through
/// `record_delta`, and save its manifest (the commit; see the module
/// comment). The caller then serves the catalog and calls
/// [`Staging::finish`]. Blocking.
pub fn adopt(
    staging: &Staging,
    store: &Store,
    key: &PublicKey,
    current: Option<&Catalog>,
    record_delta: &mut dyn FnMut(&StagedDelta) -> io::Result<()>,
) -> Result<Option<Adopted>, Box<Refused>> {
    let Some((ready, manifest, signature)) =
        staging.claim().map_err(|error| Box::new(Refused { id: None, serial: None, error }))?
    else {
        return Ok(None);
    };
    let fail = |error: AirgapError| Box::new(Refused { id: Some(ready.id.clone()), serial: Some(ready.serial), error });
    let catalog = crate::repo::verify(key, manifest, signature)
        .map_err(|e| fail(AirgapError::verification("v1/manifest", e.to_string())))?;
    let previous = current.map(Catalog::serial);
    let mut changed = true;
    if let Some(cur) = current {
        if catalog.serial() < cur.serial() {
            return Err(fail(AirgapError::Rollback { bundle: catalog.serial(), relay: cur.serial() }));
        }
        if catalog.serial() == cur.serial() {
            if catalog.manifest_digest != cur.manifest_digest {
                return Err(fail(AirgapError::Equivocation(format!(
                    "this bundle's manifest has serial {} with other bytes than the serial {} this relay holds: refused as an equivocation (two manifests signed under one serial)",
                    catalog.serial(),
                    cur.serial()
                ))));
            }
            changed = false;
        }
    }
    // Pinned before anything moves: the disk budget must not evict what is
    // being adopted (on an offline relay nothing could bring it back).
    store.add_pins(catalog.objects().flat_map(|o| [o.sha256, o.chunks_sha256]));
    for f in &ready.files {
        let staged = staging.file(&f.sha256);
        if store.contains(&f.sha256) {
            let _ = fs::remove_file(&staged);
            continue;
        }
        match store.adopt(&staged, &f.sha256, f.size) {
            Ok(()) => {}
            // Counted as held when the import checked, and gone since
            // (evicted before this adoption began, or removed by hand).
            Err(crate::store::StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(fail(AirgapError::Failed(format!(
                    "object {} was held when the bundle was checked and is gone now (evicted under storage.max_size?); import the bundle again",
                    f.sha256
                ))));
            }
            Err(e) => return Err(fail(AirgapError::Failed(format!("cannot adopt {}: {e}", staged.display())))),
        }
    }
    crate::store::sync_file_system(store.root())
        .map_err(|e| fail(AirgapError::io(format!("cannot sync {}", store.root().display()), e)))?;
    for d in &ready.deltas {
        if store.contains(&d.sha256) {
            record_delta(d).map_err(|e| fail(AirgapError::io("cannot record a delta", e)))?;
        }
    }
    let state = store.state_dir();
    if changed {
        pair::save(&state.join(SAVED_MANIFEST), &catalog.manifest_bytes, &catalog.signature)
            .map_err(|e| fail(AirgapError::io("cannot save the manifest", e)))?;
    }
    // Also when adopting again after a crash that followed the commit.
    if let Err(e) = History::in_state(&state).save(catalog.serial(), &catalog.manifest_bytes, &catalog.signature) {
        tracing::warn!(error = %e, "cannot keep the imported manifest in state/manifests");
    }
    Ok(Some(Adopted { ready, catalog, previous, changed }))
}

/// The outcome of [`adopt`], as `result.json` says it.
pub fn outcome(result: &Result<Option<Adopted>, Box<Refused>>) -> Option<Outcome> {
    match result {
        Ok(None) => None,
        Ok(Some(a)) => Some(Outcome {
            id: a.ready.id.clone(),
            result: if a.changed { "adopted" } else { "unchanged" }.into(),
            serial: Some(a.catalog.serial()),
            previous_serial: a.previous,
            code: None,
            message: None,
            exit_code: 0,
        }),
        Err(r) => Some(Outcome {
            id: r.id.clone().unwrap_or_default(),
            result: "refused".into(),
            serial: r.serial,
            previous_serial: None,
            code: Some(r.error.code().into()),
            message: Some(r.error.to_string()),
            exit_code: r.error.exit_code(),
        }),
    }
}

/// A delta recorder for a store no relay holds (the import command's own):
/// the index file the relay reads at start.
pub fn record_in_state(store: &Store) -> impl FnMut(&StagedDelta) -> io::Result<()> + '_ {
    move |d| {
        crate::actors::deltas::save_index_entry(
            &store.state_dir(),
            &d.from,
            &d.to,
            &DeltaInfo { sha256: d.sha256, size: d.size },
        )
    }
}
