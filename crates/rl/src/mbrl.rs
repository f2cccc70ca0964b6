//! Model-based RL with a DWS world simulator (MBPO-style, as in the paper): each update
//!
//! 1. collects a rollout in the real env with the current policy and adds it to the
//!    replay (written to disk at once) and a sample of its states to the start buffer;
//! 2. fine-tunes the world model (the rectified-flow loss with the motion weights, on
//!    clips from the replay) and the reward/termination model (on its transitions);
//! 3. imagines rollouts with the simulator from start states drawn by priority
//!    (`|TD error|^α`) or uniformly, and refreshes the drawn states' priorities from
//!    the TD errors the critic gives them there;
//! 4. updates PPO on the real rollout and the imagined ones together.
//!
//! A run directory holds `agent/`, `world/` and `reward/` (each with `checkpoints/`;
//! `world/` is an ordinary world-model run that `dws predict` and `dws eval` read),
//! `replay/` (one file per real rollout), `starts-ITER.safetensors`, `metrics.jsonl` and
//! `state.json`, written last at every checkpoint: the update a resumed run continues
//! after.

use crate::imagine::{ImaginedVecEnv, StartBuffer, Starts};
use crate::ppo::{adam, EpisodeTracker, Ppo, PpoConfig, Rollout, UpdateStats};
use crate::replay::{numbered_files, Chunk, Replay};
use crate::run::{env_seed, episode_returns, model_err, Baseline};
use crate::sim::{action_batch, reward_actions, FlowSim};
use crate::{Result, RlError};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, AdamConfig, AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_envs::{EnvSpec, VecEnv};
use dws_models::checkpoint::{self, TrainState};
use dws_models::flow::{self, flow_loss, frames_to_tensor, FlowBatch, FlowConfig, LossConfig};
use dws_models::reward::{transition_patches, RewardModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The settings of a run besides the models' own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MbrlConfig {
    pub ppo: PpoConfig,
    /// Frames the world model conditions on (its training clips are one frame longer).
    pub context: usize,
    /// World-model optimiser steps per update, clips per step, learning rate.
    pub world_steps: usize,
    pub world_batch: usize,
    pub world_lr: f64,
    /// Reward-model optimiser steps per update, transitions per step, learning rate.
    pub reward_steps: usize,
    pub reward_batch: usize,
    pub reward_lr: f64,
    /// Half of each reward batch drawn from rewarded or terminal transitions.
    pub balanced_rewards: bool,
    /// Imagined trajectories stepped together, and their length.
    pub imagined_envs: usize,
    pub horizon: usize,
    /// Imagined env steps per real env step in each update (0: model-free).
    pub imagined_ratio: f32,
    /// Updates on real data alone before imagination begins, while the models warm up.
    pub imagine_after: usize,
    pub starts: Starts,
    /// Priority exponent α.
    pub alpha: f64,
    pub start_capacity: usize,
    /// Real states added to the start buffer per update.
    pub starts_per_update: usize,
    /// Real rollouts the replay keeps.
    pub replay_chunks: usize,
}

impl MbrlConfig {
    /// Seconds: tiny models, a few short rollouts (tests).
    pub fn debug() -> Self {
        Self {
            ppo: PpoConfig::debug(),
            context: 3,
            world_steps: 2,
            world_batch: 2,
            world_lr: 1e-3,
            reward_steps: 2,
            reward_batch: 8,
            reward_lr: 1e-3,
            balanced_rewards: true,
            imagined_envs: 4,
            horizon: 4,
            imagined_ratio: 0.5,
            imagine_after: 1,
            starts: Starts::Prioritized,
            alpha: 0.6,
            start_capacity: 64,
            starts_per_update: 16,
            replay_chunks: 8,
        }
    }

