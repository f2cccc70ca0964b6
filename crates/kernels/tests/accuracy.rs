//! The fused kernels against f64 references and against burn's own operations.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use dws_kernels::{math, path, softmax_reference, unary, unary_reference, Path, Unary};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn reference(op: Unary, x: f64) -> f64 {
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let limit0 = |v: f64| if x == f64::NEG_INFINITY { 0.0 } else { v };
    match op {
        Unary::Exp => x.exp(),
        Unary::Erf => libm::erf(x),
        Unary::Tanh => x.tanh(),
        Unary::Sigmoid => sig(x),
        Unary::Silu => limit0(x * sig(x)),
        Unary::Gelu => limit0(0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt()))),
        Unary::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            limit0(0.5 * x * (1.0 + u.tanh()))
        }
    }
}

/// Inputs across each function's range: a dense grid, magnitudes from 1e-30 to 1e30
/// with both signs, and the special values.
fn inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (0..=400_000).map(|i| -100.0 + i as f32 * 5e-4).collect();
    for e in -30..=30 {
        for m in [1.0f32, 2.5, 7.3] {
            let v = m * 10f32.powi(e);
            xs.push(v);
            xs.push(-v);
        }
    }
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
    ]);
    xs
}

/// (absolute, relative) error bounds as documented in `math.rs`; relative only where the
/// result is a normal f32.
fn bounds(op: Unary, x: f64) -> (f64, f64) {
    match op {
        Unary::Exp => (0.0, 3e-7),
        Unary::Erf => (3e-7, 1e-6),
        Unary::Tanh => (3e-7, 2e-6),
        _ => (1e-6 * x.abs().max(1.0), 0.0),
    }
}

#[test]
fn each_function_is_within_its_stated_error() {
    let xs = inputs();
    for op in Unary::ALL {
        let mut got = vec![0f32; xs.len()];
        // The vector path (threads, SIMD), and the scalar one.
        math::forward(op, &mut got, &xs);
        let mut worst = (0.0f64, 0.0f32);
        for (&x, &y) in xs.iter().zip(&got) {
            // Bit for bit, except that a NaN is any NaN: the sign of a product with a
            // NaN operand follows the operand order the optimiser picks (SiLU(NaN)
            // read 0x7fc00000 on one path and 0xffc00000 on the other once the kernels
            // were built at opt-level 3 in tests too).
            let s = math::scalar(op, x);
            assert!(
                y.to_bits() == s.to_bits() || (y.is_nan() && s.is_nan()),
                "{op:?}({x}): vector path {y} ({:#x}), scalar path {s} ({:#x})",
                y.to_bits(),
                s.to_bits()
            );
            let want = reference(op, x as f64);
            if want.is_nan() {
                assert!(y.is_nan(), "{op:?}({x}) = {y}, want NaN");
                continue;
            }
            if want.is_infinite() {
                assert_eq!(y as f64, want, "{op:?}({x})");
                continue;
            }
            if want.abs() > f32::MAX as f64 {
                // Past the largest f32: infinity or the largest value, with the right sign.
                let near = (y as f64 - want).abs() <= 3e-7 * want.abs();
                assert!(
                    y.is_infinite() && y.signum() as f64 == want.signum() || near,
                    "{op:?}({x}) = {y}"
                );
                continue;
            }
            let err = (y as f64 - want).abs();
            let (abs, rel) = bounds(op, x as f64);
            let ok = if op == Unary::Exp {
                // Results below the smallest normal f32 flush to zero.
                want < 2.7e-38 && y == 0.0 || err <= rel * want.abs()
            } else {
                err <= abs || (want.abs() >= f32::MIN_POSITIVE as f64 && err <= rel * want.abs())
            };
            assert!(ok, "{op:?}({x}) = {y}, want {want} (error {err:e})");
            let scaled = err / want.abs().max(1e-30);
            if scaled > worst.0 && want.abs() > 1e-30 {
                worst = (scaled, x);
            }
        }
        eprintln!(
            "{op:?}: worst relative error {:.2e} at {}",
            worst.0, worst.1
        );
    }
}

#[test]
fn softmax_rows_match_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for n in [1usize, 7, 64, 257, 1000] {
        let rows = 40;
        let mut x: Vec<f32> = (0..rows * n).map(|_| rng.gen_range(-30.0..30.0)).collect();
        // A masked row (as causal attention makes) and one with a NaN.
        for v in &mut x[n..2 * n].iter_mut().skip(1) {
            *v = f32::NEG_INFINITY;
        }
        x[2 * n] = f32::NAN;
        for log in [false, true] {
            let mut y = vec![0f32; x.len()];
            math::softmax(&mut y, &x, n, log);
            for r in 0..rows {
                let row = &x[r * n..(r + 1) * n];
                let got = &y[r * n..(r + 1) * n];
                if r == 2 {
                    assert!(got.iter().all(|v| v.is_nan()), "a NaN spreads over its row");
                    continue;
                }
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                for (&v, &g) in row.iter().zip(got) {
                    let want = if log {
                        v as f64 - m - sum.ln()
                    } else {
                        (v as f64 - m).exp() / sum
                    };
                    if want == f64::NEG_INFINITY {
                        assert_eq!(g, f32::NEG_INFINITY);
                        continue;
                    }
                    let tol = if log {
                        2e-6 * want.abs().max(1.0)
                    } else {
                        1e-6 * want.max(1e-3)
                    };
                    assert!(
                        (g as f64 - want).abs() <= tol,
                        "n {n} row {r}: {g} vs {want} (log {log})"
                    );
                }
            }
        }
    }
}

