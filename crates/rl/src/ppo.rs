//! Proximal Policy Optimization (Schulman et al. 2017), laid out like cleanrl's
//! `ppo_procgen.py` so each step can be checked against it: one config, a rollout
//! collector, GAE, and a clipped-objective update.
//!
//! Works on any [`VecEnv`], real or imagined: [`Ppo::collect`] steps the envs with the
//! current policy and returns a [`Rollout`] with its advantages; [`Ppo::update`] takes one
//! or several rollouts (real and imagined data mixed) and runs the epochs of minibatch
//! updates on their union.
//!
//! Conventions:
//! - `dones[t]` marks that the step taken at `t` ended its episode (terminated or
//!   truncated); the envs reset at once, so `V(s_{t+1})` is not used for that step. A
//!   truncation is treated as an end, as cleanrl does (Procgen only truncates at its own
//!   limits, where the next frame is not rendered).
//! - Advantages are normalised per minibatch when `norm_adv` is set.
//! - The gradient is clipped per parameter tensor to `max_grad_norm` (burn's clipping),
//!   not over all parameters at once as PyTorch's `clip_grad_norm_` does.

use crate::nets::{frames_to_input, ActorCritic, Head, NetConfig};
use crate::{Result, RlError};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_envs::{Action, ActionSpace, VecEnv};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Everything PPO needs to know; the defaults of each preset are in the constructors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PpoConfig {
    pub num_envs: usize,
    /// Steps per env per rollout.
    pub num_steps: usize,
    pub gamma: f32,
    pub gae_lambda: f32,
    pub update_epochs: usize,
    pub minibatches: usize,
    pub clip_coef: f32,
    /// Clip the value update around the old values too.
    pub clip_vloss: bool,
    pub ent_coef: f32,
    pub vf_coef: f32,
    pub max_grad_norm: f32,
    pub lr: f64,
    /// Decay the learning rate linearly to 0 over the run.
    pub anneal_lr: bool,
    pub norm_adv: bool,
    pub net: NetConfig,
}

impl PpoConfig {
    /// Procgen paper / cleanrl settings (64 envs × 256 steps, IMPALA CNN): GPU scale.
    pub fn procgen() -> Self {
        Self {
            num_envs: 64,
            num_steps: 256,
            gamma: 0.999,
            gae_lambda: 0.95,
            update_epochs: 3,
            minibatches: 8,
            clip_coef: 0.2,
            clip_vloss: true,
            ent_coef: 0.01,
            vf_coef: 0.5,
            max_grad_norm: 0.5,
            lr: 5e-4,
            anneal_lr: true,
            norm_adv: true,
            net: NetConfig::impala(),
        }
    }

    /// Sized for two CPU cores: the same network with one residual block per stack,
    /// 32 envs × 128 steps, two epochs.
    pub fn small() -> Self {
        Self {
            num_envs: 32,
            num_steps: 128,
            update_epochs: 2,
            minibatches: 8,
            net: NetConfig {
                channels: vec![16, 32, 32],
                res_blocks: 1,
                hidden: 256,
            },
            ..Self::procgen()
        }
    }

    /// Seconds: a tiny network on a few short rollouts, for tests.
    pub fn debug() -> Self {
        Self {
            num_envs: 4,
            num_steps: 16,
            update_epochs: 2,
            minibatches: 2,
            net: NetConfig {
                channels: vec![4, 8],
                res_blocks: 1,
                hidden: 32,
            },
            ..Self::procgen()
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "debug" => Ok(Self::debug()),
            "small" => Ok(Self::small()),
            "procgen" | "paper" => Ok(Self::procgen()),
            _ => Err(RlError::Config(format!(
                "unknown PPO preset `{name}`: debug, small or procgen"
            ))),
        }
    }

    /// Transitions per rollout.
    pub fn batch_size(&self) -> usize {
        self.num_envs * self.num_steps
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(RlError::Config(m.to_string()));
        if self.num_envs == 0 || self.num_steps == 0 {
            return bad("num_envs and num_steps must be at least 1");
        }
        if self.minibatches == 0 || self.minibatches > self.batch_size() {
            return bad("minibatches must be between 1 and num_envs × num_steps");
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.gae_lambda) {
            return bad("gamma and gae_lambda must be in [0, 1]");
        }
        if self.net.channels.is_empty() || self.net.hidden == 0 {
            return bad("the network needs at least one conv stack and a hidden layer");
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return bad("lr must be positive");
        }
        Ok(())
    }
}

