//! The DWS world simulator behind the [`WorldModel`] trait: the flow-matching video
//! model predicts the next frame from a window of `context` frames and the actions
//! between them (one sampling pass of `FlowConfig::sample_steps` Euler steps), and the
//! reward/termination model reads the transition from the last frame to the predicted
//! one.

use crate::imagine::{action_width, Imagined, WorldModel};
use crate::Result;
use burn::prelude::*;
use dws_envs::{ActionSpace, EnvSpec};
use dws_models::embedders::ActionBatch;
use dws_models::flow::{self, frames_to_tensor, sample_frames, tensor_to_frames, FlowConfig};
use dws_models::reward::{transition_patches, RewardModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Flat action rows `[b, s, width]` as the world model's action batch.
pub fn action_batch<B: Backend>(
    space: &ActionSpace,
    rows: &[f32],
    b: usize,
    s: usize,
    device: &B::Device,
) -> ActionBatch<B> {
    match space {
        ActionSpace::Discrete { .. } => ActionBatch::Discrete(Tensor::from_data(
            TensorData::new(rows.iter().map(|&a| a as i64).collect::<Vec<_>>(), [b, s]),
            device,
        )),
        ActionSpace::Continuous { dim, .. } => ActionBatch::Continuous(Tensor::from_data(
            TensorData::new(rows.to_vec(), [b, s, *dim]),
            device,
        )),
    }
}

/// Width of the reward model's action input: one-hot ids, or the action vector.
pub fn reward_action_dim(space: &ActionSpace) -> usize {
    match space {
        ActionSpace::Discrete { n } => *n,
        ActionSpace::Continuous { dim, .. } => *dim,
    }
}

/// Flat action rows `[b, width]` as the reward model's action input `[b, dim]`.
pub fn reward_actions<B: Backend>(
    space: &ActionSpace,
    rows: &[f32],
    device: &B::Device,
) -> Tensor<B, 2> {
    let w = action_width(space);
    let b = rows.len() / w;
    let d = reward_action_dim(space);
    let data = match space {
        ActionSpace::Discrete { n } => {
            let mut one_hot = vec![0f32; b * n];
            for (i, &a) in rows.iter().enumerate() {
                one_hot[i * n + (a as usize).min(n - 1)] = 1.0;
            }
            one_hot
        }
        ActionSpace::Continuous { .. } => rows.to_vec(),
    };
    Tensor::from_data(TensorData::new(data, [b, d]), device)
}

/// The video model and the reward model as one simulator.
pub struct FlowSim<B: Backend> {
    pub world: flow::WorldModel<B>,
    pub reward: RewardModel<B>,
    pub flow: FlowConfig,
    spec: EnvSpec,
    context: usize,
    rng: ChaCha8Rng,
    device: B::Device,
}

impl<B: Backend> FlowSim<B> {
    /// `context` frames per prediction; `seed` seeds the sampling noise.
    pub fn new(
        world: flow::WorldModel<B>,
        reward: RewardModel<B>,
        flow: FlowConfig,
        spec: EnvSpec,
        context: usize,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        Self {
            world,
            reward,
            flow,
            spec,
            context,
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }
}

impl<B: Backend> FlowSim<B> {
    /// Restarts the sampling noise from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }
}

impl<B: Backend> WorldModel for FlowSim<B> {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn context(&self) -> usize {
        self.context
    }

    fn step(&mut self, history: &[u8], actions: &[f32]) -> Result<Imagined> {
        let [h, w, c] = self.spec.frame_shape;
        let f = h * w * c;
        let k = self.context;
        let n = history.len() / (k * f);
        let space = &self.spec.action_space;
        let width = action_width(space);
        let x = frames_to_tensor::<B>(history, [n, k, h, w, c], &self.device);
        let batch = action_batch::<B>(space, actions, n, k, &self.device);
        let cond = self.world.cond(Some(&batch));
        let next = sample_frames(&self.world.dit, x, 1, cond, &self.flow, &mut self.rng);
        let frames = tensor_to_frames(next);
        let before: Vec<u8> = history
            .chunks_exact(k * f)
            .flat_map(|row| row[(k - 1) * f..].iter().copied())
            .collect();
        let now: Vec<f32> = actions
            .chunks_exact(k * width)
            .flat_map(|row| row[(k - 1) * width..].iter().copied())
            .collect();
        let patches = transition_patches::<B>(
            &before,
            &frames,
            n,
            self.reward.side(),
            self.reward.patch(),
            &self.device,
        );
        let (r, logit) = self
            .reward
            .forward(patches, reward_actions::<B>(space, &now, &self.device));
        let rewards = r
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32");
        let terminated = logit
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32")
            .into_iter()
            .map(|z| z > 0.0)
            .collect();
        Ok(Imagined {
            frames,
            rewards,
            terminated,
        })
    }
}