type A = Autodiff<Flex>;

fn random<B: Backend, const D: usize>(shape: [usize; D], scale: f32, seed: u64) -> Tensor<B, D> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0) * scale).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn max_gap<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

/// Gradient of `sum(f(x) · w)` for a non-contiguous `x` (a permuted view).
fn grad_of(
    f: impl Fn(Tensor<A, 3>) -> Tensor<A, 3>,
    seed: u64,
) -> (Tensor<Flex, 3>, Tensor<Flex, 3>) {
    let x = random::<A, 3>([5, 19, 33], 4.0, seed)
        .permute([0, 2, 1])
        .require_grad();
    let w = random::<A, 3>([5, 33, 19], 1.0, seed + 1);
    let y = f(x.clone());
    let grads = (y.clone() * w).sum().backward();
    (y.inner(), x.grad(&grads).unwrap())
}

#[test]
fn gradients_equal_burns_own_composition() {
    assert_eq!(path::<A>(), Path::Fused);
    for (i, op) in Unary::ALL.into_iter().enumerate() {
        let (y_f, g_f) = grad_of(|x| unary(op, x), i as u64);
        let (y_r, g_r) = grad_of(|x| unary_reference(op, x), i as u64);
        let scale = g_r.clone().abs().max().into_scalar().max(1.0);
        assert!(max_gap(y_f, y_r) < 2e-5 * 60.0, "{op:?} values");
        let gap = max_gap(g_f, g_r);
        assert!(gap <= 2e-5 * scale, "{op:?}: gradient gap {gap}");
    }
    for log in [false, true] {
        let f = |x: Tensor<A, 3>| {
            if log {
                dws_kernels::log_softmax(x)
            } else {
                dws_kernels::softmax(x)
            }
        };
        let (y_f, g_f) = grad_of(f, 9);
        let (y_r, g_r) = grad_of(|x| softmax_reference(x, log), 9);
        assert!(max_gap(y_f, y_r) < 1e-5, "softmax values (log {log})");
        let gap = max_gap(g_f, g_r);
        assert!(gap < 1e-5, "softmax gradient gap {gap} (log {log})");
    }
}

#[test]
fn other_backends_take_burns_operations() {
    // The same CPU backend with another checkpointing strategy is a different backend
    // type: it must take the fallback and give the same numbers as the fused path.
    type Other = Autodiff<Flex, BalancedCheckpointing>;
    assert_eq!(path::<Other>(), Path::Reference);
    assert_eq!(path::<Flex>(), Path::Fused);
    let x_other = random::<Other, 2>([16, 40], 3.0, 4);
    let x_flex = random::<Flex, 2>([16, 40], 3.0, 4);
    for op in Unary::ALL {
        let a = unary(op, x_other.clone()).inner();
        let b = unary(op, x_flex.clone());
        assert!(max_gap(a, b) < 1e-4, "{op:?}");
    }
    let a = dws_kernels::softmax(x_other).inner();
    let b = dws_kernels::softmax(x_flex);
    assert!(max_gap(a, b) < 1e-6);
    // The model-level operations: packed and heads-last attention, layer norm, linear,
    // permutation.
    let lift = |x: &Tensor<Flex, 3>| Tensor::<Other, 3>::from_inner(x.clone());
    let qkv = random::<Flex, 3>([2, 70, 3 * 2 * 32], 1.5, 5);
    let a = dws_kernels::self_attention(lift(&qkv), 2, true).inner();
    let b = dws_kernels::self_attention(qkv.clone(), 2, true);
    assert!(max_gap(a, b) < 2e-5, "self_attention");
    let h = |x: Tensor<Flex, 3>| x.reshape([2, 70, 2, 96]);
    let (q, k, v) = (
        h(qkv.clone()).narrow(3, 0, 32),
        h(qkv.clone()).narrow(3, 32, 32),
        h(qkv).narrow(3, 64, 32),
    );
    let lift4 = |x: &Tensor<Flex, 4>| Tensor::<Other, 4>::from_inner(x.clone());
    let a = dws_kernels::attention_heads_last(lift4(&q), lift4(&k), lift4(&v), false).inner();
    let b = dws_kernels::attention_heads_last(q, k, v, false);
    assert!(max_gap(a, b) < 2e-5, "attention_heads_last");
    let x = random::<Flex, 3>([4, 9, 24], 2.0, 6);
    let norm_other = burn::nn::LayerNormConfig::new(24).init::<Other>(&Default::default());
    let norm_flex = burn::nn::LayerNormConfig::new(24).init::<Flex>(&Default::default());
    let a = dws_kernels::layer_norm(&norm_other, lift(&x)).inner();
    let b = dws_kernels::layer_norm(&norm_flex, x.clone());
    assert!(max_gap(a, b) < 1e-5, "layer_norm");
    let lin_other = burn::nn::LinearConfig::new(24, 7).init::<Other>(&Default::default());
    let lin_flex = lin_other.valid();
    let a = dws_kernels::linear(&lin_other, lift(&x)).inner();
    let b = dws_kernels::linear(&lin_flex, x.clone());
    assert!(max_gap(a, b) < 1e-5, "linear");
    let a = dws_kernels::permute(lift(&x), [2, 0, 1]).inner();
    let b = dws_kernels::permute(x, [2, 0, 1]);
    assert_eq!(max_gap(a, b), 0.0, "permute");
}

