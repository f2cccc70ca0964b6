//! Imagination: a world model stepped as a batched [`VecEnv`], started from real states.
//!
//! - [`WorldModel`] is what the imagined env needs from a simulator: next frames, rewards
//!   and episode ends for a batch of frame histories and actions. The DWS video model
//!   with its reward/termination head implements it; tests use doubles.
//! - [`StartBuffer`] holds real states (each as the `context` frames ending at it) that
//!   imagination may start from, drawn with probability ∝ priority through a
//!   [`SumTree`] (prioritized imagination: priority `(|δ| + ε)^α` from the critic's
//!   latest TD error δ at that state, new states at the current maximum) or uniformly.
//! - [`ImaginedVecEnv`] steps a batch of imagined trajectories for at most `horizon`
//!   steps each; a slot whose trajectory ends starts again from a freshly drawn state.
//!   It records where in its output each trajectory started ([`StartEvent`]), so the TD
//!   errors of a rollout can refresh those states' priorities.

use crate::{Result, RlError};
use dws_data::SumTree;
use dws_envs::{Action, EnvSpec, Step, VecEnv};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One batched step of a simulator.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Imagined {
    /// Next frames `[N, H, W, 3]`.
    pub frames: Vec<u8>,
    pub rewards: Vec<f32>,
    pub terminated: Vec<bool>,
}

/// A simulator the imagined env can step.
pub trait WorldModel {
    /// What the simulated env looks like (action space, frame shape).
    fn spec(&self) -> &EnvSpec;
    /// Frames of history each step is conditioned on.
    fn context(&self) -> usize;
    /// Next frames, rewards and ends for `history` `[N, context, H, W, 3]` and one
    /// action per row.
    fn step(&mut self, history: &[u8], actions: &[Action]) -> Result<Imagined>;
}

/// How imagination picks its start states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Starts {
    /// ∝ (|TD error| + ε)^α.
    Prioritized,
    Uniform,
}

impl std::str::FromStr for Starts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prioritized" => Ok(Starts::Prioritized),
            "uniform" => Ok(Starts::Uniform),
            _ => Err(format!("unknown start mode `{s}`: prioritized or uniform")),
        }
    }
}

/// Real states to start imagination from, a ring of fixed capacity.
#[derive(Debug, Clone)]
pub struct StartBuffer {
    mode: Starts,
    capacity: usize,
    context: usize,
    frame_len: usize,
    /// `[capacity, context, H, W, 3]`.
    histories: Vec<u8>,
    len: usize,
    next: usize,
    tree: SumTree,
    max_priority: f64,
    alpha: f64,
    eps: f64,
}

impl StartBuffer {
    /// `alpha` sharpens priorities (0: uniform, 1: proportional); `eps` keeps every
    /// stored state reachable.
    pub fn new(
        mode: Starts,
        capacity: usize,
        context: usize,
        frame_len: usize,
        alpha: f64,
    ) -> Self {
        assert!(capacity > 0 && context > 0 && frame_len > 0);
        Self {
            mode,
            capacity,
            context,
            frame_len,
            histories: vec![0; capacity * context * frame_len],
            len: 0,
            next: 0,
            tree: SumTree::new(capacity),
            max_priority: 1.0,
            alpha,
            eps: 1e-3,
        }
    }

    pub fn mode(&self) -> Starts {
        self.mode
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Stores a state (its `context` frames, oldest first) at the current maximum
    /// priority, overwriting the oldest when full. Returns its slot.
    pub fn push(&mut self, history: &[u8]) -> usize {
        let h = self.context * self.frame_len;
        assert_eq!(history.len(), h, "a start state is `context` frames");
        let i = self.next;
        self.histories[i * h..(i + 1) * h].copy_from_slice(history);
        self.tree.set(i, self.max_priority);
        self.next = (self.next + 1) % self.capacity;
        self.len = (self.len + 1).min(self.capacity);
        i
    }

    /// The frames of slot `i`.
    pub fn history(&self, i: usize) -> &[u8] {
        let h = self.context * self.frame_len;
        &self.histories[i * h..(i + 1) * h]
    }

    /// Draws a slot: by priority or uniformly, as the buffer's mode says.
    pub fn sample<R: Rng>(&self, rng: &mut R) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        match self.mode {
            Starts::Uniform => Some(rng.gen_range(0..self.len)),
            Starts::Prioritized => self.tree.sample(rng),
        }
    }