/// Actions of a rollout, flat over (step, env).
#[derive(Debug, Clone, PartialEq)]
pub enum ActionBuf {
    Discrete(Vec<u32>),
    /// `[T·N, dim]`, as sampled (before clipping to the action bounds).
    Continuous {
        dim: usize,
        values: Vec<f32>,
    },
}

/// An episode that ended during a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpisodeEnd {
    pub ret: f32,
    pub len: usize,
}

/// One batch of experience with its advantages; index `t * num_envs + i` is env `i` at
/// step `t`.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub num_envs: usize,
    pub num_steps: usize,
    /// Frame side (frames are `[side, side, 3]` u8).
    pub side: usize,
    /// Observations the actions were taken at, `[T, N, side, side, 3]`.
    pub obs: Vec<u8>,
    pub actions: ActionBuf,
    pub logprobs: Vec<f32>,
    pub values: Vec<f32>,
    /// Rewards learned from: the env's, plus γ·V(last frame) where an episode was cut
    /// short (see [`Ppo::collect`]).
    pub rewards: Vec<f32>,
    /// The env's own rewards.
    pub env_rewards: Vec<f32>,
    pub dones: Vec<bool>,
    /// Episode ends that were terminations (a subset of `dones`).
    pub terminated: Vec<bool>,
    /// The frames episodes ended at, by flat index, where the env kept them.
    pub end_frames: Vec<(usize, Vec<u8>)>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
    /// One-step TD errors `r + γ V(s') − V(s)` under the critic that collected it.
    pub td_errors: Vec<f32>,
    /// Episodes that ended in this rollout.
    pub episodes: Vec<EpisodeEnd>,
}

impl Rollout {
    pub fn len(&self) -> usize {
        self.num_envs * self.num_steps
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn frame(&self, k: usize) -> &[u8] {
        let f = self.side * self.side * 3;
        &self.obs[k * f..(k + 1) * f]
    }
}

/// Generalized advantage estimation over `[T, N]` arrays (`dones[t]`: the step at `t`
/// ended its episode), bootstrapping from `last_values` `[N]`. Returns advantages and
/// returns (advantages + values).
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    dones: &[bool],
    last_values: &[f32],
    gamma: f32,
    lambda: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (adv, returns, _) = gae_and_td(rewards, values, dones, last_values, gamma, lambda);
    (adv, returns)
}

/// [`gae`] and the one-step TD errors `r + γ V(s') − V(s)` it is built from.
fn gae_and_td(
    rewards: &[f32],
    values: &[f32],
    dones: &[bool],
    last_values: &[f32],
    gamma: f32,
    lambda: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = last_values.len();
    let t_len = rewards.len() / n.max(1);
    assert_eq!(rewards.len(), t_len * n);
    assert_eq!(values.len(), rewards.len());
    assert_eq!(dones.len(), rewards.len());
    let mut adv = vec![0f32; rewards.len()];
    let mut td = vec![0f32; rewards.len()];
    let mut running = vec![0f32; n];
    for t in (0..t_len).rev() {
        for i in 0..n {
            let k = t * n + i;
            let next_value = if t + 1 == t_len {
                last_values[i]
            } else {
                values[k + n]
            };
            let live = if dones[k] { 0.0 } else { 1.0 };
            let delta = rewards[k] + gamma * next_value * live - values[k];
            running[i] = delta + gamma * lambda * live * running[i];
            adv[k] = running[i];
            td[k] = delta;
        }
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns, td)
}

/// Running return and length of each env's current episode.
#[derive(Debug, Clone)]
pub struct EpisodeTracker {
    returns: Vec<f32>,
    lengths: Vec<usize>,
}

impl EpisodeTracker {
    pub fn new(num_envs: usize) -> Self {
        Self {
            returns: vec![0.0; num_envs],
            lengths: vec![0; num_envs],
        }
    }
}

