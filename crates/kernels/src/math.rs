//! Element-wise math on f32 slices, written branch-free so the compiler vectorises it,
//! compiled for baseline x86-64, AVX2+FMA and AVX-512 (picked at run time), and split
//! across threads for large inputs. On AVX2 and AVX-512, sigmoid, SiLU and GELU (the
//! exact form) run the register kernels of `act.rs` instead, forward and backward.
//!
//! Accuracy against an f64 reference (checked in `tests/accuracy.rs`):
//! - `exp`: relative error below 3e-7 where the result is a normal f32 (x ≥ -86.6);
//!   results below 2.6e-38 flush to 0, x > 88.72 gives +inf.
//! - `erf`: absolute error below 3e-7, relative below 1e-6.
//! - `tanh`: absolute error below 3e-7, relative below 2e-6.
//! - `sigmoid`, `silu`, `gelu`, `gelu_tanh`: absolute error below 1e-6 · max(1, |x|).
//!
//! NaN in gives NaN out; ±inf give the functions' limits.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// An output element: written by the kernels before it is read.
pub type Out = MaybeUninit<f32>;

/// An initialised buffer seen as output slots. Sound because the kernels only ever
/// write initialised values through it.
pub(crate) fn as_out(dst: &mut [f32]) -> &mut [Out] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and nothing writes an
    // uninitialised value through the returned slice.
    unsafe { &mut *(dst as *mut [f32] as *mut [Out]) }
}

/// Output slots that were all written.
///
/// # Safety
/// Every element must have been written.
unsafe fn assume_init(d: &mut [Out]) -> &mut [f32] {
    // SAFETY: the caller guarantees every element is initialised.
    unsafe { &mut *(d as *mut [Out] as *mut [f32]) }
}

/// A vector of `n` f32 slots for a kernel to fill, and the function that marks it full.
pub fn fill_new(n: usize, fill: impl FnOnce(&mut [Out])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the kernels passed as `fill` write every one of the `n` slots.
    unsafe { v.set_len(n) };
    v
}

/// The element-wise functions with a fused forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unary {
    Exp,
    Erf,
    Tanh,
    Sigmoid,
    Silu,
    /// Exact GELU: `x Φ(x)` with the erf form of the normal CDF.
    Gelu,
    /// GELU with the tanh approximation.
    GeluTanh,
}

impl Unary {
    pub const ALL: [Unary; 7] = [
        Unary::Exp,
        Unary::Erf,
        Unary::Tanh,
        Unary::Sigmoid,
        Unary::Silu,
        Unary::Gelu,
        Unary::GeluTanh,
    ];

    /// Whether the derivative is a function of the output (exp, sigmoid, tanh): the
    /// backward then reads the saved output instead of recomputing the function.
    pub fn grad_from_output(self) -> bool {
        matches!(self, Unary::Exp | Unary::Sigmoid | Unary::Tanh)
    }

