//! Crash-safe file writes: temp file in the target's directory, fsync, rename,
//! fsync the directory.
//!
//! A reader (or a restarted process) sees either the old file or the complete new
//! one, never a torn write: rename(2) within one file system is atomic, and the
//! two fsyncs make the data and the new directory entry durable before we report
//! success.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of temp files; anything with it in a store or repository directory is
/// a leftover of an interrupted write and may be deleted.
pub const TEMP_PREFIX: &str = ".tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut salt = [0u8; 4];
    // Uniqueness comes from pid + counter; the salt only guards against a
    // reused pid finding a leftover, so a failure here is harmless.
    let _ = getrandom::fill(&mut salt);
    format!("{TEMP_PREFIX}{}-{n}-{}", std::process::id(), hex::encode(salt))
}

/// A file being written that becomes visible under its final name only when
/// [`TempFile::persist`] succeeds. Dropping it unpersisted removes it.
pub struct TempFile {
    /// `None` once persisted (or never created), so `Drop` leaves it alone.
    path: Option<PathBuf>,
    file: File,
}

impl TempFile {
    /// Create a temp file in `dir` (which must be on the same file system as the
    /// final destination).
    pub fn new_in(dir: &Path) -> io::Result<TempFile> {
        let path = dir.join(temp_name());
        let file = OpenOptions::new().write(true).read(true).create_new(true).open(&path)?;
        Ok(TempFile { path: Some(path), file })
    }

    /// The temp file's path, for error messages.
    pub fn path_buf(&self) -> PathBuf {
        self.path.clone().unwrap_or_default()
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// fsync, rename to `dest`, fsync the destination directory.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        self.file.sync_all()?;
        if let Some(path) = &self.path {
            fs::rename(path, dest)?;
        }
        // The temp name is gone now; make Drop a no-op.
        self.path = None;
        fsync_dir(parent_dir(dest))
    }
}

/// The directory holding `path`: a bare relative name (`lpt.sig`) has an
/// empty parent, which names no directory; it lives in `.`.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// Make a directory's entries (a rename into it) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `dest` atomically.
pub fn write_atomic(dest: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = TempFile::new_in(parent_dir(dest))?;
    tmp.file().write_all(data)?;
    tmp.persist(dest)
}

/// Remove leftover temp files in `dir` (not recursive). Returns how many.
pub fn remove_temp_files(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replace_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        write_atomic(&dest, b"one").unwrap();
        write_atomic(&dest, b"two").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        {
            let mut t = TempFile::new_in(dir.path()).unwrap();
            t.file().write_all(b"abandoned").unwrap();
        }
        // Dropped without persist: gone.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let t = TempFile::new_in(dir.path()).unwrap();
        std::mem::forget(t); // as if killed
        assert_eq!(remove_temp_files(dir.path()).unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
