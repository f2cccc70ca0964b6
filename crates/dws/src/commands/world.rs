//! `dws pretrain`, `dws finetune`, `dws predict`: the video world model.
//!
//! A run directory holds `config.json` (the resolved config), `metrics.jsonl` and
//! `checkpoints/`. `pretrain` trains the action-free base video model on one or more
//! datasets; `finetune` loads a base, attaches the DWS action modules and embedder and
//! trains on one dataset with the motion-reinforced loss; `predict` rolls a checkpoint
//! out (see `predict.rs`).

use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ActionSpace, ClipSampler, Dataset};
use dws_models::checkpoint;
use dws_models::embedders::{ActionKind, EmbedderConfig, EmbedderKind};
use dws_models::flow::{FlowConfig, Prediction, WorldModel};
use dws_models::flow_dit::FlowDitConfig;
use dws_models::motion_loss::MotionLoss;
use dws_models::train::{train, ClipSource, RunOptions, StepLog, TrainConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A named preset (`configs/*.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub model: FlowDitConfig,
    pub flow: FlowConfig,
    pub pretrain: TrainConfig,
    pub finetune: TrainConfig,
    pub dws: DwsPreset,
    /// The token transformer of `--backbone ar`.
    #[serde(default)]
    pub ar: Option<super::ar::ArPreset>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DwsPreset {
    /// Width of the action embeddings.
    pub cond_dim: usize,
}

/// Reads a preset by name (built in) or from a TOML file.
pub fn load_preset(name: &str) -> Result<Preset> {
    let text = match name {
        "debug" => include_str!("../../../../configs/debug.toml").to_string(),
        "small" => include_str!("../../../../configs/small.toml").to_string(),
        "paper" => include_str!("../../../../configs/paper.toml").to_string(),
        path if Path::new(path).is_file() => {
            std::fs::read_to_string(path).with_context(|| format!("reading preset {path}"))?
        }
        other => bail!("unknown preset `{other}`: debug, small, paper, or a TOML file path"),
    };
    let preset: Preset = toml::from_str(&text).with_context(|| format!("parsing preset {name}"))?;
    preset.model.validate().map_err(anyhow::Error::msg)?;
    ensure!(
        !preset.model.anchor_input || preset.flow.prediction == Prediction::X0,
        "preset {name}: `anchor_input = true` needs `prediction = \"x0\"` in [flow] (the \
         anchor frame is the last context frame that clean-frame prediction builds on)"
    );
    for (section, train) in [
        ("pretrain", &preset.pretrain),
        ("finetune", &preset.finetune),
    ] {
        ensure!(
            (0.0..=1.0).contains(&train.rollout_context),
            "preset {name}: [{section}] rollout_context is a share of clips, from 0 to 1 (got {})",
            train.rollout_context
        );
        ensure!(
            train.warp_blur.is_finite() && train.warp_blur >= 0.0,
            "preset {name}: [{section}] warp_blur is a width in pixels, 0 (off) or more (got {})",
            train.warp_blur
        );
    }
    Ok(preset)
}

/// DWS settings of a fine-tuned model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DwsConfig {
    pub embedder: EmbedderConfig,
}

/// `config.json` of a run: everything needed to rebuild its model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub command: String,
    pub preset: String,
    pub model: FlowDitConfig,
    pub flow: FlowConfig,
    pub train: TrainConfig,
    /// The action side; `None` for an action-free model.
    pub dws: Option<DwsConfig>,
    /// Train only the new parameters.
    #[serde(default)]
    pub train_new_only: bool,
    pub data: Vec<PathBuf>,
    pub base: Option<PathBuf>,
}

impl RunConfig {
    fn path(run: &Path) -> PathBuf {
        run.join("config.json")
    }

