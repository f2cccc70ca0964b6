//! The DWS pieces: motion weights, the zero-initialised action module, MiniLM parity.

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use dws_models::embedders::{ActionBatch, ActionKind, EmbedderConfig, EmbedderKind};
use dws_models::flow_dit::{AttentionLayout, FlowDitConfig};
use dws_models::minilm::MiniLm;
use dws_models::motion_loss::{motion_weights, MotionLoss};

type B = Flex;
type AD = Autodiff<Flex>;

fn dev() -> burn::backend::flex::FlexDevice {
    Default::default()
}

fn to_vec<const D: usize, BB: Backend>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// A clip `[1, 3, 1, 4, 4]`: frame 1 changes one pixel a lot and one a little; frame 2
/// changes nothing.
fn clip() -> Tensor<B, 5> {
    let mut v = vec![0f32; 3 * 16];
    v[16 + 5] = 1.0; // frame 1, pixel 5: big change
    v[16 + 9] = 0.2; // frame 1, pixel 9: small change
    v[32 + 5] = 1.0; // frame 2 = frame 1
    v[32 + 9] = 0.2;
    Tensor::from_data(TensorData::new(v, [1, 3, 1, 4, 4]), &dev())
}

#[test]
fn motion_weights_properties() {
    let c = 5.0;
    for mode in [MotionLoss::Softmax, MotionLoss::SoftmaxMax] {
        let w = to_vec(motion_weights(clip(), mode, c, 0.1));
        assert_eq!(w.len(), 48);
        assert!(w[..16].iter().all(|&x| x == 1.0), "{mode:?}: w_0 must be 1");
        assert!(
            w.iter().all(|&x| (1.0..=c + 1e-4).contains(&x)),
            "{mode:?}: weights outside [1, c]"
        );
        // Larger where the frame changed, and more where it changed more.
        assert!(
            w[16 + 5] > w[16 + 9] && w[16 + 9] > w[16],
            "{mode:?}: {:?}",
            &w[16..32]
        );
        // An unchanged frame has uniform weights.
        assert!(w[32..].iter().all(|&x| (x - w[32]).abs() < 1e-6));
    }
    // softmax-max gives the most-changed position exactly c.
    let w = to_vec(motion_weights(clip(), MotionLoss::SoftmaxMax, c, 0.1));
    assert!((w[16 + 5] - c).abs() < 1e-4);
    // The plain softmax over many positions stays near 1: the reason for softmax-max.
    let big = Tensor::<B, 5>::random(
        [1, 2, 3, 64, 64],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &dev(),
    );
    let w = to_vec(motion_weights(big, MotionLoss::Softmax, c, 1.0));
    assert!(w.iter().all(|&x| x < 1.01));
    let ones = to_vec(motion_weights(clip(), MotionLoss::None, c, 0.1));
    assert!(ones.iter().all(|&x| x == 1.0));
}

fn tiny() -> FlowDitConfig {
    FlowDitConfig {
        image_size: 16,
        channels: 3,
        patch: 4,
        width: 32,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        max_frames: 4,
        attention: AttentionLayout::Factorized,
        time_freqs: 16,
        input_skip: false,
        output_gate: true,
        warp: false,
        anchor_input: false,
    }
}

#[test]
fn warp_moves_pixels_by_the_field_and_passes_gradients_to_it() {
    use dws_models::flow_dit::warp;
    let device = dev();
    let (h, w) = (6usize, 8usize);
    let img: Vec<f32> = (0..3 * h * w)
        .map(|i| (i * 37 % 101) as f32 / 100.0)
        .collect();
    let frames = Tensor::<B, 5>::from_data(TensorData::new(img.clone(), [1, 1, 3, h, w]), &device);
    let zero = Tensor::<B, 5>::zeros([1, 1, 2, h, w], &device);
    let same: f32 = (warp(frames.clone(), zero) - frames.clone())
        .abs()
        .max()
        .into_scalar();
    assert!(same < 1e-5, "a zero field changed the frame by {same}");
    // d = (+1, 0): output pixel x reads x + 1 (the last column reads the edge).
    let mut d = vec![0f32; 2 * h * w];
    d[..h * w].fill(1.0);
    let field = Tensor::<B, 5>::from_data(TensorData::new(d, [1, 1, 2, h, w]), &device);
    let out = to_vec(warp(frames, field));
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let src = (c * h + y) * w + (x + 1).min(w - 1);
                let got = out[(c * h + y) * w + x];
                assert!(
                    (got - img[src]).abs() < 1e-5,
                    "({c},{y},{x}): {got} vs {}",
                    img[src]
                );
            }
        }
    }
    // Half a pixel right and down: the mean of four neighbours; a gradient reaches the field.
    let frames = Tensor::<AD, 5>::from_data(TensorData::new(img.clone(), [1, 1, 3, h, w]), &device);
    let field = Tensor::<AD, 5>::zeros([1, 1, 2, h, w], &device).require_grad();
    let field_half = field.clone() + 0.5;
    let out = warp(frames, field_half);
    let v: Vec<f32> = out.clone().into_data().to_vec().unwrap();
    let mean4 = (img[0] + img[1] + img[w] + img[w + 1]) / 4.0;
    assert!((v[0] - mean4).abs() < 1e-5, "{} vs {mean4}", v[0]);
    let grads = out.sum().backward();
    let g: Vec<f32> = field.grad(&grads).unwrap().into_data().to_vec().unwrap();
    assert!(
        g.iter().any(|x| x.abs() > 1e-3),
        "no gradient reaches the field"
    );
}

