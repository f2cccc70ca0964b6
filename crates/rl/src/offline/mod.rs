//! Discrete-action offline RL (issue 10): learners that train from recorded transitions
//! only, sharing PPO's IMPALA body ([`crate::nets::QNet`]).
//!
//! - [`losses`]: the BC, CQL and IQL losses as functions of network outputs.
//! - [`bc`], [`cql`], [`iql`]: one learner each, cleanrl-style (`step` on a batch,
//!   `act` on frames).
//! - [`TransitionSet`]: transitions `(s, a, r, s', done)` of recorded episodes, sampled
//!   uniformly.
//!
//! Not built yet: `dws offline`, `dws imagine`, evaluation in the env, checkpoints.

pub mod bc;
pub mod cql;
pub mod iql;
pub mod losses;

pub use losses::*;

use crate::nets::{frames_to_input, NetConfig, QNet};
use crate::{Result, RlError};
use burn::prelude::*;
use dws_data::{Actions, Episode};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Settings shared by the learners (defaults: Mediratta et al. 2024's offline Procgen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineConfig {
    pub net: NetConfig,
    pub lr: f64,
    pub batch: usize,
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
            gamma: 0.99,
            cql_alpha: 4.0,
            iql_tau: 0.8,
            iql_beta: 3.0,
            iql_max_weight: 100.0,
            cql_target_every: 1000,
            iql_target_every: 100,
        }
    }
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

/// A network of `outputs` units for `side`-pixel frames.
fn net<B: Backend>(
    config: &OfflineConfig,
    side: usize,
    outputs: usize,
    device: &B::Device,
) -> QNet<B> {
    QNet::new(&config.net, side, outputs, device)
}
