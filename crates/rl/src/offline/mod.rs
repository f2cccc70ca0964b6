//! Discrete-action offline RL (issue 10): learners that train from recorded transitions
//! only, sharing PPO's IMPALA body ([`crate::nets::QNet`]).
//!
//! - [`losses`]: the BC, CQL and IQL losses as functions of network outputs.
//! - [`bc`], [`cql`], [`iql`]: one learner each, cleanrl-style (`step` on a batch,
//!   `act` on frames).
//! - [`Learner`]: what the training loop ([`run`]) needs of any of them: a gradient
//!   step, actions for frames, checkpoints.
//! - [`TransitionSet`]: transitions `(s, a, r, s', done)` of recorded episodes, sampled
//!   uniformly; [`Mixture`] draws each batch from real and imagined sets at a fixed
//!   ratio.

pub mod bc;
pub mod cql;
pub mod iql;
pub mod losses;
pub mod run;

pub use losses::*;

use crate::nets::{frames_to_input, NetConfig, QNet};
use crate::{Result, RlError};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{Actions, Episode};
use dws_models::checkpoint::TrainState;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Settings shared by the learners (defaults: Mediratta et al. 2024's offline Procgen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineConfig {
    pub net: NetConfig,
    pub lr: f64,
    /// Transitions per gradient step (BC and CQL), and IQL's.
    pub batch: usize,
    pub iql_batch: usize,
    pub gamma: f32,
    /// CQL's conservative weight α.
    pub cql_alpha: f32,
    /// IQL's expectile τ, temperature β and cap on the advantage weights.
    pub iql_tau: f32,
    pub iql_beta: f32,
    pub iql_max_weight: f32,
    /// Gradient steps between hard copies of the target networks (CQL, IQL).
    pub cql_target_every: usize,
    pub iql_target_every: usize,
}

impl OfflineConfig {
    /// The reference setup: IMPALA 16/32/32 with FC 256, lr 5e-4, batch 256, γ 0.99,
    /// CQL α 4 and target copy every 1000 steps, IQL τ 0.8, β 3, weights ≤ 100 and target
    /// copy every 100 steps.
    pub fn reference() -> Self {
        Self {
            net: NetConfig {
                channels: vec![16, 32, 32],
                res_blocks: 2,
                hidden: 256,
            },
            lr: 5e-4,
            batch: 256,
            iql_batch: 512,
            gamma: 0.99,
            cql_alpha: 4.0,
            iql_tau: 0.8,
            iql_beta: 3.0,
            iql_max_weight: 100.0,
            cql_target_every: 1000,
            iql_target_every: 100,
        }
    }

    /// Two CPU cores: the reference losses and widths with one residual block per
    /// stack (as PPO's `small`) and batches of 64, so a thousand gradient steps take
    /// minutes (CQL) rather than hours.
    pub fn small() -> Self {
        let reference = Self::reference();
        Self {
            net: NetConfig {
                res_blocks: 1,
                ..reference.net.clone()
            },
            batch: 64,
            iql_batch: 64,
            ..reference
        }
    }

    /// Seconds: a one-stack network, batches of 8, targets copied every 10 steps.
    pub fn debug() -> Self {
        Self {
            net: NetConfig {
                channels: vec![8],
                res_blocks: 1,
                hidden: 32,
            },
            lr: 1e-3,
            batch: 8,
            iql_batch: 8,
            cql_target_every: 10,
            iql_target_every: 10,
            ..Self::reference()
        }
    }

    /// `debug`, `small` or `reference`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "debug" => Ok(Self::debug()),
            "small" => Ok(Self::small()),
            "reference" => Ok(Self::reference()),
            other => Err(RlError::Config(format!(
                "unknown offline preset `{other}`: debug, small or reference"
            ))),
        }
    }

    /// Transitions per gradient step of `algo`.
    pub fn batch_for(&self, algo: Algo) -> usize {
        match algo {
            Algo::Iql => self.iql_batch,
            Algo::Bc | Algo::Cql => self.batch,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(RlError::Config(m.into()));
        if self.batch == 0 || self.iql_batch == 0 {
            return bad("batch sizes must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr must be positive");
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return bad("gamma must be in [0, 1]");
        }
        if !(self.iql_tau > 0.0 && self.iql_tau < 1.0) {
            return bad("iql_tau must be in (0, 1)");
        }
        if self.net.channels.is_empty() || self.net.hidden == 0 {
            return bad("the network needs at least one conv stack and one hidden unit");
        }
        Ok(())
    }
}

