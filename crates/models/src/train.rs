//! The training loop shared by `pretrain` and `finetune`: sample clips, rectified-flow
//! loss (motion-weighted), AdamW with warm-up and gradient clipping, JSON-lines metrics,
//! atomic checkpoints, exact resume (model record, optimizer state, random stream).

use crate::checkpoint::{self, TrainState};
use crate::embedders::ActionBatch;
use crate::flow::{flow_loss, frames_to_tensor, FlowBatch, FlowConfig, LossConfig, WorldModel};
use crate::motion_loss::MotionLoss;
use crate::{ModelError, Result};
use burn::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{Actions, ClipBatch, ClipSampler};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Optimisation settings of one training command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Clips per step.
    pub batch: usize,
    /// Frames per training clip (context + predicted).
    pub clip_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    pub weight_decay: f32,
    /// Gradient norm clip.
    pub grad_clip: f32,
    pub motion_loss: MotionLoss,
    /// `c` of the motion weights.
    pub motion_strength: f32,
    pub motion_temperature: f32,
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Share of training clips whose later context frames are the model's own
    /// predictions (flow models; see `flow::flow_loss`). Configs written before this
    /// field had none.
    #[serde(default)]
    pub rollout_context: f32,
    /// Gaussian width (pixels) of the blurred warp loss of flow models with the warp head
    /// (see `flow::flow_loss`); 0 = off. Configs written before this field had none.
    #[serde(default)]
    pub warp_blur: f32,
}

impl TrainConfig {
    /// The loss these settings and a flow config describe.
    pub fn loss_config(&self, flow: &FlowConfig) -> LossConfig {
        LossConfig {
            motion: self.motion_loss,
            strength: self.motion_strength,
            temperature: self.motion_temperature,
            flow: *flow,
            rollout_context: self.rollout_context,
            warp_blur: self.warp_blur,
        }
    }
}

/// One logged step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub loss: f32,
    pub lr: f64,
    pub steps_per_s: f64,
}

/// Where training clips come from: one or more datasets, each clip drawn from a dataset
/// chosen uniformly.
pub struct ClipSource {
    pub samplers: Vec<ClipSampler>,
}

impl ClipSource {
    pub fn sample(&self, batch: usize, rng: &mut ChaCha8Rng) -> ClipBatch {
        if self.samplers.len() == 1 {
            return self.samplers[0].sample(batch, rng);
        }
        let mut out: Option<ClipBatch> = None;
        for _ in 0..batch {
            let d = rng.gen_range(0..self.samplers.len());
            let one = self.samplers[d].sample(1, rng);
            match &mut out {
                None => out = Some(one),
                Some(acc) => {
                    acc.batch += 1;
                    acc.frames.extend_from_slice(&one.frames);
                    acc.rewards.extend_from_slice(&one.rewards);
                    acc.terminated.extend_from_slice(&one.terminated);
                    acc.truncated.extend_from_slice(&one.truncated);
                    // Mixed corpora train action-free: their actions are not kept.
                    acc.actions = Actions::Discrete(Vec::new());
                }
            }
        }
        out.expect("batch >= 1")
    }
}

/// Tensors of a clip batch; actions only when they are all of one kind and complete.
pub fn to_flow_batch<B: Backend>(clips: &ClipBatch, device: &B::Device) -> FlowBatch<B> {
    let [h, w, c] = clips.frame_shape;
    let (b, f) = (clips.batch, clips.len);
    let x0 = frames_to_tensor::<B>(&clips.frames, [b, f, h, w, c], device);
    FlowBatch {
        x0,
        actions: clip_actions(clips, device),
    }
}

/// The `F - 1` actions per clip of a clip batch as tensors, when they are all of one
/// kind and complete (a mixed corpus has none).
pub fn clip_actions<B: Backend>(clips: &ClipBatch, device: &B::Device) -> Option<ActionBatch<B>> {
    let (b, f) = (clips.batch, clips.len);
    let steps = f.saturating_sub(1);
    match &clips.actions {
        Actions::Discrete(ids) if ids.len() == b * steps && steps > 0 => {
            Some(ActionBatch::Discrete(Tensor::<B, 2, Int>::from_data(
                TensorData::new(
                    ids.iter().map(|&a| a as i64).collect::<Vec<_>>(),
                    [b, steps],
                ),
                device,
            )))
        }
        Actions::Continuous { dim, data } if data.len() == b * steps * dim && steps > 0 => {
            Some(ActionBatch::Continuous(Tensor::<B, 3>::from_data(
                TensorData::new(data.clone(), [b, steps, *dim]),
                device,
            )))
        }
        _ => None,
    }
}

fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    if cfg.warmup > 0 && step < cfg.warmup {
        cfg.lr * (step + 1) as f64 / cfg.warmup as f64
    } else {
        cfg.lr
    }
}

/// Options of one invocation (not part of the run's config).
pub struct RunOptions<'a> {
    pub resume: bool,
    /// Stop after this many steps of this invocation, as an interruption would (the
    /// last step is checkpointed).
    pub stop_after: Option<usize>,
    /// Train only the action modules and the embedder.
    pub freeze_base: bool,
    pub on_step: &'a mut dyn FnMut(&StepLog),
}

