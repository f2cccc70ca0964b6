//! PPO against small envs whose best policy is known.

use burn::backend::{Autodiff, Flex};
use dws_envs::{Action, ActionSpace, EnvSpec, Step, VecEnv};
use dws_rl::ppo::{gae, Ppo, PpoConfig};
use dws_rl::run::{self, RunOptions};
use dws_rl::EpisodeTracker;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type B = Autodiff<Flex>;

const SIDE: usize = 16;

/// One-step episodes: the frame is all red or all blue; the right action (discrete: 0 for
/// red, 1 for blue; continuous: +1 for red, −1 for blue) pays 1.
struct ColourBandit {
    spec: EnvSpec,
    colours: Vec<bool>,
    obs: Vec<u8>,
    steps: Vec<Step>,
    rng: ChaCha8Rng,
}

impl ColourBandit {
    fn new(n: usize, space: ActionSpace) -> Self {
        let templates = match space {
            ActionSpace::Discrete { n } => (0..n).map(|i| format!("press {i}")).collect(),
            _ => Vec::new(),
        };
        Self {
            spec: EnvSpec {
                id: "test:colour-bandit".into(),
                action_space: space,
                frame_shape: [SIDE, SIDE, 3],
                action_templates: templates,
                final_frame_rendered: false,
            },
            colours: vec![false; n],
            obs: vec![0; n * SIDE * SIDE * 3],
            steps: vec![Step::default(); n],
            rng: ChaCha8Rng::seed_from_u64(0),
        }
    }

    fn draw(&mut self, i: usize) {
        let red = self.rng.gen::<bool>();
        self.colours[i] = red;
        let px = if red { [220, 30, 30] } else { [30, 30, 220] };
        let f = SIDE * SIDE * 3;
        for p in self.obs[i * f..(i + 1) * f].chunks_exact_mut(3) {
            p.copy_from_slice(&px);
        }
    }
}

impl VecEnv for ColourBandit {
    fn num_envs(&self) -> usize {
        self.colours.len()
    }
    fn spec(&self) -> &EnvSpec {
        &self.spec
    }
    fn reset(&mut self, seed: u64) -> dws_envs::Result<()> {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        for i in 0..self.colours.len() {
            self.draw(i);
        }
        Ok(())
    }
    fn step(&mut self, actions: &[Action]) -> dws_envs::Result<&[Step]> {
        for (i, a) in actions.iter().enumerate() {
            let red = self.colours[i];
            let reward = match a {
                Action::Discrete(k) => ((*k == 0) == red) as u8 as f32,
                Action::Continuous(v) => {
                    let target = if red { 1.0 } else { -1.0 };
                    1.0 - (v[0] - target).abs().min(2.0) / 2.0
                }
            };
            self.steps[i] = Step {
                reward,
                terminated: true,
                truncated: false,
            };
            self.draw(i);
        }
        Ok(&self.steps)
    }
    fn obs(&self) -> &[u8] {
        &self.obs
    }
}

fn bandit_config() -> PpoConfig {
    PpoConfig {
        num_envs: 16,
        num_steps: 8,
        lr: 2e-3,
        anneal_lr: false,
        ..PpoConfig::debug()
    }
}

fn mean_reward(ppo: &mut Ppo<B>, env: &mut ColourBandit, tracker: &mut EpisodeTracker) -> f32 {
    let r = ppo.collect(env, tracker).unwrap();
    r.rewards.iter().sum::<f32>() / r.rewards.len() as f32
}

#[test]
fn ppo_learns_which_colour_pays_with_discrete_actions() {
    let device = Default::default();
    let space = ActionSpace::Discrete { n: 3 };
    let mut env = ColourBandit::new(16, space.clone());
    env.reset(1).unwrap();
    let mut ppo = Ppo::<B>::new(bandit_config(), space, SIDE, 5, &device).unwrap();
    let mut tracker = EpisodeTracker::new(16);
    let before = mean_reward(&mut ppo, &mut env, &mut tracker);
    for _ in 0..40 {
        let r = ppo.collect(&mut env, &mut tracker).unwrap();
        let stats = ppo.update(&[&r], ppo.config.lr);
        assert!(stats.policy_loss.is_finite() && stats.value_loss.is_finite());
    }
    let after = mean_reward(&mut ppo, &mut env, &mut tracker);
    // Uniform over 3 actions pays 1/3; the learned policy should be nearly always right.
    assert!(before < 0.55, "untrained policy already scores {before}");
    assert!(after > 0.85, "after training {after} (before {before})");
}

