//! Flash-style scaled dot-product attention on f32 slices: the scores are made, softmaxed
//! and used one tile of queries × keys at a time (online softmax), so memory stays linear
//! in the sequence length and every tile stays in cache; with a causal mask the tiles
//! above the diagonal are skipped, halving the work of long causal sequences.
//!
//! The forward keeps each query's log-sum-exp of scores; the backward recomputes the
//! probabilities from it, tile by tile (FlashAttention-2's scheme): per key tile
//! `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ += dS K · s`,
//! `dK += dSᵀ Q · s` with `s = 1/sqrt(d)`.
//!
//! Layout: each operand is read through a [`Layout`] (row `i` of batch `b`, head `h` at
//! `b · batch + h · head + i · row`), so `q`, `k`, `v` can be separate `[B·H, L, d]`
//! tensors or the heads' columns of one packed `[B, L, 3·H·d]` projection, with no copy.
//! The output is `[B, Lq, H·dv]` (heads side by side; `[B·H, Lq, dv]` when `H = 1`) and
//! the log-sum-exps `[B, Lq, H]`. The forward splits its work over batch items and query
//! tiles, the backward over batch items. Causal: query `i` sees keys `0..=i` (only for
//! `Lq == Lk`, where every convention agrees).

use crate::math::{exp, fold_lanes, level, multiversion, Level, MulAdd};
#[cfg(target_arch = "x86_64")]
use crate::simd::Reg;
use crate::tile::{matmul, transpose};
use rayon::prelude::*;

/// Queries per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;

/// Sizes of one attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    /// Query/key width.
    pub d: usize,
    /// Value width.
    pub dv: usize,
    pub causal: bool,
}

impl AttnShape {
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// Keys that queries `i0..i0 + n` may see: `0..end`.
    fn key_end(&self, i0: usize, n: usize) -> usize {
        if self.causal {
            (i0 + n).min(self.lk)
        } else {
            self.lk
        }
    }

    /// Panics unless every row the operands' layouts reach is inside their slices.
    fn check(&self, q: &Operand, k: &Operand, v: &Operand) {
        q.check(self, self.lq, self.d, "q");
        k.check(self, self.lk, self.d, "k");
        v.check(self, self.lk, self.dv, "v");
        assert!(
            !self.causal || self.lq == self.lk,
            "causal flash attention takes as many queries as keys"
        );
    }

    /// Width of an output row: the heads side by side.
    fn out_row(&self) -> usize {
        self.heads * self.dv
    }
}

/// Where an operand's rows are: row `i` of batch item `b`, head `h` starts at
/// `b · batch + h · head + i · row`, its values contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

impl Layout {
    /// Separate `[B·H, L, w]` tensors (`H = 1` in the shape).
    pub fn separate(len: usize, width: usize) -> Layout {
        Layout {
            batch: len * width,
            head: 0,
            row: width,
        }
    }

    /// A `[B, L, H, w]` tensor (heads last, as a projection reshaped to heads is).
    pub fn heads_last(len: usize, heads: usize, width: usize) -> Layout {
        Layout {
            batch: len * heads * width,
            head: width,
            row: heads * width,
        }
    }

    /// Part `part` (0: q, 1: k, 2: v) of a packed `[B, L, 3·H·w]` projection, read from
    /// the slice that starts at that part's first column.
    pub fn packed(len: usize, heads: usize, width: usize) -> Layout {
        Layout {
            batch: len * 3 * heads * width,
            head: width,
            row: 3 * heads * width,
        }
    }
}

/// An operand: its values and where its rows are.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub layout: Layout,
}

impl<'a> Operand<'a> {
    /// Rows `i0..` of batch item `b`, head `h` (rows `layout.row` apart).
    fn rows(&self, b: usize, h: usize, i0: usize) -> &'a [f32] {
        let l = self.layout;
        &self.data[b * l.batch + h * l.head + i0 * l.row..]
    }

    fn check(&self, s: &AttnShape, len: usize, width: usize, name: &str) {
        if s.batch == 0 || s.heads == 0 || len == 0 || width == 0 {
            return;
        }
        let l = self.layout;
        let last = (s.batch - 1) * l.batch + (s.heads - 1) * l.head + (len - 1) * l.row + width;
        assert!(
            last <= self.data.len() && l.row >= width,
            "{name}: {} values cannot hold {} × {} heads × {len} rows of {width} with {l:?}",
            self.data.len(),
            s.batch,
            s.heads,
        );
    }
}