    /// Two CPU cores: the small PPO preset, a quarter as many imagined steps as real
    /// ones, horizon 16.
    pub fn small() -> Self {
        Self {
            ppo: PpoConfig::small(),
            context: 3,
            world_steps: 30,
            world_batch: 8,
            world_lr: 5e-4,
            reward_steps: 30,
            reward_batch: 64,
            reward_lr: 5e-4,
            balanced_rewards: true,
            imagined_envs: 32,
            horizon: 16,
            imagined_ratio: 0.25,
            imagine_after: 2,
            starts: Starts::Prioritized,
            alpha: 0.6,
            start_capacity: 4096,
            starts_per_update: 512,
            replay_chunks: 12,
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "debug" => Ok(Self::debug()),
            "small" => Ok(Self::small()),
            _ => Err(RlError::Config(format!(
                "unknown MBRL preset `{name}`: debug or small"
            ))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.ppo.validate()?;
        let bad = |m: &str| Err(RlError::Config(m.to_string()));
        if self.context < 1 {
            return bad("context must be at least 1 frame");
        }
        if self.context + 1 > self.ppo.num_steps {
            return bad("the world model's clips (context + 1 frames) must fit in a rollout");
        }
        if self.world_batch == 0 || self.reward_batch == 0 {
            return bad("world_batch and reward_batch must be at least 1");
        }
        if self.imagined_envs == 0 || self.horizon == 0 {
            return bad("imagined_envs and horizon must be at least 1");
        }
        if !(self.imagined_ratio.is_finite() && self.imagined_ratio >= 0.0) {
            return bad("imagined_ratio must be 0 or more");
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad("alpha must be 0 or more");
        }
        if self.start_capacity == 0 || self.replay_chunks == 0 {
            return bad("start_capacity and replay_chunks must be at least 1");
        }
        Ok(())
    }

    /// Imagined steps per env in each update that imagines.
    pub fn imagined_steps_per_env(&self) -> usize {
        let total = self.imagined_ratio as f64 * self.ppo.batch_size() as f64;
        (total / self.imagined_envs as f64).ceil() as usize
    }
}

/// The state of a run: an agent, a simulator being fine-tuned, and their data.
pub struct Mbrl<B: AutodiffBackend> {
    pub config: MbrlConfig,
    pub ppo: Ppo<B>,
    pub world: flow::WorldModel<B>,
    world_optim: OptimizerAdaptor<AdamW, flow::WorldModel<B>, B>,
    pub reward: RewardModel<B>,
    reward_optim: OptimizerAdaptor<Adam, RewardModel<B>, B>,
    pub replay: Replay,
    pub starts: StartBuffer,
    /// The world model's loss (motion weights) and sampling.
    pub loss: LossConfig,
    pub flow: FlowConfig,
    pub spec: EnvSpec,
    rng: ChaCha8Rng,
    seed: u64,
}

fn world_optim<B: AutodiffBackend>() -> OptimizerAdaptor<AdamW, flow::WorldModel<B>, B> {
    AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init()
}

fn reward_optim<B: AutodiffBackend>() -> OptimizerAdaptor<Adam, RewardModel<B>, B> {
    AdamConfig::new()
        .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)))
        .init()
}

/// The reward/termination model with its optimiser: trained on real transitions by
/// `dws mbrl` every update and by `dws imagine` before it imagines.
pub struct RewardTrainer<B: AutodiffBackend> {
    pub model: RewardModel<B>,
    pub optim: OptimizerAdaptor<Adam, RewardModel<B>, B>,
}

impl<B: AutodiffBackend> RewardTrainer<B> {
    pub fn new(model: RewardModel<B>) -> Self {
        Self {
            model,
            optim: reward_optim(),
        }
    }

