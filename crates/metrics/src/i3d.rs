//! The Kinetics-400 I3D network (Carreira & Zisserman, 2017) whose 400 logits are the
//! features of FVD (Unterthiner et al., 2018). Weights come from the `i3d` asset; the
//! layers follow the reference (TF-style "SAME" padding with the odd pixel after, batch
//! norm with ε = 1e-3 and no scale, folded into the convolutions at load time).
//!
//! [`I3d::logits`] takes `[B, 3, T, 224, 224]` in [-1, 1] with T ≥ 9;
//! [`I3d::video_features`] takes frames in [0, 1] of any size and does the resizing.

use crate::pickle::Array;
use crate::weights::{conv3d_weight, load_pickle, take};
use crate::{MetricsError, Result};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{conv3d, interpolate, max_pool1d, max_pool2d};
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions, PadMode};
use std::collections::BTreeMap;
use std::path::Path;

const BN_EPS: f32 = 1e-3;
/// Side of the frames the network was trained on.
pub const SIZE: usize = 224;
/// The shortest clip with a defined output (the last pooling needs two time steps).
pub const MIN_FRAMES: usize = 9;
/// Width of the logits (Kinetics-400 classes).
pub const FEATURES: usize = 400;

/// `(before, after)` padding of TensorFlow's "SAME" for one dimension.
fn same_pad(n: usize, k: usize, s: usize) -> (usize, usize) {
    let out = n.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// Convolution (+ folded batch norm) + optional ReLU.
struct Unit<B: Backend> {
    w: Tensor<B, 5>,
    b: Tensor<B, 1>,
    k: [usize; 3],
    s: [usize; 3],
    relu: bool,
}

impl<B: Backend> Unit<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let d = x.dims();
        let pads: Vec<(usize, usize)> = (0..3)
            .map(|i| same_pad(d[2 + i], self.k[i], self.s[i]))
            .collect();
        let symmetric = pads.iter().all(|(a, b)| a == b);
        let (x, p) = if symmetric {
            (x, [pads[0].0, pads[1].0, pads[2].0])
        } else {
            (x.pad(pads, PadMode::Constant(0.0)), [0; 3])
        };
        let y = conv3d(
            x,
            self.w.clone(),
            Some(self.b.clone()),
            ConvOptions::new(self.s, p, [1; 3], 1),
        );
        if self.relu {
            relu(y)
        } else {
            y
        }
    }
}

/// Max pooling with "SAME" padding (padding never wins the max), done as a 2-D pool over
/// space followed by a 1-D pool over time (the max over a box is separable). Symmetric
/// padding is the pool's own; "SAME"'s usual extra pixel at the end (padding `(0, 1)`) is
/// the pool's ceil mode, which clips the last window at the edge; anything else is padded
/// explicitly.
fn max_pool_same<B: Backend>(x: Tensor<B, 5>, k: [usize; 3], s: [usize; 3]) -> Tensor<B, 5> {
    let d = x.dims();
    let pads: Vec<(usize, usize)> = (0..3).map(|i| same_pad(d[2 + i], k[i], s[i])).collect();
    let native = |&(a, b): &(usize, usize)| a == b || (a == 0 && b == 1);
    let (x, pad, ceil) = if pads.iter().all(native) {
        let pad: Vec<usize> = pads
            .iter()
            .map(|&(a, b)| if a == b { a } else { 0 })
            .collect();
        (x, pad, pads.iter().any(|&(a, b)| a != b))
    } else {
        (
            x.pad(pads, PadMode::Constant(f32::NEG_INFINITY)),
            vec![0; 3],
            false,
        )
    };
    let [b, c, t, h, w] = x.dims();
    let y = max_pool2d(
        x.reshape([b, c * t, h, w]),
        [k[1], k[2]],
        [s[1], s[2]],
        [pad[1], pad[2]],
        [1, 1],
        ceil,
    );
    let [_, _, oh, ow] = y.dims();
    if k[0] == 1 && s[0] == 1 {
        return y.reshape([b, c, t, oh, ow]);
    }
    let y = y
        .reshape([b, c, t, oh * ow])
        .swap_dims(2, 3)
        .reshape([b * c * oh * ow, 1, t]);
    let y = max_pool1d(y, k[0], s[0], pad[0], 1, ceil);
    let ot = y.dims()[2];
    y.reshape([b, c, oh * ow, ot])
        .swap_dims(2, 3)
        .reshape([b, c, ot, oh, ow])
}

/// An Inception block. The three 1×1×1 convolutions that read the block's input are
/// fused into one.
struct Mixed<B: Backend> {
    entry: Unit<B>,
    /// Output widths of the fused entry: branch 0, branch 1 reduce, branch 2 reduce.
    split: [usize; 3],
    b1: Unit<B>,
    b2: Unit<B>,
    b3: Unit<B>,
}

