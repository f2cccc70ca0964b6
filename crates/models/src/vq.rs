//! A VQ frame tokenizer (the first stage of the iVideoGPT family, sized for CPUs):
//! a convolutional encoder maps a 64×64 RGB frame to a grid of vectors, each replaced by
//! its nearest entry of a learned codebook (the token), and a convolutional decoder maps
//! the grid of codebook entries back to the frame.
//!
//! - Encoder: a 3×3 convolution, then per level `res_blocks` residual blocks and (except
//!   at the last level) a 2× downsampling (pixel unshuffle + 3×3 convolution); a 1×1
//!   convolution to the code width. `channels.len() - 1` downsamplings: `[32, 64, 128]`
//!   turns 64×64 frames into 16×16 tokens.
//! - Quantiser: codes and encoder outputs are compared on the unit sphere (both
//!   L2-normalised, nearest by cosine similarity, as ViT-VQGAN does), which keeps the
//!   codebook in use; straight-through gradients to the encoder; the codebook term
//!   `‖sg(z) − e‖²` and the commitment term `β‖z − sg(e)‖²`.
//! - Decoder: the mirror image with nearest-neighbour 2× upsampling.
//! - Dead codes: [`VqTokenizer::restart_codes`] moves codebook entries that went unused
//!   onto encoder outputs of the current batch (the trainer calls it at intervals).
//!
//! Shapes: frames `[B, 3, H, W]` in [-1, 1]; grids `[B, D, h, w]`; tokens `[B, h·w]`.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use dws_kernels::silu;
use serde::{Deserialize, Serialize};

/// Sizes and loss weights of a tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqConfig {
    pub image_size: usize,
    /// Channels per resolution level; each level after the first halves the side.
    pub channels: Vec<usize>,
    pub res_blocks: usize,
    pub codebook_size: usize,
    pub code_dim: usize,
    /// Commitment weight β.
    pub commitment: f32,
}

impl VqConfig {
    /// Seconds on a CPU: 16×16 tokens from 8/16/16 channels, 64 codes.
    pub fn debug() -> Self {
        Self {
            image_size: 64,
            channels: vec![8, 16, 16],
            res_blocks: 1,
            codebook_size: 64,
            code_dim: 8,
            commitment: 0.25,
        }
    }

    /// Two CPU cores: 16×16 tokens from 32/64/128 channels, 1024 codes of width 32.
    pub fn small() -> Self {
        Self {
            image_size: 64,
            channels: vec![32, 64, 128],
            res_blocks: 1,
            codebook_size: 1024,
            code_dim: 32,
            commitment: 0.25,
        }
    }

    /// Side of the token grid.
    pub fn grid(&self) -> usize {
        self.image_size >> (self.channels.len().saturating_sub(1))
    }

