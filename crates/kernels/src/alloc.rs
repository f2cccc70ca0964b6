//! A global allocator that starts every block of 4 KiB or more on a 64-byte boundary.
//!
//! The system allocator aligns to 16 bytes, and tensors get no more: burn's CPU backend
//! keeps a `Vec<f32>`'s allocation. In a buffer that starts 16 bytes past a 32-byte
//! boundary, every other 32-byte AVX2 load of a contiguous row straddles two cache
//! lines, and a 64-byte-wide panel of a tile touches two lines per row instead of one. PyTorch aligns its CPU tensors to 64 bytes; a
//! binary gets the same by naming this allocator:
//!
//! ```text
//! #[global_allocator]
//! static ALLOC: dws_kernels::alloc::Aligned = dws_kernels::alloc::Aligned;
//! ```
//!
//! Small blocks keep the system allocator's own alignment (and its speed).
//!
//! (The `dws` program also tells glibc to keep freed blocks for reuse: `tune_allocator`
//! in its `main.rs`.)

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of this many bytes or more are aligned to [`ALIGN`].
pub const LARGE: usize = 4096;
/// Alignment of large blocks: one cache line.
pub const ALIGN: usize = 64;

/// [`System`], with blocks of [`LARGE`] bytes or more aligned to [`ALIGN`] bytes.
pub struct Aligned;

/// Whether a block of `layout` is over-aligned here.
fn large(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() < ALIGN
}

/// The system block behind a large block of `size` bytes: `ALIGN` bytes more, at the
/// system's own alignment (glibc's `posix_memalign` would pad every request by the
/// alignment, so a freed block never fits the next request of its own size and the heap
/// keeps growing into fresh pages; a plain `malloc` of one size reuses the freed block).
fn raw_layout(size: usize) -> Layout {
    // `size + ALIGN` does not overflow: the caller's layout is valid, so `size` is at
    // most isize::MAX rounded down to its alignment.
    Layout::from_size_align(size + ALIGN, 16).expect("a large block's layout")
}

/// Bytes from a system block at `raw` to the large block placed in it: 16 to `ALIGN`
/// (`raw` is 16-aligned), room for the header before the block.
fn skip(raw: *mut u8) -> usize {
    ALIGN - (raw as usize % ALIGN)
}

/// The first `ALIGN`-aligned address after `raw` (at least 8 bytes on, for the header
/// that holds `raw`), written with `raw` just before it.
///
/// # Safety
/// `raw` starts a block of at least `raw_layout(size)` bytes.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    let skip = skip(raw);
    // SAFETY: 8 <= skip <= ALIGN (raw is 16-aligned), inside the block's ALIGN spare
    // bytes; the header is 8-aligned because `at` is.
    unsafe {
        let at = raw.add(skip);
        at.cast::<*mut u8>().sub(1).write(raw);
        at
    }
}

/// The system block behind a large block `ptr` that [`place`] made.
///
/// # Safety
/// `ptr` came from [`place`].
unsafe fn raw_of(ptr: *mut u8) -> *mut u8 {
    // SAFETY: `place` wrote the header there.
    unsafe { ptr.cast::<*mut u8>().sub(1).read() }
}

/// A block of `layout` from `get` (one of `System`'s allocation functions): the layout
/// itself when small, a placed block inside a larger system block when large.
///
/// # Safety
/// `layout` has a non-zero size.
unsafe fn block(layout: Layout, get: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
    if !large(layout) {
        return get(layout);
    }
    let raw = get(raw_layout(layout.size()));
    if raw.is_null() {
        return raw;
    }
    // SAFETY: `raw` starts a block of `raw_layout(layout.size())` bytes.
    unsafe { place(raw) }
}

// SAFETY: small blocks go to `System` unchanged. A large block is an ALIGN-aligned
// address inside a system block ALIGN bytes longer than asked for (`place`), with the
// system block's address in the 8 bytes before it; it is freed and resized through that
// address with the layout it was allocated with (`raw_layout` of the caller's size,
// which the `GlobalAlloc` contract makes the size the block was allocated with).
unsafe impl GlobalAlloc for Aligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above; `layout` has a non-zero size by the caller's contract.
        unsafe { block(layout, |l| System.alloc(l)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { block(layout, |l| System.alloc_zeroed(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` or `alloc_zeroed` with `layout`.
        unsafe {
            if large(layout) {
                System.dealloc(raw_of(ptr), raw_layout(layout.size()));
            } else {
                System.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (of the unchecked call): the caller guarantees `new_size`, rounded up
        // to `layout.align()`, does not overflow isize.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `ptr` is a block of `layout`; every copy stays inside both blocks.
        unsafe {
            match (large(layout), large(new)) {
                (false, false) => System.realloc(ptr, layout, new_size),
                (true, true) => {
                    // The system block resized (in place when it can), then the values
                    // moved to the new block's aligned address if that changed.
                    let raw = raw_of(ptr);
                    let kept = ptr.offset_from(raw) as usize;
                    let fresh = System.realloc(raw, raw_layout(layout.size()), new_size + ALIGN);
                    if fresh.is_null() {
                        return fresh;
                    }
                    let skip = skip(fresh);
                    if skip != kept {
                        let n = layout.size().min(new_size);
                        std::ptr::copy(fresh.add(kept), fresh.add(skip), n);
                    }
                    place(fresh)
                }
                // Across LARGE: a new block, the values copied over, the old one freed.
                _ => {
                    let fresh = self.alloc(new);
                    if !fresh.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    fresh
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_64_byte_aligned_and_keep_their_values_when_resized() {
        let a = Aligned;
        for (size, align) in [(LARGE, 4), (LARGE + 12, 8), (1 << 20, 4), (LARGE, 128)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero layout; the block is written inside its size and freed
            // with the layouts it was allocated and resized with.
            unsafe {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % ALIGN.max(align), 0, "{size} bytes at {align}");
                p.write_bytes(7, size);
                let q = a.realloc(p, layout, 2 * size);
                assert_eq!(q as usize % ALIGN.max(align), 0);
                assert!((0..size).all(|i| *q.add(i) == 7));
                a.dealloc(q, Layout::from_size_align(2 * size, align).unwrap());
                let z = a.alloc_zeroed(layout);
                assert_eq!(z as usize % ALIGN.max(align), 0);
                assert!((0..size).all(|i| *z.add(i) == 0));
                a.dealloc(z, layout);
            }
        }
        // Growing across LARGE moves the block onto a 64-byte boundary, values kept;
        // shrinking below it moves it back to the system's alignment.
        let small = Layout::from_size_align(100, 4).unwrap();
        // SAFETY: as above.
        unsafe {
            let p = a.alloc(small);
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, small, 2 * LARGE);
            assert_eq!(q as usize % ALIGN, 0);
            assert!((0..100).all(|i| *q.add(i) == i as u8));
            let big = Layout::from_size_align(2 * LARGE, 4).unwrap();
            let r = a.realloc(q, big, 50);
            assert!(!r.is_null());
            assert!((0..50).all(|i| *r.add(i) == i as u8));
            a.dealloc(r, Layout::from_size_align(50, 4).unwrap());
        }
    }
}