impl<B: Backend> Mixed<B> {
    fn forward(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let e = self.entry.forward(x.clone());
        let [a, r1, r2] = self.split;
        let b0 = e.clone().narrow(1, 0, a);
        let b1 = self.b1.forward(e.clone().narrow(1, a, r1));
        let b2 = self.b2.forward(e.narrow(1, a + r1, r2));
        let b3 = self.b3.forward(max_pool_same(x, [3; 3], [1; 3]));
        Tensor::cat(vec![b0, b1, b2, b3], 1)
    }
}

enum Layer<B: Backend> {
    Unit(Unit<B>),
    Pool([usize; 3], [usize; 3]),
    Mixed(Box<Mixed<B>>),
}

/// The I3D network up to its logits.
pub struct I3d<B: Backend> {
    layers: Vec<Layer<B>>,
    /// Logits: `[1024, 400]` and `[400]`.
    logits_w: Tensor<B, 2>,
    logits_b: Tensor<B, 1>,
}

struct Loader<'a, B: Backend> {
    m: BTreeMap<String, Array>,
    path: &'a Path,
    device: &'a B::Device,
}

impl<B: Backend> Loader<'_, B> {
    fn take(&mut self, key: &str) -> Result<Array> {
        take(&mut self.m, self.path, key)
    }

    /// Kernel `[o, i, kt, kh, kw]` and bias with batch norm folded in.
    fn folded(&mut self, name: &str) -> Result<(Tensor<B, 5>, Vec<f32>)> {
        let kernel = self.take(&format!("params/{name}/Conv_0/kernel"))?;
        let offset = self.take(&format!("params/{name}/BatchNorm_0/bias"))?;
        let mean = self.take(&format!("batch_stats/{name}/BatchNorm_0/mean"))?;
        let var = self.take(&format!("batch_stats/{name}/BatchNorm_0/var"))?;
        let o = *kernel.shape.last().unwrap_or(&0);
        if kernel.shape.len() != 5 || [&offset, &mean, &var].iter().any(|a| a.data.len() != o) {
            return Err(MetricsError::Weights {
                path: self.path.to_path_buf(),
                detail: format!(
                    "`{name}`: kernel {:?} does not match its batch norm",
                    kernel.shape
                ),
            });
        }
        let inv: Vec<f32> = var.data.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
        let bias: Vec<f32> = (0..o)
            .map(|c| offset.data[c] - mean.data[c] * inv[c])
            .collect();
        let w = conv3d_weight::<B>(kernel, self.device);
        let scale = Tensor::<B, 1>::from_data(TensorData::new(inv, [o]), self.device);
        Ok((w * scale.reshape([o, 1, 1, 1, 1]), bias))
    }

    fn unit(&mut self, name: &str, k: [usize; 3], s: [usize; 3]) -> Result<Unit<B>> {
        let (w, b) = self.folded(name)?;
        let dims = w.dims();
        if [dims[2], dims[3], dims[4]] != k {
            return Err(MetricsError::Weights {
                path: self.path.to_path_buf(),
                detail: format!("`{name}`: kernel {dims:?}, expected {k:?}"),
            });
        }
        let n = b.len();
        Ok(Unit {
            w,
            b: Tensor::from_data(TensorData::new(b, [n]), self.device),
            k,
            s,
            relu: true,
        })
    }

    fn mixed(&mut self, name: &str) -> Result<Mixed<B>> {
        let (w0, c0) = self.folded(&format!("{name}/Branch_0/Conv3d_0a_1x1"))?;
        let (w1, c1) = self.folded(&format!("{name}/Branch_1/Conv3d_0a_1x1"))?;
        let (w2, c2) = self.folded(&format!("{name}/Branch_2/Conv3d_0a_1x1"))?;
        let split = [c0.len(), c1.len(), c2.len()];
        let bias: Vec<f32> = [c0, c1, c2].concat();
        let n = bias.len();
        let entry = Unit {
            w: Tensor::cat(vec![w0, w1, w2], 0),
            b: Tensor::from_data(TensorData::new(bias, [n]), self.device),
            k: [1; 3],
            s: [1; 3],
            relu: true,
        };
        Ok(Mixed {
            entry,
            split,
            b1: self.unit(&format!("{name}/Branch_1/Conv3d_0b_3x3"), [3; 3], [1; 3])?,
            b2: self.unit(&format!("{name}/Branch_2/Conv3d_0b_3x3"), [3; 3], [1; 3])?,
            b3: self.unit(&format!("{name}/Branch_3/Conv3d_0b_1x1"), [1; 3], [1; 3])?,
        })
    }
}

impl<B: Backend> I3d<B> {
    /// Loads from the `i3d` asset (fetched on first use).
    pub fn from_asset(device: &B::Device) -> Result<Self> {
        let dir = dws_assets::ensure("i3d")?;
        Self::load(&dir.join("i3d-kinetics-400.ckpt"), device)
    }