#[test]
fn other_dtypes_use_burns_operations() {
    let x = random::<Flex, 2>([3, 5], 2.0, 7);
    let x64 = x.clone().cast(burn::tensor::DType::F64);
    let y64 = unary(Unary::Gelu, x64).cast(burn::tensor::DType::F32);
    assert!(max_gap(y64, unary(Unary::Gelu, x)) < 1e-5);
}

/// Attention by the formula, in f64: `[B, H, L, d]` row-major inputs.
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<&[f32]>,
    dims: [usize; 5],
    causal: bool,
) -> Vec<f64> {
    let [b, h, lq, lk, d] = dims;
    let mut out = vec![0f64; b * h * lq * d];
    for bh in 0..b * h {
        for i in 0..lq {
            let mut s: Vec<f64> = (0..lk)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|c| q[(bh * lq + i) * d + c] as f64 * k[(bh * lk + j) * d + c] as f64)
                        .sum();
                    let mut x = dot / (d as f64).sqrt();
                    if let Some(bias) = bias {
                        x += bias[(bh * lq + i) * lk + j] as f64;
                    }
                    if causal && j > i {
                        x = f64::NEG_INFINITY;
                    }
                    x
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s
                .iter_mut()
                .map(|x| {
                    *x = (*x - m).exp();
                    *x
                })
                .sum();
            for c in 0..d {
                out[(bh * lq + i) * d + c] = (0..lk)
                    .map(|j| s[j] / z * v[(bh * lk + j) * d + c] as f64)
                    .sum();
            }
        }
    }
    out
}

fn values<BB: Backend, const D: usize>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

#[test]
fn attention_is_the_formula_with_and_without_mask_and_bias() {
    // Square, and fewer queries than keys (query i sees keys 0..=i either way).
    for (lq, lk) in [(17, 17), (5, 9)] {
        attention_case(lq, lk);
    }
}

fn attention_case(lq: usize, lk: usize) {
    let (b, h, d) = (2, 3, 8);
    let q = random::<Flex, 4>([b, h, lq, d], 1.5, 20);
    let k = random::<Flex, 4>([b, h, lk, d], 1.5, 21);
    let v = random::<Flex, 4>([b, h, lk, d], 1.0, 22);
    let bias = random::<Flex, 4>([b, h, lq, lk], 2.0, 23);
    for causal in [false, true] {
        for with_bias in [false, true] {
            let want = naive_attention(
                &values(q.clone()),
                &values(k.clone()),
                &values(v.clone()),
                with_bias.then(|| values(bias.clone())).as_deref(),
                [b, h, lq, lk, d],
                causal,
            );
            let bias_t = with_bias.then(|| bias.clone());
            // Inference (burn's fused kernel) and training (the fused softmax).
            let inference = values(dws_kernels::attention(
                q.clone(),
                k.clone(),
                v.clone(),
                bias_t.clone(),
                causal,
            ));
            let training = values(dws_kernels::attention(
                Tensor::<A, 4>::from_inner(q.clone()),
                Tensor::<A, 4>::from_inner(k.clone()),
                Tensor::<A, 4>::from_inner(v.clone()),
                bias_t.map(Tensor::<A, 4>::from_inner),
                causal,
            ));
            // burn's own kernel (taken on other backends and for long sequences) agrees.
            let options = burn::tensor::ops::AttentionModuleOptions {
                is_causal: causal,
                ..Default::default()
            };
            let burn = values(burn::tensor::module::attention(
                q.clone(),
                k.clone(),
                v.clone(),
                None,
                with_bias.then(|| bias.clone()),
                options,
            ));
            // burn's Flex kernel aligns the causal mask differently when the lengths differ
            // (see `dws_kernels::attention`), so it is compared on square scores only.
            let mut paths = vec![("inference", inference), ("training", training)];
            if lq == lk || !causal {
                paths.push(("burn", burn));
            }
            for (name, got) in paths {
                let gap = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (*g as f64 - w).abs())
                    .fold(0.0, f64::max);
                assert!(
                    gap < 2e-5,
                    "{name}, {lq}x{lk}, causal {causal}, bias {with_bias}: gap {gap}"
                );
            }
        }
    }
}

#[test]
fn attention_gradients_equal_burns_composition() {
    let (b, h, l, d) = (2, 2, 24, 16);
    let mk = |seed, shape: [usize; 4], scale| random::<A, 4>(shape, scale, seed).require_grad();
    for causal in [false, true] {
        let grads_of = |fused: bool| {
            let (q, k, v) = (
                mk(30, [b, h, l, d], 1.5),
                mk(31, [b, h, l, d], 1.5),
                mk(32, [b, h, l, d], 1.0),
            );
            let bias = mk(33, [b, h, l, l], 1.0);
            let w = random::<A, 4>([b, h, l, d], 1.0, 34);
            let out = if fused {
                dws_kernels::attention(q.clone(), k.clone(), v.clone(), Some(bias.clone()), causal)
            } else {
                dws_kernels::attention_composed(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(bias.clone()),
                    causal,
                    |s| softmax_reference(s, false),
                )
            };
            let g = (out * w).sum().backward();
            [q, k, v, bias].map(|t| t.grad(&g).unwrap())
        };
        let (f, r) = (grads_of(true), grads_of(false));
        for (i, (gf, gr)) in f.into_iter().zip(r).enumerate() {
            let gap = max_gap(gf, gr);
            assert!(gap < 1e-5, "causal {causal}: gradient {i} differs by {gap}");
        }
    }
}

