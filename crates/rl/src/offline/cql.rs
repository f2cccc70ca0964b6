//! Conservative Q-learning as double DQN (Kumar et al. 2020; the discrete form of the
//! offline Procgen benchmark): the TD target takes the online network's best next
//! action valued by a target network (a hard copy every `cql_target_every` steps), the
//! TD error goes through a Huber loss, and `α · (logsumexp_a Q(s, a) − Q(s, a_data))`
//! keeps the values of actions the data never took from running away. The policy is
//! greedy in Q.

use super::{
    argmax_rows, cql_loss, gather_actions, load_parts, net, outputs, save_parts, saved_step,
    to_vec, Adapt, Algo, Batch, Learner, OfflineConfig, Scores,
};
use crate::nets::QNet;
use crate::Result;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_models::checkpoint::TrainState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Losses of one step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CqlStats {
    pub loss: f32,
    pub td: f32,
    pub conservative: f32,
    /// Mean `Q(s, a_data)`.
    pub q_data: f32,
}

pub struct Cql<B: AutodiffBackend> {
    pub config: OfflineConfig,
    pub q: QNet<B>,
    target: QNet<B>,
    optim: Adapt<B>,
    side: usize,
    actions: usize,
    steps: usize,
}

impl<B: AutodiffBackend> Cql<B> {
    pub fn new(config: OfflineConfig, side: usize, actions: usize, device: &B::Device) -> Self {
        let q = net(&config, side, actions, device);
        Self {
            target: q.clone(),
            q,
            optim: AdamConfig::new().init(),
            config,
            side,
            actions,
            steps: 0,
        }
    }

    /// One gradient step.
    pub fn step(&mut self, batch: &Batch) -> CqlStats {
        let device = self.q.devices()[0].clone();
        let n = batch.len();
        let (obs, next, actions, rewards, dones) = batch.tensors::<B>(self.side, &device);
        // Double DQN: the online network picks, the target network values (on the
        // inner backend: no autodiff graph is built for what is not trained).
        let next_inner = next.inner();
        let pick = argmax_rows(
            &to_vec(self.q.valid().forward(next_inner.clone())),
            self.actions,
        );
        let pick = Tensor::<B::InnerBackend, 1, Int>::from_data(
            TensorData::new(pick.iter().map(|&a| a as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let next_value = Tensor::<B, 1>::from_inner(gather_actions(
            self.target.valid().forward(next_inner),
            pick,
        ));
        let targets = rewards + (dones.neg() + 1.0) * next_value * self.config.gamma;
        let q = self.q.forward(obs);
        let q_data = gather_actions(q.clone().detach(), actions.clone())
            .mean()
            .into_scalar()
            .elem::<f32>();
        let out = cql_loss(q, actions, targets, self.config.cql_alpha);
        let loss = out.total.clone().into_scalar().elem::<f32>();
        let grads = GradientsParams::from_grads(out.total.backward(), &self.q);
        self.q = self.optim.step(self.config.lr, self.q.clone(), grads);
        self.steps += 1;
        if self
            .steps
            .is_multiple_of(self.config.cql_target_every.max(1))
        {
            self.target = self.q.clone();
        }
        CqlStats {
            loss,
            td: out.td,
            conservative: out.conservative,
            q_data,
        }
    }

    /// The greedy action per frame `[n, H, W, 3]`.
    pub fn act(&self, frames: &[u8], n: usize) -> Vec<u32> {
        argmax_rows(&outputs(&self.q, frames, n, self.side), self.actions)
    }
}

impl<B: AutodiffBackend> Learner<B> for Cql<B> {
    fn algo(&self) -> Algo {
        Algo::Cql
    }

    fn train_step(&mut self, batch: &Batch) -> Vec<(&'static str, f32)> {
        let s = self.step(batch);
        vec![
            ("loss", s.loss),
            ("td", s.td),
            ("conservative", s.conservative),
            ("q_data", s.q_data),
        ]
    }

    fn steps(&self) -> usize {
        self.steps
    }

    fn scores(&self, frames: &[u8], n: usize) -> (Vec<f32>, Scores) {
        (outputs(&self.q, frames, n, self.side), Scores::QValues)
    }

    fn save(&self, run: &Path, state: &TrainState, keep_last: usize) -> Result<PathBuf> {
        save_parts(
            run,
            vec![self.q.clone(), self.target.clone()],
            &[&self.optim],
            state,
            keep_last,
        )
    }

    fn load(&mut self, ckpt: &Path) -> Result<()> {
        let (mut nets, mut optims) =
            load_parts(ckpt, vec![self.q.clone(), self.target.clone()], 1)?;
        self.target = nets.pop().expect("two networks");
        self.q = nets.pop().expect("two networks");
        self.optim = optims.remove(0);
        self.steps = saved_step(ckpt)?;
        Ok(())
    }
}