#[test]
fn zero_initialised_action_module_changes_nothing_until_trained() {
    let device = dev();
    AD::seed(&device, 7);
    let cfg = tiny();
    let mut base = cfg.init::<AD>(&device);
    let x = Tensor::<AD, 5>::random(
        [2, 3, 3, 16, 16],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let t = Tensor::<AD, 2>::from_data([[0.0, 0.5, 0.5], [0.0, 0.0, 0.9]], &device);
    // Train the base a little so its output is not the zero of a fresh adaLN-Zero model.
    let mut opt = AdamWConfig::new().init::<AD, _>();
    for _ in 0..3 {
        let loss = (base.forward(x.clone(), t.clone(), None) - x.clone())
            .powf_scalar(2.0)
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &base);
        base = opt.step(1e-2, base, grads);
    }
    let before = base.forward(x.clone(), t.clone(), None);
    assert!(before.clone().abs().max().into_scalar() > 1e-3);

    let embedder = EmbedderConfig {
        kind: EmbedderKind::Table,
        actions: ActionKind::Discrete {
            n: 4,
            templates: vec![String::new(); 4],
        },
        cond_dim: 16,
    }
    .init::<AD>(&device)
    .unwrap();
    let model = base.attach_action_modules(16, &device);
    let actions = |a: i64| {
        ActionBatch::Discrete(Tensor::<AD, 2, Int>::from_data(
            TensorData::new(vec![a; 4], [2, 2]),
            &device,
        ))
    };
    let with = model.forward(x.clone(), t.clone(), Some(embedder.forward(actions(1))));
    let diff: f32 = (with - before).abs().max().into_scalar();
    assert_eq!(diff, 0.0, "attaching the module changed the output");

    // One optimiser step on the action module and embedder makes predictions depend on
    // the action.
    let loss = (model.forward(x.clone(), t.clone(), Some(embedder.forward(actions(1))))
        - x.clone())
    .powf_scalar(2.0)
    .mean();
    let mut grads = loss.backward();
    let g_mod = GradientsParams::from_module(&mut grads, &model);
    let model = AdamWConfig::new().init::<AD, _>().step(1e-2, model, g_mod);
    let a = model.forward(x.clone(), t.clone(), Some(embedder.forward(actions(1))));
    let b = model.forward(x.clone(), t.clone(), Some(embedder.forward(actions(3))));
    let gap: f32 = (a - b).abs().max().into_scalar();
    assert!(
        gap > 1e-6,
        "predictions ignore the action after a step (gap {gap})"
    );
}

#[test]
fn the_anchor_frame_reaches_the_output_of_an_anchor_input_model() {
    use dws_models::flow::{flow_loss, FlowBatch, FlowConfig, LossConfig, WorldModel};
    use rand::SeedableRng;
    let device = dev();
    AD::seed(&device, 5);
    let mut world = WorldModel {
        dit: FlowDitConfig {
            warp: true,
            anchor_input: true,
            ..tiny()
        }
        .init::<AD>(&device),
        embedder: None,
    };
    let clips = Tensor::<AD, 5>::random(
        [2, 3, 3, 16, 16],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let cfg = LossConfig {
        motion: MotionLoss::None,
        strength: 1.0,
        temperature: 1.0,
        flow: FlowConfig {
            shift: 3.0,
            sample_steps: 1,
            ..FlowConfig::default() // clean-frame prediction and loss
        },
        rollout_context: 0.5,
        warp_blur: 1.5,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut opt = AdamWConfig::new().init::<AD, _>();
    for _ in 0..3 {
        let batch = FlowBatch {
            x0: clips.clone(),
            actions: None,
        };
        let loss = flow_loss(&world, batch, &cfg, &mut rng);
        assert!(loss.clone().into_scalar().is_finite());
        let grads = GradientsParams::from_grads(loss.backward(), &world);
        world = opt.step(1e-2, world, grads);
    }
    let x = clips.clone();
    let t = Tensor::<AD, 2>::from_data([[0.0, 0.9, 0.9], [0.0, 0.9, 0.9]], &device);
    let anchor = |k: usize| clips.clone().narrow(1, k, 1).repeat_dim(1, 3);
    let (a, _) = world
        .dit
        .forward_parts(x.clone(), t.clone(), None, Some(anchor(0)));
    let (b, _) = world.dit.forward_parts(x, t, None, Some(anchor(2)));
    let gap: f32 = (a - b).abs().max().into_scalar();
    assert!(
        gap > 1e-5,
        "the output ignores the anchor frame (gap {gap})"
    );
}

#[test]
fn minilm_matches_the_reference() {
    let text = include_str!("fixtures/minilm.json");
    let fixture: serde_json::Value = serde_json::from_str(text).unwrap();
    let model = MiniLm::<B>::from_asset(&dev()).unwrap();
    let sentences = fixture["sentences"].as_array().unwrap();
    let expected = fixture["embeddings"].as_array().unwrap();
    for (s, e) in sentences.iter().zip(expected) {
        let got = to_vec(model.embed(s.as_str().unwrap()).unwrap());
        let want: Vec<f32> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), 384);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "{s}: max difference {worst}");
    }
}