/// The offline-RL algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    Bc,
    Cql,
    Iql,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Bc => "bc",
            Algo::Cql => "cql",
            Algo::Iql => "iql",
        }
    }

    /// A fresh learner of this algorithm for `side`-pixel frames and `actions` actions.
    pub fn learner<B: AutodiffBackend>(
        self,
        config: OfflineConfig,
        side: usize,
        actions: usize,
        device: &B::Device,
    ) -> Box<dyn Learner<B>> {
        match self {
            Algo::Bc => Box::new(bc::Bc::new(config, side, actions, device)),
            Algo::Cql => Box::new(cql::Cql::new(config, side, actions, device)),
            Algo::Iql => Box::new(iql::Iql::new(config, side, actions, device)),
        }
    }
}

impl std::str::FromStr for Algo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bc" => Ok(Algo::Bc),
            "cql" => Ok(Algo::Cql),
            "iql" => Ok(Algo::Iql),
            _ => Err(format!("unknown algorithm `{s}`: bc, cql or iql")),
        }
    }
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a learner's policy reads its action from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scores {
    /// Logits of a policy (BC, IQL): sampled, or the most likely action when greedy.
    Logits,
    /// Q values (CQL): always the greedy action.
    QValues,
}

/// What the training loop needs of an offline learner.
pub trait Learner<B: AutodiffBackend> {
    fn algo(&self) -> Algo;
    /// One gradient step; returns its named losses and statistics.
    fn train_step(&mut self, batch: &Batch) -> Vec<(&'static str, f32)>;
    /// Gradient steps done.
    fn steps(&self) -> usize;
    /// The policy's scores `[n, A]` for frames `[n, H, W, 3]`, and what they are.
    fn scores(&self, frames: &[u8], n: usize) -> (Vec<f32>, Scores);
    /// Writes every network, optimiser state and `state` to a checkpoint of `run`.
    fn save(&self, run: &Path, state: &TrainState, keep_last: usize) -> Result<PathBuf>;
    /// Restores what [`Learner::save`] wrote.
    fn load(&mut self, ckpt: &Path) -> Result<()>;

    /// Actions for frames `[n, H, W, 3]`: sampled from a policy's softmax with `rng`,
    /// greedy without; Q-value learners are always greedy.
    fn act(&self, frames: &[u8], n: usize, rng: Option<&mut dyn rand::RngCore>) -> Vec<u32> {
        let (scores, kind) = self.scores(frames, n);
        let a = scores.len() / n.max(1);
        match (kind, rng) {
            (Scores::Logits, Some(rng)) => sample_rows(&scores, a, rng),
            _ => argmax_rows(&scores, a),
        }
    }
}

/// One action per row of `[N, A]` logits, drawn from their softmax.
pub fn sample_rows(logits: &[f32], a: usize, rng: &mut dyn rand::RngCore) -> Vec<u32> {
    logits
        .chunks_exact(a)
        .map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
            let mut u = rng.gen::<f32>() * p.iter().sum::<f32>();
            for (i, &pi) in p.iter().enumerate() {
                if u < pi {
                    return i as u32;
                }
                u -= pi;
            }
            (a - 1) as u32
        })
        .collect()
}

