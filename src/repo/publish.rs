//! `patchrelay publish`: turn an input tree into (or extend) a static repository.
//!
//! Input layout:
//!
//! ```text
//! <input>/<component>/component.toml          optional: kind, critical, description
//! <input>/<component>/<version>/<file_name>   exactly one payload file per version
//! ```
//!
//! Publishing never changes the bytes behind a name: objects are named by their
//! digest, an already published version must still have the same bytes, and the
//! manifest is replaced atomically after every object it names is durable. Its
//! signature is written first, under the new manifest's digest
//! (`v1/signatures/`), then the manifest is renamed into place, then
//! `manifest.sig`: a publish killed at any point leaves the previous repository
//! or the new one, each with a signature its readers find (see [`super`]), and
//! at worst unreferenced objects and temp files, which the next publish
//! removes (it also puts back a `manifest.sig` left behind). One publish at a
//! time per repository (a lock file enforces it).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::RepoDir;
use super::manifest::{self, Component, ComponentName, Kind, Manifest, VersionEntry};
use super::sign::SecretKey;
use super::version::Version;
use crate::digest::{Digest, Hasher};
use crate::store::atomic::{TempFile, remove_temp_files, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("input {path}: {problem}")]
    Input { path: PathBuf, problem: String },
    #[error(
        "{component} {version} was already published with sha256 {published}, but the input now has {input}; published bytes never change, so publish it as a new version"
    )]
    Changed { component: String, version: String, published: Digest, input: Digest },
    #[error("existing repository {path} does not verify with this key ({why}); refusing to extend it")]
    Foreign { path: PathBuf, why: String },
    #[error("another publish holds the lock on {0}; wait for it to finish")]
    Locked(PathBuf),
    #[error("chunk size {0} is outside {min}..={max} bytes", min = manifest::MIN_CHUNK_SIZE, max = manifest::MAX_CHUNK_SIZE)]
    ChunkSize(u64),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PublishError + 'a {
    move |source| PublishError::Io { action, path: path.to_path_buf(), source }
}

fn input_err(path: &Path, problem: impl Into<String>) -> PublishError {
    PublishError::Input { path: path.to_path_buf(), problem: problem.into() }
}

/// `component.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentMeta {
    kind: Option<String>,
    critical: Option<bool>,
    description: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub chunk_size: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions { chunk_size: manifest::DEFAULT_CHUNK_SIZE }
    }
}

/// What a publish did.
#[derive(Debug, Clone)]
pub struct PublishReport {
    pub serial: u64,
    /// `(component, version)` pairs added by this publish.
    pub added: Vec<(String, String)>,
    pub unchanged: usize,
    /// False when the input held nothing new: the manifest was left as it was.
    pub wrote_manifest: bool,
}

