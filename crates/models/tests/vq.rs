//! The VQ frame tokenizer: shapes, the straight-through quantiser, dead-code restarts,
//! and that training lowers the reconstruction error.

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use dws_models::vq::VqConfig;

type A = Autodiff<Flex>;

/// Frames of coloured squares on a dark background, in [-1, 1]: `[n, 3, 64, 64]`.
fn frames(n: usize, device: &burn::backend::flex::FlexDevice) -> Tensor<A, 4> {
    let mut data = vec![-0.8f32; n * 3 * 64 * 64];
    for i in 0..n {
        let (x0, y0) = (4 + (i * 13) % 40, 6 + (i * 7) % 40);
        for c in 0..3 {
            let v = if (i + c) % 3 == 0 { 0.9 } else { -0.2 };
            for y in y0..y0 + 16 {
                for x in x0..x0 + 16 {
                    data[((i * 3 + c) * 64 + y) * 64 + x] = v;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [n, 3, 64, 64]), device)
}

#[test]
fn tokens_decode_back_to_frames_of_the_input_size() {
    let device = Default::default();
    let cfg = VqConfig::debug();
    cfg.validate().unwrap();
    assert_eq!(cfg.grid(), 16);
    let vq = cfg.init::<A>(&device);
    let x = frames(3, &device);
    let tokens = vq.encode(x.clone());
    assert_eq!(tokens.dims(), [3, 256]);
    let ids: Vec<i64> = tokens
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .unwrap();
    assert!(ids
        .iter()
        .all(|&t| t >= 0 && (t as usize) < cfg.codebook_size));
    let out = vq.forward(x);
    // The training pass quantises exactly as `encode` does.
    assert_eq!(
        out.tokens
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap(),
        ids
    );
    assert_eq!(out.recon.dims(), [3, 3, 64, 64]);
    assert_eq!(vq.decode(tokens).dims(), [3, 3, 64, 64]);
    // Decoding the tokens gives what the training pass reconstructs.
    let a: Vec<f32> = out.recon.into_data().convert::<f32>().into_vec().unwrap();
    let x = frames(3, &device);
    let b: Vec<f32> = vq
        .decode(vq.encode(x))
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let max = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "{max}");
}

#[test]
fn dead_codes_move_onto_the_given_latents_and_keep_the_rest() {
    let device = Default::default();
    let vq = VqConfig::debug().init::<A>(&device);
    let before: Vec<f32> = vq
        .codebook
        .val()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let d = VqConfig::debug().code_dim;
    let latents = Tensor::<A, 2>::from_data(
        TensorData::new((0..4 * d).map(|v| v as f32).collect::<Vec<_>>(), [4, d]),
        &device,
    );
    let id = vq.codebook.id;
    let vq = vq.restart_codes(&[5, 9], latents, &[3, 1]);
    assert_eq!(vq.codebook.id, id, "the parameter keeps its identity");
    let after: Vec<f32> = vq
        .codebook
        .val()
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    for k in 0..VqConfig::debug().codebook_size {
        let row = &after[k * d..(k + 1) * d];
        match k {
            5 => assert_eq!(row, (3 * d..4 * d).map(|v| v as f32).collect::<Vec<_>>()),
            9 => assert_eq!(row, (d..2 * d).map(|v| v as f32).collect::<Vec<_>>()),
            _ => assert_eq!(row, &before[k * d..(k + 1) * d]),
        }
    }
}

#[test]
fn training_lowers_the_reconstruction_error_and_reaches_the_encoder() {
    let device = Default::default();
    A::seed(&device, 1);
    let mut vq = VqConfig::debug().init::<A>(&device);
    let mut optim = AdamConfig::new().init();
    let x = frames(8, &device);
    let mse = |vq: &dws_models::vq::VqTokenizer<A>| -> f32 {
        let out = vq.forward(x.clone());
        (out.recon - x.clone())
            .powi_scalar(2)
            .mean()
            .into_scalar()
            .elem()
    };
    let first = mse(&vq);
    let encoder_before: Vec<f32> = vq
        .encode_latents(x.clone())
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    for _ in 0..60 {
        let out = vq.forward(x.clone());
        let loss = (out.recon - x.clone()).powi_scalar(2).mean() + out.vq_loss;
        let grads = GradientsParams::from_grads(loss.backward(), &vq);
        vq = optim.step(2e-3, vq, grads);
    }
    let last = mse(&vq);
    assert!(last < 0.5 * first, "reconstruction MSE {first} -> {last}");
    let encoder_after: Vec<f32> = vq
        .encode_latents(x)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    // The encoder learned through the straight-through estimator.
    assert!(
        encoder_before
            .iter()
            .zip(&encoder_after)
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "the encoder did not change"
    );
}

#[test]
fn the_step_schedule_warms_up_then_drops_at_each_listed_step() {
    use dws_models::vq::VqTrainConfig;
    let cfg = VqTrainConfig {
        lr: 1e-3,
        warmup: 10,
        lr_steps: vec![100, 200],
        lr_gamma: 0.5,
        ..VqTrainConfig::small()
    };
    assert!((cfg.lr_at(0) - 1e-4).abs() < 1e-12);
    assert!((cfg.lr_at(9) - 1e-3).abs() < 1e-12);
    assert!((cfg.lr_at(99) - 1e-3).abs() < 1e-12);
    assert!((cfg.lr_at(100) - 5e-4).abs() < 1e-12);
    assert!((cfg.lr_at(250) - 2.5e-4).abs() < 1e-12);
    // The small preset: 1e-3, then 3e-4 from step 1000.
    let small = VqTrainConfig::small();
    assert!((small.lr_at(999) - 1e-3).abs() < 1e-12);
    assert!((small.lr_at(1000) - 3e-4).abs() < 1e-12);
    // Configs written before the schedule existed still read, as a constant rate.
    let mut json = serde_json::to_value(&small).unwrap();
    let obj = json.as_object_mut().unwrap();
    obj.remove("lr_steps");
    obj.remove("lr_gamma");
    let old: VqTrainConfig = serde_json::from_value(json).unwrap();
    assert!((old.lr_at(2000) - 1e-3).abs() < 1e-12);
    let bad = VqTrainConfig {
        lr_gamma: 0.0,
        ..VqTrainConfig::small()
    };
    assert!(bad.validate().is_err());
}
