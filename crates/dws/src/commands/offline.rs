//! `dws offline`: BC, CQL or IQL trained from recorded transitions, real and (optionally)
//! imagined by a world simulator, and evaluated in the real env on its training levels
//! and on unseen ones (the loop is `dws_rl::offline::run`); `dws compare` on offline
//! runs gives the paper's Table 2 layout.
//!
//! Writes into `--out`: `config.json`, `metrics.jsonl` (mean losses every `--log-every`
//! steps, returns at every evaluation), `checkpoints/` and at the end `summary.json`.

use super::ppo::{make_vec_env, read_jsonl};
use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{bail, ensure, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ActionSpace, Dataset, DatasetHeader};
use dws_envs::{Action, EnvConfig};
use dws_rl::offline::run::{self as offline_run, Evaluation, OfflineLog, OfflineOptions};
use dws_rl::offline::{Algo, Learner, Mixture, OfflineConfig, TransitionSet};
use dws_rl::run::episode_returns;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct OfflineArgs {
    /// bc, cql or iql.
    #[arg(long)]
    pub algo: Algo,
    /// Datasets, comma-separated: recorded ones (e.g. from `dws collect --policy
    /// ppo:RUN`) and imagined ones (from `dws imagine`), told apart by their manifests.
    #[arg(long)]
    pub data: String,
    /// Share of real to imagined transitions in every batch, e.g. 1:1. Default: in
    /// proportion to their sizes (the union of the datasets).
    #[arg(long)]
    pub mix: Option<String>,
    /// Gradient steps.
    #[arg(long, default_value_t = 5000)]
    pub steps: usize,
    /// debug (seconds), small (two CPU cores) or reference (Mediratta et al. 2024:
    /// batch 256, IQL 512).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// The env to evaluate in (default: the recorded datasets' env and options). Its
    /// action space and frame size must match the data's.
    #[arg(long)]
    pub env: Option<String>,
    /// Options of --env as key=value pairs.
    #[arg(long, default_value = "")]
    pub env_opts: String,
    /// Run directory.
    #[arg(long, default_value = "runs/offline")]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Gradient steps between evaluations (and checkpoints); 0: only at the end.
    #[arg(long, default_value_t = 1000)]
    pub eval_every: usize,
    /// Episodes per evaluation, on training levels and on unseen ones each.
    #[arg(long, default_value_t = 32)]
    pub eval_episodes: usize,
    /// Envs stepped together in an evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_envs: usize,
    /// First level of the unseen test levels (Procgen); levels from there on are played.
    #[arg(long, default_value_t = 250)]
    pub test_start_level: u32,
    /// Evaluate on the training levels only.
    #[arg(long)]
    pub no_test: bool,
    /// Act with the policy's most likely action instead of sampling (BC, IQL; CQL is
    /// always greedy in Q).
    #[arg(long)]
    pub greedy: bool,
    /// Gradient steps between metrics lines.
    #[arg(long, default_value_t = 100)]
    pub log_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Stop after this many steps in this call (for tests of resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// What a run was started with (`config.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OfflineRunConfig {
    pub algo: Algo,
    /// The env evaluated in.
    pub env: EnvConfig,
    /// The unseen levels' env, where there is one.
    pub test_env: Option<EnvConfig>,
    pub offline: OfflineConfig,
    pub real_data: Vec<PathBuf>,
    pub imagined_data: Vec<PathBuf>,
    pub real_transitions: usize,
    pub imagined_transitions: usize,
    /// Share of real transitions per batch.
    pub real_share: f64,
    pub steps: usize,
    pub seed: u64,
    pub eval_episodes: usize,
    pub greedy: bool,
}

/// What a finished `dws offline` reports (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OfflineSummary {
    pub kind: String,
    pub algo: Algo,
    pub env: String,
    /// Whether imagined transitions were in the data.
    pub with_world_model: bool,
    pub steps: usize,
    pub seed: u64,
    /// The last evaluation.
    pub eval: Evaluation,
    pub real_transitions: usize,
    pub imagined_transitions: usize,
    pub seconds: f64,
}