/// Publish `input` into the repository at `output`, signing with `key`.
pub fn publish(
    input: &Path,
    output: &Path,
    key: &SecretKey,
    opts: &PublishOptions,
) -> Result<PublishReport, PublishError> {
    if !(manifest::MIN_CHUNK_SIZE..=manifest::MAX_CHUNK_SIZE).contains(&opts.chunk_size) {
        return Err(PublishError::ChunkSize(opts.chunk_size));
    }
    let repo = RepoDir::new(output);
    for d in [repo.v1(), repo.objects_dir(), repo.chunks_dir(), repo.signatures_dir()] {
        fs::create_dir_all(&d).map_err(io_err("cannot create directory", &d))?;
    }
    let lock_path = repo.v1().join(".publish.lock");
    let lock = File::create(&lock_path).map_err(io_err("cannot create lock file", &lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(PublishError::Locked(lock_path)),
        Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path)(e)),
    }
    for d in [repo.v1(), repo.objects_dir(), repo.chunks_dir(), repo.signatures_dir()] {
        remove_temp_files(&d).map_err(io_err("cannot clean temp files in", &d))?;
    }

    let previous = load_own_manifest(&repo, key)?;
    let mut components: BTreeMap<ComponentName, Component> =
        previous.as_ref().map(|m| m.components.clone()).unwrap_or_default();
    let now = manifest::format_time(SystemTime::now());
    let mut report = PublishReport { serial: 0, added: Vec::new(), unchanged: 0, wrote_manifest: false };
    let mut meta_changed = false;

    for (name, dir) in list_components(input)? {
        let meta = read_meta(&dir)?;
        let kind = Kind::parse(meta.kind.as_deref().unwrap_or("software"));
        if let Kind::Other(k) = &kind {
            return Err(input_err(
                &dir.join("component.toml"),
                format!("kind {k:?} is not one of pattern, patch, software"),
            ));
        }
        let versions = list_versions(&dir)?;
        if versions.is_empty() && !components.contains_key(&name) {
            return Err(input_err(&dir, "has no version directories"));
        }
        let existing = components.get(&name).cloned();
        let mut entries: Vec<VersionEntry> = existing.as_ref().map(|c| c.versions.clone()).unwrap_or_default();
        for (version, file) in versions {
            let published = entries.iter().find(|e| e.version == version).cloned();
            if let Some(published) = published {
                let digest = hash_file(&file)?;
                if digest != published.sha256 {
                    return Err(PublishError::Changed {
                        component: name.to_string(),
                        version: version.to_string(),
                        published: published.sha256,
                        input: digest,
                    });
                }
                report.unchanged += 1;
                continue;
            }
            let entry = add_object(&repo, &file, &version, opts.chunk_size, &now)?;
            report.added.push((name.to_string(), version.to_string()));
            entries.push(entry);
        }
        entries.sort_by(|a, b| a.version.cmp(&b.version));
        let Some(latest) = entries.last().map(|e| e.version.clone()) else { continue };
        let component = Component {
            kind,
            critical: meta.critical.unwrap_or(false),
            description: meta.description,
            latest,
            versions: entries,
        };
        if let Some(old) = &existing
            && (old.kind != component.kind
                || old.critical != component.critical
                || old.description != component.description)
        {
            meta_changed = true;
        }
        components.insert(name, component);
    }

    let old_serial = previous.as_ref().map(|m| m.serial).unwrap_or(0);
    if previous.is_some() && report.added.is_empty() && !meta_changed {
        report.serial = old_serial;
        repair_signature(&repo)?;
        return Ok(report);
    }
    let manifest = Manifest { format: 1, serial: old_serial + 1, generated_at: now, components };
    manifest.validate().map_err(|e| input_err(input, e.to_string()))?;
    let bytes = manifest.to_json();
    let sig = key.sign(&bytes);
    // Objects and chunk lists are durable (each was fsynced and renamed); only now
    // does the manifest name them. Its signature first, under its digest; the
    // manifest; `manifest.sig` last: see the module comment.
    let by_digest = repo.signature_for(&Digest::of(&bytes));
    write_atomic(&by_digest, &sig).map_err(io_err("cannot write", &by_digest))?;
    write_atomic(&repo.manifest(), &bytes).map_err(io_err("cannot write", &repo.manifest()))?;
    write_atomic(&repo.signature(), &sig).map_err(io_err("cannot write", &repo.signature()))?;
    prune_signatures(&repo, &by_digest);
    // For `export --repository --since N` (crate::airgap); the publish
    // stands without it.
    let history = super::history::History::in_state(&repo.state_dir());
    if let Err(e) = history.save(manifest.serial, &bytes, &sig) {
        tracing::warn!(dir = %history.dir().display(), error = %e, "cannot keep this manifest for `export --since`");
    }
    report.serial = manifest.serial;
    report.wrote_manifest = true;
    drop(lock);
    Ok(report)
}

/// The repository's current manifest, if any, checked against our own key.
fn load_own_manifest(repo: &RepoDir, key: &SecretKey) -> Result<Option<Manifest>, PublishError> {
    let Some((bytes, sig)) = super::read_pair(repo).map_err(io_err("cannot read", repo.root()))? else {
        return Ok(None);
    };
    let foreign = |why: String| PublishError::Foreign { path: repo.root().to_path_buf(), why };
    let catalog = super::verify(&key.public(), bytes, sig).map_err(|e| foreign(e.to_string()))?;
    Ok(Some(catalog.manifest))
}

/// After a publish killed between the manifest's rename and the signature's,
/// `manifest.sig` is the previous one: put the right one back (readers that
/// know `v1/signatures/` never noticed; others would have).
fn repair_signature(repo: &RepoDir) -> Result<(), PublishError> {
    let Some((_, sig)) = super::read_pair(repo).map_err(io_err("cannot read", repo.root()))? else {
        return Ok(());
    };
    if fs::read(repo.signature()).ok().as_deref() != Some(&sig[..]) {
        write_atomic(&repo.signature(), &sig).map_err(io_err("cannot write", &repo.signature()))?;
    }
    Ok(())
}

