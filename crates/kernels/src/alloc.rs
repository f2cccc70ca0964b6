//! A global allocator that starts every block of 4 KiB or more on a 64-byte boundary
//! (and spreads large blocks over the lines of a page).
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
//! Blocks of [`COLORED`] bytes or more also get a *colour*: their start is moved by a
//! multiple of 64 bytes within [`SPREAD`] spare bytes, a different one for each
//! allocation. Without it, an output allocated right after its input (y = f(x), both a
//! whole number of pages long) sits 64 or 128 bytes past it modulo 4 KiB, and a
//! streaming kernel's store to `y[i]` then has the same low 12 address bits as its
//! load of `x[i + 16]` a few instructions later: the CPU cannot tell them apart before
//! the store's address resolves ("4K aliasing"), so each load waits on the previous
//! vector's store and the loop runs at its latency, not its throughput. Measured on a
//! Zen 4 core: SiLU over [8, 256, 768] took 0.275 ms with the output 64 bytes past the
//! input and 0.21-0.23 ms at other offsets. Successive colours step by
//! [`COLOR_STEP`] cache lines (about 0.58 of a page), so consecutive blocks are never
//! within a few lines of each other modulo the page.
//!
//! (The `dws` program also tells glibc to keep freed blocks for reuse: `tune_allocator`
//! in its `main.rs`.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks of this many bytes or more are aligned to [`ALIGN`].
pub const LARGE: usize = 4096;
/// Alignment of large blocks: one cache line.
pub const ALIGN: usize = 64;
/// Blocks of this many bytes or more are coloured (at most 1.6% more memory each).
pub const COLORED: usize = 1 << 18;
/// Spare bytes of a coloured block: one page, room for 64 colours of one line each.
pub const SPREAD: usize = 4096;
/// Cache lines between the colours of successive coloured blocks (coprime to 64, so
/// the colours go through every line of the page).
pub const COLOR_STEP: usize = 37;

/// Coloured blocks made so far (their colours follow from it).
static COLORS: AtomicUsize = AtomicUsize::new(0);

/// Whether a large block of `size` bytes is coloured.
fn colored(size: usize) -> bool {
    size >= COLORED
}

/// Bytes past the aligned start at which the next coloured block begins.
fn next_color() -> usize {
    let k = COLORS.fetch_add(1, Ordering::Relaxed);
    k.wrapping_mul(COLOR_STEP) % (SPREAD / ALIGN) * ALIGN
}

/// [`System`], with blocks of [`LARGE`] bytes or more aligned to [`ALIGN`] bytes.
pub struct Aligned;

/// Whether a block of `layout` is over-aligned here.
fn large(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() < ALIGN
}

/// The system block behind a large block of `size` bytes: `ALIGN` bytes more (and
/// `SPREAD` more if coloured), at the system's own alignment. The same size always asks
/// for the same system block whatever its colour (glibc's `posix_memalign` would pad
/// every request by the alignment, so a freed block never fits the next request of its
/// own size and the heap keeps growing into fresh pages; a plain `malloc` of one size
/// reuses the freed block).
fn raw_layout(size: usize) -> Layout {
    let spread = if colored(size) { SPREAD } else { 0 };
    // No overflow: the caller's layout is valid, so `size` is at most isize::MAX
    // rounded down to its alignment, and `from_size_align` rejects a sum past isize::MAX.
    Layout::from_size_align(size.saturating_add(ALIGN + spread), 16)
        .expect("a large block's layout")
}

/// Bytes from a system block at `raw` to the large block placed in it: 16 to `ALIGN`
/// (`raw` is 16-aligned), room for the header before the block.
fn skip(raw: *mut u8) -> usize {
    ALIGN - (raw as usize % ALIGN)
}

/// The first `ALIGN`-aligned address after `raw` (at least 8 bytes on, for the header
/// that holds `raw`), moved on by `color` bytes, written with `raw` just before it.
///
/// # Safety
/// `raw` starts a block of at least `raw_layout(size)` bytes, and `color` is 0 or,
/// where `size` is coloured, below `SPREAD`.
unsafe fn place(raw: *mut u8, color: usize) -> *mut u8 {
    let skip = skip(raw) + color;
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
    let color = if colored(layout.size()) {
        next_color()
    } else {
        0
    };
    // SAFETY: `raw` starts a block of `raw_layout(layout.size())` bytes; `color` is
    // below SPREAD, and 0 unless the block is coloured.
    unsafe { place(raw, color) }
}

// SAFETY: small blocks go to `System` unchanged. A large block is an ALIGN-aligned
// address inside a system block ALIGN bytes longer than asked for (ALIGN + SPREAD if
// coloured), at most ALIGN (+ its colour, below SPREAD) bytes in (`place`), with the
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
                // Uncoloured on both sides (a coloured block's values may start
                // further in than a smaller system block reaches, so those take the
                // copying path below).
                (true, true) if !colored(layout.size()) && !colored(new_size) => {
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
                    place(fresh, 0)
                }
                // Across LARGE or coloured: a new block, the values copied over, the
                // old one freed.
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
    fn successive_coloured_blocks_start_at_different_offsets_in_their_pages() {
        let a = Aligned;
        let layout = Layout::from_size_align(COLORED, 4).unwrap();
        // SAFETY: a non-zero layout, each block freed with it.
        unsafe {
            let offsets: Vec<usize> = (0..8)
                .map(|_| {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % ALIGN, 0);
                    // The whole block is usable.
                    p.write_bytes(1, COLORED);
                    let page = p as usize % 4096;
                    a.dealloc(p, layout);
                    page
                })
                .collect();
            // The same system block comes back each time (glibc reuses a freed block
            // of one size), so the page offsets differ by the colours alone; other
            // tests allocating at once may take colours in between, but never all.
            let distinct = offsets
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            assert!(distinct >= 4, "page offsets {offsets:?}");
        }
    }

    #[test]
    fn large_blocks_are_64_byte_aligned_and_keep_their_values_when_resized() {
        let a = Aligned;
        // The last three: coloured, growing from uncoloured into coloured, and coloured
        // at another alignment.
        for (size, align) in [
            (LARGE, 4),
            (LARGE + 12, 8),
            (LARGE, 128),
            (1 << 20, 4),
            (COLORED / 2 + 100, 4),
            (COLORED, 8),
        ] {
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
                // Shrinking keeps the values too (out of colouring for the coloured).
                let r = a.realloc(
                    q,
                    Layout::from_size_align(2 * size, align).unwrap(),
                    size / 3,
                );
                if size / 3 >= LARGE {
                    assert_eq!(r as usize % ALIGN.max(align), 0);
                }
                assert!((0..size / 3).all(|i| *r.add(i) == 7));
                a.dealloc(r, Layout::from_size_align(size / 3, align).unwrap());
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
