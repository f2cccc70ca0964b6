//! Small matrix products of the flash-attention tiles (`[64, 32..64] · [32..64, 64]` and
//! the like), register-tiled for AVX2 and AVX-512: `gemm` packs both operands on every
//! call, which costs as much as the product itself at these sizes. Widths that the
//! register blocks do not cover (AVX-512: 32 and multiples of 64; AVX2: multiples of 8)
//! and CPUs without AVX2 go through `gemm` (`conv::matmul`).

use crate::math::{level, Level};
#[cfg(target_arch = "x86_64")]
use crate::simd::Reg;

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
    let level = level();
    let fast = k > 0
        && match level {
            Level::Avx512 => n == 32 || n.is_multiple_of(64),
            Level::Avx2 => n.is_multiple_of(8),
            Level::Generic => false,
        };
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
    // SAFETY: `fast` holds only where `level()` found the level's instructions on this
    // CPU and `n` is a width its blocks cover, and the asserts above keep every index
    // the blocks reach inside the slices.
    unsafe {
        if level == Level::Avx512 {
            avx512(m, n, &args, dst)
        } else {
            avx2(m, n, &args, dst)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX2 and AVX-512 are x86-64 levels");
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
    use std::arch::x86_64::__m512;
    // 24 of the 32 registers accumulate: 6 rows of 64 (4 vectors) or 12 rows of 32 (2).
    // SAFETY: the caller's bounds hold for every block.
    unsafe {
        if n == 32 {
            return rows::<__m512, 12, 2>(m, args, dst);
        }
        // Columns in blocks of 64.
        for j in (0..n).step_by(64) {
            rows::<__m512, 6, 4>(m, &args.columns_from(j), &mut dst[j..]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(m: usize, n: usize, args: &Args, dst: &mut [f32]) {
    use std::arch::x86_64::__m256;
    // 12 of the 16 registers accumulate: 6 rows of 16 (2 vectors); the last 8 columns,
    // if any, as 6 rows of 8.
    // SAFETY: the caller's bounds hold for every block.
    unsafe {
        let mut j = 0;
        while j + 16 <= n {
            rows::<__m256, 6, 2>(m, &args.columns_from(j), &mut dst[j..]);
            j += 16;
        }
        if j < n {
            rows::<__m256, 6, 1>(m, &args.columns_from(j), &mut dst[j..]);
        }
    }
}

impl Args<'_> {
    /// The product's columns from `j` on.
    fn columns_from(&self, j: usize) -> Self {
        Args {
            b: &self.b[j..],
            ..*self
        }
    }
}

/// All `m` rows: blocks of `MR`, then one block of the rows left; `V` registers per row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows<R: Reg, const MR: usize, const V: usize>(m: usize, args: &Args, dst: &mut [f32]) {
    let mut i = 0;
    // SAFETY: the caller's bounds cover rows 0..m.
    unsafe {
        while i + MR <= m {
            block::<R, MR, V>(i, args, dst);
            i += MR;
        }
        // The last rows in one block of their own size: one row at a time, the 4 or 2
        // accumulators of a row would wait on each other's latency.
        match m - i {
            0 => {}
            1 => block::<R, 1, V>(i, args, dst),
            2 => block::<R, 2, V>(i, args, dst),
            3 => block::<R, 3, V>(i, args, dst),
            4 => block::<R, 4, V>(i, args, dst),
            5 => block::<R, 5, V>(i, args, dst),
            6 if MR > 6 => block::<R, 6, V>(i, args, dst),
            7 if MR > 7 => block::<R, 7, V>(i, args, dst),
            8 if MR > 8 => block::<R, 8, V>(i, args, dst),
            9 if MR > 9 => block::<R, 9, V>(i, args, dst),
            10 if MR > 10 => block::<R, 10, V>(i, args, dst),
            11 if MR > 11 => block::<R, 11, V>(i, args, dst),
            r => unreachable!("{r} rows left of blocks of {MR}"),
        }
    }
}

/// Rows `i0..i0 + MR` of the product, accumulated in `MR × V` vector registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block<R: Reg, const MR: usize, const V: usize>(i0: usize, x: &Args, dst: &mut [f32]) {
    // SAFETY: `matmul`'s asserts keep rows i0..i0 + MR of a and dst and rows 0..k of b
    // inside their slices; the caller enabled `R`'s instructions.
    unsafe {
        let mut c = [[R::zero(); V]; MR];
        let a = x.a.as_ptr().add(i0 * x.a_rs);
        let b = x.b.as_ptr();
        for p in 0..x.k {
            let brow = b.add(p * x.b_rs);
            let mut bv = [R::zero(); V];
            for (v, bvv) in bv.iter_mut().enumerate() {
                *bvv = R::load(brow.add(R::LANES * v));
            }
            let ap = a.add(p * x.a_cs);
            for (r, cr) in c.iter_mut().enumerate() {
                let av = R::splat(*ap.add(r * x.a_rs));
                for v in 0..V {
                    cr[v] = av.mul_add(bv[v], cr[v]);
                }
            }
        }
        let out = dst.as_mut_ptr().add(i0 * x.dst_rs);
        for (r, cr) in c.iter().enumerate() {
            let row = out.add(r * x.dst_rs);
            for (v, &cv) in cr.iter().enumerate() {
                let at = row.add(R::LANES * v);
                let sum = if x.accumulate {
                    R::load(at).add(cv)
                } else {
                    cv
                };
                sum.store(at);
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
