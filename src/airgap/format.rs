//! The bundle container: a plain tar, written and read in one pass.
//!
//! ```text
//! patchrelay-bundle.json         the header (JSON, [`Header`]): what the bundle
//!                                brings, and every entry below with its size and SHA-256
//! patchrelay-bundle.json.sha256  "<sha256>  patchrelay-bundle.json\n" (sha256sum -c)
//! v1/manifest                    the origin's manifest, verbatim
//! v1/manifest.sig                its signature, verbatim
//! v1/signatures/<sha256>         the same signature under the manifest's digest
//! v1/objects/<sha256>            an object carried whole, then
//! v1/chunks/<sha256>             its chunk list (named by the object, as in a repository)
//! v1/deltas/<sha256>             a delta (from and to in the header)
//! ```
//!
//! Entries come in the header's order, and the importer holds a bundle to
//! it: an entry out of place, missing, or of another size is refused by
//! name. Sizes are all known before the first byte is written (objects from
//! the manifest, deltas computed first), so the header can say how long the
//! whole bundle is and how many parts it was split into, and a reader can
//! tell a missing part from a damaged one.
//!
//! The tar framing is written here rather than through `tar::Builder`,
//! whose copy loop reads 8 KiB at a time: entries are streamed in 1 MiB
//! pieces through the hash that checks them. Headers are GNU tar headers
//! built by the `tar` crate (sizes over 8 GiB in base-256, as GNU tar reads
//! them); nothing but regular files appears.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::Brought;
use crate::digest::Digest;

pub const HEADER_NAME: &str = "patchrelay-bundle.json";
pub const HEADER_SUM_NAME: &str = "patchrelay-bundle.json.sha256";
pub const FORMAT_NAME: &str = "patchrelay-bundle";
pub const FORMAT_VERSION: u32 = 1;
/// The largest header an importer reads (a repository of 100,000 objects
/// has a header of about 40 MB).
pub const MAX_HEADER_BYTES: u64 = 256 << 20;

const BLOCK: u64 = 512;

/// The bundle header: a table of contents, not a source of trust.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub created_at: String,
    pub created_by: String,
    /// The manifest this bundle brings.
    pub serial: u64,
    pub manifest_sha256: Digest,
    /// The manifest the other side was assumed to hold (`--since`); `None`:
    /// a full bundle.
    pub since: Option<Since>,
    /// `--components`: only these components' versions are carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<String>>,
    /// The whole bundle's length in bytes, and the parts it was split into.
    pub bundle_bytes: u64,
    pub parts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_part: Option<u64>,
    /// The versions this bundle brings.
    pub brings: Vec<Brought>,
    /// Every entry after the header and its checksum, in order.
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Since {
    pub serial: u64,
    pub manifest_sha256: Digest,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub sha256: Digest,
    /// Deltas: the base and the target, by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Digest>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Manifest,
    Signature,
    Object,
    Chunks,
    Delta,
}

impl Header {
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The checksum entry's contents, as `sha256sum` writes them.
    pub fn sum_line(json: &[u8]) -> Vec<u8> {
        format!("{}  {HEADER_NAME}\n", Digest::of(json)).into_bytes()
    }

    /// Fill in `bundle_bytes` and `parts` for these entries: they depend on
    /// the header's own length, so settle them by iterating (the header
    /// grows by a digit at most each round).
    pub fn settle_length(&mut self, max_part: Option<u64>) {
        for _ in 0..8 {
            let json = self.to_json();
            let sum = Header::sum_line(&json);
            let total = entry_len(json.len() as u64)
                + entry_len(sum.len() as u64)
                + self.entries.iter().map(|e| entry_len(e.size)).sum::<u64>()
                + END_LEN;
            let parts = match max_part {
                Some(m) if m > 0 => u32::try_from(total.div_ceil(m)).unwrap_or(u32::MAX),
                _ => 1,
            };
            if total == self.bundle_bytes && parts == self.parts {
                return;
            }
            self.bundle_bytes = total;
            self.parts = parts;
        }
    }
}

/// Bytes a tar entry of `size` takes: its header block and its data padded
/// to a block.
pub fn entry_len(size: u64) -> u64 {
    BLOCK + size.div_ceil(BLOCK) * BLOCK
}

/// The two zero blocks that end a tar.
pub const END_LEN: u64 = 2 * BLOCK;

