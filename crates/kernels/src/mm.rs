//! Matrix products of the linear layers, `C[m, n] = A[m, k] · B[k, n]` plus a bias row
//! or C itself, by the `gemm` crate, and the column sums that give a bias's gradient.
//!
//! burn's `Linear` adds its bias by a broadcast addition that costs about 40% of the
//! product's own time on the CPU backend, and sums the bias gradient with a strided
//! reduction; here the bias rows are copied into C first and the product is added to
//! them. (A register-tiled AVX-512 kernel in the style of the flash tiles (`tile.rs`) was tried for
//! these products and measured at 0.74-1.08× `gemm`'s speed at the toy step's shapes, so
//! `gemm` stays.)

use crate::math::Out;
use rayon::prelude::*;

/// A read-only matrix: element `(i, p)` at `data[i · rs + p · cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with rows `cols` apart.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows, cols]` matrix (`[cols, rows]`, read in place).
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// What C starts from.
#[derive(Clone, Copy)]
pub enum Init<'a> {
    /// Zero: `C = A · B`.
    Zero,
    /// Each row of C starts as this `[n]` row: `C = A · B + 1 bias`.
    Bias(&'a [f32]),
    /// C's own values: `C += A · B`.
    Accumulate,
}

/// `C = A · B` (from `init`) for row-major `c` `[m, n]`; with [`Init::Zero`] and
/// [`Init::Bias`] C need not be initialised.
///
/// Large products are split over rayon's threads by rows of C, each part a
/// single-threaded `gemm` call: at the toy step's shapes this measured 0-7% faster than
/// `gemm`'s own threads for the forward and input-gradient products and 10-25% faster
/// for the weight gradients (k = 2,048 rows), as fast there as splitting k or the
/// columns, and every element of C is summed in the same order whatever the threads.
pub fn matmul(m: usize, n: usize, k: usize, a: View, b: View, c: &mut [Out], init: Init) {
    assert_eq!(c.len(), m * n, "matmul: C is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if let Init::Bias(bias) = init {
        assert_eq!(bias.len(), n, "matmul: the bias is not [n]");
    }
    let threads = rayon::current_num_threads();
    if threads < 2 || m < 2 || m * n * k < 1 << 22 {
        return serial(m, n, k, a, b, c, init);
    }
    // Split the rows of C.
    let rows = m.div_ceil(threads).max(1);
    c.par_chunks_mut(rows * n).enumerate().for_each(|(t, ct)| {
        let mt = ct.len() / n;
        let at = View {
            data: &a.data[t * rows * a.rs..],
            ..a
        };
        serial(mt, n, k, at, b, ct, init)
    });
}

/// The product on this thread by one `gemm` call (C prepared first for a bias).
fn serial(m: usize, n: usize, k: usize, a: View, b: View, c: &mut [Out], init: Init) {
    let accumulate = match init {
        Init::Zero => false,
        Init::Accumulate => true,
        Init::Bias(bias) => {
            for row in c.chunks_exact_mut(n) {
                for (d, &v) in row.iter_mut().zip(bias) {
                    d.write(v);
                }
            }
            true
        }
    };
    crate::conv::matmul(
        m,
        n,
        k,
        c,
        n,
        accumulate,
        a.data,
        (a.rs, a.cs),
        b.data,
        (b.rs, b.cs),
    );
}

/// `out[j] = Σ_i g[i, j]` over the rows of row-major `g` `[m, n]` (a bias's gradient),
/// summed in a fixed order whatever the threads.
pub fn column_sums(g: &[f32], m: usize, n: usize) -> Vec<f32> {
    assert_eq!(g.len(), m * n, "column_sums: not [m, n]");
    // Row blocks summed on their own, then the blocks in order.
    const BLOCK: usize = 256;
    let partial: Vec<Vec<f32>> = g
        .par_chunks(BLOCK * n.max(1))
        .map(|rows| {
            let mut s = vec![0.0f32; n];
            for row in rows.chunks_exact(n) {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    let mut out = vec![0.0f32; n];
    for s in &partial {
        for (a, &v) in out.iter_mut().zip(s) {
            *a += v;
        }
    }
    out
}
