//! A hostile delta cannot make the decoder allocate more than the target it
//! claims to build allows. Its own test binary: the allocator below counts
//! every allocation of the process, so nothing else may run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use patchrelay::delta;
use patchrelay::digest::Digest;

/// The system allocator, keeping the peak of bytes allocated at once.
struct Peak;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn zstd_frame(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 19).unwrap()
}

/// A suffix-array delta for `base` claiming an 8 MiB target, whose control
/// stream is a count of 80 million triples and 240 MiB of zeros: about 10 KB
/// on the wire.
fn hostile(base: &[u8]) -> Vec<u8> {
    let mut controls = Vec::new();
    varint(&mut controls, 80_000_000);
    controls.resize(240 << 20, 0);
    let mut d = b"PRD2".to_vec();
    d.push(2); // suffix-array diff
    d.extend_from_slice(&Digest::of(base).as_bytes()[..8]);
    d.extend_from_slice(&[0u8; 8]);
    varint(&mut d, base.len() as u64);
    varint(&mut d, TARGET);
    for stream in [zstd_frame(&controls), zstd_frame(&[]), zstd_frame(&[])] {
        varint(&mut d, stream.len() as u64);
        d.extend_from_slice(&stream);
    }
    d
}

const TARGET: u64 = 8 << 20;

#[test]
fn a_10_kb_delta_cannot_allocate_gigabytes() {
    let base = vec![7u8; 4096];
    let delta = hostile(&base);
    assert!(delta.len() < 64 * 1024, "the hostile delta is {} bytes", delta.len());
    let before = NOW.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = delta::apply(&base, &delta, TARGET);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(result.is_err(), "a hostile delta was applied");
    // The target and controls about as long, and the difference and extra
    // bytes that make it up: a few times the target, not gigabytes.
    assert!(peak < 4 * TARGET as usize, "decoding a {}-byte delta allocated {peak} bytes at once", delta.len());
}
