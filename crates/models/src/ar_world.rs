//! The autoregressive world simulator: a VQ tokenizer ([`crate::vq`], trained first and
//! then fixed) turns frames into token grids, and the token transformer
//! ([`crate::ar`]) with the DWS action modules and an action embedder predicts the next
//! frame's tokens. This is the iVideoGPT-style counterpart of [`crate::flow::WorldModel`],
//! sharing its action embedder and motion weights.
//!
//! - Training ([`ar_loss`]): a clip's frames are tokenised (no gradient), and the
//!   cross-entropy of every token is weighted by the motion weights of the ground-truth
//!   clip (paper eqs. 2-3) averaged over the pixels each token covers.
//! - Rollout ([`ar_rollout`]): tokens of the context frames, then new frames sampled
//!   token by token against a key/value cache, with a sliding window of the model's
//!   `max_frames` frames, decoded back to pixels.

use crate::ar::{generate, token_loss, ArTransformer, Sampling};
use crate::embedders::{ActionBatch, ActionEmbedder};
use crate::motion_loss::{motion_weights, MotionLoss};
use crate::vq::VqTokenizer;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::Rng;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// The trained pair that AR checkpoints hold (the tokenizer lives in its own run).
#[derive(Module, Debug)]
pub struct ArWorld<B: Backend> {
    pub net: ArTransformer<B>,
    pub embedder: Option<ActionEmbedder<B>>,
}

impl<B: Backend> ArWorld<B> {
    /// Freezes the base network, leaving the action modules and the embedder trainable.
    pub fn freeze_base(mut self) -> Self {
        let modules = std::mem::take(&mut self.net.action_modules);
        self.net = self.net.no_grad();
        self.net.action_modules = modules;
        self
    }

    /// Per-frame action embeddings `[B, F, Dc]` for `F - 1` actions per clip, or `None`
    /// for an action-free model.
    pub fn cond(&self, actions: Option<&ActionBatch<B>>) -> Option<Tensor<B, 3>> {
        match (&self.embedder, actions) {
            (Some(e), Some(a)) if !self.net.action_modules.is_empty() => Some(e.forward(a.clone())),
            _ => None,
        }
    }
}

/// Token ids `[B, F · N]` of frames `[B, F, C, H, W]` in [-1, 1].
pub fn tokenize<B: Backend>(vq: &VqTokenizer<B>, x: Tensor<B, 5>) -> Tensor<B, 2, Int> {
    let [b, f, c, h, w] = x.dims();
    let ids = vq.encode(x.reshape([b * f, c, h, w])); // [B·F, N]
    let n = ids.dims()[1];
    ids.reshape([b, f * n])
}

/// Motion weights `[B, F, 1, H, W]` averaged over each token's `s × s` pixels of a
/// `g × g` grid: `[B, F · g²]`, in the tokens' row-major order.
pub fn pool_to_tokens<B: Backend>(weights: Tensor<B, 5>, grid: usize) -> Tensor<B, 2> {
    let [b, f, _, h, w] = weights.dims();
    assert!(
        h.is_multiple_of(grid) && w.is_multiple_of(grid),
        "a {h}×{w} frame does not split into a {grid}×{grid} token grid"
    );
    let (sy, sx) = (h / grid, w / grid);
    weights
        .reshape([b * f * grid, sy, grid, sx])
        .mean_dim(3)
        .mean_dim(1) // [B·F·g, 1, g, 1]
        .reshape([b, f * grid * grid])
}

/// Settings of the token loss.
#[derive(Debug, Clone, Copy)]
pub struct ArLossConfig {
    pub motion: MotionLoss,
    pub strength: f32,
    pub temperature: f32,
}