#[test]
fn modulation_and_its_gradients_equal_burns_composition() {
    let (b, f, n, d) = (2, 3, 5, 7);
    let run = |fused: bool| {
        let x = random::<A, 4>([b, f, n, d], 2.0, 40).require_grad();
        // Shift and scale as the models make them: halves of one projection.
        let m = random::<A, 3>([b, f, 2 * d], 1.0, 41).require_grad();
        let shift = m.clone().narrow(2, 0, d).unsqueeze_dim::<4>(2);
        let scale = m.clone().narrow(2, d, d).unsqueeze_dim::<4>(2);
        let w = random::<A, 4>([b, f, n, d], 1.0, 42);
        let y = if fused {
            dws_kernels::modulate(x.clone(), shift, scale)
        } else {
            x.clone() * (scale + 1.0) + shift
        };
        let grads = (y.clone() * w).sum().backward();
        (y.inner(), x.grad(&grads).unwrap(), m.grad(&grads).unwrap())
    };
    let (yf, dxf, dmf) = run(true);
    let (yr, dxr, dmr) = run(false);
    assert!(max_gap(yf, yr) < 1e-5);
    assert!(max_gap(dxf, dxr) < 1e-5);
    assert!(max_gap(dmf, dmr) < 1e-4);
    // Without autodiff too.
    let x = random::<Flex, 4>([b, f, n, d], 2.0, 43);
    let sh = random::<Flex, 4>([b, f, 1, d], 1.0, 44);
    let sc = random::<Flex, 4>([b, f, 1, d], 1.0, 45);
    let want = x.clone() * (sc.clone() + 1.0) + sh.clone();
    assert!(max_gap(dws_kernels::modulate(x, sh, sc), want) < 1e-5);
}

#[test]
fn convolution_and_pooling_and_their_gradients_equal_burns_operations() {
    use burn::tensor::module::{conv2d, max_pool2d};
    use burn::tensor::ops::ConvOptions;
    // A conv → pool → conv chain like the IMPALA body, with odd sizes and a batch large
    // enough that the convolution groups images.
    let run = |fused: bool| {
        let x = random::<A, 4>([37, 3, 9, 7], 1.0, 50).require_grad();
        let w1 = random::<A, 4>([5, 3, 3, 3], 0.5, 51).require_grad();
        let b1 = random::<A, 1>([5], 0.5, 52).require_grad();
        let w2 = random::<A, 4>([4, 5, 3, 3], 0.5, 53).require_grad();
        let b2 = random::<A, 1>([4], 0.5, 54).require_grad();
        let y = if fused {
            let h = dws_kernels::conv2d(x.clone(), w1.clone(), b1.clone(), [1, 1]);
            let h = dws_kernels::max_pool2d(h, [3, 3], [2, 2], [1, 1]);
            dws_kernels::conv2d(h, w2.clone(), b2.clone(), [1, 1])
        } else {
            let opts = || ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            let h = conv2d(x.clone(), w1.clone(), Some(b1.clone()), opts());
            let h = max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false);
            conv2d(h, w2.clone(), Some(b2.clone()), opts())
        };
        let wy = random::<A, 4>(y.dims(), 1.0, 55);
        let grads = (y.clone() * wy).sum().backward();
        let g = |t: &Tensor<A, 4>| t.grad(&grads).unwrap();
        let gb = |t: &Tensor<A, 1>| t.grad(&grads).unwrap();
        (y.inner(), [g(&x), g(&w1), g(&w2)], [gb(&b1), gb(&b2)])
    };
    let (yf, gf, bf) = run(true);
    let (yr, gr, br) = run(false);
    assert_eq!(yf.dims(), [37, 4, 5, 4]);
    assert!(max_gap(yf, yr) < 1e-4);
    for (a, b) in gf.into_iter().zip(gr) {
        assert!(max_gap(a, b) < 1e-3);
    }
    for (a, b) in bf.into_iter().zip(br) {
        let gap = (a - b).abs().max().into_scalar();
        assert!(gap < 1e-3, "bias gradient gap {gap}");
    }
}

