//! The real-experience replay: clips and start states never cross an episode end, the
//! frames after terminal steps are the ones the env ended at, chunks survive the disk,
//! and a resumed run reads back exactly the chunks its checkpoint covers.

use dws_rl::replay::{Chunk, Replay};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const F: usize = 3;

/// `[T, N]` steps where frame bytes are (step, env, episode) and env `i`'s episodes
/// end every `3 + i` steps; each step rewards 1 at episode ends (terminated on env 0,
/// truncated elsewhere). End frames are marked with 200 + episode.
fn chunk(iteration: usize, t_len: usize, n: usize) -> Chunk {
    let mut c = Chunk {
        iteration,
        num_envs: n,
        num_steps: t_len,
        obs: Vec::new(),
        actions: Vec::new(),
        rewards: Vec::new(),
        terminated: Vec::new(),
        dones: Vec::new(),
        ends: Vec::new(),
    };
    for t in 0..t_len {
        for i in 0..n {
            let episode = t / (3 + i);
            let done = (t + 1) % (3 + i) == 0;
            c.obs.extend([t as u8, i as u8, episode as u8]);
            c.actions.push((t * 10 + i) as f32);
            c.rewards.push(if done { 1.0 } else { 0.0 });
            c.terminated.push(done && i == 0);
            c.dones.push(done);
            if done {
                c.ends
                    .push((t * n + i, vec![t as u8, i as u8, 200 + episode as u8]));
            }
        }
    }
    c
}

#[test]
fn clips_and_start_states_stay_inside_one_episode() {
    let c = chunk(1, 20, 3);
    let mut replay = Replay::new(4);
    replay.push(c.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let clips = replay.sample_clips(200, 3, &mut rng).unwrap();
    assert_eq!(clips.frames.len(), 200 * 3 * F);
    assert_eq!(clips.actions.len(), 200 * 2);
    for (k, clip) in clips.frames.chunks(3 * F).enumerate() {
        let frames: Vec<&[u8]> = clip.chunks(F).collect();
        for w in frames.windows(2) {
            assert_eq!(w[1][0], w[0][0] + 1, "consecutive steps");
            assert_eq!(w[1][1], w[0][1], "one env");
            assert_eq!(w[1][2], w[0][2], "one episode");
        }
        // The actions are the ones taken at the clip's first two frames.
        let (t, i) = (frames[0][0] as f32, frames[0][1] as f32);
        assert_eq!(
            &clips.actions[k * 2..k * 2 + 2],
            &[t * 10.0 + i, (t + 1.0) * 10.0 + i]
        );
    }
    // Start states: env 0's episodes are 3 steps long, so only their last step has a
    // full 3-frame history.
    let starts = c.start_candidates(3);
    for &(t, i) in &starts {
        let (frames, actions) = c.history(t, i, 3);
        assert_eq!(frames.len(), 3 * F);
        assert_eq!(actions.len(), 2);
        assert_eq!(frames[2 * F], t as u8);
        assert!(frames.chunks(F).all(|f| f[2] == frames[2]), "{t} {i}");
    }
    let env0: Vec<usize> = starts.iter().filter(|s| s.1 == 0).map(|s| s.0).collect();
    assert_eq!(env0, vec![2, 5, 8, 11, 14, 17]);
    // No clip fits when episodes are shorter than the clip.
    let mut short = Replay::new(1);
    short.push(chunk(1, 20, 1));
    assert!(short.sample_clips(4, 4, &mut rng).is_none());
}

#[test]
fn transitions_end_at_the_frames_episodes_ended_at_and_balance_rewards() {
    let mut replay = Replay::new(2);
    replay.push(chunk(1, 30, 2));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let t = replay.sample_transitions(400, false, &mut rng);
    assert_eq!(t.len(), 400);
    let mut ends = 0;
    for k in 0..t.len() {
        let (b, a) = (&t.before[k * F..(k + 1) * F], &t.after[k * F..(k + 1) * F]);
        assert_eq!(t.actions[k], (b[0] as usize * 10 + b[1] as usize) as f32);
        if t.rewards[k] == 1.0 {
            ends += 1;
            assert_eq!(a[2], 200 + b[2], "the end frame of the same episode");
            assert_eq!(t.terminated[k], if b[1] == 0 { 1.0 } else { 0.0 });
        } else {
            assert_eq!((a[0], a[1], a[2]), (b[0] + 1, b[1], b[2]));
            assert_eq!(t.terminated[k], 0.0);
        }
    }
    // About a third (env 0) and a quarter (env 1) of steps end episodes.
    let share = ends as f64 / 400.0;
    assert!((0.2..0.4).contains(&share), "{share}");
    assert!(t.weights.iter().all(|&w| w == 1.0));
    let t = replay.sample_transitions(4000, true, &mut rng);
    let ends = t.rewards.iter().filter(|&&r| r == 1.0).count() as f64 / 4000.0;
    assert!(
        ends > 0.55,
        "balanced batches are at least half events: {ends}"
    );
    // Weighted, the share of events is the replay's own: 10 episode ends of env 0 and
    // 7 of env 1 among the 59 steps with a known next frame.
    let w: f64 = t.weights.iter().map(|&w| w as f64).sum();
    let we: f64 = t
        .weights
        .iter()
        .zip(&t.rewards)
        .filter(|p| *p.1 == 1.0)
        .map(|p| *p.0 as f64)
        .sum();
    let want = 17.0 / 59.0;
    assert!((we / w - want).abs() < 0.03, "{} vs {want}", we / w);
}

#[test]
fn chunks_survive_the_disk_and_resumes_read_back_what_the_checkpoint_covers() {
    let dir = tempfile::tempdir().unwrap();
    for it in 1..=6 {
        chunk(it, 9, 2)
            .save(&Replay::chunk_path(dir.path(), it))
            .unwrap();
    }
    let c = Chunk::load(&Replay::chunk_path(dir.path(), 3)).unwrap();
    assert_eq!(c, chunk(3, 9, 2));
    // A resume at update 4 with room for 3 chunks: chunks 2-4, and 5-6 are deleted
    // (they will be collected again).
    let r = Replay::load_dir(dir.path(), 4, 3).unwrap();
    assert_eq!(
        r.chunks().map(|c| c.iteration).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert!(!Replay::chunk_path(dir.path(), 5).exists());
    assert!(Replay::chunk_path(dir.path(), 1).exists());
    assert_eq!(r.steps(), 3 * 18);
    // Damage is reported with the file's name.
    let p = Replay::chunk_path(dir.path(), 2);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let err = Chunk::load(&p).unwrap_err().to_string();
    assert!(err.contains("chunk-00000002"), "{err}");
}
