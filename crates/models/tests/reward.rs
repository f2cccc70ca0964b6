//! The reward/termination model learns a rule that needs both frames and the action.

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use dws_models::reward::{transition_patches, RewardConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type A = Autodiff<Flex>;
const SIDE: usize = 16;

/// A frame with a white 4×4 square at cell (cx, cy) of a 4×4 grid.
fn square(cx: usize, cy: usize) -> Vec<u8> {
    let mut f = vec![20u8; SIDE * SIDE * 3];
    for y in cy * 4..cy * 4 + 4 {
        for x in cx * 4..cx * 4 + 4 {
            f[(y * SIDE + x) * 3..(y * SIDE + x) * 3 + 3].fill(250);
        }
    }
    f
}

struct Batch {
    before: Vec<u8>,
    after: Vec<u8>,
    actions: Vec<usize>,
    rewards: Vec<f32>,
    done: Vec<f32>,
}

/// Reward +1 for action 1 and −1 for action 0 while the square is in the top half of
/// the frame before, 0 in the bottom half (so it needs the frame and the action); the
/// square then jumps to a random row, and the episode ends when that is the bottom row
/// (which only the frame after shows).
fn batch(n: usize, rng: &mut ChaCha8Rng) -> Batch {
    let mut b = Batch {
        before: Vec::new(),
        after: Vec::new(),
        actions: Vec::new(),
        rewards: Vec::new(),
        done: Vec::new(),
    };
    for _ in 0..n {
        let (cx, cy, ny) = (
            rng.gen_range(0..4),
            rng.gen_range(0..4),
            rng.gen_range(0..4),
        );
        let a = rng.gen_range(0..2);
        b.before.extend(square(cx, cy));
        b.after.extend(square(cx, ny));
        b.actions.push(a);
        b.rewards.push(match (cy < 2, a) {
            (true, 1) => 1.0,
            (true, _) => -1.0,
            _ => 0.0,
        });
        b.done.push((ny == 3) as u8 as f32);
    }
    b
}

#[test]
fn the_reward_model_learns_rewards_from_frames_and_actions_and_ends_from_frames() {
    let device = Default::default();
    A::seed(&device, 1);
    let cfg = RewardConfig {
        patch: 4,
        width: 32,
        heads: 2,
        layers: 2,
        ..RewardConfig::small(SIDE, 8)
    };
    let mut model = cfg.init::<A>(&device);
    let mut optim = AdamConfig::new().init::<A, _>();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // Two fixed action embeddings.
    let table: Vec<f32> = (0..16).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let embed = |ids: &[usize]| -> Tensor<A, 2> {
        let v: Vec<f32> = ids
            .iter()
            .flat_map(|&a| table[a * 8..a * 8 + 8].to_vec())
            .collect();
        Tensor::from_data(TensorData::new(v, [ids.len(), 8]), &device)
    };
    let tensors = |b: &Batch| {
        let n = b.actions.len();
        (
            transition_patches::<A>(&b.before, &b.after, n, SIDE, 4, &device),
            Tensor::<A, 1>::from_data(TensorData::new(b.rewards.clone(), [n]), &device),
            Tensor::<A, 1>::from_data(TensorData::new(b.done.clone(), [n]), &device),
        )
    };
    let mut first = None;
    // 1,000 steps at 1e-3: at 3e-3 for 500 steps some initialisations (seeds 2 and 4,
    // or seed 1 after a one-ulp change in the kernels' rounding) stayed on a plateau
    // (MSE about 0.25); these settings pass for every seed tried (1-4).
    for _ in 0..1000 {
        let b = batch(32, &mut rng);
        let (p, r, d) = tensors(&b);
        let (loss, mse, bce) = model.loss(p, embed(&b.actions), r, d, cfg.done_weight, None);
        first.get_or_insert((mse, bce));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }
    let test = batch(256, &mut rng);
    let (p, _, _) = tensors(&test);
    let (r, logit) = model.forward(p.clone(), embed(&test.actions));
    let r: Vec<f32> = r.into_data().to_vec().unwrap();
    let logit: Vec<f32> = logit.into_data().to_vec().unwrap();
    let mse = r
        .iter()
        .zip(&test.rewards)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        / 256.0;
    let acc = logit
        .iter()
        .zip(&test.done)
        .filter(|(z, d)| (**z > 0.0) == (**d > 0.5))
        .count() as f32
        / 256.0;
    let (mse0, _) = first.unwrap();
    assert!(mse < 0.05, "held-out reward MSE {mse} (first batch {mse0})");
    assert!(acc > 0.95, "termination accuracy {acc}");
    // The reward depends on the action through the cross-attention: the other action's
    // embedding with the same frames changes the predicted reward.
    let flipped: Vec<usize> = test.actions.iter().map(|a| 1 - a).collect();
    let (r2, _) = model.forward(p, embed(&flipped));
    let r2: Vec<f32> = r2.into_data().to_vec().unwrap();
    let moved: f32 = r.iter().zip(&r2).map(|(a, b)| (a - b).abs()).sum::<f32>() / 256.0;
    // Half the held-out transitions start in the top half, where the reward flips sign
    // (a change of 2) with the action.
    assert!(moved > 0.5, "mean change with the other action {moved}");
}
