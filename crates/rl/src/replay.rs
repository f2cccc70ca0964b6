//! The real-experience replay of model-based RL: every real rollout, kept as a chunk
//! (`[T, N]` steps of `N` envs) with the env's own rewards, episode ends and the frames
//! episodes ended at. The world model trains on clips cut from it, the reward model on
//! its transitions, and imagination starts from states in it.
//!
//! Each chunk is written once to its own safetensors file (`chunk-ITER.safetensors`,
//! atomically) when it arrives, so a killed run loses no experience and a resumed one
//! reads the chunks back up to its checkpoint.

use crate::ppo::{ActionBuf, Rollout};
use crate::{Result, RlError};
use dws_envs::ActionSpace;
use rand::Rng;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// One real rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The update that collected it (1-based).
    pub iteration: usize,
    pub num_envs: usize,
    pub num_steps: usize,
    /// `[T, N, H, W, 3]`: the frames the actions were taken at.
    pub obs: Vec<u8>,
    /// `[T, N, width]`, as the env received them (continuous ones clipped to bounds).
    pub actions: Vec<f32>,
    pub rewards: Vec<f32>,
    pub terminated: Vec<bool>,
    pub dones: Vec<bool>,
    /// The frames episodes ended at, by flat index `t·N + i`.
    pub ends: Vec<(usize, Vec<u8>)>,
}

/// A batch of clips: `frames` `[B, L, H, W, 3]`, `actions` `[B, L - 1, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clips {
    pub batch: usize,
    pub len: usize,
    pub frames: Vec<u8>,
    pub actions: Vec<f32>,
}

/// A batch of transitions: frames before and after `[B, H, W, 3]`, actions
/// `[B, width]`, rewards and termination flags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transitions {
    pub before: Vec<u8>,
    pub after: Vec<u8>,
    pub actions: Vec<f32>,
    pub rewards: Vec<f32>,
    pub terminated: Vec<f32>,
    /// Importance weights making a weighted mean over the batch an unbiased estimate
    /// of the mean over the replay (all 1 for uniform batches).
    pub weights: Vec<f32>,
}

impl Transitions {
    pub fn len(&self) -> usize {
        self.rewards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rewards.is_empty()
    }
}

impl Chunk {
    /// The experience of a rollout collected in `space`.
    pub fn from_rollout(ro: &Rollout, space: &ActionSpace, iteration: usize) -> Self {
        let mut actions = Vec::new();
        match (&ro.actions, space) {
            (ActionBuf::Discrete(ids), _) => actions.extend(ids.iter().map(|&a| a as f32)),
            (ActionBuf::Continuous { values, .. }, ActionSpace::Continuous { low, high, .. }) => {
                actions.extend(values.iter().map(|v| v.clamp(*low, *high)))
            }
            (ActionBuf::Continuous { values, .. }, _) => actions.extend_from_slice(values),
        }
        Self {
            iteration,
            num_envs: ro.num_envs,
            num_steps: ro.num_steps,
            obs: ro.obs.clone(),
            actions,
            rewards: ro.env_rewards.clone(),
            terminated: ro.terminated.clone(),
            dones: ro.dones.clone(),
            ends: ro.end_frames.clone(),
        }
    }

    /// A recorded episode as a chunk of one env: its steps, and its last frame as the
    /// frame it ended at. `None` for an episode without steps.
    pub fn from_episode(ep: &dws_data::Episode, iteration: usize) -> Option<Self> {
        let t = ep.steps();
        if t == 0 {
            return None;
        }
        let f = ep.frame_len();
        let actions = match &ep.actions {
            dws_data::Actions::Discrete(ids) => ids.iter().map(|&a| a as f32).collect(),
            dws_data::Actions::Continuous { data, .. } => data.clone(),
        };
        let dones: Vec<bool> = (0..t)
            .map(|k| ep.terminated[k] > 0 || ep.truncated[k] > 0)
            .collect();
        Some(Self {
            iteration,
            num_envs: 1,
            num_steps: t,
            obs: ep.frames[..t * f].to_vec(),
            actions,
            rewards: ep.rewards.clone(),
            terminated: ep.terminated.iter().map(|&d| d > 0).collect(),
            ends: if dones[t - 1] {
                vec![(t - 1, ep.frame(t).to_vec())]
            } else {
                Vec::new()
            },
            dones,
        })
    }