    /// Sets slot `i`'s priority from the critic's latest TD error there.
    pub fn update(&mut self, i: usize, td_error: f32) {
        assert!(i < self.len, "slot {i} is empty");
        let e = td_error.abs() as f64;
        let p = if e.is_finite() {
            (e + self.eps).powf(self.alpha)
        } else {
            self.max_priority
        };
        self.max_priority = self.max_priority.max(p);
        self.tree.set(i, p);
    }

    /// The priority of slot `i`.
    pub fn priority(&self, i: usize) -> f64 {
        self.tree.get(i)
    }

    /// Writes the buffer (frames, priorities, ring position) to a safetensors file,
    /// atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let prio: Vec<u8> = (0..self.len)
            .flat_map(|i| self.tree.get(i).to_le_bytes())
            .collect();
        let h = self.context * self.frame_len;
        let frames = &self.histories[..self.len * h];
        let meta = serde_json::json!({
            "mode": self.mode, "capacity": self.capacity, "context": self.context,
            "frame_len": self.frame_len, "len": self.len, "next": self.next,
            "max_priority": self.max_priority, "alpha": self.alpha, "eps": self.eps,
        });
        let views = [
            (
                "histories",
                TensorView::new(Dtype::U8, vec![self.len, h], frames)
                    .map_err(|e| RlError::Io(e.to_string()))?,
            ),
            (
                "priorities",
                TensorView::new(Dtype::F64, vec![self.len], &prio)
                    .map_err(|e| RlError::Io(e.to_string()))?,
            ),
        ];
        let info = std::collections::HashMap::from([("buffer".to_string(), meta.to_string())]);
        let bytes = safetensors::serialize(views, &Some(info))
            .map_err(|e| RlError::Io(format!("{}: {e}", path.display())))?;
        let tmp = path.with_extension("tmp");
        let io = |e: std::io::Error| RlError::Io(format!("{}: {e}", path.display()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a buffer written by [`StartBuffer::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |m: String| RlError::Io(format!("{}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a start buffer ({e})")))?;
        let meta: serde_json::Value = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("buffer"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no start-buffer metadata".into()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let field = |k: &str| meta[k].as_u64().map(|v| v as usize);
        let (Some(capacity), Some(context), Some(frame_len), Some(len), Some(next)) = (
            field("capacity"),
            field("context"),
            field("frame_len"),
            field("len"),
            field("next"),
        ) else {
            return Err(bad("incomplete start-buffer metadata".into()));
        };
        let mode: Starts =
            serde_json::from_value(meta["mode"].clone()).map_err(|e| bad(format!("mode: {e}")))?;
        let alpha = meta["alpha"].as_f64().unwrap_or(1.0);
        let mut buf = Self::new(mode, capacity, context, frame_len, alpha);
        buf.eps = meta["eps"].as_f64().unwrap_or(buf.eps);
        buf.max_priority = meta["max_priority"].as_f64().unwrap_or(1.0);
        let h = context * frame_len;
        let frames = st.tensor("histories").map_err(|e| bad(e.to_string()))?;
        let prio = st.tensor("priorities").map_err(|e| bad(e.to_string()))?;
        if len > capacity
            || next >= capacity.max(1)
            || frames.data().len() != len * h
            || prio.data().len() != len * 8
        {
            return Err(bad("sizes do not match the metadata".into()));
        }
        buf.histories[..len * h].copy_from_slice(frames.data());
        for (i, p) in prio.data().chunks_exact(8).enumerate() {
            let p = f64::from_le_bytes(p.try_into().expect("8 bytes"));
            if !(p.is_finite() && p >= 0.0) {
                return Err(bad(format!("priority {p} of slot {i}")));
            }
            buf.tree.set(i, p);
        }
        buf.len = len;
        buf.next = next;
        Ok(buf)
    }
}

/// Where an imagined trajectory started: its buffer slot and the flat index
/// (`step · N + env`) of its first observation in the steps since the last
/// [`ImaginedVecEnv::take_starts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartEvent {
    pub slot: usize,
    pub index: usize,
}

/// A batch of imagined trajectories behind the [`VecEnv`] API.
pub struct ImaginedVecEnv<'a> {
    model: &'a mut dyn WorldModel,
    starts: &'a StartBuffer,
    spec: EnvSpec,
    n: usize,
    horizon: usize,
    frame_len: usize,
    context: usize,
    /// `[N, context, H, W, 3]`.
    history: Vec<u8>,
    obs: Vec<u8>,
    steps: Vec<Step>,
    /// Last frames of trajectories truncated in the last step, `[N, H, W, 3]`.
    finals: Vec<u8>,
    age: Vec<usize>,
    rng: ChaCha8Rng,
    /// Steps since the last `take_starts`.
    clock: usize,
    events: Vec<StartEvent>,
}

impl<'a> ImaginedVecEnv<'a> {
    /// `n` trajectories of at most `horizon` steps each, started from `starts`.
    pub fn new(
        model: &'a mut dyn WorldModel,
        starts: &'a StartBuffer,
        n: usize,
        horizon: usize,
    ) -> Result<Self> {
        let spec = model.spec().clone();
        let [h, w, c] = spec.frame_shape;
        let context = model.context();
        if starts.context != context || starts.frame_len != h * w * c {
            return Err(RlError::Config(format!(
                "the start buffer holds {} frames of {} bytes; the model takes {context} of {}",
                starts.context,
                starts.frame_len,
                h * w * c
            )));
        }
        if starts.is_empty() {
            return Err(RlError::Config(
                "imagination needs at least one real start state".into(),
            ));
        }
        if n == 0 || horizon == 0 {
            return Err(RlError::Config(
                "imagination needs n ≥ 1 and horizon ≥ 1".into(),
            ));
        }
        let frame_len = h * w * c;
        Ok(Self {
            model,
            starts,
            spec,
            n,
            horizon,
            frame_len,
            context,
            history: vec![0; n * context * frame_len],
            obs: vec![0; n * frame_len],
            steps: vec![Step::default(); n],
            finals: vec![0; n * frame_len],
            age: vec![0; n],
            rng: ChaCha8Rng::seed_from_u64(0),
            clock: 0,
            events: Vec::new(),
        })
    }

    fn restart(&mut self, i: usize) {
        let slot = self
            .starts
            .sample(&mut self.rng)
            .expect("the buffer is not empty");
        let hl = self.context * self.frame_len;
        self.history[i * hl..(i + 1) * hl].copy_from_slice(self.starts.history(slot));
        let last = &self.starts.history(slot)[hl - self.frame_len..];
        self.obs[i * self.frame_len..(i + 1) * self.frame_len].copy_from_slice(last);
        self.age[i] = 0;
        self.events.push(StartEvent {
            slot,
            index: self.clock * self.n + i,
        });
    }

    /// The trajectory starts since the last call (or reset), and restarts the clock.
    pub fn take_starts(&mut self) -> Vec<StartEvent> {
        self.clock = 0;
        std::mem::take(&mut self.events)
    }
}

impl VecEnv for ImaginedVecEnv<'_> {
    fn num_envs(&self) -> usize {
        self.n
    }

    fn spec(&self) -> &EnvSpec {
        &self.spec
    }

    fn reset(&mut self, seed: u64) -> dws_envs::Result<()> {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        self.clock = 0;
        self.events.clear();
        for i in 0..self.n {
            self.restart(i);
        }
        Ok(())
    }

    fn step(&mut self, actions: &[Action]) -> dws_envs::Result<&[Step]> {
        assert_eq!(actions.len(), self.n, "one action per imagined env");
        let out = self
            .model
            .step(&self.history, actions)
            .map_err(|e| dws_envs::EnvError::Library(format!("world model: {e}")))?;
        let f = self.frame_len;
        if out.frames.len() != self.n * f
            || out.rewards.len() != self.n
            || out.terminated.len() != self.n
        {
            return Err(dws_envs::EnvError::Library(
                "the world model returned a batch of the wrong size".into(),
            ));
        }
        self.clock += 1;
        let hl = self.context * f;
        for i in 0..self.n {
            self.age[i] += 1;
            let step = Step {
                reward: out.rewards[i],
                terminated: out.terminated[i],
                truncated: !out.terminated[i] && self.age[i] >= self.horizon,
            };
            self.steps[i] = step;
            if step.truncated {
                self.finals[i * f..(i + 1) * f].copy_from_slice(&out.frames[i * f..(i + 1) * f]);
            }
            if step.done() {
                self.restart(i);
            } else {
                let hist = &mut self.history[i * hl..(i + 1) * hl];
                hist.copy_within(f.., 0);
                hist[hl - f..].copy_from_slice(&out.frames[i * f..(i + 1) * f]);
                self.obs[i * f..(i + 1) * f].copy_from_slice(&out.frames[i * f..(i + 1) * f]);
            }
        }
        Ok(&self.steps)
    }

    fn obs(&self) -> &[u8] {
        &self.obs
    }

    fn final_frame(&self, i: usize) -> Option<&[u8]> {
        let s = self.steps.get(i)?;
        (s.truncated && !s.terminated)
            .then(|| &self.finals[i * self.frame_len..(i + 1) * self.frame_len])
    }
}
