//! The store: bytes by SHA-256 on disk, an index of what is there, a memory cache
//! of small hot objects, partial files of fills in progress, and the disk budget.
//!
//! This room knows nothing about manifests, upstreams or HTTP. Its one invariant:
//! a file under `objects/` named `X` holds bytes whose SHA-256 is `X`. Bytes get
//! there only by rename, after their digest was checked ([`BlobWriter`] for
//! whole objects, [`Store::commit_partial`] for fills verified chunk by chunk),
//! so neither an interrupted download nor a `kill -9` can ever leave a wrong or
//! partial object where a complete one is expected.
//!
//! Layout under `storage.dir`:
//!
//! ```text
//! objects/ab/ab12…   complete, verified objects (fan-out by the first byte)
//! partial/ab12…      fills in progress; kept across restarts and re-verified
//!                    chunk by chunk before a fill resumes from them
//! tmp/               whole-object writes in progress; emptied at start
//! state/             small files owned by other rooms (the last verified manifest)
//! lock               held by the one process using the directory (see `lock`)
//! ```

pub mod atomic;
pub mod db;
pub mod full;
mod index;
pub mod lock;
mod mapped;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::digest::{Digest, DigestBuildHasher, Hasher};
use atomic::TempFile;
pub use index::EvictReport;
use index::Index;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("object {expected}: got {actual} bytes, the manifest says {expected_len}")]
    Length { expected: Digest, expected_len: u64, actual: u64 },
    #[error("object {expected}: content hashes to {actual}; refusing to store it")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(
        "storage.dir {} is in use by another patchrelay process{}; two processes on one store corrupt each other's files: stop that one, or give this one its own storage.dir",
        .dir.display(),
        .holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, holder: Option<u32> },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// An object ready to be served.
#[derive(Clone, Debug)]
pub enum Blob {
    /// Small objects are kept in memory and served without a system call.
    Memory(Bytes),
    /// Larger ones, read-only mapped from their file (`storage.mmap`): served
    /// without a copy, but only ever read by the kernel (a page that cannot
    /// be read would raise SIGBUS in user space; see `mapped`). Code that
    /// needs the bytes themselves reads the file ([`Store::read_all`]).
    Mapped(Arc<Mapped>),
    /// Larger ones are read from their file while the response is sent. The file
    /// stays readable even if the object is evicted meanwhile (unlink keeps the
    /// inode alive while it is open).
    File { file: Arc<File>, len: u64 },
}

