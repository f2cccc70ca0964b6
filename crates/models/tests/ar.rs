//! The autoregressive token transformer: the key/value-cached decoder gives the same
//! logits and greedy tokens as the full forward pass, the zero-initialised DWS modules
//! leave it unchanged until trained, and training lowers the token loss.

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use dws_models::ar::{generate, token_loss, ArConfig, KvCache, Sampling};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

type A = Autodiff<Flex>;
type I = Flex;

fn tokens<B: Backend>(
    b: usize,
    l: usize,
    vocab: usize,
    seed: u64,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut x = seed;
    let v: Vec<i64> = (0..b * l)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [b, l]), device)
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn the_cached_decoder_matches_the_full_pass() {
    let device = Default::default();
    I::seed(&device, 3);
    let cfg = ArConfig::debug(16, 4);
    cfg.validate().unwrap();
    let model = cfg.init::<I>(&device).attach_action_modules(6, &device);
    let (b, f) = (2, 3);
    let x = tokens::<I>(b, f * 4, 16, 1, &device);
    let cond = Tensor::<I, 3>::random(
        [b, f, 6],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let full = floats(model.forward(x.clone(), Some(cond.clone()))); // [B, L, V]
    let mut cache = KvCache::new(model.depth());
    let mut stepped = vec![0f32; full.len()];
    for pos in 0..f * 4 {
        let token = (pos > 0).then(|| x.clone().narrow(1, pos - 1, 1).reshape([b]));
        let c = cond.clone().narrow(1, pos / 4, 1).reshape([b, 6]);
        let logits = floats(model.step(token, Some(c), &mut cache, b));
        for r in 0..b {
            stepped[(r * f * 4 + pos) * 16..(r * f * 4 + pos + 1) * 16]
                .copy_from_slice(&logits[r * 16..(r + 1) * 16]);
        }
    }
    let max = full
        .iter()
        .zip(&stepped)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "cached logits differ by {max}");
    // Greedy rollouts of two frames from a one-frame prefix agree token for token.
    let prefix = x.narrow(1, 0, 4);
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let a = generate(
        &model,
        prefix.clone(),
        2,
        Some(cond.clone()),
        greedy,
        true,
        &mut rng,
    );
    let c = generate(&model, prefix, 2, Some(cond), greedy, false, &mut rng);
    assert_eq!(a.dims(), [b, 8]);
    assert_eq!(
        a.into_data().convert::<i64>().into_vec::<i64>().unwrap(),
        c.into_data().convert::<i64>().into_vec::<i64>().unwrap()
    );
}

#[test]
fn attached_action_modules_change_nothing_until_trained_then_condition_the_tokens() {
    let device = Default::default();
    A::seed(&device, 5);
    let cfg = ArConfig::debug(16, 4);
    let base = cfg.init::<A>(&device);
    let x = tokens::<A>(4, 8, 16, 2, &device);
    let before = floats(base.forward(x.clone(), None));
    let mut model = base.attach_action_modules(4, &device);
    // Two actions, as one-hot embeddings; the data's second frame depends on them.
    let onehot = |k: usize| {
        let mut v = vec![0f32; 4 * 2 * 4];
        for r in 0..4 {
            v[(r * 2 + 1) * 4 + k] = 1.0;
        }
        Tensor::<A, 3>::from_data(TensorData::new(v, [4, 2, 4]), &device)
    };
    let after = floats(model.forward(x.clone(), Some(onehot(0))));
    let max = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-6, "attaching changed the output by {max}");
    let mut optim = AdamConfig::new().init();
    let target = |k: usize| {
        let mut v: Vec<i64> = floats(x.clone().float())
            .iter()
            .map(|&t| t as i64)
            .collect();
        for r in 0..4 {
            for j in 4..8 {
                v[r * 8 + j] = (k * 7 + j) as i64 % 16;
            }
        }
        Tensor::<A, 2, Int>::from_data(TensorData::new(v, [4, 8]), &device)
    };
    let mut first = None;
    let mut last = 0.0;
    for step in 0..40 {
        let k = step % 2;
        let t = target(k);
        let loss = token_loss(model.forward(t.clone(), Some(onehot(k))), t, None);
        let value: f32 = loss.clone().into_scalar().elem();
        first.get_or_insert(value);
        last = value;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    assert!(
        last < 0.7 * first.unwrap(),
        "token loss {} -> {last}",
        first.unwrap()
    );
    let t0 = target(0);
    let l0 = floats(model.forward(t0.clone(), Some(onehot(0))));
    let l1 = floats(model.forward(t0, Some(onehot(1))));
    let diff = l0
        .iter()
        .zip(&l1)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-2,
        "the predictions do not depend on the action ({diff})"
    );
}

