//! Metrics for video prediction, as the world-model literature reports them (DWS paper,
//! Table 1): PSNR, SSIM, LPIPS and FVD.
//!
//! - [`image`]: PSNR and SSIM on RGB frames in [0, 1] (plain Rust, `f64`);
//! - [`lpips`]: LPIPS with AlexNet and the v0.1 linear heads (burn);
//! - [`i3d`]: the Kinetics-400 I3D network whose logits are FVD's features (burn);
//! - [`fvd`]: the Fréchet distance with a careful matrix square root;
//! - [`video`]: checked sets of u8 clips through I3D, and FVD between two sets;
//! - [`pickle`]: a reader for the numpy pickles the reference weights ship as.
//!
//! The networks are generic over burn's `Backend`; weights come from the asset step
//! (`dws assets fetch lpips`, `dws assets fetch i3d`).

pub mod fvd;
pub mod i3d;
pub mod image;
pub mod lpips;
pub mod pickle;
pub mod video;
mod weights;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("weights {path}: {detail}")]
    Weights { path: PathBuf, detail: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Asset(#[from] dws_assets::AssetError),
}

pub type Result<T, E = MetricsError> = std::result::Result<T, E>;