/// A batch of transitions: frames `[B, H, W, 3]` before and after.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub obs: Vec<u8>,
    pub next_obs: Vec<u8>,
    pub actions: Vec<u32>,
    pub rewards: Vec<f32>,
    /// 1 where the step terminated the episode (no bootstrap), else 0.
    pub dones: Vec<f32>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// Observations, next observations, actions, rewards and dones as tensors.
    #[allow(clippy::type_complexity)]
    pub fn tensors<B: Backend>(
        &self,
        side: usize,
        device: &B::Device,
    ) -> (
        Tensor<B, 4>,
        Tensor<B, 4>,
        Tensor<B, 1, Int>,
        Tensor<B, 1>,
        Tensor<B, 1>,
    ) {
        let n = self.len();
        (
            frames_to_input(&self.obs, n, side, device),
            frames_to_input(&self.next_obs, n, side, device),
            Tensor::from_data(
                TensorData::new(
                    self.actions.iter().map(|&a| a as i64).collect::<Vec<_>>(),
                    [n],
                ),
                device,
            ),
            Tensor::from_data(TensorData::new(self.rewards.clone(), [n]), device),
            Tensor::from_data(TensorData::new(self.dones.clone(), [n]), device),
        )
    }
}

/// The transitions of recorded episodes with discrete actions.
pub struct TransitionSet {
    episodes: Vec<Episode>,
    /// (episode, step) of every transition.
    index: Vec<(usize, usize)>,
    frame_shape: [usize; 3],
}