#[test]
fn flash_attention_is_the_formula_across_tile_edges() {
    // Lengths around the 64-row tiles, a value width other than the key width.
    for (lq, lk, causal) in [
        (1, 1, true),
        (70, 70, true),
        (130, 130, true),
        (64, 64, false),
        (5, 150, false),
        (129, 3, false),
        (40, 88, false),
    ] {
        // Widths the register-tiled products take (AVX-512: 32, 64; AVX2: multiples of
        // 8, in blocks of 16 and one of 8) and ones `gemm` takes.
        for (d, dv) in [(16, 8), (32, 64), (64, 32), (24, 40)] {
            let (b, h) = (2, 2);
            let q = random::<Flex, 4>([b, h, lq, d], 1.5, 50);
            let k = random::<Flex, 4>([b, h, lk, d], 1.5, 51);
            let v = random::<Flex, 4>([b, h, lk, dv], 1.0, 52);
            let (qs, ks, vs) = (values(q.clone()), values(k.clone()), values(v.clone()));
            // The f64 formula, per value column (naive_attention takes dv == d).
            let mut want = vec![0f64; b * h * lq * dv];
            for c in 0..dv {
                let vc: Vec<f32> = (0..b * h * lk)
                    .flat_map(|r| {
                        let mut row = vec![0f32; d];
                        row[0] = vs[r * dv + c];
                        row
                    })
                    .collect();
                let o = naive_attention(&qs, &ks, &vc, None, [b, h, lq, lk, d], causal);
                for r in 0..b * h * lq {
                    want[r * dv + c] = o[r * d];
                }
            }
            for (name, got) in [
                (
                    "inference",
                    values(dws_kernels::flash_attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        causal,
                    )),
                ),
                (
                    "training",
                    values(dws_kernels::flash_attention(
                        Tensor::<A, 4>::from_inner(q.clone()),
                        Tensor::<A, 4>::from_inner(k.clone()),
                        Tensor::<A, 4>::from_inner(v.clone()),
                        causal,
                    )),
                ),
            ] {
                let gap = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (*g as f64 - w).abs())
                    .fold(0.0, f64::max);
                assert!(
                    gap < 2e-5,
                    "{name}, {lq}x{lk}, d {d}, dv {dv}, causal {causal}: gap {gap}"
                );
            }
        }
    }
}

#[test]
fn flash_attention_gradients_equal_burns_composition() {
    for (l, lk, causal, d) in [
        (100, 100, true, 16),
        (70, 70, false, 16),
        (40, 90, false, 16),
        (130, 130, true, 32),
        (64, 150, false, 64),
        (88, 88, true, 24),
        (50, 88, false, 40),
    ] {
        let (b, h) = (2, 2);
        let mk = |seed, shape: [usize; 4], scale| random::<A, 4>(shape, scale, seed).require_grad();
        let grads_of = |flash: bool| {
            let (q, k, v) = (
                mk(60, [b, h, l, d], 1.5),
                mk(61, [b, h, lk, d], 1.5),
                mk(62, [b, h, lk, d], 1.0),
            );
            let w = random::<A, 4>([b, h, l, d], 1.0, 63);
            let out = if flash {
                dws_kernels::flash_attention(q.clone(), k.clone(), v.clone(), causal)
            } else {
                dws_kernels::attention_composed(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    causal,
                    |s| softmax_reference(s, false),
                )
            };
            let g = (out * w).sum().backward();
            [q, k, v].map(|t| t.grad(&g).unwrap())
        };
        let (f, r) = (grads_of(true), grads_of(false));
        for (i, (gf, gr)) in f.into_iter().zip(r).enumerate() {
            let gap = max_gap(gf, gr);
            assert!(
                gap < 1e-4,
                "{l}x{lk} causal {causal}: gradient {i} differs by {gap}"
            );
        }
    }
}

#[test]
fn layer_norm_and_its_gradients_equal_burns() {
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    // Widths with and without a remainder after the 16 lanes; an epsilon that matters
    // (inputs of small spread) and the default one.
    for (rows, d, eps, spread) in [
        (300, 192, 1e-5, 2.0),
        (5, 7, 0.1, 0.2),
        (130, 48, 1e-5, 1e3),
    ] {
        let mut norm = LayerNormConfig::new(d)
            .with_epsilon(eps)
            .init::<A>(&Default::default());
        // The fused path needs the epsilon, which burn keeps private.
        assert_eq!(dws_kernels::layer_norm_epsilon(&norm), Some(eps));
        norm.gamma = Param::from_tensor(random::<A, 1>([d], 1.0, 90) + 1.0);
        norm.beta = Some(Param::from_tensor(random::<A, 1>([d], 1.0, 91)));
        let x = random::<Flex, 3>([2, rows, d], spread, 92);
        let w = random::<A, 3>([2, rows, d], 1.0, 93);
        let run = |fused: bool| {
            let xa = Tensor::<A, 3>::from_inner(x.clone()).require_grad();
            let y = if fused {
                dws_kernels::layer_norm(&norm, xa.clone())
            } else {
                norm.forward(xa.clone())
            };
            let g = (y.clone() * w.clone()).sum().backward();
            let gamma = norm.gamma.val().grad(&g).unwrap();
            let beta = norm.beta.as_ref().unwrap().val().grad(&g).unwrap();
            (y.inner(), xa.grad(&g).unwrap(), gamma, beta)
        };
        let (f, r) = (run(true), run(false));
        let what = format!("{rows} rows of {d}, eps {eps}, spread {spread}");
        let tol = 1e-4 * (d as f32).sqrt();
        assert!(max_gap(f.0, r.0) < 1e-4, "{what}: outputs differ");
        let gap = max_gap(f.1, r.1);
        assert!(gap < tol / spread, "{what}: x gradients differ by {gap}");
        let gap = max_gap(f.2, r.2);
        assert!(
            gap < tol * (rows as f32).sqrt(),
            "{what}: gamma gradients differ by {gap}"
        );
        let gap = max_gap(f.3, r.3);
        assert!(
            gap < tol * (rows as f32).sqrt(),
            "{what}: beta gradients differ by {gap}"
        );
    }
}