/// A dataset's manifest header, or an error naming its manifest.
fn header_of(dir: &Path) -> Result<(Dataset, DatasetHeader)> {
    let ds = Dataset::open(dir).with_context(|| format!("opening dataset {}", dir.display()))?;
    let header = ds.header().clone();
    Ok((ds, header))
}

/// The env a world model behind an imagined dataset was trained on, as its manifest
/// records it (`dws imagine` writes `world_model_env` into each collection).
fn world_model_envs(ds: &Dataset) -> Vec<String> {
    ds.manifest()
        .collections
        .iter()
        .filter_map(|c| c.get("world_model_env").and_then(|v| v.as_str()))
        .map(str::to_string)
        .collect()
}

/// Checks that every dataset fits the env (`id`, actions, frame size) and reads their
/// transitions: (real, imagined, real dirs, imagined dirs).
#[allow(clippy::type_complexity)]
fn read_data(
    dirs: &[PathBuf],
    env_id: &str,
    n_actions: usize,
    frame_shape: [usize; 3],
) -> Result<(
    TransitionSet,
    Option<TransitionSet>,
    Vec<PathBuf>,
    Vec<PathBuf>,
)> {
    let (mut real, mut imagined) = (Vec::new(), Vec::new());
    let (mut real_dirs, mut imagined_dirs) = (Vec::new(), Vec::new());
    for dir in dirs {
        let (ds, h) = header_of(dir)?;
        let manifest = dir.join("manifest.json");
        match &h.action_space {
            ActionSpace::Discrete { n } if *n == n_actions => {}
            other => bail!(
                "{}: the dataset's actions are {other}, the algorithm's env ({env_id}) has {n_actions} \
                 discrete actions",
                manifest.display()
            ),
        }
        ensure!(
            h.frame_shape == frame_shape,
            "{}: the dataset's frames are {:?}, the algorithm's env ({env_id}) gives {:?}",
            manifest.display(),
            h.frame_shape,
            frame_shape
        );
        ensure!(
            h.env_id == env_id,
            "{}: the dataset was recorded in {}, the algorithm's env is {env_id}",
            manifest.display(),
            h.env_id
        );
        if h.imagined {
            for wm in world_model_envs(&ds) {
                ensure!(
                    wm == env_id,
                    "{}: these transitions were imagined by a world model trained on {wm}, the \
                     algorithm's env is {env_id}",
                    manifest.display()
                );
            }
        }
        let episodes = ds
            .read_all()
            .with_context(|| format!("reading {}", dir.display()))?;
        if h.imagined {
            imagined.extend(episodes);
            imagined_dirs.push(dir.clone());
        } else {
            real.extend(episodes);
            real_dirs.push(dir.clone());
        }
    }
    ensure!(
        !real.is_empty(),
        "no recorded (not imagined) episodes among {}: offline RL needs real data",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let real = TransitionSet::new(real)?;
    let imagined = if imagined.is_empty() {
        None
    } else {
        Some(TransitionSet::new(imagined)?)
    };
    Ok((real, imagined, real_dirs, imagined_dirs))
}

/// `--mix a:b` as the real share a / (a + b).
fn parse_mix(text: &str) -> Result<f64> {
    let bad = || anyhow::anyhow!("--mix takes real:imagined, e.g. 1:1 or 3:1, not `{text}`");
    let (a, b) = text.split_once(':').ok_or_else(bad)?;
    let a: f64 = a.trim().parse().map_err(|_| bad())?;
    let b: f64 = b.trim().parse().map_err(|_| bad())?;
    ensure!(
        a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite(),
        "--mix needs two positive parts, not `{text}`"
    );
    Ok(a / (a + b))
}

/// The first recorded dataset's env (the env evaluated in by default).
fn data_env(dirs: &[PathBuf]) -> Result<EnvConfig> {
    for dir in dirs {
        let (_, h) = header_of(dir)?;
        if !h.imagined {
            return serde_json::from_value(h.env_config.clone()).with_context(|| {
                format!(
                    "{}: its env config is not one this dws can make",
                    dir.join("manifest.json").display()
                )
            });
        }
    }
    bail!("no recorded (not imagined) dataset in --data: offline RL needs real data")
}

/// The unseen-levels version of a Procgen env: levels from `start` on, unbounded.
fn test_env(env: &EnvConfig, start: u32) -> Option<EnvConfig> {
    match env {
        EnvConfig::Procgen(p) => {
            let mut t = p.clone();
            t.start_level = start;
            t.num_levels = 0;
            Some(EnvConfig::Procgen(t))
        }
        _ => None,
    }
}

struct OfflineJob {
    args: OfflineArgs,
}

impl Job for OfflineJob {
    type Out = OfflineSummary;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<OfflineSummary> {
        let args = self.args;
        let out = &args.out;
        let dirs: Vec<PathBuf> = args
            .data
            .split(',')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
        ensure!(!dirs.is_empty(), "--data names no dataset");
        ensure!(args.steps > 0, "--steps must be at least 1");
        ensure!(args.eval_episodes > 0, "--eval-episodes must be at least 1");
        ensure!(args.eval_envs > 0, "--eval-envs must be at least 1");
        ensure!(args.keep_last >= 1, "--keep-last must be at least 1");
        let env = match &args.env {
            Some(id) => {
                let opts =
                    dws_envs::config::parse_options(&args.env_opts).map_err(anyhow::Error::msg)?;
                EnvConfig::parse(id, &opts)?
            }
            None => data_env(&dirs)?,
        };
        let spec = dws_envs::make(&env)
            .with_context(|| format!("making {}", env.id()))?
            .spec()
            .clone();
        let n_actions = match spec.action_space {
            dws_envs::ActionSpace::Discrete { n } => n,
            _ => bail!(
                "{} has continuous actions; dws offline's BC, CQL and IQL take discrete ones",
                spec.id
            ),
        };
        let [h, w, _] = spec.frame_shape;
        ensure!(
            h == w,
            "the networks take square frames, {} gives {h}×{w}",
            spec.id
        );
        let (real, imagined, real_dirs, imagined_dirs) =
            read_data(&dirs, &spec.id, n_actions, spec.frame_shape)?;
        let (real_n, imagined_n) = (real.len(), imagined.as_ref().map_or(0, |s| s.len()));
        let real_share = match (&args.mix, imagined_n) {
            (Some(_), 0) => bail!("--mix needs an imagined dataset in --data"),
            (Some(m), _) => parse_mix(m)?,
            (None, 0) => 1.0,
            (None, _) => real_n as f64 / (real_n + imagined_n) as f64,
        };
        let mut offline = OfflineConfig::preset(&args.preset)?;
        offline.validate()?;
        let config = OfflineRunConfig {
            algo: args.algo,
            test_env: (!args.no_test)
                .then(|| test_env(&env, args.test_start_level))
                .flatten(),
            env,
            offline: offline.clone(),
            real_data: real_dirs,
            imagined_data: imagined_dirs,
            real_transitions: real_n,
            imagined_transitions: imagined_n,
            real_share,
            steps: args.steps,
            seed: args.seed,
            eval_episodes: args.eval_episodes,
            greedy: args.greedy,
        };
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let cfg_path = out.join("config.json");
        if args.resume && cfg_path.is_file() {
            let stored: OfflineRunConfig = serde_json::from_str(&fs::read_to_string(&cfg_path)?)
                .with_context(|| format!("{} is not a dws offline config", cfg_path.display()))?;
            let same = OfflineRunConfig {
                steps: config.steps,
                ..stored.clone()
            };
            ensure!(
                same == config,
                "{} was started with other settings (algorithm, data, preset, env, seed or mix); \
                 resume with the same flags or use another --out",
                out.display()
            );
            offline = stored.offline;
        }
        fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)?;
        let data = Mixture::new(real, imagined, real_share)?;
        // Fresh networks start from seeded weights.
        B::seed(&device, args.seed);
        let mut learner = args
            .algo
            .learner::<B>(offline.clone(), h, n_actions, &device);
        let batch = offline.batch_for(args.algo);
        println!(
            "{} on {} transitions of {} ({} real, {} imagined; {:.0}% real per batch of {batch}), \
             {} steps; evaluation {} on {} training-level episodes{}; into {}",
            args.algo.name().to_uppercase(),
            real_n + imagined_n,
            spec.id,
            real_n,
            imagined_n,
            100.0 * real_share,
            args.steps,
            if args.eval_every > 0 && args.eval_every < args.steps {
                format!("every {} steps", args.eval_every)
            } else {
                "at the end".to_string()
            },
            args.eval_episodes,
            if config.test_env.is_some() {
                format!(
                    " and as many on unseen levels from {}",
                    args.test_start_level
                )
            } else {
                String::new()
            },
            out.display()
        );
        let mut train_env = make_vec_env(&config.env, args.eval_envs)?;
        let mut unseen_env = match &config.test_env {
            Some(t) => Some(make_vec_env(t, args.eval_envs)?),
            None => None,
        };
        let eval_seed = args.seed ^ 0x0ff1_13e0;
        let greedy = args.greedy;
        let episodes = args.eval_episodes;
        let mut evaluate = |l: &dyn Learner<B>| -> dws_rl::Result<Evaluation> {
            let mut rng = ChaCha8Rng::seed_from_u64(eval_seed);
            let mut policy = |frames: &[u8], n: usize| -> Vec<Action> {
                let rng: Option<&mut dyn rand::RngCore> =
                    if greedy { None } else { Some(&mut rng) };
                l.act(frames, n, rng)
                    .into_iter()
                    .map(Action::Discrete)
                    .collect()
            };
            let train = episode_returns(
                &mut train_env,
                episodes,
                eval_seed,
                "training levels",
                &mut policy,
            )?;
            let test = match unseen_env.as_mut() {
                Some(e) => Some(episode_returns(
                    e,
                    episodes,
                    eval_seed,
                    "unseen levels",
                    &mut policy,
                )?),
                None => None,
            };
            Ok(Evaluation {
                train_return: train.mean_return,
                train_std: train.std_return,
                test_return: test.as_ref().map(|t| t.mean_return),
                test_std: test.as_ref().map(|t| t.std_return),
                episodes,
            })
        };
        let bar = crate::progress::bar(args.steps as u64, "steps");
        let mut on_log = |l: &OfflineLog| {
            bar.set_position(l.step as u64);
            let stats: Vec<String> = l.stats.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
            let eval = l.eval.map_or(String::new(), |e| {
                format!(
                    "; return {:.2} on training levels{}",
                    e.train_return,
                    e.test_return
                        .map_or(String::new(), |t| format!(", {t:.2} on unseen levels"))
                )
            });
            let msg = format!("{}{eval}", stats.join(", "));
            if bar.is_hidden() {
                eprintln!("step {}: {msg} ({:.1} steps/s)", l.step, l.steps_per_s);
            } else {
                bar.set_message(msg);
            }
        };
        let started = std::time::Instant::now();
        offline_run::train(
            out,
            learner.as_mut(),
            &data,
            batch,
            OfflineOptions {
                total_steps: args.steps,
                seed: args.seed,
                resume: args.resume,
                log_every: args.log_every,
                eval_every: args.eval_every,
                keep_last: args.keep_last,
                stop_after: args.stop_after,
                evaluate: &mut evaluate,
                on_log: &mut on_log,
            },
        )?;
        bar.finish_and_clear();
        let logs: Vec<OfflineLog> = read_jsonl(&out.join("metrics.jsonl"))?;
        let last = logs.last().map_or(0, |l| l.step);
        let Some(eval) = logs.iter().rev().find_map(|l| l.eval) else {
            bail!(
                "{} stopped at step {last} of {} before its first evaluation; run it again with \
                 --resume",
                out.display(),
                args.steps
            );
        };
        if last < args.steps {
            println!(
                "stopped at step {last} of {}; `--resume` continues",
                args.steps
            );
        }
        let summary = OfflineSummary {
            kind: "offline".into(),
            algo: args.algo,
            env: spec.id.clone(),
            with_world_model: imagined_n > 0,
            steps: last,
            seed: args.seed,
            eval,
            real_transitions: real_n,
            imagined_transitions: imagined_n,
            seconds: started.elapsed().as_secs_f64(),
        };
        if last == args.steps {
            fs::write(
                out.join("summary.json"),
                serde_json::to_string_pretty(&summary)?,
            )?;
        }
        println!(
            "{} on {}{}: return {:.2} ± {:.2} on training levels{} after {} steps ({:.0} s)",
            args.algo.name().to_uppercase(),
            spec.id,
            if imagined_n > 0 { " + world model" } else { "" },
            eval.train_return,
            eval.train_std,
            eval.test_return.map_or(String::new(), |t| format!(
                ", {t:.2} ± {:.2} on unseen levels",
                eval.test_std.unwrap_or(0.0)
            )),
            last,
            summary.seconds
        );
        println!(
            "wrote {}/metrics.jsonl, checkpoints/{}",
            out.display(),
            if last == args.steps {
                ", summary.json"
            } else {
                ""
            }
        );
        Ok(summary)
    }
}

