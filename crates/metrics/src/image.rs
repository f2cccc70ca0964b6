//! PSNR and SSIM on RGB frames with values in [0, 1], computed in `f64`.
//!
//! SSIM follows Wang et al. (2004) with the settings the common references use
//! (scikit-image with `gaussian_weights=True`, pytorch-msssim): an 11×11 Gaussian window
//! with σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1, population (not sample) variances,
//! computed per channel and averaged over channels and over the positions where the window
//! fits inside the image (a 5-pixel border is left out).

use crate::{MetricsError, Result};

/// The PSNR reported for identical frames (MSE = 0), where the formula gives infinity.
pub const PSNR_CAP_DB: f64 = 100.0;

/// An RGB frame, row-major `[height, width, 3]`, values in [0, 1].
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub data: &'a [f32],
    pub height: usize,
    pub width: usize,
}

impl<'a> Frame<'a> {
    /// Checks that `data` holds `height × width × 3` values.
    pub fn new(data: &'a [f32], height: usize, width: usize) -> Result<Self> {
        if height == 0 || width == 0 || data.len() != height * width * 3 {
            return Err(MetricsError::Input(format!(
                "a {height}×{width} RGB frame needs {} values, got {}",
                height * width * 3,
                data.len()
            )));
        }
        Ok(Self {
            data,
            height,
            width,
        })
    }
}

/// 8-bit values as `f32` in [0, 1], the range [`Frame`] holds.
pub fn to_unit(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&x| x as f32 / 255.0).collect()
}

fn same_size(a: &Frame, b: &Frame) -> Result<()> {
    if (a.height, a.width) != (b.height, b.width) {
        return Err(MetricsError::Input(format!(
            "frames differ in size: {}×{} vs {}×{}",
            a.height, a.width, b.height, b.width
        )));
    }
    Ok(())
}

/// Mean squared error over all pixels and channels.
pub fn mse(a: &Frame, b: &Frame) -> Result<f64> {
    same_size(a, b)?;
    let sum: f64 = a
        .data
        .iter()
        .zip(b.data)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum();
    Ok(sum / a.data.len() as f64)
}

/// PSNR in dB for data range 1: `10 log10(1 / MSE)`, capped at [`PSNR_CAP_DB`].
pub fn psnr(a: &Frame, b: &Frame) -> Result<f64> {
    Ok(psnr_from_mse(mse(a, b)?))
}

/// `10 log10(1 / mse)`, capped at [`PSNR_CAP_DB`].
pub fn psnr_from_mse(mse: f64) -> f64 {
    if mse <= 0.0 {
        PSNR_CAP_DB
    } else {
        (10.0 * (1.0 / mse).log10()).min(PSNR_CAP_DB)
    }
}

/// Which pixels moved: those where some channel of `truth` differs from `before` (the
/// frame the motion is measured from) by more than `threshold`.
pub fn moved(truth: &Frame, before: &Frame, threshold: f64) -> Result<Vec<bool>> {
    same_size(truth, before)?;
    Ok(truth
        .data
        .chunks_exact(3)
        .zip(before.data.chunks_exact(3))
        .map(|(t, b)| {
            t.iter()
                .zip(b)
                .any(|(&x, &y)| (x as f64 - y as f64).abs() > threshold)
        })
        .collect())
}

/// The squared error of `pred` against `truth` summed over the pixels (all three
/// channels of each) that `mask` marks, and how many it marks.
pub fn masked_sse(pred: &Frame, truth: &Frame, mask: &[bool]) -> Result<(f64, usize)> {
    same_size(pred, truth)?;
    if mask.len() != pred.height * pred.width {
        return Err(MetricsError::Input(format!(
            "a mask of {} pixels for {}×{} frames",
            mask.len(),
            pred.height,
            pred.width
        )));
    }
    let (mut sse, mut n) = (0.0, 0);
    for ((p, t), _) in pred
        .data
        .chunks_exact(3)
        .zip(truth.data.chunks_exact(3))
        .zip(mask)
        .filter(|(_, &m)| m)
    {
        sse += p
            .iter()
            .zip(t)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>();
        n += 1;
    }
    Ok((sse, n))
}

/// Where a scene moved: [`masked_sse`] over the pixels [`moved`] from `before` to
/// `truth`. Summed over frames and turned into a PSNR with [`psnr_from_mse`] it scores
/// only what changed, which whole-frame PSNR dilutes when the moving part is a few
/// percent of the image.
pub fn moving_sse(
    pred: &Frame,
    truth: &Frame,
    before: &Frame,
    threshold: f64,
) -> Result<(f64, usize)> {
    masked_sse(pred, truth, &moved(truth, before, threshold)?)
}

const WIN: usize = 11;
const SIGMA: f64 = 1.5;
const C1: f64 = 0.01 * 0.01;
const C2: f64 = 0.03 * 0.03;

