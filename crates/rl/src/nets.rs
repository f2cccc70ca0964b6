//! The actor-critic network: an IMPALA-style CNN body (Espeholt et al. 2018, as used for
//! Procgen by Cobbe et al. 2020) shared by a policy head and a value head.
//!
//! Body: for each entry of `channels`, a 3×3 convolution, a 3×3 max pool with stride 2 and
//! `res_blocks` residual blocks (`x + conv(relu(conv(relu(x))))`); then ReLU, a linear
//! layer to `hidden` units and ReLU. Heads: logits for discrete actions, or the mean of a
//! diagonal Gaussian with a learned, state-independent log standard deviation for
//! continuous ones. The policy head starts orthogonal with gain 0.01 (a near-uniform first
//! policy), the value head with gain 1.

use burn::module::{Initializer, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

/// Shape of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Output channels of each conv stack (each halves the frame side).
    pub channels: Vec<usize>,
    /// Residual blocks per stack.
    pub res_blocks: usize,
    /// Width of the layer shared by both heads.
    pub hidden: usize,
}

impl NetConfig {
    /// The Procgen paper's network: stacks of 16, 32, 32 channels, two residual blocks
    /// each, 256 hidden units.
    pub fn impala() -> Self {
        Self {
            channels: vec![16, 32, 32],
            res_blocks: 2,
            hidden: 256,
        }
    }
}

/// What the policy head outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Head {
    /// Logits over `n` actions.
    Discrete { n: usize },
    /// Mean of a `dim`-dimensional diagonal Gaussian.
    Continuous { dim: usize },
}

impl Head {
    pub fn outputs(&self) -> usize {
        match *self {
            Head::Discrete { n } => n,
            Head::Continuous { dim } => dim,
        }
    }
}

#[derive(Module, Debug)]
struct ResBlock<B: Backend> {
    conv0: Conv2d<B>,
    conv1: Conv2d<B>,
}

/// A padded 3×3 convolution through the fused kernel (burn's `conv2d` off Flex).
fn conv<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let bias = layer
        .bias
        .as_ref()
        .expect("convs are built with a bias")
        .val();
    dws_kernels::conv2d(x, layer.weight.val(), bias, [1, 1])
}

impl<B: Backend> ResBlock<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = conv(&self.conv0, relu(x.clone()));
        let h = conv(&self.conv1, relu(h));
        x + h
    }
}

#[derive(Module, Debug)]
struct ConvStack<B: Backend> {
    conv: Conv2d<B>,
    blocks: Vec<ResBlock<B>>,
}

impl<B: Backend> ConvStack<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = conv(&self.conv, x);
        let mut x = dws_kernels::max_pool2d(x, [3, 3], [2, 2], [1, 1]);
        for block in &self.blocks {
            x = block.forward(x);
        }
        x
    }
}

fn conv3x3<B: Backend>(cin: usize, cout: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// A linear layer with an orthogonal weight of the given gain and a zero bias.
fn orthogonal_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    gain: f64,
    device: &B::Device,
) -> Linear<B> {
    let mut layer = LinearConfig::new(d_in, d_out).init(device);
    // burn applies a layer's initializer to the bias as well, and the orthogonal one
    // needs two dimensions, so the weight is replaced after the fact.
    layer.weight = Initializer::Orthogonal { gain }.init([d_in, d_out], device);
    layer.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    layer
}

/// The CNN body: conv stacks, then a ReLU'd linear layer of `hidden` units.
fn body<B: Backend>(
    config: &NetConfig,
    side: usize,
    device: &B::Device,
) -> (Vec<ConvStack<B>>, Linear<B>) {
    let mut cin = 3;
    let mut s = side;
    let stacks = config
        .channels
        .iter()
        .map(|&c| {
            let stack = ConvStack {
                conv: conv3x3(cin, c, device),
                blocks: (0..config.res_blocks)
                    .map(|_| ResBlock {
                        conv0: conv3x3(c, c, device),
                        conv1: conv3x3(c, c, device),
                    })
                    .collect(),
            };
            cin = c;
            s = (s + 2 - 3) / 2 + 1;
            stack
        })
        .collect();
    let fc = LinearConfig::new(cin * s * s, config.hidden).init(device);
    (stacks, fc)
}