/// Losses and diagnostics of one update, averaged over its minibatches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateStats {
    pub policy_loss: f32,
    pub value_loss: f32,
    pub entropy: f32,
    pub approx_kl: f32,
    pub clip_frac: f32,
    /// 1 − Var(returns − values) / Var(returns) of the rollout values.
    pub explained_variance: f32,
}

/// The distribution of a state's action.
fn log_softmax_row(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|l| l - lse).collect()
}

const HALF_LN_TAU: f32 = 0.918_938_5; // ½ ln 2π

/// A PPO learner: the network, its optimiser and the sampling stream.
pub struct Ppo<B: AutodiffBackend> {
    pub config: PpoConfig,
    pub model: ActorCritic<B>,
    pub optim: OptimizerAdaptor<Adam, ActorCritic<B>, B>,
    pub rng: ChaCha8Rng,
    space: ActionSpace,
    side: usize,
    device: B::Device,
}

impl<B: AutodiffBackend> Ppo<B> {
    /// A fresh learner for an action space and `side × side` frames.
    pub fn new(
        config: PpoConfig,
        space: ActionSpace,
        side: usize,
        seed: u64,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        B::seed(device, seed);
        let model = ActorCritic::new(&config.net, side, head_for(&space), device);
        let optim = adam(&config);
        Ok(Self {
            config,
            model,
            optim,
            rng: ChaCha8Rng::seed_from_u64(seed),
            space,
            side,
            device: device.clone(),
        })
    }

