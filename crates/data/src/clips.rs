//! Uniform sampling of fixed-length clips from episodes in memory.

use crate::{Actions, DataError, Dataset, Episode, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A batch of clips of `len` frames.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipBatch {
    pub batch: usize,
    /// Frames per clip.
    pub len: usize,
    pub frame_shape: [usize; 3],
    /// `[B, T, H, W, 3]` u8.
    pub frames: Vec<u8>,
    /// `[B, T-1]` ids or `[B, T-1, D]` floats: action `t` leads from frame `t` to `t+1`.
    pub actions: Actions,
    /// `[B, T-1]`.
    pub rewards: Vec<f32>,
    /// `[B, T-1]`.
    pub terminated: Vec<u8>,
    /// `[B, T-1]`.
    pub truncated: Vec<u8>,
}

/// Samples clips uniformly over every valid (episode, start) pair.
pub struct ClipSampler {
    episodes: Vec<Episode>,
    len: usize,
    /// `cumulative[i]` = number of valid starts in episodes `0..=i`.
    cumulative: Vec<u64>,
    frame_shape: [usize; 3],
}

impl ClipSampler {
    /// Loads every episode of `dataset` (checked) and prepares clips of `len` frames.
    /// Where the dataset's env does not render terminal states, the repeated last frame
    /// of a terminated episode is never part of a clip.
    pub fn from_dataset(dataset: &Dataset, len: usize) -> Result<Self> {
        let mut episodes = dataset.read_all()?;
        if !dataset.header().final_frame_rendered {
            for ep in &mut episodes {
                if ep.terminated.last() == Some(&1) {
                    drop_last_step(ep);
                }
            }
        }
        Self::new(episodes, len)
    }

    pub fn new(episodes: Vec<Episode>, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(DataError::Invalid("clip length must be at least 1".into()));
        }
        let frame_shape = episodes
            .first()
            .map(|e| e.frame_shape)
            .ok_or_else(|| DataError::Invalid("no episodes to sample clips from".into()))?;
        let mut total = 0u64;
        let cumulative = episodes
            .iter()
            .map(|e| {
                total += (e.num_frames() + 1).saturating_sub(len) as u64;
                total
            })
            .collect();
        if total == 0 {
            return Err(DataError::Invalid(format!(
                "no episode has {len} frames; collect longer episodes or ask for shorter clips"
            )));
        }
        Ok(Self {
            episodes,
            len,
            cumulative,
            frame_shape,
        })
    }

    /// Number of distinct clips.
    pub fn num_clips(&self) -> u64 {
        *self.cumulative.last().expect("non-empty")
    }

    /// Clip `k` of [`Self::num_clips`], as (episode, first frame).
    pub fn locate(&self, k: u64) -> (usize, usize) {
        let ep = self.cumulative.partition_point(|&c| c <= k);
        let before = if ep == 0 { 0 } else { self.cumulative[ep - 1] };
        (ep, (k - before) as usize)
    }

    pub fn sample(&self, batch: usize, rng: &mut ChaCha8Rng) -> ClipBatch {
        let picks: Vec<(usize, usize)> = (0..batch)
            .map(|_| self.locate(rng.gen_range(0..self.num_clips())))
            .collect();
        self.gather(&picks)
    }

    /// Builds a batch from explicit (episode, start) pairs.
    pub fn gather(&self, picks: &[(usize, usize)]) -> ClipBatch {
        let l = self.len;
        let mut frames =
            Vec::with_capacity(picks.len() * l * self.frame_shape.iter().product::<usize>());
        let mut actions = Actions::empty_like(&match &self.episodes[0].actions {
            Actions::Discrete(_) => crate::ActionSpace::Discrete { n: 0 },
            Actions::Continuous { dim, .. } => crate::ActionSpace::Continuous {
                dim: *dim,
                low: 0.0,
                high: 0.0,
            },
        });
        let (mut rewards, mut terminated, mut truncated) = (Vec::new(), Vec::new(), Vec::new());
        for &(e, s) in picks {
            let ep = &self.episodes[e];
            let f = ep.frame_len();
            frames.extend_from_slice(&ep.frames[s * f..(s + l) * f]);
            let steps = s..s + l - 1;
            match (&mut actions, &ep.actions) {
                (Actions::Discrete(out), Actions::Discrete(v)) => {
                    out.extend_from_slice(&v[steps.clone()])
                }
                (Actions::Continuous { data: out, dim }, Actions::Continuous { data, .. }) => {
                    out.extend_from_slice(&data[steps.start * *dim..steps.end * *dim])
                }
                _ => unreachable!("one dataset has one action kind"),
            }
            rewards.extend_from_slice(&ep.rewards[steps.clone()]);
            terminated.extend_from_slice(&ep.terminated[steps.clone()]);
            truncated.extend_from_slice(&ep.truncated[steps]);
        }
        ClipBatch {
            batch: picks.len(),
            len: l,
            frame_shape: self.frame_shape,
            frames,
            actions,
            rewards,
            terminated,
            truncated,
        }
    }
}

/// Removes the final step (its frame repeats the one before; see `final_frame_rendered`).
fn drop_last_step(ep: &mut Episode) {
    if ep.steps() == 0 {
        return;
    }
    let f = ep.frame_len();
    ep.frames.truncate(ep.frames.len() - f);
    ep.rewards.pop();
    ep.terminated.pop();
    ep.truncated.pop();
    match &mut ep.actions {
        Actions::Discrete(v) => {
            v.pop();
        }
        Actions::Continuous { dim, data } => data.truncate(data.len() - *dim),
    }
}
