//! Guards fill verification: the verified mark covers only blocks matching the chunk list, however bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patchrelay::digest::Digest;
use patchrelay::fuzzing::{ChunkRun, verify_chunks};

// Input: chunk size byte (high bit: 4096, else 1 + the byte, so small inputs
// have many blocks); a byte whose bit i%8 says block i's listed digest is
// wrong; a byte whose high bit asks for whole-object verification (an empty
// list) and whose low 6 bits are the length of the split pattern that
// follows (piece sizes, 0 = a broken transfer resumed elsewhere); then the
// object.
fuzz_target!(|data: &[u8]| {
    let Some((&[size, bad, pattern], rest)) = data.split_first_chunk::<3>() else { return };
    let chunk_size = if size & 0x80 != 0 { 4096 } else { u64::from(size) + 1 };
    let (split, object) = rest.split_at(usize::from(pattern & 0x3f).min(rest.len()));
    let whole_only = pattern & 0x80 != 0 && !object.is_empty();

    let blocks: Vec<&[u8]> = object.chunks(chunk_size as usize).collect();
    let mut list = Vec::new();
    if !whole_only {
        for (i, block) in blocks.iter().enumerate() {
            let mut d = *Digest::of(block).as_bytes();
            if bad & (1 << (i % 8)) != 0 {
                d[i % 32] ^= 0x01;
            }
            list.extend_from_slice(&d);
        }
    }

    let run = verify_chunks(object, chunk_size, &list, split).expect("a list of the right length was refused");
    let at_once = verify_chunks(object, chunk_size, &list, &[]).expect("refused at once");
    check(&run, object, chunk_size, &list, whole_only);
    check(&at_once, object, chunk_size, &list, whole_only);
    // Pieces and broken transfers change nothing in the outcome.
    assert_eq!(
        (run.verified, run.written, run.whole, run.failed),
        (at_once.verified, at_once.written, at_once.whole, at_once.failed),
        "fed in pieces {split:?}"
    );
    // A list of the wrong length is refused before anything is verified.
    if !whole_only {
        let mut longer = list.clone();
        longer.extend_from_slice(&[0u8; 32]);
        assert!(verify_chunks(object, chunk_size, &longer, split).is_none());
    }
});

fn check(run: &ChunkRun, object: &[u8], chunk_size: u64, list: &[u8], whole_only: bool) {
    let len = object.len() as u64;
    assert!(run.verified <= run.written && run.written <= len, "{run:?}");
    // The running digest is of exactly the bytes held.
    assert_eq!(run.whole, Digest::of(&object[..run.written as usize]));
    if run.failed {
        assert_eq!(run.written, run.verified, "unverified bytes kept after a bad block");
    } else {
        assert_eq!(run.written, len, "stopped early without a failure");
    }
    if whole_only {
        // Nothing counts as verified until the whole-object digest is checked.
        assert!(!run.failed && run.verified == 0);
        assert!(run.marks.iter().all(|m| m.verified == 0 && m.servable == 0 && !m.advanced));
        return;
    }
    // The verified mark is the longest prefix of blocks whose SHA-256 is
    // listed: it covers no bad block and stops only at one.
    let mut expected = 0u64;
    for (block, listed) in object.chunks(chunk_size as usize).zip(list.chunks(32)) {
        if Digest::of(block).as_bytes()[..] != *listed {
            break;
        }
        expected += block.len() as u64;
    }
    assert_eq!(run.verified, expected, "{run:?}");
    assert_eq!(run.failed, expected < len);
    // The mark only moves forward, a block at a time, and waiters never see
    // past it; the last block waits for the whole-object check.
    let mut last = 0;
    for (i, m) in run.marks.iter().enumerate() {
        assert!(m.verified >= last, "{:?}", run.marks);
        // A piece that fails says nothing of blocks it verified before the bad one.
        if run.failed && i + 1 == run.marks.len() {
            assert!(!m.advanced);
        } else {
            assert_eq!(m.advanced, m.verified > last, "{:?}", run.marks);
        }
        assert!(m.verified % chunk_size == 0 || m.verified == len);
        assert!(m.servable <= m.verified);
        if m.verified == len && len > 0 {
            assert_eq!(m.servable, (len - 1) / chunk_size * chunk_size);
        } else {
            assert_eq!(m.servable, m.verified);
        }
        last = m.verified;
    }
}
