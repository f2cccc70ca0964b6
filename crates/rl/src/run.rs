//! A PPO training run in a run directory: the loop behind `dws ppo`.
//!
//! The run directory holds `config.json` (the PPO config and the env), `metrics.jsonl`
//! (one line per update), `baseline.json` (the uniform-random policy's returns on the
//! same env, measured before training) and `checkpoints/` (model, optimiser state and
//! random stream, atomic, last N kept). A resumed run continues at the update after its
//! newest checkpoint; its envs restart with fresh episodes (an env's internal state is
//! not saved), seeded from the update number so a resumed run is still reproducible.

use crate::ppo::{EpisodeTracker, Ppo, PpoConfig, UpdateStats};
use crate::{Result, RlError};
use burn::tensor::backend::AutodiffBackend;
use dws_envs::policy::sample_action;
use dws_envs::VecEnv;
use dws_models::checkpoint::{self, TrainState};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// One logged update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IterLog {
    /// Updates done (1-based).
    pub iteration: usize,
    pub env_steps: u64,
    /// Episodes that ended during this update's rollout.
    pub episodes: usize,
    /// Their mean return and length (absent when none ended).
    pub episode_return: Option<f32>,
    pub episode_length: Option<f32>,
    pub lr: f64,
    /// Env steps per second of this update (collection and learning).
    pub steps_per_s: f64,
    /// Seconds spent stepping the envs with the policy, and learning.
    pub collect_s: f64,
    pub learn_s: f64,
    #[serde(flatten)]
    pub stats: UpdateStats,
}

/// Returns of a fixed policy over some episodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub policy: String,
    pub episodes: usize,
    pub mean_return: f32,
    pub std_return: f32,
    pub mean_length: f32,
}

/// How a run is driven.
pub struct RunOptions<'a> {
    /// Env steps to train for (rounded up to whole updates).
    pub total_steps: u64,
    pub seed: u64,
    pub resume: bool,
    /// Updates between checkpoints.
    pub checkpoint_every: usize,
    pub keep_last: usize,
    /// Stop after this many updates in this call (tests of resume).
    pub stop_after: Option<usize>,
    /// Called after every update.
    pub on_update: &'a mut dyn FnMut(&IterLog),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RlError + '_ {
    move |e| RlError::Io(format!("{}: {e}", path.display()))
}

/// Number of updates a run of `total_steps` env steps makes.
pub fn iterations(config: &PpoConfig, total_steps: u64) -> usize {
    total_steps.div_ceil(config.batch_size() as u64) as usize
}