impl Blob {
    pub fn len(&self) -> u64 {
        match self {
            Blob::Memory(b) => b.len() as u64,
            Blob::Mapped(m) => m.bytes.len() as u64,
            Blob::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An object file's mapping, and the open file.
///
/// The file is kept for the mapping's last bytes: a file cut short within
/// its last page reads back as zeros through a mapping (no fault: the page
/// still exists), so the end of an object is read from the file instead,
/// where a cut is a short read ([`Mapped::TAIL`]).
#[derive(Debug)]
pub struct Mapped {
    pub bytes: Bytes,
    pub file: Arc<File>,
}

impl Mapped {
    /// The last bytes of a mapped object are read from its file: at least a
    /// page on any system patchrelay runs on.
    pub const TAIL: u64 = 64 * 1024;
}

/// Small objects held in memory, weighed by size.
///
/// Shared by the relay's store and the origin's repository files: whatever the
/// object's path on disk, its digest names its bytes.
#[derive(Clone)]
pub struct MemoryCache {
    cache: moka::sync::Cache<Digest, Bytes, DigestBuildHasher>,
    max_object: u64,
    /// Mappings of larger objects, kept so hot objects stay mapped (no
    /// `mmap`, no page faults per request); `None` when `storage.mmap` is off.
    maps: Option<moka::sync::Cache<Digest, Arc<Mapped>, DigestBuildHasher>>,
}

impl MemoryCache {
    /// `capacity` bytes in all; objects up to `max_object` bytes are kept;
    /// larger ones are mapped when `mmap` is on.
    pub fn new(capacity: u64, max_object: u64, mmap: bool) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_k: &Digest, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build_with_hasher(DigestBuildHasher::default());
        let maps = mmap
            .then(|| moka::sync::Cache::builder().max_capacity(4096).build_with_hasher(DigestBuildHasher::default()));
        MemoryCache { cache, max_object: max_object.min(capacity), maps }
    }

    /// Open the object with digest `digest` stored at `path`, `len` bytes long.
    ///
    /// The caller knows `len` from the manifest; a file of another length is an
    /// error rather than something to serve (a damaged repository or cache).
    pub fn load(&self, digest: &Digest, path: &Path, len: u64) -> Result<Blob, StoreError> {
        if let Some(bytes) = self.cache.get(digest) {
            return Ok(Blob::Memory(bytes));
        }
        if let Some(m) = self.maps.as_ref().and_then(|m| m.get(digest)) {
            return Ok(Blob::Mapped(m));
        }
        let file = File::open(path).map_err(io_err("cannot open", path))?;
        let actual = file.metadata().map_err(io_err("cannot stat", path))?.len();
        if actual != len {
            return Err(StoreError::Length { expected: *digest, expected_len: len, actual });
        }
        if len <= self.max_object {
            let mut buf = Vec::with_capacity(len as usize);
            (&file).take(len).read_to_end(&mut buf).map_err(io_err("cannot read", path))?;
            if buf.len() as u64 != len {
                return Err(StoreError::Length { expected: *digest, expected_len: len, actual: buf.len() as u64 });
            }
            let bytes = Bytes::from(buf);
            self.cache.insert(*digest, bytes.clone());
            return Ok(Blob::Memory(bytes));
        }
        if let Some(maps) = &self.maps {
            let bytes = mapped::map(&file).map_err(io_err("cannot map", path))?;
            let m = Arc::new(Mapped { bytes, file: Arc::new(file) });
            maps.insert(*digest, m.clone());
            return Ok(Blob::Mapped(m));
        }
        Ok(Blob::File { file: Arc::new(file), len })
    }

    pub fn invalidate(&self, digest: &Digest) {
        self.cache.invalidate(digest);
        if let Some(m) = &self.maps {
            m.invalidate(digest);
        }
    }
}

/// Options for [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub memory_cache: u64,
    pub memory_object_max: u64,
    /// Serve larger objects from read-only mappings (see `mapped`).
    pub mmap: bool,
    /// Disk budget for complete objects; `None`: unlimited.
    pub max_size: Option<u64>,
}

/// The relay's content-addressed object store. Cheap to clone.
#[derive(Clone)]
pub struct Store(Arc<Inner>);

/// See [`Store::downgrade`].
#[derive(Clone)]
pub struct WeakStore(std::sync::Weak<Inner>);

impl WeakStore {
    /// Whether the store (and its directory lock) is still held by anyone.
    pub fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }

    /// The store, if it is still open.
    pub fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(Store)
    }
}

struct Inner {
    root: PathBuf,
    partial: PathBuf,
    tmp: PathBuf,
    index: Index,
    memory: MemoryCache,
    /// Held while the store is open: one process per directory.
    _lock: lock::DirLock,
    /// Bytes in `partial/` at the last count ([`Store::count_partial_bytes`]):
    /// they take disk like objects, count in the budget, and are not evicted.
    partial_bytes: AtomicU64,
    /// Objects and bytes evicted over budget since open (for the event log).
    evicted: [AtomicU64; 2],
    /// Set while the store cannot write (see `full`).
    write_fault: full::WriteFault,
}

/// What [`Store::open`] found.
#[derive(Debug, Clone, Copy)]
pub struct OpenReport {
    pub objects: u64,
    pub bytes: u64,
    pub partial_files: u64,
    pub temp_files_removed: usize,
    pub elapsed: std::time::Duration,
}

