//! `patchrelay export`: write a bundle from a relay or a published repository.
//!
//! Three phases, each with its progress bar: objects the relay lacks are
//! fetched from its upstreams (through the fill, so verified as any fill is:
//! into the relay's own store when it is stopped, into a scratch store beside
//! it when it runs); deltas are computed (incremental bundles: from the
//! versions the other side holds to the versions it lacks, kept where smaller
//! than the object); then the bundle is written in one pass, every object
//! hashed on the way out and checked against the manifest, so a damaged
//! store cannot put a damaged object on the media.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::format::{self, Entry, EntryKind, Header, Since, TarWriter};
use super::hashing::Hashing;
use super::parts::PartWriter;
use super::progress::Show;
use super::{AirgapError, Brought, Carried};
use crate::config::{Config, Role};
use crate::digest::Digest;
use crate::repo::catalog::{Catalog, ObjectInfo};
use crate::repo::history::History;
use crate::repo::manifest::Manifest;
use crate::repo::sign::PublicKey;
use crate::repo::{self, RepoDir, pair};
use crate::store::{Store, StoreError, StoreOptions};

const PIECE: usize = 1 << 20;
/// Bases tried for each version carried by delta (the newest the other side holds).
const MAX_BASES: usize = 8;

/// Where to export from.
pub enum ExportFrom<'a> {
    /// A relay's store (`--config`).
    Relay(&'a Config),
    /// A published repository (`--repository`).
    Repository(&'a Path),
}

/// What the other side holds.
#[derive(Debug, Clone)]
pub enum SinceArg {
    /// A serial whose manifest this side kept (`state/manifests/<n>`).
    Serial(u64),
    /// The other side's manifest (`import --status --write-manifest`).
    Manifest(PathBuf),
}

#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    pub since: Option<SinceArg>,
    pub components: Option<Vec<String>>,
    pub max_part: Option<u64>,
    pub show: Show,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub files: Vec<PathBuf>,
    pub serial: u64,
    pub since: Option<u64>,
    pub components: Vec<String>,
    pub brings: Vec<Brought>,
    pub objects: usize,
    pub deltas: usize,
    pub bundle_bytes: u64,
    /// What the versions brought take as whole objects.
    pub full_bytes: u64,
    /// Objects fetched from upstream before writing.
    pub fetched: usize,
    pub seconds: f64,
}

/// Where objects are read from.
struct Place {
    /// A relay's store directory, or `None` for a repository.
    store: Option<PathBuf>,
    repo: Option<RepoDir>,
    /// Objects fetched for this export, when the relay runs.
    scratch: Option<PathBuf>,
}

impl Place {
    fn object(&self, d: &Digest) -> Option<PathBuf> {
        let mut candidates = Vec::new();
        if let Some(root) = &self.store {
            candidates.push(crate::store::object_file(root, d));
        }
        if let Some(repo) = &self.repo {
            candidates.push(repo.object(d));
        }
        if let Some(root) = &self.scratch {
            candidates.push(crate::store::object_file(root, d));
        }
        candidates.into_iter().find(|p| p.exists())
    }

    fn has(&self, info: &ObjectInfo) -> bool {
        self.object(&info.sha256).and_then(|p| std::fs::metadata(p).ok()).is_some_and(|m| m.len() == info.size)
    }

    /// The chunk list file of `info`, if this side has it.
    fn chunks(&self, info: &ObjectInfo) -> Option<PathBuf> {
        let mut candidates = Vec::new();
        if let Some(repo) = &self.repo {
            candidates.push(repo.chunks(&info.sha256));
        }
        for root in [&self.store, &self.scratch].into_iter().flatten() {
            candidates.push(crate::store::object_file(root, &info.chunks_sha256));
        }
        candidates.into_iter().find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == info.chunk_list_len()))
    }
}

/// The other side's manifest, and the objects it holds: what it lists,
/// less what it says it lacks.
struct Other {
    serial: u64,
    digest: Digest,
    manifest: Manifest,
    held: HashSet<Digest>,
}

