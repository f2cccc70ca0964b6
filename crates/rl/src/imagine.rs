//! Imagination: a world model stepped as a batched [`VecEnv`], started from real states.
//!
//! - [`WorldModel`] is what the imagined env needs from a simulator: next frames, rewards
//!   and episode ends for a batch of frame histories and actions. The DWS video model
//!   with its reward/termination head implements it; tests use doubles.
//! - [`StartBuffer`] holds real states (each as the `context` frames ending at it and the
//!   actions taken between them) that
//!   imagination may start from, drawn with probability ∝ priority through a
//!   [`SumTree`] (prioritized imagination: priority `(|δ| + ε)^α` from the critic's
//!   latest TD error δ at that state, new states at the current maximum) or uniformly.
//! - [`ImaginedVecEnv`] steps a batch of imagined trajectories for at most `horizon`
//!   steps each; a slot whose trajectory ends starts again from a freshly drawn state.
//!   It records where in its output each trajectory started ([`StartEvent`]), so the TD
//!   errors of a rollout can refresh those states' priorities.

use crate::{Result, RlError};
use dws_data::SumTree;
use dws_envs::{Action, ActionSpace, EnvSpec, Step, VecEnv};
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
    /// Next frames, rewards and ends for `history` `[N, context, H, W, 3]` (oldest frame
    /// first) and `actions` `[N, context, width]` (see [`action_width`]): the action
    /// taken after each history frame, the last one being the action of this step.
    fn step(&mut self, history: &[u8], actions: &[f32]) -> Result<Imagined>;
}

/// Floats per action in flat action arrays: 1 (the id) for discrete actions, the
/// dimension for continuous ones.
pub fn action_width(space: &ActionSpace) -> usize {
    match space {
        ActionSpace::Discrete { .. } => 1,
        ActionSpace::Continuous { dim, .. } => *dim,
    }
}

/// Appends an action to a flat action array.
pub fn push_action(a: &Action, out: &mut Vec<f32>) {
    match a {
        Action::Discrete(id) => out.push(*id as f32),
        Action::Continuous(v) => out.extend_from_slice(v),
    }
}

/// The action a row of a flat action array holds.
pub fn row_action(space: &ActionSpace, row: &[f32]) -> Action {
    match space {
        ActionSpace::Discrete { .. } => Action::Discrete(row[0] as u32),
        ActionSpace::Continuous { .. } => Action::Continuous(row.to_vec()),
    }
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
    width: usize,
    /// `[capacity, context, H, W, 3]`.
    histories: Vec<u8>,
    /// `[capacity, context - 1, width]`: the actions between the history frames.
    actions: Vec<f32>,
    len: usize,
    next: usize,
    tree: SumTree,
    max_priority: f64,
    alpha: f64,
    eps: f64,
}