    pub fn tokens_per_frame(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.channels.is_empty() || self.channels.contains(&0) {
            return Err("channels needs at least one level, none of width 0".into());
        }
        let down = 1usize << (self.channels.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(down) {
            return Err(format!(
                "image_size {} is not divisible by 2^{} (one halving per level after the first)",
                self.image_size,
                self.channels.len() - 1
            ));
        }
        if self.codebook_size < 2 || self.code_dim == 0 {
            return Err("the codebook needs at least 2 codes of width ≥ 1".into());
        }
        if !(self.commitment >= 0.0 && self.commitment.is_finite()) {
            return Err("commitment must be a finite number ≥ 0".into());
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> VqTokenizer<B> {
        let c = &self.channels;
        let last = *c.last().expect("validated");
        let mut down = Vec::new();
        let mut enc_blocks = Vec::new();
        for (i, &ch) in c.iter().enumerate() {
            enc_blocks.push(
                (0..self.res_blocks)
                    .map(|_| ResBlock::new(ch, device))
                    .collect(),
            );
            if i + 1 < c.len() {
                down.push(conv(4 * ch, c[i + 1], 3, device));
            }
        }
        let mut up = Vec::new();
        let mut dec_blocks = Vec::new();
        for i in (0..c.len()).rev() {
            dec_blocks.push(
                (0..self.res_blocks)
                    .map(|_| ResBlock::new(c[i], device))
                    .collect(),
            );
            if i > 0 {
                up.push(conv(c[i], c[i - 1], 3, device));
            }
        }
        // Codes start on the unit sphere, spread uniformly.
        let codebook = normalize(Tensor::random(
            [self.codebook_size, self.code_dim],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            device,
        ));
        VqTokenizer {
            enc_in: conv(3, c[0], 3, device),
            enc_blocks,
            down,
            enc_out: conv(last, self.code_dim, 1, device),
            codebook: Param::from_tensor(codebook),
            dec_in: conv(self.code_dim, last, 3, device),
            dec_blocks,
            up,
            dec_out: conv(c[0], 3, 3, device),
            commitment: self.commitment,
        }
    }
}

/// A convolution with `k`×`k` kernels padded to keep the size.
fn conv<B: Backend>(cin: usize, cout: usize, k: usize, device: &B::Device) -> Conv2d<B> {
    let p = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

/// A stride-1 convolution through the fused kernel (burn's `conv2d` off Flex).
fn apply<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [.., k, _] = layer.weight.dims();
    let bias = layer
        .bias
        .as_ref()
        .expect("convs are built with a bias")
        .val();
    dws_kernels::conv2d(x, layer.weight.val(), bias, [k / 2, k / 2])
}

#[derive(Module, Debug)]
struct ResBlock<B: Backend> {
    conv0: Conv2d<B>,
    conv1: Conv2d<B>,
}

impl<B: Backend> ResBlock<B> {
    fn new(ch: usize, device: &B::Device) -> Self {
        Self {
            conv0: conv(ch, ch, 3, device),
            conv1: conv(ch, ch, 3, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = apply(&self.conv0, silu(x.clone()));
        x + apply(&self.conv1, silu(h))
    }
}

/// `[B, C, H, W]` → `[B, 4C, H/2, W/2]`: each 2×2 block of pixels into channels.
fn unshuffle<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([b, 4 * c, h / 2, w / 2])
}

/// `[B, C, H, W]` → `[B, C, 2H, 2W]`, nearest neighbour.
fn upsample<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

/// Rows scaled to unit length (last dimension).
fn normalize<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let norm = x
        .clone()
        .powi_scalar(2)
        .sum_dim(D - 1)
        .sqrt()
        .clamp_min(1e-6);
    x / norm
}

#[derive(Module, Debug)]
pub struct VqTokenizer<B: Backend> {
    enc_in: Conv2d<B>,
    enc_blocks: Vec<Vec<ResBlock<B>>>,
    down: Vec<Conv2d<B>>,
    enc_out: Conv2d<B>,
    /// `[K, D]`, rows of unit length.
    pub codebook: Param<Tensor<B, 2>>,
    dec_in: Conv2d<B>,
    dec_blocks: Vec<Vec<ResBlock<B>>>,
    up: Vec<Conv2d<B>>,
    dec_out: Conv2d<B>,
    commitment: f32,
}

/// What one pass through the tokenizer gives.
#[derive(Debug, Clone)]
pub struct VqOutput<B: Backend> {
    /// The decoded frames `[B, 3, H, W]`.
    pub recon: Tensor<B, 4>,
    /// Token ids `[B, h·w]`.
    pub tokens: Tensor<B, 2, Int>,
    /// Codebook + commitment loss (a scalar).
    pub vq_loss: Tensor<B, 1>,
    /// Normalised encoder outputs `[B·h·w, D]` (for dead-code restarts).
    pub latents: Tensor<B, 2>,
}

impl<B: Backend> VqTokenizer<B> {
    /// Encoder outputs on the unit sphere, `[B, h, w, D]`.
    pub fn encode_latents(&self, frames: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = apply(&self.enc_in, frames);
        for (i, blocks) in self.enc_blocks.iter().enumerate() {
            for b in blocks {
                x = b.forward(x);
            }
            if let Some(d) = self.down.get(i) {
                x = apply(d, unshuffle(x));
            }
        }
        let z = apply(&self.enc_out, silu(x)); // [B, D, h, w]
        normalize(z.permute([0, 2, 3, 1]))
    }

    /// Nearest codes of latents `[N, D]`: ids `[N]`.
    fn nearest(&self, z: Tensor<B, 2>) -> Tensor<B, 1, Int> {
        let codes = normalize(self.codebook.val());
        z.matmul(codes.transpose()).argmax(1).squeeze_dim(1)
    }

    /// Token ids of frames `[B, 3, H, W]` in [-1, 1]: `[B, h·w]`, row-major.
    pub fn encode(&self, frames: Tensor<B, 4>) -> Tensor<B, 2, Int> {
        let z = self.encode_latents(frames);
        let [b, h, w, d] = z.dims();
        self.nearest(z.reshape([b * h * w, d])).reshape([b, h * w])
    }

    /// Frames `[B, 3, H, W]` from token ids `[B, h·w]`.
    pub fn decode(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 4> {
        let [b, n] = tokens.dims();
        let g = (n as f64).sqrt().round() as usize;
        let codes = normalize(self.codebook.val());
        let d = codes.dims()[1];
        let q = codes.select(0, tokens.reshape([b * n])); // [B·N, D]
        self.decode_grid(q.reshape([b, g, g, d]))
    }

    /// Frames from a grid of code vectors `[B, h, w, D]`.
    fn decode_grid(&self, q: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = apply(&self.dec_in, q.permute([0, 3, 1, 2]));
        for (i, blocks) in self.dec_blocks.iter().enumerate() {
            for b in blocks {
                x = b.forward(x);
            }
            if let Some(u) = self.up.get(i) {
                x = apply(u, upsample(x));
            }
        }
        apply(&self.dec_out, silu(x))
    }

    /// Encode, quantise (straight-through) and decode, with the quantiser's loss.
    pub fn forward(&self, frames: Tensor<B, 4>) -> VqOutput<B> {
        let z = self.encode_latents(frames);
        let [b, h, w, d] = z.dims();
        let flat = z.reshape([b * h * w, d]);
        let ids = self.nearest(flat.clone().detach());
        let codes = normalize(self.codebook.val());
        let q = codes.select(0, ids.clone()); // [B·h·w, D]
        let codebook_term = (q.clone() - flat.clone().detach()).powi_scalar(2).mean();
        let commit_term = (flat.clone() - q.clone().detach()).powi_scalar(2).mean();
        let vq_loss = codebook_term + commit_term * self.commitment;
        // Straight-through: the decoder sees the code, the encoder gets its gradient.
        let st = flat.clone() + (q - flat.clone()).detach();
        let recon = self.decode_grid(st.reshape([b, h, w, d]));
        VqOutput {
            recon,
            tokens: ids.reshape([b, h * w]),
            vq_loss,
            latents: flat.detach(),
        }
    }

    pub fn codebook_size(&self) -> usize {
        self.codebook.dims()[0]
    }

    /// Moves the codes in `dead` onto rows of `latents` `[N, D]` (picked by `rows`),
    /// keeping the parameter's identity (its optimiser state restarts with it).
    pub fn restart_codes(self, dead: &[usize], latents: Tensor<B, 2>, rows: &[usize]) -> Self {
        if dead.is_empty() {
            return self;
        }
        let device = latents.device();
        let n = dead.len().min(rows.len());
        let pick = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows[..n].iter().map(|&r| r as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let slots = Tensor::<B, 1, Int>::from_data(
            TensorData::new(dead[..n].iter().map(|&r| r as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let new_rows = latents.select(0, pick).detach();
        let Self { codebook, .. } = &self;
        let updated = codebook.clone().map(|c| {
            let require = c.is_require_grad();
            let [k, d] = c.dims();
            let add = burn::tensor::IndexingUpdateOp::Add;
            // 1 on the replaced rows, and the new rows placed on zeros: both exact.
            let mask = Tensor::<B, 2>::zeros([k, d], &device).select_assign(
                0,
                slots.clone(),
                Tensor::ones([n, d], &device),
                add,
            );
            let placed = Tensor::<B, 2>::zeros([k, d], &device).select_assign(
                0,
                slots.clone(),
                new_rows.clone(),
                add,
            );
            let out = c.detach() * (mask.neg() + 1.0) + placed;
            if require {
                out.detach().require_grad()
            } else {
                out
            }
        });
        Self {
            codebook: updated,
            ..self
        }
    }
}
