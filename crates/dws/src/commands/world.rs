//! `dws pretrain`, `dws finetune`, `dws predict`: the video world model.
//!
//! A run directory holds `config.json` (the resolved config), `metrics.jsonl` and
//! `checkpoints/`. `pretrain` trains the action-free base video model on one or more
//! datasets; `finetune` loads a base, attaches the DWS action modules and embedder and
//! trains on one dataset with the motion-reinforced loss; `predict` rolls a checkpoint
//! out on a dataset episode and writes ground truth and prediction side by side.

use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ActionSpace, Actions, ClipSampler, Dataset};
use dws_models::checkpoint;
use dws_models::embedders::{ActionBatch, ActionKind, EmbedderConfig, EmbedderKind};
use dws_models::flow::{frames_to_tensor, rollout, tensor_to_frames, FlowConfig, WorldModel};
use dws_models::flow_dit::FlowDitConfig;
use dws_models::motion_loss::MotionLoss;
use dws_models::train::{train, ClipSource, RunOptions, StepLog, TrainConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
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
        let embedder = match &self.dws {
            Some(d) => {
                dit = dit.attach_action_modules(d.embedder.cond_dim, device);
                Some(if encode_text {
                    d.embedder.init(device)?
                } else {
                    d.embedder.init_skeleton(device)?
                })
            }
            None => None,
        };
        Ok(WorldModel { dit, embedder })
    }
}

/// The run directory of a path that is a run or one of its checkpoints.
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

fn samplers(dirs: &[PathBuf], clip_len: usize) -> Result<Vec<ClipSampler>> {
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
    #[command(flatten)]
    pub flags: TrainFlags,
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
            cfg.flow.shift,
            RunOptions {
                resume: resuming,
                stop_after: self.flags.stop_after,
                freeze_base: cfg.train_new_only,
                on_step: &mut on_step,
            },
        )?;
        bar.finish_and_clear();
        let last = checkpoint::latest(run).context("training wrote no checkpoint")?;
        let state = checkpoint::read_state(&last)?;
        println!(
            "{}: step {}/{}, last loss {:.4}, {:.1} s; checkpoint {}; metrics {}",
            cfg.command,
            state.step,
            cfg.train.steps,
            state.last_loss,
            started.elapsed().as_secs_f64(),
            last.display(),
            run.join("metrics.jsonl").display()
        );
        Ok(())
    }
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
    let config = RunConfig {
        command: "pretrain".into(),
        preset: args.flags.preset.clone(),
        model: preset.model,
        flow: preset.flow,
        train: train_cfg,
        dws: None,
        train_new_only: false,
        data: parse_dirs(&args.data),
        base: None,
    };
    if config.data.is_empty() {
        bail!("--data needs at least one dataset directory");
    }
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
    let base_cfg = RunConfig::read(&base_run).context("reading the base model's config")?;
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
    let config = RunConfig {
        command: "finetune".into(),
        preset: args.flags.preset.clone(),
        model: base_cfg.model.clone(),
        flow: preset.flow,
        train: train_cfg,
        dws: (args.action_module == OnOff::On).then_some(DwsConfig {
            embedder: EmbedderConfig {
                kind,
                actions,
                cond_dim: preset.dws.cond_dim,
            },
        }),
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

#[derive(clap::Args, Clone, Debug)]
pub struct PredictArgs {
    /// A run directory or checkpoint.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Dataset to take the episode (start frames and actions) from.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub episode: usize,
    /// Take the actions from this episode instead (same start, other actions).
    #[arg(long)]
    pub actions_from: Option<usize>,
    /// Context frames given to the model.
    #[arg(long, default_value_t = 1)]
    pub context: usize,
    /// Frames to predict.
    #[arg(long, default_value_t = 15)]
    pub horizon: usize,
    /// Output GIF (ground truth | prediction | difference).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// Prediction errors of one rollout.
#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    pub mse_per_frame: Vec<f64>,
    pub psnr_per_frame: Vec<f64>,
    pub mean_mse: f64,
    pub mean_psnr: f64,
}

/// Which rollout [`predict_episode`] makes.
#[derive(Debug, Clone, Copy)]
pub struct RolloutSpec {
    pub episode: usize,
    /// Take the actions from this episode instead.
    pub actions_from: Option<usize>,
    pub context: usize,
    pub horizon: usize,
    pub seed: u64,
}

/// Predicted frames `[horizon, H, W, 3]` for one episode, and the ground truth.
pub fn predict_episode<B: Backend>(
    cfg: &RunConfig,
    world: &WorldModel<B>,
    ds: &Dataset,
    spec: RolloutSpec,
    device: &B::Device,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let RolloutSpec {
        episode,
        actions_from,
        context,
        horizon,
        seed,
    } = spec;
    let ep = ds.read_episode(episode)?;
    let need = context + horizon;
    if ep.num_frames() < need {
        bail!(
            "episode {episode} of {} has {} frames; --context {context} --horizon {horizon} needs {need}",
            ds.dir().display(),
            ep.num_frames()
        );
    }
    let act_ep = match actions_from {
        Some(j) => ds.read_episode(j)?,
        None => ep.clone(),
    };
    let n_actions = context - 1 + horizon;
    if act_ep.steps() < n_actions {
        bail!(
            "the action episode has {} actions; {n_actions} are needed",
            act_ep.steps()
        );
    }
    let [h, w, c] = ep.frame_shape;
    let f = ep.frame_len();
    let ctx = frames_to_tensor::<B>(&ep.frames[..context * f], [1, context, h, w, c], device);
    let actions = match &act_ep.actions {
        Actions::Discrete(ids) => ActionBatch::Discrete(Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                ids[..n_actions]
                    .iter()
                    .map(|&a| a as i64)
                    .collect::<Vec<_>>(),
                [1, n_actions],
            ),
            device,
        )),
        Actions::Continuous { dim, data } => ActionBatch::Continuous(Tensor::<B, 3>::from_data(
            TensorData::new(data[..n_actions * dim].to_vec(), [1, n_actions, *dim]),
            device,
        )),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let window = cfg.train.clip_len.min(cfg.model.max_frames);
    let pred = rollout(
        world,
        ctx,
        Some(&actions),
        horizon,
        window,
        &cfg.flow,
        &mut rng,
    );
    let truth = ep.frames[context * f..need * f].to_vec();
    Ok((tensor_to_frames(pred), truth))
}

