//! One fill, start to finish.
//!
//! 1. For a payload, get its chunk list first (a small fill of its own, checked
//!    whole against `chunks_sha256` from the signed manifest).
//! 2. Re-verify whatever a partial file from an earlier attempt (or before a
//!    restart) holds, block by block, and keep only the verified prefix.
//! 3. Fetch the rest, trying upstreams in health order. A transfer that breaks
//!    after receiving bytes is resumed on the same upstream (`Range`, with
//!    `If-Range` when we hold that upstream's ETag) from the last byte it
//!    sent: the bytes of a block in flight are kept, since the block is still
//!    checked whole, so a link cut more often than a block is long still gets
//!    through. Progress is judged over the attempt (did bytes arrive?), not
//!    over verified blocks. An upstream that gives nothing twice in a row (the
//!    first may be a stale pooled connection) is left for the next, which
//!    resumes from the verified mark. Rounds over the upstreams go on while
//!    some attempt in the round made progress, until `fill_deadline`.
//! 4. A block that fails verification is cut off (the file is truncated to the
//!    verified mark), counted against its upstream, which becomes suspect, and
//!    the fill continues from the next upstream. Waiters never saw those bytes,
//!    so they keep waiting instead of being cut off.
//! 5. When every byte is verified, check the whole object's SHA-256, fsync,
//!    and move it into the store. If the whole digest disagrees although every
//!    block matched, the manifest contradicts itself: the partial is dropped
//!    and waiters' connections are aborted (they never get a complete response
//!    with wrong bytes).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{FillError, FillRequest, Filler, Progress, Shared, Verify};
use crate::digest::{Digest, Hasher};
use crate::telemetry;
use crate::upstream::{ErrorKind, Upstream};

/// Most consecutive resumes on one upstream, each after progress, before
/// trying the others: a link that drops every few KiB may be better served
/// elsewhere (and comes round again if it is not).
const MAX_RESUMES_PER_UPSTREAM: u32 = 50;
/// Attempts in a row that receive nothing before an upstream is left: the
/// first may have gone out on a pooled connection the other end had closed.
const EMPTY_ATTEMPTS_PER_UPSTREAM: u32 = 2;

/// Verification state of the bytes received so far.
pub(crate) struct Verifier {
    pub(crate) len: u64,
    /// Expected SHA-256 of each block (empty for whole-object verification).
    pub(crate) blocks: Vec<[u8; 32]>,
    pub(crate) chunk_size: u64,
    /// Bytes `0..verified` are checked.
    pub(crate) verified: u64,
    /// Bytes `0..written` are in the file (`written >= verified`).
    pub(crate) written: u64,
    pub(crate) block: Hasher,
    pub(crate) whole_at_verified: Hasher,
    pub(crate) whole: Hasher,
}

enum Fault {
    /// The transfer broke; retry (here or elsewhere). Whether every wait
    /// timed out, and how many body bytes this attempt received.
    Transfer { why: String, timeout: bool, received: u64 },
    /// Bytes failed verification: the upstream is suspect.
    Integrity(String),
    /// Our own disk failed: retrying elsewhere will not help.
    Local(String),
}

impl Verifier {
    fn chunked(&self) -> bool {
        !self.blocks.is_empty() || self.len == 0
    }

    /// Feed bytes that were just written at `written..`. Returns whether the
    /// verified mark moved.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<bool, String> {
        let mut advanced = false;
        while !data.is_empty() {
            if self.blocks.is_empty() {
                self.whole.update(data);
                self.written += data.len() as u64;
                return Ok(false);
            }
            let block_start = self.verified;
            let block_len = self.chunk_size.min(self.len - block_start);
            let in_block = self.written - block_start;
            let take = (block_len - in_block).min(data.len() as u64) as usize;
            self.block.update(&data[..take]);
            self.whole.update(&data[..take]);
            self.written += take as u64;
            data = &data[take..];
            if self.written - block_start == block_len {
                let index = (block_start / self.chunk_size) as usize;
                let got = std::mem::take(&mut self.block).finish();
                if got.as_bytes() != &self.blocks[index] {
                    self.written = self.verified;
                    self.whole = self.whole_at_verified.clone();
                    return Err(format!(
                        "block {index} (bytes {block_start}..{}) does not match the chunk list",
                        block_start + block_len
                    ));
                }
                self.verified += block_len;
                self.whole_at_verified = self.whole.clone();
                advanced = true;
            }
        }
        Ok(advanced)
    }

    /// How far waiters may read: everything verified, except that the last
    /// block is held back until the whole-object digest has been checked too,
    /// so no waiter can complete a response whose bytes fail that check.
    pub(crate) fn servable(&self) -> u64 {
        if self.chunked() && self.verified == self.len && self.len > 0 {
            let last = self.len - (self.len - 1) / self.chunk_size * self.chunk_size;
            self.len - last
        } else {
            self.verified
        }
    }

    /// Forget unverified bytes (after a broken transfer).
    pub(crate) fn rewind(&mut self) {
        self.written = self.verified;
        self.block = Hasher::new();
        self.whole = self.whole_at_verified.clone();
    }
}

