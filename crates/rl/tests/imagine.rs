//! The imagined VecEnv and the start buffer, against a world model whose answers are
//! known: each frame is one grey level, the "counter", and action `a` adds `a` to it.

use burn::backend::{Autodiff, Flex};
use dws_envs::{Action, ActionSpace, EnvSpec, VecEnv};
use dws_rl::imagine::{Imagined, ImaginedVecEnv, StartBuffer, Starts, WorldModel};
use dws_rl::{EpisodeTracker, Ppo, PpoConfig, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const SIDE: usize = 8;
const F: usize = SIDE * SIDE * 3;

fn frame(v: u8) -> Vec<u8> {
    vec![v; F]
}

struct Counter {
    spec: EnvSpec,
    context: usize,
    /// Every history it was asked about, as counters.
    seen: Vec<Vec<u8>>,
    /// The actions it was given with each.
    seen_actions: Vec<Vec<f32>>,
    end_at: u8,
}

impl Counter {
    fn new(context: usize, end_at: u8) -> Self {
        Self {
            spec: EnvSpec {
                id: "test:counter".into(),
                action_space: ActionSpace::Discrete { n: 3 },
                frame_shape: [SIDE, SIDE, 3],
                action_templates: vec!["stay".into(), "add one".into(), "add two".into()],
                final_frame_rendered: true,
            },
            context,
            seen: Vec::new(),
            seen_actions: Vec::new(),
            end_at,
        }
    }
}

impl WorldModel for Counter {
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }
    fn context(&self) -> usize {
        self.context
    }
    fn step(&mut self, history: &[u8], actions: &[f32]) -> Result<Imagined> {
        let mut out = Imagined::default();
        for (i, acts) in actions.chunks(self.context).enumerate() {
            let h = &history[i * self.context * F..(i + 1) * self.context * F];
            self.seen.push(h.chunks(F).map(|f| f[0]).collect());
            self.seen_actions.push(acts.to_vec());
            let last = h[h.len() - 1];
            let a = acts[self.context - 1];
            let next = last.saturating_add(a as u8);
            out.frames.extend(frame(next));
            out.rewards.push(a);
            out.terminated.push(next >= self.end_at);
        }
        Ok(out)
    }
}

fn buffer(mode: Starts, starts: &[u8]) -> StartBuffer {
    let mut b = StartBuffer::new(mode, 16, 2, F, 1, 1.0);
    for &v in starts {
        // The action between the two frames: the step from v - 1 to v (action 1).
        b.push(&[frame(v.saturating_sub(1)), frame(v)].concat(), &[1.0]);
    }
    b
}

#[test]
fn imagined_steps_shift_the_history_truncate_at_the_horizon_and_restart() {
    let mut model = Counter::new(2, 100);
    let starts = buffer(Starts::Uniform, &[10]);
    let mut env = ImaginedVecEnv::new(&mut model, &starts, 2, 3).unwrap();
    env.reset(0).unwrap();
    assert_eq!(env.obs()[0], 10);
    assert_eq!(env.obs()[F], 10);
    let a = |x: u32, y: u32| vec![Action::Discrete(x), Action::Discrete(y)];
    let s = env.step(&a(1, 2)).unwrap().to_vec();
    assert_eq!((s[0].reward, s[1].reward), (1.0, 2.0));
    assert!(!s[0].done() && !s[1].done());
    assert_eq!((env.obs()[0], env.obs()[F]), (11, 12));
    env.step(&a(1, 0)).unwrap();
    // Third step: the horizon. Both are truncated, their last frames kept, and both
    // start again from the buffer.
    let s = env.step(&a(2, 1)).unwrap().to_vec();
    assert!(s.iter().all(|s| s.truncated && !s.terminated));
    assert_eq!(env.final_frame(0).unwrap()[0], 14);
    assert_eq!(env.final_frame(1).unwrap()[0], 13);
    assert_eq!((env.obs()[0], env.obs()[F]), (10, 10));
    drop(env);
    // The model saw each history with the newest frame last, and the actions after
    // each of its frames: the start's own, then the ones taken.
    assert_eq!(model.seen[0], vec![9, 10]);
    assert_eq!(model.seen[2], vec![10, 11]);
    assert_eq!(model.seen[4], vec![11, 12]);
    assert_eq!(model.seen[5], vec![12, 12]);
    assert_eq!(model.seen_actions[0], vec![1.0, 1.0]);
    assert_eq!(model.seen_actions[1], vec![1.0, 2.0]);
    assert_eq!(model.seen_actions[2], vec![1.0, 1.0]);
    assert_eq!(model.seen_actions[3], vec![2.0, 0.0]);
    assert_eq!(model.seen_actions[4], vec![1.0, 2.0]);
    assert_eq!(model.seen_actions[5], vec![0.0, 1.0]);
}

