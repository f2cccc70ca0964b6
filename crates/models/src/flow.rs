//! Rectified flow (the Wan2.1 / Open-Sora objective): `x_t = (1 - t) x_0 + t e`, target
//! velocity `e - x_0`, flow times drawn logit-normal with a shift toward noise; few-step
//! Euler sampling from `t = 1` to `0`. Context frames are clean (`t = 0`), so one network
//! predicts the next frame of a history window (autoregressive rollout) or several frames
//! at once.
//!
//! The network's output is read one of two ways ([`Prediction`]):
//! - `velocity`: the output is the velocity itself (Wan2.1, Open-Sora).
//! - `x0`: the output is the clean frame, as a change from the last clean context frame
//!   (`x0_hat = anchor + out`), and the velocity follows from it:
//!   `v_hat = (x_t - x0_hat) / max(t, T_MIN)`. In pixel
//!   space a clean frame is far easier for a narrow network to produce than the noise the
//!   velocity carries (Li & He 2025, "Back to Basics: Let Denoising Generative Models
//!   Denoise"), and anchoring on the last frame makes an untrained network predict
//!   "nothing moves", the strong baseline of a world model, from which it learns changes.
//!   With the warp head (`FlowDitConfig::warp`) the anchor is first warped by the
//!   network's displacement field: `x0_hat = warp(anchor, d) + out`.
//!
//! The loss squares the velocity error or, with [`LossOn::X0`], the clean-frame error.
//!
//! All randomness comes from a caller's ChaCha8 generator (on the CPU), so a run is
//! reproducible and a resumed run continues the same random stream.

use crate::embedders::{ActionBatch, ActionEmbedder};
use crate::flow_dit::{gaussian_blur, warp, FlowDit};
use crate::motion_loss::{motion_weights, MotionLoss};
use burn::prelude::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What the network's output means (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The flow velocity `e - x_0`.
    #[default]
    Velocity,
    /// The clean frame, as a change from the last clean context frame.
    X0,
}

/// Which error the training loss squares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// The velocity (`v_hat - v`), the rectified-flow loss.
    #[default]
    Velocity,
    /// The clean frame (`x0_hat - x0 = t (v - v_hat)`): the velocity error weighted by
    /// `max(t, T_MIN)^2`, which weighs the noisiest times, where a few-step sampler makes
    /// its largest moves, as much as the cleanest.
    X0,
}

/// Smallest flow time dividing `x_t - x0_hat` when the velocity is derived from a clean-
/// frame prediction (keeps the loss finite near `t = 0`).
pub const T_MIN: f32 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlowConfig {
    /// Shift of the flow-time distribution toward noise (`t' = s t / (1 + (s - 1) t)`).
    pub shift: f32,
    /// Euler steps when sampling.
    pub sample_steps: usize,
    /// What the network predicts (runs written before this field existed predicted the
    /// velocity).
    #[serde(default)]
    pub prediction: Prediction,
    /// Which error the loss squares (runs written before this field used the velocity).
    #[serde(default)]
    pub loss: LossOn,
    /// When sampling with the warp head, displacements shorter than this many pixels are
    /// set to zero: what should stay still is then copied exactly instead of being
    /// resampled (and blurred) at every step of a rollout. 0 turns it off; training never
    /// applies it.
    #[serde(default)]
    pub warp_snap: f32,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            shift: 1.0,
            sample_steps: 4,
            prediction: Prediction::X0,
            loss: LossOn::X0,
            warp_snap: 0.0,
        }
    }
}

/// How [`velocity`] reads the network's output.
#[derive(Debug, Clone, Copy)]
pub struct Readout {
    pub prediction: Prediction,
    /// Smallest flow time divided by (clean-frame prediction).
    pub t_min: f32,
    /// See [`FlowConfig::warp_snap`] (0 in training).
    pub warp_snap: f32,
}

