//! A fixed-length array that the kernel is asked to back with huge pages once
//! it is large enough to fill one.
//!
//! Why: the agents' table is read at random, one line per request. With
//! 100,000 agents its slots span 8 MB, 2,000 pages of 4 KiB, more than the
//! CPU's TLB holds beside everything else the relay touches, so most lookups
//! also walked the page tables (under a hypervisor, a two-level walk) before
//! the line could even be fetched, and a prefetch waits for that walk. In
//! 2 MiB pages the same slots are 4 pages.
//!
//! How: an array of at least [`HUGE_PAGE`] bytes gets an anonymous mapping of
//! its own, a huge page larger than it needs so that the array can start on a
//! huge-page boundary, advised `MADV_HUGEPAGE` (Linux's default "madvise" mode
//! of transparent huge pages backs only memory so marked). The slack around
//! it is never touched, so it costs address space, not memory. Dropping the
//! array unmaps it: the advice never outlives the array (advising the heap
//! instead would leave it on memory that malloc hands out again). Smaller
//! arrays, or a mapping that fails, are an ordinary boxed slice: the same
//! array, only slower to look up at random.
//!
//! The unsafe code is the typed view of the mapping, kept to this module.

#![allow(unsafe_code)]

use std::ptr::NonNull;

#[cfg(target_os = "linux")]
use memmap2::Advice;
use memmap2::MmapMut;

/// The size of a huge page on x86_64 and arm64 (4 KiB granule) Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// `len` values of `T`, each made by `T::default()`.
pub struct HugeArray<T>(Inner<T>);

enum Inner<T> {
    Boxed(Box<[T]>),
    /// `len` initialised values at `ptr`, a huge-page boundary inside `_map`,
    /// which outlives them (dropped after them, in `Drop`).
    Mapped {
        ptr: NonNull<T>,
        len: usize,
        _map: MmapMut,
    },
}

// SAFETY: a HugeArray owns its Ts like a Box<[T]> does; the mapping is only
// reached through them.
unsafe impl<T: Send> Send for HugeArray<T> {}
// SAFETY: shared access only hands out &T, like a Box<[T]>.
unsafe impl<T: Sync> Sync for HugeArray<T> {}

impl<T: Default> HugeArray<T> {
    pub fn new(len: usize) -> HugeArray<T> {
        let size = len.saturating_mul(size_of::<T>());
        if size >= HUGE_PAGE
            && let Some(mapped) = mapped(len, size)
        {
            return HugeArray(mapped);
        }
        HugeArray(Inner::Boxed((0..len).map(|_| T::default()).collect()))
    }
}

/// The array in a mapping of its own, or `None` if the mapping cannot be made.
fn mapped<T: Default>(len: usize, size: usize) -> Option<Inner<T>> {
    let mut map = MmapMut::map_anon(size.checked_add(HUGE_PAGE)?).ok()?;
    // Advice only: if the kernel declines, the pages are ordinary ones.
    #[cfg(target_os = "linux")]
    let _ = map.advise(Advice::HugePage);
    let base = map.as_mut_ptr();
    let offset = base.align_offset(HUGE_PAGE);
    if offset >= HUGE_PAGE || align_of::<T>() > HUGE_PAGE {
        return None;
    }
    // SAFETY: offset < HUGE_PAGE, so the pointer and the `size` bytes after it
    // lie inside the mapping of size + HUGE_PAGE bytes.
    let ptr = unsafe { base.add(offset) }.cast::<T>();
    let start = NonNull::new(ptr)?;
    // If a T::default() panics, the values made so far are dropped (and then
    // the mapping, by unwinding).
    struct Made<T> {
        ptr: *mut T,
        count: usize,
    }
    impl<T> Drop for Made<T> {
        fn drop(&mut self) {
            // SAFETY: the first `count` values were written and not dropped.
            unsafe { std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(self.ptr, self.count)) }
        }
    }
    let mut made = Made { ptr, count: 0 };
    for i in 0..len {
        // SAFETY: i < len and len * size_of::<T>() = size: inside the mapping,
        // and aligned for T (a huge-page boundary is, for any T up to that
        // alignment, and i * size_of::<T>() keeps it). Nothing is there yet,
        // so nothing is overwritten without being dropped.
        unsafe { ptr.add(i).write(T::default()) };
        made.count += 1;
    }
    std::mem::forget(made);
    Some(Inner::Mapped { ptr: start, len, _map: map })
}

impl<T> std::ops::Deref for HugeArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            Inner::Boxed(b) => b,
            // SAFETY: `len` initialised, aligned values at `ptr`, alive as
            // long as the mapping, which lives as long as self.
            Inner::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
        }
    }
}

impl<T> std::ops::DerefMut for HugeArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            Inner::Boxed(b) => b,
            // SAFETY: as in `deref`, and &mut self makes the access unique.
            Inner::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), *len) },
        }
    }
}

impl<T> Drop for HugeArray<T> {
    fn drop(&mut self) {
        if let Inner::Mapped { ptr, len, .. } = &mut self.0 {
            // SAFETY: the values were initialised in `mapped` and are dropped
            // once, here; the mapping itself is unmapped after this, when the
            // field is dropped.
            unsafe { std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(ptr.as_ptr(), *len)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_large_and_empty_arrays_hold_their_values() {
        for len in [0usize, 1, 17, HUGE_PAGE / 8, HUGE_PAGE / 8 + 3] {
            let mut a: HugeArray<u64> = HugeArray::new(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0));
            for (i, v) in a.iter_mut().enumerate() {
                *v = i as u64;
            }
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as u64));
        }
        let big: HugeArray<u64> = HugeArray::new(HUGE_PAGE / 8);
        assert!(matches!(big.0, Inner::Mapped { .. }), "a mapping of its own");
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0, "starting on a huge page");
        let small: HugeArray<u64> = HugeArray::new(1000);
        assert!(matches!(small.0, Inner::Boxed(_)));
        // Zero-sized values are made and dropped like any others.
        let units: HugeArray<()> = HugeArray::new(5);
        assert_eq!(units.len(), 5);
    }

    /// Every value made is dropped exactly once, in a mapped array and in a
    /// boxed one.
    #[test]
    fn values_are_dropped_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static MADE: AtomicUsize = AtomicUsize::new(0);
        static DROPPED: AtomicUsize = AtomicUsize::new(0);
        struct Counted([u8; 64]);
        impl Default for Counted {
            fn default() -> Self {
                MADE.fetch_add(1, Ordering::Relaxed);
                Counted([0; 64])
            }
        }
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        let n = HUGE_PAGE / 64 + 1;
        let a: HugeArray<Counted> = HugeArray::new(n);
        assert!(matches!(a.0, Inner::Mapped { .. }));
        let b: HugeArray<Counted> = HugeArray::new(10);
        assert_eq!(a[n - 1].0[63], 0);
        drop((a, b));
        assert_eq!(MADE.load(Ordering::Relaxed), n + 10);
        assert_eq!(DROPPED.load(Ordering::Relaxed), n + 10);
    }
}