    fn frame_len(&self) -> usize {
        self.obs.len() / (self.num_steps * self.num_envs).max(1)
    }

    fn width(&self) -> usize {
        self.actions.len() / (self.num_steps * self.num_envs).max(1)
    }

    fn frame(&self, k: usize) -> &[u8] {
        let f = self.frame_len();
        &self.obs[k * f..(k + 1) * f]
    }

    fn action(&self, k: usize) -> &[f32] {
        let w = self.width();
        &self.actions[k * w..(k + 1) * w]
    }

    /// The frame after step `k`: the next observation of the same episode, or the frame
    /// its episode ended at. `None` at the chunk's last step, or where an ended
    /// episode's last frame was not kept.
    fn next_frame(&self, k: usize) -> Option<&[u8]> {
        if self.dones[k] {
            self.ends
                .binary_search_by_key(&k, |e| e.0)
                .ok()
                .map(|j| &self.ends[j].1[..])
        } else if k + self.num_envs < self.obs.len() / self.frame_len().max(1) {
            Some(self.frame(k + self.num_envs))
        } else {
            None
        }
    }

    /// Whether env `i`'s frames at steps `t..t + len` belong to one episode.
    fn one_episode(&self, t: usize, i: usize, len: usize) -> bool {
        t + len <= self.num_steps && (t..t + len - 1).all(|s| !self.dones[s * self.num_envs + i])
    }

    /// Steps `(t, i)` with `context` frames of one episode ending at them: the states
    /// imagination can start from.
    pub fn start_candidates(&self, context: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for t in context.saturating_sub(1)..self.num_steps {
            for i in 0..self.num_envs {
                if self.one_episode(t + 1 - context, i, context) {
                    out.push((t, i));
                }
            }
        }
        out
    }