    /// `steps` optimiser steps on batches of `batch` transitions of `replay` (half of
    /// them rewarded or terminal with `balanced`, importance-weighted back); returns the
    /// mean reward MSE and termination cross-entropy, `None` without transitions.
    #[allow(clippy::too_many_arguments)]
    pub fn train<R: Rng>(
        &mut self,
        replay: &Replay,
        space: &dws_envs::ActionSpace,
        steps: usize,
        batch: usize,
        lr: f64,
        balanced: bool,
        rng: &mut R,
    ) -> Result<Option<(f32, f32)>> {
        let device = self.model.devices()[0].clone();
        let (side, patch) = (self.model.side(), self.model.patch());
        let (mut mse, mut bce, mut done) = (0.0, 0.0, 0);
        for _ in 0..steps {
            let t = replay.sample_transitions(batch, balanced, rng);
            if t.is_empty() {
                break;
            }
            let n = t.len();
            let patches = transition_patches::<B>(&t.before, &t.after, n, side, patch, &device);
            let actions = reward_actions::<B>(space, &t.actions, &device);
            let rewards = Tensor::from_data(TensorData::new(t.rewards, [n]), &device);
            let ends = Tensor::from_data(TensorData::new(t.terminated, [n]), &device);
            let weights = Tensor::from_data(TensorData::new(t.weights, [n]), &device);
            let (loss, m, c) = self
                .model
                .loss(patches, actions, rewards, ends, 1.0, Some(weights));
            if !(m.is_finite() && c.is_finite()) {
                return Err(RlError::Config(
                    "the reward model's loss became non-finite; lower reward_lr".into(),
                ));
            }
            let grads = GradientsParams::from_grads(loss.backward(), &self.model);
            self.model = self.optim.step(lr, self.model.clone(), grads);
            mse += m;
            bce += c;
            done += 1;
        }
        Ok((done > 0).then(|| (mse / done as f32, bce / done as f32)))
    }

    /// Writes the model and its optimiser state as a checkpoint of `run`.
    pub fn save(&self, run: &Path, state: &TrainState, keep_last: usize) -> Result<PathBuf> {
        checkpoint::save::<B, _>(run, &self.model, self.optim.to_record(), state, keep_last)
            .map_err(model_err)
    }

    /// Restores a checkpoint written by [`RewardTrainer::save`].
    pub fn load(&mut self, ckpt: &Path) -> Result<()> {
        let device = self.model.devices()[0].clone();
        self.model =
            checkpoint::load_model(self.model.clone(), ckpt, &device).map_err(model_err)?;
        self.optim = reward_optim::<B>()
            .load_record(checkpoint::load_optim(ckpt, &device).map_err(model_err)?);
        Ok(())
    }
}

