//! `dws mbrl`: model-based RL with a DWS world simulator and prioritized imagination
//! (the loop is `dws_rl::mbrl`).
//!
//! Writes into `--out`: `config.json`, `baseline.json` (the random policy on the same
//! env), `metrics.jsonl` (one line per update), `agent/`, `world/` (a world-model run:
//! `dws predict --run OUT/world` rolls the fine-tuned simulator out), `reward/`,
//! `replay/`, `starts-*.safetensors`, `state.json`, and at the end `returns.png` and
//! `summary.json`.

use super::ppo::{baseline, first_and_last, make_vec_env, read_jsonl, stored_config, write_plot};
use super::world::{load_preset, load_world, DwsConfig, RunConfig};
use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{ensure, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use dws_envs::{ActionSpace, EnvConfig, EnvSpec, VecEnv};
use dws_models::embedders::{ActionKind, EmbedderConfig, EmbedderKind};
use dws_models::flow::WorldModel;
use dws_models::reward::RewardConfig;
use dws_rl::imagine::ImaginedVecEnv;
use dws_rl::imagine::Starts;
use dws_rl::mbrl::{self, Mbrl, MbrlConfig, MbrlLog, MbrlOptions};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct MbrlArgs {
    /// Environment id (`dws envs` lists them), e.g. procgen:coinrun.
    #[arg(long)]
    pub env: String,
    /// Env options as key=value pairs, e.g. distribution_mode=easy.
    #[arg(long, default_value = "")]
    pub env_opts: String,
    /// Real env steps to train for (summed over the parallel envs).
    #[arg(long, default_value_t = 200_000)]
    pub steps: u64,
    /// debug (seconds) or small (two CPU cores).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// World-model preset (debug, small, paper or a TOML file) for the video model's
    /// size and loss when no --base is given. Default: debug (imagination speed on CPU).
    #[arg(long, default_value = "debug")]
    pub world_preset: String,
    /// A world-model run (pretrain or finetune) to start the simulator from; without it
    /// the video model starts untrained.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Action embedder: auto (text templates where the env has them, else a table or a
    /// linear map), text, table or linear.
    #[arg(long, default_value = "auto")]
    pub embedder: String,
    /// Where imagination starts: prioritized (by |TD error|) or uniform.
    #[arg(long)]
    pub starts: Option<Starts>,
    /// Imagined env steps per real env step (0: model-free PPO with the same models
    /// trained alongside).
    #[arg(long)]
    pub imagined_ratio: Option<f32>,
    /// Imagined trajectory length.
    #[arg(long)]
    pub horizon: Option<usize>,
    /// Parallel real envs (overrides the preset).
    #[arg(long)]
    pub num_envs: Option<usize>,
    /// Run directory.
    #[arg(long, default_value = "runs/mbrl")]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Updates between checkpoints.
    #[arg(long, default_value_t = 5)]
    pub checkpoint_every: usize,
    /// Checkpoints kept (at least 2).
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Evaluate the policy in the real env every N updates (0: never).
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Episodes per evaluation.
    #[arg(long, default_value_t = 32)]
    pub eval_episodes: usize,
    /// Episodes of the random policy measured before training (0: skip).
    #[arg(long, default_value_t = 100)]
    pub baseline_episodes: usize,
    /// Stop after this many updates in this call (for tests of resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// What a run was started with (`config.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MbrlRunConfig {
    pub env: EnvConfig,
    pub mbrl: MbrlConfig,
    pub reward: RewardConfig,
    pub world_preset: String,
    pub base: Option<PathBuf>,
    pub embedder: String,
    pub steps: u64,
    pub seed: u64,
}

/// What a finished `dws mbrl` reports (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MbrlSummary {
    pub env: String,
    pub starts: Starts,
    pub imagined_ratio: f32,
    pub env_steps: u64,
    pub imagined_steps: u64,
    pub updates: usize,
    /// Mean return of the real training episodes over the first and last tenth.
    pub first_return: Option<f32>,
    pub last_return: Option<f32>,
    /// The last evaluation's mean return.
    pub eval_return: Option<f32>,
    pub random_return: Option<f32>,
    pub seconds: f64,
}

