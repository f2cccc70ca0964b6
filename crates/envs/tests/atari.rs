//! Atari through the ALE built from source (only with `--features atari`).
#![cfg(feature = "atari")]

use dws_envs::{make, Action, EnvConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn breakout(opts: &[(&str, &str)]) -> Box<dyn dws_envs::Env> {
    let opts: Vec<(String, String)> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    make(&EnvConfig::parse("atari:breakout", &opts).unwrap()).unwrap()
}

fn rollout(env: &mut dyn dws_envs::Env, seed: u64, steps: usize) -> (Vec<u8>, f32) {
    env.reset(Some(seed)).unwrap();
    let n = match env.spec().action_space {
        dws_envs::ActionSpace::Discrete { n } => n as u32,
        _ => unreachable!(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut frames = env.obs().to_vec();
    let mut ret = 0.0;
    for _ in 0..steps {
        let s = env.step(&Action::Discrete(rng.gen_range(0..n))).unwrap();
        ret += s.reward;
        frames.extend_from_slice(env.obs());
        if s.done() {
            env.reset(None).unwrap();
        }
    }
    (frames, ret)
}

#[test]
fn breakout_runs_with_minimal_and_full_action_sets() {
    let env = breakout(&[]);
    assert_eq!(
        env.spec().action_templates,
        ["do nothing", "fire", "move right", "move left"]
    );
    let full = breakout(&[("full_action_space", "true")]);
    assert_eq!(full.spec().action_templates.len(), 18);
}

#[test]
fn same_seed_same_frames_and_rewards_come() {
    let mut env = breakout(&[]);
    let a = rollout(env.as_mut(), 3, 400);
    let b = rollout(env.as_mut(), 3, 400);
    assert!(a == b, "sticky actions with the same seed must repeat");
    // The frame is a real 64×64 picture: several colours.
    let colours: std::collections::HashSet<&[u8]> = a.0[..64 * 64 * 3].chunks(3).collect();
    assert!(colours.len() >= 3, "{} colours", colours.len());
    // Random play in Breakout scores a few points in a few hundred steps.
    let (_, ret) = rollout(env.as_mut(), 4, 2000);
    assert!(ret > 0.0, "no reward in 2000 random steps");
}

#[test]
fn episodic_life_ends_episodes_on_a_lost_life() {
    let mut env = breakout(&[("episodic_life", "true")]);
    env.reset(Some(1)).unwrap();
    let mut steps = 0;
    loop {
        // Fire then do nothing: the ball is launched and missed.
        let a = if steps % 50 == 0 { 1 } else { 0 };
        let s = env.step(&Action::Discrete(a)).unwrap();
        steps += 1;
        if s.done() {
            assert!(s.terminated);
            break;
        }
        assert!(steps < 5000, "never lost a life");
    }
    assert_eq!(env.episode_info()["lives"], 4);
    // The next episode continues the same game with one life fewer.
    env.reset(None).unwrap();
    assert_eq!(env.episode_info()["lives"], 4);
}