    pub fn name(self) -> &'static str {
        match self {
            Unary::Exp => "exp",
            Unary::Erf => "erf",
            Unary::Tanh => "tanh",
            Unary::Sigmoid => "sigmoid",
            Unary::Silu => "silu",
            Unary::Gelu => "gelu",
            Unary::GeluTanh => "gelu_tanh",
        }
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for the n that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 · 2^23 rounds an f32 below 2^22 to the nearest integer.
const ROUNDER: f32 = 12_582_912.0;
const EXP_HI: f32 = 88.722_83;
const EXP_LO: f32 = -86.6;
const FRAC_2_SQRT_PI: f32 = std::f32::consts::FRAC_2_SQRT_PI;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// sqrt(2 / pi) and the cubic coefficient of the tanh form of GELU.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

#[inline(always)]
fn select(c: bool, a: f32, b: f32) -> f32 {
    if c {
        a
    } else {
        b
    }
}

/// How the polynomials multiply and add: one fused instruction where the CPU has it (the
/// AVX2 and AVX-512 builds, aarch64), a multiply then an add elsewhere (a fused
/// multiply-add there would be a library call).
pub trait MulAdd {
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// `a · b + c` rounded once.
pub struct Fused;

/// `a · b + c` rounded twice.
pub struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// e^x: x = n ln2 + r with |r| ≤ ln2 / 2, e^r by its degree-6 Taylor polynomial (error
/// r^7/7! < 1.3e-7 relative), 2^n built in the exponent bits (as 2^(n-1) · 2 so n = 128
/// stays finite).
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    let (p, ni) = exp_parts::<M>(x.clamp(EXP_LO, EXP_HI));
    // 2^(n-1), then times 2: 2^128 itself is not a finite f32.
    let half_scale = f32::from_bits(((ni + 126) << 23) as u32);
    let y = (p * half_scale) * 2.0;
    let y = select(x > EXP_HI, f32::INFINITY, y);
    let y = select(x < EXP_LO, 0.0, y);
    select(x.is_nan(), x, y)
}

/// e^xc = p · 2^n for xc in [EXP_LO, EXP_HI]: `(p, n)`, p = e^r by the polynomial.
#[inline(always)]
fn exp_parts<M: MulAdd>(xc: f32) -> (f32, i32) {
    let k = xc * LOG2E + ROUNDER;
    let n = k - ROUNDER;
    // n as an integer, read from k's mantissa (k = 1.5 · 2^23 + n): a float-to-int cast
    // would keep the compiler from vectorising the loop.
    let ni = (k.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = M::fma(-n, LN2_LO, M::fma(-n, LN2_HI, xc));
    let p = 1.0 / 720.0;
    let p = M::fma(p, r, 1.0 / 120.0);
    let p = M::fma(p, r, 1.0 / 24.0);
    let p = M::fma(p, r, 1.0 / 6.0);
    let p = M::fma(p, r, 0.5);
    let p = M::fma(p, r, 1.0);
    let p = M::fma(p, r, 1.0);
    (p, ni)
}

/// e^x for x ≤ 0 where only the absolute value matters (the Gaussian factors of erf
/// and GELU): [`exp`] without its range and NaN selects. Below −86.6 it gives about
/// 1e-38 instead of 0; a NaN argument gives a finite value, so callers must carry NaN
/// through another factor (they do: every caller multiplies by a term of x).
#[inline(always)]
fn exp_gauss<M: MulAdd>(x: f32) -> f32 {
    let (p, ni) = exp_parts::<M>(if x > EXP_LO { x } else { EXP_LO });
    // n ≤ 0 here, so 2^n is a normal f32 built in the exponent bits directly.
    p * f32::from_bits(((ni + 127) << 23) as u32)
}

/// erf: the odd Taylor series to x^15 below 0.5; above, Abramowitz & Stegun 7.1.26
/// (1 - t(a1 + t(a2 + ...)) e^{-x^2}, t = 1 / (1 + p x), absolute error 1.5e-7).
#[inline(always)]
pub fn erf<M: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    // Small |x|.
    let x2 = x * x;
    let s = -1.0 / 75_600.0;
    let s = M::fma(s, x2, 1.0 / 9_360.0);
    let s = M::fma(s, x2, -1.0 / 1_320.0);
    let s = M::fma(s, x2, 1.0 / 216.0);
    let s = M::fma(s, x2, -1.0 / 42.0);
    let s = M::fma(s, x2, 1.0 / 10.0);
    let s = M::fma(s, x2, -1.0 / 3.0);
    let s = M::fma(s, x2, 1.0);
    let small = FRAC_2_SQRT_PI * x * s;
    let y = select(a < 0.5, small, erf_abs::<M>(x));
    select(x.is_nan(), x, y)
}

/// erf by Abramowitz & Stegun 7.1.26 alone (absolute error 1.5e-7, no series near 0):
/// enough wherever erf is added to 1, as in GELU's normal CDF.
#[inline(always)]
fn erf_abs<M: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / M::fma(0.327_591_1, a, 1.0);
    let q = 1.061_405_4;
    let q = M::fma(q, t, -1.453_152_1);
    let q = M::fma(q, t, 1.421_413_8);
    let q = M::fma(q, t, -0.284_496_74);
    let q = M::fma(q, t, 0.254_829_6);
    let big = 1.0 - q * t * exp_gauss::<M>(-x * x);
    select(x < 0.0, -big, big)
}

