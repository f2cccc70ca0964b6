//! `dws bench step`: one transformer training step (forward, backward, AdamW) on random
//! inputs, with burn's own operations and with the fused kernels in the same run, and,
//! given the PyTorch peer's output (`scripts/bench_step_torch.py`), against PyTorch
//! eager on the same shapes.
//!
//! Models:
//! - `toy`: the DESIGN "Backends" step: 4 pre-norm blocks (layer norm, 6-head attention,
//!   layer norm, 4× GELU MLP) over 8 × 256 tokens of width 192, mean squared error to a
//!   random target.
//! - `dit`: a preset's flow transformer with a DWS module before every block (the network
//!   `dws finetune` trains, without the flow-matching loss around it): random frames,
//!   flow times, action embeddings and anchor frames in; mean squared error of the output
//!   frames to a random target, plus the mean squared warp displacement when the preset
//!   has the warp head.

use super::bench::emit;
use anyhow::Result;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use dws_kernels::linear as lin;
use std::path::PathBuf;
use std::time::Instant;

/// The toy step's sizes (DESIGN "Backends").
pub const TOY_BATCH: usize = 8;
pub const TOY_TOKENS: usize = 256;
pub const TOY_WIDTH: usize = 192;
pub const TOY_HEADS: usize = 6;
pub const TOY_DEPTH: usize = 4;
/// AdamW's settings in both this bench and the PyTorch peer.
const LR: f64 = 1e-4;
const WEIGHT_DECAY: f32 = 0.01;

pub struct StepBench {
    /// `toy` or `dit`.
    pub model: String,
    /// The preset whose `[model]` and finetune batch the `dit` step takes.
    pub preset: String,
    /// Timed steps (after two warm-up steps); the median is reported.
    pub steps: usize,
    /// JSON lines of the PyTorch peer, for ratios against PyTorch.
    pub torch: Option<PathBuf>,
    /// Time only the fused kernels (for a profiler).
    pub fused_only: bool,
}

#[derive(Module, Debug)]
struct ToyBlock<B: Backend> {
    norm1: LayerNorm<B>,
    qkv: Linear<B>,
    proj: Linear<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> ToyBlock<B> {
    fn new(d: usize, device: &B::Device) -> Self {
        ToyBlock {
            norm1: LayerNormConfig::new(d).init(device),
            qkv: LinearConfig::new(d, 3 * d).init(device),
            proj: LinearConfig::new(d, d).init(device),
            norm2: LayerNormConfig::new(d).init(device),
            fc1: LinearConfig::new(d, 4 * d).init(device),
            fc2: LinearConfig::new(4 * d, d).init(device),
        }
    }

    /// `x`: `[B, L, D]`.
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let qkv = lin(&self.qkv, dws_kernels::layer_norm(&self.norm1, x.clone()));
        let a = dws_kernels::self_attention(qkv, TOY_HEADS, false);
        let x = x + lin(&self.proj, a);
        let h = dws_kernels::gelu(lin(
            &self.fc1,
            dws_kernels::layer_norm(&self.norm2, x.clone()),
        ));
        x + lin(&self.fc2, h)
    }
}

#[derive(Module, Debug)]
struct Toy<B: Backend> {
    blocks: Vec<ToyBlock<B>>,
}

impl<B: Backend> Toy<B> {
    fn forward(&self, mut x: Tensor<B, 3>) -> Tensor<B, 3> {
        for block in &self.blocks {
            x = block.forward(x);
        }
        x
    }
}

/// Median seconds of `steps` timed steps after two warm-up steps.
fn median_step(steps: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    step()?;
    step()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn mse<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, 1> {
    (a - b).powi_scalar(2).mean()
}

fn optimizer() -> AdamWConfig {
    AdamWConfig::new().with_weight_decay(WEIGHT_DECAY)
}

impl StepBench {
    fn toy_step<B: AutodiffBackend>(&self, device: &B::Device) -> Result<f64> {
        B::seed(device, 0);
        let shape = [TOY_BATCH, TOY_TOKENS, TOY_WIDTH];
        let mut model = Toy {
            blocks: (0..TOY_DEPTH)
                .map(|_| ToyBlock::new(TOY_WIDTH, device))
                .collect(),
        };
        let mut optim = optimizer().init::<B, Toy<B>>();
        let x = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let target = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device);
        median_step(self.steps, || {
            let loss = mse(model.forward(x.clone()), target.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(LR, model.clone(), grads);
            B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))
        })
    }

    fn dit_step<B: AutodiffBackend>(&self, device: &B::Device) -> Result<f64> {
        B::seed(device, 0);
        let preset = super::world::load_preset(&self.preset)?;
        let m = &preset.model;
        let (b, f) = (preset.finetune.batch, preset.finetune.clip_len);
        let frames = [b, f, m.channels, m.image_size, m.image_size];
        let mut dit = m
            .init::<B>(device)
            .attach_action_modules(preset.dws.cond_dim, device);
        let mut optim = optimizer().init::<B, dws_models::flow_dit::FlowDit<B>>();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<B, 5>::random(frames, normal, device);
        let target = Tensor::<B, 5>::random(frames, normal, device);
        let anchor = Tensor::<B, 5>::random(frames, normal, device);
        let t = Tensor::<B, 2>::random([b, f], Distribution::Uniform(0.0, 1.0), device);
        let cond = Tensor::<B, 3>::random([b, f, preset.dws.cond_dim], normal, device);
        let anchor = dit.takes_anchor().then_some(anchor);
        median_step(self.steps, || {
            let (out, field) =
                dit.forward_parts(x.clone(), t.clone(), Some(cond.clone()), anchor.clone());
            let mut loss = mse(out, target.clone());
            if let Some(field) = field {
                loss = loss + field.powi_scalar(2).mean();
            }
            let grads = GradientsParams::from_grads(loss.backward(), &dit);
            dit = optim.step(LR, dit.clone(), grads);
            B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))
        })
    }

    /// The name of the step in the JSON lines (`toy` or `dit-<preset>`).
    fn name(&self) -> String {
        match self.model.as_str() {
            "dit" => format!("dit-{}", self.preset),
            other => other.to_string(),
        }
    }
}

impl crate::device::Job for StepBench {
    type Out = ();
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        anyhow::ensure!(
            matches!(self.model.as_str(), "toy" | "dit"),
            "unknown --model `{}`: toy or dit",
            self.model
        );
        let name = self.name();
        let mut ours = Vec::new();
        super::bench::burn_then_fused(self.fused_only, |fused| {
            let secs = if self.model == "toy" {
                self.toy_step::<B>(&device)?
            } else {
                self.dit_step::<B>(&device)?
            };
            let which = if fused { "fused" } else { "burn" };
            let key = format!("step/{name}/{which}_ms");
            emit(&key, secs * 1e3, "ms");
            ours.push((key, secs * 1e3));
            Ok(())
        })?;
        if let [(_, burn), (_, fused)] = ours[..] {
            emit(&format!("step/{name}/speedup"), burn / fused, "x");
        }
        if let Some(path) = &self.torch {
            super::bench_ops::against_torch(path, &ours)?;
        }
        Ok(())
    }
}