/// The velocity the network implies for frames `x_t` `[B, F, C, H, W]` at flow times
/// `t` (one per frame, row-major `[B, F]`). `anchor` (the last clean context frame at
/// every position) is needed by [`Prediction::X0`] only, as is `t_min`, the smallest time
/// divided by ([`T_MIN`] in training; sampling never reaches `t = 0` on a noisy frame,
/// and dividing by its exact time makes the last Euler step land on `x0_hat`).
pub fn velocity<B: Backend>(
    model: &FlowDit<B>,
    xt: Tensor<B, 5>,
    t: &[f32],
    anchor: Option<Tensor<B, 5>>,
    cond: Option<Tensor<B, 3>>,
    read: Readout,
) -> Tensor<B, 5> {
    velocity_parts(model, xt, t, anchor, cond, read).0
}

/// [`velocity`] and, for a clean-frame model with the warp head, the displacement field
/// it applied to the anchor frames.
fn velocity_parts<B: Backend>(
    model: &FlowDit<B>,
    xt: Tensor<B, 5>,
    t: &[f32],
    anchor: Option<Tensor<B, 5>>,
    cond: Option<Tensor<B, 3>>,
    read: Readout,
) -> (Tensor<B, 5>, Option<Tensor<B, 5>>) {
    let Readout {
        prediction,
        t_min,
        warp_snap,
    } = read;
    let [b, f, _, _, _] = xt.dims();
    let device = xt.device();
    let times = Tensor::<B, 2>::from_data(TensorData::new(t.to_vec(), [b, f]), &device);
    let (out, field) = model.forward_parts(xt.clone(), times, cond, anchor.clone());
    match prediction {
        Prediction::Velocity => (out, None),
        Prediction::X0 => {
            let inv: Vec<f32> = t.iter().map(|&ti| 1.0 / ti.max(t_min)).collect();
            let inv = Tensor::<B, 5>::from_data(TensorData::new(inv, [b, f, 1, 1, 1]), &device);
            let mut anchor = anchor.expect("x0 prediction needs the anchor frames");
            let field = field.map(|mut field| {
                if warp_snap > 0.0 {
                    let length2 = field.clone().powf_scalar(2.0).sum_dim(2); // [B, F, 1, H, W]
                    let keep = length2.greater_equal_elem(warp_snap * warp_snap).float();
                    field = field * keep;
                }
                anchor = warp(anchor.clone(), field.clone());
                field
            });
            ((xt - anchor - out) * inv, field)
        }
    }
}

/// Per clip, its frame `last[i]` copied to every frame position: `[B, F, C, H, W]`.
fn anchors<B: Backend>(x: &Tensor<B, 5>, last: &[usize]) -> Tensor<B, 5> {
    let [b, f, c, h, w] = x.dims();
    let mut pick = vec![0f32; b * f * f];
    for (i, &k) in last.iter().enumerate() {
        for j in 0..f {
            pick[(i * f + j) * f + k] = 1.0;
        }
    }
    let pick = Tensor::<B, 3>::from_data(TensorData::new(pick, [b, f, f]), &x.device());
    pick.matmul(x.clone().reshape([b, f, c * h * w]))
        .reshape([b, f, c, h, w])
}

fn shifted(t: f32, shift: f32) -> f32 {
    shift * t / (1.0 + (shift - 1.0) * t)
}

/// Standard normal samples (Box-Muller).
pub fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
        let u2: f32 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f32::consts::TAU * u2;
        out.push(r * a.cos());
        out.push(r * a.sin());
    }
    out.truncate(n);
    out
}

/// u8 frames `[B, F, H, W, C]` → floats `[B, F, C, H, W]` in [-1, 1].
pub fn frames_to_tensor<B: Backend>(
    frames: &[u8],
    shape: [usize; 5],
    device: &B::Device,
) -> Tensor<B, 5> {
    let [b, f, h, w, c] = shape;
    // Reordered here rather than with `permute`: a permuted view would send every
    // element-wise operation on the clip through the CPU backend's slow strided path
    // (a fifth of a training step, measured with perf).
    let hw = h * w;
    let mut data = vec![0f32; frames.len()];
    for (src, dst) in frames
        .chunks_exact(hw * c)
        .zip(data.chunks_exact_mut(hw * c))
    {
        for (p, px) in src.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                dst[ch * hw + p] = v as f32 / 127.5 - 1.0;
            }
        }
    }
    Tensor::<B, 5>::from_data(TensorData::new(data, [b, f, c, h, w]), device)
}