#[test]
fn ppo_learns_the_sign_with_continuous_actions() {
    let device = Default::default();
    let space = ActionSpace::Continuous {
        dim: 1,
        low: -1.0,
        high: 1.0,
    };
    let mut env = ColourBandit::new(16, space.clone());
    env.reset(2).unwrap();
    let mut ppo = Ppo::<B>::new(bandit_config(), space, SIDE, 6, &device).unwrap();
    let mut tracker = EpisodeTracker::new(16);
    let before = mean_reward(&mut ppo, &mut env, &mut tracker);
    for _ in 0..60 {
        let r = ppo.collect(&mut env, &mut tracker).unwrap();
        ppo.update(&[&r], ppo.config.lr);
    }
    let after = mean_reward(&mut ppo, &mut env, &mut tracker);
    assert!(after > before + 0.2, "before {before}, after {after}");
    assert!(after > 0.75, "after training {after}");
}

#[test]
fn gae_matches_a_hand_computation_and_stops_at_episode_ends() {
    // Two envs, three steps; env 0 ends its episode at step 1.
    let rewards = [1.0, 0.0, 2.0, 0.0, 0.5, 1.0];
    let values = [0.5, 0.2, 0.4, 0.1, 0.3, 0.6];
    let dones = [false, false, true, false, false, false];
    let last = [10.0, 1.0];
    let (g, l) = (0.9f32, 0.8f32);
    let (adv, ret) = gae(&rewards, &values, &dones, &last, g, l);
    // env 0: t=2 bootstraps from last[0]; t=1 ends the episode; t=0 sees t=1.
    let d2 = 0.5 + g * 10.0 - 0.3;
    let d1 = 2.0 - 0.4;
    let d0 = 1.0 + g * 0.4 - 0.5;
    let a2 = d2;
    let a1 = d1;
    let a0 = d0 + g * l * a1;
    // env 1: no ends.
    let e2 = 1.0 + g * 1.0 - 0.6;
    let e1 = 0.0 + g * 0.6 - 0.1;
    let e0 = 0.0 + g * 0.1 - 0.2;
    let b2 = e2;
    let b1 = e1 + g * l * b2;
    let b0 = e0 + g * l * b1;
    let want = [a0, b0, a1, b1, a2, b2];
    for k in 0..6 {
        assert!(
            (adv[k] - want[k]).abs() < 1e-5,
            "k {k}: {} vs {}",
            adv[k],
            want[k]
        );
        assert!((ret[k] - (want[k] + values[k])).abs() < 1e-5);
    }
}

fn opts(
    total_steps: u64,
    stop_after: Option<usize>,
    resume: bool,
    on_update: &mut dyn FnMut(&run::IterLog),
) -> RunOptions<'_> {
    RunOptions {
        total_steps,
        seed: 3,
        resume,
        checkpoint_every: 2,
        keep_last: 2,
        stop_after,
        on_update,
    }
}

#[test]
fn a_resumed_run_continues_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let space = ActionSpace::Discrete { n: 2 };
    let config = PpoConfig {
        num_envs: 4,
        num_steps: 4,
        ..PpoConfig::debug()
    };
    let total = 6 * config.batch_size() as u64;
    let mut env = ColourBandit::new(4, space.clone());
    let mut ppo = Ppo::<B>::new(config.clone(), space.clone(), SIDE, 3, &device).unwrap();
    let first = run::train(
        dir.path(),
        &mut ppo,
        &mut env,
        opts(total, Some(4), false, &mut |_| {}),
    )
    .unwrap();
    assert_eq!(first.len(), 4);
    // A new process: fresh learner, resumed from the checkpoint at update 4.
    let mut ppo2 = Ppo::<B>::new(config.clone(), space.clone(), SIDE, 99, &device).unwrap();
    let rest = run::train(
        dir.path(),
        &mut ppo2,
        &mut env,
        opts(total, None, true, &mut |_| {}),
    )
    .unwrap();
    assert_eq!(
        rest.iter().map(|l| l.iteration).collect::<Vec<_>>(),
        vec![5, 6]
    );
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let its: Vec<usize> = text
        .lines()
        .map(|l| serde_json::from_str::<run::IterLog>(l).unwrap().iteration)
        .collect();
    assert_eq!(its, vec![1, 2, 3, 4, 5, 6]);
    // The resumed learner holds the checkpoint's weights, not its own fresh ones.
    let ckpt = dws_models::checkpoint::list(dir.path());
    assert_eq!(ckpt.len(), 2, "keep_last");
    let mut fresh = Ppo::<B>::new(config.clone(), space.clone(), SIDE, 99, &device).unwrap();
    let frames = env.obs().to_vec();
    let v_fresh = fresh.values(&frames, 4);
    fresh.model =
        dws_models::checkpoint::load_model(fresh.model.clone(), &ckpt[1], &device).unwrap();
    let v_loaded = fresh.values(&frames, 4);
    let v_resumed = ppo2.values(&frames, 4);
    assert_eq!(v_loaded, v_resumed);
    assert_ne!(v_fresh, v_resumed);
}