    /// The `context` frames ending at step `t` of env `i`, and the actions between them.
    pub fn history(&self, t: usize, i: usize, context: usize) -> (Vec<u8>, Vec<f32>) {
        let n = self.num_envs;
        let first = t + 1 - context;
        let mut frames = Vec::with_capacity(context * self.frame_len());
        let mut actions = Vec::with_capacity((context - 1) * self.width());
        for s in first..=t {
            frames.extend_from_slice(self.frame(s * n + i));
            if s < t {
                actions.extend_from_slice(self.action(s * n + i));
            }
        }
        (frames, actions)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let k = self.num_steps * self.num_envs;
        if k == 0 {
            return Err("an empty chunk".into());
        }
        if self.obs.is_empty() || !self.obs.len().is_multiple_of(k) {
            return Err(format!("{} frame bytes for {k} steps", self.obs.len()));
        }
        if self.actions.is_empty() || !self.actions.len().is_multiple_of(k) {
            return Err(format!(
                "{} action floats for {k} steps",
                self.actions.len()
            ));
        }
        if self.rewards.len() != k || self.dones.len() != k || self.terminated.len() != k {
            return Err("rewards or flags do not cover every step".into());
        }
        let f = self.frame_len();
        if self
            .ends
            .iter()
            .any(|(j, fr)| *j >= k || fr.len() != f || !self.dones[*j])
        {
            return Err("an end frame at a step that did not end an episode".into());
        }
        if self.ends.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("end frames out of order".into());
        }
        Ok(())
    }

    /// Writes the chunk atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let err = |e: String| RlError::Io(format!("{}: {e}", path.display()));
        let k = self.num_steps * self.num_envs;
        let f = self.frame_len();
        let floats = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let flags: Vec<u8> = (0..k)
            .map(|j| self.dones[j] as u8 | (self.terminated[j] as u8) << 1)
            .collect();
        let actions = floats(&self.actions);
        let rewards = floats(&self.rewards);
        let end_index: Vec<u8> = self
            .ends
            .iter()
            .flat_map(|(j, _)| (*j as u64).to_le_bytes())
            .collect();
        let end_frames: Vec<u8> = self.ends.iter().flat_map(|(_, fr)| fr.clone()).collect();
        fn view(dt: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
            TensorView::new(dt, shape, data).map_err(|e| RlError::Io(e.to_string()))
        }
        let views = [
            ("obs", view(Dtype::U8, vec![k, f], &self.obs)?),
            (
                "actions",
                view(Dtype::F32, vec![k, self.width()], &actions)?,
            ),
            ("rewards", view(Dtype::F32, vec![k], &rewards)?),
            ("flags", view(Dtype::U8, vec![k], &flags)?),
            (
                "end_index",
                view(Dtype::U64, vec![self.ends.len()], &end_index)?,
            ),
            (
                "end_frames",
                view(Dtype::U8, vec![self.ends.len(), f], &end_frames)?,
            ),
        ];
        let meta = serde_json::json!({
            "iteration": self.iteration, "num_envs": self.num_envs, "num_steps": self.num_steps,
        });
        let info = std::collections::HashMap::from([("chunk".to_string(), meta.to_string())]);
        let bytes = safetensors::serialize(views, &Some(info)).map_err(|e| err(e.to_string()))?;
        crate::write_atomic(path, &bytes)
    }

    /// Reads a chunk written by [`Chunk::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |m: String| RlError::Io(format!("{}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a replay chunk ({e})")))?;
        let meta: serde_json::Value = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("chunk"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no replay-chunk metadata".into()))?;
        let field = |k: &str| {
            meta[k]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("no `{k}` in the metadata")))
        };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str| {
            st.tensor(name)
                .map(|t| t.data().to_vec())
                .map_err(|e| bad(e.to_string()))
        };
        let floats = |v: Vec<u8>| -> Vec<f32> {
            v.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect()
        };
        let flags = get("flags")?;
        let obs = get("obs")?;
        let end_frames = get("end_frames")?;
        let end_index: Vec<usize> = get("end_index")?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .collect();
        let f = obs.len() / flags.len().max(1);
        let chunk = Self {
            iteration: field("iteration")?,
            num_envs: field("num_envs")?,
            num_steps: field("num_steps")?,
            obs,
            actions: floats(get("actions")?),
            rewards: floats(get("rewards")?),
            terminated: flags.iter().map(|b| b & 2 != 0).collect(),
            dones: flags.iter().map(|b| b & 1 != 0).collect(),
            ends: end_index
                .iter()
                .enumerate()
                .map(|(e, &j)| {
                    (
                        j,
                        end_frames.get(e * f..(e + 1) * f).unwrap_or(&[]).to_vec(),
                    )
                })
                .collect(),
        };
        chunk.validate().map_err(bad)?;
        Ok(chunk)
    }
}

/// The newest `capacity` chunks.
#[derive(Debug, Clone)]
pub struct Replay {
    capacity: usize,
    chunks: VecDeque<Chunk>,
}

