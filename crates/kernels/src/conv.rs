//! 2-D convolution (stride 1, zero padding, no dilation or groups) as im2col + GEMM,
//! forward and backward, on plain f32 slices in NCHW layout.
//!
//! Images are processed in groups whose unfolded columns together span at least
//! [`MIN_COLS`], so the late, small feature maps still make matrix products large enough
//! for the GEMM kernels; groups run in parallel.

use crate::math::{fill_new, Out};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::cell::RefCell;

/// Shape of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    /// Zero padding on each side (rows, columns).
    pub ph: usize,
    pub pw: usize,
}

/// Columns per GEMM below which images are grouped.
const MIN_COLS: usize = 1024;

impl ConvShape {
    pub fn out_h(&self) -> usize {
        self.h + 2 * self.ph + 1 - self.kh
    }
    pub fn out_w(&self) -> usize {
        self.w + 2 * self.pw + 1 - self.kw
    }
    /// Rows of the unfolded input (`C·kh·kw`).
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Output positions per image.
    fn l(&self) -> usize {
        self.out_h() * self.out_w()
    }
    fn group(&self) -> usize {
        (MIN_COLS / self.l().max(1)).clamp(1, self.n.max(1))
    }
}

/// Unfolds images `x` (`g` of them, each `[C, H, W]`) into `col` `[K, g·L]`.
fn im2col(s: &ConvShape, x: &[f32], g: usize, col: &mut [f32]) {
    let (oh, ow, l) = (s.out_h(), s.out_w(), s.l());
    let cols = g * l;
    let plane = s.h * s.w;
    for c in 0..s.c {
        for i in 0..s.kh {
            for j in 0..s.kw {
                let r = (c * s.kh + i) * s.kw + j;
                let row = &mut col[r * cols..(r + 1) * cols];
                // Output columns whose input column is inside the image.
                let x_lo = s.pw.saturating_sub(j).min(ow);
                let x_hi = (s.w + s.pw).saturating_sub(j).min(ow).max(x_lo);
                for img in 0..g {
                    let src = &x[(img * s.c + c) * plane..(img * s.c + c + 1) * plane];
                    let dst = &mut row[img * l..(img + 1) * l];
                    for oy in 0..oh {
                        let out = &mut dst[oy * ow..(oy + 1) * ow];
                        let iy = oy + i;
                        if iy < s.ph || iy - s.ph >= s.h {
                            out.fill(0.0);
                            continue;
                        }
                        let src_row = &src[(iy - s.ph) * s.w..(iy - s.ph + 1) * s.w];
                        out[..x_lo].fill(0.0);
                        out[x_hi..].fill(0.0);
                        let ix0 = x_lo + j - s.pw;
                        out[x_lo..x_hi].copy_from_slice(&src_row[ix0..ix0 + (x_hi - x_lo)]);
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds the columns `col` `[K, g·L]` into images `dx`.
fn col2im(s: &ConvShape, col: &[f32], g: usize, dx: &mut [f32]) {
    let (oh, ow, l) = (s.out_h(), s.out_w(), s.l());
    let cols = g * l;
    let plane = s.h * s.w;
    for c in 0..s.c {
        for i in 0..s.kh {
            for j in 0..s.kw {
                let r = (c * s.kh + i) * s.kw + j;
                let row = &col[r * cols..(r + 1) * cols];
                let x_lo = s.pw.saturating_sub(j).min(ow);
                let x_hi = (s.w + s.pw).saturating_sub(j).min(ow).max(x_lo);
                for img in 0..g {
                    let dst = &mut dx[(img * s.c + c) * plane..(img * s.c + c + 1) * plane];
                    let src = &row[img * l..(img + 1) * l];
                    for oy in 0..oh {
                        let iy = oy + i;
                        if iy < s.ph || iy - s.ph >= s.h {
                            continue;
                        }
                        let ix0 = x_lo + j - s.pw;
                        let d = &mut dst
                            [(iy - s.ph) * s.w + ix0..(iy - s.ph) * s.w + ix0 + (x_hi - x_lo)];
                        for (a, b) in d.iter_mut().zip(&src[oy * ow + x_lo..oy * ow + x_hi]) {
                            *a += *b;
                        }
                    }
                }
            }
        }
    }
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]` with explicit row and column strides; `dst` is
/// row-major with row stride `dst_rs`. With `accumulate` its values must be initialised.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [Out],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(Out::new(0.0));
            }
        }
        return;
    }
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above keep every index the strides reach inside the slices;
    // `dst` does not alias the inputs (it is a `&mut`), and gemm only writes finished
    // values into it (reading it only when accumulating).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr() as *mut f32,
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Views initialised floats as slots (for [`matmul`]'s destination).
fn slots(v: &mut [f32]) -> &mut [Out] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and every value written
    // through the view is an initialised f32.
    unsafe { &mut *(v as *mut [f32] as *mut [Out]) }
}

thread_local! {
    /// Per-thread work buffers (unfolded columns, gathered output gradients), kept
    /// between calls so their pages are not faulted in and zeroed every time.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `y = conv(x, w) + bias` for `x` `[N, C, H, W]`, `w` `[O, C, kh, kw]`, `bias` `[O]`;
/// returns `y` `[N, O, out_h, out_w]`.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, l) = (s.k(), s.l());
    assert_eq!(
        x.len(),
        s.n * s.c * s.h * s.w,
        "input does not match the shape"
    );
    assert_eq!(w.len(), s.o * k, "weight does not match the shape");
    // The bias rides along as one more column of the weight against a row of ones.
    let ka = k + 1;
    let mut wa = vec![0f32; s.o * ka];
    for o in 0..s.o {
        wa[o * ka..o * ka + k].copy_from_slice(&w[o * k..(o + 1) * k]);
        wa[o * ka + k] = bias.map_or(0.0, |b| b[o]);
    }
    let g = s.group();
    let img_in = s.c * s.h * s.w;
    let img_out = s.o * l;
    fill_new(s.n * img_out, |y| {
        if y.is_empty() {
            return;
        }
        y.par_chunks_mut(g * img_out)
            .zip(x.par_chunks(g * img_in))
            .for_each(|(y, x)| {
                let g = x.len() / img_in.max(1);
                let cols = g * l;
                SCRATCH.with(|sc| {
                    let sc = &mut *sc.borrow_mut();
                    let col = sized(&mut sc.0, ka * cols);
                    im2col(s, x, g, col);
                    col[k * cols..].fill(1.0);
                    for img in 0..g {
                        matmul(
                            s.o,
                            l,
                            ka,
                            &mut y[img * img_out..(img + 1) * img_out],
                            l,
                            false,
                            &wa,
                            (ka, 1),
                            &col[img * l..],
                            (cols, 1),
                        );
                    }
                });
            });
    })
}

/// Gradients of [`forward`] for its input, weight and bias, from the output gradient
/// `dy` `[N, O, out_h, out_w]`.
pub fn backward(s: &ConvShape, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (k, l) = (s.k(), s.l());
    assert_eq!(
        dy.len(),
        s.n * s.o * l,
        "output gradient does not match the shape"
    );
    let img_in = s.c * s.h * s.w;
    let mut dx = vec![0f32; x.len()];
    if dx.is_empty() || dy.is_empty() {
        return (dx, vec![0.0; w.len()], vec![0.0; s.o]);
    }
    let g = s.group();
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(g * img_in)
        .zip(x.par_chunks(g * img_in))
        .zip(dy.par_chunks(g * s.o * l))
        .map(|((dx, x), dy)| {
            let g = x.len() / img_in.max(1);
            let cols = g * l;
            SCRATCH.with(|sc| {
                let sc = &mut *sc.borrow_mut();
                let col = sized(&mut sc.0, k * cols);
                im2col(s, x, g, col);
                // dY as [O, g·L].
                let dyg = sized(&mut sc.1, s.o * cols);
                let mut db = vec![0f32; s.o];
                for img in 0..g {
                    for o in 0..s.o {
                        let src = &dy[(img * s.o + o) * l..(img * s.o + o + 1) * l];
                        dyg[o * cols + img * l..o * cols + (img + 1) * l].copy_from_slice(src);
                        db[o] += sum(src);
                    }
                }
                // dW = dY · colᵀ.
                let mut dw = vec![0f32; s.o * k];
                matmul(
                    s.o,
                    k,
                    cols,
                    slots(&mut dw),
                    k,
                    false,
                    dyg,
                    (cols, 1),
                    col,
                    (1, cols),
                );
                // dcol = Wᵀ · dY, into `col`.
                matmul(
                    k,
                    cols,
                    s.o,
                    slots(col),
                    cols,
                    false,
                    w,
                    (1, k),
                    dyg,
                    (cols, 1),
                );
                col2im(s, col, g, dx);
                (dw, db)
            })
        })
        .collect();
    let mut dw = vec![0f32; s.o * k];
    let mut db = vec![0f32; s.o];
    for (pw, pb) in partials {
        for (a, b) in dw.iter_mut().zip(pw) {
            *a += b;
        }
        for (a, b) in db.iter_mut().zip(pb) {
            *a += b;
        }
    }
    (dx, dw, db)
}

/// A sum in eight lanes (vectorises, unlike a sequential fold).
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, b) in acc.iter_mut().zip(c) {
            *a += b;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution, the definition.
    fn naive(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut y = vec![0f32; s.n * s.o * oh * ow];
        for n in 0..s.n {
            for o in 0..s.o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = b[o] as f64;
                        for c in 0..s.c {
                            for i in 0..s.kh {
                                for j in 0..s.kw {
                                    let (iy, ix) = (oy + i, ox + j);
                                    if iy < s.ph
                                        || ix < s.pw
                                        || iy - s.ph >= s.h
                                        || ix - s.pw >= s.w
                                    {
                                        continue;
                                    }
                                    acc += (x[((n * s.c + c) * s.h + iy - s.ph) * s.w + ix - s.pw]
                                        * w[((o * s.c + c) * s.kh + i) * s.kw + j])
                                        as f64;
                                }
                            }
                        }
                        y[((n * s.o + o) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 97)
                    >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn shapes() -> Vec<ConvShape> {
        let s = |n, c, h, w, o, kh, kw, ph, pw| ConvShape {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            ph,
            pw,
        };
        vec![
            s(3, 2, 5, 7, 4, 3, 3, 1, 1),
            s(2, 3, 6, 6, 2, 3, 3, 0, 0),
            s(5, 1, 4, 3, 3, 1, 1, 0, 0),
            s(2, 2, 3, 5, 3, 3, 5, 2, 1),
            // Many small images: grouped.
            s(40, 3, 4, 4, 5, 3, 3, 1, 1),
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for s in shapes() {
            let x = values(s.n * s.c * s.h * s.w, 1);
            let w = values(s.o * s.c * s.kh * s.kw, 2);
            let b = values(s.o, 3);
            let got = forward(&s, &x, &w, Some(&b));
            let want = naive(&s, &x, &w, &b);
            assert_eq!(got.len(), want.len());
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{s:?}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_of_the_definition() {
        for s in shapes() {
            let x = values(s.n * s.c * s.h * s.w, 4);
            let w = values(s.o * s.c * s.kh * s.kw, 5);
            let b = values(s.o, 6);
            let dy = values(s.n * s.o * s.out_h() * s.out_w(), 7);
            let (dx, dw, db) = backward(&s, &x, &w, &dy);
            // The loss Σ dy·y is linear in each argument, so a unit step gives the exact
            // derivative (up to rounding).
            let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
                naive(&s, x, w, b)
                    .iter()
                    .zip(&dy)
                    .map(|(a, b)| (a * b) as f64)
                    .sum()
            };
            let base = loss(&x, &w, &b);
            for idx in (0..x.len()).step_by(7) {
                let mut x2 = x.clone();
                x2[idx] += 1.0;
                let d = loss(&x2, &w, &b) - base;
                assert!(
                    (d - dx[idx] as f64).abs() < 1e-3,
                    "{s:?} dx[{idx}]: {} vs {d}",
                    dx[idx]
                );
            }
            for idx in 0..w.len() {
                let mut w2 = w.clone();
                w2[idx] += 1.0;
                let d = loss(&x, &w2, &b) - base;
                assert!(
                    (d - dw[idx] as f64).abs() < 1e-3,
                    "{s:?} dw[{idx}]: {} vs {d}",
                    dw[idx]
                );
            }
            for idx in 0..b.len() {
                let mut b2 = b.clone();
                b2[idx] += 1.0;
                let d = loss(&x, &w, &b2) - base;
                assert!(
                    (d - db[idx] as f64).abs() < 1e-3,
                    "{s:?} db[{idx}]: {} vs {d}",
                    db[idx]
                );
            }
        }
    }
}
