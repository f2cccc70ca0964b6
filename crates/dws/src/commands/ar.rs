//! `--backbone ar`: the autoregressive world model (a `dws tokenizer` run + the token
//! transformer of `dws_models::ar`) behind `dws pretrain`, `finetune`, `predict` and
//! `eval`, and [`Simulator`], the one interface `predict` and `eval` roll either
//! backbone out through.
//!
//! An AR run directory is laid out like a flow run (`config.json`, `metrics.jsonl`,
//! `checkpoints/`); its `config.json` says `"backbone": "ar"` and names the tokenizer
//! checkpoint the model was trained on (the tokenizer is not trained here).

use super::tokenizer::{load_tokenizer, tokenizer_checkpoint};
use super::world::{load_world, run_of, DwsConfig, RunConfig, TrainFlags};
use crate::device::Job;
use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::Dataset;
use dws_models::ar::{ArConfig, Sampling};
use dws_models::ar_world::{ar_loss, ar_rollout, ArLossConfig, ArWorld, TokenCache};
use dws_models::checkpoint;
use dws_models::embedders::ActionBatch;
use dws_models::flow::{frames_to_tensor, rollout, WorldModel};
use dws_models::train::{
    clip_actions, train_loop, ClipSource, RunOptionsLite, StepLog, TrainConfig,
};
use dws_models::vq::VqTokenizer;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[ar]` table of a preset: the token transformer's sizes and sampling. Its window
/// is the preset's training clip length; vocabulary and tokens per frame come from the
/// tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArPreset {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
}

/// `config.json` of an AR run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArRunConfig {
    /// Always `ar` (flow runs have no such field).
    pub backbone: String,
    pub command: String,
    pub preset: String,
    pub model: ArConfig,
    /// The tokenizer checkpoint the tokens come from.
    pub tokenizer: PathBuf,
    pub temperature: f32,
    pub top_k: usize,
    pub train: TrainConfig,
    pub dws: Option<DwsConfig>,
    #[serde(default)]
    pub train_new_only: bool,
    pub data: Vec<PathBuf>,
    pub base: Option<PathBuf>,
}

/// Whether the run at `path` (a run or one of its checkpoints) is an AR run.
pub fn is_ar_run(path: &Path) -> bool {
    let cfg = run_of(path).join("config.json");
    std::fs::read_to_string(cfg)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("backbone").and_then(|b| b.as_str()) == Some("ar"))
}

impl ArRunConfig {
    pub fn read(run: &Path) -> Result<Self> {
        let p = run.join("config.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{} is not a dws run (no readable config.json)",
                run.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    fn write(&self, run: &Path) -> Result<()> {
        std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
        std::fs::write(run.join("config.json"), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// The model this config describes (text embeddings computed only with
    /// `encode_text`; otherwise zeros to load a checkpoint into).
    pub fn build<B: Backend>(&self, device: &B::Device, encode_text: bool) -> Result<ArWorld<B>> {
        self.model.validate().map_err(anyhow::Error::msg)?;
        let mut net = self.model.init::<B>(device);
        if let Some(d) = &self.dws {
            net = net.attach_action_modules(d.embedder.cond_dim, device);
        }
        let embedder = super::world::embedder_of(&self.dws, device, encode_text)?;
        Ok(ArWorld { net, embedder })
    }

    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
        }
    }

    /// The stored config when resuming (steps may be raised), else this one, written.
    pub fn resolve(self, flags: &TrainFlags) -> Result<Self> {
        let path = flags.out.join("config.json");
        if flags.resume && path.is_file() {
            ensure!(
                is_ar_run(&flags.out),
                "{} holds a flow-model run; --backbone ar cannot resume it",
                path.display()
            );
            let mut stored = Self::read(&flags.out)?;
            if flags.steps.is_some() && stored.train.steps != self.train.steps {
                stored.train.steps = self.train.steps;
                stored.write(&flags.out)?;
            }
            return Ok(stored);
        }
        self.write(&flags.out)?;
        Ok(self)
    }
}

/// The config of a fresh AR pretrain run on `data` with the tokenizer at `tokenizer`.
pub fn pretrain_config(
    preset_name: &str,
    ar: &ArPreset,
    train: TrainConfig,
    tokenizer: &Path,
    data: Vec<PathBuf>,
) -> Result<ArRunConfig> {
    let (tok_cfg, tok_ckpt) = tokenizer_checkpoint(tokenizer)?;
    let model = ArConfig {
        vocab: tok_cfg.vq.codebook_size,
        tokens_per_frame: tok_cfg.vq.tokens_per_frame(),
        max_frames: train.clip_len,
        width: ar.width,
        depth: ar.depth,
        heads: ar.heads,
        mlp_hidden: ar.mlp_hidden,
    };
    model.validate().map_err(anyhow::Error::msg)?;
    Ok(ArRunConfig {
        backbone: "ar".into(),
        command: "pretrain".into(),
        preset: preset_name.into(),
        model,
        tokenizer: tok_ckpt,
        temperature: ar.temperature,
        top_k: ar.top_k,
        train,
        dws: None,
        train_new_only: false,
        data,
        base: None,
    })
}

/// Checks that the frames of every dataset in `data` are what the tokenizer takes.
fn check_frames(data: &[PathBuf], side: usize) -> Result<()> {
    for d in data {
        let ds = Dataset::open(d).with_context(|| format!("opening dataset {}", d.display()))?;
        let [h, w, c] = ds.header().frame_shape;
        ensure!(
            h == side && w == side && c == 3,
            "{}: frames are {h}×{w}×{c}; the AR model's tokenizer takes {side}×{side} RGB",
            d.join("manifest.json").display()
        );
    }
    Ok(())
}

/// Trains an AR run (`dws pretrain --backbone ar`, `dws finetune` of an AR base) on the
/// device of `flags`; a fresh finetune starts from `base`.
pub fn train(config: ArRunConfig, flags: TrainFlags, base: Option<PathBuf>) -> Result<()> {
    let samplers = super::world::samplers(&config.data, config.train.clip_len)?;
    crate::device::dispatch(
        flags.device,
        ArTrainJob {
            config,
            flags,
            base,
            data: ClipSource { samplers },
        },
    )
}

struct ArTrainJob {
    config: ArRunConfig,
    flags: TrainFlags,
    /// The base run a fresh finetune starts from.
    base: Option<PathBuf>,
    data: ClipSource,
}

impl Job for ArTrainJob {
    type Out = ();
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let cfg = &self.config;
        let run = &self.flags.out;
        B::seed(&device, cfg.train.seed);
        let (tok_cfg, vq, _) = load_tokenizer::<B::InnerBackend>(&cfg.tokenizer, &device)
            .with_context(|| {
                format!(
                    "loading the tokenizer {} named in config.json",
                    cfg.tokenizer.display()
                )
            })?;
        check_frames(&cfg.data, tok_cfg.vq.image_size)?;
        let resuming = self.flags.resume && checkpoint::latest(run).is_some();
        let world: ArWorld<B> = match (&self.base, resuming) {
            (Some(base), false) => {
                let base_cfg = ArRunConfig::read(&run_of(base))?;
                let ckpt = checkpoint::latest(base)
                    .with_context(|| format!("{} has no checkpoint yet", base.display()))?;
                let base_world =
                    checkpoint::load_model(base_cfg.build::<B>(&device, false)?, &ckpt, &device)?;
                tracing::info!("starting from base {}", ckpt.display());
                let mut net = base_world.net;
                let embedder = match &cfg.dws {
                    Some(d) => {
                        net = net.attach_action_modules(d.embedder.cond_dim, &device);
                        Some(d.embedder.init(&device)?)
                    }
                    None => None,
                };
                ArWorld { net, embedder }
            }
            _ => cfg.build::<B>(&device, !resuming)?,
        };
        println!(
            "{} --backbone ar {}: {} parameters ({} trainable), {} tokens per frame from {}, \
             {} steps of {} clips x {} frames",
            cfg.command,
            run.display(),
            world.num_params(),
            if cfg.train_new_only {
                "new ones"
            } else {
                "all"
            },
            cfg.model.tokens_per_frame,
            cfg.tokenizer.display(),
            cfg.train.steps,
            cfg.train.batch,
            cfg.train.clip_len,
        );
        let loss_cfg = ArLossConfig {
            motion: cfg.train.motion_loss,
            strength: cfg.train.motion_strength,
            temperature: cfg.train.motion_temperature,
        };
        let bar = crate::progress::bar(cfg.train.steps as u64, "steps");
        let mut on_step = |s: &StepLog| {
            bar.set_position(s.step as u64);
            bar.set_message(format!("loss {:.4}", s.loss));
        };
        let started = std::time::Instant::now();
        let freeze = cfg.train_new_only;
        // Every frame of the data, up to 1 GiB of token ids.
        let mut cache = TokenCache::new((1 << 28) / cfg.model.tokens_per_frame.max(1));
        train_loop(
            run,
            world,
            &cfg.train,
            &self.data,
            RunOptionsLite {
                resume: resuming,
                stop_after: self.flags.stop_after,
                on_step: &mut on_step,
            },
            |w: ArWorld<B>| if freeze { w.freeze_base() } else { w },
            |world, clips, _rng| {
                let [h, w, c] = clips.frame_shape;
                let (b, f) = (clips.batch, clips.len);
                let x0 =
                    frames_to_tensor::<B::InnerBackend>(&clips.frames, [b, f, h, w, c], &device);
                let tokens = cache.tokenize(&vq, &clips.frames, [b, f, h, w], &device);
                let actions = clip_actions::<B>(clips, &device);
                ar_loss(world, tokens, x0, actions.as_ref(), &loss_cfg)
            },
        )?;
        bar.finish_and_clear();
        super::world::report_training(&cfg.command, run, cfg.train.steps, started)
    }
}

/// How `predict` and `eval` sample: each flag overrides the run's config.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Euler steps per frame (flow runs; default: the run's config).
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Warp-head displacements shorter than this many pixels are set to zero while
    /// sampling, so still parts are copied instead of resampled (flow runs; default: the
    /// run's config; 0 = off). See README, "Status".
    #[arg(long)]
    pub warp_snap: Option<f32>,
    /// Token sampling temperature, 0 = greedy (AR runs; default: the run's config).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the k likeliest tokens, 0 = all (AR runs; default: the run's config).
    #[arg(long)]
    pub top_k: Option<usize>,
}

/// A world model of either backbone, loaded for rolling out (`predict`, `eval`).
pub enum Simulator<B: Backend> {
    Flow {
        cfg: Box<RunConfig>,
        world: Box<WorldModel<B>>,
    },
    Ar {
        cfg: Box<ArRunConfig>,
        world: Box<ArWorld<B>>,
        vq: Box<VqTokenizer<B>>,
    },
}

impl<B: Backend> Simulator<B> {
    /// The newest (or the given) checkpoint of a run of either backbone, with the
    /// sampling flags applied (each refused by the backbone it does not apply to).
    pub fn load(path: &Path, device: &B::Device, flags: &SamplingArgs) -> Result<(Self, PathBuf)> {
        let run = run_of(path);
        if !is_ar_run(path) {
            ensure!(
                flags.temperature.is_none() && flags.top_k.is_none(),
                "--temperature and --top-k set the token sampler of an autoregressive \
                 (--backbone ar) run; {} is a flow-model run",
                run.display()
            );
            let (mut cfg, world, ckpt) = load_world::<B>(path, device)?;
            super::world::override_sampling(&mut cfg, flags.sample_steps, flags.warp_snap)?;
            return Ok((
                Self::Flow {
                    cfg: Box::new(cfg),
                    world: Box::new(world),
                },
                ckpt,
            ));
        }
        if flags.sample_steps.is_some() || flags.warp_snap.is_some() {
            bail!(
                "--sample-steps and --warp-snap set the flow model's sampler; {} is an \
                 autoregressive (--backbone ar) run",
                run.display()
            );
        }
        let mut cfg = ArRunConfig::read(&run)?;
        if let Some(t) = flags.temperature {
            ensure!(
                t.is_finite() && t >= 0.0,
                "--temperature must be 0 (greedy) or more"
            );
            cfg.temperature = t;
        }
        if let Some(k) = flags.top_k {
            cfg.top_k = k;
        }
        let ckpt = checkpoint::latest(path)
            .with_context(|| format!("{} has no checkpoint yet", path.display()))?;
        let world = checkpoint::load_model(cfg.build::<B>(device, false)?, &ckpt, device)?;
        let (_, vq, _) = load_tokenizer::<B>(&cfg.tokenizer, device).with_context(|| {
            format!(
                "loading the tokenizer {} the run was trained with",
                cfg.tokenizer.display()
            )
        })?;
        Ok((
            Self::Ar {
                cfg: Box::new(cfg),
                world: Box::new(world),
                vq: Box::new(vq),
            },
            ckpt,
        ))
    }

    pub fn with_actions(&self) -> bool {
        match self {
            Self::Flow { cfg, .. } => cfg.dws.is_some(),
            Self::Ar { cfg, .. } => cfg.dws.is_some(),
        }
    }

    pub fn backbone(&self) -> &'static str {
        match self {
            Self::Flow { .. } => "flow",
            Self::Ar { .. } => "ar",
        }
    }

    /// Euler steps per frame of a flow model (`None` for AR).
    pub fn sample_steps(&self) -> Option<usize> {
        match self {
            Self::Flow { cfg, .. } => Some(cfg.flow.sample_steps),
            Self::Ar { .. } => None,
        }
    }

    /// How frames are sampled, in words.
    pub fn describe_sampling(&self) -> String {
        match self {
            Self::Flow { cfg, .. } => format!("{} Euler step(s) per frame", cfg.flow.sample_steps),
            Self::Ar { cfg, .. } if cfg.temperature <= 0.0 => "greedy tokens".into(),
            Self::Ar { cfg, .. } => {
                format!(
                    "tokens at temperature {}, top-k {}",
                    cfg.temperature, cfg.top_k
                )
            }
        }
    }

    /// Frames the model sees at once.
    pub fn window(&self) -> usize {
        match self {
            Self::Flow { cfg, .. } => cfg.train.clip_len.min(cfg.model.max_frames),
            Self::Ar { cfg, .. } => cfg.model.max_frames,
        }
    }

    /// `horizon` frames `[B, horizon, C, H, W]` after `context` `[B, K, C, H, W]`, with
    /// the `K - 1 + horizon` actions per clip after each frame (ignored without DWS).
    pub fn rollout(
        &self,
        context: Tensor<B, 5>,
        actions: Option<&ActionBatch<B>>,
        horizon: usize,
        rng: &mut ChaCha8Rng,
    ) -> Tensor<B, 5> {
        match self {
            Self::Flow { cfg, world } => rollout(
                world,
                context,
                actions,
                horizon,
                self.window(),
                &cfg.flow,
                rng,
            ),
            Self::Ar { cfg, world, vq } => {
                ar_rollout(world, vq, context, actions, horizon, cfg.sampling(), rng)
            }
        }
    }
}