#[test]
fn untrained_x0_model_predicts_the_last_context_frame_and_velocity_model_does_not() {
    use dws_models::flow::{sample_frames, FlowConfig, Prediction};
    use rand::SeedableRng;
    let device = dev();
    let model = tiny().init::<B>(&device);
    let context = Tensor::<B, 5>::random(
        [2, 2, 3, 16, 16],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let last = context.clone().narrow(1, 1, 1).repeat_dim(1, 2);
    let run = |prediction| {
        let cfg = FlowConfig {
            shift: 3.0,
            sample_steps: 5,
            prediction,
            ..FlowConfig::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        sample_frames(&model, context.clone(), 2, None, &cfg, &mut rng)
    };
    // Also with the warp head (zero-initialised: no displacement), with and without the
    // anchor frame as an input.
    for anchor_input in [false, true] {
        let warped = FlowDitConfig {
            warp: true,
            anchor_input,
            ..tiny()
        }
        .init::<B>(&device);
        let cfg = FlowConfig {
            shift: 3.0,
            sample_steps: 5,
            prediction: Prediction::X0,
            ..FlowConfig::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let gap: f32 = (sample_frames(&warped, context.clone(), 2, None, &cfg, &mut rng)
            - last.clone())
        .abs()
        .max()
        .into_scalar();
        assert!(
            gap < 1e-4,
            "untrained warp model (anchor_input {anchor_input}) moved the last frame by {gap}"
        );
    }
    // A fresh network outputs zeros (adaLN-Zero, zero-initialised projections): as a
    // clean-frame change that is "nothing moves", so every Euler step pulls the noise
    // onto the last context frame and the last step lands on it.
    let gap: f32 = (run(Prediction::X0) - last.clone())
        .abs()
        .max()
        .into_scalar();
    assert!(gap < 1e-4, "x0 sampling left {gap} from the anchor");
    // As a velocity, zero leaves the noise where it started.
    let gap: f32 = (run(Prediction::Velocity) - last)
        .abs()
        .mean()
        .into_scalar();
    assert!(
        gap > 0.3,
        "velocity sampling came out near the anchor ({gap})"
    );
}

#[test]
fn the_fused_kernels_and_burns_operations_give_the_same_model_outputs() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    // Autodiff<Flex> takes the fused kernels; the same CPU backend with another
    // checkpointing strategy is another backend type and takes burn's operations.
    type Other = Autodiff<Flex, BalancedCheckpointing>;
    assert_eq!(dws_kernels::path::<AD>(), dws_kernels::Path::Fused);
    assert_eq!(dws_kernels::path::<Other>(), dws_kernels::Path::Reference);
    let device = dev();
    AD::seed(&device, 3);
    let cfg = FlowDitConfig {
        warp: true,
        anchor_input: false,
        ..tiny()
    };
    let mut fused = cfg.init::<AD>(&device).attach_action_modules(8, &device);
    let x: Vec<f32> = (0..2 * 3 * 3 * 16 * 16)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let t = [0.0f32, 0.5, 0.5, 0.0, 0.0, 0.9];
    let cond: Vec<f32> = (0..2 * 3 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
    let inputs = |device: &burn::backend::flex::FlexDevice| {
        (
            TensorData::new(x.clone(), [2, 3, 3, 16, 16]),
            TensorData::new(t.to_vec(), [2, 3]),
            TensorData::new(cond.clone(), [2, 3, 8]),
            *device,
        )
    };
    // A few steps so the zero-initialised output layers and action modules take part.
    let mut opt = AdamWConfig::new().init::<AD, _>();
    for _ in 0..3 {
        let (xd, td, cd, d) = inputs(&device);
        let x = Tensor::<AD, 5>::from_data(xd, &d);
        let out = fused.forward(
            x.clone(),
            Tensor::from_data(td, &d),
            Some(Tensor::from_data(cd, &d)),
        );
        let loss = (out - x.flip([1])).powf_scalar(2.0).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &fused);
        fused = opt.step(1e-2, fused, grads);
    }
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(fused.clone().into_record(), ()).unwrap();
    let record = Recorder::<Other>::load(&recorder, bytes, &device).unwrap();
    let reference = cfg
        .init::<Other>(&device)
        .attach_action_modules(8, &device)
        .load_record(record);
    let (xd, td, cd, d) = inputs(&device);
    let a = to_vec(fused.forward(
        Tensor::from_data(xd.clone(), &d),
        Tensor::from_data(td.clone(), &d),
        Some(Tensor::from_data(cd.clone(), &d)),
    ));
    let b = to_vec(reference.forward(
        Tensor::from_data(xd, &d),
        Tensor::from_data(td, &d),
        Some(Tensor::from_data(cd, &d)),
    ));
    let gap = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(scale > 1e-3, "the model's output is not trivially zero");
    assert!(gap <= 1e-5 * scale.max(1.0), "outputs differ by {gap}");
}

#[test]
fn the_warp_fields_upsampling_equals_burns_bilinear_interpolate_with_its_gradient() {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    use dws_models::flow_dit::upsample_bilinear;
    let device = dev();
    for (shape, out) in [
        ([2, 2, 8, 8], [64, 64]),
        ([1, 3, 3, 5], [7, 11]),
        ([1, 1, 4, 1], [9, 3]),
    ] {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 29 % 53) as f32 - 26.0) / 9.0)
            .collect();
        let x = Tensor::<AD, 4>::from_data(TensorData::new(vals, shape), &device).require_grad();
        // Upstream gradient with structure, so the backward is checked weight by weight.
        let up: Vec<f32> = (0..shape[0] * shape[1] * out[0] * out[1])
            .map(|i| (i * 13 % 17) as f32 / 17.0)
            .collect();
        let up = Tensor::<AD, 4>::from_data(
            TensorData::new(up, [shape[0], shape[1], out[0], out[1]]),
            &device,
        );
        let ours = upsample_bilinear(x.clone(), out[0], out[1]);
        let reference = interpolate(
            x.clone(),
            out,
            InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false),
        );
        let diff: f32 = (ours.clone() - reference.clone()).abs().max().into_scalar();
        assert!(
            diff < 1e-5,
            "{shape:?} -> {out:?}: outputs differ by {diff}"
        );
        let g_ours = x.grad(&(ours * up.clone()).sum().backward()).unwrap();
        let g_ref = x.grad(&(reference * up).sum().backward()).unwrap();
        let gdiff: f32 = (g_ours - g_ref).abs().max().into_scalar();
        assert!(
            gdiff < 1e-4,
            "{shape:?} -> {out:?}: gradients differ by {gdiff}"
        );
    }
}