/// tanh: the odd Taylor series to x^9 below 0.1; above, 1 - 2 / (e^{2|x|} + 1) with the
/// sign of x.
#[inline(always)]
pub fn tanh<M: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    let x2 = x * x;
    let s = 62.0 / 2835.0;
    let s = M::fma(s, x2, -17.0 / 315.0);
    let s = M::fma(s, x2, 2.0 / 15.0);
    let s = M::fma(s, x2, -1.0 / 3.0);
    let s = M::fma(s, x2, 1.0);
    let small = x * s;
    let big = 1.0 - 2.0 / (exp::<M>(2.0 * a) + 1.0);
    let big = select(x < 0.0, -big, big);
    let y = select(a < 0.1, small, big);
    select(x.is_nan(), x, y)
}

#[inline(always)]
pub fn sigmoid<M: MulAdd>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<M>(-x))
}

#[inline(always)]
pub fn silu<M: MulAdd>(x: f32) -> f32 {
    select(x == f32::NEG_INFINITY, 0.0, x * sigmoid::<M>(x))
}

#[inline(always)]
pub fn gelu<M: MulAdd>(x: f32) -> f32 {
    select(
        x == f32::NEG_INFINITY,
        0.0,
        0.5 * x * (1.0 + erf_abs::<M>(x * FRAC_1_SQRT_2)),
    )
}

#[inline(always)]
pub fn gelu_tanh<M: MulAdd>(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    select(x == f32::NEG_INFINITY, 0.0, 0.5 * x * (1.0 + tanh::<M>(u)))
}

/// The derivative of each function at x, times g.
#[inline(always)]
fn grad<M: MulAdd>(op: Unary, x: f32, g: f32) -> f32 {
    match op {
        Unary::Exp => g * exp::<M>(x),
        Unary::Erf => g * FRAC_2_SQRT_PI * exp_gauss::<M>(-x * x) * select(x.is_nan(), x, 1.0),
        Unary::Tanh => {
            let t = tanh::<M>(x);
            g * (1.0 - t * t)
        }
        Unary::Sigmoid => {
            let s = sigmoid::<M>(x);
            g * s * (1.0 - s)
        }
        Unary::Silu => {
            let s = sigmoid::<M>(x);
            g * s * (1.0 + x * (1.0 - s))
        }
        Unary::Gelu => {
            let cdf = 0.5 * (1.0 + erf_abs::<M>(x * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp_gauss::<M>(-0.5 * x * x);
            g * (cdf + x * pdf)
        }
        Unary::GeluTanh => {
            let u = GELU_K * (x + GELU_C * x * x * x);
            let t = tanh::<M>(u);
            let du = GELU_K * (1.0 + 3.0 * GELU_C * x * x);
            g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
        }
    }
}

#[inline(always)]
fn value<M: MulAdd>(op: Unary, x: f32) -> f32 {
    match op {
        Unary::Exp => exp::<M>(x),
        Unary::Erf => erf::<M>(x),
        Unary::Tanh => tanh::<M>(x),
        Unary::Sigmoid => sigmoid::<M>(x),
        Unary::Silu => silu::<M>(x),
        Unary::Gelu => gelu::<M>(x),
        Unary::GeluTanh => gelu_tanh::<M>(x),
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// Runs `body(t, part)` over the parts of `per` elements of `dst` (`t` counting them):
/// over the pool when there are several, here when there is one (handing a lone task to
/// the pool costs a hand-over and gains nothing).
fn in_tasks<T: Send>(dst: &mut [T], per: usize, body: impl Fn(usize, &mut [T]) + Sync) {
    if per >= dst.len() {
        return body(0, dst);
    }
    dst.par_chunks_mut(per)
        .enumerate()
        .for_each(|(t, d)| body(t, d));
}

/// Runs `body` over aligned chunks of `dst` and `src` (and `src2`), in parallel when the
/// input is large.
fn chunked<F>(dst: &mut [Out], src: &[f32], src2: Option<&[f32]>, body: F)
where
    F: Fn(&mut [Out], &[f32], Option<&[f32]>) + Sync,
{
    in_tasks(dst, CHUNK, |i, d| {
        let s = &src[i * CHUNK..i * CHUNK + d.len()];
        let s2 = src2.map(|s2| &s2[i * CHUNK..i * CHUNK + d.len()]);
        body(d, s, s2)
    });
}

/// Instruction sets the kernels are compiled for, picked at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Generic,
    Avx2,
    Avx512,
}

/// The best level this CPU runs.
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2;
        }
    }
    Level::Generic
}

