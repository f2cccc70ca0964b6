//! A flow-matching video transformer (Wan2.1 / Open-Sora family, sized for CPUs):
//! frames are cut into patches, each frame carries its own flow time `t` (context frames
//! are clean, `t = 0`), blocks are adaLN-modulated by the per-frame time embedding, and
//! attention is either full spatio-temporal (Wan-style) or factorised spatial-then-
//! temporal (Open-Sora STDiT-style). With actions, the DWS action module runs before
//! every block. The network predicts the flow velocity; it knows nothing of the flow
//! process itself (see `flow.rs`).
//!
//! Shapes: video `[B, F, C, H, W]` in [-1, 1]; tokens `[B, F, N, D]` with `N = (H/p)(W/p)`.

use crate::action_module::{ActionModule, ActionModuleConfig};
use burn::module::{Initializer, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::ops::{GridSampleOptions, GridSamplePaddingMode, InterpolateMode};
// Fused CPU kernels on Flex, burn's operations on other backends.
use dws_kernels::{gelu, layer_norm, linear, permute, sigmoid, silu};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionLayout {
    /// Every token attends to every token of every frame (Wan2.1).
    Full,
    /// Spatial attention within a frame, then temporal attention across frames at each
    /// position (Open-Sora STDiT).
    Factorized,
}

/// Sizes of the network (DiT-style presets are in `configs/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowDitConfig {
    pub image_size: usize,
    pub channels: usize,
    pub patch: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    /// Longest clip (learned temporal positions).
    pub max_frames: usize,
    pub attention: AttentionLayout,
    /// Width of the sinusoidal time features.
    pub time_freqs: usize,
    /// A linear path from the input patches to the output (see [`FlowDit`]); wanted
    /// when the network predicts the velocity, which carries the input's noise, and not
    /// when it predicts clean frames. Configs written before this field had it.
    #[serde(default = "yes")]
    pub input_skip: bool,
    /// A learned per-token gate in [0, 1] on the output (sigmoid of a linear map of the
    /// final token). With clean-frame prediction anchored on the last frame, most tokens
    /// should output exactly nothing, but every token carries its input noise through
    /// the residual stream; the gate lets a token shut its output off. Configs written
    /// before this field had none.
    #[serde(default)]
    pub output_gate: bool,
    /// A motion output (with clean-frame prediction): each token also predicts a 2-D
    /// displacement, upsampled bilinearly to a per-pixel field that warps the last
    /// context frame; the pixel output is a residual on that warped frame. Moving what is
    /// there (the arm, the scrolling level) is then a small, smooth output learned from
    /// the image gradients, instead of redrawing each moved patch pixel by pixel (the
    /// transformations of Finn et al. 2016's robot-pushing video models). Off in configs
    /// written before this field.
    #[serde(default)]
    pub warp: bool,
    /// Each token also sees the last clean context frame's patch at its position (a
    /// second patch embedding, added to the first). A noisy frame's token then knows
    /// what was at its place one frame ago without finding it through attention, which
    /// is what a displacement or a residual at that place depends on most (the context-
    /// frame concatenation of image-to-video models). Needs clean-frame prediction
    /// (`flow.prediction = "x0"`), which supplies that frame. Off in configs written
    /// before this field.
    #[serde(default)]
    pub anchor_input: bool,
}

/// Pixels of displacement per unit of the warp head's output.
pub const WARP_SCALE: f32 = 4.0;

fn yes() -> bool {
    true
}