pub(super) async fn run(filler: &Arc<Filler>, shared: &Arc<Shared>, req: &FillRequest) -> Result<(), FillError> {
    let blocks = match &req.verify {
        // An empty payload has an empty chunk list, whose digest is its own:
        // asking for the list would wait on this very fill. Nothing to check
        // block by block anyway; the whole-object check below covers it.
        Verify::Chunks { .. } if req.len == 0 => Vec::new(),
        Verify::Whole => Vec::new(),
        Verify::Chunks { chunk_size, list } => load_chunk_list(filler, list, req.len, *chunk_size).await?,
    };
    let chunk_size = match &req.verify {
        Verify::Chunks { chunk_size, .. } => *chunk_size,
        Verify::Whole => req.len.max(1),
    };
    let mut v = Verifier {
        len: req.len,
        blocks,
        chunk_size,
        verified: 0,
        written: 0,
        block: Hasher::new(),
        whole_at_verified: Hasher::new(),
        whole: Hasher::new(),
    };
    if v.chunked() {
        resume_from_disk(shared, &mut v).await?;
    } else {
        shared.file.set_len(0).map_err(|e| FillError::Store(format!("truncate partial {}: {e}", req.path)))?;
    }
    shared.progress.send_replace(Progress::Starting { verified: v.verified });

    let mut attempts = Vec::new();
    let mut timeouts_only = true;
    let mut last_upstream: Option<Arc<Upstream>> = None;
    let deadline = Instant::now() + filler.upstreams.fill_deadline();
    // An empty object needs no upstream: its digest is checked below.
    if v.verified < v.len {
        let mut complete = false;
        'rounds: loop {
            let mut round_progress = false;
            'upstreams: for up in filler.upstreams.candidates() {
                let Some(_slot) = up.fill_slot().await else { continue };
                // Whatever another upstream left unverified is not this one's to finish.
                v.rewind();
                truncate(shared, &v)?;
                let mut etag: Option<String> = None;
                let (mut resumes, mut empty) = (0u32, 0u32);
                let verified_at_visit = v.verified;
                loop {
                    if Instant::now() >= deadline {
                        attempts.push(format!("gave up after fill_deadline ({:?})", filler.upstreams.fill_deadline()));
                        break 'rounds;
                    }
                    // The deadline bounds each transfer too: a trickle just
                    // inside read_timeout would otherwise hold the fill for ever.
                    let attempt = transfer(&filler.store, &up, shared, req, &mut v, &mut etag);
                    let result = match tokio::time::timeout_at(deadline.into(), attempt).await {
                        Ok(r) => r,
                        Err(_) => Err(Fault::Transfer {
                            why: format!("upstream {}: fill_deadline passed during the transfer", up.name),
                            timeout: true,
                            received: 0,
                        }),
                    };
                    match result {
                        Ok(()) => {
                            last_upstream = Some(up.clone());
                            complete = true;
                            break 'rounds;
                        }
                        Err(Fault::Local(e)) => return Err(FillError::Store(e)),
                        Err(Fault::Integrity(why)) => {
                            up.record_integrity_failure(&format!("{}: {why}", req.path));
                            // Forget every unverified byte this upstream sent (its
                            // hasher state too) before anyone else continues.
                            v.rewind();
                            truncate(shared, &v)?;
                            timeouts_only = false;
                            // Blocks it sent before the bad one were good: that is
                            // progress, and another round may come back to it (a
                            // byte flipped on the way, not by the upstream), the
                            // others first, since it is now suspect.
                            round_progress |= v.verified > verified_at_visit;
                            attempts.push(format!("upstream {}: {why}", up.name));
                            continue 'upstreams;
                        }
                        Err(Fault::Transfer { why, timeout, received }) => {
                            timeouts_only &= timeout;
                            if received > 0 && resumes < MAX_RESUMES_PER_UPSTREAM {
                                round_progress = true;
                                resumes += 1;
                                empty = 0;
                                metrics::counter!(telemetry::FILL_RESUMES, "upstream" => up.name.clone()).increment(1);
                                tracing::info!(upstream = %up.name, object = %req.path, at = v.written, verified = v.verified, "transfer broke after progress; resuming: {why}");
                                tokio::time::sleep(Duration::from_millis(100 * u64::from(resumes.min(10)))).await;
                                continue;
                            }
                            empty += 1;
                            if received == 0 && empty < EMPTY_ATTEMPTS_PER_UPSTREAM {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                            tracing::warn!(upstream = %up.name, object = %req.path, at = v.verified, "trying the next upstream: {why}");
                            attempts.push(why);
                            continue 'upstreams;
                        }
                    }
                }
            }
            if !round_progress {
                break;
            }
        }
        if !complete {
            return Err(FillError::AllFailed { path: req.path.clone(), attempts, timeouts_only });
        }
    }

    // Every byte verified (or whole-object mode): the final check.
    let actual = v.whole.clone().finish();
    if actual != req.digest {
        let upstream = last_upstream.as_ref().map(|u| u.name.clone()).unwrap_or_default();
        if let Some(up) = &last_upstream {
            up.record_integrity_failure(&format!("{} hashes to {actual}", req.path));
        }
        filler.store.discard_partial(&req.digest);
        return Err(FillError::Integrity {
            upstream,
            path: req.path.clone(),
            reason: format!("content hashes to {actual}, not {}; refusing to store it", req.digest),
        });
    }
    if shared.in_memory.is_some() {
        // Passed through: verified, served, not stored (the store cannot write).
        metrics::counter!(telemetry::FILLS, "result" => "passed_through").increment(1);
        tracing::info!(object = %req.path, bytes = req.len, "passed through from memory (the store cannot write)");
        return Ok(());
    }
    let (store, file, digest, len) = (filler.store.clone(), shared.file.clone(), req.digest, req.len);
    crate::telemetry::spawn_blocking(move || {
        store.commit_partial(&digest, &file, len).inspect_err(|e| {
            if let crate::store::StoreError::Io { source, .. } = e {
                store.note_write_error(source, "store a verified object");
            }
        })
    })
    .await
    .map_err(|_| FillError::Aborted(req.path.clone()))?
    .map_err(|e| FillError::Store(e.to_string()))?;
    if let Some(up) = last_upstream {
        tracing::info!(upstream = %up.name, object = %req.path, bytes = req.len, "cached");
    }
    Ok(())
}

