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
            image_size: self.image_size,
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
    image_size: usize,
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

/// Optimisation settings of `dws tokenizer train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqTrainConfig {
    pub steps: usize,
    /// Frames per step.
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Steps at which the learning rate is multiplied by `lr_gamma` (a step schedule;
    /// empty: constant after the warmup).
    #[serde(default)]
    pub lr_steps: Vec<usize>,
    #[serde(default = "one")]
    pub lr_gamma: f64,
    pub grad_clip: f32,
    /// Steps between dead-code restarts: codes no frame used since the last restart move
    /// onto encoder outputs of the current batch.
    pub restart_every: usize,
    pub seed: u64,
    /// Steps between checkpoints (a multiple of `restart_every`, so a resumed run
    /// restarts codes where an uninterrupted one does).
    pub checkpoint_every: usize,
    pub keep_last: usize,
}

fn one() -> f64 {
    1.0
}

impl VqTrainConfig {
    pub fn debug() -> Self {
        Self {
            steps: 20,
            batch: 4,
            lr: 2e-3,
            warmup: 2,
            lr_steps: Vec::new(),
            lr_gamma: 1.0,
            grad_clip: 1.0,
            restart_every: 5,
            seed: 0,
            checkpoint_every: 10,
            keep_last: 2,
        }
    }