#[test]
fn gaussian_blur_keeps_flat_images_and_spreads_an_impulse_symmetrically() {
    use dws_models::flow_dit::gaussian_blur;
    let device = dev();
    let flat = Tensor::<B, 5>::full([1, 1, 1, 9, 11], 0.3, &device);
    let gap: f32 = (gaussian_blur(flat, 1.5) - 0.3).abs().max().into_scalar();
    assert!(
        gap < 1e-6,
        "a flat image changed by {gap} (borders must renormalise)"
    );
    // An impulse far enough from the borders that none of its kernel is cut.
    let mut v = vec![0f32; 21 * 23];
    v[10 * 23 + 11] = 1.0;
    let impulse = Tensor::<B, 5>::from_data(TensorData::new(v, [1, 1, 1, 21, 23]), &device);
    let out = to_vec(gaussian_blur(impulse, 1.0));
    let at = |y: usize, x: usize| out[y * 23 + x];
    assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    // Symmetric, peaked at the centre, falling off as exp(-d²/2) (one pixel: e^-0.5).
    assert!((at(10, 10) - at(10, 12)).abs() < 1e-7 && (at(9, 11) - at(11, 11)).abs() < 1e-7);
    assert!((at(10, 10) / at(10, 11) - (-0.5f32).exp()).abs() < 1e-5);
    assert!((at(9, 10) / at(10, 11) - (-1.0f32).exp()).abs() < 1e-5);
}