/// Floats `[B, F, C, H, W]` in [-1, 1] → u8 `[B, F, H, W, C]`.
pub fn tensor_to_frames<B: Backend>(x: Tensor<B, 5>) -> Vec<u8> {
    let x = x.permute([0, 1, 3, 4, 2]);
    x.into_data()
        .to_vec::<f32>()
        .expect("float tensor")
        .into_iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// A world simulator: the video network and, once DWS is attached, its action embedder.
/// This pair is what checkpoints hold.
#[derive(Module, Debug)]
pub struct WorldModel<B: Backend> {
    pub dit: FlowDit<B>,
    pub embedder: Option<ActionEmbedder<B>>,
}

impl<B: Backend> WorldModel<B> {
    /// Marks every base-network parameter as frozen, leaving the action modules and the
    /// embedder trainable (`finetune --train new`).
    pub fn freeze_base(mut self) -> Self {
        let modules = std::mem::take(&mut self.dit.action_modules);
        self.dit = self.dit.no_grad();
        self.dit.action_modules = modules;
        self
    }

    /// Per-frame action embeddings `[B, F, Dc]` for `F - 1` actions per clip, or `None`
    /// for an action-free model.
    pub fn cond(&self, actions: Option<&ActionBatch<B>>) -> Option<Tensor<B, 3>> {
        match (&self.embedder, actions) {
            (Some(e), Some(a)) if self.dit.has_action_modules() => Some(e.forward(a.clone())),
            _ => None,
        }
    }
}

/// What one training batch holds.
pub struct FlowBatch<B: Backend> {
    /// Clean clips `[B, F, C, H, W]` in [-1, 1].
    pub x0: Tensor<B, 5>,
    /// `F - 1` actions per clip (ignored by models without action modules).
    pub actions: Option<ActionBatch<B>>,
}

/// Loss settings.
#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    pub motion: MotionLoss,
    pub strength: f32,
    pub temperature: f32,
    /// The flow settings: time shift, prediction, loss target, and the sampler's step
    /// count for `rollout_context` (its `warp_snap` is not applied in training).
    pub flow: FlowConfig,
    /// Share of clips whose context frames after the first are the model's own
    /// predictions (see [`flow_loss`]); 0 trains on ground-truth context only.
    pub rollout_context: f32,
    /// Width (Gaussian sigma, pixels) of the blurred warp loss; 0 turns it off (see
    /// [`flow_loss`]).
    pub warp_blur: f32,
}