/// Token grids of frames tokenised before, keyed by a hash of their pixels: training
/// draws the same frames again and again, and the tokenizer is fixed, so each frame goes
/// through its encoder once.
pub struct TokenCache {
    map: HashMap<u64, Vec<u32>>,
    /// Frames kept at most (later ones are tokenised every time).
    capacity: usize,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Token ids `[B, F · N]` of u8 frames `[B, F, H, W, 3]`.
    pub fn tokenize<B: Backend>(
        &mut self,
        vq: &VqTokenizer<B>,
        frames: &[u8],
        [b, f, h, w]: [usize; 4],
        device: &B::Device,
    ) -> Tensor<B, 2, Int> {
        let size = h * w * 3;
        assert_eq!(frames.len(), b * f * size, "frames are not [B, F, H, W, 3]");
        let keys: Vec<u64> = frames
            .chunks_exact(size)
            .map(|px| {
                let mut hasher = DefaultHasher::new();
                px.hash(&mut hasher);
                hasher.finish()
            })
            .collect();
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| !self.map.contains_key(&keys[i]))
            .collect();
        let mut fresh: HashMap<u64, Vec<u32>> = HashMap::new();
        if !missing.is_empty() {
            let px: Vec<u8> = missing
                .iter()
                .flat_map(|&i| frames[i * size..(i + 1) * size].iter().copied())
                .collect();
            let x = crate::flow::frames_to_tensor::<B>(&px, [missing.len(), 1, h, w, 3], device);
            let ids: Vec<i64> = tokenize(vq, x)
                .into_data()
                .convert::<i64>()
                .into_vec()
                .expect("token ids");
            let n = ids.len() / missing.len();
            for (j, &i) in missing.iter().enumerate() {
                let grid = ids[j * n..(j + 1) * n].iter().map(|&t| t as u32).collect();
                fresh.insert(keys[i], grid);
            }
        }
        let mut out = Vec::new();
        for k in &keys {
            let grid = self.map.get(k).or_else(|| fresh.get(k)).expect("tokenised");
            out.extend(grid.iter().map(|&t| t as i64));
        }
        for (k, grid) in fresh {
            if self.map.len() < self.capacity {
                self.map.insert(k, grid);
            }
        }
        let n = out.len() / (b * f);
        Tensor::from_data(TensorData::new(out, [b, f * n]), device)
    }
}

/// Motion-weighted cross-entropy of the next-token predictions of a clip: its tokens
/// `[B, F · N]` and its frames `x0` `[B, F, C, H, W]` in [-1, 1] (for the motion
/// weights), with `F - 1` actions per clip (ignored by an action-free model).
pub fn ar_loss<B: AutodiffBackend>(
    world: &ArWorld<B>,
    tokens: Tensor<B::InnerBackend, 2, Int>,
    x0: Tensor<B::InnerBackend, 5>,
    actions: Option<&ActionBatch<B>>,
    cfg: &ArLossConfig,
) -> Tensor<B, 1> {
    let grid = (world.net.tokens_per_frame() as f64).sqrt().round() as usize;
    let tokens = Tensor::<B, 2, Int>::from_inner(tokens);
    let weights = (cfg.motion != MotionLoss::None).then(|| {
        let w = motion_weights(x0, cfg.motion, cfg.strength, cfg.temperature);
        Tensor::<B, 2>::from_inner(pool_to_tokens(w, grid))
    });
    let logits = world.net.forward(tokens.clone(), world.cond(actions));
    token_loss(logits, tokens, weights)
}

/// Rolls `context` frames `[B, K, C, H, W]` (in [-1, 1]) forward by `horizon` frames:
/// tokens are sampled with `sampling` and a key/value cache, with a sliding window of
/// the model's `max_frames` frames (while the history is shorter, new frames are added
/// to it; after that each window holds the last `max_frames - 1` frames and one new).
/// `actions` holds, per clip, the action after each frame from the first context frame
/// on (`K - 1 + horizon`); it is ignored by an action-free model. Returns the predicted
/// frames `[B, horizon, C, H, W]`.
pub fn ar_rollout<B: Backend, R: Rng>(
    world: &ArWorld<B>,
    vq: &VqTokenizer<B>,
    context: Tensor<B, 5>,
    actions: Option<&ActionBatch<B>>,
    horizon: usize,
    sampling: Sampling,
    rng: &mut R,
) -> Tensor<B, 5> {
    let [b, k0, c, h, w] = context.dims();
    let n = world.net.tokens_per_frame();
    let window = world.net.max_len() / n;
    assert!(window >= 2, "a window of {window} frame(s) cannot predict");
    // Token grids of every frame so far.
    let mut frames: Vec<Tensor<B, 2, Int>> = tokenize(vq, context).chunk(k0, 1);
    let mut made = 0;
    while made < horizon {
        let total = frames.len();
        let start = total.saturating_sub(window - 1);
        let k = total - start;
        let new = (window - k).min(horizon - made);
        let steps = k + new - 1;
        let sub = actions.map(|a| match a {
            ActionBatch::Discrete(ids) => {
                ActionBatch::Discrete(ids.clone().narrow(1, start, steps))
            }
            ActionBatch::Continuous(v) => {
                ActionBatch::Continuous(v.clone().narrow(1, start, steps))
            }
        });
        let cond = world.cond(sub.as_ref());
        let prefix = Tensor::cat(frames[start..].to_vec(), 1);
        let next = generate(&world.net, prefix, new, cond, sampling, true, rng);
        frames.extend(next.chunk(new, 1));
        made += new;
    }
    let ids = Tensor::cat(frames[k0..].to_vec(), 1).reshape([b * horizon, n]);
    vq.decode(ids).reshape([b, horizon, c, h, w])
}