impl Store {
    /// Open (creating if needed) the store under `root` and index what it holds.
    pub fn open(root: &Path, opts: &StoreOptions) -> Result<(Store, OpenReport), StoreError> {
        let started = Instant::now();
        let objects = root.join("objects");
        let partial = root.join("partial");
        let tmp = root.join("tmp");
        fs::create_dir_all(root).map_err(io_err("cannot create directory", root))?;
        // Before anything in the directory is touched: another process may be using it.
        let lock = lock::DirLock::acquire(root)?;
        for d in [&objects, &partial, &tmp, &root.join("state")] {
            fs::create_dir_all(d).map_err(io_err("cannot create directory", d))?;
        }
        let mut temp_files_removed = clear_dir(&tmp)?;
        // Other rooms write their state files atomically too; what an
        // interrupted write left is garbage (nobody else holds the lock).
        for d in [root.join("state"), root.join("state/deltas")] {
            match atomic::remove_temp_files(&d) {
                Ok(n) => temp_files_removed += n,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot clean temp files in", &d)(e)),
            }
        }
        let index = Index::new(opts.max_size);
        for fan in fs::read_dir(&objects).map_err(io_err("cannot list", &objects))? {
            let fan_path = fan.map_err(io_err("cannot list", &objects))?.path();
            if !fan_path.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&fan_path).map_err(io_err("cannot list", &fan_path))? {
                let entry = entry.map_err(io_err("cannot list", &fan_path))?;
                let Some(digest) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else {
                    continue; // not ours
                };
                let meta = entry.metadata().map_err(io_err("cannot stat", &entry.path()))?;
                // Older files are evicted first after a restart; access times
                // are not reliable (noatime), modification times are.
                index.insert_at(digest, meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            }
        }
        let partial_files = fs::read_dir(&partial).map_err(io_err("cannot list", &partial))?.count() as u64;
        let memory = MemoryCache::new(opts.memory_cache, opts.memory_object_max, opts.mmap);
        let (objects_n, bytes) = index.totals();
        let store = Store(Arc::new(Inner {
            root: root.to_path_buf(),
            partial,
            tmp,
            index,
            memory,
            _lock: lock,
            partial_bytes: AtomicU64::new(0),
            evicted: Default::default(),
            write_fault: full::WriteFault::default(),
        }));
        metrics::gauge!(crate::telemetry::STORE_WRITABLE).set(1.0);
        store.count_partial_bytes();
        let report =
            OpenReport { objects: objects_n, bytes, partial_files, temp_files_removed, elapsed: started.elapsed() };
        Ok((store, report))
    }

    pub fn root(&self) -> &Path {
        &self.0.root
    }

