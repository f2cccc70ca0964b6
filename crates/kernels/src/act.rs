//! Sigmoid, SiLU and exact GELU, forward and backward, written on vector registers
//! ([`Reg`]) for AVX2 and AVX-512. The portable versions in `math.rs` are compiled
//! from scalar code; there each value costs a full `exp` (about 28 instructions per
//! vector with its range selects) and a division, where these take the 12-instruction
//! [`Reg::exp2`] and the reciprocal estimate with one Newton step. On a Zen 4 core
//! (AVX-512) sigmoid and SiLU take 14-18 cycles per 16 values against 25-28 before;
//! GELU's forward about 19 (4.8 ns) with its rational CDF, 25 (6.2 ns) with the
//! exponential form its backward keeps, 30 compiled.
//!
//! The derivations:
//! - `sigmoid(x) = 1 / (1 + 2^t)` with `t = −x log2 e`, `t` capped at 126 so the sum
//!   stays finite, and the result 0 where `t > 126` (x < −87.3, where the true value is
//!   below 1.2e-38);
//! - `silu(x) = x · sigmoid(x)`, its derivative `s (1 + x (1 − s))`;
//! - `gelu(x) = x Φ(x)`, Φ the normal CDF `½ (1 + erf(x / √2))`: forward as a
//!   rational function `½ + x P(x²) / Q(x²)` on `|x| ≤ 5.3` (no exponential, one
//!   reciprocal; Φ within 2.4e-7, so GELU within 2.4e-7 |x|, which in the far
//!   negative tail, where the value itself is that small, is no relative accuracy: like
//!   PyTorch's `½ x (1 + erf)`), 0 below; the derivative `Φ(x) + x e^{−x²/2} / √(2π)` with Φ by
//!   Abramowitz & Stegun 7.1.26 as in `math.rs`, both terms from one exponential.
//!
//! x is clamped to ±`f32::MAX` where it multiplies a factor that is 0 at ±∞, so the
//! limits come out (SiLU(−∞) = 0, GELU's derivative 1 at +∞) instead of ∞ · 0. NaN in
//! gives NaN out. The accuracy is `math.rs`'s stated bound for these functions (checked
//! in `tests/accuracy.rs`); every element gets the same bits whatever its position and
//! whatever the threads, and `math::scalar` runs these same kernels.

#![cfg(target_arch = "x86_64")]

use crate::math::{Level, Out, Unary};
use crate::simd::{poly, Reg};
use std::arch::x86_64::{__m256, __m512};

const LOG2E: f32 = std::f32::consts::LOG2_E;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / √(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// Abramowitz & Stegun 7.1.26: `t = 1 / (1 + P a)` and the polynomial in t.
const AS_P: f32 = 0.327_591_1;
const AS_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];
/// Past this |x| the normal CDF is 1 in f32; capping there keeps the reciprocal finite.
const ERF_CAP: f32 = 1.0e4;

/// Whether these kernels compute `op` at `level`.
pub(crate) fn covers(level: Level, op: Unary) -> bool {
    level != Level::Generic && matches!(op, Unary::Sigmoid | Unary::Silu | Unary::Gelu)
}

/// One of the functions, lane by lane.
trait Lane {
    /// The value at x.
    unsafe fn value<R: Reg>(x: R) -> R;
    /// `g` times the derivative at x.
    unsafe fn grad<R: Reg>(x: R, g: R) -> R;
}

struct Sigmoid;
struct Silu;
struct Gelu;

/// `sigmoid(x)` and the exponent `t = −x log2 e` it came from.
#[inline(always)]
unsafe fn sigmoid<R: Reg>(x: R) -> R {
    // SAFETY (this and every function below): the caller enabled `R`'s instructions.
    unsafe {
        let t = x.mul(R::splat(-LOG2E));
        // min(126, t): t where it is NaN, so NaN carries on.
        let e = R::splat(126.0).min(t).exp2();
        e.add(R::splat(1.0)).recip().zero_where_above(t, 126.0)
    }
}

/// x clamped to ±`f32::MAX` (NaN stays: `max` and `min` return their second operand).
#[inline(always)]
unsafe fn finite<R: Reg>(x: R) -> R {
    unsafe { R::splat(f32::MAX).min(R::splat(-f32::MAX).max(x)) }
}