/// Writes tar entries to `out`.
pub struct TarWriter<W: Write> {
    out: W,
    mtime: u64,
    /// Data bytes still due for the entry being written.
    due: u64,
    pad: u64,
}

impl<W: Write> TarWriter<W> {
    /// Entries get modification time `mtime` (Unix seconds), mode 0644, owner 0.
    pub fn new(out: W, mtime: u64) -> Self {
        TarWriter { out, mtime, due: 0, pad: 0 }
    }

    /// Start an entry of `size` bytes: its data follows through [`Self::data`].
    pub fn begin(&mut self, path: &str, size: u64) -> io::Result<()> {
        if self.due != 0 {
            return Err(io::Error::other(format!("tar entry before {path} is {} bytes short", self.due)));
        }
        let mut h = tar::Header::new_gnu();
        h.set_path(path)?;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        self.out.write_all(h.as_bytes())?;
        self.due = size;
        self.pad = size.div_ceil(BLOCK) * BLOCK - size;
        if size == 0 {
            self.end_entry()?;
        }
        Ok(())
    }

    /// Data of the current entry; the entry ends when its size is reached.
    pub fn data(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 > self.due {
            return Err(io::Error::other("more data than the tar entry's size"));
        }
        self.out.write_all(data)?;
        self.due -= data.len() as u64;
        if self.due == 0 {
            self.end_entry()?;
        }
        Ok(())
    }

    fn end_entry(&mut self) -> io::Result<()> {
        const ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
        self.out.write_all(&ZEROS[..self.pad as usize])?;
        self.pad = 0;
        Ok(())
    }

    /// A whole entry from memory.
    pub fn entry(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.begin(path, data.len() as u64)?;
        if !data.is_empty() {
            self.data(data)?;
        }
        Ok(())
    }

    /// The end of the archive; gives back the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.due != 0 {
            return Err(io::Error::other(format!("the last tar entry is {} bytes short", self.due)));
        }
        self.out.write_all(&[0u8; END_LEN as usize])?;
        Ok(self.out)
    }
}

/// What the next tar entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHead {
    pub path: String,
    pub size: u64,
}

/// Why the tar stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("the bundle ends after {at} bytes, inside {inside}")]
    Truncated { at: u64, inside: String },
    #[error("at byte {at}: not a tar header ({why})")]
    BadHeader { at: u64, why: String },
    #[error("read error at byte {at}: {source}")]
    Io { at: u64, source: io::Error },
}

