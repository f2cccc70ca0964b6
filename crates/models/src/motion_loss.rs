//! Motion-reinforced loss (paper eqs. 2-3): per-element weights that grow with the change
//! between consecutive ground-truth frames, `w_0 = 1`, `w_{i+1} = c ^ S(|x_{i+1} - x_i|)`.
//!
//! `S` normalises the per-position change of a frame: [`MotionLoss::Softmax`] is the
//! paper's softmax over the frame's positions (with a temperature); with thousands of
//! positions its values are tiny and the weights stay near 1. [`MotionLoss::SoftmaxMax`]
//! divides that softmax by its maximum, so the most-changed position of each frame gets
//! weight `c` and unchanged positions weight about 1. The change is averaged over
//! channels, so one weight covers every channel of a position. Weights carry no gradient.

use burn::prelude::*;
use dws_kernels::softmax;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MotionLoss {
    /// Plain (unweighted) loss.
    None,
    /// `c ^ softmax(d / T)` as the paper writes it.
    Softmax,
    /// `c ^ (softmax(d / T) / max softmax(d / T))`.
    SoftmaxMax,
}

impl std::str::FromStr for MotionLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "softmax" => Ok(Self::Softmax),
            "softmax-max" => Ok(Self::SoftmaxMax),
            _ => Err(format!(
                "unknown motion loss `{s}`: none, softmax or softmax-max"
            )),
        }
    }
}

/// Weights for a ground-truth clip `x` `[B, F, C, H, W]`: `[B, F, 1, H, W]` in `[1, c]`
/// (all ones for [`MotionLoss::None`]).
pub fn motion_weights<B: Backend>(
    x: Tensor<B, 5>,
    mode: MotionLoss,
    strength: f32,
    temperature: f32,
) -> Tensor<B, 5> {
    let [b, f, _, h, w] = x.dims();
    let device = x.device();
    if mode == MotionLoss::None || f < 2 {
        return Tensor::ones([b, f, 1, h, w], &device);
    }
    let x = x.detach();
    // Change of each position from the previous frame, averaged over channels.
    let diff = (x.clone().narrow(1, 1, f - 1) - x.narrow(1, 0, f - 1))
        .abs()
        .mean_dim(2) // [B, F-1, 1, H, W]
        .reshape([b, f - 1, h * w]);
    let s = softmax(diff / temperature as f64); // [B, F-1, HW], over HW
    let s = match mode {
        MotionLoss::SoftmaxMax => s.clone() / s.max_dim(2),
        _ => s,
    };
    // c^s = exp(s ln c)
    let w_rest = (s * (strength as f64).ln())
        .exp()
        .reshape([b, f - 1, 1, h, w]);
    Tensor::cat(vec![Tensor::ones([b, 1, 1, h, w], &device), w_rest], 1)
}
