//! Batches of envs stepped together with automatic resets (gym3 / envpool style).

use crate::{Action, Env, EnvSpec, Result, Step};

/// A batch of envs. After a step that ends an env's episode, that env is reset at once
/// (continuing its own episode sequence) and its slot of [`VecEnv::obs`] shows the new
/// episode's first frame; the step's flags tell the caller the old episode ended.
pub trait VecEnv {
    fn num_envs(&self) -> usize;
    fn spec(&self) -> &EnvSpec;
    /// Resets env `i` with seed `seed + i`.
    fn reset(&mut self, seed: u64) -> Result<()>;
    /// One action per env.
    fn step(&mut self, actions: &[Action]) -> Result<&[Step]>;
    /// `[N, H, W, 3]` u8.
    fn obs(&self) -> &[u8];
    /// The frame env `i`'s episode ended at in the last step, where the env has it and
    /// the episode was truncated (not terminated): learners bootstrap from its value.
    fn final_frame(&self, _i: usize) -> Option<&[u8]> {
        None
    }
    /// The frame env `i`'s episode ended at in the last step, terminated or truncated,
    /// where the env has it (world models learn the transition into it).
    fn end_frame(&self, _i: usize) -> Option<&[u8]> {
        None
    }
}

/// Steps its envs one after another in the calling thread.
pub struct SyncVecEnv {
    envs: Vec<Box<dyn Env>>,
    obs: Vec<u8>,
    steps: Vec<Step>,
    /// Frames the episodes that ended in the last step ended at, `[N, H, W, 3]`.
    ends: Vec<u8>,
    frame_len: usize,
}

impl SyncVecEnv {
    /// All envs must share one spec.
    pub fn new(envs: Vec<Box<dyn Env>>) -> Result<Self> {
        let first = envs
            .first()
            .ok_or_else(|| crate::EnvError::Library("a VecEnv needs at least one env".into()))?;
        let [h, w, c] = first.spec().frame_shape;
        if envs.iter().any(|e| e.spec() != first.spec()) {
            return Err(crate::EnvError::Library(
                "all envs of a VecEnv must have the same spec".into(),
            ));
        }
        let n = envs.len();
        Ok(Self {
            envs,
            obs: vec![0; n * h * w * c],
            steps: vec![Step::default(); n],
            ends: vec![0; n * h * w * c],
            frame_len: h * w * c,
        })
    }

    fn copy_obs(&mut self, i: usize) {
        let f = self.frame_len;
        self.obs[i * f..(i + 1) * f].copy_from_slice(self.envs[i].obs());
    }
}

impl VecEnv for SyncVecEnv {
    fn num_envs(&self) -> usize {
        self.envs.len()
    }

    fn spec(&self) -> &EnvSpec {
        self.envs[0].spec()
    }

    fn reset(&mut self, seed: u64) -> Result<()> {
        for i in 0..self.envs.len() {
            self.envs[i].reset(Some(seed + i as u64))?;
            self.copy_obs(i);
        }
        Ok(())
    }

    fn step(&mut self, actions: &[Action]) -> Result<&[Step]> {
        assert_eq!(actions.len(), self.envs.len(), "one action per env");
        for (i, action) in actions.iter().enumerate() {
            let step = self.envs[i].step(action)?;
            if step.done() {
                let f = self.frame_len;
                self.ends[i * f..(i + 1) * f].copy_from_slice(self.envs[i].obs());
                self.envs[i].reset(None)?;
            }
            self.steps[i] = step;
            self.copy_obs(i);
        }
        Ok(&self.steps)
    }

    fn obs(&self) -> &[u8] {
        &self.obs
    }

    fn final_frame(&self, i: usize) -> Option<&[u8]> {
        let s = self.steps.get(i)?;
        (s.truncated && !s.terminated).then(|| self.end_frame(i))?
    }

    fn end_frame(&self, i: usize) -> Option<&[u8]> {
        let f = self.frame_len;
        self.steps
            .get(i)?
            .done()
            .then(|| &self.ends[i * f..(i + 1) * f])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{push::PushEnv, PushConfig};

    #[test]
    fn auto_resets_and_matches_single_envs() {
        let cfg = PushConfig {
            max_episode_steps: 5,
            ..Default::default()
        };
        let envs: Vec<Box<dyn Env>> = (0..3)
            .map(|_| Box::new(PushEnv::new(cfg.clone())) as Box<dyn Env>)
            .collect();
        let mut venv = SyncVecEnv::new(envs).unwrap();
        venv.reset(10).unwrap();
        let mut single = PushEnv::new(cfg);
        single.reset(Some(11)).unwrap();
        let frame = 64 * 64 * 3;
        assert_eq!(&venv.obs()[frame..2 * frame], single.obs());
        let a = vec![Action::Continuous(vec![0.5, 0.5]); 3];
        let mut dones = 0;
        for _ in 0..12 {
            let step = single.step(&a[1]).unwrap();
            let last = single.obs().to_vec();
            if step.done() {
                single.reset(None).unwrap();
            }
            let steps = venv.step(&a).unwrap().to_vec();
            dones += steps.iter().filter(|s| s.done()).count();
            assert_eq!(steps[1], step);
            // An ended episode keeps its last frame; a running one shows none.
            if step.done() {
                assert_eq!(venv.end_frame(1), Some(&last[..]));
                assert_eq!(venv.final_frame(1).is_some(), step.truncated);
            } else {
                assert_eq!(venv.end_frame(1), None);
            }
            assert_eq!(&venv.obs()[frame..2 * frame], single.obs());
        }
        // 12 steps of 5-step episodes: two episode ends per env.
        assert_eq!(dones, 6);
    }
}
