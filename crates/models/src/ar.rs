//! A LLaMA-style autoregressive transformer over frame tokens (the iVideoGPT family's
//! second stage, sized for CPUs): a clip is the row-major token grids of its frames one
//! after another (from [`crate::vq`]), and the network predicts each token from all
//! tokens before it.
//!
//! - Input: the sequence shifted right behind a learned start vector, so position `p`
//!   reads token `p − 1` and predicts token `p`; every position also gets the learned
//!   embedding of the frame it predicts (frames are addressable); rotary positions in
//!   attention.
//! - Blocks: RMSNorm, causal self-attention (rotary), RMSNorm, SwiGLU MLP, residuals.
//! - DWS: with action modules attached, the module of each block modulates the positions
//!   that predict frame `i` with frame `i`'s action embedding, before the block (paper
//!   eq. 1, as in the flow model); zero-initialised, so attaching leaves the output as it
//!   was.
//! - Decoding: [`ArTransformer::step`] feeds one position at a time against a key/value
//!   cache, so a new token costs attention over the cache only; [`generate`] samples with
//!   temperature and top-k, with or without the cache.
//!
//! Shapes: tokens `[B, L]` with `L = F · N`; activations `[B, L, D]`; actions `[B, F, Dc]`.

use crate::action_module::{ActionModule, ActionModuleConfig};
use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use dws_kernels::{linear, rotary, silu};

/// Base of the rotary position frequencies.
const ROPE_THETA: f32 = 10_000.0;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Sizes of the transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArConfig {
    /// Codebook size of the tokenizer.
    pub vocab: usize,
    pub tokens_per_frame: usize,
    /// Longest clip, in frames (the context window).
    pub max_frames: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// Hidden width of the SwiGLU MLP.
    pub mlp_hidden: usize,
}

impl ArConfig {
    /// Seconds on a CPU, for tests.
    pub fn debug(vocab: usize, tokens_per_frame: usize) -> Self {
        Self {
            vocab,
            tokens_per_frame,
            max_frames: 4,
            width: 32,
            depth: 2,
            heads: 2,
            mlp_hidden: 64,
        }
    }

    /// Two CPU cores: width 128, 4 blocks of 4 heads, a window of 4 frames.
    pub fn small(vocab: usize, tokens_per_frame: usize) -> Self {
        Self {
            vocab,
            tokens_per_frame,
            max_frames: 4,
            width: 128,
            depth: 4,
            heads: 4,
            mlp_hidden: 344,
        }
    }