    /// A handle that tells when every clone of this store is gone (and its
    /// directory lock with it), for embedders that reopen a directory.
    pub fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.0))
    }

    /// Where small state files of other rooms live (`state/`).
    pub fn state_dir(&self) -> PathBuf {
        self.0.root.join("state")
    }

    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        object_file(&self.0.root, digest)
    }

    /// Take in a file whose bytes were verified to be `digest` (`len` bytes)
    /// by whoever wrote it (an import, `crate::airgap::stage`): renamed into
    /// `objects/`, indexed. The file must be on the store's file system. Not
    /// made durable here: the caller syncs the file system once for all it
    /// adopts ([`sync_file_system`]). Blocking.
    pub fn adopt(&self, from: &Path, digest: &Digest, len: u64) -> Result<(), StoreError> {
        let dest = self.path_of(digest);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create directory", parent))?;
        }
        fs::rename(from, &dest).map_err(io_err("cannot move into place", &dest))?;
        self.publish_object(*digest, len);
        Ok(())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.0.index.contains(digest)
    }

    /// Number of complete objects and their total bytes.
    pub fn usage(&self) -> (u64, u64) {
        self.0.index.totals()
    }

    pub fn budget(&self) -> Option<u64> {
        self.0.index.budget()
    }

    /// The object if it is complete on disk; `None` if we do not hold it.
    pub fn get(&self, digest: &Digest) -> Result<Option<Blob>, StoreError> {
        let Some(entry) = self.0.index.get(digest) else {
            return Ok(None);
        };
        entry.touch();
        match self.0.memory.load(digest, &self.path_of(digest), entry.len) {
            Ok(blob) => Ok(Some(blob)),
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                // Removed behind our back (an operator cleaning up): forget it and
                // let the caller fetch it again.
                self.forget(digest, "missing");
                Ok(None)
            }
            // Cut short behind our back: the same (it was verified whole when
            // it was stored, so its name no longer fits its bytes).
            Err(StoreError::Length { .. }) => {
                self.forget(digest, "length");
                Ok(None)
            }
            Err(e) => {
                metrics::counter!(crate::telemetry::STORE_FAULTS, "kind" => "read_error").increment(1);
                Err(e)
            }
        }
    }

    /// Drop a damaged object from the index (and its file, if any is left),
    /// so that the next request fetches it again instead of failing; counted.
    fn forget(&self, digest: &Digest, kind: &'static str) {
        tracing::warn!(object = %digest, kind, "a stored object is damaged or gone; dropping it (it will be fetched again)");
        metrics::counter!(crate::telemetry::STORE_FAULTS, "kind" => kind).increment(1);
        self.remove(digest);
    }

    /// After a response from this object ended early: is the object still
    /// whole on disk? A mapped page that cannot be read fails the kernel's
    /// write (EFAULT) and ends the connection, which is all the HTTP room
    /// sees; checking the file then finds a truncated or vanished object, and
    /// it is dropped (and fetched again on the next request). `read_error`:
    /// the response itself failed to read the file. Blocking (a `stat`).
    pub fn check(&self, digest: &Digest, read_error: bool) {
        let Some(entry) = self.0.index.get(digest) else { return };
        match fs::metadata(self.path_of(digest)) {
            Ok(m) if m.len() == entry.len && !read_error => {}
            Ok(m) if m.len() != entry.len => self.forget(digest, "length"),
            Ok(_) => self.forget(digest, "read_error"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.forget(digest, "missing"),
            Err(_) => self.forget(digest, "read_error"),
        }
    }

    /// The object's bytes, read from its file (never from a mapping: code
    /// that reads the bytes itself must not touch a mapped page that may
    /// fail). `None` if it is not here (or was found damaged). Blocking.
    pub fn read_all(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        match self.get(digest)? {
            None => Ok(None),
            Some(Blob::Memory(b)) => Ok(Some(b)),
            Some(blob) => {
                let path = self.path_of(digest);
                match fs::read(&path) {
                    Ok(data) if data.len() as u64 == blob.len() => Ok(Some(Bytes::from(data))),
                    Ok(_) => {
                        self.forget(digest, "length");
                        Ok(None)
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.forget(digest, "missing");
                        Ok(None)
                    }
                    Err(source) => {
                        metrics::counter!(crate::telemetry::STORE_FAULTS, "kind" => "read_error").increment(1);
                        Err(StoreError::Io { action: "cannot read", path, source })
                    }
                }
            }
        }
    }

    /// Start writing the object `expected`, which should be `expected_len` bytes.
    pub fn writer(&self, expected: Digest, expected_len: u64) -> Result<BlobWriter, StoreError> {
        let tmp = TempFile::new_in(&self.0.tmp).map_err(io_err("cannot create temp file in", &self.0.tmp))?;
        Ok(BlobWriter { store: self.clone(), tmp, hasher: Hasher::new(), written: 0, expected, expected_len })
    }

    /// Store `data` as an object in one call (used for small objects).
    pub fn put(&self, expected: Digest, data: &[u8]) -> Result<(), StoreError> {
        let mut w = self.writer(expected, data.len() as u64)?;
        w.write(data)?;
        w.commit()
    }

    fn publish_object(&self, digest: Digest, len: u64) {
        self.0.index.insert(digest, len);
    }

    // ----- partial files (fills in progress) -----

    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.0.partial.join(digest.to_hex())
    }

    /// Open (or create) the partial file of `digest` for reading and writing;
    /// while the store cannot write, a file in memory instead (see `full`),
    /// and `true` with it.
    pub fn open_partial(&self, digest: &Digest) -> Result<(File, bool), StoreError> {
        let path = self.partial_path(digest);
        if !self.0.write_fault.is_set() {
            match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) {
                Ok(f) => return Ok((f, false)),
                Err(e) if self.0.write_fault.note(&e, "create a partial file") => {}
                Err(e) => return Err(io_err("cannot open", &path)(e)),
            }
        }
        let f = full::memory_file(&digest.to_hex()).map_err(io_err("cannot create a memory file for", &path))?;
        Ok((f, true))
    }

    /// Whether the store can write, and if not since when and why.
    pub fn write_fault(&self) -> Option<(SystemTime, String)> {
        self.0.write_fault.get()
    }

    /// A write failed with `e`: note whether the store cannot write (see
    /// `full`). Returns whether it was such a fault.
    pub fn note_write_error(&self, e: &io::Error, what: &str) -> bool {
        self.0.write_fault.note(e, what)
    }

    /// While the store cannot write, try whether it can again (housekeeping's
    /// tick). Blocking.
    pub fn probe_writable(&self) {
        self.0.write_fault.probe(&self.0.tmp);
    }

    /// The partial file is complete and its digest checked: make it durable and
    /// move it into `objects/`. Blocking (fsync): call off the async threads.
    pub fn commit_partial(&self, digest: &Digest, file: &File, len: u64) -> Result<(), StoreError> {
        let from = self.partial_path(digest);
        file.sync_all().map_err(io_err("cannot fsync", &from))?;
        let dest = self.path_of(digest);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create directory", parent))?;
        }
        fs::rename(&from, &dest).map_err(io_err("cannot move into place", &dest))?;
        if let Some(parent) = dest.parent() {
            atomic::fsync_dir(parent).map_err(io_err("cannot fsync", parent))?;
        }
        self.publish_object(*digest, len);
        Ok(())
    }

    /// Forget a partial file (its bytes were wrong, or its object is gone).
    pub fn discard_partial(&self, digest: &Digest) {
        let path = self.partial_path(digest);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove partial file");
        }
    }

    /// Partial files on disk: `(digest, bytes, last modified)`.
    pub fn partials(&self) -> Vec<(Digest, u64, SystemTime)> {
        let Ok(rd) = fs::read_dir(&self.0.partial) else { return Vec::new() };
        rd.flatten()
            .filter_map(|e| {
                let d = e.file_name().to_str()?.parse::<Digest>().ok()?;
                let m = e.metadata().ok()?;
                Some((d, m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
            })
            .collect()
    }

    // ----- disk budget -----

    /// Objects that eviction must keep (critical components' retained versions).
    pub fn set_pins(&self, pins: HashSet<Digest>) {
        self.0.index.set_pins(pins);
    }

    /// Pin these too, until the next [`Store::set_pins`].
    pub fn add_pins(&self, more: impl IntoIterator<Item = Digest>) {
        self.0.index.add_pins(more);
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.0.index.is_pinned(digest)
    }

    /// Remove an object (one nobody can ask for any more). Blocking.
    pub fn remove(&self, digest: &Digest) {
        self.0.index.remove(digest);
        self.0.memory.invalidate(digest);
        let path = self.path_of(digest);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove object");
        }
    }

    /// Count the bytes in `partial/` (fills in progress and leftovers), which
    /// the budget includes from then on. Housekeeping calls it on its tick.
    pub fn count_partial_bytes(&self) -> u64 {
        let n: u64 = self.partials().iter().map(|(_, len, _)| len).sum();
        self.0.partial_bytes.store(n, Ordering::Relaxed);
        n
    }

    /// Bytes in `partial/` at the last count.
    pub fn partial_bytes(&self) -> u64 {
        self.0.partial_bytes.load(Ordering::Relaxed)
    }

    /// Evict least-recently-used unpinned objects until the store (partial
    /// files included) is under its budget (with 5% headroom, so eviction
    /// does not run on every fill).
    pub fn evict_over_budget(&self) -> EvictReport {
        let victims = self.0.index.select_victims(self.partial_bytes());
        let mut report = EvictReport::default();
        for (digest, len) in victims {
            self.0.index.remove(&digest);
            self.0.memory.invalidate(&digest);
            let path = self.path_of(&digest);
            match fs::remove_file(&path) {
                Ok(()) => {
                    report.objects += 1;
                    report.bytes += len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot evict object"),
            }
        }
        report.pinned_bytes = self.0.index.pinned_bytes();
        if report.objects > 0 {
            self.0.evicted[0].fetch_add(report.objects, Ordering::Relaxed);
            self.0.evicted[1].fetch_add(report.bytes, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::STORE_EVICTIONS).increment(report.objects);
            metrics::counter!(crate::telemetry::STORE_EVICTED_BYTES).increment(report.bytes);
            tracing::info!(objects = report.objects, bytes = report.bytes, "evicted least recently used objects");
        }
        report
    }

    /// Objects and bytes evicted over budget since the store opened.
    pub fn evicted(&self) -> (u64, u64) {
        (self.0.evicted[0].load(Ordering::Relaxed), self.0.evicted[1].load(Ordering::Relaxed))
    }

    pub fn over_budget(&self) -> bool {
        self.0.index.over_budget(self.partial_bytes())
    }
}

/// Free and total bytes of the file system under `dir` (for the unprivileged:
/// what `df` shows as available). `None` where it cannot be told.
pub fn free_space(dir: &Path) -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        let s = rustix::fs::statvfs(dir).ok()?;
        Some((s.f_bavail.saturating_mul(s.f_frsize), s.f_blocks.saturating_mul(s.f_frsize)))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}