impl Other {
    fn new(manifest: Manifest, digest: Digest, lacks: &HashSet<Digest>) -> Other {
        let held = manifest
            .components
            .values()
            .flat_map(|c| c.versions.iter().map(|v| v.sha256))
            .filter(|d| !lacks.contains(d))
            .collect();
        Other { serial: manifest.serial, digest, manifest, held }
    }

    fn holds(&self, d: &Digest) -> bool {
        self.held.contains(d)
    }
}

/// Removes a directory when dropped (scratch space of one export).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `export`: see the module comment.
pub fn export(from: ExportFrom<'_>, output: &Path, opts: &ExportOptions) -> Result<ExportReport, AirgapError> {
    let started = Instant::now();
    let (catalog, key, state, mut place) = source(&from)?;
    let other = match &opts.since {
        None => None,
        Some(SinceArg::Serial(n)) => Some(kept_manifest(&state, *n, key.as_ref(), catalog.serial())?),
        Some(SinceArg::Manifest(path)) => {
            let (manifest, digest, lacks) = super::import::read_since_manifest(path, key.as_ref())?;
            Some(Other::new(manifest, digest, &lacks))
        }
    };
    if let Some(o) = &other
        && o.serial > catalog.serial()
    {
        return Err(AirgapError::Usage(format!(
            "the other side is at serial {}, newer than the {} this side holds: sync this side first (patchrelay sync)",
            o.serial,
            catalog.serial()
        )));
    }
    let components = chosen_components(&catalog, opts.components.as_deref())?;

    // What crosses: every version of the chosen components the other side lacks.
    let mut needed: Vec<(String, String, ObjectInfo)> = Vec::new();
    let mut seen = HashSet::new();
    let mut brought: Vec<(String, String, Digest, u64)> = Vec::new();
    for name in &components {
        let Some((_, c)) = catalog.component(name) else { continue };
        let mut versions: Vec<_> = c.versions.iter().collect();
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        for v in versions {
            if other.as_ref().is_some_and(|o| o.holds(&v.sha256)) {
                continue;
            }
            let Some(info) = catalog.object(&v.sha256) else { continue };
            brought.push((name.clone(), v.version.to_string(), v.sha256, v.size));
            if seen.insert(v.sha256) {
                needed.push((name.clone(), v.version.to_string(), info.clone()));
            }
        }
    }

    // Deltas: for versions the other side lacks, from versions it holds.
    let mut jobs: Vec<(ObjectInfo, ObjectInfo, bool)> = Vec::new();
    let max_target = match &from {
        ExportFrom::Relay(c) => c.delta.max_target_size.0,
        ExportFrom::Repository(_) => crate::config::DeltaConfig::default().max_target_size.0,
    };
    if let Some(o) = &other {
        for (name, _, target) in &needed {
            let Some((_, c)) = catalog.component(name) else { continue };
            if target.size == 0 || target.size > max_target {
                continue;
            }
            let latest = c.latest_entry().is_some_and(|l| l.sha256 == target.sha256);
            let mut bases: Vec<_> = o
                .manifest
                .components
                .get(name.as_str())
                .map(|oc| oc.versions.iter().filter(|v| o.holds(&v.sha256) && v.sha256 != target.sha256).collect())
                .unwrap_or_default();
            bases.sort_by(|a, b| b.version.cmp(&a.version));
            let mut digests = HashSet::new();
            for b in bases {
                let Some(info) = catalog.object(&b.sha256) else { continue };
                if info.size <= max_target && digests.insert(b.sha256) && digests.len() <= MAX_BASES {
                    jobs.push((info.clone(), target.clone(), latest));
                }
            }
        }
    }

    // Fetch what this side lacks: the objects to carry and the delta bases.
    let mut missing: Vec<ObjectInfo> = needed.iter().map(|(_, _, i)| i.clone()).filter(|i| !place.has(i)).collect();
    for (base, _, _) in &jobs {
        if !place.has(base) && !missing.iter().any(|m| m.sha256 == base.sha256) {
            missing.push(base.clone());
        }
    }
    let fetched = missing.len();
    let _fetch_store = match (&from, missing.is_empty()) {
        (_, true) => None,
        (ExportFrom::Repository(repo), false) => {
            return Err(AirgapError::Failed(format!(
                "the repository {} lacks {} object(s) its manifest lists (first: {}); publish it again or restore them",
                repo.display(),
                missing.len(),
                missing[0].sha256
            )));
        }
        (ExportFrom::Relay(config), false) => Some(fetch(config, &missing, &mut place, opts.show)?),
    };

    // Compute the deltas, keep those smaller than their targets.
    let scratch = Scratch(scratch_dir(output)?);
    let made = build_deltas(&jobs, &place, &state, &scratch.0, workers(&from), opts.show)?;
    let mut by_target: HashMap<Digest, Vec<(Digest, MadeDelta)>> = HashMap::new();
    for ((base, target, _), d) in jobs.iter().zip(made) {
        if let Some(d) = d
            && d.size < target.size
        {
            by_target.entry(target.sha256).or_default().push((base.sha256, d));
        }
    }
    let mut deltas: Vec<(Digest, Digest, MadeDelta)> = Vec::new();
    for (target, mut list) in by_target {
        list.sort_by_key(|(_, d)| d.size);
        let latest = jobs.iter().any(|(_, t, latest)| t.sha256 == target && *latest);
        // The latest: every base's delta, for the agents on each; other
        // versions: the smallest, to rebuild them.
        if !latest {
            list.truncate(1);
        }
        deltas.extend(list.into_iter().map(|(b, d)| (b, target, d)));
    }
    deltas.sort_by_key(|d| (d.1, d.2.size));
    let by_delta: HashSet<Digest> = deltas.iter().map(|(_, t, _)| *t).collect();

    // The header.
    let manifest_digest = catalog.manifest_digest;
    let mut entries = vec![
        Entry {
            path: repo::MANIFEST_PATH.into(),
            kind: EntryKind::Manifest,
            size: catalog.manifest_bytes.len() as u64,
            sha256: manifest_digest,
            from: None,
            to: None,
        },
        Entry {
            path: repo::SIGNATURE_PATH.into(),
            kind: EntryKind::Signature,
            size: catalog.signature.len() as u64,
            sha256: catalog.signature_digest,
            from: None,
            to: None,
        },
        Entry {
            path: repo::signature_path(&manifest_digest),
            kind: EntryKind::Signature,
            size: catalog.signature.len() as u64,
            sha256: catalog.signature_digest,
            from: None,
            to: None,
        },
    ];
    let whole: Vec<&ObjectInfo> = needed.iter().map(|(_, _, i)| i).filter(|i| !by_delta.contains(&i.sha256)).collect();
    for info in &whole {
        entries.push(Entry {
            path: repo::object_path(&info.sha256),
            kind: EntryKind::Object,
            size: info.size,
            sha256: info.sha256,
            from: None,
            to: None,
        });
        entries.push(Entry {
            path: repo::chunks_path(&info.sha256),
            kind: EntryKind::Chunks,
            size: info.chunk_list_len(),
            sha256: info.chunks_sha256,
            from: None,
            to: None,
        });
    }
    for (b, t, d) in &deltas {
        entries.push(Entry {
            path: format!("v1/deltas/{}", d.sha256),
            kind: EntryKind::Delta,
            size: d.size,
            sha256: d.sha256,
            from: Some(*b),
            to: Some(*t),
        });
    }
    let brings: Vec<Brought> = brought
        .iter()
        .map(|(c, v, d, size)| Brought {
            component: c.clone(),
            version: v.clone(),
            sha256: *d,
            size: *size,
            carried: if by_delta.contains(d) { Carried::Delta } else { Carried::Object },
        })
        .collect();
    let mut header = Header {
        format: format::FORMAT_NAME.into(),
        version: format::FORMAT_VERSION,
        created_at: crate::repo::manifest::format_time(std::time::SystemTime::now()),
        created_by: concat!("patchrelay ", env!("CARGO_PKG_VERSION")).into(),
        serial: catalog.serial(),
        manifest_sha256: manifest_digest,
        since: other.as_ref().map(|o| Since { serial: o.serial, manifest_sha256: o.digest }),
        components: opts.components.clone(),
        bundle_bytes: 0,
        parts: 0,
        max_part: opts.max_part,
        brings: brings.clone(),
        entries,
    };
    header.settle_length(opts.max_part);

    // One pass.
    let mtime = catalog.generated_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let json = header.to_json();
    let bar = opts.show.bytes("writing", header.bundle_bytes);
    let mut w = TarWriter::new(PartWriter::new(output, opts.max_part), mtime);
    let out_err = |e: std::io::Error| AirgapError::io(format!("cannot write {}", output.display()), e);
    w.entry(format::HEADER_NAME, &json).map_err(out_err)?;
    w.entry(format::HEADER_SUM_NAME, &Header::sum_line(&json)).map_err(out_err)?;
    w.entry(repo::MANIFEST_PATH, &catalog.manifest_bytes).map_err(out_err)?;
    w.entry(repo::SIGNATURE_PATH, &catalog.signature).map_err(out_err)?;
    w.entry(&repo::signature_path(&manifest_digest), &catalog.signature).map_err(out_err)?;
    let hashing = Hashing::new(PIECE);
    for info in &whole {
        let chunks = write_object(&mut w, &place, info, &hashing, &bar)?;
        w.entry(&repo::chunks_path(&info.sha256), &chunks).map_err(out_err)?;
        bar.inc(chunks.len() as u64);
    }
    for (_, _, d) in &deltas {
        let data =
            std::fs::read(&d.path).map_err(|e| AirgapError::io(format!("cannot read {}", d.path.display()), e))?;
        if Digest::of(&data) != d.sha256 {
            return Err(AirgapError::Failed(format!("the delta computed at {} changed on disk", d.path.display())));
        }
        w.entry(&format!("v1/deltas/{}", d.sha256), &data).map_err(out_err)?;
        bar.inc(data.len() as u64);
    }
    let parts = w.finish().map_err(out_err)?;
    if parts.written() != header.bundle_bytes {
        return Err(AirgapError::Failed(format!(
            "wrote {} bytes where the header says {}: a bug; the bundle was not kept",
            parts.written(),
            header.bundle_bytes
        )));
    }
    let files = parts.finish().map_err(out_err)?;
    bar.finish_and_clear();
    Ok(ExportReport {
        files,
        serial: catalog.serial(),
        since: other.as_ref().map(|o| o.serial),
        components,
        brings,
        objects: whole.len(),
        deltas: deltas.len(),
        bundle_bytes: header.bundle_bytes,
        full_bytes: needed.iter().map(|(_, _, i)| i.size).sum(),
        fetched,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The catalog to export, the key to check other manifests with (a relay's
/// pinned key; none for a repository, whose own manifest is read as it is),
/// the state directory (kept manifests, stored deltas), and where objects are.
fn source(from: &ExportFrom<'_>) -> Result<(Catalog, Option<PublicKey>, PathBuf, Place), AirgapError> {
    match from {
        ExportFrom::Relay(config) => {
            if config.role() == Role::Origin {
                return Err(AirgapError::Usage(
                    "this config is an origin: export its repository with --repository DIR".into(),
                ));
            }
            let storage =
                config.storage.as_ref().ok_or_else(|| AirgapError::Usage("a relay needs [storage]".into()))?;
            let key = config
                .trust
                .as_ref()
                .map(|t| t.public_key.0.clone())
                .ok_or_else(|| AirgapError::Usage("a relay needs [trust] public_key".into()))?;
            let state = storage.dir.join("state");
            let catalog = pair::load(&state.join(super::stage::SAVED_MANIFEST), &key)
                .map_err(|e| AirgapError::Failed(format!("the relay's saved manifest: {e}")))?
                .ok_or_else(|| {
                    AirgapError::Usage(format!(
                        "the relay at {} holds no verified manifest yet: start it (or run `patchrelay sync`) first",
                        storage.dir.display()
                    ))
                })?;
            let place = Place { store: Some(storage.dir.clone()), repo: None, scratch: None };
            Ok((catalog, Some(key), state, place))
        }
        ExportFrom::Repository(dir) => {
            let repo = RepoDir::new(dir);
            let (m, s) = repo::read_pair(&repo)
                .map_err(|e| AirgapError::Failed(format!("cannot read the repository: {e}")))?
                .ok_or_else(|| {
                    AirgapError::Usage(format!("{} has no manifest: `patchrelay publish` into it first", dir.display()))
                })?;
            let parsed = Manifest::parse(&m)
                .map_err(|e| AirgapError::verification(repo.manifest().display().to_string(), e.to_string()))?;
            let state = repo.state_dir();
            let place = Place { store: None, repo: Some(repo), scratch: None };
            Ok((Catalog::new(parsed, m, s), None, state, place))
        }
    }
}

/// The manifest kept for serial `n` on this side.
fn kept_manifest(state: &Path, n: u64, key: Option<&PublicKey>, current: u64) -> Result<Other, AirgapError> {
    let history = History::in_state(state);
    let (m, s) = history.load(n).map_err(|e| AirgapError::Failed(format!("cannot read a kept manifest: {e}")))?.ok_or_else(|| {
        let kept = history.serials();
        let range = match (kept.first(), kept.last()) {
            (Some(a), Some(b)) => format!("serials {a} to {b} are kept"),
            _ => "none are kept".into(),
        };
        let hint = if n > current {
            format!("this side holds serial {current}, older than {n}: sync it first")
        } else {
            "use --since-manifest FILE, written on the other side by `patchrelay import --config <its config> --status --write-manifest FILE`".into()
        };
        AirgapError::Usage(format!("the manifest of serial {n} is not kept here ({range} in {}): {hint}", history.dir().display()))
    })?;
    let digest = Digest::of(&m);
    let manifest = match key {
        Some(key) => {
            repo::verify(key, m, s)
                .map_err(|e| AirgapError::verification(format!("kept manifest {n}"), e.to_string()))?
                .manifest
        }
        None => {
            Manifest::parse(&m).map_err(|e| AirgapError::verification(format!("kept manifest {n}"), e.to_string()))?
        }
    };
    Ok(Other::new(manifest, digest, &HashSet::new()))
}

fn chosen_components(catalog: &Catalog, wanted: Option<&[String]>) -> Result<Vec<String>, AirgapError> {
    let all: Vec<String> = catalog.manifest.components.keys().map(|k| k.to_string()).collect();
    let Some(wanted) = wanted else { return Ok(all) };
    let mut out = Vec::new();
    for w in wanted {
        if !all.contains(w) {
            return Err(AirgapError::Usage(format!(
                "no component {w:?} in serial {}; it has: {}",
                catalog.serial(),
                all.join(", ")
            )));
        }
        if !out.contains(w) {
            out.push(w.clone());
        }
    }
    Ok(out)
}

fn workers(from: &ExportFrom<'_>) -> usize {
    match from {
        ExportFrom::Relay(c) => c.delta.workers.max(1),
        ExportFrom::Repository(_) => 1,
    }
}

/// A directory for this export's deltas, beside the output (on the same
/// media as the bundle, not in a tmpfs that would hold them in memory).
fn scratch_dir(output: &Path) -> Result<PathBuf, AirgapError> {
    let parent = crate::store::atomic::parent_dir(output);
    let mut salt = [0u8; 6];
    let _ = getrandom::fill(&mut salt);
    let dir = parent.join(format!(".patchrelay-export-{}-{}", std::process::id(), hex::encode(salt)));
    std::fs::create_dir_all(&dir).map_err(|e| AirgapError::io(format!("cannot create {}", dir.display()), e))?;
    Ok(dir)
}

/// Fill `missing` from the relay's upstreams: into its store when it is
/// stopped (they stay cached), else into a scratch store beside it that goes
/// with this export.
fn fetch(config: &Config, missing: &[ObjectInfo], place: &mut Place, show: Show) -> Result<FetchStore, AirgapError> {
    let storage = config.storage.as_ref().ok_or_else(|| AirgapError::Usage("a relay needs [storage]".into()))?;
    if config.upstream.is_empty() {
        return Err(AirgapError::Failed(format!(
            "this relay lacks {} object(s) it would export (first: {}) and has no [[upstream]] to fetch them from; import them first",
            missing.len(),
            missing[0].sha256
        )));
    }
    crate::store::check_owner(&storage.dir, "export").map_err(AirgapError::Usage)?;
    let opts = StoreOptions {
        memory_cache: 64 << 20,
        memory_object_max: 64 << 10,
        mmap: false,
        max_size: storage.max_size.map(|s| s.0),
    };
    let (store, scratch) = match Store::open(&storage.dir, &opts) {
        Ok((s, _)) => (s, None),
        Err(StoreError::Locked { .. }) => {
            let dir = storage.dir.join(format!("export-{}", std::process::id()));
            let (s, _) = Store::open(&dir, &StoreOptions { max_size: None, ..opts })
                .map_err(|e| AirgapError::Failed(format!("cannot open a scratch store for fetching: {e}")))?;
            place.scratch = Some(dir.clone());
            (s, Some(Scratch(dir)))
        }
        Err(e) => return Err(AirgapError::Failed(format!("cannot open the relay's store: {e}"))),
    };
    let upstreams =
        crate::upstream::Upstreams::new(&config.upstream).map_err(|e| AirgapError::Failed(e.to_string()))?;
    let filler = crate::fill::Filler::new(store.clone(), Arc::new(upstreams), 64 << 20);
    let bar = show.bytes("fetching", missing.iter().map(|m| m.size).sum());
    let slots = Arc::new(tokio::sync::Semaphore::new(config.sync.prefetch_concurrency.max(1)));
    let results = crate::upstream::runtime::handle().block_on(async {
        let tasks: Vec<_> = missing
            .iter()
            .map(|info| {
                let (filler, slots, req, bar) =
                    (filler.clone(), slots.clone(), crate::source::Target::payload(info).fill_request(), bar.clone());
                let (size, digest) = (info.size, info.sha256);
                crate::upstream::runtime::spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let r = filler.ensure(req).await;
                    bar.inc(size);
                    r.map_err(|e| format!("{digest}: {e}"))
                })
            })
            .collect();
        futures_util::future::join_all(tasks).await
    });
    bar.finish_and_clear();
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(format!("fetch task: {e}")),
        })
        .collect();
    if !failed.is_empty() {
        return Err(AirgapError::Failed(format!(
            "{} of {} object(s) could not be fetched from the relay's upstreams: {}",
            failed.len(),
            missing.len(),
            failed.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(FetchStore { _store: store, _scratch: scratch })
}

/// Keeps the store fetched into open (and its scratch directory) until the
/// bundle is written.
struct FetchStore {
    _store: Store,
    _scratch: Option<Scratch>,
}

struct MadeDelta {
    sha256: Digest,
    size: u64,
    path: PathBuf,
}

/// Each job's delta: one stored on this side already (a relay's), or
/// computed now on `workers` threads.
fn build_deltas(
    jobs: &[(ObjectInfo, ObjectInfo, bool)],
    place: &Place,
    state: &Path,
    scratch: &Path,
    workers: usize,
    show: Show,
) -> Result<Vec<Option<MadeDelta>>, AirgapError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let bar = show.items("deltas", jobs.len() as u64);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<BTreeMap<usize, Option<MadeDelta>>> = std::sync::Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..workers.min(jobs.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((base, target, _)) = jobs.get(i) else { break };
                    let made = one_delta(base, target, place, state, scratch);
                    if let Err(e) = &made {
                        tracing::warn!(base = %base.sha256, target = %target.sha256, error = %e, "no delta for this pair; the version is carried whole");
                    }
                    results.lock().unwrap_or_else(|p| p.into_inner()).insert(i, made.ok());
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((0..jobs.len()).map(|i| results.remove(&i).flatten()).collect())
}

/// Read `info`'s bytes from this side, checked against its digest.
fn read_verified(place: &Place, info: &ObjectInfo) -> Result<Vec<u8>, String> {
    let path = place.object(&info.sha256).ok_or_else(|| format!("{} is not here", info.sha256))?;
    let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if Digest::of(&data) != info.sha256 {
        return Err(format!("{} does not hash to its name (damaged)", path.display()));
    }
    Ok(data)
}

fn one_delta(
    base: &ObjectInfo,
    target: &ObjectInfo,
    place: &Place,
    state: &Path,
    scratch: &Path,
) -> Result<MadeDelta, String> {
    // A delta the relay computed already (its bytes checked: the digest names them).
    if let Some(info) = crate::actors::deltas::load_index_entry(state, &base.sha256, &target.sha256)
        && let Some(path) = place.object(&info.sha256)
        && let Ok(data) = std::fs::read(&path)
        && Digest::of(&data) == info.sha256
    {
        let out = scratch.join(info.sha256.to_hex());
        std::fs::write(&out, &data).map_err(|e| e.to_string())?;
        return Ok(MadeDelta { sha256: info.sha256, size: info.size, path: out });
    }
    let b = read_verified(place, base)?;
    let t = read_verified(place, target)?;
    let encoded = crate::delta::encode(&b, &t, &crate::delta::EncodeOptions::default()).map_err(|e| e.to_string())?;
    let sha256 = Digest::of(&encoded);
    let out = scratch.join(sha256.to_hex());
    std::fs::write(&out, &encoded).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(MadeDelta { sha256, size: encoded.len() as u64, path: out })
}

/// Stream one object into the bundle, hashing it on the way (on a second
/// core); returns its chunk list (read from this side when it has it, else
/// made from the bytes as they pass).
fn write_object(
    w: &mut TarWriter<PartWriter>,
    place: &Place,
    info: &ObjectInfo,
    hashing: &Hashing,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<u8>, AirgapError> {
    let path = place.object(&info.sha256).ok_or_else(|| {
        AirgapError::Failed(format!("object {} vanished before it was written (evicted?); export again", info.sha256))
    })?;
    let name = path.display().to_string();
    let mut file = File::open(&path).map_err(|e| AirgapError::io(format!("cannot open {name}"), e))?;
    crate::store::read_ahead(&file);
    let stored_chunks =
        place.chunks(info).and_then(|p| std::fs::read(p).ok()).filter(|c| Digest::of(c) == info.chunks_sha256);
    hashing.start(stored_chunks.is_none().then_some(info.chunk_size));
    let mut left = info.size;
    w.begin(&repo::object_path(&info.sha256), info.size).map_err(|e| AirgapError::io("cannot write the bundle", e))?;
    while left > 0 {
        let mut buf = hashing.buffer();
        let want = (buf.len() as u64).min(left) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                hashing.unused(buf);
                return Err(AirgapError::Failed(format!("{name} is shorter than its {} bytes (damaged?)", info.size)));
            }
            Ok(n) => n,
            Err(e) => {
                hashing.unused(buf);
                return Err(AirgapError::io(format!("cannot read {name}"), e));
            }
        };
        if let Err(e) = w.data(&buf[..n]) {
            hashing.unused(buf);
            return Err(AirgapError::io("cannot write the bundle", e));
        }
        hashing.piece(buf, n);
        bar.inc(n as u64);
        left -= n as u64;
    }
    let (actual, made) = hashing.finish();
    if actual != info.sha256 {
        return Err(AirgapError::Failed(format!(
            "{name} hashes to {actual}, not its name: the stored object is damaged; remove it (the relay fetches it again) and export again"
        )));
    }
    if let Some(c) = stored_chunks {
        return Ok(c);
    }
    if Digest::of(&made) != info.chunks_sha256 {
        return Err(AirgapError::Failed(format!(
            "object {}: its chunk list does not match the manifest's chunks_sha256 (a manifest that contradicts itself)",
            info.sha256
        )));
    }
    Ok(made)
}