/// Defines `$dispatch(level, args)`, running the `#[inline(always)]` function `$generic`
/// compiled for that instruction set.
macro_rules! multiversion {
    ($generic:ident, $dispatch:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $dispatch(level: Level, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $generic::<$crate::math::Fused>($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $generic::<$crate::math::Fused>($($arg),*)
                }
                match level {
                    // SAFETY: `level()` found these instructions on this CPU.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Generic => {}
                }
            }
            let _ = level;
            #[cfg(target_arch = "aarch64")]
            return $generic::<$crate::math::Fused>($($arg),*);
            #[cfg(not(target_arch = "aarch64"))]
            $generic::<$crate::math::Separate>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[inline(always)]
fn forward_generic<M: MulAdd>(op: Unary, dst: &mut [Out], src: &[f32]) {
    // One loop per function, so each is vectorised on its own.
    macro_rules! each {
        ($($v:ident => $f:expr),*) => {
            match op {
                $(Unary::$v => {
                    for (d, &x) in dst.iter_mut().zip(src) {
                        d.write($f(x));
                    }
                })*
            }
        };
    }
    each!(Exp => exp::<M>, Erf => erf::<M>, Tanh => tanh::<M>, Sigmoid => sigmoid::<M>,
          Silu => silu::<M>, Gelu => gelu::<M>, GeluTanh => gelu_tanh::<M>);
}
multiversion!(forward_generic, forward_auto_at, (op: Unary, dst: &mut [Out], src: &[f32]));

/// `dst[i] = op(src[i])` at `level`: the register kernels of `act.rs` where they cover
/// the function, the compiled scalar code elsewhere.
fn forward_at(level: Level, op: Unary, dst: &mut [Out], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::act::covers(level, op) {
        return crate::act::forward(level, op, dst, src);
    }
    forward_auto_at(level, op, dst, src)
}

#[inline(always)]
fn backward_generic<M: MulAdd>(op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]) {
    macro_rules! each {
        ($($v:ident),*) => {
            match op {
                $(Unary::$v => {
                    for ((d, &x), &g) in dst.iter_mut().zip(x).zip(g) {
                        d.write(grad::<M>(Unary::$v, x, g));
                    }
                })*
            }
        };
    }
    each!(Exp, Erf, Tanh, Sigmoid, Silu, Gelu, GeluTanh);
}
multiversion!(backward_generic, backward_auto_at, (op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]));

/// `dst[i] = g[i] · op'(x[i])` at `level`, as [`forward_at`] picks.
fn backward_at(level: Level, op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::act::covers(level, op) {
        return crate::act::backward(level, op, dst, x, g);
    }
    backward_auto_at(level, op, dst, x, g)
}

/// `dst[i] = op(src[i])`.
pub fn forward(op: Unary, dst: &mut [f32], src: &[f32]) {
    forward_into(op, as_out(dst), src)
}

/// [`forward`] into memory that need not be initialised (a fresh output buffer).
pub fn forward_into(op: Unary, dst: &mut [Out], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let level = level();
    chunked(dst, src, None, |d, s, _| forward_at(level, op, d, s));
}

/// `dst[i] = g[i] · op'(x[i])`.
pub fn backward(op: Unary, dst: &mut [f32], x: &[f32], g: &[f32]) {
    backward_into(op, as_out(dst), x, g)
}

/// [`backward`] into memory that need not be initialised.
pub fn backward_into(op: Unary, dst: &mut [Out], x: &[f32], g: &[f32]) {
    assert_eq!(dst.len(), x.len());
    assert_eq!(dst.len(), g.len());
    let level = level();
    chunked(dst, x, Some(g), |d, x, g| {
        let g = g.expect("passed above");
        backward_at(level, op, d, x, g)
    });
}

/// [`backward`] written over the gradient `g` itself: `g[i] ← g[i] · op'(x[i])`, or
/// from the outputs `y` (in `x`'s place) for the functions whose derivative is a
/// function of the output ([`Unary::grad_from_output`]) when `from_output` is set.
/// Saves the output buffer (a fresh allocation, and its cache misses) when the
/// gradient is not needed afterwards.
pub fn backward_in_place(op: Unary, g: &mut [f32], x: &[f32], from_output: bool) {
    assert_eq!(g.len(), x.len());
    assert!(
        !from_output || op.grad_from_output(),
        "{} needs its input",
        op.name()
    );
    let level = level();
    let body = |g: &mut [f32], x: &[f32]| {
        // The kernels read g and write their output separately: each block of g is
        // read from a copy on the stack.
        let mut copy = [0f32; 1024];
        for (g, x) in g.chunks_mut(copy.len()).zip(x.chunks(copy.len())) {
            let copy = &mut copy[..g.len()];
            copy.copy_from_slice(g);
            if from_output {
                backward_from_output_at(level, op, as_out(g), x, copy)
            } else {
                backward_at(level, op, as_out(g), x, copy)
            }
        }
    };
    if g.len() <= CHUNK {
        return body(g, x);
    }
    g.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(g, x)| body(g, x));
}