impl Lane for Sigmoid {
    #[inline(always)]
    unsafe fn value<R: Reg>(x: R) -> R {
        unsafe { sigmoid(x) }
    }
    #[inline(always)]
    unsafe fn grad<R: Reg>(x: R, g: R) -> R {
        unsafe {
            let s = sigmoid(x);
            // (g s)(1 − s), in the order of `math`'s backward from the output, so both
            // give the same bits.
            g.mul(s).mul(R::splat(1.0).sub(s))
        }
    }
}

impl Lane for Silu {
    #[inline(always)]
    unsafe fn value<R: Reg>(x: R) -> R {
        unsafe { R::splat(-f32::MAX).max(x).mul(sigmoid(x)) }
    }
    #[inline(always)]
    unsafe fn grad<R: Reg>(x: R, g: R) -> R {
        unsafe {
            let s = sigmoid(x);
            let one = R::splat(1.0);
            let d = finite(x).mul_add(one.sub(s), one);
            g.mul(s).mul(d)
        }
    }
}

/// `(Φ(x), e^{−x²/2})`, Φ the standard normal CDF `½ (1 + erf(x / √2))`.
///
/// With `w = ½ q(t) t e^{−x²/2}` (A&S's tail, halved by halving its coefficients),
/// Φ is `w` below 0 and `1 − w` above: the negative side takes the tail as it is,
/// without the cancellation of `1 − erf`.
#[inline(always)]
unsafe fn normal_cdf<R: Reg>(x: R) -> (R, R) {
    unsafe {
        let one = R::splat(1.0);
        // a = |x| (capped), and A&S's argument x / √2 folded into the constants.
        let a = R::splat(ERF_CAP).min(x.abs());
        let t = a.mul_add(R::splat(AS_P * FRAC_1_SQRT_2), one).recip();
        let e = a.mul(a).mul(R::splat(-0.5 * LOG2E)).exp2();
        let mut q = R::splat(0.5 * AS_A[4]);
        for &c in AS_A[..4].iter().rev() {
            q = q.mul_add(t, R::splat(0.5 * c));
        }
        let w = q.mul(t).mul(e);
        (w.where_negative(x, one.sub(w)), e)
    }
}

/// Where the rational form of Φ stops: beyond ±`PHI_CAP` Φ is within 5.8e-8 of 0 or 1.
const PHI_CAP: f32 = 5.3;
/// `Φ(x) − ½ ≈ x P(x²) / Q(x²)` on `|x| ≤ PHI_CAP`: coefficients fitted here (a
/// weighted least-squares fit, reweighted towards equal ripple) to the absolute error of
/// Φ; 1.2e-7 in exact arithmetic, 2.4e-7 evaluated in f32. `scripts/fit_normal_cdf.py`
/// makes them again.
const PHI_P: [f32; 5] = [
    0.398_941_58,
    0.054_929_044,
    0.005_905_993_7,
    0.000_374_506_72,
    6.835_431_6e-6,
];
const PHI_Q: [f32; 6] = [
    1.0,
    0.304_342_63,
    0.040_546_574,
    0.003_049_231_6,
    0.000_134_850_24,
    5.715_461_4e-7,
];

impl Lane for Gelu {
    /// `x Φ(x)` with the rational Φ: no exponential and one reciprocal, about 21
    /// instructions per vector where [`normal_cdf`] takes about 30. Below −`PHI_CAP`
    /// the value is 0 (its true size is under 5.8e-8 |x|), so GELU(−∞) is 0.
    #[inline(always)]
    unsafe fn value<R: Reg>(x: R) -> R {
        unsafe {
            // NaN stays: `max` and `min` return their second operand.
            let xc = R::splat(PHI_CAP).min(R::splat(-PHI_CAP).max(x));
            let s = xc.mul(xc);
            let r = xc.mul(poly(&PHI_P, s)).mul(poly(&PHI_Q, s).recip());
            x.mul(r.add(R::splat(0.5))).zero_where_below(x, -PHI_CAP)
        }
    }
    #[inline(always)]
    unsafe fn grad<R: Reg>(x: R, g: R) -> R {
        unsafe {
            let (cdf, e) = normal_cdf(x);
            let pdf = e.mul(R::splat(INV_SQRT_2PI));
            g.mul(finite(x).mul_add(pdf, cdf))
        }
    }
}

/// The widest register, for the tail's buffer.
const MAX_LANES: usize = 16;

