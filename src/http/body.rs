//! Response bodies: a queue of pieces (bytes in memory, spans of a file, or
//! spans of an object still being filled) streamed with a known total length.
//!
//! The length is always known before the first byte (from the manifest), so
//! every response carries `Content-Length`, which is what lets a client resume.
//! Memory objects are sliced without copying; files are read in
//! [`READ_SIZE`] blocks with positioned reads (`pread`), so several responses
//! can share one open file without seeking. A span of a filling object is read
//! the same way, but only below the fill's verified mark; the stream waits for
//! the mark to move, and ends with an error (the client sees a short body and
//! resumes later) if the fill fails.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use crate::fill::FillHandle;
use crate::limits::Permit;
use crate::telemetry::Tally;

/// The largest piece: large enough to amortise system calls for fast clients.
pub const READ_SIZE: usize = 256 * 1024;
/// The first piece, and the smallest, unless `server.send_buffer` caps pieces.
/// A 64 KiB range (a resuming agent's typical request) then goes in one write.
pub const MIN_PIECE: usize = 64 * 1024;
/// Polls closer than this mean the socket took the last piece at once.
const QUICK: std::time::Duration = std::time::Duration::from_millis(20);
/// Polls further apart than this mean the client reads slowly.
const SLOW: std::time::Duration = std::time::Duration::from_millis(200);
/// A response following a fill gives way to others after this many bytes.
///
/// When a verified block lands, every waiter on that object wakes at once. The
/// ones polled first would otherwise copy the whole new block (and everything
/// they are behind) before the next waiter sends its first byte: with 1,000
/// waiters, the last one's first byte came seconds late. Yielding after a
/// share puts each waiter back in the run queue behind the others, so every
/// waiter starts early and all catch up at the same pace. A piece never crosses
/// a share's end, so a turn is at most one share whatever the piece size.
const FILL_SHARE: usize = 64 * 1024;
/// A waiter's first piece is smaller: at most 16 KiB, where later pieces of a
/// turn may be 64 KiB. (The turn itself still runs to [`FILL_SHARE`] when the
/// socket takes it; only the first write is smaller.) With 1,000 waiters
/// (fill-storm, arrival stamps) first-byte p50 went from 0.73-0.94 s to
/// 0.33-0.41 s in five runs. A 4 KiB first piece was worse (0.51 s), and so was
/// holding the whole first turn to 16 KiB (0.35 and 0.54 s): more turns cost
/// more than they save.
const FIRST_FILL_PIECE: usize = 16 * 1024;

/// Piece size adapts to the client, like TCP's slow start. actix asks for the
/// next piece as soon as the socket took the previous one, so quick polls mean
/// a fast client: pieces double up to the cap. A long gap means a slow client:
/// back to the smallest. Whatever piece the socket could not take waits in
/// actix's write buffer, so a slow connection holds about one piece.
///
/// The cap is [`READ_SIZE`], or an eighth of `server.send_buffer` when the
/// operator caps socket buffers for many slow agents. Without a cap, the kernel
/// lets each socket buffer up to `tcp_wmem`'s maximum (megabytes), and pieces
/// of 64 KiB and up cost little beside it. With one, memory per connection is
/// what the operator is saving, and what a slow connection holds is actix's
/// buffers plus about one piece: 2 KiB pieces measured 12.7 KiB per slow
/// connection, 8 KiB pieces 23.8 KiB, and 2 KiB pieces with the patched
/// actix-http buffers (vendor/README.md) 7.3 KiB (docs/performance.md).
#[derive(Debug)]
struct Pace {
    size: usize,
    max: usize,
    last: Option<std::time::Instant>,
}

impl Pace {
    fn new(max: usize) -> Self {
        Pace { size: MIN_PIECE.min(max), max, last: None }
    }

