//! `dws ppo`: model-free PPO in a real environment.
//!
//! Writes into `--out`: `config.json`, `baseline.json` (the uniform-random policy on the
//! same env, measured first, so the learning curve has a reference from the same run),
//! `metrics.jsonl`, `checkpoints/`, `returns.png` (mean episode return per update, the
//! random policy's as a flat line) and `summary.json`.

use crate::device::{dispatch, DeviceArg, Job};
use crate::plot::{write_line_plot, Series};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use dws_envs::{make, EnvConfig, SyncVecEnv, VecEnv};
use dws_rl::run::{self, Baseline, IterLog, RunOptions};
use dws_rl::{Ppo, PpoConfig};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct PpoArgs {
    /// Environment id (`dws envs` lists them), e.g. procgen:coinrun.
    #[arg(long)]
    pub env: String,
    /// Env options as key=value pairs, e.g. distribution_mode=easy,num_levels=200.
    #[arg(long, default_value = "")]
    pub env_opts: String,
    /// Env steps to train for (summed over the parallel envs).
    #[arg(long, default_value_t = 200_000)]
    pub steps: u64,
    /// debug (seconds), small (2 CPU cores) or procgen (the Procgen paper's settings).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Parallel envs (overrides the preset).
    #[arg(long)]
    pub num_envs: Option<usize>,
    /// Steps per env per update (overrides the preset).
    #[arg(long)]
    pub num_steps: Option<usize>,
    /// Learning rate (overrides the preset).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Run directory.
    #[arg(long, default_value = "runs/ppo")]
    pub out: PathBuf,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Updates between checkpoints.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    /// Episodes of the random policy measured before training (0: skip).
    #[arg(long, default_value_t = 100)]
    pub baseline_episodes: usize,
    /// Stop after this many updates in this call (for tests of resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// What a run was started with (`config.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PpoRunConfig {
    pub env: EnvConfig,
    pub ppo: PpoConfig,
    pub steps: u64,
    pub seed: u64,
}

/// What a finished `dws ppo` reports (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpoSummary {
    pub env: String,
    pub env_steps: u64,
    pub updates: usize,
    /// Mean episode return over the first and the last tenth of the updates.
    pub first_return: Option<f32>,
    pub last_return: Option<f32>,
    pub random_return: Option<f32>,
    pub seconds: f64,
}

pub(crate) fn make_vec_env(config: &EnvConfig, n: usize) -> Result<SyncVecEnv> {
    let envs = (0..n)
        .map(|_| make(config))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("making {}", config.id()))?;
    Ok(SyncVecEnv::new(envs)?)
}

fn resolve(args: &PpoArgs) -> Result<PpoRunConfig> {
    let opts = dws_envs::config::parse_options(&args.env_opts).map_err(anyhow::Error::msg)?;
    let env = EnvConfig::parse(&args.env, &opts)?;
    if args.resume {
        if let Some(mut stored) =
            stored_config::<PpoRunConfig>(&args.out, &env, |c| &c.env, "dws ppo")?
        {
            stored.steps = args.steps;
            return Ok(stored);
        }
    }
    let mut ppo = PpoConfig::preset(&args.preset)?;
    if let Some(n) = args.num_envs {
        ppo.num_envs = n;
    }
    if let Some(n) = args.num_steps {
        ppo.num_steps = n;
    }
    if let Some(lr) = args.lr {
        ppo.lr = lr;
    }
    ppo.validate()?;
    Ok(PpoRunConfig {
        env,
        ppo,
        steps: args.steps,
        seed: args.seed,
    })
}

struct PpoJob {
    args: PpoArgs,
    config: PpoRunConfig,
}

