//! A fixed-length array that the kernel is asked to back with huge pages once
//! it is large enough to fill one.
//!
//! Why: the agents' table is read at random, one line per request. With
//! 100,000 agents its slots span 8 MB, 2,000 pages of 4 KiB, more than the
//! CPU's TLB holds beside everything else the relay touches, so most lookups
//! also walked the page tables (under a hypervisor, a two-level walk) before
//! the line could even be fetched, and a prefetch cannot hide that: it waits
//! for the walk before it retires. In 2 MiB pages the same slots are 4 pages.
//!
//! How: an array of at least [`HUGE_PAGE`] bytes is allocated aligned to it,
//! and `madvise(MADV_HUGEPAGE)` marks it (Linux's default "madvise" mode of
//! transparent huge pages backs only memory so marked). Smaller arrays, other
//! systems, or a kernel that declines the advice get ordinary pages: the same
//! array, only slower to look up at random.
//!
//! The unsafe code is the allocation itself (std's `Box<[T]>` cannot be
//! allocated with a chosen alignment), kept to this module.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// The size of a huge page on x86_64 and arm64 (4 KiB granule) Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// `len` values of `T`, each made by `T::default()`.
pub struct HugeArray<T> {
    ptr: NonNull<T>,
    len: usize,
    /// How it was allocated (`None`: nothing was, the array is empty or `T`
    /// takes no space).
    layout: Option<Layout>,
}

// SAFETY: a HugeArray owns its Ts like a Box<[T]> does.
unsafe impl<T: Send> Send for HugeArray<T> {}
// SAFETY: shared access only hands out &T, like a Box<[T]>.
unsafe impl<T: Sync> Sync for HugeArray<T> {}

impl<T: Default> HugeArray<T> {
    pub fn new(len: usize) -> HugeArray<T> {
        let size = len.checked_mul(size_of::<T>()).unwrap_or_else(|| capacity_overflow());
        if size == 0 {
            return HugeArray { ptr: NonNull::dangling(), len, layout: None };
        }
        let align = if size >= HUGE_PAGE { HUGE_PAGE } else { align_of::<T>() };
        let layout = Layout::from_size_align(size, align).unwrap_or_else(|_| capacity_overflow());
        // SAFETY: the layout's size is not zero.
        let raw = unsafe { alloc::alloc(layout) }.cast::<T>();
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        if size >= HUGE_PAGE {
            advise_huge(raw.cast(), size);
        }
        for i in 0..len {
            // SAFETY: i < len, inside the allocation, which is aligned for T;
            // the slot holds no T yet, so nothing is overwritten without a drop.
            unsafe { ptr.as_ptr().add(i).write(T::default()) };
        }
        HugeArray { ptr, len, layout: Some(layout) }
    }
}

impl<T> std::ops::Deref for HugeArray<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr is aligned and non-null, and all len values were
        // initialised in `new` (for len 0 or a zero-sized T, a dangling
        // pointer is valid).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for HugeArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and &mut self makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HugeArray<T> {
    fn drop(&mut self) {
        // SAFETY: the values were initialised in `new` and are dropped once,
        // here; then the memory goes back with the layout it came with.
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len));
            if let Some(layout) = self.layout {
                alloc::dealloc(self.ptr.as_ptr().cast(), layout);
            }
        }
    }
}

#[cold]
fn capacity_overflow() -> ! {
    panic!("agents' table: capacity overflow")
}

/// Ask for huge pages (Linux); elsewhere, or if refused, nothing changes.
fn advise_huge(addr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: madvise with MADV_HUGEPAGE only changes how the kernel backs the
    // range (our own allocation, aligned to a huge page); it never changes
    // its contents. Its result is only advice taken or not.
    unsafe {
        libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (addr, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_large_and_empty_arrays_hold_their_values() {
        for len in [0usize, 1, 17, HUGE_PAGE / 8 + 3] {
            let mut a: HugeArray<u64> = HugeArray::new(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0));
            for (i, v) in a.iter_mut().enumerate() {
                *v = i as u64;
            }
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as u64));
        }
        let big: HugeArray<u64> = HugeArray::new(HUGE_PAGE / 8);
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0, "aligned for a huge page");
        // Values with a destructor are dropped with the array.
        let strings: HugeArray<String> = HugeArray::new(3);
        assert!(strings.iter().all(String::is_empty));
    }
}
