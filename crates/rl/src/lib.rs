//! Reinforcement learning in dws: actor-critic networks and PPO over any
//! [`dws_envs::VecEnv`], real or imagined by a world model; model-based RL with
//! prioritized imagination ([`mbrl`]); imagined datasets ([`augment`]); offline RL
//! (BC, CQL, IQL) from real and imagined transitions ([`offline`]).

pub mod augment;
pub mod imagine;
pub mod mbrl;
pub mod nets;
pub mod offline;
pub mod policy;
pub mod ppo;
pub mod replay;
pub mod run;
pub mod sim;

pub use imagine::{ImaginedVecEnv, StartBuffer, Starts, WorldModel};
pub use nets::{ActorCritic, Head, NetConfig};
pub use ppo::{EpisodeEnd, EpisodeTracker, Ppo, PpoConfig, Rollout, UpdateStats};

#[derive(Debug, thiserror::Error)]
pub enum RlError {
    #[error("{0}")]
    Config(String),
    #[error("environment: {0}")]
    Env(String),
    #[error("{0}")]
    Io(String),
}

pub type Result<T, E = RlError> = std::result::Result<T, E>;

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash leaves the
/// old file or the new one, never a torn one.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| RlError::Io(format!("{}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}
