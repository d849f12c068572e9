//! Hashing on a second core while the first one reads and writes.
//!
//! Export and import move every byte through SHA-256, which on one core
//! costs about as much as the disk does (a 2 GiB bundle: some 1.2 s of
//! hashing against 3 s of I/O here), and in one loop the two add up. So the
//! loop reads a piece, writes it, and hands it to a thread that hashes it
//! (and, for objects whose chunk list must be made, hashes each block too),
//! then reads the next: reading and writing overlap the hashing. Pieces are
//! a few recycled buffers, so the hasher can fall at most that far behind,
//! and nothing is allocated per piece.

use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use crate::digest::{Digest, Hasher};

/// The pieces in flight at once.
const DEPTH: usize = 4;

enum Job {
    /// A new stream; with a block size, its chunk list is made too.
    Start(Option<u64>),
    Piece(Vec<u8>, usize),
    /// The stream is over: send its digest and chunk list.
    Finish(SyncSender<(Digest, Vec<u8>)>),
}

pub struct Hashing {
    jobs: Option<SyncSender<Job>>,
    free: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

impl Hashing {
    /// A hasher taking pieces of up to `piece` bytes.
    pub fn new(piece: usize) -> Hashing {
        let (jobs, rx) = sync_channel::<Job>(DEPTH * 2);
        let (give_back, free) = channel();
        for _ in 0..DEPTH {
            let _ = give_back.send(vec![0u8; piece]);
        }
        let thread = std::thread::Builder::new().name("patchrelay-hash".into()).spawn(move || run(rx, give_back)).ok();
        Hashing { jobs: Some(jobs), free, thread }
    }

    fn send(&self, job: Job) {
        if let Some(j) = &self.jobs {
            let _ = j.send(job);
        }
    }

    /// A free buffer (waits while the hasher is `DEPTH` pieces behind).
    pub fn buffer(&self) -> Vec<u8> {
        self.free.recv().unwrap_or_default()
    }

    /// Give back a buffer that carried nothing.
    pub fn unused(&self, buf: Vec<u8>) {
        self.send(Job::Piece(buf, 0));
    }

    /// Begin a stream; `chunk_size`: also make its chunk list.
    pub fn start(&self, chunk_size: Option<u64>) {
        self.send(Job::Start(chunk_size));
    }

    /// The first `n` bytes of `buf` are the stream's next piece.
    pub fn piece(&self, buf: Vec<u8>, n: usize) {
        self.send(Job::Piece(buf, n));
    }

    /// The stream's digest and (if asked for) chunk list.
    pub fn finish(&self) -> (Digest, Vec<u8>) {
        let (tx, rx) = sync_channel(1);
        self.send(Job::Finish(tx));
        // Without the thread (it could not be started), hash nothing: the
        // digest of nothing matches no object, so the caller refuses.
        rx.recv().unwrap_or_else(|_| (Hasher::new().finish(), Vec::new()))
    }
}

impl Drop for Hashing {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(jobs: Receiver<Job>, give_back: Sender<Vec<u8>>) {
    let mut whole = Hasher::new();
    let mut chunks: Option<(u64, Hasher, u64, Vec<u8>)> = None;
    for job in jobs {
        match job {
            Job::Start(chunk_size) => {
                whole = Hasher::new();
                chunks = chunk_size.map(|s| (s, Hasher::new(), 0, Vec::new()));
            }
            Job::Piece(buf, n) => {
                let piece = &buf[..n];
                whole.update(piece);
                if let Some((size, block, filled, list)) = &mut chunks {
                    let mut rest = piece;
                    while !rest.is_empty() {
                        let room = (*size - *filled) as usize;
                        let (now, later) = rest.split_at(room.min(rest.len()));
                        block.update(now);
                        *filled += now.len() as u64;
                        if *filled == *size {
                            list.extend_from_slice(std::mem::take(block).finish().as_bytes());
                            *filled = 0;
                        }
                        rest = later;
                    }
                }
                let _ = give_back.send(buf);
            }
            Job::Finish(reply) => {
                let digest = std::mem::take(&mut whole).finish();
                let list = match chunks.take() {
                    Some((_, block, filled, mut list)) => {
                        if filled > 0 {
                            list.extend_from_slice(block.finish().as_bytes());
                        }
                        list
                    }
                    None => Vec::new(),
                };
                let _ = reply.send((digest, list));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_chunk_lists_match_hashing_in_one_go() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let h = Hashing::new(3000);
        for round in 0..2 {
            h.start(Some(4096));
            for piece in data.chunks(2500 + round) {
                let mut buf = h.buffer();
                buf[..piece.len()].copy_from_slice(piece);
                h.piece(buf, piece.len());
            }
            let (digest, list) = h.finish();
            assert_eq!(digest, Digest::of(&data));
            let want: Vec<u8> = data.chunks(4096).flat_map(|c| Digest::of(c).as_bytes().to_vec()).collect();
            assert_eq!(list, want);
        }
        h.start(None);
        let buf = h.buffer();
        h.unused(buf);
        assert_eq!(h.finish(), (Digest::of(b""), Vec::new()));
    }
}