#[test]
fn a_prefilled_cache_continues_like_the_full_pass() {
    let device = Default::default();
    I::seed(&device, 7);
    let cfg = ArConfig::debug(16, 4);
    let model = cfg.init::<I>(&device).attach_action_modules(6, &device);
    let (b, f) = (2, 3);
    let x = tokens::<I>(b, f * 4, 16, 4, &device);
    let cond = Tensor::<I, 3>::random(
        [b, f, 6],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let full = floats(model.forward(x.clone(), Some(cond.clone()))); // [B, 12, 16]
                                                                     // Two frames in one pass, then the positions of the third one by one.
    let mut cache = KvCache::new(model.depth());
    model.prefill(
        x.clone().narrow(1, 0, 8),
        Some(cond.clone().narrow(1, 0, 2)),
        &mut cache,
    );
    assert_eq!(cache.len, 8);
    let mut max = 0f32;
    for pos in 8..12 {
        let token = x.clone().narrow(1, pos - 1, 1).reshape([b]);
        let c = cond.clone().narrow(1, 2, 1).reshape([b, 6]);
        let logits = floats(model.step(Some(token), Some(c), &mut cache, b));
        for r in 0..b {
            let want = &full[(r * 12 + pos) * 16..(r * 12 + pos + 1) * 16];
            for (a, w) in logits[r * 16..(r + 1) * 16].iter().zip(want) {
                max = max.max((a - w).abs());
            }
        }
    }
    assert!(max < 1e-4, "logits after the prefill differ by {max}");
}

#[test]
fn motion_weights_pool_to_the_token_grid_in_row_major_order() {
    use dws_models::ar_world::pool_to_tokens;
    let device = Default::default();
    // One clip of two 4×4 frames, a 2×2 token grid: each token averages a 2×2 block.
    let v: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let w = Tensor::<I, 5>::from_data(TensorData::new(v, [1, 2, 1, 4, 4]), &device);
    let got = floats(pool_to_tokens(w, 2));
    // Frame 0 rows: 0..4, 4..8, 8..12, 12..16; block (0,0) = {0,1,4,5} -> 2.5.
    let want = [2.5, 4.5, 10.5, 12.5, 18.5, 20.5, 26.5, 28.5];
    assert_eq!(got, want);
}

#[test]
fn rollouts_run_past_the_window_and_follow_their_actions() {
    use dws_models::ar_world::{ar_rollout, ArWorld};
    use dws_models::embedders::{ActionBatch, ActionKind, EmbedderConfig, EmbedderKind};
    use dws_models::vq::VqConfig;
    let device = Default::default();
    I::seed(&device, 11);
    let vq_cfg = VqConfig::debug();
    let vq = vq_cfg.init::<I>(&device);
    let cfg = ArConfig::debug(vq_cfg.codebook_size, vq_cfg.tokens_per_frame());
    let embedder = EmbedderConfig {
        kind: EmbedderKind::Table,
        actions: ActionKind::Discrete {
            n: 3,
            templates: Vec::new(),
        },
        cond_dim: 8,
    }
    .init::<I>(&device)
    .unwrap();
    let mut net = cfg.init::<I>(&device).attach_action_modules(8, &device);
    // Non-zero action modules, so actions matter even untrained.
    net.action_modules = net
        .action_modules
        .into_iter()
        .map(|m| m.map(&mut RandomiseParams))
        .collect();
    let world = ArWorld {
        net,
        embedder: Some(embedder),
    };
    let ctx = Tensor::<I, 5>::random(
        [2, 1, 3, 64, 64],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let horizon = 6; // the window holds 4 frames
    let actions = |k: i64| {
        ActionBatch::Discrete(Tensor::<I, 2, Int>::from_data(
            TensorData::new(vec![k; 2 * horizon], [2, horizon]),
            &device,
        ))
    };
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let roll = |k: i64, rng: &mut ChaCha8Rng| {
        floats(ar_rollout(
            &world,
            &vq,
            ctx.clone(),
            Some(&actions(k)),
            horizon,
            greedy,
            rng,
        ))
    };
    let a = roll(0, &mut rng);
    assert_eq!(a.len(), 2 * horizon * 3 * 64 * 64);
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, roll(0, &mut rng), "greedy rollouts are deterministic");
    assert_ne!(a, roll(2, &mut rng), "other actions, other frames");
}

/// Replaces every float parameter with small random values.
struct RandomiseParams;

impl<B: Backend> burn::module::ModuleMapper<B> for RandomiseParams {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let t = Tensor::random(
            tensor.dims(),
            burn::tensor::Distribution::Normal(0.0, 0.5),
            &tensor.device(),
        );
        burn::module::Param::from_mapped_value(id, t, mapper)
    }
}
