//! `dws bench ops`: burn's own operations against the fused kernels (`dws-kernels`) at
//! the shapes dws models use, and, given the PyTorch peer's output
//! (`scripts/bench_ops_torch.py`), both against PyTorch eager.

use super::bench::emit;
use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_kernels::Unary;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

pub struct OpsBench {
    /// Seconds per measurement at most (at least 5 timed runs).
    pub seconds: f64,
    /// JSON lines of the PyTorch peer, for ratios against PyTorch.
    pub torch: Option<PathBuf>,
    /// Only the first shape of each operation.
    pub quick: bool,
    /// Only the measurements whose `<op>/<shape>` name contains this text.
    pub only: Option<String>,
}

impl OpsBench {
    /// Whether `<op>/<shape>` is to be measured.
    fn wants(&self, op: &str, shape: &[usize]) -> bool {
        self.only
            .as_deref()
            .is_none_or(|o| format!("{op}/{}", shape_name(shape)).contains(o))
    }
}

/// Median milliseconds of `f` after two warm-up runs.
fn time_ms(seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    // As the PyTorch peer times: at least 5 runs, then runs until `seconds` have passed
    // (a cap on the count made fast operations a 50 ms sample, swayed by one burst of
    // another process, against PyTorch's full second).
    while times.len() < 5 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, 3.0), device)
}

fn shape_name(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// An operation with burn's composition and the fused kernel, on any backend.
trait Op {
    fn name(&self) -> &'static str;
    fn burn<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
    fn fused<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>;
}

impl Op for Unary {
    fn name(&self) -> &'static str {
        Unary::name(*self)
    }
    fn burn<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        dws_kernels::unary_reference(*self, x)
    }
    fn fused<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        dws_kernels::unary(*self, x)
    }
}

/// Softmax (`false`) or log-softmax (`true`) along the last dimension.
struct Softmax(bool);

impl Op for Softmax {
    fn name(&self) -> &'static str {
        if self.0 {
            "log_softmax"
        } else {
            "softmax"
        }
    }
    fn burn<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        dws_kernels::softmax_reference(x, self.0)
    }
    fn fused<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.0 {
            dws_kernels::log_softmax(x)
        } else {
            dws_kernels::softmax(x)
        }
    }
}

/// One operation measured both ways, forward (no autodiff) and forward+backward.
fn measure<B: AutodiffBackend, const D: usize>(
    op: &impl Op,
    shape: [usize; D],
    seconds: f64,
    device: &B::Device,
    out: &mut Vec<(String, f64)>,
) -> Result<()> {
    let x = random::<B::InnerBackend, D>(shape, device);
    let base = format!("ops/{}/{}", op.name(), shape_name(&shape));
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"));
    let fwd = |fused: bool| {
        time_ms(seconds, || {
            let y = if fused {
                op.fused(x.clone())
            } else {
                op.burn(x.clone())
            };
            drop(y);
            let _ = sync();
        })
    };
    let fwdbwd = |fused: bool| {
        time_ms(seconds, || {
            let xa = Tensor::<B, D>::from_inner(x.clone()).require_grad();
            let y = if fused {
                op.fused(xa.clone())
            } else {
                op.burn(xa.clone())
            };
            let grads = y.backward();
            let _ = xa.grad(&grads);
            let _ = sync();
        })
    };
    let results = [
        ("fwd", fwd(false), fwd(true)),
        ("fwdbwd", fwdbwd(false), fwdbwd(true)),
    ];
    sync()?;
    record(&base, &results, out);
    Ok(())
}