fn resolve(args: &MbrlArgs) -> Result<MbrlRunConfig> {
    let opts = dws_envs::config::parse_options(&args.env_opts).map_err(anyhow::Error::msg)?;
    let env = EnvConfig::parse(&args.env, &opts)?;
    if args.resume {
        if let Some(mut stored) =
            stored_config::<MbrlRunConfig>(&args.out, &env, |c| &c.env, "dws mbrl")?
        {
            stored.steps = args.steps;
            return Ok(stored);
        }
    }
    let mut mbrl = MbrlConfig::preset(&args.preset)?;
    if let Some(s) = args.starts {
        mbrl.starts = s;
    }
    if let Some(r) = args.imagined_ratio {
        mbrl.imagined_ratio = r;
    }
    if let Some(h) = args.horizon {
        mbrl.horizon = h;
    }
    if let Some(n) = args.num_envs {
        mbrl.ppo.num_envs = n;
    }
    mbrl.validate()?;
    ensure!(args.keep_last >= 2, "--keep-last must be at least 2");
    // The env's frame side and action space size the reward model.
    let spec = dws_envs::make(&env)
        .with_context(|| format!("making {}", env.id()))?
        .spec()
        .clone();
    let side = spec.frame_shape[0];
    let reward = RewardConfig::small(side, dws_rl::sim::reward_action_dim(&spec.action_space));
    reward.validate().map_err(anyhow::Error::msg)?;
    Ok(MbrlRunConfig {
        env,
        mbrl,
        reward,
        world_preset: args.world_preset.clone(),
        base: args.base.clone(),
        embedder: args.embedder.clone(),
        steps: args.steps,
        seed: args.seed,
    })
}

/// The action side of the simulator for an env.
fn embedder_config(spec: &EnvSpec, choice: &str, cond_dim: usize) -> Result<EmbedderConfig> {
    let actions = match &spec.action_space {
        ActionSpace::Discrete { n } => ActionKind::Discrete {
            n: *n,
            templates: spec.action_templates.clone(),
        },
        ActionSpace::Continuous { dim, .. } => ActionKind::Continuous { dim: *dim },
    };
    let kind = match (choice, &actions) {
        ("auto", ActionKind::Discrete { templates, .. }) if !templates.is_empty() => {
            EmbedderKind::Text
        }
        ("auto", ActionKind::Discrete { .. }) => EmbedderKind::Table,
        ("auto", ActionKind::Continuous { .. }) => EmbedderKind::Linear,
        (other, _) => other.parse().map_err(anyhow::Error::msg)?,
    };
    Ok(EmbedderConfig {
        kind,
        actions,
        cond_dim,
    })
}

/// The world-model run config of the simulator, and the simulator: from `--base` (its
/// weights; DWS action modules attached when it has none) or untrained from the preset.
fn build_world<B: AutodiffBackend>(
    config: &MbrlRunConfig,
    spec: &EnvSpec,
    device: &B::Device,
) -> Result<(RunConfig, WorldModel<B>)> {
    let preset = load_preset(&config.world_preset)?;
    let (model_cfg, base) = match &config.base {
        Some(path) => {
            let (cfg, world, _) = load_world::<B>(path, device)
                .with_context(|| format!("loading the base world model {}", path.display()))?;
            (cfg.model.clone(), Some((cfg, world)))
        }
        None => (preset.model.clone(), None),
    };
    let [h, w, _] = spec.frame_shape;
    ensure!(
        model_cfg.image_size == h && h == w,
        "the world model takes {s}×{s} frames; {} has {h}×{w}",
        spec.id,
        s = model_cfg.image_size
    );
    ensure!(
        model_cfg.max_frames > config.mbrl.context,
        "the world model sees at most {} frames; imagination needs context + 1 = {}",
        model_cfg.max_frames,
        config.mbrl.context + 1
    );
    let mut train = preset.finetune.clone();
    train.clip_len = config.mbrl.context + 1;
    train.batch = config.mbrl.world_batch;
    train.lr = config.mbrl.world_lr;
    // What the simulator is: the base's weights (with DWS attached where it has none),
    // or an untrained model of the preset's size.
    let (dws, world, flow) = match base {
        Some((cfg, world)) if cfg.dws.is_some() => {
            let dws = cfg.dws.clone().expect("checked");
            let want = embedder_config(spec, &config.embedder, dws.embedder.cond_dim)?;
            ensure!(
                dws.embedder.actions == want.actions,
                "the base world model was fine-tuned for other actions ({:?}) than {} has",
                dws.embedder.actions,
                spec.id
            );
            (dws, Some(world), cfg.flow)
        }
        Some((cfg, mut world)) => {
            let e = embedder_config(spec, &config.embedder, preset.dws.cond_dim)?;
            world.dit = world.dit.attach_action_modules(e.cond_dim, device);
            world.embedder = Some(e.init(device)?);
            (DwsConfig { embedder: e }, Some(world), cfg.flow)
        }
        None => {
            let e = embedder_config(spec, &config.embedder, preset.dws.cond_dim)?;
            (DwsConfig { embedder: e }, None, preset.flow)
        }
    };
    let run = RunConfig {
        command: "mbrl".into(),
        preset: config.world_preset.clone(),
        model: model_cfg,
        flow,
        train,
        dws: Some(dws),
        train_new_only: false,
        data: Vec::new(),
        base: config.base.clone(),
    };
    let world = match world {
        Some(w) => w,
        None => run.build::<B>(device, true)?,
    };
    Ok((run, world))
}