impl Job for PpoJob {
    type Out = PpoSummary;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PpoSummary> {
        let PpoJob { args, config } = self;
        let out = &args.out;
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let cfg_path = out.join("config.json");
        fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let mut env = make_vec_env(&config.env, config.ppo.num_envs)?;
        let spec = env.spec().clone();
        let [h, w, _] = spec.frame_shape;
        if h != w {
            bail!("{}: PPO here takes square frames, got {h}×{w}", spec.id);
        }
        let baseline = baseline(
            out,
            &config.env,
            config.ppo.num_envs,
            args.baseline_episodes,
            config.seed,
        )?;
        let mut ppo = Ppo::<B>::new(
            config.ppo.clone(),
            spec.action_space.clone(),
            h,
            config.seed,
            &device,
        )?;
        let total = run::iterations(&config.ppo, config.steps);
        println!(
            "ppo on {}: {} updates of {} envs × {} steps ({} env steps), preset net {:?}, into {}",
            spec.id,
            total,
            config.ppo.num_envs,
            config.ppo.num_steps,
            total * config.ppo.batch_size(),
            config.ppo.net.channels,
            out.display()
        );
        let bar = crate::progress::bar(total as u64, "updates");
        let mut recent: Vec<f32> = Vec::new();
        let mut on_update = |l: &IterLog| {
            bar.set_position(l.iteration as u64);
            if let Some(r) = l.episode_return {
                recent.push(r);
            }
            let k = recent.len().saturating_sub(10);
            let avg = recent[k..].iter().sum::<f32>() / (recent.len() - k).max(1) as f32;
            bar.set_message(format!(
                "return {avg:.2} (last 10 updates), {:.0} steps/s",
                l.steps_per_s
            ));
            if !bar.is_hidden() {
                return;
            }
            if l.iteration.is_multiple_of(10) {
                eprintln!(
                    "update {} ({} steps): return {avg:.2}, entropy {:.3}, value loss {:.3}, {:.0} steps/s",
                    l.iteration, l.env_steps, l.stats.entropy, l.stats.value_loss, l.steps_per_s
                );
            }
        };
        let started = std::time::Instant::now();
        run::train(
            out,
            &mut ppo,
            &mut env,
            RunOptions {
                total_steps: config.steps,
                seed: config.seed,
                resume: args.resume,
                checkpoint_every: args.checkpoint_every,
                keep_last: args.keep_last,
                stop_after: args.stop_after,
                on_update: &mut on_update,
            },
        )?;
        bar.finish_and_clear();
        let logs: Vec<IterLog> = read_jsonl(&out.join("metrics.jsonl"))?;
        let summary = summarize(
            &spec.id,
            &logs,
            baseline.as_ref(),
            started.elapsed().as_secs_f64(),
        );
        let returns: Vec<_> = logs.iter().map(|l| l.episode_return).collect();
        write_plot(&out.join("returns.png"), &returns, baseline.as_ref())?;
        fs::write(
            out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        let fmt = |r: Option<f32>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        println!(
            "ppo on {}: {} updates, {} env steps; mean episode return first tenth {} → last tenth {} (random policy {}); {:.0} s",
            summary.env,
            summary.updates,
            summary.env_steps,
            fmt(summary.first_return),
            fmt(summary.last_return),
            fmt(summary.random_return),
            summary.seconds
        );
        println!(
            "wrote {}/metrics.jsonl, returns.png, summary.json, checkpoints/",
            out.display()
        );
        Ok(summary)
    }
}

/// The `config.json` of a run being resumed, if it has one; an error when it was made
/// for another env than `env`.
pub(crate) fn stored_config<T: serde::de::DeserializeOwned>(
    out: &Path,
    env: &EnvConfig,
    env_of: impl Fn(&T) -> &EnvConfig,
    command: &str,
) -> Result<Option<T>> {
    let path = out.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let stored: T = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a {command} config", path.display()))?;
    if env_of(&stored) != env {
        bail!(
            "{} was trained on {} with other options; resume with the same --env and --env-opts",
            out.display(),
            env_of(&stored).id()
        );
    }
    Ok(Some(stored))
}

/// The random policy's returns on the env, measured once per run directory
/// (`baseline.json`); `None` with 0 episodes.
pub(crate) fn baseline(
    out: &Path,
    env: &EnvConfig,
    num_envs: usize,
    episodes: usize,
    seed: u64,
) -> Result<Option<Baseline>> {
    let path = out.join("baseline.json");
    if path.is_file() {
        return Ok(serde_json::from_str(&fs::read_to_string(&path)?).ok());
    }
    if episodes == 0 {
        return Ok(None);
    }
    let mut benv = make_vec_env(env, num_envs)?;
    let b = run::random_baseline(&mut benv, episodes, seed ^ 0x5eed)?;
    fs::write(&path, serde_json::to_string_pretty(&b)?)?;
    println!(
        "random policy on {}: mean return {:.2} ± {:.2} over {} episodes (mean length {:.0})",
        env.id(),
        b.mean_return,
        b.std_return,
        b.episodes,
        b.mean_length
    );
    Ok(Some(b))
}

pub(crate) fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line in {}", path.display())))
        .collect()
}