/// Where the object `digest` is kept in the store at `root`: readable by a
/// process that does not hold the store (files there are complete and
/// verified, or absent).
pub fn object_file(root: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.to_hex();
    root.join("objects").join(&hex[..2]).join(hex)
}

/// Refuse to write into the store at `dir` as root when it belongs to
/// another user (the relay's service user): what root creates there (fan-out
/// directories, staged imports) that user could not write or move again.
/// The message says how to run the command instead.
pub fn check_owner(dir: &Path, command: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    match fs::metadata(dir) {
        Ok(m) if m.uid() != 0 => Err(format!(
            "{} belongs to uid {} (the relay's user), and this runs as root: files it made there that user could not change; run it as that user (sudo -u '#{}' patchrelay {command} ...)",
            dir.display(),
            m.uid(),
            m.uid()
        )),
        _ => Ok(()),
    }
}

/// Tell the kernel `file` will be read from start to end (a larger
/// read-ahead: a cold file streams at the disk's pace). Advice only.
pub fn read_ahead(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
}

/// Make everything written and renamed on the file system holding `path`
/// durable: one `syncfs` for many files instead of an fsync each.
pub fn sync_file_system(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    rustix::fs::syncfs(&dir).map_err(io::Error::from)
}

fn clear_dir(dir: &Path) -> Result<usize, StoreError> {
    let mut n = 0;
    for entry in fs::read_dir(dir).map_err(io_err("cannot list", dir))? {
        let path = entry.map_err(io_err("cannot list", dir))?.path();
        fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        n += 1;
    }
    Ok(n)
}