impl<B: AutodiffBackend> Mbrl<B> {
    /// A fresh run state around a world model (from a base checkpoint or new, with its
    /// action modules attached) and a reward model.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: MbrlConfig,
        spec: EnvSpec,
        world: flow::WorldModel<B>,
        reward: RewardModel<B>,
        loss: LossConfig,
        flow: FlowConfig,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let [h, w, c] = spec.frame_shape;
        if h != w || c != 3 {
            return Err(RlError::Config(format!(
                "{}: model-based RL here takes square RGB frames, got {h}×{w}×{c}",
                spec.id
            )));
        }
        if world.embedder.is_none() || !world.dit.has_action_modules() {
            return Err(RlError::Config(
                "the world model has no action modules: imagination needs an action-conditioned \
                 simulator"
                    .into(),
            ));
        }
        let ppo = Ppo::new(
            config.ppo.clone(),
            spec.action_space.clone(),
            h,
            seed,
            device,
        )?;
        let starts = StartBuffer::new(
            config.starts,
            config.start_capacity,
            config.context,
            h * w * c,
            crate::imagine::action_width(&spec.action_space),
            config.alpha,
        );
        Ok(Self {
            replay: Replay::new(config.replay_chunks),
            starts,
            ppo,
            world,
            world_optim: world_optim(),
            reward,
            reward_optim: reward_optim(),
            loss,
            flow,
            spec,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6d62_726c),
            seed,
            config,
        })
    }

    /// Adds a real rollout: to the replay, and a random sample of its states (those with
    /// a full context of one episode) to the start buffer.
    pub fn add_real(&mut self, chunk: Chunk) {
        let k = self.config.context;
        let mut cands = chunk.start_candidates(k);
        let take = self.config.starts_per_update.min(cands.len());
        for j in 0..take {
            let pick = self.rng.gen_range(j..cands.len());
            cands.swap(j, pick);
            let (t, i) = cands[j];
            let (frames, actions) = chunk.history(t, i, k);
            self.starts.push(&frames, &actions);
        }
        self.replay.push(chunk);
    }

    /// World-model steps on replay clips; returns the mean loss (`None` without clips).
    pub fn train_world(&mut self, steps: usize) -> Result<Option<f32>> {
        let device = self.ppo.device().clone();
        let [h, w, c] = self.spec.frame_shape;
        let len = self.config.context + 1;
        let mut sum = 0.0;
        let mut done = 0;
        for _ in 0..steps {
            let Some(clips) = self
                .replay
                .sample_clips(self.config.world_batch, len, &mut self.rng)
            else {
                break;
            };
            let b = clips.batch;
            let batch = FlowBatch {
                x0: frames_to_tensor::<B>(&clips.frames, [b, len, h, w, c], &device),
                actions: Some(action_batch::<B>(
                    &self.spec.action_space,
                    &clips.actions,
                    b,
                    len - 1,
                    &device,
                )),
            };
            let loss = flow_loss(&self.world, batch, &self.loss, &mut self.rng);
            let value: f32 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                return Err(RlError::Config(format!(
                    "the world model's loss became {value}; lower world_lr"
                )));
            }
            let grads = GradientsParams::from_grads(loss.backward(), &self.world);
            self.world = self
                .world_optim
                .step(self.config.world_lr, self.world.clone(), grads);
            sum += value;
            done += 1;
        }
        Ok((done > 0).then(|| sum / done as f32))
    }

    /// Reward-model steps on replay transitions; returns the mean reward MSE and
    /// termination cross-entropy.
    pub fn train_reward(&mut self, steps: usize) -> Result<Option<(f32, f32)>> {
        let mut trainer = RewardTrainer {
            model: self.reward.clone(),
            optim: std::mem::replace(&mut self.reward_optim, reward_optim()),
        };
        let out = trainer.train(
            &self.replay,
            &self.spec.action_space,
            steps,
            self.config.reward_batch,
            self.config.reward_lr,
            self.config.balanced_rewards,
            &mut self.rng,
        );
        self.reward = trainer.model;
        self.reward_optim = trainer.optim;
        out
    }

    /// How the reward model reads real transitions: its mean predicted reward and
    /// termination probability on rewarded or terminal transitions ("events") and on the
    /// rest, from a batch of up to `n` of each (drawn with their own generator, so the
    /// training stream is not disturbed). `None` without events.
    pub fn reward_check(&self, n: usize, seed: u64) -> Option<RewardCheck> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let t = self.replay.sample_transitions(2 * n, true, &mut rng);
        let device = self.ppo.device().clone();
        let (side, patch) = (self.reward.side(), self.reward.patch());
        let is_event: Vec<bool> = (0..t.len())
            .map(|k| t.rewards[k] != 0.0 || t.terminated[k] > 0.0)
            .collect();
        if !is_event.contains(&true) || !is_event.contains(&false) {
            return None;
        }
        let reward = self.reward.valid();
        let patches = transition_patches::<B::InnerBackend>(
            &t.before,
            &t.after,
            t.len(),
            side,
            patch,
            &device,
        );
        let actions =
            reward_actions::<B::InnerBackend>(&self.spec.action_space, &t.actions, &device);
        let (r, logit) = reward.forward(patches, actions);
        let r: Vec<f32> = r.into_data().convert::<f32>().into_vec().expect("f32");
        let p: Vec<f32> = logit
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32")
            .into_iter()
            .map(|z| 1.0 / (1.0 + (-z).exp()))
            .collect();
        let mean = |v: &[f32], want: bool| {
            let (s, c) = v
                .iter()
                .zip(&is_event)
                .filter(|p| *p.1 == want)
                .fold((0.0, 0), |(s, c), p| (s + p.0, c + 1));
            s / c.max(1) as f32
        };
        Some(RewardCheck {
            events_reward: mean(&r, true),
            events_true_reward: mean(&t.rewards, true),
            other_reward: mean(&r, false),
            events_end_prob: mean(&p, true),
            other_end_prob: mean(&p, false),
        })
    }

    /// The simulator as it is now, on the inner (non-autodiff) backend.
    pub fn simulator(&self, seed: u64) -> FlowSim<B::InnerBackend> {
        FlowSim::new(
            self.world.valid(),
            self.reward.valid(),
            self.flow,
            self.spec.clone(),
            self.config.context,
            seed,
            self.ppo.device(),
        )
    }

    /// Imagines `steps` steps of `imagined_envs` trajectories from the start buffer with
    /// the current policy, and refreshes the priorities of the states they started from
    /// with the TD errors there. Returns the rollout and the mean |TD error| at starts.
    pub fn imagine(&mut self, steps: usize) -> Result<(Rollout, f32)> {
        let seed = self.rng.gen::<u32>() as u64;
        let mut sim = self.simulator(seed);
        let mut env = ImaginedVecEnv::new(
            &mut sim,
            &self.starts,
            self.config.imagined_envs,
            self.config.horizon,
        )?;
        env.reset(seed).map_err(|e| RlError::Env(e.to_string()))?;
        let mut tracker = EpisodeTracker::new(self.config.imagined_envs);
        let rollout = self.ppo.collect_steps(&mut env, &mut tracker, steps)?;
        let events = env.take_starts();
        drop(env);
        let (mut sum, mut n) = (0.0, 0);
        for e in events {
            // A restart at the last step has not been evaluated yet.
            if let Some(&td) = rollout.td_errors.get(e.index) {
                self.starts.update(e.slot, td);
                sum += td.abs();
                n += 1;
            }
        }
        Ok((rollout, if n > 0 { sum / n as f32 } else { 0.0 }))
    }
}

