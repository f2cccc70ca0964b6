//! A trained `dws ppo` or `dws mbrl` agent as a data-collection policy (`dws collect
//! --policy ppo:RUN`, the expert of offline RL) and for `dws score`. Actions are
//! sampled from the policy (as the offline Procgen datasets do) or, greedy, its most
//! likely action (the Gaussian's mean for continuous actions).

use crate::nets::{frames_to_input, ActorCritic};
use crate::ppo::{head_for, PpoConfig};
use crate::{Result, RlError};
use burn::prelude::*;
use dws_envs::{Action, ActionSpace, EnvConfig, EnvSpec};
use dws_models::checkpoint;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use std::path::Path;

/// The parts of a `dws ppo` or `dws mbrl` run's `config.json` a policy needs: a PPO
/// run keeps its agent's config at `ppo`, an MBRL run at `mbrl.ppo`.
#[derive(Deserialize)]
struct StoredRun {
    env: EnvConfig,
    ppo: Option<PpoConfig>,
    mbrl: Option<StoredMbrl>,
}

#[derive(Deserialize)]
struct StoredMbrl {
    ppo: PpoConfig,
}

impl StoredRun {
    /// The agent's config and the folder its checkpoints are in.
    fn agent(self, run: &Path) -> Option<(PpoConfig, std::path::PathBuf)> {
        match (self.ppo, self.mbrl) {
            (Some(ppo), None) => Some((ppo, run.to_path_buf())),
            (None, Some(m)) => Some((m.ppo, run.join("agent"))),
            _ => None,
        }
    }
}

/// A PPO agent acting one env step at a time.
pub struct PpoPolicy<B: Backend> {
    model: ActorCritic<B>,
    space: ActionSpace,
    side: usize,
    greedy: bool,
    device: B::Device,
    /// The env the agent was trained on.
    pub trained_on: EnvConfig,
    /// The checkpoint it acts with.
    pub checkpoint: std::path::PathBuf,
}

impl<B: Backend> PpoPolicy<B> {
    /// The newest agent checkpoint of the `dws ppo` or `dws mbrl` run `run`, for envs
    /// shaped like `spec`.
    pub fn load(run: &Path, spec: &EnvSpec, greedy: bool, device: &B::Device) -> Result<Self> {
        let (env, ppo, dir) = read_run(run)?;
        let bad = |m: String| RlError::Config(format!("{}: {m}", run.display()));
        let ckpt = checkpoint::latest(&dir).ok_or_else(|| bad("no checkpoint yet".into()))?;
        if env.id() != spec.id {
            return Err(bad(format!(
                "the agent was trained on {}, not {}",
                env.id(),
                spec.id
            )));
        }
        let [h, w, _] = spec.frame_shape;
        let model = ActorCritic::new(&ppo.net, h, head_for(&spec.action_space), device);
        let model = checkpoint::load_model(model, &ckpt, device)
            .map_err(|e| bad(format!("loading {}: {e}", ckpt.display())))?;
        if h != w {
            return Err(bad(format!("PPO agents take square frames, not {h}×{w}")));
        }
        Ok(Self {
            model,
            space: spec.action_space.clone(),
            side: h,
            greedy,
            device: device.clone(),
            trained_on: env,
            checkpoint: ckpt,
        })
    }
}

/// The env a `dws ppo` or `dws mbrl` run `run` trained its agent on.
pub fn trained_env(run: &Path) -> Result<EnvConfig> {
    read_run(run).map(|(env, _, _)| env)
}

/// A run's env, its agent's config and the folder of the agent's checkpoints.
fn read_run(run: &Path) -> Result<(EnvConfig, PpoConfig, std::path::PathBuf)> {
    let bad = |m: String| RlError::Config(format!("{}: {m}", run.display()));
    let text = std::fs::read_to_string(run.join("config.json"))
        .map_err(|e| bad(format!("not a dws ppo or dws mbrl run (config.json: {e})")))?;
    let stored: StoredRun = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "config.json is not a dws ppo or dws mbrl config ({e})"
        ))
    })?;
    let env = stored.env.clone();
    let (ppo, dir) = stored.agent(run).ok_or_else(|| {
        bad("config.json is not a dws ppo or dws mbrl config (no agent in it)".into())
    })?;
    Ok((env, ppo, dir))
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32")
}

impl<B: Backend> PpoPolicy<B> {
    /// One action per frame of `frames` `[n, H, W, 3]`.
    pub fn act_frames(&self, frames: &[u8], n: usize, rng: &mut ChaCha8Rng) -> Vec<Action> {
        let x = frames_to_input::<B>(frames, n, self.side, &self.device);
        let out = to_vec(self.model.forward(x).0);
        let width = out.len() / n.max(1);
        match &self.space {
            ActionSpace::Discrete { .. } => {
                let picks = if self.greedy {
                    crate::offline::argmax_rows(&out, width)
                } else {
                    crate::offline::sample_rows(&out, width, rng)
                };
                picks.into_iter().map(Action::Discrete).collect()
            }
            ActionSpace::Continuous { low, high, .. } => {
                let std: Vec<f32> = self
                    .model
                    .log_std()
                    .map(|s| to_vec(s).into_iter().map(f32::exp).collect())
                    .unwrap_or_default();
                out.chunks_exact(width)
                    .map(|mean| {
                        let noise = if self.greedy {
                            vec![0.0; width]
                        } else {
                            dws_models::flow::normal(rng, width)
                        };
                        Action::Continuous(
                            mean.iter()
                                .zip(&noise)
                                .zip(&std)
                                .map(|((m, z), s)| (m + s * z).clamp(*low, *high))
                                .collect(),
                        )
                    })
                    .collect()
            }
        }
    }
}

impl<B: Backend> dws_envs::Policy for PpoPolicy<B>
where
    ActorCritic<B>: Send,
    B::Device: Send,
{
    fn act(&mut self, env: &dyn dws_envs::Env, rng: &mut ChaCha8Rng) -> dws_envs::Result<Action> {
        Ok(self.act_frames(env.obs(), 1, rng).remove(0))
    }
}