/// Reads tar entries from `inner`, one at a time, with the offset of each
/// for error messages.
pub struct TarReader<R: Read> {
    inner: R,
    offset: u64,
    /// Data bytes left in the current entry, then its padding.
    left: u64,
    pad: u64,
    current: String,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader { inner, offset: 0, left: 0, pad: 0, current: "the first tar header".into() }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn inner(&self) -> &R {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(TarError::Truncated { at: self.offset + got as u64, inside: self.current.clone() });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(TarError::Io { at: self.offset + got as u64, source }),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// The next entry's header, or `None` at the end of the archive. The
    /// current entry's data must have been read.
    pub fn next_entry(&mut self) -> Result<Option<EntryHead>, TarError> {
        if self.left != 0 {
            return Err(TarError::BadHeader {
                at: self.offset,
                why: format!("{} bytes of {} not read", self.left, self.current),
            });
        }
        let mut skip = [0u8; BLOCK as usize];
        let pad = self.pad as usize;
        self.fill(&mut skip[..pad])?;
        self.pad = 0;
        let at = self.offset;
        let mut block = [0u8; BLOCK as usize];
        self.current = format!("the tar header at byte {at}");
        self.fill(&mut block)?;
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let bad = |why: String| TarError::BadHeader { at, why };
        let h = tar::Header::from_byte_slice(&block);
        // Compared as numbers: writers format the field differently.
        let mut check = h.clone();
        check.set_cksum();
        if check.cksum().ok() != h.cksum().ok() {
            return Err(bad("its checksum does not match".into()));
        }
        if h.entry_type() != tar::EntryType::Regular {
            return Err(bad(format!("entry type {:?}; a bundle holds regular files only", h.entry_type())));
        }
        let path = std::str::from_utf8(&h.path_bytes()).map_err(|_| bad("path is not UTF-8".into()))?.to_string();
        let size = h.entry_size().map_err(|e| bad(format!("size: {e}")))?;
        let padded = size.checked_next_multiple_of(BLOCK).ok_or_else(|| bad(format!("size {size} is impossible")))?;
        self.left = size;
        self.pad = padded - size;
        self.current = format!("entry {path}");
        Ok(Some(EntryHead { path, size }))
    }

    /// Read up to `buf.len()` bytes of the current entry's data; 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(TarError::Truncated { at: self.offset, inside: self.current.clone() }),
                Ok(n) => {
                    self.offset += n as u64;
                    self.left -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(TarError::Io { at: self.offset, source }),
            }
        }
    }

    /// The current entry's data whole (callers bound `size` first).
    pub fn read_all(&mut self) -> Result<Vec<u8>, TarError> {
        let mut out = vec![0u8; self.left as usize];
        let mut got = 0;
        while got < out.len() {
            got += self.read_data(&mut out[got..])?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_it_reads_and_lengths_add_up() {
        let mut w = TarWriter::new(Vec::new(), 1_700_000_000);
        w.entry("a.json", b"{}\n").unwrap();
        w.entry("empty", b"").unwrap();
        w.begin("v1/objects/x", 1500).unwrap();
        w.data(&[7u8; 1000]).unwrap();
        w.data(&[8u8; 500]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() as u64, entry_len(3) + entry_len(0) + entry_len(1500) + END_LEN);

        let mut r = TarReader::new(&out[..]);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e, EntryHead { path: "a.json".into(), size: 3 });
        assert_eq!(r.read_all().unwrap(), b"{}\n");
        assert_eq!(r.next_entry().unwrap().unwrap().size, 0);
        assert_eq!(r.next_entry().unwrap().unwrap().path, "v1/objects/x");
        let data = r.read_all().unwrap();
        assert_eq!((data[999], data[1000], data.len()), (7, 8, 1500));
        assert!(r.next_entry().unwrap().is_none());

        // Cut short: the error says where and in what.
        let mut r = TarReader::new(&out[..1600]);
        r.next_entry().unwrap();
        r.read_all().unwrap();
        r.next_entry().unwrap();
        match r.next_entry() {
            Err(TarError::Truncated { inside, .. }) => assert!(inside.contains("tar header"), "{inside}"),
            other => panic!("{other:?}"),
        }
        // A flipped header byte: its checksum catches it.
        let mut bad = out.clone();
        bad[3] ^= 1;
        assert!(matches!(TarReader::new(&bad[..]).next_entry(), Err(TarError::BadHeader { .. })));
    }

    #[test]
    fn gnu_tar_lists_what_we_write() {
        // GNU tar is essential on Debian: no install hint needed.
        let tar = "tar";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tar");
        let mut w = TarWriter::new(std::fs::File::create(&path).unwrap(), 1_700_000_000);
        w.entry("patchrelay-bundle.json", b"{}\n").unwrap();
        w.entry("v1/objects/ab", &[1u8; 700]).unwrap();
        w.finish().unwrap();
        let out = std::process::Command::new(tar).arg("tf").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "patchrelay-bundle.json\nv1/objects/ab\n");
    }

    #[test]
    fn settled_lengths_match_what_is_written() {
        let mut h = Header {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            created_at: "2026-12-07T00:00:00Z".into(),
            created_by: "test".into(),
            serial: 7,
            manifest_sha256: Digest::of(b"m"),
            since: None,
            components: None,
            bundle_bytes: 0,
            parts: 0,
            max_part: Some(4096),
            brings: Vec::new(),
            entries: vec![Entry {
                path: "v1/manifest".into(),
                kind: EntryKind::Manifest,
                size: 10_000,
                sha256: Digest::of(b"m"),
                from: None,
                to: None,
            }],
        };
        h.settle_length(Some(4096));
        let json = h.to_json();
        let mut w = TarWriter::new(Vec::new(), 0);
        w.entry(HEADER_NAME, &json).unwrap();
        w.entry(HEADER_SUM_NAME, &Header::sum_line(&json)).unwrap();
        w.entry("v1/manifest", &[0u8; 10_000]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() as u64, h.bundle_bytes);
        assert_eq!(u64::from(h.parts), h.bundle_bytes.div_ceil(4096));
    }
}
