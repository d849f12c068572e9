//! When the store cannot write: a full disk (ENOSPC, or a quota), a failing
//! one (EIO), or one that went read-only.
//!
//! The relay then keeps serving what it has, and fills what it misses into
//! memory instead of `partial/`: a memory file (`memfd`) that the fill code
//! and its readers use exactly as they use a partial file (positioned writes
//! and reads, the verified mark), so every byte is still checked block by
//! block before any agent sees it, and requests for one object still share
//! one upstream fetch. Such an object is not stored; its memory goes when its
//! last reader does. Nothing already stored is touched.
//!
//! The fault is noticed where a write fails ([`WriteFault::note`]), shown by
//! `/readyz` (degraded, with the reason) and `store_writable`, and cleared by
//! housekeeping once a probe write succeeds and the file system has room
//! again ([`WriteFault::probe`]): the floor keeps a nearly full disk from
//! flapping between "can write" and a fill that fails halfway.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::telemetry;

/// Free space the file system must have before the store writes again: the
/// smaller of this and [`FREE_FLOOR_SHARE`] of its size.
const FREE_FLOOR: u64 = 256 << 20;
const FREE_FLOOR_SHARE: f64 = 0.05;

/// Whether `e` says the store cannot write, as opposed to one write failing.
pub fn is_write_fault(e: &io::Error) -> bool {
    // ENOSPC, EDQUOT, EIO, EROFS.
    matches!(e.raw_os_error(), Some(28 | 122 | 5 | 30))
}

/// The store's write state.
#[derive(Default)]
pub struct WriteFault(Mutex<Option<(SystemTime, String)>>);

impl WriteFault {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(SystemTime, String)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Since when, and why, the store cannot write; `None` when it can.
    pub fn get(&self) -> Option<(SystemTime, String)> {
        self.lock().clone()
    }

    pub fn is_set(&self) -> bool {
        self.lock().is_some()
    }

    /// A write failed with `e` (while doing `what`): if that means the store
    /// cannot write, say so from now on. Returns whether it did.
    pub fn note(&self, e: &io::Error, what: &str) -> bool {
        if !is_write_fault(e) {
            return false;
        }
        let mut f = self.lock();
        if f.is_none() {
            tracing::error!(error = %e, what, "the store cannot write: serving what it holds, passing misses through from memory");
            metrics::gauge!(telemetry::STORE_WRITABLE).set(0.0);
            *f = Some((SystemTime::now(), format!("{what}: {e}")));
        }
        metrics::counter!(telemetry::STORE_FAULTS, "kind" => "write").increment(1);
        true
    }

    /// Try a real write in `tmp` (created, written, fsynced, removed) and
    /// look at the free space under it; clear the fault if both are good.
    /// Blocking.
    pub fn probe(&self, tmp: &Path) {
        if !self.is_set() {
            return;
        }
        let path = tmp.join(".probe");
        let wrote = File::create(&path).and_then(|mut f| f.write_all(&[0u8; 64 * 1024]).and_then(|()| f.sync_all()));
        let _ = std::fs::remove_file(&path);
        let room = match rustix::fs::statvfs(tmp) {
            Ok(s) => {
                let free = s.f_bavail.saturating_mul(s.f_frsize);
                let size = s.f_blocks.saturating_mul(s.f_frsize);
                free >= FREE_FLOOR.min((size as f64 * FREE_FLOOR_SHARE) as u64)
            }
            Err(_) => false,
        };
        if wrote.is_ok() && room {
            *self.lock() = None;
            metrics::gauge!(telemetry::STORE_WRITABLE).set(1.0);
            tracing::info!("the store can write again");
        }
    }
}

/// A file in memory, for a fill while the store cannot write.
pub fn memory_file(name: &str) -> io::Result<File> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn memory_files_read_and_write_like_partial_files() {
        let f = memory_file("test").unwrap();
        f.write_all_at(b"world", 6).unwrap();
        f.write_all_at(b"hello ", 0).unwrap();
        let mut buf = [0u8; 11];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello world");
        f.set_len(5).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 5);
    }

    #[test]
    fn only_faults_of_the_store_count() {
        let w = WriteFault::default();
        assert!(!w.note(&io::Error::from_raw_os_error(2), "open"), "ENOENT is not the store failing");
        assert!(!w.is_set());
        assert!(w.note(&io::Error::from_raw_os_error(28), "write partial"));
        assert!(w.get().unwrap().1.contains("write partial"));
    }
}
