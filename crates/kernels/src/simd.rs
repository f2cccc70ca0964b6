//! One vector register of f32 lanes, for kernels written once over AVX2's `__m256` and
//! AVX-512's `__m512` (register-tiled products in `tile.rs`, the softmax exponentials
//! in `flash.rs`, sigmoid, SiLU and GELU in `act.rs`).
//!
//! Every method is `#[inline(always)]` and `unsafe`: a kernel calls them from inside a
//! function compiled with `#[target_feature]` for the register's instruction set, on a
//! CPU where `math::level()` found it.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// A vector register of `LANES` f32 values.
pub(crate) trait Reg: Copy {
    const LANES: usize;
    /// All lanes 0.
    unsafe fn zero() -> Self;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self;
    /// `LANES` values from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// The lanes to `p` (unaligned).
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    /// `self · b + c`, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// The lane-wise maximum; `b`'s lane where either is NaN.
    unsafe fn max(self, b: Self) -> Self;
    /// The lane-wise minimum; `b`'s lane where either is NaN.
    unsafe fn min(self, b: Self) -> Self;
    /// `|self|` per lane.
    unsafe fn abs(self) -> Self;
    /// `self` in the lanes where `x`'s sign bit is set (negative numbers, −0 and
    /// negative NaNs), `b` elsewhere.
    unsafe fn where_negative(self, x: Self, b: Self) -> Self;
    /// 0 in the lanes where `t > limit`, `self` elsewhere (where `t` is NaN too).
    unsafe fn zero_where_above(self, t: Self, limit: f32) -> Self;
    /// 0 in the lanes where `t < limit`, `self` elsewhere (where `t` is NaN too).
    unsafe fn zero_where_below(self, t: Self, limit: f32) -> Self;
    /// `1 / self` from the hardware's estimate (12 bits on AVX2, 14 on AVX-512) and one
    /// Newton step: relative error below 3e-7 for normal results; NaN stays NaN; +∞
    /// gives NaN (the Newton step multiplies ∞ by 0), so callers keep inputs finite.
    unsafe fn recip(self) -> Self;
    /// Whether a lane is NaN.
    unsafe fn has_nan(self) -> bool;
    /// The largest lane (of lanes that are not NaN).
    unsafe fn reduce_max(self) -> f32;
    /// The sum of the lanes.
    unsafe fn reduce_add(self) -> f32;
    /// Lane 0.
    unsafe fn first(self) -> f32;
    /// `2^t` per lane, relative error below 2e-7 for −126 < t ≤ 127; exactly 0 for
    /// t ≤ −126 (no subnormal results: their microcode assists made causal attention
    /// twice as slow) and for −∞; NaN stays NaN. `e^t` is `2^(t · log2 e)`; the
    /// softmax folds that factor into its score scale.
    ///
    /// The integer part `n` of t is rounded off, `2^f` on `|f| ≤ ½` is its degree-6
    /// Taylor polynomial (relative error below 1.3e-7), and `2^n` is applied to it: about
    /// 12 instructions per vector where the portable `math::exp` takes about 28 (its range
    /// selects and bit tricks).
    unsafe fn exp2(self) -> Self;
}

/// The Taylor coefficients of `2^f = Σ (f ln 2)^i / i!`, i ≤ 6.
const EXP2: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
];

/// `c[0] + c[1] s + c[2] s² + …` by Horner's rule.
#[inline(always)]
pub(crate) unsafe fn poly<R: Reg>(c: &[f32], s: R) -> R {
    // SAFETY: the caller enabled `R`'s instructions.
    unsafe {
        let (last, rest) = c.split_last().expect("a polynomial has a coefficient");
        let mut acc = R::splat(*last);
        for &k in rest.iter().rev() {
            acc = acc.mul_add(s, R::splat(k));
        }
        acc
    }
}