/// `scores[r, j] = q_r · k_j` (unscaled: the softmax applies the scale), masked (−∞)
/// where key `j0 + j` is after query `i0 + r`;
/// `q`'s rows are `rq` apart, `kt` is the key tile transposed (`[d, bk]`, rows `rk`
/// apart).
#[allow(clippy::too_many_arguments)]
fn scores(
    dst: &mut [f32],
    (q, rq): (&[f32], usize),
    (kt, rk): (&[f32], usize),
    (bq, bk, d): (usize, usize, usize),
    (i0, j0): (usize, usize),
    causal: bool,
) {
    matmul(
        bq,
        bk,
        d,
        &mut dst[..bq * bk],
        bk,
        false,
        q,
        (rq, 1),
        kt,
        rk,
    );
    if causal {
        mask(&mut dst[..bq * bk], bk, (i0, j0));
    }
}

/// −∞ at the scores `[.., bk]` of keys `j0 + j` after query `i0 + r` (the future).
fn mask(s: &mut [f32], bk: usize, (i0, j0): (usize, usize)) {
    for (r, row) in s.chunks_exact_mut(bk).enumerate() {
        let first_masked = (i0 + r + 1).saturating_sub(j0).min(bk);
        row[first_masked..].fill(f32::NEG_INFINITY);
    }
}

/// Lanes of the row reductions (separate accumulators, so they vectorise).
const LANES: usize = 16;

/// Folds one tile of unscaled scores `[bq, bk]` into the running softmax of its rows:
/// turns the scores into `e^((s - m) · scale)` with each row's new running max `m` (of
/// the unscaled scores), rescales the rows' sums and outputs `o` `[bq, dv]` to that max.
#[inline(always)]
fn online_softmax_generic<M: MulAdd>(
    sc: &mut [f32],
    bk: usize,
    m: &mut [f32],
    sum: &mut [f32],
    o: &mut [f32],
    scale: f32,
) {
    let dv = o.len() / m.len();
    for (r, row) in sc.chunks_exact_mut(bk).enumerate() {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        // A NaN, once seen, stays (`x > NaN` is false): the row's maximum is then NaN
        // and so is the whole row, as the formula gives.
        let pick = |a: f32, b: f32| if a > b || a.is_nan() { a } else { b };
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] = pick(c[i], acc[i]);
            }
        }
        let mut tile_max = fold_lanes(acc, pick);
        for &v in chunks.remainder() {
            tile_max = pick(v, tile_max);
        }
        let m_new = pick(tile_max, m[r]);
        if m_new == f32::NEG_INFINITY {
            // Nothing visible yet: the row adds nothing.
            row.fill(0.0);
            continue;
        }
        let mut acc = [0f32; LANES];
        let n = row.len() / LANES * LANES;
        for c in row[..n].chunks_exact_mut(LANES) {
            for i in 0..LANES {
                let e = exp::<M>((c[i] - m_new) * scale);
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut row_sum = fold_lanes(acc, |a, b| a + b);
        for x in &mut row[n..] {
            *x = exp::<M>((*x - m_new) * scale);
            row_sum += *x;
        }
        let alpha = exp::<M>((m[r] - m_new) * scale);
        sum[r] = sum[r] * alpha + row_sum;
        if alpha != 1.0 {
            for x in &mut o[r * dv..(r + 1) * dv] {
                *x *= alpha;
            }
        }
        m[r] = m_new;
    }
}
multiversion!(online_softmax_generic, online_softmax_on, (sc: &mut [f32], bk: usize, m: &mut [f32], sum: &mut [f32], o: &mut [f32], scale: f32));

/// The body of a function that runs `$simd::<R>` compiled for AVX-512 (`R = __m512`)
/// or AVX2 (`__m256`) where this CPU has it, and else `$portable` (a
/// [`multiversion!`] dispatcher) at the CPU's level.
macro_rules! on_registers {
    ($simd:ident, $portable:ident, ($($arg:ident: $ty:ty),*)) => {{
        let level = level();
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                // SAFETY: the caller found AVX2 and FMA on this CPU.
                unsafe { $simd::<std::arch::x86_64::__m256>($($arg),*) }
            }
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                // SAFETY: the caller found AVX-512 on this CPU.
                unsafe { $simd::<std::arch::x86_64::__m512>($($arg),*) }
            }
            match level {
                // SAFETY: `level()` found these instructions on this CPU.
                Level::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                Level::Avx2 => return unsafe { avx2($($arg),*) },
                Level::Generic => {}
            }
        }
        $portable(level, $($arg),*)
    }};
}

