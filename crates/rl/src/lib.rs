//! Reinforcement learning in dws: actor-critic networks and PPO over any
//! [`dws_envs::VecEnv`], real or imagined by a world model.

pub mod imagine;
pub mod nets;
pub mod ppo;
pub mod run;

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
