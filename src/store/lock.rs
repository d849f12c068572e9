//! One process per store: an exclusive lock on `storage.dir/lock`.
//!
//! Two relays on one directory delete each other's temp files, truncate each
//! other's partial files, and can commit a gap of zeros under the real digest
//! (each one's verifier vouches only for the bytes it wrote). So the store is
//! opened only under an exclusive `flock` on a file in it, held until the
//! store is dropped; the kernel releases it when the process dies, however it
//! dies, so a `kill -9` leaves nothing to clean up. The holder writes its pid
//! into the file, and a second process names that pid in its error.
//!
//! `flock` locks belong to an open file description, so a second `Store::open`
//! of the same directory inside one process is refused as well.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The lock file's name under `storage.dir`.
pub const LOCK_FILE: &str = "lock";

/// Held for as long as the store is open.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Take the lock on `dir`, or say who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| StoreError::Io { action, path, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StoreError::Locked { dir: dir.to_path_buf(), holder: text.trim().parse().ok() });
            }
            Err(TryLockError::Error(e)) => return Err(io("cannot lock")(e)),
        }
        // The pid is only for the message a second process prints: failing to
        // write it does not make the lock any less held.
        let pid = std::process::id();
        let _ = file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).and_then(|_| writeln!(file, "{pid}"));
        Ok(DirLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock; saying so first makes the
        // release independent of any other handle to the same description.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(StoreError::Locked { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