/// [`online_softmax_generic`] at this CPU's best level (AVX2 and AVX-512: with the
/// vector [`Reg::exp2`]).
fn online_softmax(
    sc: &mut [f32],
    bk: usize,
    m: &mut [f32],
    sum: &mut [f32],
    o: &mut [f32],
    scale: f32,
) {
    on_registers!(online_softmax_simd, online_softmax_on, (sc: &mut [f32], bk: usize, m: &mut [f32], sum: &mut [f32], o: &mut [f32], scale: f32))
}

/// [`online_softmax_generic`] with vector registers `R`: `e^((x − m) · scale)` as
/// `2^(x · k − m · k)` with `k = scale · log2 e`, one FMA and [`Reg::exp2`] per vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn online_softmax_simd<R: Reg>(
    sc: &mut [f32],
    bk: usize,
    m: &mut [f32],
    sum: &mut [f32],
    o: &mut [f32],
    scale: f32,
) {
    let dv = o.len() / m.len();
    let k = scale * std::f32::consts::LOG2_E;
    // Whole vectors, then the row's last values one by one.
    let full = bk / R::LANES * R::LANES;
    // SAFETY: every load and store below is inside the row's `bk` values; the caller
    // enabled `R`'s instructions.
    unsafe {
        for (r, row) in sc.chunks_exact_mut(bk).enumerate() {
            let ptr = row.as_mut_ptr();
            let mut acc = R::splat(f32::NEG_INFINITY);
            let mut nan = false;
            for j in (0..full).step_by(R::LANES) {
                let x = R::load(ptr.add(j));
                nan |= x.has_nan();
                acc = acc.max(x);
            }
            let mut tile_max = acc.reduce_max();
            for &x in &row[full..] {
                nan |= x.is_nan();
                tile_max = tile_max.max(x);
            }
            // A NaN score makes the row's maximum NaN, so the whole row is NaN (as the
            // formula gives) rather than skipped as unseen.
            if nan {
                tile_max = f32::NAN;
            }
            let m_new = if tile_max > m[r] || tile_max.is_nan() {
                tile_max
            } else {
                m[r]
            };
            if m_new == f32::NEG_INFINITY {
                // Nothing visible yet: the row adds nothing.
                row.fill(0.0);
                continue;
            }
            let (kv, shift) = (R::splat(k), R::splat(-m_new * k));
            let mut total = R::zero();
            for j in (0..full).step_by(R::LANES) {
                let e = R::load(ptr.add(j)).mul_add(kv, shift).exp2();
                e.store(ptr.add(j));
                total = total.add(e);
            }
            let mut row_sum = total.reduce_add();
            for x in &mut row[full..] {
                *x = R::splat(*x).mul_add(kv, shift).exp2().first();
                row_sum += *x;
            }
            let alpha = R::splat((m[r] - m_new) * k).exp2().first();
            sum[r] = sum[r] * alpha + row_sum;
            if alpha != 1.0 {
                for x in &mut o[r * dv..(r + 1) * dv] {
                    *x *= alpha;
                }
            }
            m[r] = m_new;
        }
    }
}

/// Probabilities `e^(s · scale - lse)` of a tile of unscaled scores `[bq, bk]` from each
/// row's log-sum-exp (0 for a row that sees no key).
#[inline(always)]
fn probs_generic<M: MulAdd>(p: &mut [f32], bk: usize, lse: &[f32], scale: f32) {
    for (row, &l) in p.chunks_exact_mut(bk).zip(lse) {
        if l == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            for x in row.iter_mut() {
                *x = exp::<M>(M::fma(*x, scale, -l));
            }
        }
    }
}
multiversion!(probs_generic, probs_on, (p: &mut [f32], bk: usize, lse: &[f32], scale: f32));

/// [`probs_generic`] at this CPU's best level (AVX2 and AVX-512: with the vector
/// [`Reg::exp2`]).
fn probs(p: &mut [f32], bk: usize, lse: &[f32], scale: f32) {
    on_registers!(probs_simd, probs_on, (p: &mut [f32], bk: usize, lse: &[f32], scale: f32))
}

