//! Video world models with DWS (Dynamic World Simulation, He et al., AAAI 2026).
//!
//! - [`flow_dit`]: a flow-matching video transformer (Wan2.1 / Open-Sora family);
//! - [`action_module`]: the DWS action-conditioned module (paper eq. 1);
//! - [`embedders`]: language-template (MiniLM), linear and table action embedders;
//! - [`motion_loss`]: the motion-reinforced weights (paper eqs. 2-3);
//! - [`flow`]: rectified-flow loss, Euler sampler, autoregressive rollout;
//! - [`minilm`]: the all-MiniLM-L6-v2 text encoder;
//! - [`vq`] and [`ar`]: the VQ frame tokenizer and the LLaMA-style token transformer of
//!   the autoregressive (iVideoGPT) family.
//!
//! Model code is generic over burn's `Backend`; the binary picks CPU (Flex) or CUDA.

pub mod action_module;
pub mod ar;
pub mod ar_world;
pub mod checkpoint;
pub mod embedders;
pub mod flow;
pub mod flow_dit;
pub mod minilm;
pub mod motion_loss;
pub mod reward;
pub mod train;
pub mod vq;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("weights {path}: {detail}")]
    Weights { path: PathBuf, detail: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Asset(#[from] dws_assets::AssetError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
