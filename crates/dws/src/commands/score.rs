//! `dws score RUN...`: the return of trained agents (`dws ppo` and `dws mbrl` runs) over
//! many real episodes, each in the env it trained on, with the same env seed for every
//! run, and of the uniform-random policy measured the same way. Every env contributes
//! the same number of episodes, so long episodes count as often as short ones. Training
//! returns come from the few episodes that end within an update; this is the number to
//! compare agents by. Each run gets a `score.json`, which `dws compare` shows.

use anyhow::{ensure, Context, Result};
use clap::Args;
use dws_rl::policy::{trained_env, PpoPolicy};
use dws_rl::run::{episode_returns_per_env, random_policy};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// `dws ppo` or `dws mbrl` runs (their newest agent checkpoint acts)
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Episodes per run, rounded up to a multiple of --num-envs (each env plays as many)
    #[arg(long, default_value_t = 96)]
    pub episodes: usize,
    /// Parallel envs
    #[arg(long, default_value_t = 16)]
    pub num_envs: usize,
    /// Env seed, the same for every run (levels differ from training's env seeds)
    #[arg(long, default_value_t = 1_000_003)]
    pub seed: u64,
    /// Take the most likely action instead of sampling (training samples)
    #[arg(long)]
    pub greedy: bool,
}

/// What `dws score` measured for one run (`RUN/score.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub env: String,
    pub checkpoint: PathBuf,
    pub episodes: usize,
    pub mean_return: f32,
    pub std_return: f32,
    pub mean_length: f32,
    /// The uniform-random policy's mean return, same env, seed and episodes.
    pub random_return: f32,
    pub seed: u64,
    pub greedy: bool,
}