/// What the reward model predicts on real transitions (see [`Mbrl::reward_check`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct RewardCheck {
    /// Mean predicted and true reward on rewarded or terminal transitions.
    pub events_reward: f32,
    pub events_true_reward: f32,
    /// Mean predicted reward elsewhere (true: 0).
    pub other_reward: f32,
    /// Mean predicted termination probability on events and elsewhere.
    pub events_end_prob: f32,
    pub other_end_prob: f32,
}

/// One logged update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MbrlLog {
    pub iteration: usize,
    /// Real env steps so far.
    pub env_steps: u64,
    /// Imagined env steps so far.
    pub imagined_steps: u64,
    /// Real episodes that ended in this update's rollout, their mean return and length.
    pub episodes: usize,
    pub episode_return: Option<f32>,
    pub episode_length: Option<f32>,
    /// Mean return of the evaluation episodes, where this update ran them.
    pub eval_return: Option<f32>,
    pub world_loss: Option<f32>,
    pub reward_mse: Option<f32>,
    pub reward_bce: Option<f32>,
    /// The reward model on real transitions after this update's training.
    #[serde(default)]
    pub reward_check: Option<RewardCheck>,
    /// Mean imagined reward per step, share of imagined steps that terminated, mean
    /// |TD error| at the start states drawn.
    pub imagined_reward: Option<f32>,
    pub imagined_ends: Option<f32>,
    pub start_td: Option<f32>,
    pub lr: f64,
    pub collect_s: f64,
    pub world_s: f64,
    pub imagine_s: f64,
    pub learn_s: f64,
    #[serde(flatten)]
    pub stats: UpdateStats,
}