    pub fn space(&self) -> &ActionSpace {
        &self.space
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Policy outputs and values of `n` frames on the inference backend.
    fn evaluate_frames(&self, frames: &[u8], n: usize) -> (Vec<f32>, Vec<f32>) {
        let net = self.model.valid();
        let x = frames_to_input::<B::InnerBackend>(frames, n, self.side, &self.device);
        let (out, value) = net.forward(x);
        let out = out
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32");
        let value = value
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32");
        (out, value)
    }

    /// Values `V(s)` of `n` frames `[n, side, side, 3]`.
    pub fn values(&self, frames: &[u8], n: usize) -> Vec<f32> {
        self.evaluate_frames(frames, n).1
    }

    /// Samples one action per frame: the env actions, the raw samples and their log
    /// probabilities, and the values.
    pub fn act(&mut self, frames: &[u8], n: usize) -> (Vec<Action>, ActionBuf, Vec<f32>, Vec<f32>) {
        let (out, values) = self.evaluate_frames(frames, n);
        let k = out.len() / n;
        let mut logprobs = Vec::with_capacity(n);
        let mut env_actions = Vec::with_capacity(n);
        let buf = match self.space {
            ActionSpace::Discrete { .. } => {
                let mut ids = Vec::with_capacity(n);
                for row in out.chunks_exact(k) {
                    let logp = log_softmax_row(row);
                    let u: f32 = self.rng.gen();
                    let mut acc = 0.0;
                    let mut pick = k - 1;
                    for (a, lp) in logp.iter().enumerate() {
                        acc += lp.exp();
                        if u < acc {
                            pick = a;
                            break;
                        }
                    }
                    ids.push(pick as u32);
                    logprobs.push(logp[pick]);
                    env_actions.push(Action::Discrete(pick as u32));
                }
                ActionBuf::Discrete(ids)
            }
            ActionSpace::Continuous { dim, low, high } => {
                let log_std = self
                    .model
                    .log_std()
                    .expect("continuous head")
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("f32");
                let noise = dws_models::flow::normal(&mut self.rng, n * dim);
                let mut values_out = Vec::with_capacity(n * dim);
                for (mean, zs) in out.chunks_exact(dim).zip(noise.chunks_exact(dim)) {
                    let mut lp = 0.0;
                    let mut clipped = Vec::with_capacity(dim);
                    for d in 0..dim {
                        let z = zs[d];
                        let a = mean[d] + log_std[d].exp() * z;
                        lp += -0.5 * z * z - log_std[d] - HALF_LN_TAU;
                        values_out.push(a);
                        clipped.push(a.clamp(low, high));
                    }
                    logprobs.push(lp);
                    env_actions.push(Action::Continuous(clipped));
                }
                ActionBuf::Continuous {
                    dim,
                    values: values_out,
                }
            }
        };
        (env_actions, buf, logprobs, values)
    }

    /// Steps `env` for `config.num_steps` with the current policy and computes GAE.
    /// `tracker` carries each env's running episode return across calls.
    pub fn collect(
        &mut self,
        env: &mut dyn VecEnv,
        tracker: &mut EpisodeTracker,
    ) -> Result<Rollout> {
        self.collect_steps(env, tracker, self.config.num_steps)
    }

    /// [`Ppo::collect`] for a given number of steps per env.
    pub fn collect_steps(
        &mut self,
        env: &mut dyn VecEnv,
        tracker: &mut EpisodeTracker,
        steps: usize,
    ) -> Result<Rollout> {
        let n = env.num_envs();
        let [h, w, c] = env.spec().frame_shape;
        if h != self.side || w != self.side || c != 3 {
            return Err(RlError::Config(format!(
                "the env's frames are {h}×{w}×{c}; this agent takes {s}×{s}×3",
                s = self.side
            )));
        }
        if tracker.returns.len() != n {
            *tracker = EpisodeTracker::new(n);
        }
        let f = h * w * c;
        let mut obs = Vec::with_capacity(steps * n * f);
        let mut discrete = Vec::new();
        let mut continuous = Vec::new();
        let mut logprobs = Vec::with_capacity(steps * n);
        let mut values = Vec::with_capacity(steps * n);
        let mut rewards = Vec::with_capacity(steps * n);
        let mut env_rewards = Vec::with_capacity(steps * n);
        let mut dones = Vec::with_capacity(steps * n);
        let mut terminated = Vec::with_capacity(steps * n);
        let mut end_frames = Vec::new();
        let mut episodes = Vec::new();
        for _ in 0..steps {
            let at = obs.len();
            obs.extend_from_slice(env.obs());
            let (actions, buf, lp, v) = self.act(&obs[at..], n);
            match buf {
                ActionBuf::Discrete(ids) => discrete.extend(ids),
                ActionBuf::Continuous { values, .. } => continuous.extend(values),
            }
            logprobs.extend(lp);
            values.extend(v);
            let result = env
                .step(&actions)
                .map_err(|e| RlError::Env(e.to_string()))?
                .to_vec();
            // Truncated episodes whose last frame the env kept: add γ·V(last frame) to
            // the reward, so cutting an episode short does not read as its end.
            let mut bootstrap = vec![0f32; n];
            let cut: Vec<usize> = (0..n).filter(|&i| env.final_frame(i).is_some()).collect();
            if !cut.is_empty() {
                let frames: Vec<u8> = cut
                    .iter()
                    .flat_map(|&i| env.final_frame(i).expect("checked").iter().copied())
                    .collect();
                for (&i, v) in cut.iter().zip(self.values(&frames, cut.len())) {
                    bootstrap[i] = self.config.gamma * v;
                }
            }
            for (i, s) in result.iter().enumerate() {
                if let Some(f) = env.end_frame(i) {
                    end_frames.push((rewards.len(), f.to_vec()));
                }
                rewards.push(s.reward + bootstrap[i]);
                env_rewards.push(s.reward);
                dones.push(s.done());
                terminated.push(s.terminated);
                tracker.returns[i] += s.reward;
                tracker.lengths[i] += 1;
                if s.done() {
                    episodes.push(EpisodeEnd {
                        ret: tracker.returns[i],
                        len: tracker.lengths[i],
                    });
                    tracker.returns[i] = 0.0;
                    tracker.lengths[i] = 0;
                }
            }
        }
        let last = self.values(env.obs(), n);
        let (advantages, returns, td_errors) = gae_and_td(
            &rewards,
            &values,
            &dones,
            &last,
            self.config.gamma,
            self.config.gae_lambda,
        );
        let actions = match self.space {
            ActionSpace::Discrete { .. } => ActionBuf::Discrete(discrete),
            ActionSpace::Continuous { dim, .. } => ActionBuf::Continuous {
                dim,
                values: continuous,
            },
        };
        Ok(Rollout {
            num_envs: n,
            num_steps: steps,
            side: self.side,
            obs,
            actions,
            logprobs,
            values,
            rewards,
            env_rewards,
            dones,
            terminated,
            end_frames,
            advantages,
            returns,
            td_errors,
            episodes,
        })
    }

    /// Runs `update_epochs` passes of minibatch updates over the union of `rollouts`
    /// with learning rate `lr`.
    pub fn update(&mut self, rollouts: &[&Rollout], lr: f64) -> UpdateStats {
        let index: Vec<(usize, usize)> = rollouts
            .iter()
            .enumerate()
            .flat_map(|(r, ro)| (0..ro.len()).map(move |k| (r, k)))
            .collect();
        let total = index.len();
        let mb = (total / self.config.minibatches).max(1);
        let mut order: Vec<usize> = (0..total).collect();
        let mut sums = UpdateStats::default();
        let mut count = 0usize;
        for _ in 0..self.config.update_epochs {
            order.shuffle(&mut self.rng);
            for chunk in order.chunks(mb) {
                if chunk.len() < mb.min(2) {
                    continue;
                }
                let picked: Vec<(usize, usize)> = chunk.iter().map(|&j| index[j]).collect();
                let s = self.minibatch_step(rollouts, &picked, lr);
                sums.policy_loss += s.policy_loss;
                sums.value_loss += s.value_loss;
                sums.entropy += s.entropy;
                sums.approx_kl += s.approx_kl;
                sums.clip_frac += s.clip_frac;
                count += 1;
            }
        }
        let c = count.max(1) as f32;
        let (values, returns): (Vec<f32>, Vec<f32>) = rollouts
            .iter()
            .flat_map(|r| r.values.iter().copied().zip(r.returns.iter().copied()))
            .unzip();
        UpdateStats {
            policy_loss: sums.policy_loss / c,
            value_loss: sums.value_loss / c,
            entropy: sums.entropy / c,
            approx_kl: sums.approx_kl / c,
            clip_frac: sums.clip_frac / c,
            explained_variance: explained_variance(&values, &returns),
        }
    }

    fn minibatch_step(
        &mut self,
        rollouts: &[&Rollout],
        picked: &[(usize, usize)],
        lr: f64,
    ) -> UpdateStats {
        let m = picked.len();
        let side = self.side;
        let dev = self.device.clone();
        let mut frames = Vec::with_capacity(m * side * side * 3);
        let mut old_logp = Vec::with_capacity(m);
        let mut old_v = Vec::with_capacity(m);
        let mut adv = Vec::with_capacity(m);
        let mut ret = Vec::with_capacity(m);
        let mut ids = Vec::new();
        let mut cont = Vec::new();
        for &(r, k) in picked {
            let ro = rollouts[r];
            frames.extend_from_slice(ro.frame(k));
            old_logp.push(ro.logprobs[k]);
            old_v.push(ro.values[k]);
            adv.push(ro.advantages[k]);
            ret.push(ro.returns[k]);
            match &ro.actions {
                ActionBuf::Discrete(a) => ids.push(a[k] as i64),
                ActionBuf::Continuous { dim, values } => {
                    cont.extend_from_slice(&values[k * dim..(k + 1) * dim])
                }
            }
        }
        if self.config.norm_adv && m > 1 {
            let mean = adv.iter().sum::<f32>() / m as f32;
            let var = adv.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / (m - 1) as f32;
            let std = var.sqrt() + 1e-8;
            for a in &mut adv {
                *a = (*a - mean) / std;
            }
        }
        let t1 = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [m]), &dev);
        let x = frames_to_input::<B>(&frames, m, side, &dev);
        let (out, new_v) = self.model.forward(x);
        let (new_logp, entropy) = match self.space {
            ActionSpace::Discrete { .. } => {
                let logp_all = dws_kernels::log_softmax(out);
                let a = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [m, 1]), &dev);
                let new_logp = logp_all.clone().gather(1, a).flatten::<1>(0, 1);
                let entropy = (logp_all.clone().exp() * logp_all)
                    .sum_dim(1)
                    .neg()
                    .flatten::<1>(0, 1);
                (new_logp, entropy)
            }
            ActionSpace::Continuous { dim, .. } => {
                let a = Tensor::<B, 2>::from_data(TensorData::new(cont, [m, dim]), &dev);
                let log_std = self
                    .model
                    .log_std()
                    .expect("continuous head")
                    .unsqueeze::<2>();
                let z = (a - out) * log_std.clone().neg().exp();
                let new_logp = (z.powf_scalar(2.0).mul_scalar(-0.5) - log_std.clone())
                    .sub_scalar(HALF_LN_TAU)
                    .sum_dim(1)
                    .flatten::<1>(0, 1);
                let entropy = log_std
                    .add_scalar(0.5 + HALF_LN_TAU)
                    .sum_dim(1)
                    .flatten::<1>(0, 1)
                    .expand([m]);
                (new_logp, entropy)
            }
        };
        let old_logp = t1(old_logp);
        let adv = t1(adv);
        let ret = t1(ret);
        let old_v = t1(old_v);
        let logratio = new_logp - old_logp;
        let ratio = logratio.clone().exp();
        let c = self.config.clip_coef;
        let pg1 = adv.clone().neg() * ratio.clone();
        let pg2 = adv.neg() * ratio.clone().clamp(1.0 - c, 1.0 + c);
        let pg_loss = pg1.max_pair(pg2).mean();
        let v_loss = if self.config.clip_vloss {
            let unclipped = (new_v.clone() - ret.clone()).powf_scalar(2.0);
            let clipped = old_v.clone() + (new_v - old_v).clamp(-c, c);
            let clipped = (clipped - ret).powf_scalar(2.0);
            unclipped.max_pair(clipped).mean().mul_scalar(0.5)
        } else {
            (new_v - ret).powf_scalar(2.0).mean().mul_scalar(0.5)
        };
        let ent = entropy.mean();
        let loss = pg_loss.clone() - ent.clone().mul_scalar(self.config.ent_coef)
            + v_loss.clone().mul_scalar(self.config.vf_coef);
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optim.step(lr, self.model.clone(), grads);
        let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f32>();
        let ratio_inner = ratio.inner();
        let logratio_inner = logratio.inner();
        let approx_kl = ((ratio_inner.clone().sub_scalar(1.0)) - logratio_inner)
            .mean()
            .into_scalar()
            .elem::<f32>();
        let clip_frac = ratio_inner
            .sub_scalar(1.0)
            .abs()
            .greater_elem(c)
            .float()
            .mean()
            .into_scalar()
            .elem::<f32>();
        UpdateStats {
            policy_loss: scalar(pg_loss),
            value_loss: scalar(v_loss),
            entropy: scalar(ent),
            approx_kl,
            clip_frac,
            explained_variance: 0.0,
        }
    }

    /// Learning rate at update `iteration` of `iterations` (linear decay when annealing).
    pub fn lr_at(&self, iteration: usize, iterations: usize) -> f64 {
        if self.config.anneal_lr && iterations > 0 {
            let frac = 1.0 - iteration as f64 / iterations as f64;
            self.config.lr * frac.max(0.0)
        } else {
            self.config.lr
        }
    }
}