    fn next(&mut self) -> usize {
        let now = std::time::Instant::now();
        if let Some(last) = self.last {
            let gap = now.duration_since(last);
            if gap < QUICK {
                self.size = (self.size * 2).min(self.max);
            } else if gap > SLOW {
                self.size = MIN_PIECE.min(self.max);
            }
        }
        self.last = Some(now);
        self.size
    }

    /// The stream returned Pending for its own reasons (no data yet, or
    /// giving way): the gap to the next poll says nothing about the client.
    fn forget(&mut self) {
        self.last = None;
    }
}

/// The largest piece for connections whose send buffer is capped at `send_buffer`.
pub fn piece_cap(send_buffer: Option<u64>) -> usize {
    match send_buffer {
        Some(b) => ((b / 8) as usize).clamp(2 * 1024, READ_SIZE),
        None => READ_SIZE,
    }
}

pub enum Piece {
    Bytes(Bytes),
    /// A span of a file this response opened for itself (read in sequence).
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
    /// A span of a file others read too (positioned reads only).
    SharedFile {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
    Growing {
        handle: Box<FillHandle>,
        offset: u64,
        len: u64,
    },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File { len, .. } | Piece::SharedFile { len, .. } | Piece::Growing { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The body stream. Counts what it actually sent (a client may hang up early)
/// into `sent_counter` when dropped.
pub struct PieceStream {
    pieces: VecDeque<Piece>,
    buf: BytesMut,
    sent: u64,
    sent_counter: &'static Tally,
    /// Rate limits, when a policy applies: each piece is reserved on the
    /// agent's bucket (and the total one) and held back until it is due. The
    /// permit also holds the agent's concurrency slot until the stream ends.
    permit: Option<Permit>,
    /// A piece read and waiting for its time, and the timer.
    held: Option<(Bytes, Pin<Box<tokio::time::Sleep>>)>,
    /// Where the response's own file is positioned, if known.
    file_pos: Option<u64>,
    pace: Pace,
    /// Bytes of a filling object sent since this stream last gave way.
    since_yield: usize,
    /// Told, off the event loop, when the stream ends before its last piece
    /// (whether reading the file failed): see [`PieceStream::on_short`].
    on_short: Option<OnShort>,
    /// Reading the response's file failed.
    read_failed: bool,
    /// The last piece was handed out (and then the end): the body is whole
    /// as far as this stream knows. A write the kernel failed after that is
    /// only seen as a stream dropped before it finished.
    finished: bool,
}

/// See [`PieceStream::on_short`].
pub type OnShort = crate::source::Check;

impl PieceStream {
    pub fn new(pieces: VecDeque<Piece>, sent_counter: &'static Tally, permit: Option<Permit>) -> Self {
        PieceStream {
            pieces,
            buf: BytesMut::new(),
            sent: 0,
            sent_counter,
            permit,
            held: None,
            file_pos: None,
            pace: Pace::new(READ_SIZE),
            since_yield: 0,
            on_short: None,
            read_failed: false,
            finished: false,
        }
    }

    /// Have `f` told when the response ends early. Most such ends are a
    /// client hanging up; some are the store failing under it (a mapped page
    /// the kernel could not read ends the connection with nothing else to
    /// show), and `f` is where the source checks its object (`source::Check`).
    pub fn on_short(mut self, f: Option<OnShort>) -> Self {
        self.on_short = f;
        self
    }

    /// The largest piece to produce at once: the read size, or less when a
    /// rate limit paces the stream (so no single piece exceeds the burst).
    fn max_piece(&mut self) -> usize {
        // A rate-limited stream uses its permit's fixed piece (fair shares
        // between an agent's connections); others adapt to the client.
        match &self.permit {
            // Under the same cap as unlimited streams: a rate-limited fleet
            // is exactly the many slow agents `send_buffer` is set for.
            Some(p) => (p.piece() as usize).min(self.pace.max),
            None => self.pace.next(),
        }
    }

    /// Cap piece sizes (see [`piece_cap`]).
    pub fn with_max_piece(mut self, max: usize) -> Self {
        self.pace = Pace::new(max.max(1));
        self
    }

    pub fn total_len(&self) -> u64 {
        self.pieces.iter().map(Piece::len).sum()
    }

    /// Read from a file this response has to itself (a stored object):
    /// `read_to_end` reads into uninitialised capacity, so unlike `read_at`
    /// into a buffer it does not zero the memory first; on 24 MiB objects
    /// that is a third less memory traffic. The file position is tracked so
    /// consecutive pieces cost one `read` each.
    fn read_own_file(&mut self, file: &File, offset: u64, want: usize) -> io::Result<Bytes> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = file;
        if self.file_pos != Some(offset) {
            f.seek(SeekFrom::Start(offset))?;
        }
        let mut v = Vec::with_capacity(want);
        f.take(want as u64).read_to_end(&mut v)?;
        if v.len() != want {
            self.file_pos = None;
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "object file is shorter than its recorded size"));
        }
        self.file_pos = Some(offset + want as u64);
        Ok(Bytes::from(v))
    }