/// Keep the newest [`super::SIGNATURES_KEPT`] signatures (and always the
/// current one); a failure to prune is not a failed publish.
fn prune_signatures(repo: &RepoDir, current: &Path) {
    let Ok(rd) = fs::read_dir(repo.signatures_dir()) else { return };
    let mut found: Vec<(SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<Digest>().is_ok()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in found.into_iter().skip(super::SIGNATURES_KEPT) {
        if path != current
            && let Err(e) = fs::remove_file(&path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot prune an old signature");
        }
    }
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, fs::FileType)>, PublishError> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let e = e.map_err(io_err("cannot list", dir))?;
        let name = e.file_name().into_string().map_err(|n| input_err(&dir.join(&n), "name is not UTF-8"))?;
        if is_hidden(&name) {
            continue;
        }
        let ft = fs::metadata(e.path()).map_err(io_err("cannot stat", &e.path()))?.file_type();
        out.push((name, e.path(), ft));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn list_components(input: &Path) -> Result<Vec<(ComponentName, PathBuf)>, PublishError> {
    let mut out = Vec::new();
    for (name, path, ft) in sorted_entries(input)? {
        if !ft.is_dir() {
            return Err(input_err(&path, "expected only component directories at the top of the input"));
        }
        let name = ComponentName::parse(&name).map_err(|e| input_err(&path, e.to_string()))?;
        out.push((name, path));
    }
    Ok(out)
}

fn read_meta(dir: &Path) -> Result<ComponentMeta, PublishError> {
    let path = dir.join("component.toml");
    match fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| input_err(&path, e.to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ComponentMeta::default()),
        Err(e) => Err(io_err("cannot read", &path)(e)),
    }
}

/// `(version, payload file)` for each version directory of a component.
fn list_versions(dir: &Path) -> Result<Vec<(Version, PathBuf)>, PublishError> {
    let mut out = Vec::new();
    for (name, path, ft) in sorted_entries(dir)? {
        if ft.is_file() && name == "component.toml" {
            continue;
        }
        if !ft.is_dir() {
            return Err(input_err(&path, "expected version directories and component.toml only"));
        }
        let version = Version::parse(&name).map_err(|e| input_err(&path, e.to_string()))?;
        let files = sorted_entries(&path)?;
        let [(file_name, file, ft)] = files.as_slice() else {
            return Err(input_err(&path, format!("needs exactly one payload file, found {}", files.len())));
        };
        if !ft.is_file() {
            return Err(input_err(file, "the payload must be a regular file"));
        }
        if !manifest::valid_file_name(file_name) {
            return Err(input_err(file, "file name is not usable"));
        }
        out.push((version, file.clone()));
    }
    Ok(out)
}

