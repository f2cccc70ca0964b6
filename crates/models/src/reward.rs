//! The reward/termination model of imagination: for a transition (the frame before, the
//! frame after, the action's embedding) it predicts the reward and the probability that
//! the episode ended.
//!
//! Both frames are cut into patches; each patch is embedded linearly, with a learned
//! position per (frame, patch). Blocks follow, each with the DWS action modulation
//! first (scale and shift of every token from the action embedding, zero-initialised,
//! so frame content and action interact multiplicatively), then pre-norm self-attention
//! over all patch tokens, cross-attention from the tokens to the action's token, and an
//! MLP; the mean
//! token goes to two linear heads (reward value, termination logit). Loss: squared
//! reward error plus the binary cross-entropy of the termination flag.

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use dws_kernels::{layer_norm, linear};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Frame side (frames are `side × side × 3`).
    pub side: usize,
    pub patch: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    /// Width of the action embeddings it is given.
    pub action_dim: usize,
    /// Weight of the termination loss.
    pub done_weight: f32,
}

impl RewardConfig {
    pub fn small(side: usize, action_dim: usize) -> Self {
        Self {
            side,
            patch: 8,
            width: 64,
            heads: 4,
            layers: 2,
            action_dim,
            done_weight: 1.0,
        }
    }

    fn tokens_per_frame(&self) -> usize {
        (self.side / self.patch).pow(2)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.patch == 0 || !self.side.is_multiple_of(self.patch) {
            return Err(format!(
                "patch {} does not divide the frame side {}",
                self.patch, self.side
            ));
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(format!(
                "{} heads do not divide width {}",
                self.heads, self.width
            ));
        }
        if self.layers == 0 || self.action_dim == 0 {
            return Err("the reward model needs at least one layer and an action width".into());
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> RewardModel<B> {
        self.validate().expect("valid reward config");
        let d = self.width;
        let p = self.patch * self.patch * 3;
        let tokens = 2 * self.tokens_per_frame();
        let attn = || Attention {
            q: LinearConfig::new(d, d).init(device),
            kv: LinearConfig::new(d, 2 * d).init(device),
            proj: LinearConfig::new(d, d).init(device),
        };
        RewardModel {
            embed: LinearConfig::new(p, d).init(device),
            pos: Param::from_tensor(Tensor::random(
                [tokens, d],
                burn::tensor::Distribution::Normal(0.0, 0.5),
                device,
            )),
            action: LinearConfig::new(self.action_dim, d).init(device),
            blocks: (0..self.layers)
                .map(|_| RewardBlock {
                    act_mod: LinearConfig::new(d, 2 * d)
                        .with_initializer(burn::module::Initializer::Zeros)
                        .init(device),
                    norm1: LayerNormConfig::new(d).init(device),
                    self_attn: attn(),
                    norm2: LayerNormConfig::new(d).init(device),
                    cross_attn: attn(),
                    norm3: LayerNormConfig::new(d).init(device),
                    fc1: LinearConfig::new(d, 4 * d).init(device),
                    fc2: LinearConfig::new(4 * d, d).init(device),
                })
                .collect(),
            norm: LayerNormConfig::new(d).init(device),
            reward: LinearConfig::new(d, 1).init(device),
            done: LinearConfig::new(d, 1).init(device),
            heads: self.heads,
            patch: self.patch,
            side: self.side,
        }
    }
}

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    q: Linear<B>,
    kv: Linear<B>,
    proj: Linear<B>,
}

impl<B: Backend> Attention<B> {
    /// Queries from `x` `[B, L, D]` attend to `ctx` `[B, M, D]`.
    fn forward(&self, x: Tensor<B, 3>, ctx: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
        let [b, l, d] = x.dims();
        let m = ctx.dims()[1];
        let hd = d / heads;
        // Heads last ([B, L, H, hd]): the attention reads them in place.
        let q = linear(&self.q, x).reshape([b, l, heads, hd]);
        let kv = linear(&self.kv, ctx);
        let k = kv.clone().narrow(2, 0, d).reshape([b, m, heads, hd]);
        let v = kv.narrow(2, d, d).reshape([b, m, heads, hd]);
        let out = dws_kernels::attention_heads_last(q, k, v, false); // [B, L, D]
        linear(&self.proj, out)
    }
}

#[derive(Module, Debug)]
struct RewardBlock<B: Backend> {
    /// `[shift, scale]` of the tokens from the action.
    act_mod: Linear<B>,
    norm1: LayerNorm<B>,
    self_attn: Attention<B>,
    norm2: LayerNorm<B>,
    cross_attn: Attention<B>,
    norm3: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

#[derive(Module, Debug)]
pub struct RewardModel<B: Backend> {
    embed: Linear<B>,
    pos: Param<Tensor<B, 2>>,
    action: Linear<B>,
    blocks: Vec<RewardBlock<B>>,
    norm: LayerNorm<B>,
    reward: Linear<B>,
    done: Linear<B>,
    heads: usize,
    patch: usize,
    side: usize,
}

/// Transitions as the reward model reads them: patches of the frames before and after,
/// `[B, 2·T, patch²·3]` in `[0, 1]`.
pub fn transition_patches<B: Backend>(
    before: &[u8],
    after: &[u8],
    n: usize,
    side: usize,
    patch: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let f = side * side * 3;
    assert_eq!(
        before.len(),
        n * f,
        "frames before do not match [n, side, side, 3]"
    );
    assert_eq!(
        after.len(),
        n * f,
        "frames after do not match [n, side, side, 3]"
    );
    let g = side / patch;
    let p = patch * patch * 3;
    let mut data = Vec::with_capacity(n * 2 * g * g * p);
    for i in 0..n {
        for frame in [&before[i * f..(i + 1) * f], &after[i * f..(i + 1) * f]] {
            for py in 0..g {
                for px in 0..g {
                    for y in 0..patch {
                        let row = ((py * patch + y) * side + px * patch) * 3;
                        data.extend(
                            frame[row..row + patch * 3]
                                .iter()
                                .map(|&v| v as f32 / 255.0),
                        );
                    }
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [n, 2 * g * g, p]), device)
}

impl<B: Backend> RewardModel<B> {
    /// Reward predictions `[B]` and termination logits `[B]` for transition patches
    /// (see [`transition_patches`]) and action embeddings `[B, action_dim]`.
    pub fn forward(
        &self,
        patches: Tensor<B, 3>,
        actions: Tensor<B, 2>,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let b = patches.dims()[0];
        let d = self.pos.dims()[1];
        let mut x = self.embed.forward(patches) + self.pos.val().unsqueeze::<3>();
        let ctx = linear(&self.action, actions).reshape([b, 1, d]);
        for blk in &self.blocks {
            let m = linear(&blk.act_mod, ctx.clone()).reshape([b, 1, 1, 2 * d]);
            let shift = m.clone().narrow(3, 0, d);
            let scale = m.narrow(3, d, d);
            let l = x.dims()[1];
            x = dws_kernels::modulate(x.reshape([b, 1, l, d]), shift, scale).reshape([b, l, d]);
            let h = layer_norm(&blk.norm1, x.clone());
            x = x + blk.self_attn.forward(h.clone(), h, self.heads);
            let h = layer_norm(&blk.norm2, x.clone());
            x = x + blk.cross_attn.forward(h, ctx.clone(), self.heads);
            let h = layer_norm(&blk.norm3, x.clone());
            x = x + linear(&blk.fc2, dws_kernels::gelu(linear(&blk.fc1, h)));
        }
        let pooled = layer_norm(&self.norm, x).mean_dim(1).reshape([b, d]);
        let reward = linear(&self.reward, pooled.clone()).reshape([b]);
        let done = linear(&self.done, pooled).reshape([b]);
        (reward, done)
    }

    /// Squared reward error plus `done_weight` × the termination cross-entropy, and the
    /// two parts separately (for logging). With `weights` `[B]`, both are weighted means
    /// over the batch (importance weights of a batch drawn other than uniformly).
    pub fn loss(
        &self,
        patches: Tensor<B, 3>,
        actions: Tensor<B, 2>,
        rewards: Tensor<B, 1>,
        terminated: Tensor<B, 1>,
        done_weight: f32,
        weights: Option<Tensor<B, 1>>,
    ) -> (Tensor<B, 1>, f32, f32) {
        let (r, logit) = self.forward(patches, actions);
        let mean = |x: Tensor<B, 1>| match &weights {
            Some(w) => (x * w.clone()).sum() / w.clone().sum(),
            None => x.mean(),
        };
        let mse = mean((r - rewards).powf_scalar(2.0));
        // BCE with logits, stable form: max(z, 0) − z·y + log(1 + e^−|z|).
        let bce = mean(
            logit.clone().clamp_min(0.0) - logit.clone() * terminated
                + (logit.abs().neg().exp() + 1.0).log(),
        );
        let (m, c) = (
            mse.clone().into_scalar().elem::<f32>(),
            bce.clone().into_scalar().elem::<f32>(),
        );
        (mse + bce.mul_scalar(done_weight), m, c)
    }

    pub fn side(&self) -> usize {
        self.side
    }

    pub fn patch(&self) -> usize {
        self.patch
    }
}