/// The body's features `[N, hidden]` of observations `[N, 3, H, W]`.
fn encode<B: Backend>(stacks: &[ConvStack<B>], fc: &Linear<B>, obs: Tensor<B, 4>) -> Tensor<B, 2> {
    let mut x = obs;
    for stack in stacks {
        x = stack.forward(x);
    }
    relu(fc.forward(relu(x).flatten::<2>(1, 3)))
}

/// The body with one linear head of `outputs` units: the Q network (one value per
/// action), state-value network (one output) or policy (logits) of the offline
/// learners.
#[derive(Module, Debug)]
pub struct QNet<B: Backend> {
    stacks: Vec<ConvStack<B>>,
    fc: Linear<B>,
    head: Linear<B>,
}

impl<B: Backend> QNet<B> {
    pub fn new(config: &NetConfig, side: usize, outputs: usize, device: &B::Device) -> Self {
        let (stacks, fc) = body(config, side, device);
        let head = orthogonal_linear(config.hidden, outputs, 1.0, device);
        Self { stacks, fc, head }
    }

    /// `[N, outputs]` for observations `[N, 3, H, W]` in `[0, 1]`.
    pub fn forward(&self, obs: Tensor<B, 4>) -> Tensor<B, 2> {
        self.head.forward(encode(&self.stacks, &self.fc, obs))
    }
}

/// Actor and critic over one shared CNN body.
#[derive(Module, Debug)]
pub struct ActorCritic<B: Backend> {
    stacks: Vec<ConvStack<B>>,
    fc: Linear<B>,
    policy: Linear<B>,
    value: Linear<B>,
    /// Log standard deviation of the Gaussian policy (continuous actions only).
    log_std: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> ActorCritic<B> {
    /// A network for `[3, side, side]` inputs in `[0, 1]`.
    pub fn new(config: &NetConfig, side: usize, head: Head, device: &B::Device) -> Self {
        let (stacks, fc) = body(config, side, device);
        let policy = orthogonal_linear(config.hidden, head.outputs(), 0.01, device);
        let value = orthogonal_linear(config.hidden, 1, 1.0, device);
        let log_std = match head {
            Head::Discrete { .. } => None,
            Head::Continuous { dim } => Some(Param::from_tensor(Tensor::zeros([dim], device))),
        };
        Self {
            stacks,
            fc,
            policy,
            value,
            log_std,
        }
    }

    /// Policy-head output (logits or Gaussian means) `[N, A]` and values `[N]` for
    /// observations `[N, 3, H, W]` in `[0, 1]`.
    pub fn forward(&self, obs: Tensor<B, 4>) -> (Tensor<B, 2>, Tensor<B, 1>) {
        let h = encode(&self.stacks, &self.fc, obs);
        let out = self.policy.forward(h.clone());
        let value = self.value.forward(h).flatten::<1>(0, 1);
        (out, value)
    }

    /// The Gaussian's log standard deviation (continuous heads).
    pub fn log_std(&self) -> Option<Tensor<B, 1>> {
        self.log_std.as_ref().map(|p| p.val())
    }
}

/// Turns `n` u8 frames `[n, H, W, 3]` into `[n, 3, H, W]` floats in `[0, 1]`.
pub fn frames_to_input<B: Backend>(
    frames: &[u8],
    n: usize,
    side: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let plane = side * side;
    assert_eq!(
        frames.len(),
        n * plane * 3,
        "frames do not match [n, side, side, 3]"
    );
    let mut data = vec![0f32; frames.len()];
    for (i, frame) in frames.chunks_exact(plane * 3).enumerate() {
        let out = &mut data[i * plane * 3..(i + 1) * plane * 3];
        for (p, px) in frame.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = px[c] as f32 * (1.0 / 255.0);
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [n, 3, side, side]), device)
}
