//! Manifests kept by serial: `state/manifests/<serial>`, each a saved pair
//! (manifest and signature, [`super::pair`]).
//!
//! A relay keeps every manifest it verified, and `publish` every manifest it
//! signed, so that `patchrelay export --since N` can tell what a site that
//! holds serial N already has: an incremental air-gap bundle carries only
//! what N did not list. The newest [`KEPT`] are kept (a serial is a publish,
//! not a sync: a thousand is years of daily patterns); older ones are pruned
//! when a new one is saved.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::pair;

/// Manifests kept; older serials are pruned.
pub const KEPT: usize = 1000;

/// The directory of kept manifests.
#[derive(Debug, Clone)]
pub struct History {
    dir: PathBuf,
}

impl History {
    /// The history under a state directory (`<state>/manifests`).
    pub fn in_state(state: &Path) -> History {
        History { dir: state.join("manifests") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, serial: u64) -> PathBuf {
        self.dir.join(serial.to_string())
    }

    /// Keep this pair under its serial (atomic; an existing file for the
    /// serial is left alone: a serial's bytes never change once verified).
    pub fn save(&self, serial: u64, manifest: &[u8], signature: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(serial);
        if path.exists() {
            return Ok(());
        }
        pair::save(&path, manifest, signature)?;
        self.prune();
        Ok(())
    }

    /// The pair kept for `serial`, not verified (callers verify it, or know
    /// why they need not); `Ok(None)`: not kept.
    pub fn load(&self, serial: u64) -> std::io::Result<Option<(Bytes, Bytes)>> {
        let path = self.path(serial);
        match std::fs::read(&path) {
            Ok(d) => pair::decode(Bytes::from(d)).map(Some).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is damaged", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// The serials kept, oldest first.
    pub fn serials(&self) -> Vec<u64> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<u64> = rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        out.sort_unstable();
        out
    }

    fn prune(&self) {
        let serials = self.serials();
        for s in serials.iter().take(serials.len().saturating_sub(KEPT)) {
            if let Err(e) = std::fs::remove_file(self.path(*s)) {
                tracing::warn!(dir = %self.dir.display(), serial = s, error = %e, "cannot prune a kept manifest");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_never_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::in_state(dir.path());
        assert!(h.load(3).unwrap().is_none());
        h.save(3, b"{\"m\":3}", b"sig3\n").unwrap();
        h.save(3, b"other", b"other").unwrap();
        h.save(10, b"{\"m\":10}", b"sig10\n").unwrap();
        let (m, s) = h.load(3).unwrap().unwrap();
        assert_eq!((&m[..], &s[..]), (&b"{\"m\":3}"[..], &b"sig3\n"[..]));
        assert_eq!(h.serials(), vec![3, 10]);
        std::fs::write(h.dir().join("7"), b"garbage").unwrap();
        assert!(h.load(7).is_err());
    }
}