impl FlowDitConfig {
    pub fn tokens_per_frame(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    pub fn patch_dim(&self) -> usize {
        self.patch * self.patch * self.channels
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.patch == 0 || !self.image_size.is_multiple_of(self.patch) {
            return Err(format!(
                "patch {} must divide the image size {}",
                self.patch, self.image_size
            ));
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(format!(
                "heads {} must divide the width {}",
                self.heads, self.width
            ));
        }
        if !self.time_freqs.is_multiple_of(2) || self.max_frames == 0 || self.depth == 0 {
            return Err("time_freqs must be even; max_frames and depth at least 1".into());
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> FlowDit<B> {
        let d = self.width;
        FlowDit {
            patch_embed: LinearConfig::new(self.patch_dim(), d).init(device),
            anchor_embed: self
                .anchor_input
                .then(|| LinearConfig::new(self.patch_dim(), d).init(device)),
            pos_space: Param::from_tensor(sincos_2d::<B>(self.image_size / self.patch, d, device)),
            pos_time: Param::from_tensor(sincos_1d::<B>(self.max_frames, d, device)),
            time_in: LinearConfig::new(self.time_freqs, d).init(device),
            time_out: LinearConfig::new(d, d).init(device),
            blocks: (0..self.depth).map(|_| self.block(device)).collect(),
            action_modules: Vec::new(),
            final_norm: LayerNormConfig::new(d).init(device),
            final_mod: LinearConfig::new(d, 2 * d)
                .with_initializer(Initializer::Zeros)
                .init(device),
            gate: self.output_gate.then(|| {
                LinearConfig::new(d, 1)
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            }),
            final_proj: LinearConfig::new(d, self.patch_dim())
                .with_initializer(Initializer::Zeros)
                .init(device),
            warp: self.warp.then(|| {
                LinearConfig::new(d, 2)
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            }),
            skip: self.input_skip.then(|| {
                LinearConfig::new(self.patch_dim(), self.patch_dim())
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            }),
            patch: self.patch,
            heads: self.heads,
            factorized: self.attention == AttentionLayout::Factorized,
            time_freqs: self.time_freqs,
        }
    }

    fn block<B: Backend>(&self, device: &B::Device) -> Block<B> {
        let d = self.width;
        let attn = || SelfAttention {
            qkv: LinearConfig::new(d, 3 * d).init(device),
            proj: LinearConfig::new(d, d).init(device),
        };
        let factorized = self.attention == AttentionLayout::Factorized;
        let n_mod = if factorized { 9 } else { 6 };
        Block {
            norm1: LayerNormConfig::new(d).init(device),
            attn: attn(),
            norm_t: factorized.then(|| LayerNormConfig::new(d).init(device)),
            attn_t: factorized.then(attn),
            norm2: LayerNormConfig::new(d).init(device),
            fc1: LinearConfig::new(d, d * self.mlp_ratio).init(device),
            fc2: LinearConfig::new(d * self.mlp_ratio, d).init(device),
            ada: LinearConfig::new(d, n_mod * d)
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }
}

#[derive(Module, Debug)]
struct SelfAttention<B: Backend> {
    qkv: Linear<B>,
    proj: Linear<B>,
}

impl<B: Backend> SelfAttention<B> {
    /// `x`: `[S, L, D]` sequences of length L.
    fn forward(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
        // The heads are read from the packed projection in place (on the CPU backend).
        let qkv = linear(&self.qkv, x); // [S, L, 3D]
        linear(&self.proj, dws_kernels::self_attention(qkv, heads, false))
    }
}

#[derive(Module, Debug)]
struct Block<B: Backend> {
    norm1: LayerNorm<B>,
    attn: SelfAttention<B>,
    /// Temporal attention of the factorised layout.
    norm_t: Option<LayerNorm<B>>,
    attn_t: Option<SelfAttention<B>>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    /// Per-frame (shift, scale, gate) for each sub-layer, from the time embedding; zero-
    /// initialised, so every block starts as the identity (adaLN-Zero).
    ada: Linear<B>,
}

/// `norm(x) * (1 + scale) + shift` with per-frame modulation `[B, F, 1, D]`.
/// `x · (1 + scale) + shift`, fused on the CPU backend.
fn modulate<B: Backend>(x: Tensor<B, 4>, shift: Tensor<B, 4>, scale: Tensor<B, 4>) -> Tensor<B, 4> {
    dws_kernels::modulate(x, shift, scale)
}

/// `h · gate` for per-frame gate rows `[B, F, 1, D]`: the fused modulation with no shift
/// (a broadcast multiply would take the CPU backend's slow strided path).
fn gated<B: Backend>(h: Tensor<B, 4>, gate: Tensor<B, 4>) -> Tensor<B, 4> {
    let zeros = gate.zeros_like();
    dws_kernels::modulate(h, zeros, gate - 1.0)
}

impl<B: Backend> Block<B> {
    /// `x`: `[B, F, N, D]`, `temb`: `[B, F, D]`.
    fn forward(&self, x: Tensor<B, 4>, temb: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
        let [b, f, n, d] = x.dims();
        let m = linear(&self.ada, silu(temb)); // [B, F, k*D]
        let part = |i: usize| m.clone().narrow(2, i * d, d).unsqueeze_dim::<4>(2); // [B, F, 1, D]
                                                                                   // Spatial (or full) attention.
        let h = modulate(layer_norm(&self.norm1, x.clone()), part(0), part(1));
        let h = match (&self.attn_t, &self.norm_t) {
            (Some(_), _) => self
                .attn
                .forward(h.reshape([b * f, n, d]), heads)
                .reshape([b, f, n, d]),
            _ => self
                .attn
                .forward(h.reshape([b, f * n, d]), heads)
                .reshape([b, f, n, d]),
        };
        let mut x = x + gated(h, part(2));
        let mut next = 3;
        if let (Some(attn_t), Some(norm_t)) = (&self.attn_t, &self.norm_t) {
            let h = modulate(layer_norm(norm_t, x.clone()), part(3), part(4));
            let h = h.swap_dims(1, 2).reshape([b * n, f, d]); // [B*N, F, D]
            let h = attn_t
                .forward(h, heads)
                .reshape([b, n, f, d])
                .swap_dims(1, 2);
            x = x + gated(h, part(5));
            next = 6;
        }
        let h = modulate(
            layer_norm(&self.norm2, x.clone()),
            part(next),
            part(next + 1),
        );
        let h = linear(&self.fc2, gelu(linear(&self.fc1, h)));
        x + gated(h, part(next + 2))
    }
}

/// The video transformer.
#[derive(Module, Debug)]
pub struct FlowDit<B: Backend> {
    patch_embed: Linear<B>,
    /// Embedding of the last context frame's patches (see [`FlowDitConfig::anchor_input`]).
    anchor_embed: Option<Linear<B>>,
    pos_space: Param<Tensor<B, 2>>,
    pos_time: Param<Tensor<B, 2>>,
    time_in: Linear<B>,
    time_out: Linear<B>,
    blocks: Vec<Block<B>>,
    /// One DWS module per block (empty for an action-free base model).
    pub action_modules: Vec<ActionModule<B>>,
    final_norm: LayerNorm<B>,
    final_mod: Linear<B>,
    final_proj: Linear<B>,
    /// Per-token output gate (see [`FlowDitConfig::output_gate`]).
    gate: Option<Linear<B>>,
    /// Per-token displacement (see [`FlowDitConfig::warp`]).
    warp: Option<Linear<B>>,
    /// Linear path from the input patches to the output. In pixel space a patch has
    /// more values (p*p*C) than the token width, and the velocity carries the noise of
    /// every value: without this path the transformer's width caps what it can predict.
    skip: Option<Linear<B>>,
    patch: usize,
    heads: usize,
    factorized: bool,
    time_freqs: usize,
}

/// Sine-cosine features of positions `0..n` (`[n, d]`, half sines, half cosines), the
/// starting value of the learned positions: nearby positions start with similar vectors,
/// so attention can find a token's neighbours from the first step (with small random
/// positions it has to learn the layout from scratch).
fn sincos(n: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    let mut out = vec![0f32; n * d];
    for p in 0..n {
        for i in 0..half {
            let freq = (-(10_000f32.ln()) * i as f32 / half as f32).exp();
            out[p * d + i] = (p as f32 * freq).sin();
            out[p * d + half + i] = (p as f32 * freq).cos();
        }
    }
    out
}

fn sincos_1d<B: Backend>(n: usize, d: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(sincos(n, d), [n, d]), device)
}

/// Rows and columns of a `side x side` grid, each in half of the width.
fn sincos_2d<B: Backend>(side: usize, d: usize, device: &B::Device) -> Tensor<B, 2> {
    let half = d / 2;
    let axis = sincos(side, half);
    let mut out = vec![0f32; side * side * d];
    for r in 0..side {
        for c in 0..side {
            let o = (r * side + c) * d;
            out[o..o + half].copy_from_slice(&axis[r * half..(r + 1) * half]);
            out[o + half..o + d].copy_from_slice(&axis[c * half..(c + 1) * half]);
        }
    }
    Tensor::from_data(TensorData::new(out, [side * side, d]), device)
}

/// Sinusoidal features of flow times `[B, F]` in [0, 1] → `[B, F, freqs]`.
fn time_features<B: Backend>(t: Tensor<B, 2>, freqs: usize) -> Tensor<B, 3> {
    let half = freqs / 2;
    let device = t.device();
    let k: Vec<f32> = (0..half)
        .map(|i| (-(10_000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let k = Tensor::<B, 1>::from_data(TensorData::new(k, [half]), &device).reshape([1, 1, half]);
    let arg = t.unsqueeze_dim::<3>(2) * 1000.0 * k; // [B, F, half]
    Tensor::cat(vec![arg.clone().cos(), arg.sin()], 2)
}

impl<B: Backend> FlowDit<B> {
    /// Attaches one zero-initialised DWS action module per block.
    pub fn attach_action_modules(mut self, cond_dim: usize, device: &B::Device) -> Self {
        let d = self.pos_space.dims()[1];
        let cfg = ActionModuleConfig::new(d, cond_dim, d);
        self.action_modules = (0..self.blocks.len()).map(|_| cfg.init(device)).collect();
        self
    }

    pub fn has_action_modules(&self) -> bool {
        !self.action_modules.is_empty()
    }

    /// `[B, F, C, H, W]` → `[B, F, N, p*p*C]`.
    fn patchify(&self, x: Tensor<B, 5>) -> Tensor<B, 4> {
        let [b, f, c, h, w] = x.dims();
        let p = self.patch;
        let (hp, wp) = (h / p, w / p);
        // [BF, hp, wp, p, p, C]
        permute(x.reshape([b * f, c, hp, p, wp, p]), [0, 2, 4, 3, 5, 1]).reshape([
            b,
            f,
            hp * wp,
            p * p * c,
        ])
    }

    /// Inverse of [`Self::patchify`].
    fn unpatchify(&self, x: Tensor<B, 4>, c: usize, h: usize, w: usize) -> Tensor<B, 5> {
        let [b, f, _, _] = x.dims();
        let p = self.patch;
        let (hp, wp) = (h / p, w / p);
        // [BF, C, hp, p, wp, p]
        permute(x.reshape([b * f, hp, wp, p, p, c]), [0, 5, 1, 3, 2, 4]).reshape([b, f, c, h, w])
    }

    /// The network's output for frames `x` `[B, F, C, H, W]` at per-frame flow times `t`
    /// `[B, F]`, conditioned on per-frame action embeddings `cond` `[B, F, Dc]` when the
    /// model has action modules: `[B, F, C, H, W]` (see `flow.rs` for how it is read).
    pub fn forward(
        &self,
        x: Tensor<B, 5>,
        t: Tensor<B, 2>,
        cond: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 5> {
        self.forward_parts(x, t, cond, None).0
    }

    /// Whether [`Self::forward_parts`] needs the anchor frames.
    pub fn takes_anchor(&self) -> bool {
        self.anchor_embed.is_some()
    }

    /// [`Self::forward`] and, for a model with the warp head, the per-pixel displacement
    /// field `[B, F, 2, H, W]` in pixels (x then y; output pixel p is read from p + d).
    /// `anchor` (`[B, F, C, H, W]`, the last clean context frame at every position) is
    /// read by a model with [`FlowDitConfig::anchor_input`] only, and it panics without.
    pub fn forward_parts(
        &self,
        x: Tensor<B, 5>,
        t: Tensor<B, 2>,
        cond: Option<Tensor<B, 3>>,
        anchor: Option<Tensor<B, 5>>,
    ) -> (Tensor<B, 5>, Option<Tensor<B, 5>>) {
        let [_, f, c, h, w] = x.dims();
        let patches = self.patchify(x); // [B, F, N, p*p*C]
        let mut tokens = linear(&self.patch_embed, patches.clone()); // [B, F, N, D]
        if let Some(embed) = &self.anchor_embed {
            let anchor = anchor.expect("a model with anchor_input needs the anchor frames");
            tokens = tokens + linear(embed, self.patchify(anchor));
        }
        let [_, _, n, d] = tokens.dims();
        let pos = self.pos_space.val().reshape([1, 1, n, d])
            + self.pos_time.val().narrow(0, 0, f).reshape([1, f, 1, d]);
        let mut x = tokens + pos;
        let temb = linear(
            &self.time_out,
            silu(linear(&self.time_in, time_features(t, self.time_freqs))),
        ); // [B, F, D]
        for (i, block) in self.blocks.iter().enumerate() {
            if let (Some(module), Some(c)) = (self.action_modules.get(i), cond.as_ref()) {
                x = module.forward(x, c.clone());
            }
            x = block.forward(x, temb.clone(), self.heads);
        }
        let m = linear(&self.final_mod, silu(temb));
        let shift = m.clone().narrow(2, 0, d).unsqueeze_dim::<4>(2);
        let scale = m.narrow(2, d, d).unsqueeze_dim::<4>(2);
        let top = modulate(layer_norm(&self.final_norm, x), shift, scale);
        let mut out = match &self.gate {
            Some(gate) => {
                linear(&self.final_proj, top.clone()) * sigmoid(linear(gate, top.clone()))
            }
            None => linear(&self.final_proj, top.clone()),
        };
        if let Some(skip) = &self.skip {
            out = out + linear(skip, patches);
        }
        let field = self.warp.as_ref().map(|head| {
            let [b, _, _, _] = top.dims();
            let (hp, wp) = (h / self.patch, w / self.patch);
            let d = linear(head, top) * WARP_SCALE; // [B, F, N, 2]
            let d = permute(d.reshape([b * f, hp, wp, 2]), [0, 3, 1, 2]); // [BF, 2, hp, wp]
            upsample_bilinear(d, h, w).reshape([b, f, 2, h, w])
        });
        (self.unpatchify(out, c, h, w), field)
    }
}

/// Bilinear upsampling of `[N, C, h, w]` to `[N, C, out_h, out_w]` with half-pixel
/// alignment (each input value sits at its cell's centre; `align_corners = false`, edges
/// clamped), as two matrix products. Equal to burn's bilinear `interpolate`, whose
/// backward CubeCL backends (CUDA) do not implement.
pub fn upsample_bilinear<B: Backend>(x: Tensor<B, 4>, out_h: usize, out_w: usize) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let device = x.device();
    // [n_in, n_out]: output cell o mixes the two input cells its centre lies between.
    let weights = |n_in: usize, n_out: usize| {
        let mut m = vec![0.0f32; n_in * n_out];
        for o in 0..n_out {
            let src = ((o as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let l = src - i0 as f32;
            m[i0 * n_out + o] += 1.0 - l;
            m[i1 * n_out + o] += l;
        }
        Tensor::<B, 2>::from_data(TensorData::new(m, [n_in, n_out]), &device)
    };
    let rows = x.reshape([n * c * h, w]).matmul(weights(w, out_w)); // [NCh, out_w]
    let cols = permute(rows.reshape([n * c, h, out_w]), [0, 2, 1])
        .reshape([n * c * out_w, h])
        .matmul(weights(h, out_h)); // [NC out_w, out_h]
    permute(cols.reshape([n * c, out_w, out_h]), [0, 2, 1]).reshape([n, c, out_h, out_w])
}

/// Frames `[B, F, C, H, W]` blurred by a Gaussian of `sigma` pixels (separable, as two
/// matrix products; the kernel is cut at 3 sigma and renormalised at the borders).
pub fn gaussian_blur<B: Backend>(x: Tensor<B, 5>, sigma: f32) -> Tensor<B, 5> {
    let [b, f, c, h, w] = x.dims();
    let device = x.device();
    let radius = (3.0 * sigma).ceil() as isize;
    // [n, n]: column o is the kernel centred on o.
    let kernel = |n: usize| {
        let mut m = vec![0.0f32; n * n];
        for o in 0..n as isize {
            let lo = (o - radius).max(0);
            let hi = (o + radius).min(n as isize - 1);
            let g = |i: isize| (-((i - o) as f32).powi(2) / (2.0 * sigma * sigma)).exp();
            let total: f32 = (lo..=hi).map(g).sum();
            for i in lo..=hi {
                m[i as usize * n + o as usize] = g(i) / total;
            }
        }
        Tensor::<B, 2>::from_data(TensorData::new(m, [n, n]), &device)
    };
    let n = b * f * c;
    let rows = x.reshape([n * h, w]).matmul(kernel(w)); // blurred along x
    rows.reshape([n, h, w])
        .swap_dims(1, 2)
        .reshape([n * w, h])
        .matmul(kernel(h)) // along y
        .reshape([n, w, h])
        .swap_dims(1, 2)
        .reshape([b, f, c, h, w])
}

/// Warps frames `[B, F, C, H, W]` by per-pixel displacements `[B, F, 2, H, W]` (pixels;
/// output pixel p is read, bilinearly, from p + d; reads past the edge take the edge).
pub fn warp<B: Backend>(frames: Tensor<B, 5>, field: Tensor<B, 5>) -> Tensor<B, 5> {
    let [b, f, c, h, w] = frames.dims();
    let device = frames.device();
    // Pixel centres in grid_sample's [-1, 1] coordinates (align_corners = false).
    let mut base = Vec::with_capacity(h * w * 2);
    for y in 0..h {
        for x in 0..w {
            base.push((2 * x + 1) as f32 / w as f32 - 1.0);
            base.push((2 * y + 1) as f32 / h as f32 - 1.0);
        }
    }
    let base = Tensor::<B, 4>::from_data(TensorData::new(base, [1, h, w, 2]), &device);
    let scale = Tensor::<B, 1>::from_data(
        TensorData::new(vec![2.0 / w as f32, 2.0 / h as f32], [2]),
        &device,
    )
    .reshape([1, 1, 1, 2]);
    let grid = base + permute(field.reshape([b * f, 2, h, w]), [0, 2, 3, 1]) * scale;
    let options = GridSampleOptions::new(InterpolateMode::Bilinear)
        .with_padding_mode(GridSamplePaddingMode::Border)
        .with_align_corners(false);
    frames
        .reshape([b * f, c, h, w])
        .grid_sample_2d(grid, options)
        .reshape([b, f, c, h, w])
}