/// The rectified-flow loss on a batch: each clip gets `k` clean context frames (uniform in
/// `1..F`), the rest share one flow time; squared velocity error on those frames,
/// weighted by the motion weights. Returns the scalar loss.
///
/// With `rollout_context > 0`, that share of the clips with two or more context frames
/// see, in place of context frames `1..k`, what the model itself makes of them from frame
/// 0 (the rollout's first call, with the clip's actions, no gradient), and learn to
/// predict the true frames after them. A rollout feeds the model its own frames, which
/// training on clean frames never shows it; this teaches it to correct what drifted
/// rather than build on it (scheduled sampling, Bengio et al. 2015).
///
/// With `warp_blur > 0` and the warp head, a second term compares the anchor frame
/// warped by the predicted field with the true frame, both blurred by a Gaussian of that
/// width (the same motion weights, no flow-time weight). Warping learns from the image's
/// gradients, which a thin part (the arm, a 1-pixel outline) only has within a pixel of
/// its edges: once it moves further than its own width per frame, the sharp loss gives
/// the field no direction. Blurred, every edge pulls from a few pixels away (the coarse
/// levels of coarse-to-fine optical flow).
pub fn flow_loss<B: Backend>(
    world: &WorldModel<B>,
    batch: FlowBatch<B>,
    cfg: &LossConfig,
    rng: &mut ChaCha8Rng,
) -> Tensor<B, 1> {
    let [b, f, c, h, w] = batch.x0.dims();
    let device = batch.x0.device();
    let mut t = vec![0f32; b * f];
    let mut mask = vec![0f32; b * f];
    let mut last = vec![0usize; b];
    let mut own = vec![0f32; b * f];
    for i in 0..b {
        let k = if f > 1 { rng.gen_range(1..f) } else { 0 };
        last[i] = k.saturating_sub(1);
        if cfg.rollout_context > 0.0 && k >= 2 && rng.gen::<f32>() < cfg.rollout_context {
            for j in 1..k {
                own[i * f + j] = 1.0;
            }
        }
        // Logit-normal flow time, shifted toward noise.
        let z = normal(rng, 1)[0];
        let ti = shifted(1.0 / (1.0 + (-z).exp()), cfg.flow.shift);
        for j in k..f {
            t[i * f + j] = ti;
            mask[i * f + j] = 1.0;
        }
    }
    let cond = world.cond(batch.actions.as_ref());
    let input = own_context(world, batch.x0.clone(), cond.clone(), own, cfg, rng);
    let anchor = (cfg.flow.prediction == Prediction::X0).then(|| anchors(&input, &last));
    let noise = Tensor::<B, 5>::from_data(
        TensorData::new(normal(rng, b * f * c * h * w), [b, f, c, h, w]),
        &device,
    );
    let mask = Tensor::<B, 5>::from_data(TensorData::new(mask, [b, f, 1, 1, 1]), &device);
    let t5 = Tensor::<B, 5>::from_data(TensorData::new(t.clone(), [b, f, 1, 1, 1]), &device);
    // Context frames (t = 0) are `input`; the frames to predict are the true ones.
    let xt = input * (t5.clone().neg() + 1.0) + noise.clone() * t5;
    let target = noise - batch.x0.clone();
    let read = Readout {
        prediction: cfg.flow.prediction,
        t_min: T_MIN,
        warp_snap: 0.0,
    };
    let (v, field) = velocity_parts(&world.dit, xt, &t, anchor.clone(), cond, read);
    let motion =
        motion_weights(batch.x0.clone(), cfg.motion, cfg.strength, cfg.temperature) * mask.clone();
    let mut weights = motion.clone();
    if cfg.flow.loss == LossOn::X0 {
        let t2: Vec<f32> = t.iter().map(|&ti| ti.max(T_MIN).powi(2)).collect();
        weights =
            weights * Tensor::<B, 5>::from_data(TensorData::new(t2, [b, f, 1, 1, 1]), &device);
    }
    let se = (v - target).powf_scalar(2.0) * weights; // [B, F, C, H, W]
    let count = mask.sum() * (c * h * w) as f64;
    let mut loss = se.sum() / count.clone();
    if let (true, Some(field), Some(anchor)) = (cfg.warp_blur > 0.0, field, anchor) {
        let moved = warp(gaussian_blur(anchor, cfg.warp_blur), field);
        let err = (moved - gaussian_blur(batch.x0, cfg.warp_blur)).powf_scalar(2.0) * motion;
        loss = loss + err.sum() / count;
    }
    loss
}

/// The clips `x0` `[B, F, C, H, W]` with the frames marked in `own` (row-major `[B, F]`,
/// 1 = replace) replaced by the model's own predictions of them: frames `1..F` made from
/// frame 0 in one call, as a rollout's first call makes them (no gradient).
fn own_context<B: Backend>(
    world: &WorldModel<B>,
    x0: Tensor<B, 5>,
    cond: Option<Tensor<B, 3>>,
    own: Vec<f32>,
    cfg: &LossConfig,
    rng: &mut ChaCha8Rng,
) -> Tensor<B, 5> {
    if !own.iter().any(|&o| o > 0.0) {
        return x0;
    }
    let [b, f, _, _, _] = x0.dims();
    let sampler = FlowConfig {
        warp_snap: 0.0,
        ..cfg.flow
    };
    let first = x0.clone().narrow(1, 0, 1);
    let made = sample_frames(&world.dit, first.clone(), f - 1, cond, &sampler, rng);
    let made = Tensor::cat(vec![first, made.detach()], 1);
    let own = Tensor::<B, 5>::from_data(TensorData::new(own, [b, f, 1, 1, 1]), &x0.device());
    x0.clone() + (made - x0) * own
}