    /// Read from a file shared with a fill and other readers: positioned reads
    /// only, so nobody's position moves under anybody.
    fn read_file(&mut self, file: &File, offset: u64, want: usize) -> io::Result<Bytes> {
        // Reuses the previous allocation once the bytes handed out from it are
        // dropped (BytesMut::reserve reclaims it), so steady streaming allocates
        // rarely.
        self.buf.clear();
        self.buf.reserve(want);
        self.buf.resize(want, 0);
        let mut filled = 0;
        while filled < want {
            let n = file.read_at(&mut self.buf[filled..], offset + filled as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "object file is shorter than its recorded size",
                ));
            }
            filled += n;
        }
        Ok(self.buf.split_to(want).freeze())
    }
}

impl Stream for PieceStream {
    type Item = Result<Bytes, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some((_, sleep)) = &mut this.held {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some((out, _)) = this.held.take() {
                this.sent += out.len() as u64;
                return Poll::Ready(Some(Ok(out)));
            }
        }
        let out = match this.next_piece(cx) {
            Poll::Ready(Some(Ok(out))) => out,
            Poll::Ready(None) => {
                this.finished = true;
                return Poll::Ready(None);
            }
            other => return other,
        };
        if let Some(permit) = &mut this.permit {
            let wait = permit.reserve(out.len() as u64);
            if !wait.is_zero() {
                let mut sleep = Box::pin(tokio::time::sleep(wait));
                if sleep.as_mut().poll(cx).is_pending() {
                    this.held = Some((out, sleep));
                    return Poll::Pending;
                }
            }
        }
        this.sent += out.len() as u64;
        Poll::Ready(Some(Ok(out)))
    }
}

