//! `patchrelay import`: verify a bundle into the staging area, then adopt it
//! (or have the running relay adopt it), and `import --status`.
//!
//! The bundle is read once, front to back. Its header and manifest come
//! first, so a bundle that cannot be imported (signature, rollback, gap) is
//! refused before its bulk is read. Then each entry is checked as it streams
//! into staging: objects and chunk lists against the manifest, deltas by
//! rebuilding their targets from versions the relay holds and checking those.
//! Entries the relay (or an earlier, interrupted import) already has are read
//! and checked but not written again.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::format::{self, EntryKind, Header, TarError, TarReader};
use super::hashing::Hashing;
use super::parts::PartReader;
use super::progress::Show;
use super::stage::{self, Ready, StagedDelta, StagedFile, Staging};
use super::{AirgapError, Brought, Carried, Lack};
use crate::config::{Config, Role};
use crate::digest::Digest;
use crate::repo::catalog::{Catalog, ObjectInfo};
use crate::repo::manifest::MAX_MANIFEST_BYTES;
use crate::repo::pair;
use crate::repo::sign::PublicKey;
use crate::store::{Store, StoreError, StoreOptions};

const PIECE: usize = 1 << 20;
/// How long the import command waits for a running relay to adopt.
const ADOPT_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub force_gap: bool,
    pub show: Show,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// `imported`; `unchanged` (the relay held this serial and everything
    /// the bundle carries); `repaired` (it held this serial, and took in
    /// what it lacked of it).
    pub result: String,
    pub serial: u64,
    pub previous_serial: Option<u64>,
    pub since: Option<u64>,
    /// `stopped`: this command adopted the bundle; `running`: the relay did.
    pub relay: &'static str,
    pub brings: Vec<Brought>,
    /// Versions the manifest lists that the relay does not hold now.
    pub lacks: Vec<Lack>,
    pub bundle_bytes: u64,
    /// Files written into staging, and files that were already there or in
    /// the store (read and checked, not written again).
    pub files_written: u64,
    pub files_already_held: u64,
    pub seconds: f64,
}

/// The relay's store directory and pinned key, or why this config cannot import.
fn relay_parts(config: &Config) -> Result<(&Path, PublicKey), AirgapError> {
    if config.role() == Role::Origin {
        return Err(AirgapError::Usage(
            "import is for relays: this config is an origin, whose repository `patchrelay publish` writes".into(),
        ));
    }
    let storage = config.storage.as_ref().ok_or_else(|| AirgapError::Usage("a relay needs [storage] dir".into()))?;
    let trust = config.trust.as_ref().ok_or_else(|| AirgapError::Usage("a relay needs [trust] public_key".into()))?;
    Ok((&storage.dir, trust.public_key.0.clone()))
}

/// The manifest the relay at `dir` holds (saved by its last sync or
/// import), verified; one that no longer verifies (the key was changed) or
/// cannot be read counts as none, as the relay itself treats it at start.
fn held_manifest(dir: &Path, key: &PublicKey) -> Option<Catalog> {
    let path = dir.join("state").join(stage::SAVED_MANIFEST);
    match pair::load(&path, key) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "the relay's saved manifest is not usable; treating the relay as holding none");
            None
        }
    }
}

/// Whether the store at `dir` holds `digest` complete (`size` bytes).
fn in_store(dir: &Path, digest: &Digest, size: u64) -> bool {
    std::fs::metadata(crate::store::object_file(dir, digest)).is_ok_and(|m| m.len() == size)
}

/// The store, when no relay holds it; `None`: a relay is running on it.
fn open_store_if_free(config: &Config, dir: &Path) -> Result<Option<Store>, AirgapError> {
    let s = config.storage.as_ref();
    let opts = StoreOptions {
        memory_cache: 16 << 20,
        memory_object_max: 64 << 10,
        mmap: false,
        max_size: s.and_then(|s| s.max_size.map(|m| m.0)),
    };
    match Store::open(dir, &opts) {
        Ok((store, _)) => Ok(Some(store)),
        Err(StoreError::Locked { .. }) => Ok(None),
        Err(e) => Err(AirgapError::Failed(format!("cannot open the relay's store: {e}"))),
    }
}