/// `dst[i] = L(src[i])`, the last partial vector through a zero-padded buffer.
#[inline(always)]
unsafe fn map<R: Reg, L: Lane>(dst: &mut [Out], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let full = src.len() - src.len() % R::LANES;
    let (d, s) = (dst.as_mut_ptr() as *mut f32, src.as_ptr());
    // SAFETY: `i + LANES ≤ full ≤ len` for both slices; the caller enabled `R`.
    unsafe {
        for i in (0..full).step_by(R::LANES) {
            L::value(R::load(s.add(i))).store(d.add(i));
        }
    }
    if full < src.len() {
        let mut buf = [0.0f32; MAX_LANES];
        let rest = src.len() - full;
        buf[..rest].copy_from_slice(&src[full..]);
        // SAFETY: `buf` holds `MAX_LANES ≥ LANES` values; the caller enabled `R`.
        unsafe { L::value(R::load(buf.as_ptr())).store(buf.as_mut_ptr()) };
        for (o, &v) in dst[full..].iter_mut().zip(&buf) {
            o.write(v);
        }
    }
}

/// `dst[i] = g[i] · L'(x[i])`, the tail as in [`map`].
#[inline(always)]
unsafe fn map_grad<R: Reg, L: Lane>(dst: &mut [Out], x: &[f32], g: &[f32]) {
    assert!(dst.len() == x.len() && x.len() == g.len());
    let full = x.len() - x.len() % R::LANES;
    let (d, xs, gs) = (dst.as_mut_ptr() as *mut f32, x.as_ptr(), g.as_ptr());
    // SAFETY: as in `map`.
    unsafe {
        for i in (0..full).step_by(R::LANES) {
            L::grad(R::load(xs.add(i)), R::load(gs.add(i))).store(d.add(i));
        }
    }
    if full < x.len() {
        let (mut bx, mut bg) = ([0.0f32; MAX_LANES], [0.0f32; MAX_LANES]);
        let rest = x.len() - full;
        bx[..rest].copy_from_slice(&x[full..]);
        bg[..rest].copy_from_slice(&g[full..]);
        // SAFETY: as in `map`.
        unsafe { L::grad(R::load(bx.as_ptr()), R::load(bg.as_ptr())).store(bx.as_mut_ptr()) };
        for (o, &v) in dst[full..].iter_mut().zip(&bx) {
            o.write(v);
        }
    }
}

macro_rules! each_op {
    ($op:expr, $f:ident, $r:ty, ($($arg:expr),*)) => {
        match $op {
            Unary::Sigmoid => $f::<$r, Sigmoid>($($arg),*),
            Unary::Silu => $f::<$r, Silu>($($arg),*),
            Unary::Gelu => $f::<$r, Gelu>($($arg),*),
            _ => unreachable!("act: {} is not one of these kernels", $op.name()),
        }
    };
}

#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(op: Unary, dst: &mut [Out], src: &[f32]) {
    // SAFETY: the caller found AVX2 and FMA.
    unsafe { each_op!(op, map, __m256, (dst, src)) }
}

#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn forward_avx512(op: Unary, dst: &mut [Out], src: &[f32]) {
    // SAFETY: the caller found AVX-512.
    unsafe { each_op!(op, map, __m512, (dst, src)) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]) {
    // SAFETY: the caller found AVX2 and FMA.
    unsafe { each_op!(op, map_grad, __m256, (dst, x, g)) }
}

#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn backward_avx512(op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]) {
    // SAFETY: the caller found AVX-512.
    unsafe { each_op!(op, map_grad, __m512, (dst, x, g)) }
}

/// `dst[i] = op(src[i])` where [`covers`]`(level, op)`.
pub(crate) fn forward(level: Level, op: Unary, dst: &mut [Out], src: &[f32]) {
    match level {
        // SAFETY: `level` is what `math::level()` found on this CPU.
        Level::Avx512 => unsafe { forward_avx512(op, dst, src) },
        // SAFETY: as above.
        Level::Avx2 => unsafe { forward_avx2(op, dst, src) },
        Level::Generic => unreachable!("act: no vector kernels without AVX2"),
    }
}

