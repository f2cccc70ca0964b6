//! Behaviour cloning: a policy trained to give the data's actions the highest
//! probability (cross-entropy). The baseline of every offline-RL table.

use super::{
    argmax_rows, bc_loss, load_parts, net, outputs, save_parts, saved_step, Adapt, Algo, Batch,
    Learner, OfflineConfig, Scores,
};
use crate::nets::QNet;
use crate::Result;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_models::checkpoint::TrainState;
use std::path::{Path, PathBuf};

pub struct Bc<B: AutodiffBackend> {
    pub config: OfflineConfig,
    pub policy: QNet<B>,
    optim: Adapt<B>,
    side: usize,
    actions: usize,
    steps: usize,
}

impl<B: AutodiffBackend> Bc<B> {
    pub fn new(config: OfflineConfig, side: usize, actions: usize, device: &B::Device) -> Self {
        Self {
            policy: net(&config, side, actions, device),
            optim: AdamConfig::new().init(),
            config,
            side,
            actions,
            steps: 0,
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
        self.steps += 1;
        value
    }

    /// The most likely action per frame `[n, H, W, 3]`.
    pub fn act(&self, frames: &[u8], n: usize) -> Vec<u32> {
        argmax_rows(&outputs(&self.policy, frames, n, self.side), self.actions)
    }
}

impl<B: AutodiffBackend> Learner<B> for Bc<B> {
    fn algo(&self) -> Algo {
        Algo::Bc
    }

    fn train_step(&mut self, batch: &Batch) -> Vec<(&'static str, f32)> {
        vec![("loss", self.step(batch))]
    }

    fn steps(&self) -> usize {
        self.steps
    }

    fn scores(&self, frames: &[u8], n: usize) -> (Vec<f32>, Scores) {
        (outputs(&self.policy, frames, n, self.side), Scores::Logits)
    }

    fn save(&self, run: &Path, state: &TrainState, keep_last: usize) -> Result<PathBuf> {
        save_parts(
            run,
            vec![self.policy.clone()],
            &[&self.optim],
            state,
            keep_last,
        )
    }

    fn load(&mut self, ckpt: &Path) -> Result<()> {
        let (mut nets, mut optims) = load_parts(ckpt, vec![self.policy.clone()], 1)?;
        self.policy = nets.remove(0);
        self.optim = optims.remove(0);
        self.steps = saved_step(ckpt)?;
        Ok(())
    }
}