impl Replay {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            chunks: VecDeque::new(),
        }
    }

    pub fn push(&mut self, chunk: Chunk) {
        if self.chunks.len() == self.capacity {
            self.chunks.pop_front();
        }
        self.chunks.push_back(chunk);
    }

    pub fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.chunks.iter()
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Env steps held.
    pub fn steps(&self) -> usize {
        self.chunks.iter().map(|c| c.num_steps * c.num_envs).sum()
    }

    fn pick<R: Rng>(&self, rng: &mut R) -> &Chunk {
        &self.chunks[rng.gen_range(0..self.chunks.len())]
    }

    /// `batch` clips of `len` frames of one episode each, drawn uniformly; `None` when
    /// the replay holds no such clip (episodes all shorter than `len`).
    pub fn sample_clips<R: Rng>(&self, batch: usize, len: usize, rng: &mut R) -> Option<Clips> {
        if self.chunks.is_empty() || len < 2 {
            return None;
        }
        let mut out = Clips {
            batch,
            len,
            frames: Vec::new(),
            actions: Vec::new(),
        };
        let mut misses = 0;
        while out.frames.len() < batch * len * self.chunks[0].frame_len() {
            let c = self.pick(rng);
            if c.num_steps < len {
                return None;
            }
            let (t, i) = (
                rng.gen_range(0..=c.num_steps - len),
                rng.gen_range(0..c.num_envs),
            );
            if !c.one_episode(t, i, len) {
                misses += 1;
                if misses > 1000 * batch {
                    return None;
                }
                continue;
            }
            let (frames, actions) = c.history(t + len - 1, i, len);
            out.frames.extend(frames);
            out.actions.extend(actions);
        }
        Some(out)
    }

    /// `batch` transitions whose next frame is known. With `balanced`, half of them (as
    /// far as there are any) are rewarded or terminal ones ("events"), which are rare in
    /// most games and would otherwise hardly reach the reward model; the importance
    /// weights then undo the oversampling (an event drawn with probability
    /// `½/|E| + ½/N` stands for `1/N`: weight `2q/(1+q)`, `q = |E|/N`; any other
    /// transition weighs 2), so a model trained on the weighted loss does not learn to
    /// expect rewards more often than they come.
    pub fn sample_transitions<R: Rng>(
        &self,
        batch: usize,
        balanced: bool,
        rng: &mut R,
    ) -> Transitions {
        let mut out = Transitions::default();
        if self.chunks.is_empty() {
            return out;
        }
        let events: Vec<(usize, usize)> = if balanced {
            self.chunks
                .iter()
                .enumerate()
                .flat_map(|(c, ch)| {
                    (0..ch.rewards.len())
                        .filter(move |&k| ch.rewards[k] != 0.0 || ch.terminated[k])
                        .map(move |k| (c, k))
                })
                .collect()
        } else {
            Vec::new()
        };
        let total: usize = self.chunks.iter().map(|c| c.rewards.len()).sum();
        let q = events.len() as f32 / total.max(1) as f32;
        let is_event = |ch: &Chunk, k: usize| ch.rewards[k] != 0.0 || ch.terminated[k];
        let mut misses = 0;
        while out.len() < batch && misses < 1000 * batch.max(1) {
            let (c, k) = if !events.is_empty() && out.len() < batch / 2 {
                events[rng.gen_range(0..events.len())]
            } else {
                let c = rng.gen_range(0..self.chunks.len());
                (c, rng.gen_range(0..self.chunks[c].rewards.len()))
            };
            let ch = &self.chunks[c];
            let Some(next) = ch.next_frame(k) else {
                misses += 1;
                continue;
            };
            out.before.extend_from_slice(ch.frame(k));
            out.after.extend_from_slice(next);
            out.actions.extend_from_slice(ch.action(k));
            out.rewards.push(ch.rewards[k]);
            out.terminated.push(ch.terminated[k] as u8 as f32);
            out.weights
                .push(match (events.is_empty(), is_event(ch, k)) {
                    (true, _) => 1.0,
                    (false, true) => 2.0 * q / (1.0 + q),
                    (false, false) => 2.0,
                });
        }
        out
    }

    /// Where chunk `iteration` is stored in `dir`.
    pub fn chunk_path(dir: &Path, iteration: usize) -> PathBuf {
        dir.join(format!("chunk-{iteration:08}.safetensors"))
    }

    /// Reads the newest `capacity` chunks of `dir` up to `iteration`, deleting chunks
    /// written after it (a resumed run collects those again).
    pub fn load_dir(dir: &Path, iteration: usize, capacity: usize) -> Result<Self> {
        let found = numbered_files(dir, "chunk-", ".safetensors");
        let mut replay = Self::new(capacity);
        for (it, path) in found {
            if it > iteration {
                std::fs::remove_file(&path)
                    .map_err(|e| RlError::Io(format!("{}: {e}", path.display())))?;
            } else if it + replay.capacity > iteration {
                replay.push(Chunk::load(&path)?);
            }
        }
        Ok(replay)
    }
}

/// Files `PREFIX<number>SUFFIX` in `dir`, by number (none when `dir` is unreadable).
pub fn numbered_files(dir: &Path, prefix: &str, suffix: &str) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let n = name
                        .strip_prefix(prefix)?
                        .strip_suffix(suffix)?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}