    pub fn small() -> Self {
        Self {
            steps: 3000,
            batch: 16,
            lr: 1e-3,
            warmup: 100,
            // At a constant 1e-3 a run on CoinRun + pushing frames diverged near step
            // 1150 (loss 0.01 -> 6, no recovery); it trained on at 3e-4 from step 1000.
            lr_steps: vec![1000],
            lr_gamma: 0.3,
            grad_clip: 1.0,
            restart_every: 50,
            seed: 0,
            checkpoint_every: 250,
            keep_last: 2,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.batch == 0 || self.restart_every == 0 || self.checkpoint_every == 0 {
            return Err("batch, restart_every and checkpoint_every must be at least 1".into());
        }
        if !self.checkpoint_every.is_multiple_of(self.restart_every) {
            return Err(format!(
                "checkpoint_every ({}) must be a multiple of restart_every ({})",
                self.checkpoint_every, self.restart_every
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err("lr must be positive".into());
        }
        if !(self.lr_gamma > 0.0 && self.lr_gamma.is_finite()) {
            return Err("lr_gamma must be positive".into());
        }
        Ok(())
    }

    /// The learning rate of step `step`: linear warmup, then `lr` times `lr_gamma` for
    /// each of `lr_steps` already reached.
    pub fn lr_at(&self, step: usize) -> f64 {
        let drops = self.lr_steps.iter().filter(|&&s| step >= s).count();
        let lr = self.lr * self.lr_gamma.powi(drops as i32);
        if self.warmup > 0 && step < self.warmup {
            lr * (step + 1) as f64 / self.warmup as f64
        } else {
            lr
        }
    }
}

/// One logged tokenizer step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VqStepLog {
    pub step: usize,
    /// Reconstruction MSE (frames in [-1, 1]) plus the quantiser's loss.
    pub loss: f32,
    pub recon_mse: f32,
    /// PSNR of the batch's reconstructions (data range 1).
    pub psnr: f32,
    /// Codes restarted at this step.
    #[serde(default)]
    pub restarted: usize,
    pub lr: f64,
    pub steps_per_s: f64,
}

/// PSNR (data range 1) of a mean squared error measured in [-1, 1].
pub fn psnr_of_mse(mse: f32) -> f32 {
    // A range of 2 has 4 times the squared error of a range of 1.
    let mse01 = (mse / 4.0).max(1e-10);
    -10.0 * mse01.log10()
}

/// Trains `vq` on frames drawn by `sample` (u8 `[B, H, W, 3]` for a batch size and a
/// random stream) into `run`: JSON-lines metrics, checkpoints, exact resume.
pub fn train_tokenizer<B: burn::tensor::backend::AutodiffBackend>(
    run: &std::path::Path,
    mut vq: VqTokenizer<B>,
    cfg: &VqTrainConfig,
    sample: &mut dyn FnMut(usize, &mut rand_chacha::ChaCha8Rng) -> Vec<u8>,
    opts: crate::train::RunOptionsLite<'_, VqStepLog>,
) -> crate::Result<VqTokenizer<B>> {
    use crate::checkpoint::{self, TrainState};
    use crate::ModelError;
    use burn::grad_clipping::GradientClippingConfig;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    use rand::{Rng, SeedableRng};
    use std::io::Write;
    let device = vq.devices()[0].clone();
    let mut optim = AdamConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(cfg.grad_clip)))
        .init::<B, VqTokenizer<B>>();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let metrics = run.join("metrics.jsonl");
    let io = |e: std::io::Error| ModelError::Io {
        path: metrics.clone(),
        source: e,
    };
    let mut start = 0;
    match (opts.resume, checkpoint::latest(run)) {
        (true, Some(ckpt)) => {
            let state = checkpoint::read_state(&ckpt)?;
            vq = checkpoint::load_model(vq, &ckpt, &device)?;
            optim = optim.load_record(checkpoint::load_optim(&ckpt, &device)?);
            rng = rand_chacha::ChaCha8Rng::seed_from_u64(state.rng_seed);
            rng.set_word_pos(state.rng_word_pos);
            start = state.step;
            crate::train::truncate_log::<VqStepLog>(&metrics, |e| e.step <= start).map_err(io)?;
        }
        _ => {
            if metrics.exists() {
                std::fs::remove_file(&metrics).map_err(io)?;
            }
        }
    }
    std::fs::create_dir_all(run).map_err(|e| ModelError::Io {
        path: run.to_path_buf(),
        source: e,
    })?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .map_err(io)?;
    let k = vq.codebook_size();
    let mut used = vec![false; k];
    let end = opts
        .stop_after
        .map_or(cfg.steps, |n| (start + n).min(cfg.steps));
    let started = std::time::Instant::now();
    let side = vq.image_size;
    for step in start..end {
        let frames = sample(cfg.batch, &mut rng);
        let x = crate::flow::frames_to_tensor::<B>(&frames, [cfg.batch, 1, side, side, 3], &device)
            .reshape([cfg.batch, 3, side, side]);
        let out = vq.forward(x.clone());
        let recon = (out.recon - x).powi_scalar(2).mean();
        let recon_mse: f32 = recon.clone().into_scalar().elem();
        let loss = recon + out.vq_loss;
        let value: f32 = loss.clone().into_scalar().elem();
        if !value.is_finite() {
            return Err(ModelError::Invalid(format!(
                "the tokenizer's loss became {value} at step {}; lower the learning rate",
                step + 1
            )));
        }
        let ids: Vec<i64> = out
            .tokens
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("ids");
        for &t in &ids {
            used[t as usize] = true;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &vq);
        let lr = cfg.lr_at(step);
        vq = optim.step(lr, vq, grads);
        let mut restarted = 0;
        if (step + 1).is_multiple_of(cfg.restart_every) {
            let dead: Vec<usize> = (0..k).filter(|&c| !used[c]).collect();
            let n = out.latents.dims()[0];
            let rows: Vec<usize> = (0..dead.len()).map(|_| rng.gen_range(0..n)).collect();
            restarted = dead.len();
            vq = vq.restart_codes(&dead, out.latents, &rows);
            used.iter_mut().for_each(|u| *u = false);
        }
        let entry = VqStepLog {
            step: step + 1,
            loss: value,
            recon_mse,
            psnr: psnr_of_mse(recon_mse),
            restarted,
            lr,
            steps_per_s: (step + 1 - start) as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        writeln!(
            log,
            "{}",
            serde_json::to_string(&entry).expect("serialises")
        )
        .map_err(io)?;
        (opts.on_step)(&entry);
        if (step + 1).is_multiple_of(cfg.checkpoint_every) || step + 1 == end {
            let state = TrainState {
                step: step + 1,
                rng_seed: cfg.seed,
                rng_word_pos: rng.get_word_pos(),
                last_loss: value,
            };
            checkpoint::save::<B, _>(run, &vq, optim.to_record(), &state, cfg.keep_last)?;
        }
    }
    Ok(vq)
}
