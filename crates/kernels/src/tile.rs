//! Small matrix products of the flash-attention tiles (`[64, 32..64] · [32..64, 64]` and
//! the like), register-tiled for AVX-512: `gemm` packs both operands on every call, which
//! costs as much as the product itself at these sizes. Widths other than 32 and
//! multiples of 64, and CPUs without AVX-512, go through `gemm` (`conv::matmul`).

use crate::math::{level, Level};

/// `dst[m, n] (+)= a[m, k] · b[k, n]` with `a[i, p] = a[i·a_rs + p·a_cs]`, `b`'s rows
/// contiguous and `b_rs` apart, and `dst`'s rows `dst_rs` apart.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    b_rs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let fast = level() == Level::Avx512 && (n == 32 || n.is_multiple_of(64)) && k > 0;
    if !fast {
        let out = crate::math::as_out(dst);
        crate::conv::matmul(
            m,
            n,
            k,
            out,
            dst_rs,
            accumulate,
            a,
            (a_rs, a_cs),
            b,
            (b_rs, 1),
        );
        return;
    }
    assert!(
        dst.len() >= (m - 1) * dst_rs + n,
        "tile matmul: dst too short"
    );
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "tile matmul: a too short"
    );
    assert!(b.len() >= (k - 1) * b_rs + n, "tile matmul: b too short");
    let args = Args {
        k,
        a,
        a_rs,
        a_cs,
        b,
        b_rs,
        dst_rs,
        accumulate,
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `fast` holds only where `level()` found AVX-512 on this CPU, and the
    // asserts above keep every index the blocks reach inside the slices.
    unsafe {
        avx512(m, n, &args, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512 is an x86-64 level");
}

#[derive(Clone, Copy)]
struct Args<'a> {
    k: usize,
    a: &'a [f32],
    a_rs: usize,
    a_cs: usize,
    b: &'a [f32],
    b_rs: usize,
    dst_rs: usize,
    accumulate: bool,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn avx512(m: usize, n: usize, args: &Args, dst: &mut [f32]) {
    // 24 accumulator registers: 6 rows of 64 (4 vectors) or 12 rows of 32 (2 vectors).
    // SAFETY: the caller's bounds hold for every block.
    unsafe {
        if n == 32 {
            return rows::<12, 2>(m, args, dst);
        }
        // Columns in blocks of 64.
        for j in (0..n).step_by(64) {
            let block = Args {
                b: &args.b[j..],
                ..*args
            };
            rows::<6, 4>(m, &block, &mut dst[j..]);
        }
    }
}

/// All `m` rows: blocks of `MR`, then one block of the rows left; `V` vectors of 16 per
/// row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows<const MR: usize, const V: usize>(m: usize, args: &Args, dst: &mut [f32]) {
    let mut i = 0;
    // SAFETY: the caller's bounds cover rows 0..m.
    unsafe {
        while i + MR <= m {
            block::<MR, V>(i, args, dst);
            i += MR;
        }
        // The last rows in one block of their own size: one row at a time, the 4 or 2
        // accumulators of a row would wait on each other's latency.
        match m - i {
            0 => {}
            1 => block::<1, V>(i, args, dst),
            2 => block::<2, V>(i, args, dst),
            3 => block::<3, V>(i, args, dst),
            4 => block::<4, V>(i, args, dst),
            5 => block::<5, V>(i, args, dst),
            6 => block::<6, V>(i, args, dst),
            7 => block::<7, V>(i, args, dst),
            8 => block::<8, V>(i, args, dst),
            9 => block::<9, V>(i, args, dst),
            10 => block::<10, V>(i, args, dst),
            11 => block::<11, V>(i, args, dst),
            r => unreachable!("{r} rows left of blocks of {MR}"),
        }
    }
}

/// Rows `i0..i0 + MR` of the product, accumulated in `MR × V` vector registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block<const MR: usize, const V: usize>(i0: usize, x: &Args, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY: `matmul`'s asserts keep rows i0..i0 + MR of a and dst and rows 0..k of b
    // inside their slices; the caller enabled AVX-512.
    unsafe {
        let mut c = [[_mm512_setzero_ps(); V]; MR];
        let a = x.a.as_ptr().add(i0 * x.a_rs);
        let b = x.b.as_ptr();
        for p in 0..x.k {
            let brow = b.add(p * x.b_rs);
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bvv) in bv.iter_mut().enumerate() {
                *bvv = _mm512_loadu_ps(brow.add(16 * v));
            }
            let ap = a.add(p * x.a_cs);
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r * x.a_rs));
                for v in 0..V {
                    cr[v] = _mm512_fmadd_ps(av, bv[v], cr[v]);
                }
            }
        }
        let out = dst.as_mut_ptr().add(i0 * x.dst_rs);
        for (r, cr) in c.iter().enumerate() {
            let row = out.add(r * x.dst_rs);
            for (v, &cv) in cr.iter().enumerate() {
                let at = row.add(16 * v);
                let sum = if x.accumulate {
                    _mm512_add_ps(_mm512_loadu_ps(at), cv)
                } else {
                    cv
                };
                _mm512_storeu_ps(at, sum);
            }
        }
    }
}

/// `dst[c, r] = src[r · src_rs + c]` for `rows × cols` values (`dst` `[cols, rows]`).
pub(crate) fn transpose(dst: &mut [f32], src: &[f32], rows: usize, cols: usize, src_rs: usize) {
    for r in 0..rows {
        let s = &src[r * src_rs..r * src_rs + cols];
        for (c, &v) in s.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}