fn truncate(shared: &Shared, v: &Verifier) -> Result<(), FillError> {
    shared.file.set_len(v.verified).map_err(|e| FillError::Store(format!("truncate partial {}: {e}", shared.path)))
}

/// One upstream request, from the last byte written to the end (or from 0
/// for objects verified only whole).
async fn transfer(
    store: &crate::store::Store,
    up: &Arc<Upstream>,
    shared: &Shared,
    req: &FillRequest,
    v: &mut Verifier,
    etag: &mut Option<String>,
) -> Result<(), Fault> {
    // A block in flight is continued (it is checked whole when it ends); an
    // object checked only whole starts over.
    if !v.chunked() {
        v.rewind();
    }
    let from = v.written;
    let broke = |why: String, timeout: bool, received: u64| Fault::Transfer { why, timeout, received };
    let mut body = up
        .get_from(&req.path, from, etag.as_deref())
        .await
        .map_err(|e| broke(e.to_string(), matches!(e.kind, ErrorKind::Timeout(_)), 0))?;
    if body.etag.is_some() {
        etag.clone_from(&body.etag);
    }
    if let Some(cl) = body.content_length
        && cl != req.len - body.start
    {
        return Err(broke(
            format!("upstream {}: {} has Content-Length {cl}, expected {}", up.name, req.path, req.len - body.start),
            false,
            0,
        ));
    }
    shared.progress.send_replace(Progress::Running { verified: v.servable() });
    let mut pos = body.start;
    // Progress is bytes this attempt adds past where it started: an upstream
    // that ignores Range and sends the start again each time is not making any.
    let mut received = 0u64;
    loop {
        let chunk = match body.next_chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(broke(e.to_string(), matches!(e.kind, ErrorKind::Timeout(_)), received)),
        };
        let mut data = &chunk[..];
        // A 200 after a resume restarts at 0: skip what we already have.
        if pos < v.written {
            let skip = (v.written - pos).min(data.len() as u64) as usize;
            data = &data[skip..];
            pos += skip as u64;
        }
        if data.is_empty() {
            continue;
        }
        if pos + data.len() as u64 > req.len {
            return Err(Fault::Integrity(format!("sent more than the manifest's {} bytes", req.len)));
        }
        shared.file.write_all_at(data, pos).map_err(|e| {
            store.note_write_error(&e, "write a partial file");
            Fault::Local(format!("write partial {}: {e}", req.path))
        })?;
        pos += data.len() as u64;
        received += data.len() as u64;
        match v.feed(data) {
            Ok(true) => {
                shared.progress.send_replace(Progress::Running { verified: v.servable() });
            }
            Ok(false) => {}
            Err(why) => return Err(Fault::Integrity(why)),
        }
    }
    if v.written != req.len {
        return Err(broke(
            format!("upstream {}: {} ended at byte {}, expected {}", up.name, req.path, v.written, req.len),
            false,
            received,
        ));
    }
    if !v.chunked() {
        v.verified = v.written;
    }
    Ok(())
}

