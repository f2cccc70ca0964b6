//! Losses of discrete-action offline RL (issue 10; the trainers and `dws offline` come
//! next): behaviour cloning, CQL (Kumar et al. 2020) and IQL (Kostrikov et al. 2022),
//! each a function of network outputs so that it can be checked on a table of values.
//!
//! - BC: cross-entropy of the data actions under the policy logits.
//! - CQL (as double DQN): Huber TD error of `Q(s, a_data)` against a target, plus
//!   `α · (logsumexp_a Q(s, a) − Q(s, a_data))`, which pushes down every action's value
//!   and pushes the data action's back up: actions absent from the data end lowest.
//! - IQL: `V(s)` by expectile regression on `Q(s, a_data)` (expectile τ: τ = ½ the mean,
//!   τ → 1 the maximum over the data actions); `Q(s, a)` towards `r + γ (1 − d) V(s')`;
//!   the policy by advantage-weighted cloning, weights `min(exp(β (Q − V)), w_max)`.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// `Q(s, a)` of the given action per row: `q` `[B, A]`, `actions` `[B]` → `[B]`.
pub fn gather_actions<B: Backend>(q: Tensor<B, 2>, actions: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let b = q.dims()[0];
    q.gather(1, actions.reshape([b, 1])).reshape([b])
}

/// `log Σ_a exp q[·, a]`, computed stably: `[B, A]` → `[B]`.
pub fn logsumexp<B: Backend>(q: Tensor<B, 2>) -> Tensor<B, 1> {
    let b = q.dims()[0];
    let max = q.clone().max_dim(1).detach(); // [B, 1]
    ((q - max.clone()).exp().sum_dim(1).log() + max).reshape([b])
}

/// Mean Huber loss (δ = 1) of `x`.
pub fn huber<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let a = x.abs();
    let quad = a.clone().clamp_max(1.0);
    // ½ min(|x|, 1)² + (|x| − min(|x|, 1)).
    (quad.clone().powf_scalar(2.0) * 0.5 + (a - quad)).mean()
}

/// Behaviour cloning: mean cross-entropy of `actions` under `logits` `[B, A]`.
pub fn bc_loss<B: Backend>(logits: Tensor<B, 2>, actions: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    gather_actions(log_softmax(logits, 1), actions).neg().mean()
}

/// The parts of a CQL loss.
pub struct CqlLoss<B: Backend> {
    /// TD + α · conservative: what is minimised.
    pub total: Tensor<B, 1>,
    pub td: f32,
    /// Mean `logsumexp_a Q(s, a) − Q(s, a_data)` (≥ 0).
    pub conservative: f32,
}

/// CQL on `q` `[B, A]` (the online network's values), the data `actions` `[B]` and TD
/// `targets` `[B]` (computed without gradient, e.g. `r + γ (1 − d) Q_target(s', argmax_a
/// Q(s', a))`), with conservative weight `alpha`.
pub fn cql_loss<B: Backend>(
    q: Tensor<B, 2>,
    actions: Tensor<B, 1, Int>,
    targets: Tensor<B, 1>,
    alpha: f32,
) -> CqlLoss<B> {
    let q_data = gather_actions(q.clone(), actions);
    let td = huber(q_data.clone() - targets.detach());
    let gap = (logsumexp(q) - q_data).mean();
    let (t, g) = (
        td.clone().into_scalar().elem::<f32>(),
        gap.clone().into_scalar().elem::<f32>(),
    );
    CqlLoss {
        total: td + gap * alpha,
        td: t,
        conservative: g,
    }
}

/// Expectile regression: mean of `|τ − 1(u < 0)| · u²` with `u = diff` (`Q − V`).
pub fn expectile_loss<B: Backend>(diff: Tensor<B, 1>, tau: f32) -> Tensor<B, 1> {
    let below = diff.clone().lower_elem(0.0).float(); // 1 where u < 0
    let weight = (below * -1.0 + tau).abs();
    (weight * diff.powf_scalar(2.0)).mean()
}

/// IQL's value loss: `V(s)` `[B]` towards the τ-expectile of `Q(s, a_data)` `[B]` (the
/// target network's, without gradient).
pub fn iql_value_loss<B: Backend>(q_data: Tensor<B, 1>, v: Tensor<B, 1>, tau: f32) -> Tensor<B, 1> {
    expectile_loss(q_data.detach() - v, tau)
}

/// IQL's Q loss: mean squared error of `Q(s, a_data)` against `r + γ (1 − d) V(s')`
/// (`v_next` without gradient).
pub fn iql_q_loss<B: Backend>(
    q_data: Tensor<B, 1>,
    rewards: Tensor<B, 1>,
    dones: Tensor<B, 1>,
    v_next: Tensor<B, 1>,
    gamma: f32,
) -> Tensor<B, 1> {
    let target = rewards + (dones.neg() + 1.0) * v_next.detach() * gamma;
    (q_data - target).powf_scalar(2.0).mean()
}

/// Advantage-weighted behaviour cloning: `−mean(min(exp(β · adv), max_weight) · log
/// π(a_data | s))` with `adv = Q − V` `[B]` taken without gradient.
pub fn awr_policy_loss<B: Backend>(
    logits: Tensor<B, 2>,
    actions: Tensor<B, 1, Int>,
    advantages: Tensor<B, 1>,
    beta: f32,
    max_weight: f32,
) -> Tensor<B, 1> {
    let weights = (advantages.detach() * beta).exp().clamp_max(max_weight);
    (gather_actions(log_softmax(logits, 1), actions) * weights)
        .neg()
        .mean()
}