fn hash_file(path: &Path) -> Result<Digest, PublishError> {
    let mut f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// Copy one payload into `v1/objects` (and its chunk list into `v1/chunks`),
/// hashing as we go. An object already present is left untouched.
fn add_object(
    repo: &RepoDir,
    file: &Path,
    version: &Version,
    chunk_size: u64,
    now: &str,
) -> Result<VersionEntry, PublishError> {
    let objects = repo.objects_dir();
    let mut src = File::open(file).map_err(io_err("cannot open", file))?;
    let mut tmp = TempFile::new_in(&objects).map_err(io_err("cannot create temp file in", &objects))?;
    let mut whole = Hasher::new();
    let mut chunk = Hasher::new();
    let mut in_chunk = 0u64;
    let mut chunk_list = Vec::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = src.read(&mut buf).map_err(io_err("cannot read", file))?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        whole.update(data);
        tmp.file().write_all(data).map_err(io_err("cannot write", &objects))?;
        size += n as u64;
        // Feed the chunk hasher block by block.
        let mut rest = data;
        while !rest.is_empty() {
            let take = rest.len().min((chunk_size - in_chunk) as usize);
            chunk.update(&rest[..take]);
            in_chunk += take as u64;
            rest = &rest[take..];
            if in_chunk == chunk_size {
                chunk_list.extend_from_slice(std::mem::take(&mut chunk).finish().as_bytes());
                in_chunk = 0;
            }
        }
    }
    if in_chunk > 0 {
        chunk_list.extend_from_slice(chunk.finish().as_bytes());
    }
    let sha256 = whole.finish();
    let dest = repo.object(&sha256);
    if dest.exists() {
        drop(tmp); // identical bytes already published (digests match)
    } else {
        tmp.persist(&dest).map_err(io_err("cannot move into place", &dest))?;
    }
    let chunks_dest = repo.chunks(&sha256);
    if !chunks_dest.exists() {
        write_atomic(&chunks_dest, &chunk_list).map_err(io_err("cannot write", &chunks_dest))?;
    }
    let file_name = file.file_name().and_then(|n| n.to_str()).unwrap_or("payload").to_string();
    Ok(VersionEntry {
        version: version.clone(),
        sha256,
        size,
        file_name,
        chunk_size,
        chunks_sha256: Digest::of(&chunk_list),
        published_at: Some(now.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::sign::PublicKey;

    fn write(path: &Path, data: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }

    #[test]
    fn publish_extend_and_refuse_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("in"), dir.path().join("out"));
        let key = SecretKey::generate().unwrap();
        write(&input.join("engine/component.toml"), b"kind = \"pattern\"\ncritical = true\n");
        write(&input.join("engine/171/p.bin"), &vec![1u8; 10_000]);
        write(&input.join("engine/9/p.bin"), b"older");
        let opts = PublishOptions { chunk_size: 4096 };
        let r = publish(&input, &output, &key, &opts).unwrap();
        assert_eq!((r.serial, r.added.len()), (1, 2));

        let repo = RepoDir::new(&output);
        let bytes = fs::read(repo.manifest()).unwrap();
        let sig = fs::read(repo.signature()).unwrap();
        let pk = PublicKey::parse(&key.public().to_base64()).unwrap();
        let cat = crate::repo::verify(&pk, bytes.into(), sig.into()).unwrap();
        let (entry, obj) = cat.latest("engine").unwrap();
        assert_eq!(entry.version.as_str(), "171"); // 171 > 9 numerically
        assert_eq!(obj.size, 10_000);
        let chunks = fs::read(repo.chunks(&entry.sha256)).unwrap();
        assert_eq!(chunks.len(), 3 * 32);
        assert_eq!(Digest::of(&chunks), entry.chunks_sha256);
        assert_eq!(&chunks[..32], Digest::of(&[1u8; 4096]).as_bytes());
        assert_eq!(&chunks[64..], Digest::of(&[1u8; 10_000 - 8192]).as_bytes());

        // Nothing new: no new serial.
        let r = publish(&input, &output, &key, &opts).unwrap();
        assert!(!r.wrote_manifest);
        assert_eq!(r.serial, 1);

        // A new version bumps the serial and keeps the old ones.
        write(&input.join("engine/172/p.bin"), &vec![2u8; 10_000]);
        let r = publish(&input, &output, &key, &opts).unwrap();
        assert_eq!((r.serial, r.added.len(), r.unchanged), (2, 1, 2));

        // Changed bytes under a published version: refused, repository untouched.
        write(&input.join("engine/172/p.bin"), b"tampered");
        let before = fs::read(repo.manifest()).unwrap();
        assert!(matches!(publish(&input, &output, &key, &opts), Err(PublishError::Changed { .. })));
        assert_eq!(fs::read(repo.manifest()).unwrap(), before);

        // Another key may not extend it.
        let other = SecretKey::generate().unwrap();
        assert!(matches!(publish(&input, &output, &other, &opts), Err(PublishError::Foreign { .. })));
    }

    #[test]
    fn input_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let input = dir.path().join("in");
        write(&input.join("engine/1/a"), b"a");
        write(&input.join("engine/1/b"), b"b");
        let err = publish(&input, &dir.path().join("out"), &key, &PublishOptions::default()).unwrap_err();
        assert!(err.to_string().contains("exactly one payload"), "{err}");
        fs::remove_file(input.join("engine/1/b")).unwrap();
        write(&input.join("bad name/1/a"), b"a");
        let err = publish(&input, &dir.path().join("out"), &key, &PublishOptions::default()).unwrap_err();
        assert!(err.to_string().contains("invalid component name"), "{err}");
    }
}