/// Attention on `[B, H, L, d]` queries, keys and values: burn's `attention` against
/// `dws_kernels::attention` (its flash-style kernel), and the composed form (matmuls and
/// the fused softmax) that dws used before.
fn measure_attention<B: AutodiffBackend>(
    shape: [usize; 4],
    causal: bool,
    seconds: f64,
    device: &B::Device,
    out: &mut Vec<(String, f64)>,
) -> Result<()> {
    let name = if causal {
        "attention_causal"
    } else {
        "attention"
    };
    let base = format!("ops/{name}/{}", shape_name(&shape));
    let qkv: Vec<Tensor<B::InnerBackend, 4>> = (0..3)
        .map(|_| random::<B::InnerBackend, 4>(shape, device))
        .collect();
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"));
    let options = burn::tensor::ops::AttentionModuleOptions {
        is_causal: causal,
        ..Default::default()
    };
    // 0: burn, 1: dws_kernels::attention (the flash kernel here), 2: the composed form
    // (matmuls and the fused softmax, the mask inside it when causal) it replaced.
    let run = |which: u8, q, k, v| match which {
        0 => burn::tensor::module::attention(q, k, v, None, None, options),
        1 => dws_kernels::attention(q, k, v, None, causal),
        _ if causal => {
            dws_kernels::attention_composed(q, k, v, None, false, dws_kernels::softmax_causal)
        }
        _ => dws_kernels::attention_composed(q, k, v, None, false, dws_kernels::softmax),
    };
    let fwd = |which: u8| {
        time_ms(seconds, || {
            let (q, k, v) = (qkv[0].clone(), qkv[1].clone(), qkv[2].clone());
            let y = run(which, q, k, v);
            drop(y);
            let _ = sync();
        })
    };
    let run_ad = |which: u8, q, k, v| match which {
        0 => burn::tensor::module::attention(q, k, v, None, None, options),
        1 => dws_kernels::attention(q, k, v, None, causal),
        _ if causal => {
            dws_kernels::attention_composed(q, k, v, None, false, dws_kernels::softmax_causal)
        }
        _ => dws_kernels::attention_composed(q, k, v, None, false, dws_kernels::softmax),
    };
    let fwdbwd = |which: u8| {
        time_ms(seconds, || {
            let t: Vec<Tensor<B, 4>> = qkv
                .iter()
                .map(|x| Tensor::<B, 4>::from_inner(x.clone()).require_grad())
                .collect();
            let (q, k, v) = (t[0].clone(), t[1].clone(), t[2].clone());
            let y = run_ad(which, q, k, v);
            let grads = y.backward();
            for x in &t {
                let _ = x.grad(&grads);
            }
            let _ = sync();
        })
    };
    let (f0, f1, f2) = (fwd(0), fwd(1), fwd(2));
    let (b0, b1, b2) = (fwdbwd(0), fwdbwd(1), fwdbwd(2));
    sync()?;
    record(&base, &[("fwd", f0, f1), ("fwdbwd", b0, b1)], out);
    // The composed form (matmuls and the fused softmax) the flash kernel replaced.
    for (pass, flash, composed) in [("fwd", f1, f2), ("fwdbwd", b1, b2)] {
        let key = format!("{base}/{pass}");
        emit(&format!("{key}/composed_ms"), composed, "ms");
        emit(&format!("{key}/fused_vs_composed"), composed / flash, "x");
    }
    Ok(())
}

/// Layer norm over the last dimension of `[8, 256, 192]` with its scale and shift:
/// burn's `LayerNorm` against `dws_kernels::layer_norm`; forward+backward takes the
/// gradients of the input, the scale and the shift.
/// The DESIGN "Backends" toy step's activations.
const LAYER_NORM_SHAPE: [usize; 3] = [8, 256, 192];

fn measure_layer_norm<B: AutodiffBackend>(
    seconds: f64,
    device: &B::Device,
    out: &mut Vec<(String, f64)>,
) -> Result<()> {
    let shape = LAYER_NORM_SHAPE;
    let base = format!("ops/layer_norm/{}", shape_name(&shape));
    let norm = burn::nn::LayerNormConfig::new(shape[2]).init::<B>(device);
    let inner = norm.valid();
    let x = random::<B::InnerBackend, 3>(shape, device);
    let fwd = |fused: bool| {
        let y = if fused {
            dws_kernels::layer_norm(&inner, x.clone())
        } else {
            inner.forward(x.clone())
        };
        drop(y);
    };
    let fwdbwd = |fused: bool| {
        let xa = Tensor::<B, 3>::from_inner(x.clone()).require_grad();
        let y = if fused {
            dws_kernels::layer_norm(&norm, xa.clone())
        } else {
            norm.forward(xa.clone())
        };
        let grads = y.backward();
        let _ = xa.grad(&grads);
        let _ = norm.gamma.val().grad(&grads);
    };
    both_ways::<B>(&base, seconds, device, out, fwd, fwdbwd)
}

/// Times `fwd` and `fwdbwd` (each called with `false` for burn's operations, `true`
/// for the kernels) and records them under `base`.
fn both_ways<B: AutodiffBackend>(
    base: &str,
    seconds: f64,
    device: &B::Device,
    out: &mut Vec<(String, f64)>,
    fwd: impl Fn(bool),
    fwdbwd: impl Fn(bool),
) -> Result<()> {
    let sync = || B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"));
    let time = |f: &dyn Fn(bool), fused: bool| {
        time_ms(seconds, || {
            f(fused);
            let _ = sync();
        })
    };
    let results = [
        ("fwd", time(&fwd, false), time(&fwd, true)),
        ("fwdbwd", time(&fwdbwd, false), time(&fwdbwd, true)),
    ];
    sync()?;
    record(base, &results, out);
    Ok(())
}

