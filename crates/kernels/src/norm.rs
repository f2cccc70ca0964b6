//! Layer normalisation along rows of `d` values: `y = (x − μ) · r · γ + β` with the row's
//! mean `μ` and `r = 1/sqrt(var + ε)` (the biased variance, as burn and PyTorch take it).
//! One pass forward keeps `(μ, r)` per row; one pass backward:
//! `dx = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `x̂ = (x − μ) · r`, `ĝ = g ⊙ γ`, and
//! `dγ = Σ_rows g ⊙ x̂`, `dβ = Σ_rows g`.

use crate::math::{fill_new, fold_lanes, level, multiversion, Level, MulAdd, Out};
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS: usize = 64;

/// Lanes of the row sums (separate accumulators, so they vectorise).
const LANES: usize = 16;

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    fold_lanes(acc, |a, b| a + b) + rest.iter().sum::<f32>()
}

#[inline(always)]
fn sum_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let v = c[i] - mean;
            acc[i] += v * v;
        }
    }
    fold_lanes(acc, |a, b| a + b) + rest.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>()
}

// `multiversion!` hands every body the MulAdd type; these need none.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn forward_generic<M: MulAdd>(
    y: &mut [Out],
    stats: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let d = gamma.len();
    for ((yr, xr), st) in y
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(stats.chunks_exact_mut(2))
    {
        let mean = sum(xr) / d as f32;
        let var = sum_sq_dev(xr, mean) / d as f32;
        let r = 1.0 / (var + eps).sqrt();
        for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
            o.write((v - mean) * r * g + b);
        }
        st[0] = mean;
        st[1] = r;
    }
}
multiversion!(forward_generic, forward_at, (y: &mut [Out], stats: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32));

/// The rows' `dx`, and their `dγ` and `dβ` added into `dgb` (`[dγ | dβ]`).
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn backward_generic<M: MulAdd>(
    dx: &mut [Out],
    dgb: &mut [f32],
    x: &[f32],
    g: &[f32],
    stats: &[f32],
    gamma: &[f32],
) {
    let d = gamma.len();
    let (dgamma, dbeta) = dgb.split_at_mut(d);
    for (((dr, xr), gr), st) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(g.chunks_exact(d))
        .zip(stats.chunks_exact(2))
    {
        let (mean, r) = (st[0], st[1]);
        // Σ ĝ and Σ ĝ ⊙ x̂ over the row, with separate lanes.
        let mut a1 = [0f32; LANES];
        let mut a2 = [0f32; LANES];
        let n = d / LANES * LANES;
        for j in (0..n).step_by(LANES) {
            for i in 0..LANES {
                let k = j + i;
                let xh = (xr[k] - mean) * r;
                let gh = gr[k] * gamma[k];
                a1[i] += gh;
                a2[i] += gh * xh;
            }
        }
        let (mut s1, mut s2) = (fold_lanes(a1, |a, b| a + b), fold_lanes(a2, |a, b| a + b));
        for k in n..d {
            let xh = (xr[k] - mean) * r;
            let gh = gr[k] * gamma[k];
            s1 += gh;
            s2 += gh * xh;
        }
        let (m1, m2) = (s1 / d as f32, s2 / d as f32);
        for k in 0..d {
            let xh = (xr[k] - mean) * r;
            dr[k].write(r * (gr[k] * gamma[k] - m1 - xh * m2));
            dgamma[k] += gr[k] * xh;
            dbeta[k] += gr[k];
        }
    }
}
multiversion!(backward_generic, backward_at, (dx: &mut [Out], dgb: &mut [f32], x: &[f32], g: &[f32], stats: &[f32], gamma: &[f32]));

/// `y` and per-row `(μ, r)` (`[rows, 2]`) of `x` (`rows × d` values, `d = gamma.len()`).
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert_eq!(beta.len(), d, "layer norm: γ and β differ in width");
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer norm: rows of {d}"
    );
    let rows = x.len() / d;
    let mut stats = vec![0f32; rows * 2];
    let level = level();
    // Every output value is written (each row whole).
    let y = fill_new(x.len(), |y| {
        y.par_chunks_mut(ROWS * d)
            .zip(stats.par_chunks_mut(ROWS * 2))
            .zip(x.par_chunks(ROWS * d))
            .for_each(|((y, st), x)| forward_at(level, y, st, x, gamma, beta, eps))
    });
    (y, stats)
}

/// `(dx, dγ, dβ)` from the forward's input `x`, its `stats` and the output gradient `g`.
pub fn backward(
    x: &[f32],
    g: &[f32],
    stats: &[f32],
    gamma: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert_eq!(x.len(), g.len(), "layer norm: gradient and input differ");
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer norm: rows of {d}"
    );
    assert_eq!(
        stats.len(),
        x.len() / d * 2,
        "layer norm: one (μ, r) per row"
    );
    let level = level();
    // Every dx value is written (each row whole). Each task of ROWS rows adds its rows'
    // dγ and dβ into its own buffer, and the buffers are summed in task order, so the
    // result does not depend on how the threads shared the tasks (a rayon `fold` would
    // sum in whatever order the work was stolen, and runs would differ in the last bits).
    let mut partials = Vec::new();
    let dx = fill_new(x.len(), |dx| {
        partials = dx
            .par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d))
            .zip(g.par_chunks(ROWS * d))
            .zip(stats.par_chunks(ROWS * 2))
            .map(|(((dx, x), g), st)| {
                let mut acc = vec![0f32; 2 * d];
                backward_at(level, dx, &mut acc, x, g, st, gamma);
                acc
            })
            .collect::<Vec<_>>();
    });
    let mut dgb = vec![0f32; 2 * d];
    for part in &partials {
        for (x, y) in dgb.iter_mut().zip(part) {
            *x += y;
        }
    }
    let (dgamma, dbeta) = dgb.split_at(d);
    (dx, dgamma.to_vec(), dbeta.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_are_the_same_bits_on_every_run() {
        // Many tasks of rows, so threads share them differently from run to run.
        let (rows, d) = (4096, 48);
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 7919 % 1013) as f32).sin())
            .collect();
        let g: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 104_729 % 997) as f32).cos())
            .collect();
        let gamma: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / d as f32).collect();
        let beta = vec![0.1f32; d];
        let (_, stats) = forward(&x, &gamma, &beta, 1e-5);
        let first = backward(&x, &g, &stats, &gamma);
        for _ in 0..20 {
            let again = backward(&x, &g, &stats, &gamma);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&again.1), bits(&first.1), "dγ differs between runs");
            assert_eq!(bits(&again.2), bits(&first.2), "dβ differs between runs");
            assert_eq!(bits(&again.0), bits(&first.0), "dx differs between runs");
        }
    }
}
