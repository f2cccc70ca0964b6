//! LPIPS (Zhang et al., 2018) with the AlexNet backbone and the v0.1 linear heads, the
//! variant the video-prediction literature reports. Weights come from the `lpips` asset.
//!
//! Inputs are `[N, 3, H, W]` images in [-1, 1]; the distance of each pair is
//! `Σ_l mean_{h,w} w_l · (φ̂_l(x) − φ̂_l(y))²`, where φ̂_l are the five ReLU outputs of
//! AlexNet's convolutions normalised to unit length over channels.

use crate::pickle::Array;
use crate::weights::{conv2d_weight, load_pickle, take};
use crate::{MetricsError, Result};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use std::path::Path;

/// Input scaling of the reference implementation: `(x - shift) / scale`.
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];
const EPS: f32 = 1e-10;
/// (kernel, stride, padding) of AlexNet's five convolutions.
const CONVS: [(usize, usize, usize); 5] = [(11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)];

struct Conv<B: Backend> {
    w: Tensor<B, 4>,
    b: Tensor<B, 1>,
    stride: usize,
    pad: usize,
}

/// The LPIPS network: AlexNet features and five linear heads.
pub struct Lpips<B: Backend> {
    convs: Vec<Conv<B>>,
    /// `[1, C, 1, 1]` non-negative channel weights.
    heads: Vec<Tensor<B, 4>>,
    shift: Tensor<B, 4>,
    scale: Tensor<B, 4>,
}

impl<B: Backend> Lpips<B> {
    /// Loads from the `lpips` asset (fetched on first use).
    pub fn from_asset(device: &B::Device) -> Result<Self> {
        let dir = dws_assets::ensure("lpips")?;
        Self::load(&dir.join("alexnet.ckpt"), device)
    }

    /// Loads the pickled weights of the reference implementation (`alexnet.ckpt`).
    pub fn load(path: &Path, device: &B::Device) -> Result<Self> {
        let mut m = load_pickle(path)?;
        let mut convs = Vec::new();
        for (i, &(k, stride, pad)) in CONVS.iter().enumerate() {
            let w = take(&mut m, path, &format!("AlexNet_0/Conv_{i}/kernel"))?;
            let b = take(&mut m, path, &format!("AlexNet_0/Conv_{i}/bias"))?;
            if w.shape.len() != 4 || w.shape[0] != k || w.shape[1] != k {
                return Err(MetricsError::Weights {
                    path: path.to_path_buf(),
                    detail: format!("conv {i}: kernel shape {:?}, expected {k}×{k}", w.shape),
                });
            }
            convs.push(Conv {
                w: conv2d_weight(w, device),
                b: vector(b, device),
                stride,
                pad,
            });
        }
        let mut heads = Vec::new();
        for (i, conv) in convs.iter().enumerate() {
            let h = take(&mut m, path, &format!("NetLinLayer_{i}/Conv_0/kernel"))?;
            let c = conv.w.dims()[0];
            if h.data.len() != c {
                return Err(MetricsError::Weights {
                    path: path.to_path_buf(),
                    detail: format!("head {i}: {} weights for {c} channels", h.data.len()),
                });
            }
            heads.push(Tensor::from_data(
                TensorData::new(h.data, [1, c, 1, 1]),
                device,
            ));
        }
        let chan =
            |v: [f32; 3]| Tensor::from_data(TensorData::new(v.to_vec(), [1, 3, 1, 1]), device);
        Ok(Self {
            convs,
            heads,
            shift: chan(SHIFT),
            scale: chan(SCALE),
        })
    }

    fn features(&self, x: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        let mut x = (x - self.shift.clone()) / self.scale.clone();
        let mut taps = Vec::with_capacity(5);
        for (i, c) in self.convs.iter().enumerate() {
            let opts = ConvOptions::new([c.stride; 2], [c.pad; 2], [1, 1], 1);
            x = relu(conv2d(x, c.w.clone(), Some(c.b.clone()), opts));
            taps.push(x.clone());
            if i < 2 {
                x = max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false);
            }
        }
        taps
    }

    /// LPIPS distance of each pair: `[N, 3, H, W]` × 2 in [-1, 1] → `[N]`.
    pub fn distance(&self, x: Tensor<B, 4>, y: Tensor<B, 4>) -> Result<Tensor<B, 1>> {
        let (dx, dy) = (x.dims(), y.dims());
        if dx != dy {
            return Err(MetricsError::Input(format!(
                "LPIPS pairs differ in shape: {dx:?} vs {dy:?}"
            )));
        }
        if dx[0] == 0 || dx[1] != 3 || dx[2] < 32 || dx[3] < 32 {
            return Err(MetricsError::Input(format!(
                "LPIPS needs [N ≥ 1, 3, H, W] images of at least 32×32, got {dx:?}"
            )));
        }
        let n = dx[0];
        // One pass over both sets.
        let feats = self.features(Tensor::cat(vec![x, y], 0));
        let mut total: Option<Tensor<B, 1>> = None;
        for (f, head) in feats.into_iter().zip(&self.heads) {
            let norm = f.clone().powf_scalar(2.0).sum_dim(1).sqrt() + EPS;
            let f = f / norm;
            let fx = f.clone().narrow(0, 0, n);
            let fy = f.narrow(0, n, n);
            let d = (fx - fy).powf_scalar(2.0) * head.clone();
            let d: Tensor<B, 1> = d.sum_dim(1).mean_dim(2).mean_dim(3).reshape([n]);
            total = Some(match total {
                Some(t) => t + d,
                None => d,
            });
        }
        Ok(total.expect("five layers"))
    }
}

impl<B: Backend> Lpips<B> {
    /// LPIPS of each pair of u8 frames `[N, H, W, 3]` (row-major, RGB), computed
    /// [`FRAME_BATCH`] frames at a time.
    pub fn frame_distances(
        &self,
        a: &[u8],
        b: &[u8],
        (h, w): (usize, usize),
        device: &B::Device,
    ) -> Result<Vec<f64>> {
        let f = h * w * 3;
        if f == 0 || a.len() != b.len() || !a.len().is_multiple_of(f) {
            return Err(MetricsError::Input(format!(
                "LPIPS frames: {} and {} bytes are not pairs of {h}×{w} RGB frames",
                a.len(),
                b.len()
            )));
        }
        let image = |v: &[u8], n: usize| {
            let x: Vec<f32> = v.iter().map(|&x| x as f32 / 127.5 - 1.0).collect();
            Tensor::<B, 4>::from_data(TensorData::new(x, [n, h, w, 3]), device)
                .permute([0, 3, 1, 2])
        };
        let mut out = Vec::with_capacity(a.len() / f);
        for (ca, cb) in a.chunks(FRAME_BATCH * f).zip(b.chunks(FRAME_BATCH * f)) {
            let n = ca.len() / f;
            let d = self.distance(image(ca, n), image(cb, n))?;
            out.extend(
                d.into_data()
                    .to_vec::<f32>()
                    .expect("floats")
                    .into_iter()
                    .map(f64::from),
            );
        }
        Ok(out)
    }
}

/// Frames per forward pass of [`Lpips::frame_distances`].
pub const FRAME_BATCH: usize = 64;

fn vector<B: Backend>(a: Array, device: &B::Device) -> Tensor<B, 1> {
    let n = a.data.len();
    Tensor::from_data(TensorData::new(a.data, [n]), device)
}