/// The linear layers of the DESIGN "Backends" toy step on its `[8, 256, 192]` tokens
/// (the fused attention's input projection, the MLP's two layers): `Linear::forward`
/// on the 3-D input (a matrix product per batch item) against `dws_kernels::linear`
/// (one product over the flattened rows); forward+backward takes the gradients of the
/// input, the weight and the bias. These are matrix products, where the kernels crate
/// calls the `gemm` crate rather than a kernel of its own.
fn measure_linear<B: AutodiffBackend>(
    [d_in, d_out]: [usize; 2],
    seconds: f64,
    device: &B::Device,
    out: &mut Vec<(String, f64)>,
) -> Result<()> {
    let shape = [8, 256, d_in];
    let base = format!("ops/linear/{}x{d_out}", shape_name(&shape));
    let layer = burn::nn::LinearConfig::new(d_in, d_out).init::<B>(device);
    let inner = layer.valid();
    let x = random::<B::InnerBackend, 3>(shape, device);
    let fwd = |fused: bool| {
        let y = if fused {
            dws_kernels::linear(&inner, x.clone())
        } else {
            inner.forward(x.clone())
        };
        drop(y);
    };
    let fwdbwd = |fused: bool| {
        let xa = Tensor::<B, 3>::from_inner(x.clone()).require_grad();
        let y = if fused {
            dws_kernels::linear(&layer, xa.clone())
        } else {
            layer.forward(xa.clone())
        };
        let grads = y.backward();
        let _ = xa.grad(&grads);
        let _ = layer.weight.val().grad(&grads);
    };
    both_ways::<B>(&base, seconds, device, out, fwd, fwdbwd)
}

/// Prints and keeps each pass's times and their ratio.
fn record(base: &str, results: &[(&str, f64, f64)], out: &mut Vec<(String, f64)>) {
    for &(pass, b, f) in results {
        let key = format!("{base}/{pass}");
        emit(&format!("{key}/burn_ms"), b, "ms");
        emit(&format!("{key}/fused_ms"), f, "ms");
        emit(&format!("{key}/speedup"), b / f, "x");
        out.push((format!("{key}/burn_ms"), b));
        out.push((format!("{key}/fused_ms"), f));
    }
}

impl crate::device::Job for OpsBench {
    type Out = ();
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        emit("ops/threads", rayon_threads() as f64, "threads");
        let mut out = Vec::new();
        let s = self.seconds;
        for op in Unary::ALL {
            let shape = [8, 256, 768];
            if self.wants(op.name(), &shape) {
                measure::<B, 3>(&op, shape, s, &device, &mut out)?;
            }
        }
        for log in [false, true] {
            let op = Softmax(log);
            if self.wants(op.name(), &[8, 6, 256, 256]) {
                measure::<B, 4>(&op, [8, 6, 256, 256], s, &device, &mut out)?;
            }
            if !self.quick && self.wants(op.name(), &[64, 1024]) {
                measure::<B, 2>(&op, [64, 1024], s, &device, &mut out)?;
            }
        }
        if !self.quick {
            if self.wants("layer_norm", &LAYER_NORM_SHAPE) {
                measure_layer_norm::<B>(s, &device, &mut out)?;
            }
            for [din, dout] in [[192, 576], [192, 768], [768, 192]] {
                if self.wants("linear", &[8, 256, din, dout]) {
                    measure_linear::<B>([din, dout], s, &device, &mut out)?;
                }
            }
        }
        let shapes: &[([usize; 4], bool)] = if self.quick {
            &[([8, 6, 256, 32], false)]
        } else {
            &[
                ([8, 6, 256, 32], false),
                ([8, 6, 256, 64], false),
                ([8, 6, 1024, 32], false),
                ([8, 6, 256, 32], true),
                ([8, 6, 1024, 32], true),
                // The `small` AR transformer: 4 heads over 4 frames of 16×16 tokens.
                ([8, 4, 1024, 32], true),
            ]
        };
        for &(shape, causal) in shapes {
            let name = if causal {
                "attention_causal"
            } else {
                "attention"
            };
            if self.wants(name, &shape) {
                measure_attention::<B>(shape, causal, s, &device, &mut out)?;
            }
        }
        anyhow::ensure!(
            !out.is_empty(),
            "--only {:?} matches no measurement",
            self.only.as_deref().unwrap_or("")
        );
        if let Some(path) = &self.torch {
            against_torch(path, &out)?;
        }
        Ok(())
    }
}

/// Threads the kernels split large inputs over.
fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Ratios `torch_ms / ours_ms` (≥ 1: at or above PyTorch) for every measurement the
/// peer's output also has.
pub(super) fn against_torch(path: &std::path::Path, ours: &[(String, f64)]) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the PyTorch peer's output {}", path.display()))?;
    let mut torch = HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        if let (Some(name), Some(value)) = (v["bench"].as_str(), v["value"].as_f64()) {
            if let Some(key) = name.strip_suffix("/torch_ms") {
                torch.insert(key.to_string(), value);
            }
        }
    }
    let mut matched = 0;
    for (name, ms) in ours {
        for (suffix, label) in [
            ("/fused_ms", "fused_vs_torch"),
            ("/burn_ms", "burn_vs_torch"),
        ] {
            if let Some(key) = name.strip_suffix(suffix) {
                if let Some(t) = torch.get(key) {
                    emit(&format!("{key}/{label}"), t / ms, "x");
                    matched += 1;
                }
            }
        }
    }
    anyhow::ensure!(
        matched > 0,
        "{} has no measurement named like ours ({}/torch_ms)",
        path.display(),
        ours.first()
            .and_then(|(k, _)| k.rsplit_once('/'))
            .map_or("<name>", |(base, _)| base)
    );
    Ok(())
}