/// Trains `ppo` on `env` into `run`. Returns the logs of the updates made in this call.
pub fn train<B: AutodiffBackend>(
    run: &Path,
    ppo: &mut Ppo<B>,
    env: &mut dyn VecEnv,
    opts: RunOptions<'_>,
) -> Result<Vec<IterLog>> {
    fs::create_dir_all(run).map_err(io(run))?;
    let metrics = run.join("metrics.jsonl");
    let total_iters = iterations(&ppo.config, opts.total_steps);
    let mut start = 0;
    if opts.resume {
        if let Some(ckpt) = checkpoint::latest(run) {
            let state = checkpoint::read_state(&ckpt).map_err(model_err)?;
            let device = ppo.device().clone();
            ppo.model =
                checkpoint::load_model(ppo.model.clone(), &ckpt, &device).map_err(model_err)?;
            let optim = std::mem::replace(&mut ppo.optim, crate::ppo::adam(&ppo.config));
            ppo.optim = burn::optim::Optimizer::load_record(
                optim,
                checkpoint::load_optim(&ckpt, &device).map_err(model_err)?,
            );
            ppo.rng = ChaCha8Rng::seed_from_u64(state.rng_seed);
            ppo.rng.set_word_pos(state.rng_word_pos);
            start = state.step;
            truncate_metrics(&metrics, start)?;
        }
    } else if metrics.exists() {
        fs::remove_file(&metrics).map_err(io(&metrics))?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .map_err(io(&metrics))?;
    let end = match opts.stop_after {
        Some(n) => (start + n).min(total_iters),
        None => total_iters,
    };
    if start < end {
        env.reset(env_seed(opts.seed, start))
            .map_err(|e| RlError::Env(e.to_string()))?;
    }
    let mut tracker = EpisodeTracker::new(env.num_envs());
    let mut logs = Vec::new();
    for it in start..end {
        let t0 = Instant::now();
        let lr = ppo.lr_at(it, total_iters);
        let rollout = ppo.collect(env, &mut tracker)?;
        let collect_s = t0.elapsed().as_secs_f64();
        let stats = ppo.update(&[&rollout], lr);
        let learn_s = t0.elapsed().as_secs_f64() - collect_s;
        if !stats.policy_loss.is_finite() || !stats.value_loss.is_finite() {
            return Err(RlError::Config(format!(
                "the loss became non-finite at update {}; lower the learning rate",
                it + 1
            )));
        }
        let n_ep = rollout.episodes.len();
        let mean = |f: &dyn Fn(&crate::EpisodeEnd) -> f32| {
            (n_ep > 0).then(|| rollout.episodes.iter().map(f).sum::<f32>() / n_ep as f32)
        };
        let entry = IterLog {
            iteration: it + 1,
            env_steps: ((it + 1) * ppo.config.batch_size()) as u64,
            episodes: n_ep,
            episode_return: mean(&|e| e.ret),
            episode_length: mean(&|e| e.len as f32),
            lr,
            steps_per_s: rollout.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            collect_s,
            learn_s,
            stats,
        };
        writeln!(
            log,
            "{}",
            serde_json::to_string(&entry).expect("serialises")
        )
        .map_err(io(&metrics))?;
        (opts.on_update)(&entry);
        logs.push(entry);
        if (it + 1) % opts.checkpoint_every.max(1) == 0 || it + 1 == end {
            let state = TrainState {
                step: it + 1,
                rng_seed: opts.seed,
                rng_word_pos: ppo.rng.get_word_pos(),
                last_loss: stats.policy_loss,
            };
            checkpoint::save::<B, _>(
                run,
                &ppo.model,
                burn::optim::Optimizer::to_record(&ppo.optim),
                &state,
                opts.keep_last,
            )
            .map_err(model_err)?;
        }
    }
    Ok(logs)
}

/// Seed of the envs when a run (re)starts at update `iteration`.
pub fn env_seed(seed: u64, iteration: usize) -> u64 {
    // Procgen takes 31-bit seeds.
    (seed
        .wrapping_mul(1_000_003)
        .wrapping_add(iteration as u64 * 7919))
        & 0x3FFF_FFFF
}

pub(crate) fn model_err(e: dws_models::ModelError) -> RlError {
    RlError::Io(e.to_string())
}

/// Drops logged updates after `iteration` (they are redone on resume).
fn truncate_metrics(path: &Path, iteration: usize) -> Result<()> {
    dws_models::train::truncate_log::<IterLog>(path, |e| e.iteration <= iteration).map_err(io(path))
}

/// Mean return of the uniform-random policy over at least `episodes` episodes of `env`
/// (all envs run until enough have ended), seeded with `seed`.
pub fn random_baseline(env: &mut dyn VecEnv, episodes: usize, seed: u64) -> Result<Baseline> {
    let mut policy = random_policy(env.spec().action_space.clone(), seed);
    episode_returns(env, episodes, seed, "uniform random", &mut policy)
}

/// The uniform-random policy over `space` (frames → one action per env), seeded.
pub fn random_policy(
    space: dws_envs::ActionSpace,
    seed: u64,
) -> impl FnMut(&[u8], usize) -> Vec<dws_envs::Action> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    move |_: &[u8], n: usize| (0..n).map(|_| sample_action(&space, &mut rng)).collect()
}

/// Returns of `policy` (frames `[N, H, W, 3]` → one action per env) over the first
/// `episodes` episodes to end in `env`, reset with `seed`.
pub fn episode_returns(
    env: &mut dyn VecEnv,
    episodes: usize,
    seed: u64,
    name: &str,
    policy: &mut dyn FnMut(&[u8], usize) -> Vec<dws_envs::Action>,
) -> Result<Baseline> {
    returns_until(env, episodes, None, seed, name, policy)
}

/// Returns of `policy` over the first `per_env` episodes of every env of `env`, reset
/// with `seed`: `per_env × N` episodes in all. Long episodes count as often as short
/// ones, which the first episodes to end over all envs do not guarantee.
pub fn episode_returns_per_env(
    env: &mut dyn VecEnv,
    per_env: usize,
    seed: u64,
    name: &str,
    policy: &mut dyn FnMut(&[u8], usize) -> Vec<dws_envs::Action>,
) -> Result<Baseline> {
    let total = per_env.max(1) * env.num_envs();
    returns_until(env, total, Some(per_env.max(1)), seed, name, policy)
}