    /// Loads the pickled variables of the reference implementation.
    pub fn load(path: &Path, device: &B::Device) -> Result<Self> {
        let mut l = Loader::<B> {
            m: load_pickle(path)?,
            path,
            device,
        };
        let mut layers = vec![
            Layer::Unit(l.unit("Conv3d_1a_7x7", [7; 3], [2; 3])?),
            Layer::Pool([1, 3, 3], [1, 2, 2]),
            Layer::Unit(l.unit("Conv3d_2b_1x1", [1; 3], [1; 3])?),
            Layer::Unit(l.unit("Conv3d_2c_3x3", [3; 3], [1; 3])?),
            Layer::Pool([1, 3, 3], [1, 2, 2]),
        ];
        for name in ["Mixed_3b", "Mixed_3c"] {
            layers.push(Layer::Mixed(Box::new(l.mixed(name)?)));
        }
        layers.push(Layer::Pool([3; 3], [2; 3]));
        for name in ["Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"] {
            layers.push(Layer::Mixed(Box::new(l.mixed(name)?)));
        }
        layers.push(Layer::Pool([2; 3], [2; 3]));
        for name in ["Mixed_5b", "Mixed_5c"] {
            layers.push(Layer::Mixed(Box::new(l.mixed(name)?)));
        }
        let kernel = l.take("params/Logits/Conv3d_0c_1x1/Conv_0/kernel")?;
        let bias = l.take("params/Logits/Conv3d_0c_1x1/Conv_0/bias")?;
        if kernel.data.len() != 1024 * FEATURES || bias.data.len() != FEATURES {
            return Err(MetricsError::Weights {
                path: path.to_path_buf(),
                detail: format!(
                    "logits kernel {:?}, expected 1024 → {FEATURES}",
                    kernel.shape
                ),
            });
        }
        Ok(Self {
            layers,
            logits_w: Tensor::from_data(TensorData::new(kernel.data, [1024, FEATURES]), device),
            logits_b: Tensor::from_data(TensorData::new(bias.data, [FEATURES]), device),
        })
    }

    /// Kinetics-400 logits, averaged over time: `[B, 3, T, 224, 224]` in [-1, 1] → `[B, 400]`.
    pub fn logits(&self, x: Tensor<B, 5>) -> Result<Tensor<B, 2>> {
        let [b, c, t, h, w] = x.dims();
        if c != 3 || h != SIZE || w != SIZE || t < MIN_FRAMES {
            return Err(MetricsError::Input(format!(
                "I3D needs [B, 3, T ≥ {MIN_FRAMES}, {SIZE}, {SIZE}], got {:?}",
                [b, c, t, h, w]
            )));
        }
        let mut x = x;
        let profile = std::env::var_os("DWS_I3D_PROFILE").is_some();
        for (i, layer) in self.layers.iter().enumerate() {
            let t0 = std::time::Instant::now();
            x = match layer {
                Layer::Unit(u) => u.forward(x),
                Layer::Pool(k, s) => max_pool_same(x, *k, *s),
                Layer::Mixed(m) => m.forward(x),
            };
            if profile {
                let _ = x.clone().slice([0..1, 0..1, 0..1, 0..1, 0..1]).into_data();
                eprintln!(
                    "layer {i}: {:?} {:.3} s",
                    x.dims(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        // Average pool 2×7×7 (stride 1, valid) then the linear logits, averaged over the
        // remaining time steps: the same as averaging the pooled features first.
        let [b, c, t, h, w] = x.dims();
        let space = x.reshape([b, c, t, h * w]).mean_dim(3).reshape([b, c, t]);
        let windows = (space.clone().narrow(2, 0, t - 1) + space.narrow(2, 1, t - 1)) / 2.0;
        let pooled = windows.mean_dim(2).reshape([b, c]);
        Ok(pooled.matmul(self.logits_w.clone()) + self.logits_b.clone().unsqueeze::<2>())
    }

    /// FVD features of videos `[B, T, 3, H, W]` with values in [0, 1]: frames resized to
    /// 224×224 (bilinear, half-pixel centres), scaled to [-1, 1], logits of the network.
    pub fn video_features(&self, videos: Tensor<B, 5>) -> Result<Tensor<B, 2>> {
        let [b, t, c, h, w] = videos.dims();
        if c != 3 || t < MIN_FRAMES {
            return Err(MetricsError::Input(format!(
                "FVD needs clips of at least {MIN_FRAMES} RGB frames, got [B, T, C, H, W] = {:?}",
                [b, t, c, h, w]
            )));
        }
        let frames = videos.reshape([b * t, c, h, w]);
        let frames = if (h, w) == (SIZE, SIZE) {
            frames
        } else {
            interpolate(
                frames,
                [SIZE, SIZE],
                InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false),
            )
        };
        let x = (frames * 2.0 - 1.0)
            .reshape([b, t, c, SIZE, SIZE])
            .swap_dims(1, 2);
        self.logits(x)
    }
}

#[cfg(test)]
mod tests {
    use super::same_pad;

    #[test]
    fn same_padding_puts_the_odd_pixel_after() {
        assert_eq!(same_pad(16, 7, 2), (2, 3));
        assert_eq!(same_pad(224, 7, 2), (2, 3));
        assert_eq!(same_pad(112, 3, 2), (0, 1));
        assert_eq!(same_pad(8, 3, 1), (1, 1));
        assert_eq!(same_pad(4, 2, 2), (0, 0));
    }
}
