//! The DWS action-conditioned module (paper eq. 1), applied to the tokens of every frame
//! before each transformer block:
//!
//! `x_i = x_i + FFN(LayerNorm(x_i) * (1 + alpha_i) + beta_i)`,
//!
//! with `(alpha_i, beta_i)` regressed from frame i's action embedding `c_i` by a linear
//! layer. Only the FFN's output layer starts at zero, so a freshly attached module leaves
//! the base model's function unchanged while every new parameter still gets a gradient.

use burn::module::Initializer;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use dws_kernels::{gelu, layer_norm, linear};

#[derive(Config, Debug)]
pub struct ActionModuleConfig {
    /// Token width of the backbone.
    pub width: usize,
    /// Width of the action embedding `c`.
    pub cond_dim: usize,
    /// Hidden width of the FFN.
    pub hidden: usize,
}

#[derive(Module, Debug)]
pub struct ActionModule<B: Backend> {
    norm: LayerNorm<B>,
    /// `c -> [alpha, beta]`.
    modulation: Linear<B>,
    ffn_in: Linear<B>,
    /// Zero-initialised.
    ffn_out: Linear<B>,
}

impl ActionModuleConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> ActionModule<B> {
        ActionModule {
            norm: LayerNormConfig::new(self.width).init(device),
            modulation: LinearConfig::new(self.cond_dim, 2 * self.width).init(device),
            ffn_in: LinearConfig::new(self.width, self.hidden).init(device),
            ffn_out: LinearConfig::new(self.hidden, self.width)
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }
}

impl<B: Backend> ActionModule<B> {
    /// `x`: tokens `[B, F, N, D]`; `c`: action embeddings `[B, F, Dc]`.
    pub fn forward(&self, x: Tensor<B, 4>, c: Tensor<B, 3>) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let m = linear(&self.modulation, c); // [B, F, 2D]
        let alpha = m.clone().narrow(2, 0, d).unsqueeze_dim::<4>(2); // [B, F, 1, D]
        let beta = m.narrow(2, d, d).unsqueeze_dim::<4>(2); // [B, F, 1, D]
        let h = dws_kernels::modulate(layer_norm(&self.norm, x.clone()), beta, alpha);
        x + linear(&self.ffn_out, gelu(linear(&self.ffn_in, h)))
    }
}