/// [`probs_generic`] with vector registers `R` and [`Reg::exp2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn probs_simd<R: Reg>(p: &mut [f32], bk: usize, lse: &[f32], scale: f32) {
    let k = scale * std::f32::consts::LOG2_E;
    let full = bk / R::LANES * R::LANES;
    // SAFETY: every load and store below is inside the row's `bk` values; the caller
    // enabled `R`'s instructions.
    unsafe {
        for (row, &l) in p.chunks_exact_mut(bk).zip(lse) {
            if l == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let ptr = row.as_mut_ptr();
            let (kv, shift) = (R::splat(k), R::splat(-l * std::f32::consts::LOG2_E));
            for j in (0..full).step_by(R::LANES) {
                R::load(ptr.add(j))
                    .mul_add(kv, shift)
                    .exp2()
                    .store(ptr.add(j));
            }
            for x in &mut row[full..] {
                *x = R::splat(*x).mul_add(kv, shift).exp2().first();
            }
        }
    }
}

/// `ds = p ⊙ (dp − delta) · scale`, into `dp`.
// `multiversion!` hands every body the MulAdd type; these need none.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn dscores_generic<M: MulAdd>(dp: &mut [f32], p: &[f32], bk: usize, delta: &[f32], scale: f32) {
    for ((drow, prow), &dl) in dp.chunks_exact_mut(bk).zip(p.chunks_exact(bk)).zip(delta) {
        for (x, &pv) in drow.iter_mut().zip(prow) {
            *x = pv * (*x - dl) * scale;
        }
    }
}
multiversion!(dscores_generic, dscores_at, (dp: &mut [f32], p: &[f32], bk: usize, delta: &[f32], scale: f32));

/// Output `[B, Lq, H·dv]` and each query's log-sum-exp of scores `[B, Lq, H]`.
pub fn forward(s: AttnShape, q: Operand, k: Operand, v: Operand) -> (Vec<f32>, Vec<f32>) {
    s.check(&q, &k, &v);
    let (lq, d, dv, heads) = (s.lq, s.d, s.dv, s.heads);
    let row = s.out_row();
    let mut out = vec![0f32; s.batch * lq * row];
    let mut lse = vec![0f32; s.batch * lq * heads];
    if lq == 0 || s.batch == 0 || heads == 0 {
        return (out, lse);
    }
    let scale = s.scale();
    // Every head's keys transposed once, for the score products of all its query
    // tiles: key tile by key tile (`[B, H, Lk / BK, d, BK]`, the last tile `[d, bk]`), so
    // a tile's rows are `bk` values apart. One `[d, Lk]` matrix put them `Lk` values
    // apart: at a power-of-two `Lk`, 64 or more rows 1 KiB or 4 KiB apart share a few of
    // the L1 cache's sets and evict each other between the register blocks.
    let lk = s.lk;
    let mut kt_all = vec![0f32; s.batch * heads * d * lk];
    kt_all
        .par_chunks_mut(d * lk)
        .enumerate()
        .for_each(|(bh, kt)| {
            let kg = k.rows(bh / heads, bh % heads, 0);
            for j0 in (0..lk).step_by(BK) {
                let bk = BK.min(lk - j0);
                let rows = &kg[j0 * k.layout.row..];
                transpose(&mut kt[j0 * d..(j0 + bk) * d], rows, bk, d, k.layout.row);
            }
        });
    // One task per (batch item, query tile): its rows of `out` and `lse`, all heads.
    let mut jobs: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
    for (b, (ob, lb)) in out
        .chunks_mut(lq * row)
        .zip(lse.chunks_mut(lq * heads))
        .enumerate()
    {
        for (t, (o, l)) in ob
            .chunks_mut(BQ * row)
            .zip(lb.chunks_mut(BQ * heads))
            .enumerate()
        {
            jobs.push((b, t * BQ, o, l));
        }
    }
    jobs.into_par_iter().for_each_init(
        || (vec![0f32; BQ * BK], vec![0f32; BQ * dv]),
        |(sc, acc), (b, i0, o, l)| {
            let bq = l.len() / heads;
            let end = s.key_end(i0, bq);
            for h in 0..heads {
                let acc = &mut acc[..bq * dv];
                acc.fill(0.0);
                let qg = q.rows(b, h, i0);
                let kt = &kt_all[(b * heads + h) * d * lk..(b * heads + h + 1) * d * lk];
                let mut m = [f32::NEG_INFINITY; BQ];
                let mut sum = [0f32; BQ];
                for j0 in (0..end).step_by(BK) {
                    let bk = BK.min(end - j0);
                    scores(
                        sc,
                        (qg, q.layout.row),
                        (&kt[j0 * d..(j0 + bk) * d], bk),
                        (bq, bk, d),
                        (i0, j0),
                        s.causal,
                    );
                    online_softmax(
                        &mut sc[..bq * bk],
                        bk,
                        &mut m[..bq],
                        &mut sum[..bq],
                        acc,
                        scale,
                    );
                    // acc += p [bq, bk] · v [bk, dv]
                    matmul(
                        bq,
                        dv,
                        bk,
                        acc,
                        dv,
                        true,
                        sc,
                        (bk, 1),
                        v.rows(b, h, j0),
                        v.layout.row,
                    );
                }
                for r in 0..bq {
                    let dst = &mut o[r * row + h * dv..r * row + (h + 1) * dv];
                    let src = &acc[r * dv..(r + 1) * dv];
                    // A row that saw no key sums to 0; NaN scores make a NaN sum, carried on.
                    if sum[r] != 0.0 {
                        let inv = 1.0 / sum[r];
                        for (x, &a) in dst.iter_mut().zip(src) {
                            *x = a * inv;
                        }
                        l[r * heads + h] = m[r] * scale + sum[r].ln();
                    } else {
                        dst.fill(0.0);
                        l[r * heads + h] = f32::NEG_INFINITY;
                    }
                }
            }
        },
    );
    (out, lse)
}