/// Options of one invocation of a training loop without frozen parts.
pub struct RunOptionsLite<'a, L> {
    pub resume: bool,
    /// Stop after this many steps of this invocation (the last step is checkpointed).
    pub stop_after: Option<usize>,
    pub on_step: &'a mut dyn FnMut(&L),
}

/// Trains `world` (whose frozen parts are already marked) on `data`, writing metrics and
/// checkpoints into `run`. With `resume`, continues from the newest checkpoint there.
pub fn train<B: AutodiffBackend>(
    run: &Path,
    world: WorldModel<B>,
    cfg: &TrainConfig,
    data: &ClipSource,
    flow: &FlowConfig,
    opts: RunOptions<'_>,
) -> Result<WorldModel<B>> {
    let device = world.dit.devices().first().cloned().unwrap_or_default();
    let loss_cfg = cfg.loss_config(flow);
    let freeze = opts.freeze_base;
    train_loop(
        run,
        world,
        cfg,
        data,
        RunOptionsLite {
            resume: opts.resume,
            stop_after: opts.stop_after,
            on_step: opts.on_step,
        },
        |w| if freeze { w.freeze_base() } else { w },
        |world, clips, rng| flow_loss(world, to_flow_batch::<B>(clips, &device), &loss_cfg, rng),
    )
}

/// The loop every clip-trained model shares: per step a batch of clips from `data`, the
/// loss `loss` makes of it, AdamW with warm-up and gradient clipping; JSON-lines metrics
/// and atomic checkpoints into `run`, exact resume (weights, optimiser state, random
/// stream). `prepare` runs on the model after any checkpoint is loaded (to freeze
/// parts).
pub fn train_loop<B, M>(
    run: &Path,
    mut model: M,
    cfg: &TrainConfig,
    data: &ClipSource,
    opts: RunOptionsLite<'_, StepLog>,
    prepare: impl FnOnce(M) -> M,
    mut loss: impl FnMut(&M, &ClipBatch, &mut ChaCha8Rng) -> Tensor<B, 1>,
) -> Result<M>
where
    B: AutodiffBackend,
    M: burn::module::AutodiffModule<B>,
{
    let device = model.devices().first().cloned().unwrap_or_default();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(cfg.grad_clip)))
        .init::<B, M>();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut start = 0;
    let metrics = run.join("metrics.jsonl");
    if opts.resume {
        if let Some(ckpt) = checkpoint::latest(run) {
            let state = checkpoint::read_state(&ckpt)?;
            model = checkpoint::load_model(model, &ckpt, &device)?;
            optim = optim.load_record(checkpoint::load_optim(&ckpt, &device)?);
            rng = ChaCha8Rng::seed_from_u64(state.rng_seed);
            rng.set_word_pos(state.rng_word_pos);
            start = state.step;
            truncate_metrics(&metrics, start)?;
            tracing::info!("resuming {} from step {start}", run.display());
        }
    } else if metrics.exists() {
        fs::remove_file(&metrics).map_err(|e| ModelError::Io {
            path: metrics.clone(),
            source: e,
        })?;
    }
    model = prepare(model);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .map_err(|e| ModelError::Io {
            path: metrics.clone(),
            source: e,
        })?;
    let started = Instant::now();
    let end = match opts.stop_after {
        Some(n) => (start + n).min(cfg.steps),
        None => cfg.steps,
    };
    for step in start..end {
        let clips = data.sample(cfg.batch, &mut rng);
        let loss = loss(&model, &clips, &mut rng);
        let loss_value: f32 = loss.clone().into_scalar().elem();
        if !loss_value.is_finite() {
            return Err(ModelError::Invalid(format!(
                "loss became {loss_value} at step {}; lower the learning rate",
                step + 1
            )));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = lr_at(cfg, step);
        model = optim.step(lr, model, grads);
        let entry = StepLog {
            step: step + 1,
            loss: loss_value,
            lr,
            steps_per_s: (step + 1 - start) as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        writeln!(
            log,
            "{}",
            serde_json::to_string(&entry).expect("log serialises")
        )
        .map_err(|e| ModelError::Io {
            path: metrics.clone(),
            source: e,
        })?;
        (opts.on_step)(&entry);
        let last = step + 1 == end;
        if (step + 1) % cfg.checkpoint_every.max(1) == 0 || last {
            let state = TrainState {
                step: step + 1,
                rng_seed: cfg.seed,
                rng_word_pos: rng.get_word_pos(),
                last_loss: loss_value,
            };
            checkpoint::save::<B, _>(run, &model, optim.to_record(), &state, cfg.keep_last)?;
        }
    }
    Ok(model)
}

/// Drops logged steps after `step` (they are redone on resume).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    truncate_log::<StepLog>(path, |e| e.step <= step).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Keeps the lines of a JSON-lines log that parse as `T` and pass `keep` (a resumed run
/// redoes the rest). A missing log is left missing.
pub fn truncate_log<T: serde::de::DeserializeOwned>(
    path: &Path,
    keep: impl Fn(&T) -> bool,
) -> std::io::Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<T>(l)
                .map(|e| keep(&e))
                .unwrap_or(false)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    fs::write(path, out)
}