pub fn offline(args: OfflineArgs) -> Result<OfflineSummary> {
    let device = args.device;
    dispatch(device, OfflineJob { args })
}

/// The summary of a finished `dws offline` run, if `dir` is one.
pub fn read_summary(dir: &Path) -> Option<OfflineSummary> {
    let text = fs::read_to_string(dir.join("summary.json")).ok()?;
    serde_json::from_str::<OfflineSummary>(&text)
        .ok()
        .filter(|s| s.kind == "offline")
}

/// `mean ± std` of some values (population std), or `-`.
pub(crate) fn mean_std(v: &[f32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
    format!("{mean:.2} ± {std:.2}")
}

/// The paper's Table 2 layout for offline runs: one row per algorithm, returns without
/// and with world-model data (mean ± std over the runs, i.e. seeds), on training and
/// unseen levels.
pub fn table(runs: &[OfflineSummary]) -> String {
    let envs: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.env.as_str()).collect();
    let mut t = String::new();
    for env in envs {
        t += &format!(
            "{env}\n\n| algorithm | training levels | training levels + WM | unseen levels | unseen levels + WM | seeds |\n|---|---|---|---|---|---|\n"
        );
        for algo in [Algo::Bc, Algo::Cql, Algo::Iql] {
            let of = |wm: bool| -> Vec<&OfflineSummary> {
                runs.iter()
                    .filter(|r| r.env == env && r.algo == algo && r.with_world_model == wm)
                    .collect()
            };
            let (plain, with) = (of(false), of(true));
            if plain.is_empty() && with.is_empty() {
                continue;
            }
            let train = |rs: &[&OfflineSummary]| {
                mean_std(&rs.iter().map(|r| r.eval.train_return).collect::<Vec<_>>())
            };
            let test = |rs: &[&OfflineSummary]| {
                mean_std(
                    &rs.iter()
                        .filter_map(|r| r.eval.test_return)
                        .collect::<Vec<_>>(),
                )
            };
            t += &format!(
                "| {} | {} | {} | {} | {} | {} / {} |\n",
                algo.name().to_uppercase(),
                train(&plain),
                train(&with),
                test(&plain),
                test(&with),
                plain.len(),
                with.len()
            );
        }
        t += "\n";
    }
    t
}