/// Where the backward writes each batch item's gradients of q, k and v: `dst`'s
/// chunks of `chunk` values, one per batch item, each holding the three at these
/// layouts (their `batch` field unused) from these offsets.
#[derive(Debug, Clone, Copy)]
pub struct GradLayout {
    pub chunk: usize,
    /// (offset in the chunk, layout) of dq, dk and dv.
    pub parts: [(usize, Layout); 3],
}

impl GradLayout {
    /// dq `[Lq, d]`, then dk `[Lk, d]`, then dv `[Lk, dv]`, per batch item (`H = 1`).
    pub fn separate(s: &AttnShape) -> GradLayout {
        let (lq, lk, d, dv) = (s.lq, s.lk, s.d, s.dv);
        GradLayout {
            chunk: lq * d + lk * d + lk * dv,
            parts: [
                (0, Layout::separate(lq, d)),
                (lq * d, Layout::separate(lk, d)),
                (lq * d + lk * d, Layout::separate(lk, dv)),
            ],
        }
    }

    /// dq `[Lq, H, d]`, then dk `[Lk, H, d]`, then dv `[Lk, H, dv]`, per batch item.
    pub fn heads_last(s: &AttnShape) -> GradLayout {
        let (lq, lk, h, d, dv) = (s.lq, s.lk, s.heads, s.d, s.dv);
        GradLayout {
            chunk: (lq * d + lk * d + lk * dv) * h,
            parts: [
                (0, Layout::heads_last(lq, h, d)),
                (lq * h * d, Layout::heads_last(lk, h, d)),
                ((lq + lk) * h * d, Layout::heads_last(lk, h, dv)),
            ],
        }
    }

    /// One packed `[B, L, 3·H·d]` gradient, as [`Layout::packed`] reads the input.
    pub fn packed(s: &AttnShape) -> GradLayout {
        let w = s.heads * s.d;
        let l = Layout::packed(s.lq, s.heads, s.d);
        GradLayout {
            chunk: s.lq * 3 * w,
            parts: [(0, l), (w, l), (2 * w, l)],
        }
    }
}