#[test]
fn permute_and_its_gradient_equal_burns() {
    let shape = [3, 2, 4, 5, 3, 2];
    let axes = [0, 2, 4, 3, 5, 1];
    let x = random::<Flex, 6>(shape, 1.0, 95);
    let out_dims = axes.map(|a| shape[a]);
    let w = random::<A, 6>(out_dims, 1.0, 96);
    let run = |fused: bool| {
        let xa = Tensor::<A, 6>::from_inner(x.clone()).require_grad();
        let y = if fused {
            dws_kernels::permute(xa.clone(), axes)
        } else {
            xa.clone().permute(axes)
        };
        // A reshape after the permutation, as the patch embedding does.
        let g = (y.clone() * w.clone()).reshape([-1]).sum().backward();
        (y.inner(), xa.grad(&g).unwrap())
    };
    let (f, r) = (run(true), run(false));
    assert_eq!(f.0.dims(), out_dims);
    assert_eq!(max_gap(f.0, r.0), 0.0, "outputs differ");
    assert_eq!(max_gap(f.1, r.1), 0.0, "gradients differ");
}

#[test]
fn heads_last_attention_and_its_gradients_equal_burns_composition() {
    // (batch, lq, lk, heads, d, dv, causal), across tile edges and both tile widths.
    for (b, lq, lk, h, d, dv, causal) in [
        (2, 70, 70, 3, 16, 8, true),
        (2, 40, 130, 2, 32, 32, false),
        (1, 129, 129, 2, 64, 32, true),
        (3, 1, 90, 4, 32, 64, false),
    ] {
        let q = random::<Flex, 4>([b, lq, h, d], 1.5, 100);
        let k = random::<Flex, 4>([b, lk, h, d], 1.5, 101);
        let v = random::<Flex, 4>([b, lk, h, dv], 1.0, 102);
        let w = random::<A, 3>([b, lq, h * dv], 1.0, 103);
        let run = |fused: bool| {
            let leaf = |x: &Tensor<Flex, 4>| Tensor::<A, 4>::from_inner(x.clone()).require_grad();
            let (qa, ka, va) = (leaf(&q), leaf(&k), leaf(&v));
            let y = if fused {
                dws_kernels::attention_heads_last(qa.clone(), ka.clone(), va.clone(), causal)
            } else {
                let t = |x: Tensor<A, 4>| x.swap_dims(1, 2);
                dws_kernels::attention_composed(
                    t(qa.clone()),
                    t(ka.clone()),
                    t(va.clone()),
                    None,
                    causal,
                    |s| softmax_reference(s, false),
                )
                .swap_dims(1, 2)
                .reshape([b, lq, h * dv])
            };
            let g = (y.clone() * w.clone()).sum().backward();
            let grads = [&qa, &ka, &va].map(|x| x.grad(&g).unwrap());
            (y.inner(), grads)
        };
        let (f, r) = (run(true), run(false));
        let what = format!("b {b}, {lq}x{lk}, {h} heads, d {d}, dv {dv}, causal {causal}");
        let gap = max_gap(f.0, r.0);
        assert!(gap < 2e-5, "{what}: outputs differ by {gap}");
        for (i, (gf, gr)) in f.1.into_iter().zip(r.1).enumerate() {
            let gap = max_gap(gf, gr);
            assert!(gap < 1e-4, "{what}: gradient {i} differs by {gap}");
        }
    }
}

/// Packed self-attention through burn's operations alone: split the heads, matmuls and
/// burn's softmax, merge the heads.
fn self_attention_by_burn<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [b, l, w3] = qkv.dims();
    let d = w3 / 3;
    let split = |i: usize| {
        qkv.clone()
            .narrow(2, i * d, d)
            .reshape([b, l, heads, d / heads])
            .swap_dims(1, 2)
    };
    dws_kernels::attention_composed(split(0), split(1), split(2), None, causal, |s| {
        softmax_reference(s, false)
    })
    .swap_dims(1, 2)
    .reshape([b, l, d])
}

#[test]
fn packed_self_attention_and_its_gradient_equal_burns_composition() {
    // Lengths around the 64-row tiles; one head and several.
    for (b, l, heads, hd, causal) in [
        (2, 70, 3, 16, true),
        (2, 130, 2, 8, false),
        (1, 1, 1, 4, true),
        (3, 64, 4, 8, false),
        (1, 129, 2, 32, true),
        (2, 200, 2, 64, false),
        (2, 96, 3, 32, false),
    ] {
        let qkv = random::<Flex, 3>([b, l, 3 * heads * hd], 1.5, 80);
        let want = self_attention_by_burn(qkv.clone(), heads, causal);
        let got = dws_kernels::self_attention(qkv.clone(), heads, causal);
        let split = dws_kernels::self_attention_split(qkv.clone(), heads, causal);
        let what = format!("b {b}, l {l}, {heads} heads of {hd}, causal {causal}");
        let gap = max_gap(got, want.clone());
        assert!(gap < 2e-5, "{what}: packed output differs by {gap}");
        let gap = max_gap(split, want);
        assert!(gap < 2e-5, "{what}: split output differs by {gap}");
        let grad = |packed: bool| {
            let x = Tensor::<A, 3>::from_inner(qkv.clone()).require_grad();
            let w = random::<A, 3>([b, l, heads * hd], 1.0, 81);
            let y = if packed {
                dws_kernels::self_attention(x.clone(), heads, causal)
            } else {
                self_attention_by_burn(x.clone(), heads, causal)
            };
            let g = (y * w).sum().backward();
            x.grad(&g).unwrap()
        };
        let gap = max_gap(grad(true), grad(false));
        assert!(gap < 1e-4, "{what}: packed gradient differs by {gap}");
    }
}