/// An object being written. It joins the store only through [`BlobWriter::commit`],
/// and only if its bytes hash to the expected digest; dropped, it leaves nothing.
pub struct BlobWriter {
    store: Store,
    tmp: TempFile,
    hasher: Hasher,
    written: u64,
    expected: Digest,
    expected_len: u64,
}

impl BlobWriter {
    /// Append bytes. Refuses to go past the expected length, so a hostile
    /// upstream that sends more than the manifest says cannot fill the disk.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let after = self.written + data.len() as u64;
        if after > self.expected_len {
            return Err(StoreError::Length { expected: self.expected, expected_len: self.expected_len, actual: after });
        }
        self.hasher.update(data);
        if let Err(source) = self.tmp.file().write_all(data) {
            return Err(StoreError::Io { action: "cannot write", path: self.tmp.path_buf(), source });
        }
        self.written = after;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verify length and digest, make the bytes durable and publish the object.
    /// Blocking (fsync): call it off the async threads.
    pub fn commit(self) -> Result<(), StoreError> {
        if self.written != self.expected_len {
            return Err(StoreError::Length {
                expected: self.expected,
                expected_len: self.expected_len,
                actual: self.written,
            });
        }
        let actual = self.hasher.finish();
        if actual != self.expected {
            return Err(StoreError::DigestMismatch { expected: self.expected, actual });
        }
        let dest = self.store.path_of(&self.expected);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create directory", parent))?;
        }
        self.tmp.persist(&dest).map_err(io_err("cannot move object into place at", &dest))?;
        self.store.publish_object(self.expected, self.expected_len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max_size: Option<u64>) -> StoreOptions {
        StoreOptions { memory_cache: 1 << 20, memory_object_max: 16, max_size, mmap: false }
    }

