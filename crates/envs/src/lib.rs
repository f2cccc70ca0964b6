//! Environments behind one gymnasium-like API.
//!
//! An [`Env`] is reset with an optional seed and stepped with an [`Action`]; after each
//! call its current observation is a u8 RGB frame `[H, W, 3]` read with [`Env::obs`].
//! [`Step`] carries the reward and the `terminated` / `truncated` flags. Every env
//! describes itself with an [`EnvSpec`]: id, action space (discrete with a language
//! template per action, or continuous), frame shape.
//!
//! Families, picked by the id's prefix ([`EnvConfig::parse`]):
//! - `procgen:<game>`: the 16 Procgen games through the official prebuilt `libenv.so`
//!   (fetched by the asset step, loaded with dlopen), 64×64.
//! - `push`: a robot-pushing task in pure Rust (rapier2d physics), continuous 2-D
//!   end-effector velocities, 64×64.
//! - `atari:<game>`: the Arcade Learning Environment, only with the cargo feature `atari`.
//!
//! [`VecEnv`] steps several envs as a batch with automatic resets.

#[cfg(feature = "atari")]
pub mod atari;
pub mod config;
pub mod policy;
pub mod procgen;
pub mod push;
pub mod templates;
pub mod vec_env;

pub use config::{EnvConfig, ProcgenConfig, PushConfig};
pub use policy::{Policy, PolicyKind};
pub use vec_env::{SyncVecEnv, VecEnv};

use serde::{Deserialize, Serialize};
use std::any::Any;

/// Side length of every frame dws produces (frames are `FRAME × FRAME × 3`).
pub const FRAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("unknown environment id `{id}`: {hint}")]
    UnknownEnv { id: String, hint: String },
    #[error("bad option for environment `{id}`: {detail}")]
    BadOption { id: String, detail: String },
    #[error("invalid action {action:?} for {id} (action space: {space})")]
    InvalidAction {
        id: String,
        action: Action,
        space: String,
    },
    #[error("{id}: the episode has ended; call reset before stepping again")]
    NeedsReset { id: String },
    #[error("{0}")]
    Library(String),
    #[error(transparent)]
    Asset(#[from] dws_assets::AssetError),
}

pub type Result<T, E = EnvError> = std::result::Result<T, E>;

/// The actions an env accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ActionSpace {
    /// Action ids `0..n`.
    Discrete { n: usize },
    /// Vectors of `dim` floats, each in `[low, high]`.
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

/// One action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    Discrete(u32),
    Continuous(Vec<f32>),
}

impl ActionSpace {
    /// Whether `action` belongs to this space.
    pub fn contains(&self, action: &Action) -> bool {
        match (self, action) {
            (ActionSpace::Discrete { n }, Action::Discrete(a)) => (*a as usize) < *n,
            (ActionSpace::Continuous { dim, low, high }, Action::Continuous(v)) => {
                v.len() == *dim && v.iter().all(|x| x.is_finite() && *x >= *low && *x <= *high)
            }
            _ => false,
        }
    }
}

/// What an env is: enough to store beside its data and to build models for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvSpec {
    /// The id it was made from, e.g. `procgen:coinrun`.
    pub id: String,
    pub action_space: ActionSpace,
    /// `[H, W, 3]`.
    pub frame_shape: [usize; 3],
    /// One short phrase per discrete action (empty for continuous spaces).
    pub action_templates: Vec<String>,
    /// False where the env never renders its terminal state (Procgen resets inside the
    /// library): the observation after a terminal step then repeats the last frame.
    pub final_frame_rendered: bool,
}

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Step {
    pub reward: f32,
    /// The episode ended inside the environment (goal, death, the game's own limit).
    pub terminated: bool,
    /// The episode was cut by a step limit of ours.
    pub truncated: bool,
}

impl Step {
    pub fn done(&self) -> bool {
        self.terminated || self.truncated
    }
}

/// A single environment (gymnasium-like).
pub trait Env: Send {
    fn spec(&self) -> &EnvSpec;
    /// Starts a new episode. The same seed gives the same episode; `None` continues the
    /// env's own sequence of episodes.
    fn reset(&mut self, seed: Option<u64>) -> Result<()>;
    /// Applies one action. After a step that ends the episode, [`Env::reset`] must be
    /// called before the next step.
    fn step(&mut self, action: &Action) -> Result<Step>;
    /// The current frame, `[H, W, 3]` u8 RGB, row-major.
    fn obs(&self) -> &[u8];
    /// For policies that need the env's internal state (the scripted pusher).
    fn as_any(&self) -> &dyn Any;
    /// Info about the current episode worth storing with it (e.g. Procgen's level seed).
    fn episode_info(&self) -> serde_json::Map<String, serde_json::Value> {
        Default::default()
    }
}

/// Builds an env from its config.
pub fn make(config: &EnvConfig) -> Result<Box<dyn Env>> {
    match config {
        EnvConfig::Procgen(c) => Ok(Box::new(procgen::ProcgenEnv::new(c.clone())?)),
        EnvConfig::Push(c) => Ok(Box::new(push::PushEnv::new(c.clone()))),
        #[cfg(feature = "atari")]
        EnvConfig::Atari(c) => Ok(Box::new(atari::AtariEnv::new(c.clone())?)),
        #[cfg(not(feature = "atari"))]
        EnvConfig::Atari(c) => Err(EnvError::UnknownEnv {
            id: format!("atari:{}", c.game),
            hint: "this dws was built without Atari (the emulator is GPL-2.0 and optional); \
                   rebuild with `cargo build --release --features atari` (needs cmake)"
                .into(),
        }),
    }
}

/// Shorthand: parse an id with no options and build the env.
pub fn make_id(id: &str) -> Result<Box<dyn Env>> {
    make(&EnvConfig::parse(id, &[])?)
}

/// Every env id dws knows, for `--help` and errors.
pub fn known_ids() -> Vec<String> {
    let mut ids: Vec<String> = procgen::GAMES
        .iter()
        .map(|g| format!("procgen:{g}"))
        .collect();
    ids.push("push".into());
    ids.extend(templates::ATARI_GAMES.iter().map(|g| format!("atari:{g}")));
    ids
}
