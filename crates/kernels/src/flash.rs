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
//! Layout: `q` `[G, Lq, d]`, `k` `[G, Lk, d]`, `v` `[G, Lk, dv]` row-major, `G` the
//! batch × heads; work is split over `G` and query tiles. Causal: query `i` sees keys
//! `0..=i` (only for `Lq == Lk`, where every convention agrees).

use crate::conv::matmul;
use crate::math::{exp, level, multiversion, Level, MulAdd};
use rayon::prelude::*;

/// Queries per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 64;

/// Sizes of one attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch × heads.
    pub groups: usize,
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

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        assert_eq!(
            q.len(),
            self.groups * self.lq * self.d,
            "q is not [G, Lq, d]"
        );
        assert_eq!(
            k.len(),
            self.groups * self.lk * self.d,
            "k is not [G, Lk, d]"
        );
        assert_eq!(
            v.len(),
            self.groups * self.lk * self.dv,
            "v is not [G, Lk, dv]"
        );
        assert!(
            !self.causal || self.lq == self.lk,
            "causal flash attention takes as many queries as keys"
        );
    }
}

/// `scores[r, j] = s · q_r · k_j`, masked (−∞) where key `j0 + j` is after query `i0 + r`.
#[allow(clippy::too_many_arguments)]
fn scores(
    dst: &mut [f32],
    q: &[f32],
    k: &[f32],
    (bq, bk, d): (usize, usize, usize),
    (i0, j0): (usize, usize),
    causal: bool,
    scale: f32,
) {
    let out = crate::math::as_out(&mut dst[..bq * bk]);
    // q [bq, d] (rows d apart) · kᵀ [d, bk] (k's rows are its columns).
    matmul(bq, bk, d, out, bk, false, q, (d, 1), k, (1, d));
    scale_mask_at(level(), &mut dst[..bq * bk], bk, (i0, j0), causal, scale);
}

// `multiversion!` hands every body the MulAdd type; these need none.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn scale_mask_generic<M: MulAdd>(
    s: &mut [f32],
    bk: usize,
    (i0, j0): (usize, usize),
    causal: bool,
    scale: f32,
) {
    for (r, row) in s.chunks_exact_mut(bk).enumerate() {
        for x in row.iter_mut() {
            *x *= scale;
        }
        if causal {
            // Keys j0 + j > i0 + r are in the future.
            let first_masked = (i0 + r + 1).saturating_sub(j0).min(bk);
            row[first_masked..].fill(f32::NEG_INFINITY);
        }
    }
}
multiversion!(scale_mask_generic, scale_mask_at, (s: &mut [f32], bk: usize, at: (usize, usize), causal: bool, scale: f32));

/// Lanes of the row reductions (separate accumulators, so they vectorise).
const LANES: usize = 16;