// `multiversion!` hands every body the MulAdd type; this needs none.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn backward_from_output_generic<M: MulAdd>(op: Unary, dst: &mut [Out], y: &[f32], g: &[f32]) {
    macro_rules! each {
        ($f:expr) => {
            for ((d, &y), &g) in dst.iter_mut().zip(y).zip(g) {
                d.write($f(y, g));
            }
        };
    }
    match op {
        Unary::Exp => each!(|y: f32, g: f32| g * y),
        Unary::Sigmoid => each!(|y: f32, g: f32| g * y * (1.0 - y)),
        Unary::Tanh => each!(|y: f32, g: f32| g * (1.0 - y * y)),
        _ => panic!("{}'s derivative is not a function of its output", op.name()),
    }
}
multiversion!(backward_from_output_generic, backward_from_output_at, (op: Unary, dst: &mut [Out], y: &[f32], g: &[f32]));

/// `dst[i] = g[i] · op'(x[i])` from the outputs `y[i] = op(x[i])`, for the functions
/// whose derivative is a function of the output ([`Unary::grad_from_output`]).
pub fn backward_from_output_into(op: Unary, dst: &mut [Out], y: &[f32], g: &[f32]) {
    assert!(op.grad_from_output(), "{} needs its input", op.name());
    assert_eq!(dst.len(), y.len());
    assert_eq!(dst.len(), g.len());
    let level = level();
    chunked(dst, y, Some(g), |d, y, g| {
        let g = g.expect("passed above");
        backward_from_output_at(level, op, d, y, g)
    });
}

/// The single value, for tests and scalar callers.
pub fn scalar(op: Unary, x: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::act::covers(level(), op) {
        let mut y = [0.0];
        forward(op, &mut y, &[x]);
        return y[0];
    }
    if fused_here() {
        value::<Fused>(op, x)
    } else {
        value::<Separate>(op, x)
    }
}

/// The single derivative times g, for tests.
pub fn scalar_grad(op: Unary, x: f32, g: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::act::covers(level(), op) {
        let mut d = [0.0];
        backward(op, &mut d, &[x], &[g]);
        return d[0];
    }
    if fused_here() {
        grad::<Fused>(op, x, g)
    } else {
        grad::<Separate>(op, x, g)
    }
}

/// Whether the vector kernels on this CPU multiply-add in one rounding (as
/// `multiversion!` picks them), so the scalar functions can round the same way.
fn fused_here() -> bool {
    cfg!(target_arch = "aarch64") || level() != Level::Generic
}

// Softmax along rows of length `n`.

/// Lanes of the reductions: separate accumulators, so strict float order still lets the
/// compiler vectorise them.
const LANES: usize = 16;

/// The lanes folded by halves (8 + 8, 4 + 4, ...): vector operations, where a loop over
/// the 16 lanes would be 16 scalar steps, as many as the 64-wide tile row itself takes.
#[inline(always)]
pub(crate) fn fold_lanes(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = f(acc[i], acc[i + w]);
        }
        w /= 2;
    }
    acc[0]
}

#[inline(always)]
fn row_max(s: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = s.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = fold_lanes(acc, |a, b| if a > b { a } else { b });
    for &v in rest {
        m = if v > m { v } else { m };
    }
    m
}

/// `d[i] = e^(s[i] - m)`; returns their sum.
#[inline(always)]
fn exp_shifted<M: MulAdd>(d: &mut [Out], s: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = s.len() / LANES * LANES;
    for (dc, sc) in d[..n]
        .chunks_exact_mut(LANES)
        .zip(s[..n].chunks_exact(LANES))
    {
        for i in 0..LANES {
            let e = exp::<M>(sc[i] - m);
            dc[i].write(e);
            acc[i] += e;
        }
    }
    let mut sum = 0.0;
    for (o, &v) in d[n..].iter_mut().zip(&s[n..]) {
        let e = exp::<M>(v - m);
        o.write(e);
        sum += e;
    }
    fold_lanes(acc, |a, b| a + b) + sum
}