impl StartBuffer {
    /// States of `context` frames of `frame_len` bytes, with actions of `width` floats
    /// ([`action_width`]). `alpha` sharpens priorities (0: uniform, 1: proportional);
    /// `eps` keeps every stored state reachable.
    pub fn new(
        mode: Starts,
        capacity: usize,
        context: usize,
        frame_len: usize,
        width: usize,
        alpha: f64,
    ) -> Self {
        assert!(capacity > 0 && context > 0 && frame_len > 0 && width > 0);
        Self {
            mode,
            capacity,
            context,
            frame_len,
            width,
            histories: vec![0; capacity * context * frame_len],
            actions: vec![0.0; capacity * (context - 1) * width],
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

    /// Stores a state (its `context` frames, oldest first, and the `context - 1`
    /// actions between them) at the current maximum priority, overwriting the oldest
    /// when full. Returns its slot.
    pub fn push(&mut self, history: &[u8], actions: &[f32]) -> usize {
        let h = self.context * self.frame_len;
        let a = (self.context - 1) * self.width;
        assert_eq!(history.len(), h, "a start state is `context` frames");
        assert_eq!(actions.len(), a, "a start state has `context - 1` actions");
        let i = self.next;
        self.histories[i * h..(i + 1) * h].copy_from_slice(history);
        self.actions[i * a..(i + 1) * a].copy_from_slice(actions);
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

    /// The actions between the frames of slot `i`, `[context - 1, width]`.
    pub fn actions(&self, i: usize) -> &[f32] {
        let a = (self.context - 1) * self.width;
        &self.actions[i * a..(i + 1) * a]
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
        let a = (self.context - 1) * self.width;
        let frames = &self.histories[..self.len * h];
        let actions: Vec<u8> = self.actions[..self.len * a]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let meta = serde_json::json!({
            "mode": self.mode, "capacity": self.capacity, "context": self.context,
            "frame_len": self.frame_len, "width": self.width, "len": self.len, "next": self.next,
            "max_priority": self.max_priority, "alpha": self.alpha, "eps": self.eps,
        });
        let views = [
            (
                "histories",
                TensorView::new(Dtype::U8, vec![self.len, h], frames)
                    .map_err(|e| RlError::Io(e.to_string()))?,
            ),
            (
                "actions",
                TensorView::new(Dtype::F32, vec![self.len, a], &actions)
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
        crate::write_atomic(path, &bytes)
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
        let (Some(capacity), Some(context), Some(frame_len), Some(width), Some(len), Some(next)) = (
            field("capacity"),
            field("context"),
            field("frame_len"),
            field("width"),
            field("len"),
            field("next"),
        ) else {
            return Err(bad("incomplete start-buffer metadata".into()));
        };
        let mode: Starts =
            serde_json::from_value(meta["mode"].clone()).map_err(|e| bad(format!("mode: {e}")))?;
        let alpha = meta["alpha"].as_f64().unwrap_or(1.0);
        if capacity == 0 || context == 0 || frame_len == 0 || width == 0 {
            return Err(bad("zero sizes in the start-buffer metadata".into()));
        }
        let mut buf = Self::new(mode, capacity, context, frame_len, width, alpha);
        buf.eps = meta["eps"].as_f64().unwrap_or(buf.eps);
        buf.max_priority = meta["max_priority"].as_f64().unwrap_or(1.0);
        let h = context * frame_len;
        let a = (context - 1) * width;
        let frames = st.tensor("histories").map_err(|e| bad(e.to_string()))?;
        let actions = st.tensor("actions").map_err(|e| bad(e.to_string()))?;
        let prio = st.tensor("priorities").map_err(|e| bad(e.to_string()))?;
        if len > capacity
            || next >= capacity
            || frames.data().len() != len * h
            || actions.data().len() != len * a * 4
            || prio.data().len() != len * 8
        {
            return Err(bad("sizes do not match the metadata".into()));
        }
        buf.histories[..len * h].copy_from_slice(frames.data());
        for (dst, v) in buf.actions.iter_mut().zip(actions.data().chunks_exact(4)) {
            *dst = f32::from_le_bytes(v.try_into().expect("4 bytes"));
        }
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
    width: usize,
    /// `[N, context, H, W, 3]`.
    history: Vec<u8>,
    /// `[N, context, width]`: the actions after each history frame (the last row is
    /// filled by each step).
    actions: Vec<f32>,
    obs: Vec<u8>,
    steps: Vec<Step>,
    /// Last frames of trajectories that ended in the last step, `[N, H, W, 3]`.
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
        let width = action_width(&spec.action_space);
        if starts.context != context || starts.frame_len != h * w * c || starts.width != width {
            return Err(RlError::Config(format!(
                "the start buffer holds {} frames of {} bytes and actions of {}; the model takes \
                 {context} of {} and actions of {width}",
                starts.context,
                starts.frame_len,
                starts.width,
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
            width,
            history: vec![0; n * context * frame_len],
            actions: vec![0.0; n * context * width],
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
        let al = self.context * self.width;
        let past = self.starts.actions(slot);
        self.actions[i * al..i * al + past.len()].copy_from_slice(past);
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
        let (al, w) = (self.context * self.width, self.width);
        let mut now = Vec::with_capacity(w);
        for (i, a) in actions.iter().enumerate() {
            now.clear();
            push_action(a, &mut now);
            if now.len() != w {
                return Err(dws_envs::EnvError::InvalidAction {
                    id: self.spec.id.clone(),
                    action: a.clone(),
                    space: self.spec.action_space.to_string(),
                });
            }
            self.actions[(i + 1) * al - w..(i + 1) * al].copy_from_slice(&now);
        }
        let out = self
            .model
            .step(&self.history, &self.actions)
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
            if step.done() {
                self.finals[i * f..(i + 1) * f].copy_from_slice(&out.frames[i * f..(i + 1) * f]);
            }
            if step.done() {
                self.restart(i);
            } else {
                let hist = &mut self.history[i * hl..(i + 1) * hl];
                hist.copy_within(f.., 0);
                self.actions[i * al..(i + 1) * al].copy_within(w.., 0);
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
        (s.truncated && !s.terminated).then(|| self.end_frame(i))?
    }

    fn end_frame(&self, i: usize) -> Option<&[u8]> {
        self.steps
            .get(i)?
            .done()
            .then(|| &self.finals[i * self.frame_len..(i + 1) * self.frame_len])
    }
}