/// The `score.json` of `run`, if it was scored.
pub fn read_score(run: &Path) -> Option<Score> {
    let text = std::fs::read_to_string(run.join("score.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn per_env(a: &ScoreArgs) -> usize {
    a.episodes.div_ceil(a.num_envs)
}

fn score_one(run: &Path, a: &ScoreArgs, randoms: &mut Vec<(String, f32)>) -> Result<Score> {
    let env_config = trained_env(run)?;
    let mut env = super::ppo::make_vec_env(&env_config, a.num_envs)?;
    let spec = dws_envs::VecEnv::spec(&env).clone();
    let policy = PpoPolicy::<burn::backend::Flex>::load(run, &spec, a.greedy, &Default::default())?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let mut act = |frames: &[u8], n: usize| policy.act_frames(frames, n, &mut rng);
    let name = format!("the agent of {}", run.display());
    let b = episode_returns_per_env(&mut env, per_env(a), a.seed, &name, &mut act)?;
    let random_return = match randoms.iter().find(|(id, _)| *id == spec.id) {
        Some(&(_, r)) => r,
        None => {
            let mut random = random_policy(spec.action_space.clone(), a.seed);
            let r = episode_returns_per_env(&mut env, per_env(a), a.seed, "random", &mut random)?
                .mean_return;
            println!(
                "uniform-random policy on {}: mean return {r:.2} over {} episodes",
                spec.id,
                per_env(a) * a.num_envs
            );
            randoms.push((spec.id.clone(), r));
            r
        }
    };
    Ok(Score {
        env: spec.id.clone(),
        checkpoint: policy.checkpoint.clone(),
        episodes: b.episodes,
        mean_return: b.mean_return,
        std_return: b.std_return,
        mean_length: b.mean_length,
        random_return,
        seed: a.seed,
        greedy: a.greedy,
    })
}

pub fn score(a: ScoreArgs) -> Result<Vec<Score>> {
    ensure!(a.episodes > 0, "--episodes must be at least 1");
    ensure!(a.num_envs > 0, "--num-envs must be at least 1");
    let mut out = Vec::new();
    let mut randoms = Vec::new();
    for run in &a.runs {
        let t0 = std::time::Instant::now();
        let s = score_one(run, &a, &mut randoms)
            .with_context(|| format!("scoring {}", run.display()))?;
        let path = run.join("score.json");
        let text = serde_json::to_string_pretty(&s).expect("serialises");
        dws_rl::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{}: mean return {:.2} ± {:.2} over {} episodes of {} (mean length {:.0}, {:.0} s); wrote {}",
            run.display(),
            s.mean_return,
            s.std_return,
            s.episodes,
            s.env,
            s.mean_length,
            t0.elapsed().as_secs_f64(),
            path.display()
        );
        out.push(s);
    }
    Ok(out)
}

/// A finished `dws ppo` or `dws mbrl` run, as `dws compare` tabulates it.
#[derive(Debug, Clone)]
pub struct AgentRun {
    pub dir: PathBuf,
    /// What trained it: "PPO", or MBRL with its start mode and imagination settings.
    pub label: String,
    pub env: String,
    pub seed: u64,
    pub env_steps: u64,
    /// Training-episode return over the last tenth of the updates.
    pub last_return: Option<f32>,
    /// MBRL's last in-training evaluation.
    pub eval_return: Option<f32>,
    pub random_return: Option<f32>,
    /// Seconds its updates took (collection, learning and for MBRL the models and
    /// imagination; not evaluations or the random baseline).
    pub seconds: f64,
    pub score: Option<Score>,
    /// Training-episode return per update.
    pub curve: Vec<Option<f32>>,
}

/// The parts of a `dws ppo` or `dws mbrl` metrics line the table needs.
#[derive(Deserialize)]
struct CurvePoint {
    episode_return: Option<f32>,
    collect_s: f64,
    learn_s: f64,
    #[serde(default)]
    world_s: f64,
    #[serde(default)]
    imagine_s: f64,
}

/// `dir` as a finished agent run: `None` when its `config.json` is not a `dws ppo` or
/// `dws mbrl` one; an error when it is one but did not finish.
pub fn read_agent(dir: &Path) -> Result<Option<AgentRun>> {
    use super::mbrl::{MbrlRunConfig, MbrlSummary};
    use super::ppo::{PpoRunConfig, PpoSummary};
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return Ok(None);
    };
    let summary = || -> Result<String> {
        std::fs::read_to_string(dir.join("summary.json")).with_context(|| {
            format!(
                "{} has not finished (no summary.json); run it to the end, or leave it out",
                dir.display()
            )
        })
    };
    // Returns per update, and the seconds the updates took (summed, so resumed runs
    // count every call's).
    let curve = || -> Result<(Vec<Option<f32>>, f64)> {
        let points: Vec<CurvePoint> = super::ppo::read_jsonl(&dir.join("metrics.jsonl"))?;
        let seconds = points
            .iter()
            .map(|p| p.collect_s + p.world_s + p.imagine_s + p.learn_s)
            .sum();
        Ok((
            points.into_iter().map(|p| p.episode_return).collect(),
            seconds,
        ))
    };
    let finished = |done: u64, total: u64| -> Result<()> {
        ensure!(
            done >= total,
            "{} has not finished ({done} of {total} real steps); run it to the end with --resume, or leave it out",
            dir.display()
        );
        Ok(())
    };
    let run = if let Ok(c) = serde_json::from_str::<MbrlRunConfig>(&text) {
        let s: MbrlSummary = serde_json::from_str(&summary()?)
            .with_context(|| format!("reading {}/summary.json", dir.display()))?;
        finished(s.env_steps, c.steps)?;
        let (curve, seconds) = curve()?;
        let starts = serde_json::to_value(c.mbrl.starts).expect("serialises");
        AgentRun {
            dir: dir.to_path_buf(),
            label: format!(
                "MBRL, {} starts ({} imagined per real step, horizon {})",
                starts.as_str().unwrap_or("?"),
                c.mbrl.imagined_ratio,
                c.mbrl.horizon
            ),
            env: s.env,
            seed: c.seed,
            env_steps: s.env_steps,
            last_return: s.last_return,
            eval_return: s.eval_return,
            random_return: s.random_return,
            seconds,
            score: read_score(dir),
            curve,
        }
    } else if let Ok(c) = serde_json::from_str::<PpoRunConfig>(&text) {
        let s: PpoSummary = serde_json::from_str(&summary()?)
            .with_context(|| format!("reading {}/summary.json", dir.display()))?;
        finished(s.env_steps, c.steps)?;
        let (curve, seconds) = curve()?;
        AgentRun {
            dir: dir.to_path_buf(),
            label: "PPO (model-free)".into(),
            env: s.env,
            seed: c.seed,
            env_steps: s.env_steps,
            last_return: s.last_return,
            eval_return: None,
            random_return: s.random_return,
            seconds,
            score: read_score(dir),
            curve,
        }
    } else {
        return Ok(None);
    };
    Ok(Some(run))
}

/// `mean ± std` of the values present, and how many of the runs had one when not all
/// did; `-` when none did.
fn of_runs(values: Vec<Option<f32>>) -> String {
    let present: Vec<f32> = values.iter().flatten().copied().collect();
    let ms = super::offline::mean_std(&present);
    if present.is_empty() || present.len() == values.len() {
        ms
    } else {
        format!("{ms} ({} of {} runs)", present.len(), values.len())
    }
}

/// Line colours of the groups in the curves plot, in table order.
const COLOURS: [([u8; 3], &str); 6] = [
    ([31, 119, 180], "blue"),
    ([214, 39, 40], "red"),
    ([44, 160, 44], "green"),
    ([255, 127, 14], "orange"),
    ([148, 103, 189], "purple"),
    ([140, 86, 75], "brown"),
];