/// `dst[i] = g[i] · op'(x[i])` where [`covers`]`(level, op)`.
pub(crate) fn backward(level: Level, op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]) {
    match level {
        // SAFETY: `level` is what `math::level()` found on this CPU.
        Level::Avx512 => unsafe { backward_avx512(op, dst, x, g) },
        // SAFETY: as above.
        Level::Avx2 => unsafe { backward_avx2(op, dst, x, g) },
        Level::Generic => unreachable!("act: no vector kernels without AVX2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value and derivative in f64.
    fn reference(op: Unary, x: f64) -> (f64, f64) {
        let s = 1.0 / (1.0 + (-x).exp());
        let (v, d) = match op {
            Unary::Sigmoid => (s, s * (1.0 - s)),
            Unary::Silu => (x * s, s * (1.0 + x * (1.0 - s))),
            Unary::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erf(x / 2f64.sqrt()));
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                (x * cdf, cdf + x * pdf)
            }
            _ => unreachable!(),
        };
        // The limits at ±∞ (∞ · 0 in the formulas).
        match x {
            f64::NEG_INFINITY => (0.0, 0.0),
            f64::INFINITY => (if op == Unary::Sigmoid { 1.0 } else { x }, d.min(1.0)),
            _ => (v, d),
        }
    }

    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=200_000).map(|i| -100.0 + i as f32 * 1e-3).collect();
        for e in -30..=38 {
            for m in [1.0f32, 3.3] {
                xs.extend([m * 10f32.powi(e), -m * 10f32.powi(e)]);
            }
        }
        xs.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
        ]);
        xs.extend([f32::NAN, -f32::NAN, f32::MIN_POSITIVE, -87.3, -87.4, 88.8]);
        xs
    }

    /// Values and gradients (times g = −2.5) within 1e-6 · max(1, |x|) (· |g|) of f64
    /// at one level; NaN in gives NaN out.
    fn check(level: Level) {
        let xs = inputs();
        let g = vec![-2.5f32; xs.len()];
        for op in [Unary::Sigmoid, Unary::Silu, Unary::Gelu] {
            let (mut y, mut d) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
            forward(level, op, crate::math::as_out(&mut y), &xs);
            backward(level, op, crate::math::as_out(&mut d), &xs, &g);
            for (i, &x) in xs.iter().enumerate() {
                if x.is_nan() {
                    assert!(y[i].is_nan() && d[i].is_nan(), "{op:?}({x}) at {level:?}");
                    continue;
                }
                let (v, dv) = reference(op, x as f64);
                let tol = 1e-6 * (x as f64).abs().max(1.0);
                if v.is_infinite() {
                    assert_eq!(y[i] as f64, v, "{op:?}({x}) at {level:?}");
                } else {
                    let err = (y[i] as f64 - v).abs();
                    assert!(err <= tol, "{op:?}({x}) = {}, want {v} at {level:?}", y[i]);
                }
                let err = (d[i] as f64 - -2.5 * dv).abs();
                assert!(
                    err <= 2.5 * tol,
                    "{op:?}'({x}) · −2.5 = {}, want {} at {level:?}",
                    d[i],
                    -2.5 * dv
                );
            }
        }
    }

    #[test]
    fn values_and_gradients_are_within_the_stated_error_at_every_level_this_cpu_runs() {
        let mut ran = 0;
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            check(Level::Avx2);
            ran += 1;
        }
        if crate::math::level() == Level::Avx512 {
            check(Level::Avx512);
            ran += 1;
        }
        if ran == 0 {
            eprintln!("act: this CPU has neither AVX2 nor AVX-512; nothing to check");
        }
    }

    #[test]
    fn lengths_that_are_not_whole_vectors_give_the_same_bits_as_whole_ones() {
        let level = crate::math::level();
        if level == Level::Generic {
            return;
        }
        let xs: Vec<f32> = (0..67).map(|i| i as f32 * 0.37 - 12.0).collect();
        let g: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.03).collect();
        for op in [Unary::Sigmoid, Unary::Silu, Unary::Gelu] {
            let (mut all, mut all_d) = (vec![0.0; 67], vec![0.0; 67]);
            forward(level, op, crate::math::as_out(&mut all), &xs);
            backward(level, op, crate::math::as_out(&mut all_d), &xs, &g);
            for len in [1, 5, 16, 17, 31] {
                let (mut part, mut part_d) = (vec![0.0; len], vec![0.0; len]);
                let at = 67 - len;
                forward(level, op, crate::math::as_out(&mut part), &xs[at..]);
                backward(
                    level,
                    op,
                    crate::math::as_out(&mut part_d),
                    &xs[at..],
                    &g[at..],
                );
                assert_eq!(part, all[at..], "{op:?}, last {len}");
                assert_eq!(part_d, all_d[at..], "{op:?} gradient, last {len}");
            }
        }
    }
}