impl Reg for __m256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller enabled AVX2 (see the module).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: as above; the caller keeps `p..p + 8` inside one slice.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: the caller enabled FMA with AVX2.
        unsafe { _mm256_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // SAFETY: the caller enabled AVX2.
        unsafe { _mm256_max_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_min_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self) }
    }
    #[inline(always)]
    unsafe fn where_negative(self, x: Self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm256_blendv_ps(b, self, x) }
    }
    #[inline(always)]
    unsafe fn zero_where_above(self, t: Self, limit: f32) -> Self {
        // SAFETY: as above.
        unsafe {
            // All ones where t ≤ limit or t is NaN (not-greater, true when unordered).
            let keep = _mm256_cmp_ps::<_CMP_NGT_UQ>(t, _mm256_set1_ps(limit));
            _mm256_and_ps(self, keep)
        }
    }
    #[inline(always)]
    unsafe fn zero_where_below(self, t: Self, limit: f32) -> Self {
        // SAFETY: as above.
        unsafe {
            // All ones where t ≥ limit or t is NaN (not-less, true when unordered).
            let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(t, _mm256_set1_ps(limit));
            _mm256_and_ps(self, keep)
        }
    }
    #[inline(always)]
    unsafe fn recip(self) -> Self {
        // SAFETY: as above.
        unsafe {
            let r = _mm256_rcp_ps(self);
            // r + r (1 − d r): the estimate's relative error ε becomes ε².
            _mm256_fmadd_ps(r, _mm256_fnmadd_ps(self, r, _mm256_set1_ps(1.0)), r)
        }
    }
    #[inline(always)]
    unsafe fn has_nan(self) -> bool {
        // SAFETY: as above.
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(self, self)) != 0 }
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        // SAFETY: as above.
        unsafe {
            let x = _mm_max_ps(
                _mm256_castps256_ps128(self),
                _mm256_extractf128_ps::<1>(self),
            );
            let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_max_ss(x, _mm_movehdup_ps(x));
            _mm_cvtss_f32(x)
        }
    }
    #[inline(always)]
    unsafe fn reduce_add(self) -> f32 {
        // SAFETY: as above.
        unsafe {
            let x = _mm_add_ps(
                _mm256_castps256_ps128(self),
                _mm256_extractf128_ps::<1>(self),
            );
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_add_ss(x, _mm_movehdup_ps(x));
            _mm_cvtss_f32(x)
        }
    }
    #[inline(always)]
    unsafe fn first(self) -> f32 {
        // SAFETY: as above.
        unsafe { _mm256_cvtss_f32(self) }
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // SAFETY: as above.
        unsafe {
            // Lanes above −126, or NaN (the comparison is true when unordered).
            let normal = _mm256_cmp_ps::<_CMP_NLE_UQ>(self, _mm256_set1_ps(-126.0));
            // Clamped to [−127, 128] for the exponent bits below; NaN stays (the second
            // operand is returned when either is NaN).
            let t = _mm256_max_ps(_mm256_set1_ps(-127.0), self);
            let t = _mm256_min_ps(_mm256_set1_ps(128.0), t);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let p = poly(&EXP2, _mm256_sub_ps(t, n));
            // 2^n from its exponent bits: n + 127 in 0..=255 (255: +∞).
            let bits = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            let pow = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits));
            // A NaN lane's polynomial is NaN, and so is its product.
            _mm256_and_ps(_mm256_mul_ps(p, pow), normal)
        }
    }
}

