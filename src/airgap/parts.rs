//! A bundle as one file or as parts (`FILE.001`, `FILE.002`, ...), for media
//! with a file size limit (4 GiB on FAT32). Parts are plain byte ranges, as
//! split(1) makes them: `cat FILE.0* > FILE` gives the tar back.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::store::atomic::TempFile;

/// The name of part `n` (1-based) of `base`.
pub fn part_path(base: &Path, n: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{n:03}"));
    PathBuf::from(s)
}

/// Writes the bundle into temp files beside the output and gives them their
/// names only when all is written and durable ([`PartWriter::finish`]):
/// an export that fails leaves no bundle that looks complete.
pub struct PartWriter {
    base: PathBuf,
    max_part: Option<u64>,
    done: Vec<(TempFile, PathBuf)>,
    current: Option<(TempFile, u64)>,
    written: u64,
}

impl PartWriter {
    pub fn new(base: &Path, max_part: Option<u64>) -> PartWriter {
        PartWriter { base: base.to_path_buf(), max_part, done: Vec::new(), current: None, written: 0 }
    }

    fn name(&self, n: u32) -> PathBuf {
        match self.max_part {
            Some(_) => part_path(&self.base, n),
            None => self.base.clone(),
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    fn open_next(&mut self) -> io::Result<()> {
        let dir = crate::store::atomic::parent_dir(&self.base);
        let tmp = TempFile::new_in(dir)?;
        self.current = Some((tmp, 0));
        Ok(())
    }

    fn close_current(&mut self) -> io::Result<()> {
        if let Some((tmp, _)) = self.current.take() {
            let name = self.name(self.done.len() as u32 + 1);
            self.done.push((tmp, name));
        }
        Ok(())
    }

    /// fsync and rename every part into place; returns their names.
    pub fn finish(mut self) -> io::Result<Vec<PathBuf>> {
        if self.current.is_none() && self.done.is_empty() {
            self.open_next()?;
        }
        self.close_current()?;
        let mut names = Vec::new();
        for (tmp, name) in self.done.drain(..) {
            tmp.persist(&name)?;
            names.push(name);
        }
        Ok(names)
    }
}

impl Write for PartWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let (Some(max), Some((_, in_part))) = (self.max_part, &self.current)
            && *in_part >= max
        {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.open_next()?;
        }
        let Some((tmp, in_part)) = self.current.as_mut() else { return Err(io::Error::other("no part open")) };
        let room = self.max_part.map(|m| m - *in_part).unwrap_or(u64::MAX);
        let n = (buf.len() as u64).min(room) as usize;
        let n = tmp.file().write(&buf[..n])?;
        *in_part += n as u64;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a bundle given as its file or its first part, opening the next part
/// when one ends.
pub struct PartReader {
    /// `Some(base)` for a split bundle.
    base: Option<PathBuf>,
    current: File,
    part: u32,
    /// The part that should have come next and was not there.
    missing: Option<PathBuf>,
    /// Parts the header says there are (0: not known yet).
    pub expected_parts: u32,
}

impl PartReader {
    /// Open `path`: a bundle, the first part of a split one (`FILE.001`), or
    /// the base name of a split one (`FILE` when only `FILE.001`... exist).
    pub fn open(path: &Path) -> io::Result<PartReader> {
        let named = |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        if let Some(base) = split_base(path) {
            let current = File::open(path).map_err(|e| named(e, path))?;
            crate::store::read_ahead(&current);
            return Ok(PartReader { base: Some(base), current, part: 1, missing: None, expected_parts: 0 });
        }
        match File::open(path) {
            Ok(current) => {
                crate::store::read_ahead(&current);
                Ok(PartReader { base: None, current, part: 1, missing: None, expected_parts: 0 })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && part_path(path, 1).exists() => {
                let first = part_path(path, 1);
                let current = File::open(&first).map_err(|e| named(e, &first))?;
                crate::store::read_ahead(&current);
                Ok(PartReader { base: Some(path.to_path_buf()), current, part: 1, missing: None, expected_parts: 0 })
            }
            Err(e) => Err(named(e, path)),
        }
    }

    /// The part that was looked for and not found, if the stream ended for that.
    pub fn missing_part(&self) -> Option<&Path> {
        self.missing.as_deref()
    }

    pub fn part(&self) -> u32 {
        self.part
    }
}

/// `FILE` for `FILE.001` (a first part); `None` otherwise.
fn split_base(path: &Path) -> Option<PathBuf> {
    let s = path.to_str()?;
    let base = s.strip_suffix(".001")?;
    (!base.is_empty()).then(|| PathBuf::from(base))
}

impl Read for PartReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let Some(base) = &self.base else { return Ok(0) };
            if self.expected_parts != 0 && self.part >= self.expected_parts {
                return Ok(0);
            }
            let next = part_path(base, self.part + 1);
            match File::open(&next) {
                Ok(f) => {
                    crate::store::read_ahead(&f);
                    self.current = f;
                    self.part += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.missing = Some(next);
                    return Ok(0);
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", next.display()))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("b.tar");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = PartWriter::new(&base, Some(4096));
        for piece in data.chunks(700) {
            w.write_all(piece).unwrap();
        }
        let names = w.finish().unwrap();
        assert_eq!(names, vec![part_path(&base, 1), part_path(&base, 2), part_path(&base, 3)]);
        assert_eq!(std::fs::metadata(&names[0]).unwrap().len(), 4096);
        for start in [part_path(&base, 1), base.clone()] {
            let mut back = Vec::new();
            PartReader::open(&start).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
        }
        std::fs::remove_file(&names[1]).unwrap();
        let mut r = PartReader::open(&names[0]).unwrap();
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), 4096);
        assert_eq!(r.missing_part(), Some(names[1].as_path()));
        // Unsplit, and nothing left behind but the file.
        let one = dir.path().join("one.tar");
        let mut w = PartWriter::new(&one, None);
        w.write_all(&data).unwrap();
        assert_eq!(w.finish().unwrap(), vec![one.clone()]);
        assert_eq!(std::fs::read(&one).unwrap(), data);
    }
}