#[test]
fn rotary_positions_match_burns_rotary_encoding_and_their_gradients_burns_ops() {
    use burn::nn::RotaryEncodingConfig;
    let (b, l, h, d, start) = (2, 9, 3, 8, 4);
    let x = random::<Flex, 4>([b, l, h, d], 2.0, 70);
    // burn's module takes [.., L, d] with positions along the second-to-last dimension.
    let rope = RotaryEncodingConfig::new(start + l, d).init::<Flex>(&Default::default());
    let want = rope.apply(x.clone().swap_dims(1, 2), start).swap_dims(1, 2);
    let fused = dws_kernels::rotary(x.clone(), start, 10_000.0);
    let reference = dws_kernels::rotary_reference(x.clone(), start, 10_000.0);
    assert!(max_gap(fused, want.clone()) < 1e-5);
    assert!(max_gap(reference, want) < 1e-5);
    let grads = |fused: bool| {
        let xa = Tensor::<A, 4>::from_inner(x.clone()).require_grad();
        let w = random::<A, 4>([b, l, h, d], 1.0, 71);
        let y = if fused {
            dws_kernels::rotary(xa.clone(), start, 10_000.0)
        } else {
            dws_kernels::rotary_reference(xa.clone(), start, 10_000.0)
        };
        let g = (y * w).sum().backward();
        xa.grad(&g).unwrap()
    };
    assert!(max_gap(grads(true), grads(false)) < 1e-5);
}

#[test]
fn linear_and_its_gradients_equal_burns() {
    use burn::module::Param;
    use burn::nn::LinearConfig;
    // (input dims, outputs, bias): the toy step's rows (products split over threads),
    // a long reduction with narrow outputs, a small product done on one thread, a 2-D
    // and a 4-D input, and no bias.
    let cases: [(&[usize], usize, bool); 6] = [
        (&[8, 256, 192], 576, true),
        (&[2, 1024, 64], 48, true),
        (&[3, 5, 7], 9, true),
        (&[40, 33], 17, true),
        (&[2, 3, 4, 24], 40, true),
        (&[6, 50, 30], 70, false),
    ];
    for (dims, d_out, bias) in cases {
        let d_in = *dims.last().unwrap();
        let mut layer = LinearConfig::new(d_in, d_out)
            .with_bias(bias)
            .init::<A>(&Default::default());
        layer.weight = Param::from_tensor(random::<A, 2>([d_in, d_out], 1.0, 97));
        if bias {
            layer.bias = Some(Param::from_tensor(random::<A, 1>([d_out], 1.0, 98)));
        }
        let what = format!("{dims:?} into {d_out} (bias {bias})");
        // Through rank-erased helpers: the cases differ in rank.
        macro_rules! check {
            ($rank:literal) => {{
                let shape: [usize; $rank] = dims.try_into().unwrap();
                let x = random::<Flex, $rank>(shape, 1.0, 99);
                let mut out_shape = shape;
                out_shape[$rank - 1] = d_out;
                let w = random::<A, $rank>(out_shape, 1.0, 100);
                let run = |fused: bool| {
                    let xa = Tensor::<A, $rank>::from_inner(x.clone()).require_grad();
                    let y = if fused {
                        dws_kernels::linear(&layer, xa.clone())
                    } else {
                        layer.forward(xa.clone())
                    };
                    let g = (y.clone() * w.clone()).sum().backward();
                    let dw = layer.weight.val().grad(&g).unwrap();
                    let db = layer.bias.as_ref().map(|b| b.val().grad(&g).unwrap());
                    (y.inner(), xa.grad(&g).unwrap(), dw, db)
                };
                let (f, r) = (run(true), run(false));
                // Sums over k = d_in terms forward, d_out for dx, the rows for dw, db.
                let rows = (x.dims().iter().product::<usize>() / d_in) as f32;
                let gap = max_gap(f.0, r.0);
                assert!(gap < 1e-5 * d_in as f32, "{what}: outputs differ by {gap}");
                let gap = max_gap(f.1, r.1);
                assert!(
                    gap < 1e-5 * d_out as f32,
                    "{what}: x gradients differ by {gap}"
                );
                let gap = max_gap(f.2, r.2);
                assert!(
                    gap < 1e-5 * rows,
                    "{what}: weight gradients differ by {gap}"
                );
                match (f.3, r.3) {
                    (Some(fb), Some(rb)) => {
                        let gap = max_gap(fb, rb);
                        assert!(gap < 1e-5 * rows, "{what}: bias gradients differ by {gap}");
                    }
                    (None, None) => {}
                    _ => panic!("{what}: one path has a bias gradient, the other not"),
                }
                // Without autodiff (inference) the same values.
                let inner = layer.valid();
                let gap = max_gap(
                    dws_kernels::linear(&inner, x.clone()),
                    inner.forward(x.clone()),
                );
                assert!(
                    gap < 1e-5 * d_in as f32,
                    "{what}: inference outputs differ by {gap}"
                );
            }};
        }
        match dims.len() {
            2 => check!(2),
            3 => check!(3),
            4 => check!(4),
            _ => unreachable!(),
        }
    }
}