    pub fn read(run: &Path) -> Result<Self> {
        let p = Self::path(run);
        ensure!(
            !super::ar::is_ar_run(run),
            "{} is an autoregressive (--backbone ar) run; only `dws finetune`, `dws predict` \
             and `dws eval` take those so far",
            run.display()
        );
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
        std::fs::write(Self::path(run), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// The model this config describes; text embeddings are computed only with
    /// `encode_text` (otherwise zeros, for loading a checkpoint into).
    pub fn build<B: Backend>(
        &self,
        device: &B::Device,
        encode_text: bool,
    ) -> Result<WorldModel<B>> {
        let mut dit = self.model.init::<B>(device);
        if let Some(d) = &self.dws {
            dit = dit.attach_action_modules(d.embedder.cond_dim, device);
        }
        let embedder = embedder_of(&self.dws, device, encode_text)?;
        Ok(WorldModel { dit, embedder })
    }
}

/// The action embedder of a run's DWS settings (none for an action-free model); text
/// embeddings are computed only with `encode_text` (otherwise zeros, for loading a
/// checkpoint into).
pub fn embedder_of<B: Backend>(
    dws: &Option<DwsConfig>,
    device: &B::Device,
    encode_text: bool,
) -> Result<Option<dws_models::embedders::ActionEmbedder<B>>> {
    Ok(match dws {
        Some(d) if encode_text => Some(d.embedder.init(device)?),
        Some(d) => Some(d.embedder.init_skeleton(device)?),
        None => None,
    })
}

/// The run directory of a path that is a run or one of its checkpoints.
/// The sampling flags of `predict` and `eval` applied over a run's stored config.
pub fn override_sampling(
    cfg: &mut RunConfig,
    sample_steps: Option<usize>,
    warp_snap: Option<f32>,
) -> Result<()> {
    if let Some(s) = sample_steps {
        ensure!(s >= 1, "--sample-steps must be at least 1");
        cfg.flow.sample_steps = s;
    }
    if let Some(px) = warp_snap {
        ensure!(
            px.is_finite() && px >= 0.0,
            "--warp-snap is a length in pixels, 0 or more"
        );
        ensure!(
            cfg.model.warp,
            "--warp-snap needs a model with the warp head; this run's config has `warp = false`"
        );
        cfg.flow.warp_snap = px;
    }
    Ok(())
}

pub fn run_of(path: &Path) -> PathBuf {
    if path.join("state.json").is_file() {
        if let Some(run) = path.parent().and_then(|p| p.parent()) {
            return run.to_path_buf();
        }
    }
    path.to_path_buf()
}

/// Loads the newest (or the given) checkpoint of a run on backend `B`.
pub fn load_world<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(RunConfig, WorldModel<B>, PathBuf)> {
    let run = run_of(path);
    let cfg = RunConfig::read(&run)?;
    let ckpt = checkpoint::latest(path)
        .with_context(|| format!("{} has no checkpoint yet", path.display()))?;
    let world = checkpoint::load_model(cfg.build::<B>(device, false)?, &ckpt, device)?;
    Ok((cfg, world, ckpt))
}

fn parse_dirs(data: &str) -> Vec<PathBuf> {
    data.split(',')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

pub fn samplers(dirs: &[PathBuf], clip_len: usize) -> Result<Vec<ClipSampler>> {
    dirs.iter()
        .map(|d| {
            let ds =
                Dataset::open(d).with_context(|| format!("opening dataset {}", d.display()))?;
            ClipSampler::from_dataset(&ds, clip_len)
                .with_context(|| format!("sampling clips from {}", d.display()))
        })
        .collect()
}

/// Flags shared by the training commands.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainFlags {
    /// debug (about a minute), small (sized to train on 2 CPU cores in under an hour), paper
    /// (GPU), or a TOML file.
    #[arg(long, default_value = "debug")]
    pub preset: String,
    /// Run directory (created; holds config.json, metrics.jsonl, checkpoints/).
    #[arg(long)]
    pub out: PathBuf,
    /// Override the preset's number of steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Stop after this many steps of this invocation, as an interruption would.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct PretrainArgs {
    /// Dataset directories, comma-separated (a mixed corpus; actions are not used).
    #[arg(long)]
    pub data: String,
    /// flow: the flow-matching video transformer; ar: a token transformer over the
    /// frames of a `dws tokenizer` run (--tokenizer).
    #[arg(long, default_value = "flow")]
    pub backbone: Backbone,
    /// The tokenizer run (or checkpoint) of `--backbone ar`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub flags: TrainFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backbone {
    Flow,
    Ar,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FinetuneArgs {
    /// The base model: a pretrain run directory or one of its checkpoints.
    #[arg(long)]
    pub base: PathBuf,
    /// The target environment's dataset.
    #[arg(long)]
    pub data: PathBuf,
    /// on: attach the DWS action module before every block; off: fine-tune without actions.
    #[arg(long, default_value = "on")]
    pub action_module: OnOff,
    /// auto (text for discrete actions, linear for continuous), text, linear or table.
    #[arg(long, default_value = "auto")]
    pub embedder: String,
    /// none, softmax or softmax-max (overrides the preset).
    #[arg(long)]
    pub motion_loss: Option<MotionLoss>,
    /// Strength c of the motion weights (overrides the preset).
    #[arg(long)]
    pub motion_strength: Option<f32>,
    /// Temperature of the motion softmax (overrides the preset).
    #[arg(long)]
    pub motion_temperature: Option<f32>,
    /// all: train every weight; new: only the action modules and the embedder.
    #[arg(long, default_value = "all")]
    pub train: String,
    #[command(flatten)]
    pub flags: TrainFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

struct TrainJob {
    config: RunConfig,
    flags: TrainFlags,
    /// Weights to start from (a base run) for a fresh finetune.
    base: Option<PathBuf>,
}

impl Job for TrainJob {
    type Out = ();
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let cfg = &self.config;
        let run = &self.flags.out;
        let data = ClipSource {
            samplers: samplers(&cfg.data, cfg.train.clip_len)?,
        };
        B::seed(&device, cfg.train.seed);
        // Resuming needs a checkpoint; without one (a run killed before its first) the
        // run starts over.
        let resuming = self.flags.resume && checkpoint::latest(run).is_some();
        let world: WorldModel<B> = match (&self.base, resuming) {
            (Some(base), false) => {
                // Base weights, then the new DWS parts on top.
                let (_, base_world, ckpt) = load_world::<B>(base, &device)?;
                tracing::info!("starting from base {}", ckpt.display());
                let mut dit = base_world.dit;
                let embedder = match &cfg.dws {
                    Some(d) => {
                        dit = dit.attach_action_modules(d.embedder.cond_dim, &device);
                        Some(d.embedder.init(&device)?)
                    }
                    None => None,
                };
                WorldModel { dit, embedder }
            }
            _ => cfg.build::<B>(&device, !resuming)?,
        };
        tracing::info!(
            "{} {}: {} parameters ({} trainable), {} steps of {} clips x {} frames, data {}",
            cfg.command,
            run.display(),
            world.num_params(),
            if cfg.train_new_only {
                "new ones"
            } else {
                "all"
            },
            cfg.train.steps,
            cfg.train.batch,
            cfg.train.clip_len,
            cfg.data
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let bar = crate::progress::bar(cfg.train.steps as u64, "steps");
        let mut on_step = |s: &StepLog| {
            bar.set_position(s.step as u64);
            bar.set_message(format!("loss {:.4}", s.loss));
        };
        let started = std::time::Instant::now();
        train(
            run,
            world,
            &cfg.train,
            &data,
            &cfg.flow,
            RunOptions {
                resume: resuming,
                stop_after: self.flags.stop_after,
                freeze_base: cfg.train_new_only,
                on_step: &mut on_step,
            },
        )?;
        bar.finish_and_clear();
        report_training(&cfg.command, run, cfg.train.steps, started)
    }
}

/// Prints where a training command stopped and what it wrote.
pub fn report_training(
    command: &str,
    run: &Path,
    steps: usize,
    started: std::time::Instant,
) -> Result<()> {
    let last = checkpoint::latest(run).context("training wrote no checkpoint")?;
    let state = checkpoint::read_state(&last)?;
    println!(
        "{command}: step {}/{steps}, last loss {:.4}, {:.1} s; checkpoint {}; metrics {}",
        state.step,
        state.last_loss,
        started.elapsed().as_secs_f64(),
        last.display(),
        run.join("metrics.jsonl").display()
    );
    Ok(())
}

/// Uses the stored config when resuming (and checks the flags agree with it).
fn resolve(config: RunConfig, flags: &TrainFlags) -> Result<RunConfig> {
    if flags.resume && RunConfig::path(&flags.out).is_file() {
        let stored = RunConfig::read(&flags.out)?;
        if stored.train.steps != config.train.steps && flags.steps.is_some() {
            let mut s = stored;
            s.train.steps = config.train.steps;
            s.write(&flags.out)?;
            return Ok(s);
        }
        return Ok(stored);
    }
    config.write(&flags.out)?;
    Ok(config)
}

pub fn pretrain(args: PretrainArgs) -> Result<()> {
    let preset = load_preset(&args.flags.preset)?;
    let mut train_cfg = preset.pretrain.clone();
    if let Some(s) = args.flags.steps {
        train_cfg.steps = s;
    }
    let data = parse_dirs(&args.data);
    if data.is_empty() {
        bail!("--data needs at least one dataset directory");
    }
    if args.backbone == Backbone::Ar {
        let tokenizer = args
            .tokenizer
            .as_ref()
            .context("--backbone ar needs --tokenizer (a `dws tokenizer train` run)")?;
        let ar = preset.ar.as_ref().with_context(|| {
            format!(
                "preset `{}` has no [ar] table for --backbone ar",
                args.flags.preset
            )
        })?;
        let config =
            super::ar::pretrain_config(&args.flags.preset, ar, train_cfg, tokenizer, data)?
                .resolve(&args.flags)?;
        return super::ar::train(config, args.flags, None);
    }
    if args.tokenizer.is_some() {
        bail!("--tokenizer is for --backbone ar");
    }
    let config = RunConfig {
        command: "pretrain".into(),
        preset: args.flags.preset.clone(),
        model: preset.model,
        flow: preset.flow,
        train: train_cfg,
        dws: None,
        train_new_only: false,
        data,
        base: None,
    };
    let config = resolve(config, &args.flags)?;
    dispatch(
        args.flags.device,
        TrainJob {
            config,
            flags: args.flags,
            base: None,
        },
    )
}

pub fn finetune(args: FinetuneArgs) -> Result<()> {
    let preset = load_preset(&args.flags.preset)?;
    let base_run = run_of(&args.base);
    let ds =
        Dataset::open(&args.data).with_context(|| format!("opening {}", args.data.display()))?;
    let header = ds.header();
    let actions = match &header.action_space {
        ActionSpace::Discrete { n } => ActionKind::Discrete {
            n: *n,
            templates: header.action_templates.clone(),
        },
        ActionSpace::Continuous { dim, .. } => ActionKind::Continuous { dim: *dim },
    };
    let kind = match (args.embedder.as_str(), &actions) {
        ("auto", ActionKind::Discrete { templates, .. }) if !templates.is_empty() => {
            EmbedderKind::Text
        }
        ("auto", ActionKind::Discrete { .. }) => EmbedderKind::Table,
        ("auto", ActionKind::Continuous { .. }) => EmbedderKind::Linear,
        (other, _) => other.parse().map_err(anyhow::Error::msg)?,
    };
    let mut train_cfg = preset.finetune.clone();
    if let Some(s) = args.flags.steps {
        train_cfg.steps = s;
    }
    if let Some(m) = args.motion_loss {
        train_cfg.motion_loss = m;
    }
    if let Some(c) = args.motion_strength {
        train_cfg.motion_strength = c;
    }
    if let Some(t) = args.motion_temperature {
        train_cfg.motion_temperature = t;
    }
    let train_new_only = match args.train.as_str() {
        "all" => false,
        "new" => true,
        other => bail!("--train must be all or new, not `{other}`"),
    };
    if train_new_only && args.action_module == OnOff::Off {
        bail!("--train new with --action-module off would train nothing");
    }
    let dws = (args.action_module == OnOff::On).then_some(DwsConfig {
        embedder: EmbedderConfig {
            kind,
            actions,
            cond_dim: preset.dws.cond_dim,
        },
    });
    if super::ar::is_ar_run(&base_run) {
        let base_cfg =
            super::ar::ArRunConfig::read(&base_run).context("reading the base model's config")?;
        ensure!(
            base_cfg.dws.is_none(),
            "{} is already fine-tuned with actions; fine-tune its action-free base",
            base_run.display()
        );
        ensure!(
            train_cfg.clip_len <= base_cfg.model.max_frames,
            "the preset's clips of {} frames do not fit the base model's window of {}",
            train_cfg.clip_len,
            base_cfg.model.max_frames
        );
        let config = super::ar::ArRunConfig {
            command: "finetune".into(),
            preset: args.flags.preset.clone(),
            train: train_cfg,
            dws,
            train_new_only,
            data: vec![args.data.clone()],
            base: Some(args.base.clone()),
            ..base_cfg
        }
        .resolve(&args.flags)?;
        return super::ar::train(config, args.flags, Some(args.base));
    }
    let base_cfg = RunConfig::read(&base_run).context("reading the base model's config")?;
    let config = RunConfig {
        command: "finetune".into(),
        preset: args.flags.preset.clone(),
        model: base_cfg.model.clone(),
        flow: preset.flow,
        train: train_cfg,
        dws,
        train_new_only,
        data: vec![args.data.clone()],
        base: Some(args.base.clone()),
    };
    let config = resolve(config, &args.flags)?;
    dispatch(
        args.flags.device,
        TrainJob {
            config,
            flags: args.flags,
            base: Some(args.base),
        },
    )
}
