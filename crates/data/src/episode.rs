//! One episode in memory and its safetensors encoding.

use crate::{ActionSpace, DataError, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// Actions of one episode.
#[derive(Debug, Clone, PartialEq)]
pub enum Actions {
    /// `[T]` action ids.
    Discrete(Vec<u32>),
    /// `[T, dim]` row-major.
    Continuous { dim: usize, data: Vec<f32> },
}

impl Actions {
    pub fn len(&self) -> usize {
        match self {
            Actions::Discrete(v) => v.len(),
            Actions::Continuous { dim, data } => data.len() / (*dim).max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn empty_like(space: &ActionSpace) -> Self {
        match space {
            ActionSpace::Discrete { .. } => Actions::Discrete(Vec::new()),
            ActionSpace::Continuous { dim, .. } => Actions::Continuous {
                dim: *dim,
                data: Vec::new(),
            },
        }
    }
}

/// One episode: `T` steps, `T + 1` frames.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    /// `[T+1, H, W, 3]` u8.
    pub frames: Vec<u8>,
    pub frame_shape: [usize; 3],
    pub actions: Actions,
    /// `[T]`.
    pub rewards: Vec<f32>,
    /// `[T]`, 0 or 1.
    pub terminated: Vec<u8>,
    /// `[T]`, 0 or 1.
    pub truncated: Vec<u8>,
}

impl Episode {
    /// An episode that starts at `first_frame`.
    pub fn new(first_frame: &[u8], frame_shape: [usize; 3], space: &ActionSpace) -> Self {
        Self {
            frames: first_frame.to_vec(),
            frame_shape,
            actions: Actions::empty_like(space),
            rewards: Vec::new(),
            terminated: Vec::new(),
            truncated: Vec::new(),
        }
    }

    pub fn frame_len(&self) -> usize {
        self.frame_shape.iter().product()
    }

    /// Number of steps `T`.
    pub fn steps(&self) -> usize {
        self.rewards.len()
    }

    pub fn num_frames(&self) -> usize {
        self.frames.len() / self.frame_len().max(1)
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        let f = self.frame_len();
        &self.frames[i * f..(i + 1) * f]
    }

    /// Appends one step: the action taken, its outcome and the frame it led to.
    pub fn push_discrete(
        &mut self,
        action: u32,
        reward: f32,
        terminated: bool,
        truncated: bool,
        next: &[u8],
    ) {
        match &mut self.actions {
            Actions::Discrete(v) => v.push(action),
            Actions::Continuous { .. } => panic!("discrete action pushed to a continuous episode"),
        }
        self.push_outcome(reward, terminated, truncated, next);
    }

    pub fn push_continuous(
        &mut self,
        action: &[f32],
        reward: f32,
        terminated: bool,
        truncated: bool,
        next: &[u8],
    ) {
        match &mut self.actions {
            Actions::Continuous { dim, data } => {
                assert_eq!(action.len(), *dim, "action width");
                data.extend_from_slice(action);
            }
            Actions::Discrete(_) => panic!("continuous action pushed to a discrete episode"),
        }
        self.push_outcome(reward, terminated, truncated, next);
    }

    fn push_outcome(&mut self, reward: f32, terminated: bool, truncated: bool, next: &[u8]) {
        assert_eq!(next.len(), self.frame_len(), "frame size");
        self.rewards.push(reward);
        self.terminated.push(terminated as u8);
        self.truncated.push(truncated as u8);
        self.frames.extend_from_slice(next);
    }

    pub fn total_reward(&self) -> f32 {
        self.rewards.iter().sum()
    }

    /// Checks that the arrays agree with each other.
    pub fn validate(&self) -> Result<()> {
        let t = self.steps();
        let bad = |m: String| Err(DataError::BadEpisode(m));
        if self.frame_len() == 0 || !self.frames.len().is_multiple_of(self.frame_len()) {
            return bad(format!(
                "frames hold {} bytes, not whole frames",
                self.frames.len()
            ));
        }
        if self.num_frames() != t + 1 {
            return bad(format!(
                "{} frames for {t} steps (need T+1)",
                self.num_frames()
            ));
        }
        if self.actions.len() != t || self.terminated.len() != t || self.truncated.len() != t {
            return bad("actions, rewards and flags differ in length".into());
        }
        if let Actions::Continuous { dim, data } = &self.actions {
            if *dim == 0 || !data.len().is_multiple_of(*dim) {
                return bad("continuous actions are not whole rows".into());
            }
        }
        Ok(())
    }

    /// Encodes as safetensors with string metadata.
    pub fn to_safetensors(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
        self.validate()?;
        let t = self.steps();
        let [h, w, c] = self.frame_shape;
        let rewards = f32_bytes(&self.rewards);
        let (adtype, ashape, abytes) = match &self.actions {
            Actions::Discrete(v) => (
                Dtype::I64,
                vec![t],
                v.iter()
                    .flat_map(|a| (*a as i64).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            Actions::Continuous { dim, data } => (Dtype::F32, vec![t, *dim], f32_bytes(data)),
        };
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
            TensorView::new(dtype, shape, data).map_err(|e| DataError::BadEpisode(e.to_string()))
        }
        let tensors = vec![
            (
                "frames",
                view(Dtype::U8, vec![t + 1, h, w, c], &self.frames)?,
            ),
            ("actions", view(adtype, ashape, &abytes)?),
            ("rewards", view(Dtype::F32, vec![t], &rewards)?),
            ("terminated", view(Dtype::U8, vec![t], &self.terminated)?),
            ("truncated", view(Dtype::U8, vec![t], &self.truncated)?),
        ];
        safetensors::serialize(tensors, &Some(metadata))
            .map_err(|e| DataError::BadEpisode(e.to_string()))
    }

    /// Decodes and checks against what the manifest promises.
    pub fn from_safetensors(
        bytes: &[u8],
        path: &Path,
        steps: usize,
        frame_shape: [usize; 3],
        space: &ActionSpace,
    ) -> Result<Self> {
        let corrupt = |detail: String| DataError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let get = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let t = st
                .tensor(name)
                .map_err(|_| corrupt(format!("no tensor `{name}`")))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(corrupt(format!(
                    "`{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().to_vec())
        };
        let [h, w, c] = frame_shape;
        let frames = get("frames", Dtype::U8, &[steps + 1, h, w, c])?;
        let actions = match space {
            ActionSpace::Discrete { n } => {
                let raw = get("actions", Dtype::I64, &[steps])?;
                let ids: Vec<u32> = raw
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .map(|a| {
                        if a < 0 || a as usize >= *n {
                            Err(corrupt(format!("action id {a} outside 0..{n}")))
                        } else {
                            Ok(a as u32)
                        }
                    })
                    .collect::<Result<_>>()?;
                Actions::Discrete(ids)
            }
            ActionSpace::Continuous { dim, .. } => Actions::Continuous {
                dim: *dim,
                data: f32_from(&get("actions", Dtype::F32, &[steps, *dim])?),
            },
        };
        let ep = Episode {
            frames,
            frame_shape,
            actions,
            rewards: f32_from(&get("rewards", Dtype::F32, &[steps])?),
            terminated: get("terminated", Dtype::U8, &[steps])?,
            truncated: get("truncated", Dtype::U8, &[steps])?,
        };
        ep.validate().map_err(|e| corrupt(e.to_string()))?;
        Ok(ep)
    }
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}