/// Generates `new` frames after the context `[B, K, C, H, W]` jointly, with `steps` Euler
/// steps. `cond` covers all `K + new` frames when the model takes actions.
pub fn sample_frames<B: Backend>(
    model: &FlowDit<B>,
    context: Tensor<B, 5>,
    new: usize,
    cond: Option<Tensor<B, 3>>,
    cfg: &FlowConfig,
    rng: &mut ChaCha8Rng,
) -> Tensor<B, 5> {
    let [b, k, c, h, w] = context.dims();
    let device = context.device();
    let anchor = (cfg.prediction == Prediction::X0).then(|| {
        if k == 0 {
            Tensor::zeros([b, k + new, c, h, w], &device)
        } else {
            context.clone().narrow(1, k - 1, 1).repeat_dim(1, k + new)
        }
    });
    let mut x = Tensor::<B, 5>::from_data(
        TensorData::new(normal(rng, b * new * c * h * w), [b, new, c, h, w]),
        &device,
    );
    let steps = cfg.sample_steps.max(1);
    for i in 0..steps {
        let t_now = shifted(1.0 - i as f32 / steps as f32, cfg.shift);
        let t_next = shifted(1.0 - (i + 1) as f32 / steps as f32, cfg.shift);
        let mut times = vec![0f32; b * (k + new)];
        for bi in 0..b {
            for j in k..k + new {
                times[bi * (k + new) + j] = t_now;
            }
        }
        let input = Tensor::cat(vec![context.clone(), x.clone()], 1);
        let v = velocity(
            model,
            input,
            &times,
            anchor.clone(),
            cond.clone(),
            Readout {
                prediction: cfg.prediction,
                t_min: 1e-6,
                warp_snap: cfg.warp_snap,
            },
        )
        .narrow(1, k, new);
        x = x + v * (t_next - t_now) as f64;
    }
    x.clamp(-1.0, 1.0)
}