/// Episode-weighted mean return over updates given as (mean return, episodes).
pub(crate) fn mean_return(updates: &[(Option<f32>, usize)]) -> Option<f32> {
    let (sum, n) = updates
        .iter()
        .fold((0.0f64, 0usize), |(s, n), &(r, k)| match r {
            Some(r) => (s + r as f64 * k as f64, n + k),
            None => (s, n),
        });
    (n > 0).then(|| (sum / n as f64) as f32)
}

/// Mean returns over the first and the last tenth of the updates.
pub(crate) fn first_and_last(updates: &[(Option<f32>, usize)]) -> (Option<f32>, Option<f32>) {
    let tenth = (updates.len() / 10).max(1).min(updates.len());
    (
        mean_return(&updates[..tenth]),
        mean_return(&updates[updates.len() - tenth..]),
    )
}

fn summarize(env: &str, logs: &[IterLog], baseline: Option<&Baseline>, seconds: f64) -> PpoSummary {
    let updates: Vec<_> = logs
        .iter()
        .map(|l| (l.episode_return, l.episodes))
        .collect();
    let (first_return, last_return) = first_and_last(&updates);
    PpoSummary {
        env: env.to_string(),
        env_steps: logs.last().map_or(0, |l| l.env_steps),
        updates: logs.len(),
        first_return,
        last_return,
        random_return: baseline.map(|b| b.mean_return),
        seconds,
    }
}

/// Mean return per update, carried over updates where no episode ended (`start` before
/// the first), smoothed over the last 5 updates.
pub(crate) fn smoothed_returns(returns: &[Option<f32>], start: f64) -> Vec<f64> {
    let mut last = start;
    let raw: Vec<f64> = returns
        .iter()
        .map(|r| {
            if let Some(r) = r {
                last = *r as f64;
            }
            last
        })
        .collect();
    (0..raw.len())
        .map(|i| {
            let lo = i.saturating_sub(4);
            raw[lo..=i].iter().sum::<f64>() / (i + 1 - lo) as f64
        })
        .collect()
}

/// [`smoothed_returns`] beside the random policy's return.
pub(crate) fn write_plot(
    path: &Path,
    returns: &[Option<f32>],
    baseline: Option<&Baseline>,
) -> Result<()> {
    if returns.len() < 2 {
        return Ok(());
    }
    let smooth = smoothed_returns(returns, baseline.map_or(0.0, |b| b.mean_return as f64));
    let flat: Vec<f64> = baseline.map_or(Vec::new(), |b| vec![b.mean_return as f64; returns.len()]);
    let mut series = vec![Series {
        values: &smooth,
        rgb: [31, 119, 180],
    }];
    if !flat.is_empty() {
        series.push(Series {
            values: &flat,
            rgb: [150, 150, 150],
        });
    }
    write_line_plot(path, &series, 1)
}

pub fn ppo(args: PpoArgs) -> Result<PpoSummary> {
    let config = resolve(&args)?;
    let device = args.device;
    dispatch(device, PpoJob { args, config })
}