    pub fn max_len(&self) -> usize {
        self.max_frames * self.tokens_per_frame
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.vocab < 2 || self.tokens_per_frame == 0 || self.max_frames == 0 {
            return Err("vocab ≥ 2, tokens_per_frame ≥ 1 and max_frames ≥ 1 are needed".into());
        }
        if self.heads == 0 || !self.width.is_multiple_of(2 * self.heads) {
            return Err(format!(
                "width {} must split into {} heads of even size (rotary positions)",
                self.width, self.heads
            ));
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> ArTransformer<B> {
        let d = self.width;
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        ArTransformer {
            embed: EmbeddingConfig::new(self.vocab, d).init(device),
            start: Param::from_tensor(Tensor::random(
                [d],
                burn::tensor::Distribution::Normal(0.0, 0.02),
                device,
            )),
            frame_pos: Param::from_tensor(Tensor::random(
                [self.max_frames, d],
                burn::tensor::Distribution::Normal(0.0, 0.02),
                device,
            )),
            blocks: (0..self.depth)
                .map(|_| ArBlock {
                    norm1: RmsNormConfig::new(d).init(device),
                    wq: linear(d, d),
                    wk: linear(d, d),
                    wv: linear(d, d),
                    wo: linear(d, d),
                    norm2: RmsNormConfig::new(d).init(device),
                    w1: linear(d, self.mlp_hidden),
                    w3: linear(d, self.mlp_hidden),
                    w2: linear(self.mlp_hidden, d),
                })
                .collect(),
            action_modules: Vec::new(),
            norm: RmsNormConfig::new(d).init(device),
            head: linear(d, self.vocab),
            heads: self.heads,
            tokens_per_frame: self.tokens_per_frame,
            max_frames: self.max_frames,
        }
    }
}

#[derive(Module, Debug)]
struct ArBlock<B: Backend> {
    norm1: RmsNorm<B>,
    wq: Linear<B>,
    wk: Linear<B>,
    wv: Linear<B>,
    wo: Linear<B>,
    norm2: RmsNorm<B>,
    w1: Linear<B>,
    w3: Linear<B>,
    w2: Linear<B>,
}

/// Keys and values of the positions fed so far, per block: `[B, T, H, dh]`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    keys: Vec<Option<Tensor<B, 4>>>,
    values: Vec<Option<Tensor<B, 4>>>,
    /// Positions fed so far.
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(depth: usize) -> Self {
        Self {
            keys: vec![None; depth],
            values: vec![None; depth],
            len: 0,
        }
    }
}

/// One block's cached keys and values.
type KvSlot<'a, B> = (&'a mut Option<Tensor<B, 4>>, &'a mut Option<Tensor<B, 4>>);

impl<B: Backend> ArBlock<B> {
    /// `x` `[B, L, D]` at positions `start..start + L`; with a cache, the keys and values
    /// of earlier positions come from it and these are appended.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        heads: usize,
        start: usize,
        cache: Option<KvSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let [b, l, d] = x.dims();
        let dh = d / heads;
        let h = self.norm1.forward(x.clone());
        let heads_of = |t: Tensor<B, 3>| t.reshape([b, l, heads, dh]);
        // Rotary positions on [B, L, H, dh]; the attention reads the heads in place.
        let turn = |t: Tensor<B, 3>| rotary(heads_of(t), start, ROPE_THETA);
        let q = turn(linear(&self.wq, h.clone()));
        let mut k = turn(linear(&self.wk, h.clone()));
        let mut v = heads_of(linear(&self.wv, h));
        let mut causal = true;
        if let Some((ck, cv)) = cache {
            if let (Some(pk), Some(pv)) = (ck.take(), cv.take()) {
                assert_eq!(l, 1, "a filled cache takes one position at a time");
                k = Tensor::cat(vec![pk, k], 1);
                v = Tensor::cat(vec![pv, v], 1);
                // One query after all cached keys: it may see every one of them.
                causal = false;
            }
            *ck = Some(k.clone());
            *cv = Some(v.clone());
        }
        let att = dws_kernels::attention_heads_last(q, k, v, causal && l > 1); // [B, L, D]
        let x = x + linear(&self.wo, att);
        let h = self.norm2.forward(x.clone());
        let mlp = linear(
            &self.w2,
            silu(linear(&self.w1, h.clone())) * linear(&self.w3, h),
        );
        x + mlp
    }
}

#[derive(Module, Debug)]
pub struct ArTransformer<B: Backend> {
    embed: Embedding<B>,
    /// The vector position 0 reads (the sequence is shifted right behind it).
    start: Param<Tensor<B, 1>>,
    /// `[max_frames, D]`: added to the positions that predict each frame.
    frame_pos: Param<Tensor<B, 2>>,
    blocks: Vec<ArBlock<B>>,
    /// One DWS module per block (empty for an action-free model).
    pub action_modules: Vec<ActionModule<B>>,
    norm: RmsNorm<B>,
    head: Linear<B>,
    heads: usize,
    tokens_per_frame: usize,
    max_frames: usize,
}

impl<B: Backend> ArTransformer<B> {
    /// Attaches a zero-initialised DWS action module before every block.
    pub fn attach_action_modules(mut self, cond_dim: usize, device: &B::Device) -> Self {
        let d = self.start.dims()[0];
        self.action_modules = (0..self.blocks.len())
            .map(|_| ActionModuleConfig::new(d, cond_dim, 2 * d).init(device))
            .collect();
        self
    }

    pub fn tokens_per_frame(&self) -> usize {
        self.tokens_per_frame
    }