#[test]
fn matrix_products_match_f64_for_every_start_and_layout() {
    use dws_kernels::mm::{column_sums, matmul, Init, View};
    let mut rng = ChaCha8Rng::seed_from_u64(101);
    // On one thread, split by rows, a long reduction; transposed operands.
    for (m, n, k) in [(5, 7, 3), (300, 130, 200), (64, 96, 3000), (1, 1, 1)] {
        for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            // Element (i, p) of A and (p, j) of B as stored.
            let av = if at {
                View::transposed(&a, m)
            } else {
                View::rows(&a, k)
            };
            let bv = if bt {
                View::transposed(&b, k)
            } else {
                View::rows(&b, n)
            };
            let a_at = |i: usize, p: usize| if at { a[p * m + i] } else { a[i * k + p] };
            let b_at = |p: usize, j: usize| if bt { b[j * k + p] } else { b[p * n + j] };
            for start in 0..3 {
                let mut c = c0.clone();
                let init = match start {
                    0 => Init::Zero,
                    1 => Init::Bias(&bias),
                    _ => Init::Accumulate,
                };
                let slots = unsafe {
                    // SAFETY: MaybeUninit<f32> has f32's layout; every value is initialised.
                    &mut *(c.as_mut_slice() as *mut [f32] as *mut [std::mem::MaybeUninit<f32>])
                };
                matmul(m, n, k, av, bv, slots, init);
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 =
                            (0..k).map(|p| a_at(i, p) as f64 * b_at(p, j) as f64).sum();
                        want += match start {
                            0 => 0.0,
                            1 => bias[j] as f64,
                            _ => c0[i * n + j] as f64,
                        };
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (k as f64).sqrt() + 1e-6,
                            "{m}x{k}x{n} at {at} bt {bt} start {start}: ({i}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
    let g: Vec<f32> = (0..700 * 9).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let sums = column_sums(&g, 700, 9);
    for (j, &s) in sums.iter().enumerate() {
        let want: f64 = (0..700).map(|i| g[i * 9 + j] as f64).sum();
        assert!((s as f64 - want).abs() < 1e-4, "column {j}: {s} vs {want}");
    }
}

#[test]
fn flash_attention_carries_nan_to_its_row_only_and_masked_keys_weigh_nothing() {
    // A NaN in one query gives that query's output NaN (as the formula does) and leaves
    // the other rows finite; causal rows ignore later keys however large they are.
    let (b, h, l, d) = (1, 2, 130, 32);
    let mut q = values(random::<Flex, 4>([b, h, l, d], 1.0, 102));
    q[5 * d + 3] = f32::NAN; // head 0, query 5
    let q = Tensor::<Flex, 4>::from_data(TensorData::new(q, [b, h, l, d]), &Default::default());
    let k = random::<Flex, 4>([b, h, l, d], 1.0, 103);
    let v = random::<Flex, 4>([b, h, l, d], 1.0, 104);
    let out = values(dws_kernels::attention(
        q.clone(),
        k.clone(),
        v.clone(),
        None,
        false,
    ));
    for (row, vals) in out.chunks(d).enumerate() {
        let nan = vals.iter().any(|x| x.is_nan());
        assert_eq!(
            nan,
            row == 5,
            "row {row} (head {}, query {})",
            row / l,
            row % l
        );
    }
    // Keys after query i scaled up a thousandfold change nothing before them.
    let big: Vec<f32> = values(k.clone())
        .chunks(d)
        .enumerate()
        .flat_map(|(r, c)| {
            let f = if r % l > 64 { 1000.0 } else { 1.0 };
            c.iter().map(move |x| x * f).collect::<Vec<_>>()
        })
        .collect();
    let kb = Tensor::<Flex, 4>::from_data(TensorData::new(big, [b, h, l, d]), &Default::default());
    let q = random::<Flex, 4>([b, h, l, d], 1.0, 105);
    let a = values(dws_kernels::attention(q.clone(), k, v.clone(), None, true));
    let c = values(dws_kernels::attention(q, kb, v, None, true));
    for i in 0..b * h * l {
        if i % l <= 64 {
            assert_eq!(a[i * d..(i + 1) * d], c[i * d..(i + 1) * d], "query {i}");
        }
    }
}

#[test]
fn gradients_written_in_place_equal_the_ones_written_apart() {
    // Lengths below, at and above the parallel chunk (2^15) and the on-stack block (1024).
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for len in [5, 1024, 1500, (1 << 15) + 37, 3 << 16] {
        let x: Vec<f32> = (0..len).map(|_| rng.gen_range(-9.0..9.0)).collect();
        let g: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect();
        for op in Unary::ALL {
            let mut want = vec![0.0; len];
            math::backward(op, &mut want, &x, &g);
            let mut got = g.clone();
            math::backward_in_place(op, &mut got, &x, false);
            assert_eq!(got, want, "{op:?} at {len}");
            if op.grad_from_output() {
                let mut y = vec![0.0; len];
                math::forward(op, &mut y, &x);
                let mut got = g.clone();
                math::backward_in_place(op, &mut got, &y, true);
                assert_eq!(got, want, "{op:?} from its output at {len}");
            }
        }
        for (n, log) in [(5, false), (5, true), (len, false), (len, true)] {
            if len % n != 0 {
                continue;
            }
            let mut y = vec![0.0; len];
            math::softmax(&mut y, &x, n, log);
            let mut want = vec![0.0; len];
            math::softmax_backward(&mut want, &y, &g, n, log);
            let mut got = g.clone();
            math::softmax_backward_in_place(&mut got, &y, n, log);
            assert_eq!(got, want, "softmax (log {log}) rows of {n} at {len}");
        }
    }
}
