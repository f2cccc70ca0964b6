//! Implicit Q-learning (Kostrikov et al. 2022), discrete actions: twin Q networks with
//! hard-copied targets, `V(s)` regressed on the τ-expectile of `min(Q1, Q2)(s, a_data)`
//! (the target networks'), each Q towards `r + γ (1 − d) V(s')`, and the policy by
//! advantage-weighted behaviour cloning (weights `min(exp(β (Q − V)), w_max)`). No value
//! of an action outside the data is ever queried.

use super::{
    argmax_rows, awr_policy_loss, gather_actions, iql_q_loss, iql_value_loss, load_parts, net,
    outputs, save_parts, saved_step, Adapt, Algo, Batch, Learner, OfflineConfig, Scores,
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
pub struct IqlStats {
    pub value_loss: f32,
    pub q_loss: f32,
    pub policy_loss: f32,
    /// Mean `V(s)` and mean advantage `Q − V` on the batch.
    pub value: f32,
    pub advantage: f32,
}

pub struct Iql<B: AutodiffBackend> {
    pub config: OfflineConfig,
    pub q1: QNet<B>,
    pub q2: QNet<B>,
    target1: QNet<B>,
    target2: QNet<B>,
    pub value: QNet<B>,
    pub policy: QNet<B>,
    optims: [Adapt<B>; 4],
    side: usize,
    actions: usize,
    steps: usize,
}

impl<B: AutodiffBackend> Iql<B> {
    pub fn new(config: OfflineConfig, side: usize, actions: usize, device: &B::Device) -> Self {
        let q1 = net(&config, side, actions, device);
        let q2 = net(&config, side, actions, device);
        Self {
            target1: q1.clone(),
            target2: q2.clone(),
            q1,
            q2,
            value: net(&config, side, 1, device),
            policy: net(&config, side, actions, device),
            optims: std::array::from_fn(|_| AdamConfig::new().init()),
            config,
            side,
            actions,
            steps: 0,
        }
    }

    /// One gradient step of the value, both Q networks and the policy.
    pub fn step(&mut self, batch: &Batch) -> IqlStats {
        let device = self.q1.devices()[0].clone();
        let n = batch.len();
        let c = self.config.clone();
        let (obs, next, actions, rewards, dones) = batch.tensors::<B>(self.side, &device);
        // The targets' values on the inner backend: no graph for what is not trained.
        let (obs_inner, actions_inner) = (obs.clone().inner(), actions.clone().inner());
        let q_target = Tensor::<B, 1>::from_inner(
            gather_actions(
                self.target1.valid().forward(obs_inner.clone()),
                actions_inner.clone(),
            )
            .min_pair(gather_actions(
                self.target2.valid().forward(obs_inner),
                actions_inner,
            )),
        );
        // V towards the expectile of Q over the data actions.
        let v = self.value.forward(obs.clone()).reshape([n]);
        let v_loss = iql_value_loss(q_target.clone(), v.clone(), c.iql_tau);
        let value_loss = v_loss.clone().into_scalar().elem::<f32>();
        let grads = GradientsParams::from_grads(v_loss.backward(), &self.value);
        self.value = self.optims[0].step(c.lr, self.value.clone(), grads);
        // Each Q towards r + γ V(s').
        let v_next =
            Tensor::<B, 1>::from_inner(self.value.valid().forward(next.inner()).reshape([n]));
        let mut q_loss = 0.0;
        for (k, which) in [(1usize, true), (2, false)] {
            let qn = if which { &self.q1 } else { &self.q2 };
            let loss = iql_q_loss(
                gather_actions(qn.forward(obs.clone()), actions.clone()),
                rewards.clone(),
                dones.clone(),
                v_next.clone(),
                c.gamma,
            );
            q_loss += loss.clone().into_scalar().elem::<f32>() / 2.0;
            let grads = GradientsParams::from_grads(loss.backward(), qn);
            let updated = self.optims[k].step(c.lr, qn.clone(), grads);
            if which {
                self.q1 = updated;
            } else {
                self.q2 = updated;
            }
        }
        // The policy by advantage-weighted cloning.
        let value = v.clone().detach().mean().into_scalar().elem::<f32>();
        let adv = q_target - v.detach();
        let advantage = adv.clone().mean().into_scalar().elem::<f32>();
        let p_loss = awr_policy_loss(
            self.policy.forward(obs),
            actions,
            adv,
            c.iql_beta,
            c.iql_max_weight,
        );
        let policy_loss = p_loss.clone().into_scalar().elem::<f32>();
        let grads = GradientsParams::from_grads(p_loss.backward(), &self.policy);
        self.policy = self.optims[3].step(c.lr, self.policy.clone(), grads);
        self.steps += 1;
        if self.steps.is_multiple_of(c.iql_target_every.max(1)) {
            self.target1 = self.q1.clone();
            self.target2 = self.q2.clone();
        }
        IqlStats {
            value_loss,
            q_loss,
            policy_loss,
            value,
            advantage,
        }
    }

    /// The policy's most likely action per frame `[n, H, W, 3]`.
    pub fn act(&self, frames: &[u8], n: usize) -> Vec<u32> {
        argmax_rows(&outputs(&self.policy, frames, n, self.side), self.actions)
    }
}

impl<B: AutodiffBackend> Iql<B> {
    /// The networks in checkpoint order.
    fn nets(&self) -> Vec<QNet<B>> {
        vec![
            self.q1.clone(),
            self.q2.clone(),
            self.target1.clone(),
            self.target2.clone(),
            self.value.clone(),
            self.policy.clone(),
        ]
    }
}

impl<B: AutodiffBackend> Learner<B> for Iql<B> {
    fn algo(&self) -> Algo {
        Algo::Iql
    }

    fn train_step(&mut self, batch: &Batch) -> Vec<(&'static str, f32)> {
        let s = self.step(batch);
        vec![
            ("value_loss", s.value_loss),
            ("q_loss", s.q_loss),
            ("policy_loss", s.policy_loss),
            ("value", s.value),
            ("advantage", s.advantage),
        ]
    }

    fn steps(&self) -> usize {
        self.steps
    }

    fn scores(&self, frames: &[u8], n: usize) -> (Vec<f32>, Scores) {
        (outputs(&self.policy, frames, n, self.side), Scores::Logits)
    }

    fn save(&self, run: &Path, state: &TrainState, keep_last: usize) -> Result<PathBuf> {
        let optims: Vec<&Adapt<B>> = self.optims.iter().collect();
        save_parts(run, self.nets(), &optims, state, keep_last)
    }

    fn load(&mut self, ckpt: &Path) -> Result<()> {
        let (nets, optims) = load_parts(ckpt, self.nets(), 4)?;
        let [q1, q2, t1, t2, value, policy]: [QNet<B>; 6] = match nets.try_into() {
            Ok(n) => n,
            Err(_) => unreachable!("load_parts checks the count"),
        };
        (self.q1, self.q2, self.target1, self.target2) = (q1, q2, t1, t2);
        (self.value, self.policy) = (value, policy);
        self.optims = match optims.try_into() {
            Ok(o) => o,
            Err(_) => unreachable!("load_parts checks the count"),
        };
        self.steps = saved_step(ckpt)?;
        Ok(())
    }
}