fn tar_error(e: TarError, reader: &TarReader<PartReader>, expected: &str) -> AirgapError {
    match e {
        TarError::Truncated { at, inside } => {
            let part = reader_missing(reader);
            AirgapError::verification(
                expected,
                format!(
                    "the bundle is cut short: it ends after {at} bytes, inside {inside}{part}; copy it again from the connected side"
                ),
            )
        }
        TarError::BadHeader { at, why } => {
            AirgapError::verification(expected, format!("the bundle is damaged at byte {at}: {why}"))
        }
        TarError::Io { at, source } => AirgapError::Failed(format!("cannot read the bundle at byte {at}: {source}")),
    }
}

fn reader_missing(reader: &TarReader<PartReader>) -> String {
    let parts = reader.inner();
    match parts.missing_part() {
        Some(p) if parts.expected_parts > 0 => {
            format!(" (part {} of {}, {}, is missing)", parts.part() + 1, parts.expected_parts, p.display())
        }
        Some(p) => format!(" ({} is missing)", p.display()),
        None => String::new(),
    }
}

/// The next entry, which must be `path` of `size` bytes (`size` None: any up
/// to `limit`).
fn expect_entry(
    tar: &mut TarReader<PartReader>,
    path: &str,
    size: Option<u64>,
    limit: u64,
) -> Result<u64, AirgapError> {
    let head = tar.next_entry().map_err(|e| tar_error(e, tar, path))?.ok_or_else(|| {
        AirgapError::verification(path, "the bundle ends before this entry; copy it again from the connected side")
    })?;
    if head.path != path {
        return Err(AirgapError::verification(
            &head.path,
            format!("found where the bundle's header lists {path}: the bundle is reordered or damaged"),
        ));
    }
    if size.is_some_and(|s| s != head.size) || head.size > limit {
        return Err(AirgapError::verification(
            path,
            format!("{} bytes, the header says {}", head.size, size.map(|s| s.to_string()).unwrap_or("less".into())),
        ));
    }
    Ok(head.size)
}

fn read_whole(tar: &mut TarReader<PartReader>, path: &str) -> Result<Vec<u8>, AirgapError> {
    tar.read_all().map_err(|e| tar_error(e, tar, path))
}

/// The object named in an entry path `prefix<hex>`.
fn named(path: &str, prefix: &str) -> Option<Digest> {
    path.strip_prefix(prefix)?.parse().ok()
}

