//! The store: bytes by SHA-256 on disk, an index of what is there, and a memory
//! cache of small hot objects.
//!
//! This room knows nothing about manifests, upstreams or HTTP. Its one invariant:
//! a file under `objects/` named `X` holds bytes whose SHA-256 is `X`. Writes go
//! through [`BlobWriter`], which hashes what it is given and only renames the file
//! into place when the digest and length match, so an interrupted or corrupted
//! download can never become an object.
//!
//! Layout under `storage.dir`:
//!
//! ```text
//! objects/ab/ab12…   complete, verified objects (fan-out by the first byte)
//! tmp/               writes in progress; emptied at start
//! state/             small files owned by other rooms (the last verified manifest)
//! ```

pub mod atomic;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::digest::{Digest, Hasher};
use atomic::TempFile;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("object {expected}: got {actual} bytes, the manifest says {expected_len}")]
    Length { expected: Digest, expected_len: u64, actual: u64 },
    #[error("object {expected}: content hashes to {actual}; refusing to store it")]
    DigestMismatch { expected: Digest, actual: Digest },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// An object ready to be served.
#[derive(Clone, Debug)]
pub enum Blob {
    /// Small objects are kept in memory and served without a system call.
    Memory(Bytes),
    /// Larger ones are read from their file while the response is sent. The file
    /// stays readable even if the object is evicted meanwhile (unlink keeps the
    /// inode alive while it is open).
    File { file: Arc<File>, len: u64 },
}

impl Blob {
    pub fn len(&self) -> u64 {
        match self {
            Blob::Memory(b) => b.len() as u64,
            Blob::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Small objects held in memory, weighed by size.
///
/// Shared by the relay's store and the origin's repository files: whatever the
/// object's path on disk, its digest names its bytes.
#[derive(Clone)]
pub struct MemoryCache {
    cache: moka::sync::Cache<Digest, Bytes>,
    max_object: u64,
}

impl MemoryCache {
    /// `capacity` bytes in all; objects up to `max_object` bytes are kept.
    pub fn new(capacity: u64, max_object: u64) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_k: &Digest, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        MemoryCache { cache, max_object: max_object.min(capacity) }
    }

    /// Open the object with digest `digest` stored at `path`, `len` bytes long.
    ///
    /// The caller knows `len` from the manifest; a file of another length is an
    /// error rather than something to serve (a damaged repository or cache).
    pub fn load(&self, digest: &Digest, path: &Path, len: u64) -> Result<Blob, StoreError> {
        if let Some(bytes) = self.cache.get(digest) {
            return Ok(Blob::Memory(bytes));
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
        Ok(Blob::File { file: Arc::new(file), len })
    }

    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        self.cache.get(digest)
    }

    pub fn invalidate(&self, digest: &Digest) {
        self.cache.invalidate(digest);
    }
}

/// Options for [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub memory_cache: u64,
    pub memory_object_max: u64,
}

/// The relay's content-addressed object store. Cheap to clone.
#[derive(Clone)]
pub struct Store(Arc<Inner>);

struct Inner {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    /// Digest -> size of every complete object on disk.
    index: moka::sync::Cache<Digest, u64>,
    memory: MemoryCache,
}

/// What [`Store::open`] found.
#[derive(Debug, Clone, Copy)]
pub struct OpenReport {
    pub objects: u64,
    pub bytes: u64,
    pub temp_files_removed: usize,
    pub elapsed: std::time::Duration,
}

impl Store {
    /// Open (creating if needed) the store under `root` and index what it holds.
    pub fn open(root: &Path, opts: &StoreOptions) -> Result<(Store, OpenReport), StoreError> {
        let started = Instant::now();
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        for d in [root, &objects, &tmp, &root.join("state")] {
            fs::create_dir_all(d).map_err(io_err("cannot create directory", d))?;
        }
        let temp_files_removed = clear_dir(&tmp)?;
        let index = moka::sync::Cache::builder().build();
        let (mut count, mut bytes) = (0u64, 0u64);
        for fan in fs::read_dir(&objects).map_err(io_err("cannot list", &objects))? {
            let fan = fan.map_err(io_err("cannot list", &objects))?;
            let fan_path = fan.path();
            if !fan_path.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&fan_path).map_err(io_err("cannot list", &fan_path))? {
                let entry = entry.map_err(io_err("cannot list", &fan_path))?;
                let name = entry.file_name();
                let Some(digest) = name.to_str().and_then(|n| n.parse::<Digest>().ok()) else {
                    // Not ours (or a stray temp file from an old layout): leave it.
                    continue;
                };
                let len = entry.metadata().map_err(io_err("cannot stat", &entry.path()))?.len();
                index.insert(digest, len);
                count += 1;
                bytes += len;
            }
        }
        let memory = MemoryCache::new(opts.memory_cache, opts.memory_object_max);
        let store = Store(Arc::new(Inner { root: root.to_path_buf(), objects, tmp, index, memory }));
        let report = OpenReport { objects: count, bytes, temp_files_removed, elapsed: started.elapsed() };
        Ok((store, report))
    }

    pub fn root(&self) -> &Path {
        &self.0.root
    }

    /// Where small state files of other rooms live (`state/`).
    pub fn state_dir(&self) -> PathBuf {
        self.0.root.join("state")
    }

    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.0.objects.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.0.index.contains_key(digest)
    }

    /// Number of objects and their total bytes.
    pub fn usage(&self) -> (u64, u64) {
        self.0.index.run_pending_tasks();
        let mut n = 0;
        let mut bytes = 0;
        for (_, len) in self.0.index.iter() {
            n += 1;
            bytes += len;
        }
        (n, bytes)
    }

    /// The object if it is complete on disk; `None` if we do not hold it.
    pub fn get(&self, digest: &Digest) -> Result<Option<Blob>, StoreError> {
        if let Some(bytes) = self.0.memory.get(digest) {
            return Ok(Some(Blob::Memory(bytes)));
        }
        let Some(len) = self.0.index.get(digest) else {
            return Ok(None);
        };
        match self.0.memory.load(digest, &self.path_of(digest), len) {
            Ok(blob) => Ok(Some(blob)),
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                // Removed behind our back (an operator cleaning up): forget it and
                // let the caller fetch it again.
                self.0.index.invalidate(digest);
                Ok(None)
            }
            Err(e) => Err(e),
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
        self.store.0.index.insert(self.expected, self.expected_len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> StoreOptions {
        StoreOptions { memory_cache: 1 << 20, memory_object_max: 16 }
    }

    #[test]
    fn verified_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = Store::open(dir.path(), &opts()).unwrap();
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
        let (store, report) = Store::open(dir.path(), &opts()).unwrap();
        assert_eq!((report.objects, report.bytes), (2, 1005));
        assert!(store.contains(&Digest::of(&big)));

        // A file deleted behind our back is a miss, not an error.
        fs::remove_file(store.path_of(&Digest::of(&big))).unwrap();
        assert!(store.get(&Digest::of(&big)).unwrap().is_none());
    }
}