/// Sum of `a[i] · b[i]`.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len() / LANES * LANES;
    for (ac, bc) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ac[i] * bc[i];
        }
    }
    let rest: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    fold_lanes(acc, |a, b| a + b) + rest
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len() / LANES * LANES;
    for c in a[..n].chunks_exact(LANES) {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    fold_lanes(acc, |a, b| a + b) + a[n..].iter().sum::<f32>()
}

/// A NaN anywhere in a row makes its exponentials' sum NaN, and so the whole row.
/// With `causal = Some((lq, first))` the rows are those of `[lq, n]` score matrices,
/// starting at global row `first`: row i keeps its first `i + 1` entries (keys 0..=i,
/// burn's convention) and the rest are 0.
#[inline(always)]
fn softmax_rows_generic<M: MulAdd>(
    dst: &mut [Out],
    src: &[f32],
    n: usize,
    log: bool,
    causal: Option<(usize, usize)>,
) {
    for (r, (d, s)) in dst.chunks_exact_mut(n).zip(src.chunks_exact(n)).enumerate() {
        let valid = match causal {
            Some((lq, first)) => ((first + r) % lq + 1).min(n),
            None => n,
        };
        let (d, masked) = d.split_at_mut(valid);
        for o in masked.iter_mut() {
            o.write(if log { f32::NEG_INFINITY } else { 0.0 });
        }
        if valid == 0 {
            continue;
        }
        let s = &s[..valid];
        let m = row_max(s);
        let total = exp_shifted::<M>(d, s, m);
        // SAFETY: `exp_shifted` wrote every element of the row.
        let d = unsafe { assume_init(d) };
        if log {
            let shift = m + total.ln();
            for (o, &v) in d.iter_mut().zip(s) {
                *o = v - shift;
            }
        } else {
            let inv = 1.0 / total;
            for o in d.iter_mut() {
                *o *= inv;
            }
        }
    }
}
multiversion!(softmax_rows_generic, softmax_rows_at, (dst: &mut [Out], src: &[f32], n: usize, log: bool, causal: Option<(usize, usize)>));

#[inline(always)]
fn softmax_back_generic<M: MulAdd>(dst: &mut [Out], y: &[f32], g: &[f32], n: usize, log: bool) {
    for ((d, y), g) in dst
        .chunks_exact_mut(n)
        .zip(y.chunks_exact(n))
        .zip(g.chunks_exact(n))
    {
        if log {
            let s = sum(g);
            for ((o, &y), &g) in d.iter_mut().zip(y).zip(g) {
                o.write(g - exp::<M>(y) * s);
            }
        } else {
            let dot = dot(y, g);
            for ((o, &y), &g) in d.iter_mut().zip(y).zip(g) {
                o.write(y * (g - dot));
            }
        }
    }
}
multiversion!(softmax_back_generic, softmax_back_at, (dst: &mut [Out], y: &[f32], g: &[f32], n: usize, log: bool));

/// Rows per parallel task, at least one.
fn rows_per_task(n: usize) -> usize {
    (CHUNK / n.max(1)).max(1)
}

/// Softmax (or log-softmax) of each row of `n` values.
pub fn softmax(dst: &mut [f32], src: &[f32], n: usize, log: bool) {
    softmax_into(as_out(dst), src, n, log)
}

/// [`softmax`] into memory that need not be initialised.
pub fn softmax_into(dst: &mut [Out], src: &[f32], n: usize, log: bool) {
    softmax_masked_into(dst, src, n, log, None)
}

/// Softmax over the causal part of each row of `[.., lq, n]` score matrices (see
/// `softmax_rows_generic`); the masked entries are 0.
pub fn softmax_causal_into(dst: &mut [Out], src: &[f32], lq: usize, n: usize) {
    assert!(lq > 0);
    softmax_masked_into(dst, src, n, false, Some(lq))
}

