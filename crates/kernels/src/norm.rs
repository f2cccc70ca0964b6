//! Layer normalisation along rows of `d` values: `y = (x − μ) · r · γ + β` with the row's
//! mean `μ` and `r = 1/sqrt(var + ε)` (the biased variance, as burn and PyTorch take it).
//! One pass forward keeps `(μ, r)` per row; one pass backward:
//! `dx = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `x̂ = (x − μ) · r`, `ĝ = g ⊙ γ`, and
//! `dγ = Σ_rows g ⊙ x̂`, `dβ = Σ_rows g`. On AVX2 and AVX-512 both are written on vector
//! registers (module `reg`), about twice as fast as the compiled loops kept for other CPUs.

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
multiversion!(forward_generic, forward_compiled, (y: &mut [Out], stats: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32));

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
multiversion!(backward_generic, backward_compiled, (dx: &mut [Out], dgb: &mut [f32], x: &[f32], g: &[f32], stats: &[f32], gamma: &[f32]));

/// The same passes written on vector registers (`Reg`) for AVX2 and AVX-512. The
/// compiled loops above kept their 16 lanes of sums in memory and went through them 8 at
/// a time with scalar leftovers: on one Zen 4 thread over [2048, 192], forward 152 µs and
/// backward 307 µs (about 48 cycles per 16 values) against 82 and 120 µs here.
#[cfg(target_arch = "x86_64")]
mod reg {
    use crate::math::Out;
    use crate::simd::Reg;

    /// `Σ f(j)` over the vectors starting at `j = 0, LANES, …` below `full`, in two
    /// accumulators.
    #[inline(always)]
    unsafe fn sum_vectors<R: Reg>(full: usize, f: impl Fn(usize) -> R) -> f32 {
        // SAFETY (this and every function below): the caller enabled `R`'s instructions
        // and keeps every index inside its slices.
        unsafe {
            let (mut a, mut b) = (R::zero(), R::zero());
            let mut j = 0;
            while j + 2 * R::LANES <= full {
                a = a.add(f(j));
                b = b.add(f(j + R::LANES));
                j += 2 * R::LANES;
            }
            if j < full {
                a = a.add(f(j));
            }
            a.add(b).reduce_add()
        }
    }

    #[inline(always)]
    pub(super) unsafe fn forward<R: Reg>(
        y: &mut [Out],
        stats: &mut [f32],
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let d = gamma.len();
        let full = d - d % R::LANES;
        let (gp, bp) = (gamma.as_ptr(), beta.as_ptr());
        for ((yr, xr), st) in y
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(stats.chunks_exact_mut(2))
        {
            let (xp, yp) = (xr.as_ptr(), yr.as_mut_ptr() as *mut f32);
            unsafe {
                let total =
                    sum_vectors::<R>(full, |j| R::load(xp.add(j))) + xr[full..].iter().sum::<f32>();
                let mean = total / d as f32;
                let m = R::splat(mean);
                let dev = sum_vectors::<R>(full, |j| {
                    let v = R::load(xp.add(j)).sub(m);
                    v.mul(v)
                }) + xr[full..]
                    .iter()
                    .map(|&v| (v - mean) * (v - mean))
                    .sum::<f32>();
                let r = 1.0 / (dev / d as f32 + eps).sqrt();
                let rv = R::splat(r);
                for j in (0..full).step_by(R::LANES) {
                    let xh = R::load(xp.add(j)).sub(m).mul(rv);
                    xh.mul_add(R::load(gp.add(j)), R::load(bp.add(j)))
                        .store(yp.add(j));
                }
                for k in full..d {
                    yr[k].write((xr[k] - mean) * r * gamma[k] + beta[k]);
                }
                st[0] = mean;
                st[1] = r;
            }
        }
    }