    pub fn max_len(&self) -> usize {
        self.max_frames * self.tokens_per_frame
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Logits `[B, L, V]` for every position of whole frames of tokens `[B, F·N]`, with
    /// per-frame action embeddings `[B, F, Dc]` when the model has action modules.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, cond: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let [b, l] = tokens.dims();
        let n = self.tokens_per_frame;
        assert!(
            l.is_multiple_of(n) && l <= self.max_len(),
            "{l} tokens are not whole frames within the window of {}",
            self.max_len()
        );
        let f = l / n;
        let mut x = self.input(tokens, b, l, f);
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.modulate(i, x, cond.clone(), f);
            x = block.forward(x, self.heads, 0, None);
        }
        self.head.forward(self.norm.forward(x))
    }

    /// Feeds whole frames of tokens `[B, P]` (positions `0..P`) in one pass, filling an
    /// empty `cache` with their keys and values, as [`Self::step`] would one position at
    /// a time; `cond` `[B, P / N, Dc]` as in [`Self::forward`].
    pub fn prefill(
        &self,
        tokens: Tensor<B, 2, Int>,
        cond: Option<Tensor<B, 3>>,
        cache: &mut KvCache<B>,
    ) {
        assert_eq!(cache.len, 0, "prefill takes an empty cache");
        let [b, l] = tokens.dims();
        let n = self.tokens_per_frame;
        assert!(
            l.is_multiple_of(n) && l > 0 && l <= self.max_len(),
            "{l} tokens are not whole frames within the window of {}",
            self.max_len()
        );
        let f = l / n;
        let mut x = self.input(tokens, b, l, f);
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.modulate(i, x, cond.clone(), f);
            let (k, v) = (&mut cache.keys[i], &mut cache.values[i]);
            x = block.forward(x, self.heads, 0, Some((k, v)));
        }
        cache.len = l;
    }

    /// The block input of whole frames of tokens: the sequence shifted right behind the
    /// start vector, plus each position's frame embedding.
    fn input(&self, tokens: Tensor<B, 2, Int>, b: usize, l: usize, f: usize) -> Tensor<B, 3> {
        let n = self.tokens_per_frame;
        let x = self.embed.forward(tokens); // [B, L, D]
        let d = x.dims()[2];
        let start = self.start.val().reshape([1, 1, d]).expand([b, 1, d]);
        let x = Tensor::cat(vec![start, x.narrow(1, 0, l - 1)], 1);
        let pos = self
            .frame_pos
            .val()
            .narrow(0, 0, f)
            .reshape([1, f, 1, d])
            .expand([b, f, n, d])
            .reshape([b, l, d]);
        x + pos
    }

    /// The DWS module of block `i` on positions grouped by the frame they predict.
    fn modulate(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        cond: Option<Tensor<B, 3>>,
        f: usize,
    ) -> Tensor<B, 3> {
        match (self.action_modules.get(i), cond) {
            (Some(m), Some(c)) => {
                let [b, l, d] = x.dims();
                m.forward(x.reshape([b, f, l / f, d]), c).reshape([b, l, d])
            }
            _ => x,
        }
    }

    /// Logits `[B, V]` of the next position: feeds the token at the cache's end (`None`
    /// at position 0, which reads the start vector) with the action embedding `[B, Dc]`
    /// of the frame that position predicts, and appends to the cache.
    pub fn step(
        &self,
        token: Option<Tensor<B, 1, Int>>,
        cond: Option<Tensor<B, 2>>,
        cache: &mut KvCache<B>,
        batch: usize,
    ) -> Tensor<B, 2> {
        let p = cache.len;
        assert!(p < self.max_len(), "the cache is full ({p} positions)");
        let d = self.start.dims()[0];
        let x = match token {
            Some(t) => self.embed.forward(t.reshape([batch, 1])),
            None => self.start.val().reshape([1, 1, d]).expand([batch, 1, d]),
        };
        let frame = p / self.tokens_per_frame;
        let mut x = x + self.frame_pos.val().narrow(0, frame, 1).reshape([1, 1, d]);
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.modulate(i, x, cond.clone().map(|c| c.unsqueeze_dim::<3>(1)), 1);
            let (k, v) = (&mut cache.keys[i], &mut cache.values[i]);
            x = block.forward(x, self.heads, p, Some((k, v)));
        }
        cache.len += 1;
        self.head
            .forward(self.norm.forward(x))
            .reshape([batch, self.head_vocab()])
    }

    fn head_vocab(&self) -> usize {
        self.head.weight.dims()[1]
    }
}

/// Per-token cross-entropy of logits `[B, L, V]` against tokens `[B, L]`, weighted per
/// token by `weights` `[B, L]` (the motion weights pooled to the token grid), averaged.
pub fn token_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    weights: Option<Tensor<B, 2>>,
) -> Tensor<B, 1> {
    let [b, l, v] = logits.dims();
    let logp = dws_kernels::log_softmax(logits.reshape([b * l, v]));
    let picked = logp.gather(1, targets.reshape([b * l, 1])).reshape([b, l]);
    let nll = picked.neg();
    match weights {
        Some(w) => (nll * w).mean(),
        None => nll.mean(),
    }
}