/// The Adam optimiser PPO uses (ε 1e-5, gradient clipping).
pub fn adam<B: AutodiffBackend>(config: &PpoConfig) -> OptimizerAdaptor<Adam, ActorCritic<B>, B> {
    AdamConfig::new()
        .with_epsilon(1e-5)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(config.max_grad_norm)))
        .init()
}

/// The policy head an action space needs.
pub fn head_for(space: &ActionSpace) -> Head {
    match *space {
        ActionSpace::Discrete { n } => Head::Discrete { n },
        ActionSpace::Continuous { dim, .. } => Head::Continuous { dim },
    }
}

/// `1 − Var(y − ŷ) / Var(y)`; NaN when `y` is constant.
pub fn explained_variance(pred: &[f32], target: &[f32]) -> f32 {
    let n = target.len() as f64;
    if n == 0.0 {
        return f32::NAN;
    }
    let var = |v: &mut dyn Iterator<Item = f64>| {
        let xs: Vec<f64> = v.collect();
        let mean = xs.iter().sum::<f64>() / n;
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n
    };
    let vy = var(&mut target.iter().map(|&y| y as f64));
    if vy == 0.0 {
        return f32::NAN;
    }
    let vr = var(&mut target.iter().zip(pred).map(|(&y, &p)| (y - p) as f64));
    (1.0 - vr / vy) as f32
}