    #[test]
    fn verified_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = Store::open(dir.path(), &opts(None)).unwrap();
        assert_eq!(report.objects, 0);

        let small = b"hello".to_vec();
        let big = vec![7u8; 1000];
        store.put(Digest::of(&small), &small).unwrap();
        store.put(Digest::of(&big), &big).unwrap();
        assert!(matches!(store.get(&Digest::of(&small)).unwrap(), Some(Blob::Memory(b)) if b[..] == small[..]));
        assert!(matches!(store.get(&Digest::of(&big)).unwrap(), Some(Blob::File { len: 1000, .. })));

        // Wrong bytes for a digest: refused, nothing left behind.
        let err = store.put(Digest::of(b"other"), b"wrong").unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        assert!(store.get(&Digest::of(b"other")).unwrap().is_none());
        // More bytes than announced: refused at the write.
        let mut w = store.writer(Digest::of(b"ab"), 2).unwrap();
        assert!(w.write(b"abc").is_err());
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        // Reopen: the index comes back from disk.
        drop(store);
        let (store, report) = Store::open(dir.path(), &opts(None)).unwrap();
        assert_eq!((report.objects, report.bytes), (2, 1005));
        assert!(store.contains(&Digest::of(&big)));

        // A file deleted behind our back is a miss, not an error.
        fs::remove_file(store.path_of(&Digest::of(&big))).unwrap();
        assert!(store.get(&Digest::of(&big)).unwrap().is_none());
        assert_eq!(store.usage(), (1, 5));
    }

    /// As root (CI), a store owned by a service user is refused with the
    /// command to run; as anyone else there is nothing to refuse.
    #[test]
    fn root_does_not_write_into_a_service_users_store() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_owner(dir.path(), "import").is_ok(), "one's own store");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
            let err = check_owner(dir.path(), "import").unwrap_err();
            assert!(err.contains("uid 65534") && err.contains("sudo -u '#65534' patchrelay import"), "{err}");
        }
    }

    #[test]
    fn partial_files_commit_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &opts(None)).unwrap();
        let data = vec![3u8; 5000];
        let d = Digest::of(&data);
        let (mut f, _) = store.open_partial(&d).unwrap();
        f.write_all(&data[..2000]).unwrap();
        drop(f);
        drop(store);
        let (store, report) = Store::open(dir.path(), &opts(None)).unwrap();
        assert_eq!(report.partial_files, 1);
        assert_eq!(store.partials()[0].1, 2000);
        let (mut f, _) = store.open_partial(&d).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::End(0)).unwrap();
        f.write_all(&data[2000..]).unwrap();
        store.commit_partial(&d, &f, 5000).unwrap();
        assert!(store.partials().is_empty());
        assert!(matches!(store.get(&d).unwrap(), Some(Blob::File { len: 5000, .. })));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a plain #[test]: no async worker to block
    fn eviction_is_lru_and_spares_pins() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &opts(Some(10_000))).unwrap();
        let objs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 3000]).collect();
        let ds: Vec<Digest> = objs.iter().map(|o| Digest::of(o)).collect();
        store.set_pins(HashSet::from([ds[0]]));
        for (o, d) in objs.iter().zip(&ds) {
            store.put(*d, o).unwrap();
            // Distinct access times, oldest first; object 1 is then used again.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        store.get(&ds[1]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(store.over_budget());
        let report = store.evict_over_budget();
        // 15,000 bytes, budget 10,000 (target 9,500): two go, the oldest unpinned.
        assert_eq!((report.objects, report.bytes), (2, 6000));
        assert!(store.contains(&ds[0]), "pinned object evicted");
        assert!(store.contains(&ds[1]), "recently used object evicted");
        assert!(!store.contains(&ds[2]) && !store.contains(&ds[3]));
        assert!(store.contains(&ds[4]));
        assert!(!store.path_of(&ds[2]).exists());
        assert!(!store.over_budget());
    }
}