fn softmax_masked_into(dst: &mut [Out], src: &[f32], n: usize, log: bool, lq: Option<usize>) {
    assert_eq!(dst.len(), src.len());
    assert!(n > 0 && src.len().is_multiple_of(n));
    let level = level();
    let per_task = rows_per_task(n);
    let per = per_task * n;
    in_tasks(dst, per, |t, d| {
        let s = &src[t * per..t * per + d.len()];
        let causal = lq.map(|lq| (lq, t * per_task));
        softmax_rows_at(level, d, s, n, log, causal)
    });
}

/// The gradient of [`softmax`] given its output `y` and the output's gradient `g`.
pub fn softmax_backward(dst: &mut [f32], y: &[f32], g: &[f32], n: usize, log: bool) {
    softmax_backward_into(as_out(dst), y, g, n, log)
}

/// [`softmax_backward`] into memory that need not be initialised.
pub fn softmax_backward_into(dst: &mut [Out], y: &[f32], g: &[f32], n: usize, log: bool) {
    assert!(dst.len() == y.len() && y.len() == g.len());
    assert!(n > 0 && y.len().is_multiple_of(n));
    let level = level();
    let per = rows_per_task(n) * n;
    in_tasks(dst, per, |t, d| {
        let part = t * per..t * per + d.len();
        softmax_back_at(level, d, &y[part.clone()], &g[part], n, log)
    });
}

/// [`softmax_backward`] written over the gradient `g` itself (see
/// [`backward_in_place`]).
pub fn softmax_backward_in_place(g: &mut [f32], y: &[f32], n: usize, log: bool) {
    assert!(y.len() == g.len());
    assert!(n > 0 && y.len().is_multiple_of(n));
    let level = level();
    let per = rows_per_task(n) * n;
    in_tasks(g, per, |t, g| {
        let y = &y[t * per..t * per + g.len()];
        // Each row of g is read from a copy (the kernel takes its input and output
        // apart): one row at a time, so the copy stays in the L1 cache.
        let mut copy = vec![0f32; n];
        for (g, y) in g.chunks_exact_mut(n).zip(y.chunks_exact(n)) {
            copy.copy_from_slice(g);
            softmax_back_at(level, as_out(g), y, &copy, n, log)
        }
    });
}

/// Adaptive modulation of `[G, N, D]` tokens by per-group rows: `out[g, n, :] =
/// x[g, n, :] · (1 + scale[g, :]) + shift[g, :]`.
pub fn modulate_into(dst: &mut [Out], x: &[f32], shift: &[f32], scale: &[f32], n: usize, d: usize) {
    let per = n * d;
    assert!(x.len() == dst.len() && x.len() == shift.len() / d * per && shift.len() == scale.len());
    dst.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .zip(shift.par_chunks(d).zip(scale.par_chunks(d)))
        .for_each(|((o, x), (sh, sc))| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                for i in 0..d {
                    orow[i].write(xrow[i] * (1.0 + sc[i]) + sh[i]);
                }
            }
        });
}

/// The gradients of [`modulate_into`] for `x` (into `dx`), `shift` and `scale` (summed
/// over the N tokens of each group, into `dshift` and `dscale`).
#[allow(clippy::too_many_arguments)]
pub fn modulate_backward_into(
    dx: &mut [Out],
    dshift: &mut [Out],
    dscale: &mut [Out],
    x: &[f32],
    scale: &[f32],
    g: &[f32],
    n: usize,
    d: usize,
) {
    let per = n * d;
    assert!(x.len() == g.len() && dx.len() == x.len() && dshift.len() == scale.len());
    dx.par_chunks_mut(per)
        .zip(dshift.par_chunks_mut(d).zip(dscale.par_chunks_mut(d)))
        .zip(
            x.par_chunks(per)
                .zip(g.par_chunks(per))
                .zip(scale.par_chunks(d)),
        )
        .for_each(|((dxg, (dsh, dsc)), ((xg, gg), sc))| {
            let mut sum_g = vec![0f32; d];
            let mut sum_gx = vec![0f32; d];
            for ((orow, xrow), grow) in dxg
                .chunks_exact_mut(d)
                .zip(xg.chunks_exact(d))
                .zip(gg.chunks_exact(d))
            {
                for i in 0..d {
                    orow[i].write(grow[i] * (1.0 + sc[i]));
                    sum_g[i] += grow[i];
                    sum_gx[i] += grow[i] * xrow[i];
                }
            }
            for i in 0..d {
                dsh[i].write(sum_g[i]);
                dsc[i].write(sum_gx[i]);
            }
        });
}