struct MbrlJob {
    args: MbrlArgs,
    config: MbrlRunConfig,
}

impl Job for MbrlJob {
    type Out = MbrlSummary;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<MbrlSummary> {
        let MbrlJob { args, config } = self;
        let out = &args.out;
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        fs::write(
            out.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        let mut env = make_vec_env(&config.env, config.mbrl.ppo.num_envs)?;
        let spec = env.spec().clone();
        let baseline = baseline(
            out,
            &config.env,
            config.mbrl.ppo.num_envs,
            args.baseline_episodes,
            config.seed,
        )?;
        let (world_cfg, world) = build_world::<B>(&config, &spec, &device)?;
        let world_dir = out.join("world");
        fs::create_dir_all(&world_dir)?;
        fs::write(
            world_dir.join("config.json"),
            serde_json::to_string_pretty(&world_cfg)?,
        )?;
        let loss = world_cfg.train.loss_config(&world_cfg.flow);
        let reward = config.reward.init::<B>(&device);
        let mut state = Mbrl::<B>::new(
            config.mbrl.clone(),
            spec.clone(),
            world,
            reward,
            loss,
            world_cfg.flow,
            config.seed,
            &device,
        )?;
        let mut eval_env = if args.eval_every > 0 && args.eval_episodes > 0 {
            Some(make_vec_env(&config.env, config.mbrl.ppo.num_envs)?)
        } else {
            None
        };
        let total = mbrl::iterations(&config.mbrl, config.steps);
        let m = &config.mbrl;
        println!(
            "mbrl on {}: {} updates of {} envs × {} real steps; imagination {} starts, {} \
             imagined steps per real step, horizon {}, from update {}; world model {} ({}); into {}",
            spec.id,
            total,
            m.ppo.num_envs,
            m.ppo.num_steps,
            serde_json::to_value(m.starts)?.as_str().unwrap_or("?"),
            m.imagined_ratio,
            m.horizon,
            m.imagine_after + 1,
            config.world_preset,
            config
                .base
                .as_ref()
                .map_or("untrained".to_string(), |b| format!("from {}", b.display())),
            out.display()
        );
        let bar = crate::progress::bar(total as u64, "updates");
        let mut on_update = |l: &MbrlLog| {
            bar.set_position(l.iteration as u64);
            let fmt = |v: Option<f32>| v.map_or("-".into(), |v| format!("{v:.2}"));
            let msg = format!(
                "return {}, eval {}, world loss {}, imagined reward {}",
                fmt(l.episode_return),
                fmt(l.eval_return),
                fmt(l.world_loss),
                fmt(l.imagined_reward)
            );
            if bar.is_hidden() {
                eprintln!(
                    "update {} ({} real, {} imagined steps): {msg}; {:.0}+{:.0}+{:.0}+{:.0} s",
                    l.iteration,
                    l.env_steps,
                    l.imagined_steps,
                    l.collect_s,
                    l.world_s,
                    l.imagine_s,
                    l.learn_s
                );
            } else {
                bar.set_message(msg);
            }
        };
        let started = std::time::Instant::now();
        mbrl::train(
            out,
            &mut state,
            &mut env,
            MbrlOptions {
                total_steps: config.steps,
                resume: args.resume,
                checkpoint_every: args.checkpoint_every,
                keep_last: args.keep_last,
                stop_after: args.stop_after,
                eval_every: args.eval_every,
                eval_episodes: args.eval_episodes,
                eval_env: eval_env.as_mut().map(|e| e as &mut dyn VecEnv),
                on_update: &mut on_update,
            },
        )?;
        bar.finish_and_clear();
        let logs: Vec<MbrlLog> = read_jsonl(&out.join("metrics.jsonl"))?;
        let updates: Vec<_> = logs
            .iter()
            .map(|l| (l.episode_return, l.episodes))
            .collect();
        let (first_return, last_return) = first_and_last(&updates);
        let summary = MbrlSummary {
            env: spec.id.clone(),
            starts: m.starts,
            imagined_ratio: m.imagined_ratio,
            env_steps: logs.last().map_or(0, |l| l.env_steps),
            imagined_steps: logs.last().map_or(0, |l| l.imagined_steps),
            updates: logs.len(),
            first_return,
            last_return,
            eval_return: logs.iter().rev().find_map(|l| l.eval_return),
            random_return: baseline.as_ref().map(|b| b.mean_return),
            seconds: started.elapsed().as_secs_f64(),
        };
        let returns: Vec<_> = logs.iter().map(|l| l.episode_return).collect();
        write_plot(&out.join("returns.png"), &returns, baseline.as_ref())?;
        if !state.starts.is_empty() {
            write_imagined(&out.join("imagined.png"), &mut state, 6)?;
        }
        fs::write(
            out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        let fmt = |r: Option<f32>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        println!(
            "mbrl on {}: {} updates, {} real and {} imagined env steps; mean episode return first \
             tenth {} → last tenth {}, last evaluation {} (random policy {}); {:.0} s",
            summary.env,
            summary.updates,
            summary.env_steps,
            summary.imagined_steps,
            fmt(summary.first_return),
            fmt(summary.last_return),
            fmt(summary.eval_return),
            fmt(summary.random_return),
            summary.seconds
        );
        println!(
            "wrote {}/metrics.jsonl, returns.png, imagined.png, summary.json, agent/ world/ reward/ \
             checkpoints, replay/",
            out.display()
        );
        Ok(summary)
    }
}

/// `rows` trajectories imagined by the final simulator with the final policy from
/// start states drawn as in training: each row is the start frame, then the imagined
/// frames until the horizon or a predicted episode end.
fn write_imagined<B: AutodiffBackend>(path: &Path, state: &mut Mbrl<B>, rows: usize) -> Result<()> {
    let [h, w, c] = state.spec.frame_shape;
    let f = h * w * c;
    let horizon = state.config.horizon;
    let mut sim = state.simulator(7);
    let mut env = ImaginedVecEnv::new(&mut sim, &state.starts, rows, horizon)?;
    env.reset(7)?;
    let mut seqs: Vec<Vec<u8>> = env.obs().chunks_exact(f).map(|x| x.to_vec()).collect();
    let mut live = vec![true; rows];
    for _ in 0..horizon {
        let (actions, ..) = state.ppo.act(env.obs(), rows);
        let steps = env.step(&actions)?.to_vec();
        for i in 0..rows {
            if !live[i] {
                continue;
            }
            if steps[i].done() {
                // The frame the trajectory ended at.
                if let Some(last) = env.end_frame(i) {
                    seqs[i].extend_from_slice(last);
                }
                live[i] = false;
            } else {
                seqs[i].extend_from_slice(&env.obs()[i * f..(i + 1) * f]);
            }
        }
    }
    crate::report::write_rows_png(path, &seqs, h, w, c)
}

pub fn mbrl(args: MbrlArgs) -> Result<MbrlSummary> {
    let config = resolve(&args)?;
    let device = args.device;
    dispatch(device, MbrlJob { args, config })
}