    #[inline(always)]
    pub(super) unsafe fn backward<R: Reg>(
        dx: &mut [Out],
        dgb: &mut [f32],
        x: &[f32],
        g: &[f32],
        stats: &[f32],
        gamma: &[f32],
    ) {
        let d = gamma.len();
        let full = d - d % R::LANES;
        let (dgamma, dbeta) = dgb.split_at_mut(d);
        let (gmp, dgp, dbp) = (gamma.as_ptr(), dgamma.as_mut_ptr(), dbeta.as_mut_ptr());
        for (((dr, xr), gr), st) in dx
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(g.chunks_exact(d))
            .zip(stats.chunks_exact(2))
        {
            let (mean, r) = (st[0], st[1]);
            let (xp, gp, dp) = (xr.as_ptr(), gr.as_ptr(), dr.as_mut_ptr() as *mut f32);
            unsafe {
                let (m, rv) = (R::splat(mean), R::splat(r));
                let xhat = |j: usize| R::load(xp.add(j)).sub(m).mul(rv);
                let ghat = |j: usize| R::load(gp.add(j)).mul(R::load(gmp.add(j)));
                // Σ ĝ and Σ ĝ ⊙ x̂ in one pass.
                let tail = |k: usize| ((xr[k] - mean) * r, gr[k] * gamma[k]);
                let (mut a1, mut a2) = (R::zero(), R::zero());
                for j in (0..full).step_by(R::LANES) {
                    let gh = ghat(j);
                    a1 = a1.add(gh);
                    a2 = gh.mul_add(xhat(j), a2);
                }
                let (mut s1, mut s2) = (a1.reduce_add(), a2.reduce_add());
                for k in full..d {
                    let (xh, gh) = tail(k);
                    s1 += gh;
                    s2 += gh * xh;
                }
                let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                let (m1v, neg_m2) = (R::splat(m1), R::splat(-m2));
                for j in (0..full).step_by(R::LANES) {
                    let xh = xhat(j);
                    let gv = R::load(gp.add(j));
                    // r (ĝ − m1 − x̂ m2)
                    xh.mul_add(neg_m2, ghat(j).sub(m1v))
                        .mul(rv)
                        .store(dp.add(j));
                    gv.mul_add(xh, R::load(dgp.add(j))).store(dgp.add(j));
                    gv.add(R::load(dbp.add(j))).store(dbp.add(j));
                }
                for k in full..d {
                    let (xh, gh) = tail(k);
                    dr[k].write(r * (gh - m1 - xh * m2));
                    dgamma[k] += gr[k] * xh;
                    dbeta[k] += gr[k];
                }
            }
        }
    }
}

/// Defines `$dispatch(level, args)`: `reg::$f` on the vector registers of AVX2 or
/// AVX-512, the compiled `$compiled` elsewhere.
macro_rules! on_registers {
    ($f:ident, $dispatch:ident, $compiled:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $dispatch(level: Level, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: the caller found AVX2 and FMA.
                    unsafe { reg::$f::<std::arch::x86_64::__m256>($($arg),*) }
                }
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    // SAFETY: the caller found AVX-512.
                    unsafe { reg::$f::<std::arch::x86_64::__m512>($($arg),*) }
                }
                match level {
                    // SAFETY: `level()` found these instructions on this CPU.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Generic => {}
                }
            }
            $compiled(level, $($arg),*)
        }
    };
}
on_registers!(forward, forward_at, forward_compiled, (y: &mut [Out], stats: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32));
on_registers!(backward, backward_at, backward_compiled, (dx: &mut [Out], dgb: &mut [f32], x: &[f32], g: &[f32], stats: &[f32], gamma: &[f32]));

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
    fn register_passes_match_the_compiled_ones_at_every_level_this_cpu_runs() {
        let levels: Vec<Level> = match level() {
            Level::Avx512 => vec![Level::Avx2, Level::Avx512],
            Level::Avx2 => vec![Level::Avx2],
            Level::Generic => vec![],
        };
        // Widths below one vector, whole vectors, odd numbers of vectors, and leftovers.
        for d in [7usize, 16, 24, 48, 192, 200] {
            let rows = 9;
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7919 % 1013) as f32).sin() * 3.0 + 0.5)
                .collect();
            let g: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 104_729 % 997) as f32).cos())
                .collect();
            let gamma: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / d as f32).collect();
            let beta: Vec<f32> = (0..d).map(|i| 0.1 - i as f32 / 100.0).collect();
            let run = |lv: Option<Level>| {
                let mut y = vec![0f32; rows * d];
                let mut st = vec![0f32; rows * 2];
                let mut dx = vec![0f32; rows * d];
                let mut dgb = vec![0f32; 2 * d];
                let out = crate::math::as_out;
                match lv {
                    Some(lv) => {
                        forward_at(lv, out(&mut y), &mut st, &x, &gamma, &beta, 1e-5);
                        backward_at(lv, out(&mut dx), &mut dgb, &x, &g, &st, &gamma);
                    }
                    None => {
                        forward_compiled(
                            Level::Generic,
                            out(&mut y),
                            &mut st,
                            &x,
                            &gamma,
                            &beta,
                            1e-5,
                        );
                        backward_compiled(
                            Level::Generic,
                            out(&mut dx),
                            &mut dgb,
                            &x,
                            &g,
                            &st,
                            &gamma,
                        );
                    }
                }
                (y, st, dx, dgb)
            };
            let want = run(None);
            for &lv in &levels {
                let got = run(Some(lv));
                let close = |a: &[f32], b: &[f32], what: &str| {
                    for (i, (p, q)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (p - q).abs() <= 2e-5 * (1.0 + q.abs()),
                            "{lv:?}, width {d}: {what}[{i}] = {p}, compiled {q}"
                        );
                    }
                };
                close(&got.0, &want.0, "y");
                close(&got.1, &want.1, "stats");
                close(&got.2, &want.2, "dx");
                close(&got.3, &want.3, "dγ|dβ");
            }
        }
    }

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