/// Autoregressive rollout with a sliding window of `window` frames (the training clip
/// length): every model call sees a full window, as in training. While the history is
/// shorter than the window, the missing frames are generated jointly from what there is
/// (one context frame: `window - 1` new frames at once); after that each call conditions
/// on the last `window - 1` frames and adds one. Runs until `horizon` frames are made.
/// Returns the predicted frames `[B, horizon, C, H, W]`.
///
/// `actions` holds, per clip, the action taken after each frame from the first context
/// frame on: `K - 1 + horizon` of them (ignored by an action-free model).
pub fn rollout<B: Backend>(
    world: &WorldModel<B>,
    context: Tensor<B, 5>,
    actions: Option<&ActionBatch<B>>,
    horizon: usize,
    window: usize,
    cfg: &FlowConfig,
    rng: &mut ChaCha8Rng,
) -> Tensor<B, 5> {
    let window = window.max(2);
    let mut frames: Vec<Tensor<B, 5>> = context.clone().chunk(context.dims()[1], 1);
    let mut made = 0;
    while made < horizon {
        let total = frames.len();
        let start = total.saturating_sub(window - 1);
        let ctx = Tensor::cat(frames[start..].to_vec(), 1);
        let k = total - start;
        let new = (window - k).min(horizon - made);
        // Actions between the window's frames and into the new ones.
        let n = k + new - 1;
        let sub = actions.map(|a| match a {
            ActionBatch::Discrete(ids) => ActionBatch::Discrete(ids.clone().narrow(1, start, n)),
            ActionBatch::Continuous(v) => ActionBatch::Continuous(v.clone().narrow(1, start, n)),
        });
        let cond = world.cond(sub.as_ref());
        let next = sample_frames(&world.dit, ctx, new, cond, cfg, rng);
        frames.extend(next.chunk(new, 1));
        made += new;
    }
    let k = context.dims()[1];
    Tensor::cat(frames[k..].to_vec(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn frames_become_channel_first_floats_and_come_back() {
        let device = Default::default();
        let shape = [2, 3, 4, 5, 3];
        let frames: Vec<u8> = (0..2 * 3 * 4 * 5 * 3)
            .map(|i| (i * 37 % 256) as u8)
            .collect();
        let x = frames_to_tensor::<Flex>(&frames, shape, &device);
        assert_eq!(x.dims(), [2, 3, 3, 4, 5]);
        // Element [b, f, c, y, x] is pixel (y, x), channel c of frame (b, f).
        let at = |b: usize, f: usize, c: usize, y: usize, xx: usize| {
            x.clone()
                .slice([b..b + 1, f..f + 1, c..c + 1, y..y + 1, xx..xx + 1])
                .into_scalar()
        };
        let px = |b: usize, f: usize, c: usize, y: usize, xx: usize| {
            frames[(((b * 3 + f) * 4 + y) * 5 + xx) * 3 + c] as f32 / 127.5 - 1.0
        };
        for (b, f, c, y, xx) in [(0, 0, 0, 0, 0), (1, 2, 1, 3, 4), (0, 1, 2, 2, 1)] {
            assert_eq!(at(b, f, c, y, xx), px(b, f, c, y, xx));
        }
        assert_eq!(tensor_to_frames(x), frames);
    }

    #[test]
    fn own_context_replaces_the_marked_frames_with_the_models_predictions() {
        use crate::flow_dit::{AttentionLayout, FlowDitConfig};
        use rand::SeedableRng;
        let device = Default::default();
        let dit = FlowDitConfig {
            image_size: 8,
            channels: 3,
            patch: 4,
            width: 16,
            depth: 1,
            heads: 2,
            mlp_ratio: 2,
            max_frames: 4,
            attention: AttentionLayout::Full,
            time_freqs: 8,
            input_skip: false,
            output_gate: true,
            warp: true,
            anchor_input: true,
        }
        .init::<Flex>(&device);
        let world = WorldModel {
            dit,
            embedder: None,
        };
        let frames: Vec<u8> = (0..2 * 4 * 8 * 8 * 3)
            .map(|i| (i * 13 % 253) as u8)
            .collect();
        let x = frames_to_tensor::<Flex>(&frames, [2, 4, 8, 8, 3], &device);
        let cfg = LossConfig {
            motion: MotionLoss::None,
            strength: 1.0,
            temperature: 1.0,
            flow: FlowConfig {
                shift: 3.0,
                sample_steps: 1,
                ..FlowConfig::default() // clean-frame prediction and loss
            },
            rollout_context: 1.0,
            warp_blur: 0.0,
        };
        // Clip 0: frames 1 and 2 are the model's own; clip 1 keeps its true frames.
        let mut own = vec![0f32; 8];
        own[1] = 1.0;
        own[2] = 1.0;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let got = own_context(&world, x.clone(), None, own, &cfg, &mut rng);
        // An untrained clean-frame model predicts "nothing moves": its frames are frame 0.
        let frame =
            |t: &Tensor<Flex, 5>, i: usize, j: usize| t.clone().narrow(0, i, 1).narrow(1, j, 1);
        let gap =
            |a: Tensor<Flex, 5>, b: Tensor<Flex, 5>| -> f32 { (a - b).abs().max().into_scalar() };
        for j in 1..3 {
            assert!(
                gap(frame(&got, 0, j), frame(&x, 0, 0)) < 1e-4,
                "clip 0 frame {j}"
            );
            assert!(
                gap(frame(&x, 0, j), frame(&x, 0, 0)) > 0.1,
                "the test clip moves"
            );
        }
        assert_eq!(gap(frame(&got, 0, 0), frame(&x, 0, 0)), 0.0);
        assert_eq!(gap(frame(&got, 0, 3), frame(&x, 0, 3)), 0.0);
        assert_eq!(gap(got.narrow(0, 1, 1), x.narrow(0, 1, 1)), 0.0);
    }

    #[test]
    fn anchors_copy_each_clips_last_context_frame() {
        let device = Default::default();
        // A clip batch as `frames_to_tensor` makes it.
        let frames: Vec<u8> = (0..2 * 3 * 4 * 4 * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let x = frames_to_tensor::<Flex>(&frames, [2, 3, 4, 4, 3], &device);
        let got = anchors(&x, &[1, 2]);
        for (i, &k) in [1usize, 2].iter().enumerate() {
            let want = x.clone().narrow(0, i, 1).narrow(1, k, 1).repeat_dim(1, 3);
            let gap: f32 = (got.clone().narrow(0, i, 1) - want)
                .abs()
                .max()
                .into_scalar();
            assert_eq!(gap, 0.0, "clip {i}");
        }
    }
}