/// Folds one tile of scores `[bq, bk]` into the running softmax of its rows: turns the
/// scores into `e^(s - m)` with each row's new running max `m`, rescales the rows'
/// sums and outputs `o` `[bq, dv]` to that max.
#[inline(always)]
fn online_softmax_generic<M: MulAdd>(
    sc: &mut [f32],
    bk: usize,
    m: &mut [f32],
    sum: &mut [f32],
    o: &mut [f32],
) {
    let dv = o.len() / m.len();
    for (r, row) in sc.chunks_exact_mut(bk).enumerate() {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut tile_max = f32::NEG_INFINITY;
        for &v in acc.iter().chain(chunks.remainder()) {
            tile_max = if v > tile_max { v } else { tile_max };
        }
        let m_new = if tile_max > m[r] { tile_max } else { m[r] };
        if m_new == f32::NEG_INFINITY {
            // Nothing visible yet: the row adds nothing.
            row.fill(0.0);
            continue;
        }
        let mut acc = [0f32; LANES];
        let n = row.len() / LANES * LANES;
        for c in row[..n].chunks_exact_mut(LANES) {
            for i in 0..LANES {
                let e = exp::<M>(c[i] - m_new);
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut row_sum: f32 = acc.iter().sum();
        for x in &mut row[n..] {
            *x = exp::<M>(*x - m_new);
            row_sum += *x;
        }
        let alpha = exp::<M>(m[r] - m_new);
        sum[r] = sum[r] * alpha + row_sum;
        if alpha != 1.0 {
            for x in &mut o[r * dv..(r + 1) * dv] {
                *x *= alpha;
            }
        }
        m[r] = m_new;
    }
}
multiversion!(online_softmax_generic, online_softmax_at, (sc: &mut [f32], bk: usize, m: &mut [f32], sum: &mut [f32], o: &mut [f32]));

/// Probabilities `e^(s - lse)` of a tile of scores `[bq, bk]` from each row's log-sum-exp
/// (0 for a row that sees no key).
#[inline(always)]
fn probs_generic<M: MulAdd>(p: &mut [f32], bk: usize, lse: &[f32]) {
    for (row, &l) in p.chunks_exact_mut(bk).zip(lse) {
        if l == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            for x in row.iter_mut() {
                *x = exp::<M>(*x - l);
            }
        }
    }
}
multiversion!(probs_generic, probs_at, (p: &mut [f32], bk: usize, lse: &[f32]));

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

/// Output `[G, Lq, dv]` and each query's log-sum-exp of scores `[G, Lq]`.
pub fn forward(s: AttnShape, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    s.check(q, k, v);
    let (lq, lk, d, dv) = (s.lq, s.lk, s.d, s.dv);
    let mut out = vec![0f32; s.groups * lq * dv];
    let mut lse = vec![0f32; s.groups * lq];
    if lq == 0 || s.groups == 0 {
        return (out, lse);
    }
    let tiles = lq.div_ceil(BQ);
    let scale = s.scale();
    // One task per (group, query tile): its rows of `out` and `lse`.
    let mut jobs: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
    for (g, (og, lg)) in out.chunks_mut(lq * dv).zip(lse.chunks_mut(lq)).enumerate() {
        for (t, (o, l)) in og.chunks_mut(BQ * dv).zip(lg.chunks_mut(BQ)).enumerate() {
            jobs.push((g, t * BQ, o, l));
        }
    }
    debug_assert_eq!(jobs.len(), s.groups * tiles);
    jobs.into_par_iter().for_each_init(
        || vec![0f32; BQ * BK],
        |sc, (g, i0, o, l)| {
            let bq = l.len();
            let qg = &q[(g * lq + i0) * d..(g * lq + i0 + bq) * d];
            let kg = &k[g * lk * d..(g + 1) * lk * d];
            let vg = &v[g * lk * dv..(g + 1) * lk * dv];
            let mut m = [f32::NEG_INFINITY; BQ];
            let mut sum = [0f32; BQ];
            let end = s.key_end(i0, bq);
            for j0 in (0..end).step_by(BK) {
                let bk = BK.min(end - j0);
                scores(
                    sc,
                    qg,
                    &kg[j0 * d..],
                    (bq, bk, d),
                    (i0, j0),
                    s.causal,
                    scale,
                );
                online_softmax_at(
                    level(),
                    &mut sc[..bq * bk],
                    bk,
                    &mut m[..bq],
                    &mut sum[..bq],
                    o,
                );
                // o += p [bq, bk] · v [bk, dv]
                let out = crate::math::as_out(o);
                matmul(
                    bq,
                    dv,
                    bk,
                    out,
                    dv,
                    true,
                    sc,
                    (bk, 1),
                    &vg[j0 * dv..],
                    (dv, 1),
                );
            }
            for r in 0..bq {
                if sum[r] > 0.0 {
                    let inv = 1.0 / sum[r];
                    for x in &mut o[r * dv..(r + 1) * dv] {
                        *x *= inv;
                    }
                    l[r] = m[r] + sum[r].ln();
                } else {
                    l[r] = f32::NEG_INFINITY;
                }
            }
        },
    );
    (out, lse)
}

/// Gradients `(dq, dk, dv)` of [`forward`] from its output `o`, log-sum-exps `lse` and
/// the output's gradient `grad`.
pub fn backward(
    s: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    s.check(q, k, v);
    let (g_n, lq, lk, d, dv) = (s.groups, s.lq, s.lk, s.d, s.dv);
    assert_eq!(o.len(), g_n * lq * dv);
    assert_eq!(grad.len(), g_n * lq * dv);
    assert_eq!(lse.len(), g_n * lq);
    let mut dq = vec![0f32; g_n * lq * d];
    let mut dk = vec![0f32; g_n * lk * d];
    let mut dvv = vec![0f32; g_n * lk * dv];
    if g_n == 0 || lq == 0 || lk == 0 {
        return (dq, dk, dvv);
    }
    let scale = s.scale();
    dq.par_chunks_mut(lq * d)
        .zip(dk.par_chunks_mut(lk * d))
        .zip(dvv.par_chunks_mut(lk * dv))
        .enumerate()
        .for_each(|(g, ((dqg, dkg), dvg))| {
            let qg = &q[g * lq * d..(g + 1) * lq * d];
            let kg = &k[g * lk * d..(g + 1) * lk * d];
            let vg = &v[g * lk * dv..(g + 1) * lk * dv];
            let og = &o[g * lq * dv..(g + 1) * lq * dv];
            let gg = &grad[g * lq * dv..(g + 1) * lq * dv];
            let lg = &lse[g * lq..(g + 1) * lq];
            // rowsum(dO ⊙ O) per query.
            let delta: Vec<f32> = (0..lq)
                .map(|i| {
                    gg[i * dv..(i + 1) * dv]
                        .iter()
                        .zip(&og[i * dv..(i + 1) * dv])
                        .map(|(a, b)| a * b)
                        .sum()
                })
                .collect();
            let mut p = vec![0f32; BQ * BK];
            let mut dp = vec![0f32; BQ * BK];
            for j0 in (0..lk).step_by(BK) {
                let bk = BK.min(lk - j0);
                // Queries before j0 see none of these keys when causal.
                let first_tile = if s.causal { j0 / BQ * BQ } else { 0 };
                for i0 in (first_tile..lq).step_by(BQ) {
                    let bq = BQ.min(lq - i0);
                    scores(
                        &mut p,
                        &qg[i0 * d..],
                        &kg[j0 * d..],
                        (bq, bk, d),
                        (i0, j0),
                        s.causal,
                        scale,
                    );
                    probs_at(level(), &mut p[..bq * bk], bk, &lg[i0..i0 + bq]);
                    let p = &p[..bq * bk];
                    let gi = &gg[i0 * dv..(i0 + bq) * dv];
                    // dv_t [bk, dv] += pᵀ [bk, bq] · dO [bq, dv]
                    matmul(
                        bk,
                        dv,
                        bq,
                        crate::math::as_out(&mut dvg[j0 * dv..(j0 + bk) * dv]),
                        dv,
                        true,
                        p,
                        (1, bk),
                        gi,
                        (dv, 1),
                    );
                    // dp [bq, bk] = dO [bq, dv] · vᵀ [dv, bk]
                    matmul(
                        bq,
                        bk,
                        dv,
                        crate::math::as_out(&mut dp[..bq * bk]),
                        bk,
                        false,
                        gi,
                        (dv, 1),
                        &vg[j0 * dv..],
                        (1, dv),
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
                        crate::math::as_out(&mut dqg[i0 * d..(i0 + bq) * d]),
                        d,
                        true,
                        ds,
                        (bk, 1),
                        &kg[j0 * d..],
                        (d, 1),
                    );
                    // dk [bk, d] += dsᵀ [bk, bq] · q [bq, d]
                    matmul(
                        bk,
                        d,
                        bq,
                        crate::math::as_out(&mut dkg[j0 * d..(j0 + bk) * d]),
                        d,
                        true,
                        ds,
                        (1, bk),
                        &qg[i0 * d..],
                        (d, 1),
                    );
                }
            }
        });
    (dq, dk, dvv)
}