impl Reg for __m512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller enabled AVX-512 (see the module).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: as above; the caller keeps `p..p + 16` inside one slice.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(p, self) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_fmadd_ps(self, b, c) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // SAFETY: the caller enabled AVX-512.
        unsafe { _mm512_max_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_min_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: as above.
        unsafe { _mm512_abs_ps(self) }
    }
    #[inline(always)]
    unsafe fn where_negative(self, x: Self, b: Self) -> Self {
        // SAFETY: as above (AVX-512 DQ for the sign-bit mask).
        unsafe { _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(x)), b, self) }
    }
    #[inline(always)]
    unsafe fn zero_where_above(self, t: Self, limit: f32) -> Self {
        // SAFETY: as above.
        unsafe {
            // Set where t ≤ limit or t is NaN (not-greater, true when unordered).
            let keep = _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(t, _mm512_set1_ps(limit));
            _mm512_maskz_mov_ps(keep, self)
        }
    }
    #[inline(always)]
    unsafe fn zero_where_below(self, t: Self, limit: f32) -> Self {
        // SAFETY: as above.
        unsafe {
            // Set where t ≥ limit or t is NaN (not-less, true when unordered).
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(t, _mm512_set1_ps(limit));
            _mm512_maskz_mov_ps(keep, self)
        }
    }
    #[inline(always)]
    unsafe fn recip(self) -> Self {
        // SAFETY: as above.
        unsafe {
            let r = _mm512_rcp14_ps(self);
            // r + r (1 − d r): the estimate's relative error ε becomes ε².
            _mm512_fmadd_ps(r, _mm512_fnmadd_ps(self, r, _mm512_set1_ps(1.0)), r)
        }
    }
    #[inline(always)]
    unsafe fn has_nan(self) -> bool {
        // SAFETY: as above.
        unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self, self) != 0 }
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        // SAFETY: as above.
        unsafe { _mm512_reduce_max_ps(self) }
    }
    #[inline(always)]
    unsafe fn reduce_add(self) -> f32 {
        // SAFETY: as above.
        unsafe { _mm512_reduce_add_ps(self) }
    }
    #[inline(always)]
    unsafe fn first(self) -> f32 {
        // SAFETY: as above.
        unsafe { _mm512_cvtss_f32(self) }
    }
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // SAFETY: as above.
        unsafe {
            // Lanes above −126, or NaN (the comparison is true when unordered).
            let normal = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(self, _mm512_set1_ps(-126.0));
            // max(lo, t): t when t is NaN (the second operand wins), so NaN carries on.
            let t = _mm512_max_ps(_mm512_set1_ps(-127.0), self);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let p = poly(&EXP2, _mm512_sub_ps(t, n));
            _mm512_maskz_scalef_ps(normal, p, n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `2^t` on every lane of `R`, for `t` in `ts` (a multiple of `R::LANES` long).
    ///
    /// # Safety
    /// The CPU must have `R`'s instructions, enabled by the caller.
    #[inline(always)]
    unsafe fn exp2_all<R: Reg>(ts: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; ts.len()];
        for (t, o) in ts
            .chunks_exact(R::LANES)
            .zip(out.chunks_exact_mut(R::LANES))
        {
            // SAFETY: the chunks are `LANES` long; the caller enabled `R`.
            unsafe { R::load(t.as_ptr()).exp2().store(o.as_mut_ptr()) };
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp2_avx2(ts: &[f32]) -> Vec<f32> {
        // SAFETY: the caller found AVX2 and FMA.
        unsafe { exp2_all::<__m256>(ts) }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn exp2_avx512(ts: &[f32]) -> Vec<f32> {
        // SAFETY: the caller found AVX-512.
        unsafe { exp2_all::<__m512>(ts) }
    }

    fn check(name: &str, ts: &[f32], got: &[f32]) {
        for (&t, &y) in ts.iter().zip(got) {
            if t.is_nan() {
                assert!(y.is_nan(), "{name}: 2^NaN gave {y}");
            } else if t <= -126.0 {
                assert_eq!(y.to_bits(), 0, "{name}: 2^{t} gave {y}, not exactly 0");
            } else {
                let want = 2f64.powf(t as f64);
                let rel = ((y as f64 - want) / want).abs();
                assert!(
                    rel < 2e-7,
                    "{name}: 2^{t} gave {y}, want {want} (rel {rel:e})"
                );
            }
        }
    }

    #[test]
    fn exp2_is_within_2e_7_of_f64_and_exactly_0_below_2_to_the_minus_126() {
        let mut ts: Vec<f32> = (0..=(257 * 64))
            .map(|i| -130.0 + i as f32 / 64.0 + 0.003)
            .filter(|&t| t <= 127.0)
            .collect();
        ts.extend([
            f32::NAN,
            f32::NEG_INFINITY,
            -126.0,
            -125.999_99,
            -125.5,
            -0.5,
            0.5,
            0.0,
            -0.0,
            127.0,
            -1e-30,
            -1000.0,
            -f32::MAX,
        ]);
        while !ts.len().is_multiple_of(16) {
            ts.push(1.0);
        }
        let mut ran = 0;
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: checked just above.
            check("AVX2", &ts, &unsafe { exp2_avx2(&ts) });
            ran += 1;
        }
        if crate::math::level() == crate::math::Level::Avx512 {
            // SAFETY: `level()` found AVX-512.
            check("AVX-512", &ts, &unsafe { exp2_avx512(&ts) });
            ran += 1;
        }
        if ran == 0 {
            eprintln!("exp2: this CPU has neither AVX2 nor AVX-512; nothing to check");
        }
    }
}