/// Gradients of [`forward`] for q, k and v from its output `o`, log-sum-exps `lse` and
/// the output's gradient `grad` (both `[B, Lq, H·dv]`), written as `layout` says into a
/// new buffer of `B` chunks (every value written).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: AttnShape,
    q: Operand,
    k: Operand,
    v: Operand,
    o: &[f32],
    lse: &[f32],
    grad: &[f32],
    layout: GradLayout,
) -> Vec<f32> {
    s.check(&q, &k, &v);
    let (lq, lk, d, dv, heads) = (s.lq, s.lk, s.d, s.dv, s.heads);
    let row = s.out_row();
    assert_eq!(o.len(), s.batch * lq * row);
    assert_eq!(grad.len(), s.batch * lq * row);
    assert_eq!(lse.len(), s.batch * lq * heads);
    let mut dst = vec![0f32; s.batch * layout.chunk];
    if s.batch == 0 || heads == 0 || lq == 0 || lk == 0 {
        return dst;
    }
    let scale = s.scale();
    dst.par_chunks_mut(layout.chunk)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut p = vec![0f32; BQ * BK];
            let mut dp = vec![0f32; BQ * BK];
            let mut dq = vec![0f32; lq * d];
            let mut dk = vec![0f32; lk * d];
            let mut dvv = vec![0f32; lk * dv];
            let mut kt = vec![0f32; BK * d];
            let mut vt = vec![0f32; BK * dv];
            let ob = &o[b * lq * row..(b + 1) * lq * row];
            let gb = &grad[b * lq * row..(b + 1) * lq * row];
            for h in 0..heads {
                dq.fill(0.0);
                dk.fill(0.0);
                dvv.fill(0.0);
                let qg = q.rows(b, h, 0);
                let kg = k.rows(b, h, 0);
                let vg = v.rows(b, h, 0);
                let (rq, rk, rv) = (q.layout.row, k.layout.row, v.layout.row);
                let gg = &gb[h * dv..];
                let lg = |i: usize| lse[(b * lq + i) * heads + h];
                // rowsum(dO ⊙ O) per query.
                let delta: Vec<f32> = (0..lq)
                    .map(|i| {
                        let at = i * row + h * dv;
                        gb[at..at + dv]
                            .iter()
                            .zip(&ob[at..at + dv])
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let lse_h: Vec<f32> = (0..lq).map(lg).collect();
                for j0 in (0..lk).step_by(BK) {
                    let bk = BK.min(lk - j0);
                    // Queries before j0 see none of these keys when causal.
                    let first_tile = if s.causal { j0 / BQ * BQ } else { 0 };
                    transpose(&mut kt, &kg[j0 * rk..], bk, d, rk);
                    transpose(&mut vt, &vg[j0 * rv..], bk, dv, rv);
                    for i0 in (first_tile..lq).step_by(BQ) {
                        let bq = BQ.min(lq - i0);
                        scores(
                            &mut p,
                            (&qg[i0 * rq..], rq),
                            (&kt, bk),
                            (bq, bk, d),
                            (i0, j0),
                            s.causal,
                        );
                        probs(&mut p[..bq * bk], bk, &lse_h[i0..i0 + bq], scale);
                        let p = &p[..bq * bk];
                        let gi = &gg[i0 * row..];
                        // dv_t [bk, dv] += pᵀ [bk, bq] · dO [bq, dv]
                        matmul(
                            bk,
                            dv,
                            bq,
                            &mut dvv[j0 * dv..(j0 + bk) * dv],
                            dv,
                            true,
                            p,
                            (1, bk),
                            gi,
                            row,
                        );
                        // dp [bq, bk] = dO [bq, dv] · vᵀ [dv, bk]
                        matmul(
                            bq,
                            bk,
                            dv,
                            &mut dp[..bq * bk],
                            bk,
                            false,
                            gi,
                            (row, 1),
                            &vt,
                            bk,
                        );
                        // ds = p ⊙ (dp − delta) · scale, in dp.
                        dscores_at(
                            level(),
                            &mut dp[..bq * bk],
                            p,
                            bk,
                            &delta[i0..i0 + bq],
                            scale,
                        );
                        let ds = &dp[..bq * bk];
                        // dq [bq, d] += ds [bq, bk] · k [bk, d]
                        matmul(
                            bq,
                            d,
                            bk,
                            &mut dq[i0 * d..(i0 + bq) * d],
                            d,
                            true,
                            ds,
                            (bk, 1),
                            &kg[j0 * rk..],
                            rk,
                        );
                        // dk [bk, d] += dsᵀ [bk, bq] · q [bq, d]
                        matmul(
                            bk,
                            d,
                            bq,
                            &mut dk[j0 * d..(j0 + bk) * d],
                            d,
                            true,
                            ds,
                            (1, bk),
                            &qg[i0 * rq..],
                            rq,
                        );
                    }
                }
                // This head's gradients into their places in the batch item's chunk.
                for ((off, l), (src, len, width)) in
                    layout
                        .parts
                        .iter()
                        .zip([(&dq, lq, d), (&dk, lk, d), (&dvv, lk, dv)])
                {
                    for i in 0..len {
                        let at = off + h * l.head + i * l.row;
                        chunk[at..at + width].copy_from_slice(&src[i * width..(i + 1) * width]);
                    }
                }
            }
        });
    dst
}