/// Fetch (or find) the chunk list and check it fits the object.
async fn load_chunk_list(
    filler: &Arc<Filler>,
    list: &FillRequest,
    len: u64,
    chunk_size: u64,
) -> Result<Vec<[u8; 32]>, FillError> {
    let expected = len.div_ceil(chunk_size) * Digest::LEN as u64;
    if list.len != expected || list.len > crate::repo::manifest::MAX_CHUNK_LIST_BYTES {
        return Err(FillError::Integrity {
            upstream: String::new(),
            path: list.path.clone(),
            reason: format!(
                "chunk list is {} bytes, but {len} bytes in {chunk_size}-byte blocks need {expected}",
                list.len
            ),
        });
    }
    // The list's own fill is held on to until it is read: while the store
    // cannot write, that fill is in memory and its file is the only copy.
    let fill = match filler.attach(list.clone())? {
        super::Opened::Stored(_) => None,
        super::Opened::Filling(mut h) => {
            h.done().await.map_err(|e| (*e).clone())?;
            Some(h)
        }
    };
    // Up to 64 MiB, from the file (never a mapping): read off the async threads.
    let (store, digest, want) = (filler.store.clone(), list.digest, list.len);
    let memory = fill.filter(|h| h.in_memory()).map(|h| h.file().clone());
    let bytes = crate::telemetry::spawn_blocking(move || match memory {
        Some(file) => {
            let mut buf = vec![0u8; want as usize];
            file.read_exact_at(&mut buf, 0).map(|()| Some(bytes::Bytes::from(buf))).map_err(|e| e.to_string())
        }
        None => store.read_all(&digest).map_err(|e| e.to_string()),
    })
    .await
    .map_err(|_| FillError::Aborted(list.path.clone()))?
    .map_err(|e| FillError::Store(format!("read chunk list: {e}")))?
    .ok_or_else(|| FillError::Store(format!("chunk list {} vanished after it was stored", list.digest)))?;
    if bytes.len() as u64 != list.len {
        return Err(FillError::Store(format!(
            "chunk list {} is {} bytes on disk, expected {}",
            list.digest,
            bytes.len(),
            list.len
        )));
    }
    Ok(bytes.chunks_exact(Digest::LEN).map(|c| c.try_into().unwrap_or([0u8; 32])).collect())
}

/// Keep the verified prefix of a partial file left by an earlier attempt.
async fn resume_from_disk(shared: &Shared, v: &mut Verifier) -> Result<(), FillError> {
    let file = shared.file.clone();
    let (len, chunk_size, blocks) = (v.len, v.chunk_size, v.blocks.clone());
    let scanned = crate::telemetry::spawn_blocking(move || -> std::io::Result<(u64, Hasher)> {
        let on_disk = file.metadata()?.len().min(len);
        let mut whole = Hasher::new();
        let mut verified = 0u64;
        let mut buf = vec![0u8; chunk_size.min(on_disk.max(1)) as usize];
        while verified < on_disk {
            let block_len = chunk_size.min(len - verified);
            if verified + block_len > on_disk {
                break;
            }
            let b = &mut buf[..block_len as usize];
            file.read_exact_at(b, verified)?;
            let index = (verified / chunk_size) as usize;
            if Digest::of(b).as_bytes() != &blocks[index] {
                break;
            }
            whole.update(b);
            verified += block_len;
        }
        file.set_len(verified)?;
        Ok((verified, whole))
    })
    .await
    .map_err(|_| FillError::Aborted(shared.path.clone()))?
    .map_err(|e| FillError::Store(format!("re-verify partial {}: {e}", shared.path)))?;
    if scanned.0 > 0 {
        tracing::info!(object = %shared.path, bytes = scanned.0, "resuming from a verified partial file");
    }
    v.verified = scanned.0;
    v.written = scanned.0;
    v.whole_at_verified = scanned.1.clone();
    v.whole = scanned.1;
    Ok(())
}
