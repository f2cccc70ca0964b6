//! 2-D max pooling (no dilation, padding that never wins) forward with the winning
//! positions, and the backward pass that routes each output gradient to its winner.

use rayon::prelude::*;

/// Shape of one pooling: `planes` = N·C images of `h × w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl PoolShape {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding[0] - self.kernel[0]) / self.stride[0] + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding[1] - self.kernel[1]) / self.stride[1] + 1
    }
    /// Whether the kernels handle it: every window overlaps the image.
    pub fn supported(&self) -> bool {
        self.kernel.iter().all(|&k| k > 0)
            && self.stride.iter().all(|&s| s > 0)
            && self.padding[0] < self.kernel[0]
            && self.padding[1] < self.kernel[1]
            && self.h + 2 * self.padding[0] >= self.kernel[0]
            && self.w + 2 * self.padding[1] >= self.kernel[1]
            && self.h * self.w <= u32::MAX as usize
    }
}

/// Max of each window, and the index (within its plane) of the element that won.
pub fn forward(s: &PoolShape, x: &[f32]) -> (Vec<f32>, Vec<u32>) {
    let (oh, ow) = (s.out_h(), s.out_w());
    let (plane, out_plane) = (s.h * s.w, oh * ow);
    assert_eq!(x.len(), s.planes * plane, "input does not match the shape");
    let mut y = vec![0f32; s.planes * out_plane];
    let mut idx = vec![0u32; s.planes * out_plane];
    if y.is_empty() {
        return (y, idx);
    }
    let [kh, kw] = s.kernel;
    let [sh, sw] = s.stride;
    let [ph, pw] = s.padding;
    y.par_chunks_mut(out_plane)
        .zip(idx.par_chunks_mut(out_plane))
        .zip(x.par_chunks(plane))
        .for_each(|((y, idx), x)| {
            for oy in 0..oh {
                let y0 = (oy * sh).saturating_sub(ph);
                let y1 = (oy * sh + kh - ph).min(s.h);
                for ox in 0..ow {
                    let x0 = (ox * sw).saturating_sub(pw);
                    let x1 = (ox * sw + kw - pw).min(s.w);
                    let mut best = y0 * s.w + x0;
                    let mut max = x[best];
                    for iy in y0..y1 {
                        let row = &x[iy * s.w..(iy + 1) * s.w];
                        for (ix, &v) in row.iter().enumerate().take(x1).skip(x0) {
                            // NaN wins, as it does in burn's and PyTorch's pools.
                            if v > max || v.is_nan() && !max.is_nan() {
                                max = v;
                                best = iy * s.w + ix;
                            }
                        }
                    }
                    y[oy * ow + ox] = max;
                    idx[oy * ow + ox] = best as u32;
                }
            }
        });
    (y, idx)
}

/// The input gradient: each output's gradient added at its winner.
pub fn backward(s: &PoolShape, grad: &[f32], idx: &[u32]) -> Vec<f32> {
    let (plane, out_plane) = (s.h * s.w, s.out_h() * s.out_w());
    assert_eq!(
        grad.len(),
        s.planes * out_plane,
        "gradient does not match the shape"
    );
    assert_eq!(idx.len(), grad.len());
    let mut dx = vec![0f32; s.planes * plane];
    if dx.is_empty() || grad.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(plane)
        .zip(grad.par_chunks(out_plane).zip(idx.par_chunks(out_plane)))
        .for_each(|(dx, (g, i))| {
            for (&g, &i) in g.iter().zip(i) {
                dx[i as usize] += g;
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(s: &PoolShape, x: &[f32]) -> Vec<f32> {
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut y = Vec::new();
        for p in 0..s.planes {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for i in 0..s.kernel[0] {
                        for j in 0..s.kernel[1] {
                            let (iy, ix) = (oy * s.stride[0] + i, ox * s.stride[1] + j);
                            if iy < s.padding[0] || ix < s.padding[1] {
                                continue;
                            }
                            let (iy, ix) = (iy - s.padding[0], ix - s.padding[1]);
                            if iy < s.h && ix < s.w {
                                m = m.max(x[(p * s.h + iy) * s.w + ix]);
                            }
                        }
                    }
                    y.push(m);
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_the_definition_and_backward_routes_to_the_winner() {
        let shapes = [
            PoolShape {
                planes: 3,
                h: 8,
                w: 8,
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            },
            PoolShape {
                planes: 2,
                h: 7,
                w: 5,
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
            },
            PoolShape {
                planes: 2,
                h: 6,
                w: 6,
                kernel: [2, 2],
                stride: [2, 2],
                padding: [0, 0],
            },
            PoolShape {
                planes: 1,
                h: 5,
                w: 9,
                kernel: [3, 2],
                stride: [1, 3],
                padding: [1, 0],
            },
        ];
        for s in shapes {
            assert!(s.supported());
            // Distinct values, so every window has one winner.
            let x: Vec<f32> = (0..s.planes * s.h * s.w)
                .map(|i| ((i * 7919) % 1009) as f32 - 500.0)
                .collect();
            let (y, idx) = forward(&s, &x);
            assert_eq!(y, naive(&s, &x), "{s:?}");
            let g: Vec<f32> = (0..y.len()).map(|i| i as f32 * 0.5 + 1.0).collect();
            let dx = backward(&s, &g, &idx);
            // Σ dx·x = Σ g·y exactly when each gradient lands on its window's maximum.
            let lhs: f64 = dx
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            let rhs: f64 = g
                .iter()
                .zip(&y)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            assert!(
                (lhs - rhs).abs() < 1e-6 * rhs.abs().max(1.0),
                "{s:?}: {lhs} vs {rhs}"
            );
            assert!((dx.iter().sum::<f32>() - g.iter().sum::<f32>()).abs() < 1e-3);
        }
    }
}
