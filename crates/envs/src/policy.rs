//! Data-collection policies: uniform random actions for any env, and a scripted pusher
//! for the pushing task that makes random arm motions with frequent pushes, like the
//! random arm motions of the BAIR robot-pushing data.

use crate::push::PushEnv;
use crate::{Action, ActionSpace, Env, EnvError, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which policy `dws collect --policy` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Random,
    Scripted,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(PolicyKind::Random),
            "scripted" => Ok(PolicyKind::Scripted),
            _ => Err(format!("unknown policy `{s}`: use random or scripted")),
        }
    }
}

/// Chooses actions from the env's current state; one instance per episode stream.
pub trait Policy: Send {
    /// Called at the start of every episode.
    fn reset(&mut self) {}
    fn act(&mut self, env: &dyn Env, rng: &mut ChaCha8Rng) -> Result<Action>;
}

/// Builds a policy for an env, refusing combinations that do not exist.
pub fn make_policy(kind: PolicyKind, env: &dyn Env) -> Result<Box<dyn Policy>> {
    match kind {
        PolicyKind::Random => Ok(Box::new(RandomPolicy)),
        PolicyKind::Scripted if env.as_any().is::<PushEnv>() => {
            Ok(Box::new(ScriptedPusher::default()))
        }
        PolicyKind::Scripted => Err(EnvError::BadOption {
            id: env.spec().id.clone(),
            detail: "no scripted policy for this env (only `push` has one); use --policy random"
                .into(),
        }),
    }
}

/// Uniform random actions.
pub struct RandomPolicy;

/// A uniform sample from an action space.
pub fn sample_action(space: &ActionSpace, rng: &mut ChaCha8Rng) -> Action {
    match space {
        ActionSpace::Discrete { n } => Action::Discrete(rng.gen_range(0..*n as u32)),
        ActionSpace::Continuous { dim, low, high } => {
            Action::Continuous((0..*dim).map(|_| rng.gen_range(*low..=*high)).collect())
        }
    }
}

impl Policy for RandomPolicy {
    fn act(&mut self, env: &dyn Env, rng: &mut ChaCha8Rng) -> Result<Action> {
        Ok(sample_action(&env.spec().action_space, rng))
    }
}

/// Random waypoints for the end-effector; most of them line up a push of a random object
/// in a random direction (approach from behind, then move through it).
#[derive(Default)]
pub struct ScriptedPusher {
    waypoints: Vec<[f32; 2]>,
    patience: u32,
}

impl ScriptedPusher {
    fn plan(&mut self, env: &PushEnv, rng: &mut ChaCha8Rng) {
        let limit = env.ee_limit() - 0.02;
        let clamp = |p: [f32; 2]| [p[0].clamp(-limit, limit), p[1].clamp(-limit, limit)];
        self.waypoints.clear();
        let objects = env.object_positions();
        if rng.gen_bool(0.7) && !objects.is_empty() {
            let o = objects[rng.gen_range(0..objects.len())];
            let t: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
            let (dx, dy) = (t.cos(), t.sin());
            let push = rng.gen_range(0.2..0.5f32);
            // Pushed last first: waypoints are popped from the end.
            self.waypoints
                .push(clamp([o[0] + dx * push, o[1] + dy * push]));
            self.waypoints
                .push(clamp([o[0] - dx * 0.28, o[1] - dy * 0.28]));
        } else {
            self.waypoints
                .push([rng.gen_range(-limit..limit), rng.gen_range(-limit..limit)]);
        }
        self.patience = 40;
    }
}

impl Policy for ScriptedPusher {
    fn reset(&mut self) {
        self.waypoints.clear();
    }

    fn act(&mut self, env: &dyn Env, rng: &mut ChaCha8Rng) -> Result<Action> {
        let env = env
            .as_any()
            .downcast_ref::<PushEnv>()
            .ok_or_else(|| EnvError::Library("the scripted pusher only drives `push`".into()))?;
        let ee = env.ee_position();
        while let Some(w) = self.waypoints.last() {
            let d = ((w[0] - ee[0]).powi(2) + (w[1] - ee[1]).powi(2)).sqrt();
            if d < 0.05 || self.patience == 0 {
                self.waypoints.pop();
                self.patience = 40;
            } else {
                break;
            }
        }
        if self.waypoints.is_empty() {
            self.plan(env, rng);
        }
        self.patience = self.patience.saturating_sub(1);
        let w = *self.waypoints.last().expect("planned");
        let step = env.config().max_speed * env.config().dt;
        let speed = rng.gen_range(0.5..0.9f32);
        let a: Vec<f32> = (0..2)
            .map(|k| {
                let v = ((w[k] - ee[k]) / step).clamp(-speed, speed);
                (v + rng.gen_range(-0.15..0.15f32)).clamp(-1.0, 1.0)
            })
            .collect();
        Ok(Action::Continuous(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PushConfig;
    use rand::SeedableRng;

    #[test]
    fn scripted_pusher_moves_objects_on_most_episodes() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut env = PushEnv::new(PushConfig::default());
        let mut moved = 0;
        for ep in 0..10 {
            env.reset(Some(ep)).unwrap();
            let mut policy = make_policy(PolicyKind::Scripted, &env).unwrap();
            let start = env.object_positions();
            loop {
                let a = policy.act(&env, &mut rng).unwrap();
                if env.step(&a).unwrap().done() {
                    break;
                }
            }
            let end = env.object_positions();
            if start
                .iter()
                .zip(&end)
                .any(|(a, b)| (a[0] - b[0]).hypot(a[1] - b[1]) > 0.05)
            {
                moved += 1;
            }
        }
        assert!(moved >= 7, "objects moved in only {moved} of 10 episodes");
    }
}