/// How [`generate`] picks tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
}

/// One token per row of logits `[B, V]`.
pub fn pick_tokens<R: Rng>(logits: &[f32], v: usize, s: Sampling, rng: &mut R) -> Vec<i64> {
    logits
        .chunks_exact(v)
        .map(|row| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
            if s.temperature <= 0.0 {
                return best as i64;
            }
            let mut idx: Vec<usize> = (0..v).collect();
            if s.top_k > 0 && s.top_k < v {
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                idx.truncate(s.top_k);
            }
            let max = row[best];
            let p: Vec<f64> = idx
                .iter()
                .map(|&i| (((row[i] - max) / s.temperature) as f64).exp())
                .collect();
            let mut u = rng.gen::<f64>() * p.iter().sum::<f64>();
            for (j, &pj) in p.iter().enumerate() {
                if u < pj {
                    return idx[j] as i64;
                }
                u -= pj;
            }
            idx[idx.len() - 1] as i64
        })
        .collect()
}

/// Continues `prefix` tokens `[B, P]` (whole frames) by `frames` frames, sampled with
/// `sampling`; `cond` `[B, F, Dc]` covers every frame of the result when the model has
/// action modules. With `cache`, each new token feeds one position against the key/value
/// cache; without, the whole sequence is recomputed for every token (the reference).
/// Returns the new tokens `[B, frames · N]`.
pub fn generate<B: Backend, R: Rng>(
    model: &ArTransformer<B>,
    prefix: Tensor<B, 2, Int>,
    frames: usize,
    cond: Option<Tensor<B, 3>>,
    sampling: Sampling,
    use_cache: bool,
    rng: &mut R,
) -> Tensor<B, 2, Int> {
    let [b, p] = prefix.dims();
    let n = model.tokens_per_frame();
    let total = p + frames * n;
    assert!(
        total <= model.max_len(),
        "{total} tokens exceed the window of {}",
        model.max_len()
    );
    let device = prefix.device();
    let v = model.head_vocab();
    let mut seq: Vec<Vec<i64>> = {
        let flat: Vec<i64> = prefix.into_data().convert::<i64>().into_vec().expect("ids");
        flat.chunks(p.max(1)).map(|r| r[..p].to_vec()).collect()
    };
    if seq.is_empty() {
        seq = vec![Vec::new(); b];
    }
    let to_tensor = |rows: &[Vec<i64>], len: usize| {
        let flat: Vec<i64> = rows.iter().flat_map(|r| r[..len].iter().copied()).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, len]), &device)
    };
    let frame_cond = |pos: usize| {
        cond.as_ref().map(|c| {
            let dc = c.dims()[2];
            c.clone().narrow(1, pos / n, 1).reshape([b, dc])
        })
    };
    let mut cache = KvCache::new(model.depth());
    if use_cache && p > 0 {
        // The prefix in one pass (its logits are not needed).
        let c = cond.as_ref().map(|c| c.clone().narrow(1, 0, p / n));
        model.prefill(to_tensor(&seq, p), c, &mut cache);
    }
    for pos in p..total {
        let logits = if use_cache {
            let token = (pos > 0).then(|| to_tensor(&seq, pos).narrow(1, pos - 1, 1).reshape([b]));
            model.step(token, frame_cond(pos), &mut cache, b)
        } else {
            // Whole frames up to the one being filled; the unknown rest is padding that
            // the causal mask keeps from the position asked.
            let frames_now = pos / n + 1;
            let len = frames_now * n;
            let padded: Vec<Vec<i64>> = seq
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.resize(len, 0);
                    r
                })
                .collect();
            let c = cond.as_ref().map(|c| c.clone().narrow(1, 0, frames_now));
            model
                .forward(to_tensor(&padded, len), c)
                .narrow(1, pos, 1)
                .reshape([b, v])
        };
        let row: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32");
        for (r, t) in seq.iter_mut().zip(pick_tokens(&row, v, sampling, rng)) {
            r.push(t);
        }
    }
    let flat: Vec<i64> = seq.iter().flat_map(|r| r[p..].iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [b, frames * n]), &device)
}