impl TransitionSet {
    /// All transitions of `episodes`, which must share a frame shape and have discrete
    /// actions.
    pub fn new(episodes: Vec<Episode>) -> Result<Self> {
        let frame_shape = episodes
            .first()
            .map(|e| e.frame_shape)
            .ok_or_else(|| RlError::Config("no episodes to learn from".into()))?;
        let mut index = Vec::new();
        for (i, e) in episodes.iter().enumerate() {
            if e.frame_shape != frame_shape {
                return Err(RlError::Config(format!(
                    "episode {i} has {:?} frames, episode 0 {frame_shape:?}",
                    e.frame_shape
                )));
            }
            if !matches!(e.actions, Actions::Discrete(_)) {
                return Err(RlError::Config(
                    "offline RL here takes discrete actions".into(),
                ));
            }
            index.extend((0..e.steps()).map(|t| (i, t)));
        }
        Ok(Self {
            episodes,
            index,
            frame_shape,
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn frame_shape(&self) -> [usize; 3] {
        self.frame_shape
    }

    /// `n` transitions drawn uniformly with replacement.
    pub fn sample<R: Rng>(&self, n: usize, rng: &mut R) -> Batch {
        let mut b = Batch::default();
        for _ in 0..n {
            let (e, t) = self.index[rng.gen_range(0..self.index.len())];
            let ep = &self.episodes[e];
            b.obs.extend_from_slice(ep.frame(t));
            b.next_obs.extend_from_slice(ep.frame(t + 1));
            let Actions::Discrete(ids) = &ep.actions else {
                unreachable!("checked in new")
            };
            b.actions.push(ids[t]);
            b.rewards.push(ep.rewards[t]);
            b.dones.push(ep.terminated[t] as f32);
        }
        b
    }
}

impl Batch {
    /// Appends the transitions of `other`.
    pub fn extend(&mut self, other: Batch) {
        self.obs.extend(other.obs);
        self.next_obs.extend(other.next_obs);
        self.actions.extend(other.actions);
        self.rewards.extend(other.rewards);
        self.dones.extend(other.dones);
    }
}

/// Real and (optionally) imagined transitions, each batch drawn from both at a fixed
/// share: `round(batch · real_share)` real transitions, the rest imagined.
pub struct Mixture {
    pub real: TransitionSet,
    pub imagined: Option<TransitionSet>,
    /// Share of real transitions per batch (1 without imagined data).
    pub real_share: f64,
}

impl Mixture {
    /// `real_share` in (0, 1]; with imagined data it must leave room for them.
    pub fn new(
        real: TransitionSet,
        imagined: Option<TransitionSet>,
        real_share: f64,
    ) -> Result<Self> {
        if let Some(im) = &imagined {
            if im.frame_shape() != real.frame_shape() {
                return Err(RlError::Config(format!(
                    "imagined frames are {:?}, real ones {:?}",
                    im.frame_shape(),
                    real.frame_shape()
                )));
            }
            if !(real_share > 0.0 && real_share < 1.0) {
                return Err(RlError::Config(format!(
                    "the real share of a batch must be in (0, 1) with imagined data, not {real_share}"
                )));
            }
        }
        Ok(Self {
            real,
            real_share: if imagined.is_some() { real_share } else { 1.0 },
            imagined,
        })
    }

    /// `n` transitions: the real share from the real set, the rest imagined.
    pub fn sample<R: Rng>(&self, n: usize, rng: &mut R) -> Batch {
        let Some(im) = &self.imagined else {
            return self.real.sample(n, rng);
        };
        let k = ((n as f64 * self.real_share).round() as usize).clamp(1, n.max(1));
        let mut b = self.real.sample(k, rng);
        b.extend(im.sample(n - k.min(n), rng));
        b
    }

    pub fn frame_shape(&self) -> [usize; 3] {
        self.real.frame_shape()
    }
}

/// Index of the largest value in each row of `[N, A]` values.
pub fn argmax_rows(values: &[f32], a: usize) -> Vec<u32> {
    values
        .chunks_exact(a)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

/// Values of a network's output as floats.
fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32")
}

/// A network's outputs `[n, A]` for frames `[n, H, W, 3]`, on the inner backend (no
/// autodiff graph for acting).
fn outputs<B: AutodiffBackend>(net: &QNet<B>, frames: &[u8], n: usize, side: usize) -> Vec<f32> {
    use burn::module::AutodiffModule;
    let device = net.devices()[0].clone();
    to_vec(
        net.valid()
            .forward(frames_to_input::<B::InnerBackend>(frames, n, side, &device)),
    )
}

/// The gradient step a checkpoint was written at.
fn saved_step(ckpt: &Path) -> Result<usize> {
    Ok(dws_models::checkpoint::read_state(ckpt)
        .map_err(crate::run::model_err)?
        .step)
}

/// A network of `outputs` units for `side`-pixel frames.
fn net<B: Backend>(
    config: &OfflineConfig,
    side: usize,
    outputs: usize,
    device: &B::Device,
) -> QNet<B> {
    QNet::new(&config.net, side, outputs, device)
}

/// Adam over one network, as every learner here uses.
pub(crate) type Adapt<B> = burn::optim::adaptor::OptimizerAdaptor<burn::optim::Adam, QNet<B>, B>;
type OptimRecord<B> = <Adapt<B> as burn::optim::Optimizer<QNet<B>, B>>::Record;

/// A checkpoint of `nets` (in a fixed order) and their optimisers.
pub(crate) fn save_parts<B: AutodiffBackend>(
    run: &Path,
    nets: Vec<QNet<B>>,
    optims: &[&Adapt<B>],
    state: &TrainState,
    keep_last: usize,
) -> Result<PathBuf> {
    use burn::optim::Optimizer;
    let records: Vec<OptimRecord<B>> = optims.iter().map(|o| o.to_record()).collect();
    dws_models::checkpoint::save::<B, _>(run, &nets, records, state, keep_last)
        .map_err(crate::run::model_err)
}

/// Networks and their optimisers, as a checkpoint restores them.
type Parts<B> = (Vec<QNet<B>>, Vec<Adapt<B>>);

/// Reads a checkpoint written by [`save_parts`] into skeletons of the same shapes;
/// returns the networks and the optimisers.
pub(crate) fn load_parts<B: AutodiffBackend>(
    ckpt: &Path,
    nets: Vec<QNet<B>>,
    optims: usize,
) -> Result<Parts<B>> {
    use burn::optim::{AdamConfig, Optimizer};
    let device = nets[0].devices()[0].clone();
    let want = nets.len();
    let nets =
        dws_models::checkpoint::load_model(nets, ckpt, &device).map_err(crate::run::model_err)?;
    let records: Vec<OptimRecord<B>> =
        dws_models::checkpoint::load_optim(ckpt, &device).map_err(crate::run::model_err)?;
    if nets.len() != want || records.len() != optims {
        return Err(RlError::Io(format!(
            "{}: holds {} networks and {} optimisers, this learner has {want} and {optims}",
            ckpt.display(),
            nets.len(),
            records.len()
        )));
    }
    let optims = records
        .into_iter()
        .map(|r| AdamConfig::new().init().load_record(r))
        .collect();
    Ok((nets, optims))
}
