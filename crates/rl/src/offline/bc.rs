//! Behaviour cloning: a policy trained to give the data's actions the highest
//! probability (cross-entropy). The baseline of every offline-RL table.

use super::{argmax_rows, bc_loss, net, to_vec, Batch, OfflineConfig};
use crate::nets::{frames_to_input, QNet};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

pub struct Bc<B: AutodiffBackend> {
    pub config: OfflineConfig,
    pub policy: QNet<B>,
    optim: OptimizerAdaptor<Adam, QNet<B>, B>,
    side: usize,
    actions: usize,
}

impl<B: AutodiffBackend> Bc<B> {
    pub fn new(config: OfflineConfig, side: usize, actions: usize, device: &B::Device) -> Self {
        Self {
            policy: net(&config, side, actions, device),
            optim: AdamConfig::new().init(),
            config,
            side,
            actions,
        }
    }

    /// One gradient step; returns the loss.
    pub fn step(&mut self, batch: &Batch) -> f32 {
        let device = self.policy.devices()[0].clone();
        let (obs, _, actions, _, _) = batch.tensors::<B>(self.side, &device);
        let loss = bc_loss(self.policy.forward(obs), actions);
        let value = loss.clone().into_scalar().elem::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &self.policy);
        self.policy = self.optim.step(self.config.lr, self.policy.clone(), grads);
        value
    }

    /// The most likely action per frame `[n, H, W, 3]`.
    pub fn act(&self, frames: &[u8], n: usize) -> Vec<u32> {
        let device = self.policy.devices()[0].clone();
        let x = frames_to_input::<B>(frames, n, self.side, &device);
        argmax_rows(&to_vec(self.policy.forward(x)), self.actions)
    }
}