/// `import --config FILE BUNDLE`.
pub fn import(config: &Config, bundle: &Path, opts: &ImportOptions) -> Result<ImportReport, AirgapError> {
    let started = Instant::now();
    let (dir, key) = relay_parts(config)?;
    let reader = PartReader::open(bundle).map_err(|e| AirgapError::Failed(format!("cannot open the bundle: {e}")))?;
    let mut tar = TarReader::new(reader);

    // The header and its checksum.
    expect_entry(&mut tar, format::HEADER_NAME, None, format::MAX_HEADER_BYTES)?;
    let header_json = read_whole(&mut tar, format::HEADER_NAME)?;
    expect_entry(&mut tar, format::HEADER_SUM_NAME, None, 1024)?;
    let sum = read_whole(&mut tar, format::HEADER_SUM_NAME)?;
    if sum != Header::sum_line(&header_json) {
        return Err(AirgapError::verification(
            format::HEADER_NAME,
            "does not match its checksum (patchrelay-bundle.json.sha256): the bundle is damaged",
        ));
    }
    let header: Header = serde_json::from_slice(&header_json)
        .map_err(|e| AirgapError::verification(format::HEADER_NAME, format!("not a bundle header: {e}")))?;
    if header.format != format::FORMAT_NAME {
        return Err(AirgapError::verification(format::HEADER_NAME, "not a patchrelay bundle"));
    }
    if header.version != format::FORMAT_VERSION {
        return Err(AirgapError::Usage(format!(
            "bundle format {} is not one this patchrelay reads ({}); use the same patchrelay version on both sides",
            header.version,
            format::FORMAT_VERSION
        )));
    }
    tar.inner_mut().expected_parts = header.parts;

    // The manifest and its signature: verified before anything else is read.
    let mut entries = header.entries.iter();
    let (Some(me), Some(se)) = (entries.next(), entries.next()) else {
        return Err(AirgapError::verification(format::HEADER_NAME, "lists no manifest and signature"));
    };
    if me.kind != EntryKind::Manifest || se.kind != EntryKind::Signature {
        return Err(AirgapError::verification(format::HEADER_NAME, "does not begin with the manifest and signature"));
    }
    expect_entry(&mut tar, &me.path, Some(me.size), MAX_MANIFEST_BYTES)?;
    let manifest = Bytes::from(read_whole(&mut tar, &me.path)?);
    expect_entry(&mut tar, &se.path, Some(se.size), MAX_SIGNATURE)?;
    let signature = Bytes::from(read_whole(&mut tar, &se.path)?);
    let catalog = crate::repo::verify(&key, manifest.clone(), signature.clone()).map_err(|e| {
        AirgapError::verification(
            &me.path,
            format!("{e} (trust.public_key); the bundle was damaged, altered, or made for another origin"),
        )
    })?;
    if catalog.manifest_digest != header.manifest_sha256 || catalog.serial() != header.serial {
        return Err(AirgapError::verification(format::HEADER_NAME, "names another manifest than the one it carries"));
    }

    // Which relay: stopped (this command holds the store) or running.
    crate::store::check_owner(dir, "import").map_err(AirgapError::Usage)?;
    let store = open_store_if_free(config, dir)?;
    let staging = Staging::of(dir);
    let _lock = staging.lock()?;
    if staging.pending() {
        settle_pending(dir, &staging, store.as_ref(), &key)?;
    }
    let current = held_manifest(dir, &key);
    let previous = current.as_ref().map(Catalog::serial);
    let held = |d: &Digest, size: u64| -> bool {
        match &store {
            Some(s) => s.contains(d),
            None => in_store(dir, d, size),
        }
    };
    let holds = |d: &Digest| catalog.object(d).is_some_and(|o| held(d, o.size));
    check_order(&header, &catalog, current.as_ref(), opts.force_gap)?;
    let already = current.as_ref().is_some_and(|c| c.manifest_digest == catalog.manifest_digest);
    if already && catalog.objects().all(|o| held(&o.sha256, o.size) || !header_carries(&header, o)) {
        return Ok(ImportReport {
            result: "unchanged".into(),
            serial: catalog.serial(),
            previous_serial: previous,
            since: header.since.as_ref().map(|s| s.serial),
            relay: if store.is_some() { "stopped" } else { "running" },
            brings: Vec::new(),
            lacks: super::lacking(&catalog.manifest, holds),
            bundle_bytes: header.bundle_bytes,
            files_written: 0,
            files_already_held: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    // What may stay in staging: this bundle's files.
    let mut keep: HashSet<Digest> = HashSet::new();
    for o in catalog.objects() {
        keep.insert(o.sha256);
        keep.insert(o.chunks_sha256);
    }
    keep.extend(header.entries.iter().filter(|e| e.kind == EntryKind::Delta).map(|e| e.sha256));
    staging.keep_only(&keep);

    let mut run = Run {
        tar,
        staging: &staging,
        catalog: &catalog,
        held: &held,
        files: Vec::new(),
        listed: HashSet::new(),
        earlier: HashSet::new(),
        brought: HashMap::new(),
        deltas: Vec::new(),
        written: 0,
        reused: 0,
        hashing: Hashing::new(PIECE),
        bar: opts.show.bytes("importing", header.bundle_bytes),
        max_delta_target: config.delta.max_target_size.0,
        dir,
    };
    let mut unresolved: HashMap<Digest, String> = HashMap::new();
    for e in entries {
        run.bar.set_position(run.tar.offset());
        // Sizes are held to what the manifest allows before a byte is read:
        // nothing in the (unsigned) header sizes a buffer or a file.
        let limit = match e.kind {
            EntryKind::Manifest => return Err(AirgapError::verification(&e.path, "a second manifest")),
            EntryKind::Signature => MAX_SIGNATURE,
            EntryKind::Object | EntryKind::Chunks | EntryKind::Delta => u64::MAX,
        };
        expect_entry(&mut run.tar, &e.path, Some(e.size), limit)?;
        match e.kind {
            EntryKind::Manifest => {}
            EntryKind::Signature => {
                let data = read_whole(&mut run.tar, &e.path)?;
                if data != signature[..] {
                    return Err(AirgapError::verification(&e.path, "is not the manifest's signature"));
                }
            }
            EntryKind::Object => {
                let d = named(&e.path, "v1/objects/")
                    .filter(|d| *d == e.sha256)
                    .ok_or_else(|| AirgapError::verification(&e.path, "an object entry not named by its digest"))?;
                let info = catalog
                    .object(&d)
                    .ok_or_else(|| AirgapError::verification(&e.path, "an object the manifest does not list"))?;
                if e.size != info.size {
                    return Err(AirgapError::verification(
                        &e.path,
                        format!("{} bytes, the manifest says {}", e.size, info.size),
                    ));
                }
                if !held(&d, info.size) {
                    run.brought.insert(d, Carried::Object);
                }
                run.take(&e.path, d, info.size)?;
            }
            EntryKind::Chunks => {
                let of = named(&e.path, "v1/chunks/")
                    .ok_or_else(|| AirgapError::verification(&e.path, "a chunk list not named by its object"))?;
                let info = catalog.object(&of).ok_or_else(|| {
                    AirgapError::verification(&e.path, "the chunk list of an object the manifest does not list")
                })?;
                if e.size != info.chunk_list_len() {
                    return Err(AirgapError::verification(
                        &e.path,
                        format!("{} bytes, the manifest's object needs {}", e.size, info.chunk_list_len()),
                    ));
                }
                run.take(&e.path, info.chunks_sha256, info.chunk_list_len())?;
            }
            EntryKind::Delta => {
                if let Some((to, why)) = run.delta(e)? {
                    unresolved.entry(to).or_insert(why);
                }
            }
        }
    }
    run.bar.set_position(run.tar.offset());
    match run.tar.next_entry() {
        Ok(None) => {}
        Ok(Some(extra)) => {
            return Err(AirgapError::verification(&extra.path, "an entry the bundle's header does not list"));
        }
        Err(e) => return Err(tar_error(e, &run.tar, "the end of the bundle")),
    }
    run.bar.finish_and_clear();

    // What the relay would lack of what this manifest adds, judged from the
    // signed manifests and the files themselves, not from the header: a
    // version that is new in this manifest and neither held nor brought is
    // a gap (the only ones let through are of components a `--components`
    // export left out, and they are listed as lacking).
    let staged = |d: &Digest, size: u64| run.listed.contains(d) || held(d, size);
    let new_and_missing: Vec<crate::airgap::Lack> = super::lacking(&catalog.manifest, |d| {
        current.as_ref().is_some_and(|c| c.object(d).is_some()) || catalog.object(d).is_some_and(|o| staged(d, o.size))
    });
    let left_out =
        |component: &str| header.components.as_ref().is_some_and(|only| !only.iter().any(|c| c == component));
    let gap: Vec<&crate::airgap::Lack> = new_and_missing.iter().filter(|l| !left_out(&l.component)).collect();
    if !gap.is_empty() && !opts.force_gap {
        let names: Vec<String> = gap.iter().take(5).map(|l| format!("{} {}", l.component, l.version)).collect();
        let why = unresolved
            .values()
            .next()
            .map(|w| format!(" (deltas need versions it does not hold: {w})"))
            .unwrap_or_default();
        let relay = previous.map(|p| format!("serial {p}")).unwrap_or("no manifest".into());
        return Err(AirgapError::Gap(format!(
            "this bundle brings serial {} but not {} version(s) that serial adds and this relay ({relay}) does not hold: {}{}{why}. On the connected side run: patchrelay export --config relay.toml --output FILE --since-manifest FILE, with the FILE written here by `patchrelay import --config <this config> --status --write-manifest FILE`; or import this one with --force-gap",
            catalog.serial(),
            gap.len(),
            names.join(", "),
            if gap.len() > names.len() { ", ..." } else { "" },
        )));
    }
    let files = std::mem::take(&mut run.files);
    let deltas = std::mem::take(&mut run.deltas);
    let mut brings: Vec<Brought> = Vec::new();
    for (name, c) in &catalog.manifest.components {
        for v in &c.versions {
            if let Some(carried) = run.brought.get(&v.sha256) {
                brings.push(Brought {
                    component: name.to_string(),
                    version: v.version.to_string(),
                    sha256: v.sha256,
                    size: v.size,
                    carried: *carried,
                });
            }
        }
    }
    let (files_written, files_already_held) = (run.written, run.reused);
    drop(run);

    let id = random_id();
    let ready = Ready {
        id: id.clone(),
        serial: catalog.serial(),
        manifest_sha256: catalog.manifest_digest,
        files,
        deltas,
        brings,
    };
    staging.mark_ready(&ready, &manifest, &signature)?;
    let (outcome, relay) = match &store {
        Some(store) => (adopt_here(&staging, store, &key, current.as_ref())?, "stopped"),
        None => (wait_for_relay(config, dir, &staging, &id, &key)?, "running"),
    };
    if outcome.result == "refused" {
        return Err(AirgapError::Adoption {
            message: outcome.message.unwrap_or_else(|| "the relay refused the import (see its log)".into()),
            exit: outcome.exit_code,
        });
    }
    let result = match outcome.result.as_str() {
        "unchanged" if files_written > 0 => "repaired",
        "unchanged" => "unchanged",
        _ => "imported",
    };
    Ok(ImportReport {
        result: result.into(),
        serial: catalog.serial(),
        previous_serial: previous,
        since: header.since.as_ref().map(|s| s.serial),
        relay,
        brings: ready.brings,
        lacks: super::lacking(&catalog.manifest, |d| catalog.object(d).is_some_and(|o| in_store(dir, d, o.size))),
        bundle_bytes: header.bundle_bytes,
        files_written,
        files_already_held,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The largest signature entry (a signature file is about 90 bytes).
const MAX_SIGNATURE: u64 = 1024;

/// Whether the header lists `o` (whole or as a delta target).
fn header_carries(header: &Header, o: &ObjectInfo) -> bool {
    header.entries.iter().any(|e| e.sha256 == o.sha256 || e.to == Some(o.sha256))
}

/// Rollback, equivocation and gap: the bundle's place among the relay's serials.
fn check_order(
    header: &Header,
    catalog: &Catalog,
    current: Option<&Catalog>,
    force_gap: bool,
) -> Result<(), AirgapError> {
    let bundle = catalog.serial();
    let Some(cur) = current else {
        return match &header.since {
            Some(since) if !force_gap => Err(AirgapError::Gap(format!(
                "this relay holds no manifest yet, and this bundle is incremental (serial {bundle}, made --since {}): import a full bundle first (on the connected side: patchrelay export --config relay.toml --output FILE, without --since), or import this one with --force-gap",
                since.serial
            ))),
            _ => Ok(()),
        };
    };
    let relay = cur.serial();
    if bundle < relay {
        return Err(AirgapError::Rollback { bundle, relay });
    }
    if bundle == relay && catalog.manifest_digest != cur.manifest_digest {
        return Err(AirgapError::Equivocation(format!(
            "this bundle's manifest has serial {bundle}, the serial this relay holds, but other bytes: refused as an equivocation (two manifests signed under one serial)"
        )));
    }
    if let Some(since) = &header.since
        && bundle > relay
    {
        if relay < since.serial && !force_gap {
            return Err(AirgapError::Gap(format!(
                "this bundle brings serial {bundle} for a relay at serial {} or newer (made --since {}), but this relay is at serial {relay}: what was published between {relay} and {} would be missing. On the connected side run: patchrelay export --config relay.toml --output FILE --since {relay} (or --since-manifest FILE, written here by `patchrelay import --config <this config> --status --write-manifest FILE`); or import this one with --force-gap",
                since.serial, since.serial, since.serial
            )));
        }
        if relay == since.serial && cur.manifest_digest != since.manifest_sha256 {
            return Err(AirgapError::Equivocation(format!(
                "this bundle was made against a manifest with serial {relay} whose bytes differ from the serial {relay} this relay holds (two manifests signed under one serial): refused"
            )));
        }
    }
    Ok(())
}

/// The state of one pass over the bundle's entries.
struct Run<'a, H: Fn(&Digest, u64) -> bool> {
    tar: TarReader<PartReader>,
    staging: &'a Staging,
    catalog: &'a Catalog,
    held: &'a H,
    /// What adoption takes in: every file staged or found held.
    files: Vec<StagedFile>,
    /// Digests in `files`.
    listed: HashSet<Digest>,
    /// Files an earlier, interrupted import staged, checked by this run.
    earlier: HashSet<Digest>,
    /// Objects this bundle brings that the relay did not hold, and how.
    brought: HashMap<Digest, Carried>,
    deltas: Vec<StagedDelta>,
    written: u64,
    reused: u64,
    hashing: Hashing,
    bar: indicatif::ProgressBar,
    max_delta_target: u64,
    dir: &'a Path,
}

impl<H: Fn(&Digest, u64) -> bool> Run<'_, H> {
    fn list(&mut self, sha256: Digest, size: u64) {
        if self.listed.insert(sha256) {
            self.files.push(StagedFile { sha256, size });
        }
    }

    /// Whether the relay holds `digest`, or this import staged it (one an
    /// earlier import left is hashed first: see `Staging::recheck`).
    fn have(&mut self, digest: &Digest, size: u64) -> bool {
        if (self.held)(digest, size) || self.listed.contains(digest) || self.earlier.contains(digest) {
            return true;
        }
        if self.staging.has(digest, size) && self.staging.recheck(digest, size) {
            self.earlier.insert(*digest);
            return true;
        }
        false
    }

    /// Take the current entry as the file `digest` of `size` bytes: checked,
    /// and staged unless the relay or staging has it.
    fn take(&mut self, path: &str, digest: Digest, size: u64) -> Result<(), AirgapError> {
        let mut w = if self.have(&digest, size) { None } else { Some(self.staging.writer(digest, size)?) };
        self.hashing.start(None);
        loop {
            let mut buf = self.hashing.buffer();
            let n = match self.tar.read_data(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    self.hashing.unused(buf);
                    return Err(tar_error(e, &self.tar, path));
                }
            };
            if n == 0 {
                self.hashing.unused(buf);
                break;
            }
            if let Some(w) = &mut w {
                w.write(&buf[..n]).map_err(|e| AirgapError::io("cannot write into staging", e))?;
            }
            self.hashing.piece(buf, n);
            self.bar.inc(n as u64);
        }
        let (actual, _) = self.hashing.finish();
        match w {
            Some(w) => {
                w.finish(actual).map_err(|e| e.at(path, ""))?;
                self.written += 1;
            }
            None if actual != digest => {
                return Err(AirgapError::verification(
                    path,
                    format!("content hashes to {actual}, the manifest says {digest}: the bundle is damaged"),
                ));
            }
            None => self.reused += 1,
        }
        self.list(digest, size);
        Ok(())
    }

    /// A delta entry: checked, staged for serving, and its target rebuilt if
    /// the relay lacks it. `Some((target, why))`: the target could not be
    /// rebuilt from this delta (its base is not held); another delta may.
    fn delta(&mut self, e: &format::Entry) -> Result<Option<(Digest, String)>, AirgapError> {
        let path = e.path.as_str();
        let (Some(from), Some(to)) = (e.from, e.to) else {
            return Err(AirgapError::verification(path, "a delta without its from and to"));
        };
        let target = self
            .catalog
            .object(&to)
            .ok_or_else(|| AirgapError::verification(path, "a delta to an object the manifest does not list"))?
            .clone();
        if e.size >= target.size.max(1) || target.size > self.max_delta_target {
            return Err(AirgapError::verification(
                path,
                "a delta no smaller than its target, or to a target over delta.max_target_size",
            ));
        }
        let data = read_whole(&mut self.tar, path)?;
        self.bar.inc(data.len() as u64);
        let actual = Digest::of(&data);
        if actual != e.sha256 {
            return Err(AirgapError::verification(
                path,
                format!("content hashes to {actual}, the header says {}: the bundle is damaged", e.sha256),
            ));
        }
        let h = crate::delta::read_header(&data).map_err(|err| AirgapError::verification(path, err.to_string()))?;
        if !h.base.matches(&from) || !h.target.matches(&to) || h.target_len != target.size {
            return Err(AirgapError::verification(path, "the delta is for other versions than the header says"));
        }
        if !self.have(&e.sha256, e.size) {
            let mut w = self.staging.writer(e.sha256, e.size)?;
            w.write(&data).map_err(|err| AirgapError::io("cannot write into staging", err))?;
            w.finish(actual).map_err(|err| err.at(path, ""))?;
        }
        self.list(e.sha256, e.size);
        if self.catalog.object(&from).is_some() {
            self.deltas.push(StagedDelta { from, to, sha256: e.sha256, size: e.size });
        }
        let chunks_len = target.chunk_list_len();
        if self.have(&to, target.size) && self.have(&target.chunks_sha256, chunks_len) {
            self.list(to, target.size);
            self.list(target.chunks_sha256, chunks_len);
            return Ok(None);
        }
        // The base: in the store, or staged by this import; no larger than
        // what a delta may take (its size is the header's, not the manifest's).
        let base_path = [crate::store::object_file(self.dir, &from), self.staging.file(&from)]
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == h.base_len));
        let Some(base_path) = base_path.filter(|_| h.base_len <= self.max_delta_target) else {
            return Ok(Some((to, format!("{} needs base {from}", target.sha256))));
        };
        let base = std::fs::read(&base_path)
            .map_err(|err| AirgapError::io(format!("cannot read {}", base_path.display()), err))?;
        let rebuilt = crate::delta::apply(&base, &data, target.size)
            .map_err(|err| AirgapError::verification(path, format!("rebuilding {to} from {from}: {err}")))?;
        let mut chunks = Vec::with_capacity(chunks_len as usize);
        for block in rebuilt.chunks(target.chunk_size as usize) {
            chunks.extend_from_slice(Digest::of(block).as_bytes());
        }
        let mut w = self.staging.writer(to, target.size)?;
        w.write(&rebuilt).map_err(|err| AirgapError::io("cannot write into staging", err))?;
        w.finish(Digest::of(&rebuilt)).map_err(|err| err.at(path, "the rebuilt target: "))?;
        let mut w = self.staging.writer(target.chunks_sha256, chunks_len)?;
        w.write(&chunks).map_err(|err| AirgapError::io("cannot write into staging", err))?;
        w.finish(Digest::of(&chunks)).map_err(|err| err.at(path, "the rebuilt target's chunk list: "))?;
        self.written += 2;
        self.list(to, target.size);
        self.list(target.chunks_sha256, chunks_len);
        self.brought.insert(to, Carried::Delta);
        Ok(None)
    }
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Adopt in this process (the relay is stopped: this command holds its store).
fn adopt_here(
    staging: &Staging,
    store: &Store,
    key: &PublicKey,
    current: Option<&Catalog>,
) -> Result<stage::Outcome, AirgapError> {
    let mut record = stage::record_in_state(store);
    let result = stage::adopt(staging, store, key, current, &mut record);
    let outcome = stage::outcome(&result)
        .ok_or_else(|| AirgapError::Failed("the staged import vanished before it was adopted".into()))?;
    staging.finish(&outcome);
    Ok(outcome)
}

/// A relay runs on the store: it adopts the import within a second or two.
/// Should it stop meanwhile, this command adopts it itself.
fn wait_for_relay(
    config: &Config,
    dir: &Path,
    staging: &Staging,
    id: &str,
    key: &PublicKey,
) -> Result<stage::Outcome, AirgapError> {
    let deadline = Instant::now() + ADOPT_WAIT;
    let mut gone_since: Option<Instant> = None;
    loop {
        if let Some(o) = staging.result_for(id) {
            return Ok(o);
        }
        if let Some(store) = open_store_if_free(config, dir)? {
            let current = held_manifest(dir, key);
            return adopt_here(staging, &store, key, current.as_ref());
        }
        // Taken up, and over, with no result for this import: the relay
        // could not read what was staged (its log says why).
        if !staging.pending() {
            let since = *gone_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(2) {
                return Err(AirgapError::Failed(
                    "the running relay took up the staged import and left no result for it (see its log); import again"
                        .into(),
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(AirgapError::Failed(format!(
                "the bundle is verified and staged, but the running relay has not adopted it within {} s (see its log); it will when it next starts",
                ADOPT_WAIT.as_secs()
            )));
        }
        #[allow(clippy::disallowed_methods)] // a command, not an async worker
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An import staged before this one and not adopted yet: a running relay
/// is given a moment to take it; a stopped one's is adopted now.
fn settle_pending(dir: &Path, staging: &Staging, store: Option<&Store>, key: &PublicKey) -> Result<(), AirgapError> {
    if let Some(store) = store {
        let current = held_manifest(dir, key);
        let outcome = adopt_here(staging, store, key, current.as_ref())?;
        tracing::info!(result = %outcome.result, serial = ?outcome.serial, "adopted an import staged earlier");
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while staging.pending() {
        if Instant::now() > deadline {
            return Err(AirgapError::Failed(format!(
                "an earlier import waits in {} for the running relay to adopt it; see the relay's log",
                staging.dir().display()
            )));
        }
        #[allow(clippy::disallowed_methods)] // a command, not an async worker
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What `import --status` says, and what `--write-manifest` writes for the
/// connected side's `export --since-manifest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub format: String,
    pub version: u32,
    pub written_at: String,
    pub serial: Option<u64>,
    pub manifest_sha256: Option<Digest>,
    pub generated_at: Option<String>,
    /// The manifest's exact bytes and its signature, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Versions the manifest lists that the relay does not hold: an export
    /// `--since-manifest` this file carries them again.
    pub lacks: Vec<Lack>,
    /// An import waits for the running relay to adopt it.
    pub import_pending: bool,
}

pub const STATUS_FORMAT: &str = "patchrelay-status";

/// `import --status [--write-manifest FILE]`.
pub fn status(config: &Config, write_manifest: Option<&Path>) -> Result<Status, AirgapError> {
    use base64::Engine as _;
    let (dir, key) = relay_parts(config)?;
    let current = held_manifest(dir, &key);
    let b64 = base64::engine::general_purpose::STANDARD;
    let status = Status {
        format: STATUS_FORMAT.into(),
        version: 1,
        written_at: crate::repo::manifest::format_time(std::time::SystemTime::now()),
        serial: current.as_ref().map(Catalog::serial),
        manifest_sha256: current.as_ref().map(|c| c.manifest_digest),
        generated_at: current.as_ref().map(|c| c.manifest.generated_at.clone()),
        manifest: current.as_ref().map(|c| b64.encode(&c.manifest_bytes)),
        signature: current.as_ref().map(|c| b64.encode(&c.signature)),
        lacks: current
            .as_ref()
            .map(|c| super::lacking(&c.manifest, |d| c.object(d).is_some_and(|o| in_store(dir, d, o.size))))
            .unwrap_or_default(),
        import_pending: Staging::of(dir).pending(),
    };
    if let Some(path) = write_manifest {
        if current.is_none() {
            return Err(AirgapError::Usage(
                "this relay holds no manifest yet: nothing to write; import a full bundle first".into(),
            ));
        }
        let json = serde_json::to_vec_pretty(&status).map_err(|e| AirgapError::Failed(e.to_string()))?;
        crate::store::atomic::write_atomic(path, &json)
            .map_err(|e| AirgapError::io(format!("cannot write {}", path.display()), e))?;
    }
    Ok(status)
}

/// The manifest a `--since-manifest` file names: a status file, or a
/// manifest as served at `/v1/manifest` (its signature beside it as
/// `FILE.sig`, or not checked). Verified under `key` when there is one.
pub fn read_since_manifest(
    path: &Path,
    key: Option<&PublicKey>,
) -> Result<(crate::repo::manifest::Manifest, Digest, HashSet<Digest>), AirgapError> {
    use base64::Engine as _;
    let raw = std::fs::read(path).map_err(|e| AirgapError::io(format!("cannot read {}", path.display()), e))?;
    let name = path.display().to_string();
    let (manifest, signature, lacks) = match serde_json::from_slice::<Status>(&raw) {
        Ok(s) if s.format == STATUS_FORMAT => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let (Some(m), Some(sig)) = (s.manifest, s.signature) else {
                return Err(AirgapError::Usage(format!("{name}: the relay that wrote it held no manifest")));
            };
            let m = b64.decode(m).map_err(|e| AirgapError::verification(&name, format!("manifest: {e}")))?;
            let sig = b64.decode(sig).map_err(|e| AirgapError::verification(&name, format!("signature: {e}")))?;
            (m, Some(sig), s.lacks.into_iter().map(|l| l.sha256).collect())
        }
        _ => {
            let mut sig_path = path.as_os_str().to_owned();
            sig_path.push(".sig");
            (raw, std::fs::read(sig_path).ok(), HashSet::new())
        }
    };
    let digest = Digest::of(&manifest);
    let parsed = match (key, signature) {
        (Some(key), Some(sig)) => {
            crate::repo::verify(key, Bytes::from(manifest), Bytes::from(sig))
                .map_err(|e| AirgapError::verification(&name, e.to_string()))?
                .manifest
        }
        _ => crate::repo::manifest::Manifest::parse(&manifest)
            .map_err(|e| AirgapError::verification(&name, e.to_string()))?,
    };
    Ok((parsed, digest, lacks))
}