pub fn errors(pred: &[u8], truth: &[u8], frame_len: usize) -> PredictReport {
    let mse: Vec<f64> = pred
        .chunks(frame_len)
        .zip(truth.chunks(frame_len))
        .map(|(p, t)| {
            p.iter()
                .zip(t)
                .map(|(a, b)| {
                    let d = (*a as f64 - *b as f64) / 255.0;
                    d * d
                })
                .sum::<f64>()
                / frame_len as f64
        })
        .collect();
    let psnr: Vec<f64> = mse
        .iter()
        .map(|m| 10.0 * (1.0 / m.max(1e-10)).log10())
        .collect();
    PredictReport {
        mean_mse: mse.iter().sum::<f64>() / mse.len().max(1) as f64,
        mean_psnr: psnr.iter().sum::<f64>() / psnr.len().max(1) as f64,
        mse_per_frame: mse,
        psnr_per_frame: psnr,
    }
}

struct PredictJob(PredictArgs);

impl Job for PredictJob {
    type Out = PredictReport;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PredictReport> {
        let a = self.0;
        let (cfg, world, ckpt) = load_world::<B::InnerBackend>(&a.ckpt, &device)?;
        let ds = Dataset::open(&a.data)?;
        let spec = RolloutSpec {
            episode: a.episode,
            actions_from: a.actions_from,
            context: a.context,
            horizon: a.horizon,
            seed: a.seed,
        };
        let (pred, truth) = predict_episode(&cfg, &world, &ds, spec, &device)?;
        let [h, w, _] = ds.header().frame_shape;
        let report = errors(&pred, &truth, h * w * 3);
        // Reference: repeating the last context frame for every predicted frame.
        let ep = ds.read_episode(a.episode)?;
        let last = ep.frame(a.context - 1);
        let copy: Vec<u8> = (0..a.horizon).flat_map(|_| last.iter().copied()).collect();
        let baseline = errors(&copy, &truth, h * w * 3);
        crate::report::write_side_by_side_gif(&a.out, &truth, &pred, h, w, 3)?;
        println!(
            "predicted {} frames of episode {} from {} ({}): mean MSE {:.5}, mean PSNR {:.2} dB",
            a.horizon,
            a.episode,
            ckpt.display(),
            if cfg.dws.is_some() {
                "with actions"
            } else {
                "no actions"
            },
            report.mean_mse,
            report.mean_psnr
        );
        println!(
            "reference (repeat the last context frame): mean MSE {:.5}, mean PSNR {:.2} dB",
            baseline.mean_mse, baseline.mean_psnr
        );
        println!(
            "wrote {} (ground truth | prediction | difference)",
            a.out.display()
        );
        Ok(report)
    }
}

pub fn predict(args: PredictArgs) -> Result<PredictReport> {
    let device = args.device;
    dispatch(device, PredictJob(args))
}