impl PieceStream {
    /// The next piece of the body, before any pacing.
    fn next_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, io::Error>>> {
        let max = self.max_piece();
        let this = self;
        loop {
            let Some(front) = this.pieces.front_mut() else {
                return Poll::Ready(None);
            };
            let out = match front {
                Piece::Bytes(b) => {
                    if b.len() > max {
                        b.split_to(max)
                    } else {
                        let b = std::mem::take(b);
                        this.pieces.pop_front();
                        if b.is_empty() {
                            continue;
                        }
                        b
                    }
                }
                Piece::File { len: 0, .. } | Piece::SharedFile { len: 0, .. } | Piece::Growing { len: 0, .. } => {
                    this.pieces.pop_front();
                    continue;
                }
                Piece::SharedFile { file, offset, len } => {
                    let want = (*len).min(max as u64) as usize;
                    let (file, at) = (file.clone(), *offset);
                    match this.read_file(&file, at, want) {
                        Ok(bytes) => {
                            if let Some(Piece::SharedFile { offset, len, .. }) = this.pieces.front_mut() {
                                *offset += want as u64;
                                *len -= want as u64;
                            }
                            bytes
                        }
                        Err(e) => {
                            // A file cut short under its mapping: the response
                            // ends short, never with made-up bytes.
                            tracing::error!(error = %e, "reading an object file failed mid-response");
                            this.read_failed = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                Piece::Growing { handle, offset, len } => {
                    let available = match handle.available() {
                        Ok(a) => a,
                        Err(e) => {
                            this.pieces.clear();
                            return Poll::Ready(Some(Err(io::Error::other(format!("upstream fill failed: {e}")))));
                        }
                    };
                    if available <= *offset {
                        match handle.poll_change(cx) {
                            Poll::Pending => {
                                this.since_yield = 0;
                                this.pace.forget();
                                return Poll::Pending;
                            }
                            Poll::Ready(Some(_)) => continue,
                            Poll::Ready(None) => {
                                this.pieces.clear();
                                return Poll::Ready(Some(Err(io::Error::other("upstream fill ended early"))));
                            }
                        }
                    }
                    let share = if this.sent == 0 { FIRST_FILL_PIECE } else { FILL_SHARE };
                    if this.since_yield >= share {
                        this.since_yield = 0;
                        this.pace.forget();
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    let want =
                        (*len).min(available - *offset).min(max as u64).min((share - this.since_yield) as u64) as usize;
                    this.since_yield += want;
                    let (file, at) = (handle.file().clone(), *offset);
                    match this.read_file(&file, at, want) {
                        Ok(bytes) => {
                            if let Some(Piece::Growing { offset, len, .. }) = this.pieces.front_mut() {
                                *offset += want as u64;
                                *len -= want as u64;
                            }
                            bytes
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading a filling object failed mid-response");
                            this.pieces.clear();
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                Piece::File { file, offset, len } => {
                    let want = (*len).min(max as u64) as usize;
                    let (file, at) = (file.clone(), *offset);
                    match this.read_own_file(&file, at, want) {
                        Ok(bytes) => {
                            if let Some(Piece::File { offset, len, .. }) = this.pieces.front_mut() {
                                *offset += want as u64;
                                *len -= want as u64;
                            }
                            bytes
                        }
                        Err(e) => {
                            // Ends the response early; the client sees a short
                            // body against Content-Length, never wrong bytes.
                            tracing::error!(error = %e, "reading an object file failed mid-response");
                            this.read_failed = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            };
            return Poll::Ready(Some(Ok(out)));
        }
    }
}

impl Drop for PieceStream {
    fn drop(&mut self) {
        self.sent_counter.add(self.sent);
        if (self.read_failed || !self.finished)
            && let Some(check) = self.on_short.take()
        {
            let failed = self.read_failed;
            // A `stat`, but on a failing disk even that may block: off the
            // event loop when there is a runtime to hand it to.
            match tokio::runtime::Handle::try_current() {
                Ok(_) => drop(crate::telemetry::spawn_blocking(move || check.run(failed))),
                Err(_) => check.run(failed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};
    use std::io::Write;

    fn noop() -> &'static Tally {
        crate::telemetry::tally("patchrelay_test_body_bytes_total", &[])
    }

    #[test]
    fn streams_bytes_and_file_spans() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..READ_SIZE * 2 + 10).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let file = Arc::new(f);
        let pieces = VecDeque::from([
            Piece::Bytes(Bytes::from_static(b"head")),
            Piece::File { file: file.clone(), offset: 5, len: (READ_SIZE + 100) as u64 },
            Piece::File { file, offset: 0, len: 0 },
            Piece::Bytes(Bytes::from_static(b"tail")),
        ]);
        let mut s = PieceStream::new(pieces, noop(), None);
        assert_eq!(s.total_len(), (READ_SIZE + 108) as u64);
        // The stream never waits, so polling once per item is enough.
        let mut got = Vec::new();
        while let Some(b) = s.next().now_or_never().unwrap() {
            got.extend_from_slice(&b.unwrap());
        }
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data[5..5 + READ_SIZE + 100]);
        want.extend_from_slice(b"tail");
        assert_eq!(got, want);
    }
}