/// The first `episodes` episodes to end, at most `quota` from each env.
fn returns_until(
    env: &mut dyn VecEnv,
    episodes: usize,
    quota: Option<usize>,
    seed: u64,
    name: &str,
    policy: &mut dyn FnMut(&[u8], usize) -> Vec<dws_envs::Action>,
) -> Result<Baseline> {
    let n = env.num_envs();
    env.reset(seed).map_err(|e| RlError::Env(e.to_string()))?;
    let mut running = vec![(0f32, 0usize); n];
    let mut counted = vec![0usize; n];
    let mut ended: Vec<(f32, usize)> = Vec::new();
    // Count the episodes in a fixed order (env index within a step).
    let mut steps = 0u64;
    while ended.len() < episodes.max(1) {
        let actions = policy(env.obs(), n);
        let result = env
            .step(&actions)
            .map_err(|e| RlError::Env(e.to_string()))?;
        for (i, s) in result.iter().enumerate() {
            running[i].0 += s.reward;
            running[i].1 += 1;
            if s.done() {
                if quota.is_none_or(|q| counted[i] < q) {
                    ended.push(running[i]);
                    counted[i] += 1;
                }
                running[i] = (0.0, 0);
            }
        }
        steps += n as u64;
        if steps > 50_000_000 {
            return Err(RlError::Env(format!(
                "the {name} policy finished too few episodes in 50M steps"
            )));
        }
    }
    ended.truncate(episodes.max(1));
    let k = ended.len() as f32;
    let mean = ended.iter().map(|e| e.0).sum::<f32>() / k;
    let var = ended.iter().map(|e| (e.0 - mean).powi(2)).sum::<f32>() / k;
    Ok(Baseline {
        policy: name.into(),
        episodes: ended.len(),
        mean_return: mean,
        std_return: var.sqrt(),
        mean_length: ended.iter().map(|e| e.1 as f32).sum::<f32>() / k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dws_envs::{Action, ActionSpace, EnvSpec, Step};

    /// Env `i` ends an episode every `2i + 1` steps, earning 1 per step: an episode's
    /// return is its length.
    struct Lengths {
        spec: EnvSpec,
        t: Vec<usize>,
        steps: Vec<Step>,
        obs: Vec<u8>,
    }

    impl VecEnv for Lengths {
        fn num_envs(&self) -> usize {
            self.t.len()
        }
        fn spec(&self) -> &EnvSpec {
            &self.spec
        }
        fn reset(&mut self, _seed: u64) -> dws_envs::Result<()> {
            self.t.fill(0);
            Ok(())
        }
        fn step(&mut self, _actions: &[Action]) -> dws_envs::Result<&[Step]> {
            for (i, t) in self.t.iter_mut().enumerate() {
                *t += 1;
                let end = *t == 2 * i + 1;
                if end {
                    *t = 0;
                }
                self.steps[i] = Step {
                    reward: 1.0,
                    terminated: end,
                    truncated: false,
                };
            }
            Ok(&self.steps)
        }
        fn obs(&self) -> &[u8] {
            &self.obs
        }
    }

    fn lengths(n: usize) -> Lengths {
        Lengths {
            spec: EnvSpec {
                id: "test:lengths".into(),
                action_space: ActionSpace::Discrete { n: 2 },
                frame_shape: [1, 1, 3],
                action_templates: vec!["a".into(), "b".into()],
                final_frame_rendered: true,
            },
            t: vec![0; n],
            steps: vec![Step::default(); n],
            obs: vec![0; n * 3],
        }
    }

    #[test]
    fn per_env_counts_long_episodes_as_often_as_short_ones() {
        let mut policy = |_: &[u8], n: usize| vec![Action::Discrete(0); n];
        // Lengths 1 and 3. The first 6 episodes to end: five of length 1, one of 3.
        let first = episode_returns(&mut lengths(2), 6, 0, "test", &mut policy).unwrap();
        assert_eq!(first.episodes, 6);
        assert!((first.mean_return - 8.0 / 6.0).abs() < 1e-6, "{first:?}");
        // Three of each.
        let even = episode_returns_per_env(&mut lengths(2), 3, 0, "test", &mut policy).unwrap();
        assert_eq!(even.episodes, 6);
        assert!((even.mean_return - 2.0).abs() < 1e-6, "{even:?}");
        assert!((even.mean_length - 2.0).abs() < 1e-6, "{even:?}");
        assert!((even.std_return - 1.0).abs() < 1e-6, "{even:?}");
    }
}