fn gaussian() -> [f64; WIN] {
    let mut g = [0.0; WIN];
    let r = (WIN / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - r;
        *v = (-x * x / (2.0 * SIGMA * SIGMA)).exp();
    }
    let s: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= s);
    g
}

/// Separable Gaussian filter over the positions where the whole window fits ("valid"):
/// `[h, w]` in, `[h - 10, w - 10]` out.
fn filter_valid(img: &[f64], h: usize, w: usize, g: &[f64; WIN]) -> Vec<f64> {
    let (oh, ow) = (h - WIN + 1, w - WIN + 1);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        for x in 0..ow {
            let base = y * w + x;
            rows[y * ow + x] = (0..WIN).map(|k| g[k] * img[base + k]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..WIN).map(|k| g[k] * rows[(y + k) * ow + x]).sum();
        }
    }
    out
}

/// Mean SSIM over channels and window positions. Frames must be at least 11×11.
pub fn ssim(a: &Frame, b: &Frame) -> Result<f64> {
    same_size(a, b)?;
    let (h, w) = (a.height, a.width);
    if h < WIN || w < WIN {
        return Err(MetricsError::Input(format!(
            "SSIM needs frames of at least {WIN}×{WIN}, got {h}×{w}"
        )));
    }
    let g = gaussian();
    let mut total = 0.0;
    for c in 0..3 {
        let x: Vec<f64> = (0..h * w).map(|i| a.data[i * 3 + c] as f64).collect();
        let y: Vec<f64> = (0..h * w).map(|i| b.data[i * 3 + c] as f64).collect();
        let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
        let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
        let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
        let mx = filter_valid(&x, h, w, &g);
        let my = filter_valid(&y, h, w, &g);
        let mxx = filter_valid(&xx, h, w, &g);
        let myy = filter_valid(&yy, h, w, &g);
        let mxy = filter_valid(&xy, h, w, &g);
        let mut sum = 0.0;
        for i in 0..mx.len() {
            let (ux, uy) = (mx[i], my[i]);
            let vx = mxx[i] - ux * ux;
            let vy = myy[i] - uy * uy;
            let cxy = mxy[i] - ux * uy;
            sum += ((2.0 * ux * uy + C1) * (2.0 * cxy + C2))
                / ((ux * ux + uy * uy + C1) * (vx + vy + C2));
        }
        total += sum / mx.len() as f64;
    }
    Ok(total / 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Vec<f32> {
        (0..h * w * 3)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn identical_frames_score_perfectly() {
        let v = ramp(16, 20);
        let f = Frame::new(&v, 16, 20).unwrap();
        assert_eq!(psnr(&f, &f).unwrap(), PSNR_CAP_DB);
        assert!((ssim(&f, &f).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn moving_error_counts_only_changed_pixels() {
        // 4×4 frames; the truth moved two pixels away from `before` (one in one channel
        // by 0.5, one by less than the threshold, which does not count).
        let before = vec![0.2f32; 4 * 4 * 3];
        let mut truth = before.clone();
        truth[5 * 3 + 1] = 0.7; // pixel 5, green
        truth[9 * 3] = 0.25; // pixel 9, red: moved by 0.05
                             // The prediction copies `before`, plus an error on a still pixel, which is
                             // ignored.
        let mut pred = before.clone();
        pred[0] = 1.0;
        fn f(v: &[f32]) -> Frame<'_> {
            Frame::new(v, 4, 4).unwrap()
        }
        let (sse, n) = moving_sse(&f(&pred), &f(&truth), &f(&before), 0.1).unwrap();
        assert_eq!(n, 1);
        assert!((sse - 0.25).abs() < 1e-6, "{sse}");
        // Predicting the truth leaves no error where it moved.
        let (sse, n) = moving_sse(&f(&truth), &f(&truth), &f(&before), 0.1).unwrap();
        assert_eq!((sse, n), (0.0, 1));
        let small = vec![0.0f32; 2 * 2 * 3];
        assert!(moving_sse(
            &f(&pred),
            &f(&truth),
            &Frame::new(&small, 2, 2).unwrap(),
            0.1
        )
        .is_err());
    }

    #[test]
    fn psnr_of_a_known_error() {
        let a = vec![0.5f32; 12 * 12 * 3];
        let b = vec![0.6f32; 12 * 12 * 3];
        let (fa, fb) = (
            Frame::new(&a, 12, 12).unwrap(),
            Frame::new(&b, 12, 12).unwrap(),
        );
        // MSE 0.01 → 20 dB
        assert!((psnr(&fa, &fb).unwrap() - 20.0).abs() < 1e-4);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let v = ramp(8, 8);
        assert!(Frame::new(&v, 8, 9).is_err());
        let f = Frame::new(&v, 8, 8).unwrap();
        assert!(ssim(&f, &f)
            .unwrap_err()
            .to_string()
            .contains("at least 11"));
        let w = ramp(12, 12);
        let g = Frame::new(&w, 12, 12).unwrap();
        assert!(psnr(&f, &g)
            .unwrap_err()
            .to_string()
            .contains("differ in size"));
    }
}