/// What `state.json` records: the last complete update.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MbrlState {
    pub iteration: usize,
    pub imagined_steps: u64,
    pub rng_word_pos: u128,
}

/// How a run is driven.
pub struct MbrlOptions<'a> {
    /// Real env steps to train for (rounded up to whole updates).
    pub total_steps: u64,
    pub resume: bool,
    /// Updates between checkpoints.
    pub checkpoint_every: usize,
    pub keep_last: usize,
    /// Stop after this many updates in this call (tests of resume).
    pub stop_after: Option<usize>,
    /// Evaluate every this many updates (0: never) on `eval_env`, for
    /// `eval_episodes` episodes.
    pub eval_every: usize,
    pub eval_episodes: usize,
    pub eval_env: Option<&'a mut dyn VecEnv>,
    pub on_update: &'a mut dyn FnMut(&MbrlLog),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RlError + '_ {
    move |e| RlError::Io(format!("{}: {e}", path.display()))
}

fn starts_path(run: &Path, iteration: usize) -> PathBuf {
    run.join(format!("starts-{iteration:08}.safetensors"))
}

fn step_dir(part: &Path, iteration: usize) -> PathBuf {
    checkpoint::checkpoints_dir(part).join(format!("step-{iteration:08}"))
}

/// Reads `state.json` of a run, if it has one.
pub fn read_state(run: &Path) -> Result<Option<MbrlState>> {
    let p = run.join("state.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| RlError::Io(format!("{}: {e}", p.display())))
}

impl<B: AutodiffBackend> Mbrl<B> {
    fn save(&self, run: &Path, iteration: usize, imagined_steps: u64, keep: usize) -> Result<()> {
        let keep = keep.max(2);
        let state = |rng: &ChaCha8Rng| TrainState {
            step: iteration,
            rng_seed: self.seed,
            rng_word_pos: rng.get_word_pos(),
            last_loss: 0.0,
        };
        checkpoint::save::<B, _>(
            &run.join("agent"),
            &self.ppo.model,
            self.ppo.optim.to_record(),
            &state(&self.ppo.rng),
            keep,
        )
        .map_err(model_err)?;
        checkpoint::save::<B, _>(
            &run.join("world"),
            &self.world,
            self.world_optim.to_record(),
            &state(&self.rng),
            keep,
        )
        .map_err(model_err)?;
        checkpoint::save::<B, _>(
            &run.join("reward"),
            &self.reward,
            self.reward_optim.to_record(),
            &state(&self.rng),
            keep,
        )
        .map_err(model_err)?;
        self.starts.save(&starts_path(run, iteration))?;
        let s = MbrlState {
            iteration,
            imagined_steps,
            rng_word_pos: self.rng.get_word_pos(),
        };
        crate::write_atomic(
            &run.join("state.json"),
            serde_json::to_string_pretty(&s)
                .expect("serialises")
                .as_bytes(),
        )?;
        // What no kept checkpoint needs any more: older start buffers and replay chunks
        // that fell out of the replay before the oldest kept checkpoint.
        let kept = checkpoint::list(&run.join("agent"));
        let oldest = kept
            .first()
            .and_then(|p| checkpoint::read_state(p).ok())
            .map_or(iteration, |s| s.step);
        for (it, path) in numbered_files(run, "starts-", ".safetensors") {
            if it < oldest {
                let _ = fs::remove_file(path);
            }
        }
        for (it, path) in numbered_files(&run.join("replay"), "chunk-", ".safetensors") {
            if it + self.config.replay_chunks <= oldest {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Restores the run at update `iteration`: models, optimisers, random streams, the
    /// start buffer and the replay.
    fn restore(&mut self, run: &Path, st: &MbrlState) -> Result<()> {
        let it = st.iteration;
        let device = self.ppo.device().clone();
        let agent = step_dir(&run.join("agent"), it);
        let ppo_state = checkpoint::read_state(&agent).map_err(model_err)?;
        self.ppo.model =
            checkpoint::load_model(self.ppo.model.clone(), &agent, &device).map_err(model_err)?;
        let optim = std::mem::replace(&mut self.ppo.optim, adam(&self.ppo.config));
        self.ppo.optim =
            optim.load_record(checkpoint::load_optim(&agent, &device).map_err(model_err)?);
        self.ppo.rng = ChaCha8Rng::seed_from_u64(ppo_state.rng_seed);
        self.ppo.rng.set_word_pos(ppo_state.rng_word_pos);
        let world = step_dir(&run.join("world"), it);
        self.world =
            checkpoint::load_model(self.world.clone(), &world, &device).map_err(model_err)?;
        self.world_optim = world_optim::<B>()
            .load_record(checkpoint::load_optim(&world, &device).map_err(model_err)?);
        let reward = step_dir(&run.join("reward"), it);
        self.reward =
            checkpoint::load_model(self.reward.clone(), &reward, &device).map_err(model_err)?;
        self.reward_optim = reward_optim::<B>()
            .load_record(checkpoint::load_optim(&reward, &device).map_err(model_err)?);
        self.starts = StartBuffer::load(&starts_path(run, it))?;
        self.replay = Replay::load_dir(&run.join("replay"), it, self.config.replay_chunks)?;
        self.rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x6d62_726c);
        self.rng.set_word_pos(st.rng_word_pos);
        Ok(())
    }
}

/// Number of updates a run of `total_steps` real env steps makes.
pub fn iterations(config: &MbrlConfig, total_steps: u64) -> usize {
    crate::run::iterations(&config.ppo, total_steps)
}

/// Trains `mbrl` on the real env `env` into `run`. Returns the logs of this call.
pub fn train<B: AutodiffBackend>(
    run: &Path,
    mbrl: &mut Mbrl<B>,
    env: &mut dyn VecEnv,
    mut opts: MbrlOptions<'_>,
) -> Result<Vec<MbrlLog>> {
    let replay_dir = run.join("replay");
    fs::create_dir_all(&replay_dir).map_err(io(&replay_dir))?;
    let metrics = run.join("metrics.jsonl");
    let total = iterations(&mbrl.config, opts.total_steps);
    let mut start = 0;
    let mut imagined_steps = 0u64;
    match (opts.resume, read_state(run)?) {
        (true, Some(st)) => {
            mbrl.restore(run, &st)?;
            start = st.iteration;
            imagined_steps = st.imagined_steps;
            dws_models::train::truncate_log::<MbrlLog>(&metrics, |e| e.iteration <= start)
                .map_err(io(&metrics))?;
        }
        _ => {
            // A fresh run: nothing of an earlier one may leak in.
            for part in ["agent", "world", "reward"] {
                let _ = fs::remove_dir_all(checkpoint::checkpoints_dir(&run.join(part)));
            }
            let _ = fs::remove_dir_all(&replay_dir);
            fs::create_dir_all(&replay_dir).map_err(io(&replay_dir))?;
            for (_, path) in numbered_files(run, "starts-", ".safetensors") {
                let _ = fs::remove_file(path);
            }
            for p in [metrics.clone(), run.join("state.json")] {
                if p.exists() {
                    fs::remove_file(&p).map_err(io(&p))?;
                }
            }
        }
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .map_err(io(&metrics))?;
    let end = match opts.stop_after {
        Some(n) => (start + n).min(total),
        None => total,
    };
    if start < end {
        env.reset(env_seed(mbrl.seed, start))
            .map_err(|e| RlError::Env(e.to_string()))?;
    }
    let mut tracker = EpisodeTracker::new(env.num_envs());
    let mut logs = Vec::new();
    let space = mbrl.spec.action_space.clone();
    for it in start..end {
        let t0 = Instant::now();
        let lr = mbrl.ppo.lr_at(it, total);
        let real = mbrl.ppo.collect(env, &mut tracker)?;
        let chunk = Chunk::from_rollout(&real, &space, it + 1);
        chunk.save(&Replay::chunk_path(&replay_dir, it + 1))?;
        mbrl.add_real(chunk);
        let collect_s = t0.elapsed().as_secs_f64();
        let world_loss = mbrl.train_world(mbrl.config.world_steps)?;
        let reward_loss = mbrl.train_reward(mbrl.config.reward_steps)?;
        let reward_check = mbrl.reward_check(32, it as u64);
        let world_s = t0.elapsed().as_secs_f64() - collect_s;
        let imagined = if it + 1 > mbrl.config.imagine_after && mbrl.config.imagined_ratio > 0.0 {
            let steps = mbrl.config.imagined_steps_per_env();
            Some(mbrl.imagine(steps)?)
        } else {
            None
        };
        let imagine_s = t0.elapsed().as_secs_f64() - collect_s - world_s;
        let mut batch: Vec<&Rollout> = vec![&real];
        if let Some((ro, _)) = &imagined {
            batch.push(ro);
            imagined_steps += ro.len() as u64;
        }
        let stats = mbrl.ppo.update(&batch, lr);
        if !stats.policy_loss.is_finite() || !stats.value_loss.is_finite() {
            return Err(RlError::Config(format!(
                "the PPO loss became non-finite at update {}; lower the learning rate",
                it + 1
            )));
        }
        let learn_s = t0.elapsed().as_secs_f64() - collect_s - world_s - imagine_s;
        let eval_return = match (&mut opts.eval_env, opts.eval_every) {
            (Some(eval), every) if every > 0 && ((it + 1) % every == 0 || it + 1 == total) => {
                Some(evaluate(&mut mbrl.ppo, &mut **eval, opts.eval_episodes, it)?.mean_return)
            }
            _ => None,
        };
        let n_ep = real.episodes.len();
        let mean = |f: &dyn Fn(&crate::EpisodeEnd) -> f32| {
            (n_ep > 0).then(|| real.episodes.iter().map(f).sum::<f32>() / n_ep as f32)
        };
        let entry = MbrlLog {
            iteration: it + 1,
            env_steps: ((it + 1) * mbrl.config.ppo.batch_size()) as u64,
            imagined_steps,
            episodes: n_ep,
            episode_return: mean(&|e| e.ret),
            episode_length: mean(&|e| e.len as f32),
            eval_return,
            world_loss,
            reward_mse: reward_loss.map(|r| r.0),
            reward_bce: reward_loss.map(|r| r.1),
            reward_check,
            imagined_reward: imagined
                .as_ref()
                .map(|(ro, _)| ro.env_rewards.iter().sum::<f32>() / ro.len().max(1) as f32),
            imagined_ends: imagined.as_ref().map(|(ro, _)| {
                ro.terminated.iter().filter(|&&t| t).count() as f32 / ro.len().max(1) as f32
            }),
            start_td: imagined.as_ref().map(|(_, td)| *td),
            lr,
            collect_s,
            world_s,
            imagine_s,
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
            mbrl.save(run, it + 1, imagined_steps, opts.keep_last)?;
        }
    }
    Ok(logs)
}

/// Returns of the current (sampling) policy over `episodes` real episodes.
pub fn evaluate<B: AutodiffBackend>(
    ppo: &mut Ppo<B>,
    env: &mut dyn VecEnv,
    episodes: usize,
    iteration: usize,
) -> Result<Baseline> {
    let mut policy = |frames: &[u8], n: usize| ppo.act(frames, n).0;
    episode_returns(
        env,
        episodes,
        env_seed(0x0e7a1, iteration),
        "ppo",
        &mut policy,
    )
}