#[test]
fn terminations_restart_and_start_events_point_at_first_observations() {
    let mut model = Counter::new(2, 12);
    let starts = buffer(Starts::Uniform, &[10]);
    let mut env = ImaginedVecEnv::new(&mut model, &starts, 2, 50).unwrap();
    env.reset(1).unwrap();
    let ev = env.take_starts();
    assert_eq!(ev.iter().map(|e| e.index).collect::<Vec<_>>(), vec![0, 1]);
    // Env 0 reaches 12 in one step (terminated), env 1 stays.
    let s = env
        .step(&[Action::Discrete(2), Action::Discrete(0)])
        .unwrap()
        .to_vec();
    assert!(s[0].terminated && !s[0].truncated && !s[1].done());
    assert!(
        env.final_frame(0).is_none(),
        "a terminated episode is not bootstrapped"
    );
    assert_eq!(
        env.end_frame(0).unwrap()[0],
        12,
        "but its last frame is kept"
    );
    assert!(env.end_frame(1).is_none());
    let ev = env.take_starts();
    // The restart's first observation is env 0's observation at step 1: index 1·2 + 0.
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].slot, ev[0].index), (0, 2));
}

#[test]
fn prioritized_starts_follow_td_errors_and_new_states_enter_at_the_maximum() {
    let mut b = buffer(Starts::Prioritized, &[1, 2, 3, 4]);
    b.update(0, 0.0);
    b.update(1, 1.0);
    b.update(2, 3.0);
    b.update(3, -6.0);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut counts = [0usize; 5];
    let draws = 100_000;
    for _ in 0..draws {
        counts[b.sample(&mut rng).unwrap()] += 1;
    }
    let eps = 1e-3;
    let p = [eps, 1.0 + eps, 3.0 + eps, 6.0 + eps];
    let total: f64 = p.iter().sum();
    for i in 0..4 {
        let want = p[i] / total;
        let got = counts[i] as f64 / draws as f64;
        assert!((got - want).abs() < 0.01, "slot {i}: {got} vs {want}");
    }
    // A new state gets the largest priority seen so far.
    let i = b.push(&[frame(7), frame(8)].concat(), &[1.0]);
    assert_eq!(i, 4);
    assert!((b.priority(4) - (6.0 + eps)).abs() < 1e-12);
    // Uniform mode ignores priorities.
    let mut u = buffer(Starts::Uniform, &[1, 2, 3, 4]);
    u.update(3, 100.0);
    let mut counts = [0usize; 4];
    for _ in 0..40_000 {
        counts[u.sample(&mut rng).unwrap()] += 1;
    }
    assert!(
        counts.iter().all(|&c| (c as f64 - 10_000.0).abs() < 500.0),
        "{counts:?}"
    );
}

#[test]
fn the_start_buffer_survives_a_save_and_load_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = StartBuffer::new(Starts::Prioritized, 3, 2, F, 1, 0.6);
    for v in [5u8, 6, 7, 8] {
        b.push(&[frame(v), frame(v + 1)].concat(), &[v as f32]);
    }
    b.update(1, 2.5);
    let path = dir.path().join("starts.safetensors");
    b.save(&path).unwrap();
    let c = StartBuffer::load(&path).unwrap();
    assert_eq!(c.len(), 3);
    for i in 0..3 {
        assert_eq!(c.history(i), b.history(i));
        assert_eq!(c.actions(i), b.actions(i));
        assert_eq!(c.priority(i), b.priority(i));
    }
    // The ring continues where it was: the next push overwrites slot 1.
    let mut c = c;
    assert_eq!(c.push(&[frame(1), frame(2)].concat(), &[0.0]), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, bytes).unwrap();
    let err = StartBuffer::load(&path).unwrap_err().to_string();
    assert!(err.contains("starts.safetensors"), "{err}");
}

#[test]
fn ppo_bootstraps_truncated_imagined_trajectories_from_their_last_frame() {
    let device = Default::default();
    let mut model = Counter::new(2, 250);
    let starts = buffer(Starts::Uniform, &[40, 80]);
    let mut env = ImaginedVecEnv::new(&mut model, &starts, 3, 1).unwrap();
    env.reset(2).unwrap();
    let config = PpoConfig {
        num_envs: 3,
        num_steps: 2,
        ..PpoConfig::debug()
    };
    let mut ppo = Ppo::<Autodiff<Flex>>::new(
        config.clone(),
        ActionSpace::Discrete { n: 3 },
        SIDE,
        4,
        &device,
    )
    .unwrap();
    let mut tracker = EpisodeTracker::new(3);
    let r = ppo.collect(&mut env, &mut tracker).unwrap();
    // Horizon 1: every step is truncated; each reward is the action's plus γ·V(next).
    for k in 0..r.len() {
        assert!(r.dones[k]);
        let a = match &r.actions {
            dws_rl::ppo::ActionBuf::Discrete(a) => a[k],
            _ => unreachable!(),
        };
        let before = r.obs[k * F];
        let after = frame(before + a as u8);
        let v = ppo.values(&after, 1)[0];
        let want = a as f32 + config.gamma * v;
        assert!(
            (r.rewards[k] - want).abs() < 1e-5,
            "k {k}: {} vs {want}",
            r.rewards[k]
        );
        // And the one-step TD error uses that reward with no further bootstrap.
        assert!((r.td_errors[k] - (r.rewards[k] - r.values[k])).abs() < 1e-5);
    }
}
