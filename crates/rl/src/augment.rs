//! Imagined datasets (paper Table 2): a world simulator with its reward/termination
//! model rolls out from real start states, acting with a given policy, and each
//! trajectory becomes an ordinary [`Episode`] (marked imagined by the dataset that
//! holds it), so offline RL can learn from real and imagined transitions alike.
//!
//! Work comes in rounds: round `r` resets an [`ImaginedVecEnv`] of `n` trajectories
//! with a seed made from `r` and steps it `horizon` times; every slot's first
//! trajectory (until the model ends it or the horizon truncates it) is one episode. A
//! round depends on nothing but its seed, so a resumed run redoes a lost round exactly.

use crate::imagine::{ImaginedVecEnv, StartBuffer, Starts, WorldModel};
use crate::replay::Chunk;
use crate::{Result, RlError};
use dws_data::Episode;
use dws_envs::{Action, VecEnv};
use rand::Rng;

/// Start states for imagination from recorded episodes: up to `capacity` states with
/// `context` frames of one episode ending at them, drawn uniformly (reservoir sampling
/// over all such states of all episodes, read one episode at a time).
pub fn starts_from_episodes<R: Rng>(
    episodes: &mut dyn Iterator<Item = std::result::Result<Episode, String>>,
    context: usize,
    capacity: usize,
    width: usize,
    rng: &mut R,
) -> Result<StartBuffer> {
    let mut picked: Vec<(Vec<u8>, Vec<f32>)> = Vec::new();
    let mut seen = 0usize;
    let mut frame_len = 0;
    for ep in episodes {
        let ep = ep.map_err(RlError::Io)?;
        frame_len = ep.frame_len();
        let Some(chunk) = Chunk::from_episode(&ep, 0) else {
            continue;
        };
        for (t, i) in chunk.start_candidates(context) {
            // A state whose episode already ended has nothing to imagine from.
            if t >= ep.steps() {
                continue;
            }
            seen += 1;
            if picked.len() < capacity {
                picked.push(chunk.history(t, i, context));
            } else {
                let j = rng.gen_range(0..seen);
                if j < capacity {
                    picked[j] = chunk.history(t, i, context);
                }
            }
        }
    }
    if picked.is_empty() {
        return Err(RlError::Config(format!(
            "no episode has {context} frames to start imagination from"
        )));
    }
    let mut buf = StartBuffer::new(
        Starts::Uniform,
        picked.len(),
        context,
        frame_len,
        width,
        0.0,
    );
    for (frames, actions) in &picked {
        buf.push(frames, actions);
    }
    Ok(buf)
}

/// One round: `n` trajectories from states drawn (seeded by `seed`) from `starts`, each
/// until the model ends it or for `horizon` steps; `policy` maps frames `[n, H, W, 3]`
/// to one action each.
pub fn imagine_round(
    model: &mut dyn WorldModel,
    starts: &StartBuffer,
    n: usize,
    horizon: usize,
    seed: u64,
    policy: &mut dyn FnMut(&[u8], usize) -> Vec<Action>,
) -> Result<Vec<Episode>> {
    let spec = model.spec().clone();
    let f: usize = spec.frame_shape.iter().product();
    let mut env = ImaginedVecEnv::new(model, starts, n, horizon)?;
    env.reset(seed).map_err(|e| RlError::Env(e.to_string()))?;
    let space = match spec.action_space {
        dws_envs::ActionSpace::Discrete { n } => dws_data::ActionSpace::Discrete { n },
        dws_envs::ActionSpace::Continuous { dim, low, high } => {
            dws_data::ActionSpace::Continuous { dim, low, high }
        }
    };
    let mut episodes: Vec<Episode> = env
        .obs()
        .chunks_exact(f)
        .map(|frame| Episode::new(frame, spec.frame_shape, &space))
        .collect();
    let mut live = vec![true; n];
    for _ in 0..horizon {
        let actions = policy(env.obs(), n);
        if actions.len() != n {
            return Err(RlError::Config(format!(
                "the policy gave {} actions for {n} frames",
                actions.len()
            )));
        }
        let steps = env
            .step(&actions)
            .map_err(|e| RlError::Env(e.to_string()))?
            .to_vec();
        for i in 0..n {
            if !live[i] {
                continue;
            }
            let s = steps[i];
            let next = if s.done() {
                live[i] = false;
                env.end_frame(i)
                    .expect("an ended trajectory keeps its frame")
            } else {
                &env.obs()[i * f..(i + 1) * f]
            };
            match &actions[i] {
                Action::Discrete(a) => {
                    episodes[i].push_discrete(*a, s.reward, s.terminated, s.truncated, next)
                }
                Action::Continuous(v) => {
                    episodes[i].push_continuous(v, s.reward, s.terminated, s.truncated, next)
                }
            }
        }
        if !live.contains(&true) {
            break;
        }
    }
    Ok(episodes)
}

/// The seed of round `round` of a run seeded with `seed`.
pub fn round_seed(seed: u64, round: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(round as u64)
        .rotate_left(17)
}