/// The agents table: one row per (env, what trained it), mean ± std over its runs
/// (seeds), then one row per run; and the mean learning curve of each group, written to
/// `plot` (PNG).
pub fn agents_table(runs: &[AgentRun], plot: &Path) -> Result<String> {
    let mut groups: Vec<(&str, &str, Vec<&AgentRun>)> = Vec::new();
    for r in runs {
        match groups
            .iter_mut()
            .find(|(env, label, _)| *env == r.env && *label == r.label)
        {
            Some(g) => g.2.push(r),
            None => groups.push((&r.env, &r.label, vec![r])),
        }
    }
    let mut t = String::from(
        "| env | agent | seeds | real steps | training return, last tenth | score | MBRL's last eval | minutes per run | curve |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut warn = Vec::new();
    let mut curves = Vec::new();
    for (k, (env, label, rs)) in groups.iter().enumerate() {
        let steps: std::collections::BTreeSet<u64> = rs.iter().map(|r| r.env_steps).collect();
        let steps = steps
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let scores = rs
            .iter()
            .map(|r| r.score.as_ref().map(|s| s.mean_return))
            .collect();
        let colour = COLOURS.get(k).map_or("-", |c| c.1);
        t += &format!(
            "| {env} | {label} | {} | {steps} | {} | {} | {} | {:.1} | {colour} |\n",
            rs.len(),
            of_runs(rs.iter().map(|r| r.last_return).collect()),
            of_runs(scores),
            of_runs(rs.iter().map(|r| r.eval_return).collect()),
            rs.iter().map(|r| r.seconds).sum::<f64>() / rs.len() as f64 / 60.0,
        );
        if let Some(&(rgb, _)) = COLOURS.get(k) {
            let start = rs.iter().find_map(|r| r.random_return).unwrap_or(0.0) as f64;
            let each: Vec<Vec<f64>> = rs
                .iter()
                .map(|r| super::ppo::smoothed_returns(&r.curve, start))
                .collect();
            let n = each.iter().map(Vec::len).min().unwrap_or(0);
            let mean: Vec<f64> = (0..n)
                .map(|i| each.iter().map(|c| c[i]).sum::<f64>() / each.len() as f64)
                .collect();
            curves.push((mean, rgb));
        }
    }
    let all_steps: std::collections::BTreeSet<(&str, u64)> =
        runs.iter().map(|r| (r.env.as_str(), r.env_steps)).collect();
    let envs: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.env.as_str()).collect();
    if all_steps.len() > envs.len() {
        warn.push(
            "The runs did not all take the same number of real steps: compare with care."
                .to_string(),
        );
    }
    let scored: std::collections::BTreeSet<(u64, usize, bool)> = runs
        .iter()
        .filter_map(|r| r.score.as_ref().map(|s| (s.seed, s.episodes, s.greedy)))
        .collect();
    if scored.len() > 1 {
        warn.push("The scores were measured with different seeds, episode counts or greediness: compare with care.".to_string());
    }
    // The random policy scored like the agents, else as the runs measured it.
    let randoms: Vec<(&str, f32, &str)> = envs
        .iter()
        .filter_map(|env| {
            let of = |r: &&AgentRun| r.env == *env;
            let scored = runs.iter().filter(of).find_map(|r| r.score.as_ref());
            match scored {
                Some(s) => Some((*env, s.random_return, "scored like the agents")),
                None => runs
                    .iter()
                    .filter(of)
                    .find_map(|r| r.random_return)
                    .map(|v| (*env, v, "first episodes to end, as training measured it")),
            }
        })
        .collect();
    t += "\n| run | agent | seed | training return, last tenth | score |\n|---|---|---|---|---|\n";
    let fmt = |v: Option<f32>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (_, label, rs) in &groups {
        for r in rs {
            t += &format!(
                "| {} | {label} | {} | {} | {} |\n",
                r.dir.display(),
                r.seed,
                fmt(r.last_return),
                r.score.as_ref().map_or("-".to_string(), |s| format!(
                    "{:.2} ± {:.2} ({} episodes)",
                    s.mean_return, s.std_return, s.episodes
                )),
            );
        }
    }
    t += "\nScore: mean return of `dws score` (real episodes, the final agent; mean ± std over seeds). ";
    if !randoms.is_empty() {
        let each: Vec<String> = randoms
            .iter()
            .map(|(env, v, how)| format!("{env} {v:.2} ({how})"))
            .collect();
        t += &format!("Random policy: {}. ", each.join(", "));
    }
    // One env: its random policy as a grey line.
    if let [(_, v, _)] = randoms[..] {
        let n = curves.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        curves.push((vec![v as f64; n], [150, 150, 150]));
    }
    let series: Vec<crate::plot::Series<'_>> = curves
        .iter()
        .map(|(values, rgb)| crate::plot::Series { values, rgb: *rgb })
        .collect();
    if curves.iter().any(|(v, _)| v.len() >= 2) {
        crate::plot::write_line_plot(plot, &series, 1)?;
        t += &format!(
            "Curves: {} (mean over seeds of the training return, smoothed over 5 updates, against updates; the random policy in grey).\n",
            plot.display()
        );
    } else {
        t += "\n";
    }
    for w in &warn {
        t += &format!("\n{w}\n");
    }
    Ok(t)
}
