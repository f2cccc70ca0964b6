//! Episode datasets on disk, and what reads them.
//!
//! A dataset is a directory: `manifest.json` (format, version, the env, action space,
//! frame shape, and one entry per episode with its size and CRC-32) and one safetensors
//! file per episode:
//!
//! | tensor       | dtype | shape            | meaning                                  |
//! |--------------|-------|------------------|------------------------------------------|
//! | `frames`     | u8    | `[T+1, H, W, 3]` | observations, the first one after reset  |
//! | `actions`    | i64   | `[T]`            | discrete action ids, or                  |
//! | `actions`    | f32   | `[T, D]`         | continuous actions                       |
//! | `rewards`    | f32   | `[T]`            | reward of each step                      |
//! | `terminated` | u8    | `[T]`            | 1 where the episode ended in the env     |
//! | `truncated`  | u8    | `[T]`            | 1 where a step limit cut it              |
//!
//! Action `t` is taken at frame `t` and leads to frame `t+1`. Writes are atomic
//! (temporary file, fsync, rename, then the manifest the same way), so a killed writer
//! loses at most the episode in progress; every read checks sizes, CRC and shapes and
//! names the file when something is wrong.

mod clips;
mod dataset;
mod episode;
mod npz;
mod preview;
pub mod sumtree;
pub mod tfrecord;

pub use clips::{ClipBatch, ClipSampler};
pub use dataset::{Dataset, DatasetHeader, DatasetWriter, EpisodeEntry, Manifest, FORMAT, VERSION};
pub use episode::{Actions, Episode};
pub use npz::export_npz;
pub use preview::{preview_grid, write_png, PreviewOptions};
pub use sumtree::SumTree;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a dws dataset (no manifest.json); make one with `dws collect` or `dws dataset import`")]
    NotADataset { path: PathBuf },
    #[error("manifest {path} is unreadable: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error(
        "manifest {path} has format version {found}; this dws reads versions up to \
         {supported}: upgrade dws to read it"
    )]
    FutureVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error(
        "episode file {path} is truncated or padded: {actual} bytes, the manifest says {expected}"
    )]
    WrongSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error(
        "episode file {path} is damaged: CRC-32 {actual:08x}, the manifest says {expected:08x}"
    )]
    Checksum {
        path: PathBuf,
        actual: u32,
        expected: u32,
    },
    #[error("episode file {path} is malformed: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot add to dataset {path}: {detail}")]
    Incompatible { path: PathBuf, detail: String },
    #[error("invalid episode: {0}")]
    BadEpisode(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.into();
    move |source| DataError::Io {
        action,
        path,
        source,
    }
}

/// The action space of a dataset (the same JSON shape as the env crate's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ActionSpace {
    Discrete { n: usize },
    Continuous { dim: usize, low: f32, high: f32 },
}

impl std::fmt::Display for ActionSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActionSpace::Discrete { n } => write!(f, "discrete:{n}"),
            ActionSpace::Continuous { dim, low, high } => {
                write!(f, "continuous:{dim} in [{low}, {high}]")
            }
        }
    }
}
