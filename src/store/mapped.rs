//! Read-only memory mappings of object files.
//!
//! Serving a large object by `read` copies every byte from the page cache into
//! a buffer before actix copies it again into the socket; a mapping skips the
//! first copy (measured: the kernel copy was about a quarter of the CPU for
//! 24 MiB objects, and cached mappings put patchrelay level with nginx).
//!
//! This is the one place patchrelay uses `unsafe`, and why it is sound here: a
//! mapping is only undefined behaviour if the file changes while mapped.
//! Object files never change after they are renamed into place: the store and
//! `publish` create them whole, by rename, and only ever unlink them
//! (eviction), which leaves a mapped inode intact. Partial files, which fills
//! do truncate, are never mapped.
//!
//! What remains is the world: an operator who copies over a file in place, a
//! disk that fails. A page past a file's new end, or one the disk cannot
//! read, raises SIGBUS when user space reads it, and that kills the process.
//! So nothing in user space reads a mapping: a mapped object is a
//! [`super::Blob::Mapped`], whose bytes only the kernel reads, when the patched
//! actix-http writes them to a socket (vendor/README.md); a bad page then
//! fails that write with EFAULT and ends one connection. Code that needs an
//! object's bytes reads its file ([`super::Store::read_all`]). A file changed
//! in place at the same length is not caught (it is not caught without a
//! mapping either: the store verifies an object once, when it is stored).

#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use bytes::Bytes;

/// Map a whole object file (which must not be empty) as `Bytes`; the mapping
/// lives as long as any slice of it.
pub fn map(file: &File) -> io::Result<Bytes> {
    // SAFETY: see the module comment: object files are immutable once visible,
    // and only unlinked, never truncated or rewritten.
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Bytes::from_owner(map))
}
