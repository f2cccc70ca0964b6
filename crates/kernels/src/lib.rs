//! Fused operations for dws models, fast on burn's CPU backend (`Flex`).
//!
//! burn's CPU backend runs transcendental functions as scalar code; these kernels
//! vectorise them ([`math`]) and fuse each function with its derivative. Beside them:
//! flash attention ([`flash`]) that reads heads in place from packed or heads-last
//! projections ([`self_attention`], [`attention_heads_last`]), layer norm ([`norm`]),
//! axis permutation ([`mod@permute`]), the adaLN modulation, convolution and pooling, rotary
//! positions, and [`linear`] as one product over all rows with its bias ([`mm`]). They follow
//! burn's backend-extension pattern: [`FusedBackend`] is implemented for `Flex` (the fast
//! kernels) and for `Autodiff<B>` over any `B: FusedBackend` (registering the backward
//! pass), so training uses them too.
//!
//! Model code never names a backend: it calls the generic functions ([`gelu`], [`silu`],
//! [`softmax`], ...) on `Tensor<B, D>` for any `B: Backend`. They take the fused path
//! when `B` is `Flex` or `Autodiff<Flex>` and burn's own operations on every other
//! backend (CUDA keeps burn's kernels).

mod act;
pub mod alloc;
pub mod conv;
pub mod flash;
pub mod math;
pub mod mm;
pub mod norm;
pub mod permute;
pub mod pool;
pub mod rope;
mod simd;
mod tile;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary as ad_unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorPrimitive;
use burn_flex::FlexTensor;
pub use math::Unary;
use mm::{Init, View};
use std::any::Any;

/// A backend with the fused operations. Every method acts along the whole tensor
/// (element-wise) or its last dimension (softmax).
pub trait FusedBackend: Backend {
    fn fused_unary(op: Unary, x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad · op'(x)`, from `saved`: the output `op(x)` for the functions whose
    /// derivative is a function of it ([`Unary::grad_from_output`]), else the input `x`.
    fn fused_unary_backward(
        op: Unary,
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Softmax (or log-softmax) along the last dimension.
    fn fused_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self>;
    /// Softmax along the last dimension of `[.., Lq, Lk]` scores over each query i's keys
    /// 0..=i (burn's causal convention); the other entries are 0.
    fn fused_softmax_causal(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x · (1 + scale) + shift` for tokens `x` `[G, N, D]` and rows `[G, 1, D]`.
    fn fused_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// The gradients of [`FusedBackend::fused_modulate`] for `x`, `shift` and `scale`.
    fn fused_modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
    /// The input gradient of [`FusedBackend::fused_softmax`] from its output `y`.
    fn fused_softmax_backward(
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        log: bool,
    ) -> FloatTensor<Self>;
    /// 2-D convolution with stride 1 and zero padding `[rows, cols]`: `x` `[N, C, H, W]`,
    /// `w` `[O, C, kh, kw]`, `b` `[O]`.
    fn fused_conv2d(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
    /// The gradients of [`FusedBackend::fused_conv2d`] for `x`, `w` and `b`.
    fn fused_conv2d_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> [FloatTensor<Self>; 3];
    /// Flash attention ([`flash`]) of `q` `[B, H, Lq, d]`, `k` `[B, H, Lk, d]`, `v`
    /// `[B, H, Lk, dv]` with scale `1/sqrt(d)`, optionally causal (`Lq == Lk`): the output
    /// `[B, H, Lq, dv]` and each query's log-sum-exp of scores `[B, H, Lq]`.
    ///
    /// With `heads_last`, `q`, `k`, `v` are `[B, L, H, d]` (as projections reshaped to
    /// heads are), read in place, and the output is `[B, Lq, H·dv]`, the log-sum-exps
    /// `[B, Lq, H]`.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        heads_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The gradients of [`FusedBackend::fused_attention`] for `q`, `k` and `v` (in their
    /// layout).
    fn fused_attention_backward(
        qkv: [FloatTensor<Self>; 3],
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        causal: bool,
        heads_last: bool,
    ) -> [FloatTensor<Self>; 3];
    /// Flash self-attention of a packed projection `qkv` `[B, L, 3·H·d]` (queries,
    /// keys and values side by side, each `H` heads of width `d`), read in place: the
    /// output `[B, L, H·d]` (heads side by side) and the log-sum-exps `[B, L, H]`.
    fn fused_self_attention(
        qkv: FloatTensor<Self>,
        heads: usize,
        causal: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The gradient of [`FusedBackend::fused_self_attention`] for `qkv`.
    fn fused_self_attention_backward(
        qkv: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
        causal: bool,
    ) -> FloatTensor<Self>;
    /// Layer normalisation ([`norm`]) along the last dimension with scale `gamma` and
    /// shift `beta` (`[D]`): the output and each row's mean and reciprocal deviation
    /// (`[rows, 2]`, for the backward).
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The gradients of [`FusedBackend::fused_layer_norm`] for `x`, `gamma` and `beta`.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];
    /// `x · w + b` ([`mm`]) for rows `x` `[M, K]`, a weight `w` `[K, N]` (burn's `Linear`
    /// layout) and a bias `b` `[N]`: `[M, N]`.
    fn fused_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// The gradients of [`FusedBackend::fused_linear`] for `x`, `w` and `b`, each computed
    /// only where `need` asks for it.
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        need: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3];
    /// `x` with its axes permuted ([`mod@permute`]; output axis `i` is input axis
    /// `axes[i]`), contiguous.
    fn fused_permute(x: FloatTensor<Self>, axes: &[usize]) -> FloatTensor<Self>;
    /// Rotary positions ([`rope`]) of `x` `[B, L, H, d]` from position `start`
    /// (`inverse`: the turn back, which is also the backward pass).
    fn fused_rotary(
        x: FloatTensor<Self>,
        start: usize,
        theta: f32,
        inverse: bool,
    ) -> FloatTensor<Self>;
    /// Max pooling of `[N, C, H, W]` (see [`pool::PoolShape`] for what it covers).
    fn fused_max_pool2d(x: FloatTensor<Self>, pool: PoolArgs) -> FloatTensor<Self>;
    /// [`FusedBackend::fused_max_pool2d`] with each output's winner (index in its plane).
    fn fused_max_pool2d_with_indices(
        x: FloatTensor<Self>,
        pool: PoolArgs,
    ) -> (FloatTensor<Self>, Vec<u32>);
    /// The input gradient of a max pooling of an input of shape `input`.
    fn fused_max_pool2d_backward(
        grad: FloatTensor<Self>,
        indices: &[u32],
        input: [usize; 4],
        pool: PoolArgs,
    ) -> FloatTensor<Self>;
}

/// Kernel, stride and padding of a max pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolArgs {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

fn pool_shape(dims: [usize; 4], p: PoolArgs) -> pool::PoolShape {
    let [n, c, h, w] = dims;
    pool::PoolShape {
        planes: n * c,
        h,
        w,
        kernel: p.kernel,
        stride: p.stride,
        padding: p.padding,
    }
}

/// The attention of `[B, H, L, d]` q, k, v (or `[B, L, H, d]` with `heads_last`).
fn attn_shape(q: &Shape, k: &Shape, v: &Shape, causal: bool, heads_last: bool) -> flash::AttnShape {
    let order = |s: &Shape| {
        let [a, b, c, d] = s.dims::<4>();
        if heads_last {
            [a, c, b, d]
        } else {
            [a, b, c, d]
        }
    };
    let [b, h, lq, d] = order(q);
    let [b2, h2, lk, d2] = order(k);
    let [b3, h3, lk2, dv] = order(v);
    assert!(
        (b, h, d, lk) == (b2, h2, d2, lk2) && (b, h) == (b3, h3),
        "attention: q {q:?}, k {k:?} and v {v:?} do not fit together"
    );
    if heads_last {
        return flash::AttnShape {
            batch: b,
            heads: h,
            lq,
            lk,
            d,
            dv,
            causal,
        };
    }
    flash::AttnShape {
        batch: b * h,
        heads: 1,
        lq,
        lk,
        d,
        dv,
        causal,
    }
}

/// The attention of a packed projection `[B, L, 3·H·d]` (q, k, v side by side).
fn packed_shape(qkv: &Shape, heads: usize, causal: bool) -> flash::AttnShape {
    let [b, l, w3] = qkv.dims::<3>();
    assert!(
        heads > 0 && w3.is_multiple_of(3 * heads),
        "self-attention: the last dimension {w3} is not 3 × {heads} heads × a head width"
    );
    let d = w3 / (3 * heads);
    flash::AttnShape {
        batch: b,
        heads,
        lq: l,
        lk: l,
        d,
        dv: d,
        causal,
    }
}

/// The flash kernel's view of a contiguous packed projection.
fn packed_operands<'a>(s: &flash::AttnShape, qkv: &'a FlexTensor) -> [flash::Operand<'a>; 3] {
    let data = qkv.as_slice::<f32>().expect("contiguous f32");
    let layout = flash::Layout::packed(s.lq, s.heads, s.d);
    let w = s.heads * s.d;
    [0, 1, 2].map(|part| flash::Operand {
        data: &data[part * w..],
        layout,
    })
}

/// The flash kernel's view of contiguous q, k and v: `[B·H, L, d]`, or `[B, L, H, d]`
/// with `heads_last`.
fn attn_operands<'a>(
    s: &flash::AttnShape,
    qkv: [&'a FlexTensor; 3],
    heads_last: bool,
) -> [flash::Operand<'a>; 3] {
    if !heads_last {
        return separate_operands(s, qkv);
    }
    let [q, k, v] = qkv;
    let op = |t: &'a FlexTensor, len: usize, width: usize| flash::Operand {
        data: t.as_slice::<f32>().expect("contiguous f32"),
        layout: flash::Layout::heads_last(len, s.heads, width),
    };
    [op(q, s.lq, s.d), op(k, s.lk, s.d), op(v, s.lk, s.dv)]
}

/// The flash kernel's view of contiguous `[B·H, L, d]` q, k and v.
fn separate_operands<'a>(
    s: &flash::AttnShape,
    [q, k, v]: [&'a FlexTensor; 3],
) -> [flash::Operand<'a>; 3] {
    let op = |t: &'a FlexTensor, len: usize, width: usize| flash::Operand {
        data: t.as_slice::<f32>().expect("contiguous f32"),
        layout: flash::Layout::separate(len, width),
    };
    [op(q, s.lq, s.d), op(k, s.lk, s.d), op(v, s.lk, s.dv)]
}

fn conv_shape(x: &Shape, w: &Shape, padding: [usize; 2]) -> conv::ConvShape {
    let [n, c, h, wd] = x.dims::<4>();
    let [o, c2, kh, kw] = w.dims::<4>();
    assert_eq!(
        c, c2,
        "conv2d: input has {c} channels, the weight takes {c2}"
    );
    conv::ConvShape {
        n,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        ph: padding[0],
        pw: padding[1],
    }
}

/// A Flex tensor's values, contiguous, with its shape. The kernels are f32 only: the
/// generic functions send other dtypes to burn's operations before reaching here.
fn flex_f32(t: &FlexTensor) -> (FlexTensor, Shape) {
    use burn::tensor::TensorMetadata;
    assert_eq!(
        t.dtype(),
        burn::tensor::DType::F32,
        "the fused kernels take f32 tensors"
    );
    let c = t.to_contiguous();
    let shape = c.shape();
    (c, shape)
}

/// `t` when its values can be overwritten in place: f32, held by nothing else, and
/// laid out contiguously over its whole buffer from the start (so its storage is
/// exactly its values in order); else `t` back.
fn writable_f32(mut t: FlexTensor) -> Result<FlexTensor, FlexTensor> {
    use burn::tensor::TensorMetadata;
    let n = t.shape().num_elements();
    let whole = t.dtype() == burn::tensor::DType::F32
        && t.layout().contiguous_offsets() == Some((0, n))
        && t.try_storage_mut::<f32>().is_some_and(|s| s.len() == n);
    if whole {
        Ok(t)
    } else {
        Err(t)
    }
}

fn flex_from(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Burn's own composition of each operation, for dtypes the kernels do not cover and for
/// every other backend.
mod reference {
    use super::*;

    pub fn unary<B: Backend, const D: usize>(op: Unary, x: Tensor<B, D>) -> Tensor<B, D> {
        use burn::tensor::activation as act;
        match op {
            Unary::Exp => x.exp(),
            Unary::Erf => x.erf(),
            Unary::Tanh => x.tanh(),
            Unary::Sigmoid => act::sigmoid(x),
            Unary::Silu => act::silu(x),
            Unary::Gelu => act::gelu(x),
            Unary::GeluTanh => act::gelu_approximate(x),
        }
    }

    pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, log: bool) -> Tensor<B, D> {
        if log {
            burn::tensor::activation::log_softmax(x, D - 1)
        } else {
            burn::tensor::activation::softmax(x, D - 1)
        }
    }
}

impl FusedBackend for Flex {
    fn fused_unary(op: Unary, x: FlexTensor) -> FlexTensor {
        let (c, shape) = flex_f32(&x);
        let src = c.as_slice::<f32>().expect("contiguous f32");
        let out = math::fill_new(src.len(), |d| math::forward_into(op, d, src));
        flex_from(out, shape)
    }

    fn fused_unary_backward(op: Unary, x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let grad = match writable_f32(grad) {
            Ok(mut g) => {
                let (cx, _) = flex_f32(&x);
                let xs = cx.as_slice::<f32>().expect("contiguous f32");
                let gs = g.try_storage_mut::<f32>().expect("checked unique");
                math::backward_in_place(op, gs, xs, op.grad_from_output());
                return g;
            }
            Err(grad) => grad,
        };
        let ((cx, shape), (cg, _)) = (flex_f32(&x), flex_f32(&grad));
        let xs = cx.as_slice::<f32>().expect("contiguous f32");
        let gs = cg.as_slice::<f32>().expect("contiguous f32");
        let out = if op.grad_from_output() {
            math::fill_new(xs.len(), |d| math::backward_from_output_into(op, d, xs, gs))
        } else {
            math::fill_new(xs.len(), |d| math::backward_into(op, d, xs, gs))
        };
        flex_from(out, shape)
    }

    fn fused_softmax(x: FlexTensor, log: bool) -> FlexTensor {
        let (c, shape) = flex_f32(&x);
        let n = *shape.as_slice().last().expect("a tensor with dimensions");
        let src = c.as_slice::<f32>().expect("contiguous f32");
        if n == 0 {
            return flex_from(Vec::new(), shape);
        }
        let out = math::fill_new(src.len(), |d| math::softmax_into(d, src, n, log));
        flex_from(out, shape)
    }

    fn fused_softmax_causal(x: FlexTensor) -> FlexTensor {
        let (c, shape) = flex_f32(&x);
        let dims = shape.as_slice();
        assert!(dims.len() >= 2, "causal softmax takes [.., Lq, Lk] scores");
        let (lq, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let src = c.as_slice::<f32>().expect("contiguous f32");
        if n == 0 || lq == 0 {
            return flex_from(Vec::new(), shape);
        }
        let out = math::fill_new(src.len(), |d| math::softmax_causal_into(d, src, lq, n));
        flex_from(out, shape)
    }

    fn fused_modulate(x: FlexTensor, shift: FlexTensor, scale: FlexTensor) -> FlexTensor {
        let ((cx, shape), (csh, _), (csc, _)) = (flex_f32(&x), flex_f32(&shift), flex_f32(&scale));
        let [_, n, d] = shape.dims::<3>();
        let xs = cx.as_slice::<f32>().expect("contiguous f32");
        let (sh, sc) = (
            csh.as_slice::<f32>().expect("contiguous f32"),
            csc.as_slice::<f32>().expect("contiguous f32"),
        );
        if xs.is_empty() {
            return flex_from(Vec::new(), shape);
        }
        let out = math::fill_new(xs.len(), |o| math::modulate_into(o, xs, sh, sc, n, d));
        flex_from(out, shape)
    }

    fn fused_modulate_backward(
        x: FlexTensor,
        scale: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 3] {
        let ((cx, shape), (csc, row_shape), (cg, _)) =
            (flex_f32(&x), flex_f32(&scale), flex_f32(&grad));
        let [_, n, d] = shape.dims::<3>();
        let (xs, sc, gs) = (
            cx.as_slice::<f32>().expect("contiguous f32"),
            csc.as_slice::<f32>().expect("contiguous f32"),
            cg.as_slice::<f32>().expect("contiguous f32"),
        );
        let mut dshift = Vec::with_capacity(sc.len());
        let mut dscale = Vec::with_capacity(sc.len());
        let dx = math::fill_new(xs.len(), |dx| {
            if !xs.is_empty() {
                math::modulate_backward_into(
                    dx,
                    &mut dshift.spare_capacity_mut()[..sc.len()],
                    &mut dscale.spare_capacity_mut()[..sc.len()],
                    xs,
                    sc,
                    gs,
                    n,
                    d,
                );
            }
        });
        if xs.is_empty() {
            dshift.resize(sc.len(), 0.0);
            dscale.resize(sc.len(), 0.0);
        } else {
            // SAFETY: `modulate_backward_into` wrote every row of both.
            unsafe {
                dshift.set_len(sc.len());
                dscale.set_len(sc.len());
            }
        }
        [
            flex_from(dx, shape),
            flex_from(dshift, row_shape.clone()),
            flex_from(dscale, row_shape),
        ]
    }

    fn fused_softmax_backward(y: FlexTensor, grad: FlexTensor, log: bool) -> FlexTensor {
        let grad = match writable_f32(grad) {
            Ok(mut g) => {
                let (cy, shape) = flex_f32(&y);
                let n = *shape.as_slice().last().expect("a tensor with dimensions");
                if n > 0 {
                    let ys = cy.as_slice::<f32>().expect("contiguous f32");
                    let gs = g.try_storage_mut::<f32>().expect("checked unique");
                    math::softmax_backward_in_place(gs, ys, n, log);
                }
                return g;
            }
            Err(grad) => grad,
        };
        let ((cy, shape), (cg, _)) = (flex_f32(&y), flex_f32(&grad));
        let n = *shape.as_slice().last().expect("a tensor with dimensions");
        let ys = cy.as_slice::<f32>().expect("contiguous f32");
        let gs = cg.as_slice::<f32>().expect("contiguous f32");
        if n == 0 {
            return flex_from(Vec::new(), shape);
        }
        let out = math::fill_new(ys.len(), |d| math::softmax_backward_into(d, ys, gs, n, log));
        flex_from(out, shape)
    }
    fn fused_conv2d(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        padding: [usize; 2],
    ) -> FlexTensor {
        let ((cx, xs), (cw, ws), (cb, _)) = (flex_f32(&x), flex_f32(&w), flex_f32(&b));
        let s = conv_shape(&xs, &ws, padding);
        let y = conv::forward(
            &s,
            cx.as_slice::<f32>().expect("contiguous f32"),
            cw.as_slice::<f32>().expect("contiguous f32"),
            Some(cb.as_slice::<f32>().expect("contiguous f32")),
        );
        flex_from(y, Shape::new([s.n, s.o, s.out_h(), s.out_w()]))
    }

    fn fused_conv2d_backward(
        x: FlexTensor,
        w: FlexTensor,
        grad: FlexTensor,
        padding: [usize; 2],
    ) -> [FlexTensor; 3] {
        let ((cx, xs), (cw, ws), (cg, _)) = (flex_f32(&x), flex_f32(&w), flex_f32(&grad));
        let s = conv_shape(&xs, &ws, padding);
        let (dx, dw, db) = conv::backward(
            &s,
            cx.as_slice::<f32>().expect("contiguous f32"),
            cw.as_slice::<f32>().expect("contiguous f32"),
            cg.as_slice::<f32>().expect("contiguous f32"),
        );
        [
            flex_from(dx, xs),
            flex_from(dw, ws),
            flex_from(db, Shape::new([s.o])),
        ]
    }
    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        causal: bool,
        heads_last: bool,
    ) -> (FlexTensor, FlexTensor) {
        let ((cq, qs), (ck, ks), (cv, vs)) = (flex_f32(&q), flex_f32(&k), flex_f32(&v));
        let s = attn_shape(&qs, &ks, &vs, causal, heads_last);
        let [q, k, v] = attn_operands(&s, [&cq, &ck, &cv], heads_last);
        let (out, lse) = flash::forward(s, q, k, v);
        if heads_last {
            return (
                flex_from(out, Shape::new([s.batch, s.lq, s.heads * s.dv])),
                flex_from(lse, Shape::new([s.batch, s.lq, s.heads])),
            );
        }
        let [b, h, lq, _] = qs.dims::<4>();
        (
            flex_from(out, Shape::new([b, h, lq, s.dv])),
            flex_from(lse, Shape::new([b, h, lq])),
        )
    }

    fn fused_attention_backward(
        [q, k, v]: [FlexTensor; 3],
        out: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        causal: bool,
        heads_last: bool,
    ) -> [FlexTensor; 3] {
        let ((cq, qs), (ck, ks), (cv, vs)) = (flex_f32(&q), flex_f32(&k), flex_f32(&v));
        let ((co, _), (cl, _), (cg, _)) = (flex_f32(&out), flex_f32(&lse), flex_f32(&grad));
        let s = attn_shape(&qs, &ks, &vs, causal, heads_last);
        let [q, k, v] = attn_operands(&s, [&cq, &ck, &cv], heads_last);
        let layout = if heads_last {
            flash::GradLayout::heads_last(&s)
        } else {
            flash::GradLayout::separate(&s)
        };
        let all = flash::backward(
            s,
            q,
            k,
            v,
            co.as_slice::<f32>().expect("contiguous f32"),
            cl.as_slice::<f32>().expect("contiguous f32"),
            cg.as_slice::<f32>().expect("contiguous f32"),
            layout,
        );
        // Each chunk (a group, or a batch item with its heads) holds its dq, dk and dv
        // one after the other.
        let h = s.heads;
        let mut parts: [Vec<f32>; 3] = Default::default();
        for chunk in all.chunks_exact(layout.chunk) {
            let mut at = 0;
            for (part, n) in parts
                .iter_mut()
                .zip([s.lq * s.d * h, s.lk * s.d * h, s.lk * s.dv * h])
            {
                part.extend_from_slice(&chunk[at..at + n]);
                at += n;
            }
        }
        let [dq, dk, dv] = parts;
        [flex_from(dq, qs), flex_from(dk, ks), flex_from(dv, vs)]
    }

    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor) {
        let ((cx, xs), (cg, _), (cb, _)) = (flex_f32(&x), flex_f32(&gamma), flex_f32(&beta));
        let g = cg.as_slice::<f32>().expect("contiguous f32");
        let (y, stats) = norm::forward(
            cx.as_slice::<f32>().expect("contiguous f32"),
            g,
            cb.as_slice::<f32>().expect("contiguous f32"),
            epsilon as f32,
        );
        let rows = stats.len() / 2;
        (flex_from(y, xs), flex_from(stats, Shape::new([rows, 2])))
    }

    fn fused_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        stats: FlexTensor,
        grad: FlexTensor,
    ) -> [FlexTensor; 3] {
        let ((cx, xs), (cg, gs)) = (flex_f32(&x), flex_f32(&gamma));
        let ((cs, _), (cgr, _)) = (flex_f32(&stats), flex_f32(&grad));
        let (dx, dgamma, dbeta) = norm::backward(
            cx.as_slice::<f32>().expect("contiguous f32"),
            cgr.as_slice::<f32>().expect("contiguous f32"),
            cs.as_slice::<f32>().expect("contiguous f32"),
            cg.as_slice::<f32>().expect("contiguous f32"),
        );
        [
            flex_from(dx, xs),
            flex_from(dgamma, gs.clone()),
            flex_from(dbeta, gs),
        ]
    }

    fn fused_linear(x: FlexTensor, w: FlexTensor, b: FlexTensor) -> FlexTensor {
        let ((cx, xs), (cw, ws), (cb, _)) = (flex_f32(&x), flex_f32(&w), flex_f32(&b));
        let ([m, k], [kw, n]) = (xs.dims::<2>(), ws.dims::<2>());
        assert_eq!(
            k, kw,
            "linear: [{m}, {k}] rows against a [{kw}, {n}] weight"
        );
        let (x, w, b) = (
            cx.as_slice::<f32>().expect("contiguous f32"),
            cw.as_slice::<f32>().expect("contiguous f32"),
            cb.as_slice::<f32>().expect("contiguous f32"),
        );
        let y = math::fill_new(m * n, |c| {
            mm::matmul(
                m,
                n,
                k,
                View::rows(x, k),
                View::rows(w, n),
                c,
                Init::Bias(b),
            )
        });
        flex_from(y, Shape::new([m, n]))
    }

    fn fused_linear_backward(
        x: FlexTensor,
        w: FlexTensor,
        grad: FlexTensor,
        need: [bool; 3],
    ) -> [Option<FlexTensor>; 3] {
        let ((cx, xs), (cw, ws), (cg, _)) = (flex_f32(&x), flex_f32(&w), flex_f32(&grad));
        let ([m, k], [_, n]) = (xs.dims::<2>(), ws.dims::<2>());
        let (x, w, g) = (
            cx.as_slice::<f32>().expect("contiguous f32"),
            cw.as_slice::<f32>().expect("contiguous f32"),
            cg.as_slice::<f32>().expect("contiguous f32"),
        );
        // dx = g · wᵀ, dw = xᵀ · g (both transposes read in place), db = Σ_rows g.
        let dx = need[0].then(|| {
            let dx = math::fill_new(m * k, |c| {
                mm::matmul(
                    m,
                    k,
                    n,
                    View::rows(g, n),
                    View::transposed(w, n),
                    c,
                    Init::Zero,
                )
            });
            flex_from(dx, xs.clone())
        });
        let dw = need[1].then(|| {
            let dw = math::fill_new(k * n, |c| {
                mm::matmul(
                    k,
                    n,
                    m,
                    View::transposed(x, k),
                    View::rows(g, n),
                    c,
                    Init::Zero,
                )
            });
            flex_from(dw, ws.clone())
        });
        let db = need[2].then(|| flex_from(mm::column_sums(g, m, n), Shape::new([n])));
        [dx, dw, db]
    }

    fn fused_permute(x: FlexTensor, axes: &[usize]) -> FlexTensor {
        let (c, shape) = flex_f32(&x);
        let out = permute::permute(c.as_slice::<f32>().expect("contiguous f32"), &shape, axes);
        let dims: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
        flex_from(out, Shape::from(dims))
    }

    fn fused_self_attention(
        qkv: FlexTensor,
        heads: usize,
        causal: bool,
    ) -> (FlexTensor, FlexTensor) {
        let (c, shape) = flex_f32(&qkv);
        let s = packed_shape(&shape, heads, causal);
        let [q, k, v] = packed_operands(&s, &c);
        let (out, lse) = flash::forward(s, q, k, v);
        (
            flex_from(out, Shape::new([s.batch, s.lq, heads * s.dv])),
            flex_from(lse, Shape::new([s.batch, s.lq, heads])),
        )
    }

    fn fused_self_attention_backward(
        qkv: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        heads: usize,
        causal: bool,
    ) -> FlexTensor {
        let (c, shape) = flex_f32(&qkv);
        let ((co, _), (cl, _), (cg, _)) = (flex_f32(&out), flex_f32(&lse), flex_f32(&grad));
        let s = packed_shape(&shape, heads, causal);
        let [q, k, v] = packed_operands(&s, &c);
        let dqkv = flash::backward(
            s,
            q,
            k,
            v,
            co.as_slice::<f32>().expect("contiguous f32"),
            cl.as_slice::<f32>().expect("contiguous f32"),
            cg.as_slice::<f32>().expect("contiguous f32"),
            flash::GradLayout::packed(&s),
        );
        flex_from(dqkv, shape)
    }

    fn fused_rotary(x: FlexTensor, start: usize, theta: f32, inverse: bool) -> FlexTensor {
        let (c, shape) = flex_f32(&x);
        let [batch, len, heads, dim] = shape.dims::<4>();
        let s = rope::RopeShape {
            batch,
            len,
            heads,
            dim,
            start,
            theta,
        };
        let out = rope::rotate(s, c.as_slice::<f32>().expect("contiguous f32"), inverse);
        flex_from(out, shape)
    }

    fn fused_max_pool2d(x: FlexTensor, pool: PoolArgs) -> FlexTensor {
        Self::fused_max_pool2d_with_indices(x, pool).0
    }

    fn fused_max_pool2d_with_indices(x: FlexTensor, pool: PoolArgs) -> (FlexTensor, Vec<u32>) {
        let (cx, xs) = flex_f32(&x);
        let dims = xs.dims::<4>();
        let s = pool_shape(dims, pool);
        let (y, idx) = pool::forward(&s, cx.as_slice::<f32>().expect("contiguous f32"));
        (
            flex_from(y, Shape::new([dims[0], dims[1], s.out_h(), s.out_w()])),
            idx,
        )
    }

    fn fused_max_pool2d_backward(
        grad: FlexTensor,
        indices: &[u32],
        input: [usize; 4],
        pool: PoolArgs,
    ) -> FlexTensor {
        let (cg, _) = flex_f32(&grad);
        let s = pool_shape(input, pool);
        let dx = pool::backward(&s, cg.as_slice::<f32>().expect("contiguous f32"), indices);
        flex_from(dx, Shape::new(input))
    }
}

/// Which fused operation a tracked autodiff node came from.
#[derive(Debug, Clone, Copy)]
enum Fused {
    /// Saves the input, or the output where the derivative is a function of it.
    Unary(Unary),
    /// Saves the output.
    Softmax { log: bool },
    /// Saves the output; its backward is the softmax's (masked entries are 0).
    SoftmaxCausal,
}

#[derive(Debug)]
struct FusedGrad(Fused);

impl<B: FusedBackend> Backward<B, 1> for FusedGrad {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let saved = ops.state;
        let kind = self.0;
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| match kind {
            Fused::Unary(op) => B::fused_unary_backward(op, saved, grad),
            Fused::Softmax { log } => B::fused_softmax_backward(saved, grad, log),
            Fused::SoftmaxCausal => B::fused_softmax_backward(saved, grad, false),
        });
    }
}

/// Runs the inner backend's forward and, when the input is tracked, records the node
/// with what its backward needs.
fn tracked<B: FusedBackend, C: CheckpointStrategy>(
    kind: Fused,
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let forward = |p: FloatTensor<B>| match kind {
        Fused::Unary(op) => B::fused_unary(op, p),
        Fused::Softmax { log } => B::fused_softmax(p, log),
        Fused::SoftmaxCausal => B::fused_softmax_causal(p),
    };
    match FusedGrad(kind)
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => match kind {
            Fused::Unary(op) if op.grad_from_output() => {
                let out = forward(x.primitive);
                prep.finish(out.clone(), out)
            }
            Fused::Unary(_) => {
                let out = forward(x.primitive.clone());
                prep.finish(x.primitive, out)
            }
            Fused::Softmax { .. } | Fused::SoftmaxCausal => {
                let y = forward(x.primitive);
                prep.finish(y.clone(), y)
            }
        },
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
    }
}

#[derive(Debug)]
struct ModulateGrad;

impl<B: FusedBackend> Backward<B, 3> for ModulateGrad {
    /// `x` and `scale`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, scale) = ops.state;
        let [dx, dshift, dscale] = B::fused_modulate_backward(x, scale, grad);
        for (parent, g) in ops.parents.into_iter().zip([dx, dshift, dscale]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct RotaryGrad {
    start: usize,
    theta: f32,
    inverse: bool,
}

impl<B: FusedBackend> Backward<B, 1> for RotaryGrad {
    type State = ();

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (start, theta, inverse) = (self.start, self.theta, self.inverse);
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_rotary(grad, start, theta, !inverse)
        });
    }
}

#[derive(Debug)]
struct AttentionGrad {
    causal: bool,
    heads_last: bool,
}

impl<B: FusedBackend> Backward<B, 3> for AttentionGrad {
    /// `q`, `k`, `v`, the output and its log-sum-exps.
    type State = ([FloatTensor<B>; 3], FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (qkv, out, lse) = ops.state;
        let dqkv = B::fused_attention_backward(qkv, out, lse, grad, self.causal, self.heads_last);
        for (parent, g) in ops.parents.into_iter().zip(dqkv) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct LayerNormGrad;

impl<B: FusedBackend> Backward<B, 3> for LayerNormGrad {
    /// `x`, `gamma` and the rows' statistics.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, stats) = ops.state;
        let parts = B::fused_layer_norm_backward(x, gamma, stats, grad);
        for (parent, g) in ops.parents.into_iter().zip(parts) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct LinearGrad;

impl<B: FusedBackend> Backward<B, 3> for LinearGrad {
    /// The rows `x` and the weight.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let need = [0, 1, 2].map(|i| ops.parents[i].is_some());
        let parts = B::fused_linear_backward(x, w, grad, need);
        for (parent, g) in ops.parents.into_iter().zip(parts) {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct PermuteGrad {
    /// The permutation that undoes the forward's.
    inverse: Vec<usize>,
}

impl<B: FusedBackend> Backward<B, 1> for PermuteGrad {
    type State = ();

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_permute(grad, &self.inverse)
        });
    }
}

#[derive(Debug)]
struct SelfAttentionGrad {
    heads: usize,
    causal: bool,
}

impl<B: FusedBackend> Backward<B, 1> for SelfAttentionGrad {
    /// The packed projection, the output and its log-sum-exps.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (qkv, out, lse) = ops.state;
        let (heads, causal) = (self.heads, self.causal);
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_self_attention_backward(qkv, out, lse, grad, heads, causal)
        });
    }
}

#[derive(Debug)]
struct MaxPoolGrad {
    pool: PoolArgs,
    input: [usize; 4],
}

impl<B: FusedBackend> Backward<B, 1> for MaxPoolGrad {
    /// The winners.
    type State = std::sync::Arc<Vec<u32>>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let indices = ops.state;
        let (pool, input) = (self.pool, self.input);
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_max_pool2d_backward(grad, &indices, input, pool)
        });
    }
}

#[derive(Debug)]
struct Conv2dGrad {
    padding: [usize; 2],
}

impl<B: FusedBackend> Backward<B, 3> for Conv2dGrad {
    /// `x` and `w`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w) = ops.state;
        let [dx, dw, db] = B::fused_conv2d_backward(x, w, grad, self.padding);
        for (parent, g) in ops.parents.into_iter().zip([dx, dw, db]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn fused_conv2d(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        match (Conv2dGrad { padding })
            .prepare::<C>([x.node.clone(), w.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_conv2d(
                    x.primitive.clone(),
                    w.primitive.clone(),
                    b.primitive,
                    padding,
                );
                prep.finish((x.primitive, w.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_conv2d(
                x.primitive,
                w.primitive,
                b.primitive,
                padding,
            )),
        }
    }

    fn fused_conv2d_backward(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _padding: [usize; 2],
    ) -> [FloatTensor<Self>; 3] {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_max_pool2d(x: FloatTensor<Self>, pool: PoolArgs) -> FloatTensor<Self> {
        use burn::tensor::TensorMetadata;
        let input = x.primitive.shape().dims::<4>();
        match (MaxPoolGrad { pool, input })
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, idx) = B::fused_max_pool2d_with_indices(x.primitive, pool);
                prep.finish(std::sync::Arc::new(idx), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_max_pool2d(x.primitive, pool)),
        }
    }

    fn fused_max_pool2d_with_indices(
        _x: FloatTensor<Self>,
        _pool: PoolArgs,
    ) -> (FloatTensor<Self>, Vec<u32>) {
        unimplemented!("the autodiff backend pools through fused_max_pool2d")
    }

    fn fused_max_pool2d_backward(
        _grad: FloatTensor<Self>,
        _indices: &[u32],
        _input: [usize; 4],
        _pool: PoolArgs,
    ) -> FloatTensor<Self> {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        heads_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match (AttentionGrad { causal, heads_last })
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::fused_attention(
                    q.primitive.clone(),
                    k.primitive.clone(),
                    v.primitive.clone(),
                    causal,
                    heads_last,
                );
                let state = (
                    [q.primitive, k.primitive, v.primitive],
                    out.clone(),
                    lse.clone(),
                );
                (
                    prep.finish(state, out),
                    <Autodiff<B, C> as burn::tensor::backend::AutodiffBackend>::from_inner(lse),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) =
                    B::fused_attention(q.primitive, k.primitive, v.primitive, causal, heads_last);
                (
                    prep.finish(out),
                    <Autodiff<B, C> as burn::tensor::backend::AutodiffBackend>::from_inner(lse),
                )
            }
        }
    }

    fn fused_rotary(
        x: FloatTensor<Self>,
        start: usize,
        theta: f32,
        inverse: bool,
    ) -> FloatTensor<Self> {
        RotaryGrad {
            start,
            theta,
            inverse,
        }
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateless(B::fused_rotary(x.primitive, start, theta, inverse))
    }

    fn fused_attention_backward(
        _qkv: [FloatTensor<Self>; 3],
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _causal: bool,
        _heads_last: bool,
    ) -> [FloatTensor<Self>; 3] {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match LinearGrad
            .prepare::<C>([x.node.clone(), w.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_linear(x.primitive.clone(), w.primitive.clone(), b.primitive);
                prep.finish((x.primitive, w.primitive), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_linear(x.primitive, w.primitive, b.primitive))
            }
        }
    }

    fn fused_linear_backward(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _need: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_permute(x: FloatTensor<Self>, axes: &[usize]) -> FloatTensor<Self> {
        PermuteGrad {
            inverse: permute::inverse(axes),
        }
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateless(B::fused_permute(x.primitive, axes))
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let stats_of = <Autodiff<B, C> as burn::tensor::backend::AutodiffBackend>::from_inner;
        match LayerNormGrad
            .prepare::<C>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, stats) = B::fused_layer_norm(
                    x.primitive.clone(),
                    gamma.primitive.clone(),
                    beta.primitive,
                    epsilon,
                );
                let state = (x.primitive, gamma.primitive, stats.clone());
                (prep.finish(state, y), stats_of(stats))
            }
            OpsKind::UnTracked(prep) => {
                let (y, stats) =
                    B::fused_layer_norm(x.primitive, gamma.primitive, beta.primitive, epsilon);
                (prep.finish(y), stats_of(stats))
            }
        }
    }

    fn fused_layer_norm_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _stats: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_self_attention(
        qkv: FloatTensor<Self>,
        heads: usize,
        causal: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let lse_of = <Autodiff<B, C> as burn::tensor::backend::AutodiffBackend>::from_inner;
        match (SelfAttentionGrad { heads, causal })
            .prepare::<C>([qkv.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::fused_self_attention(qkv.primitive.clone(), heads, causal);
                let state = (qkv.primitive, out.clone(), lse.clone());
                (prep.finish(state, out), lse_of(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::fused_self_attention(qkv.primitive, heads, causal);
                (prep.finish(out), lse_of(lse))
            }
        }
    }

    fn fused_self_attention_backward(
        _qkv: FloatTensor<Self>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _heads: usize,
        _causal: bool,
    ) -> FloatTensor<Self> {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match ModulateGrad
            .prepare::<C>([x.node.clone(), shift.node.clone(), scale.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_modulate(
                    x.primitive.clone(),
                    shift.primitive,
                    scale.primitive.clone(),
                );
                prep.finish((x.primitive, scale.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_modulate(
                x.primitive,
                shift.primitive,
                scale.primitive,
            )),
        }
    }

    fn fused_modulate_backward(
        _x: FloatTensor<Self>,
        _scale: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_unary(op: Unary, x: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(Fused::Unary(op), x)
    }

    fn fused_unary_backward(
        _op: Unary,
        _x: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self> {
        tracked::<B, C>(Fused::Softmax { log }, x)
    }

    fn fused_softmax_causal(x: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(Fused::SoftmaxCausal, x)
    }

    fn fused_softmax_backward(
        _y: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _log: bool,
    ) -> FloatTensor<Self> {
        unimplemented!("second derivatives of the fused operations are not supported")
    }
}

/// Runs `f` on `parts` when they are `FP` (the same types on the fused backend: the
/// caller's backend is that backend), giving the result back as `O`; gives `parts` back
/// otherwise.
fn on_parts<P: 'static, FP: 'static, O: 'static, FO: 'static>(
    parts: P,
    f: impl FnOnce(FP) -> FO,
) -> Result<O, P> {
    let any: Box<dyn Any> = Box::new(parts);
    match any.downcast::<FP>() {
        Ok(t) => {
            let back: Box<dyn Any> = Box::new(f(*t));
            Ok(*back
                .downcast::<O>()
                .expect("B is F, so their tensors are one type"))
        }
        Err(any) => Err(*any
            .downcast::<P>()
            .expect("the box holds what it was given")),
    }
}

fn float<F: Backend, const D: usize>(t: Tensor<F, D>) -> FloatTensor<F> {
    t.into_primitive().tensor()
}

fn tensor<F: Backend, const D: usize>(p: FloatTensor<F>) -> Tensor<F, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Runs `f` on `x` as a `Tensor<F, D>` when `B` is `F`; gives `x` back otherwise.
fn on<B: Backend, F: FusedBackend, const D: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(FloatTensor<F>) -> FloatTensor<F>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    on_parts::<_, Tensor<F, D>, _, Tensor<F, D>>(x, |t| tensor(f(float(t))))
}

/// Which path [`unary`] and [`softmax`] take on backend `B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The vectorised kernels.
    Fused,
    /// burn's own operations.
    Reference,
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the fused kernels off (every backend then takes burn's operations) or back on,
/// for the whole process: for measuring what they bring (`dws bench train`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The path taken on backend `B`.
pub fn path<B: Backend>() -> Path {
    use std::any::TypeId;
    let b = TypeId::of::<B>();
    let on = ENABLED.load(std::sync::atomic::Ordering::Relaxed);
    if on && (b == TypeId::of::<Flex>() || b == TypeId::of::<Autodiff<Flex>>()) {
        Path::Fused
    } else {
        Path::Reference
    }
}

fn is_float<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    matches!(x.dtype(), burn::tensor::DType::F32)
}

/// `op` applied element-wise: the fused kernel on Flex (with or without autodiff),
/// burn's operations elsewhere.
pub fn unary<B: Backend, const D: usize>(op: Unary, x: Tensor<B, D>) -> Tensor<B, D> {
    if !is_float(&x) || D == 0 || path::<B>() == Path::Reference {
        return reference::unary(op, x);
    }
    let x = match on::<B, Flex, D>(x, |p| Flex::fused_unary(op, p)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let x = match on::<B, Autodiff<Flex>, D>(x, |p| Autodiff::<Flex>::fused_unary(op, p)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    reference::unary(op, x)
}

/// Softmax along the last dimension.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    softmax_impl(x, false)
}

/// Log-softmax along the last dimension.
pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    softmax_impl(x, true)
}

fn softmax_impl<B: Backend, const D: usize>(x: Tensor<B, D>, log: bool) -> Tensor<B, D> {
    if !is_float(&x) || D == 0 || path::<B>() == Path::Reference {
        return reference::softmax(x, log);
    }
    let x = match on::<B, Flex, D>(x, |p| Flex::fused_softmax(p, log)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let x = match on::<B, Autodiff<Flex>, D>(x, |p| Autodiff::<Flex>::fused_softmax(p, log)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    reference::softmax(x, log)
}

/// burn's own composition of `op`, whatever the backend (for comparisons and benches).
pub fn unary_reference<B: Backend, const D: usize>(op: Unary, x: Tensor<B, D>) -> Tensor<B, D> {
    reference::unary(op, x)
}

/// burn's own softmax or log-softmax along the last dimension.
pub fn softmax_reference<B: Backend, const D: usize>(x: Tensor<B, D>, log: bool) -> Tensor<B, D> {
    reference::softmax(x, log)
}

pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    unary(Unary::Gelu, x)
}

pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    unary(Unary::GeluTanh, x)
}

pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    unary(Unary::Silu, x)
}

pub fn sigmoid<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    unary(Unary::Sigmoid, x)
}

/// Scaled dot-product attention `softmax(q kᵀ / sqrt(d) + bias) v` over `[B, H, L, d]`
/// tensors, optionally causal (query i sees keys 0..=i, as in burn).
///
/// On Flex, without a bias, [`flash_attention`] runs it (1.0-2.2× the composed form
/// below without a mask, 2-3.4× with the causal one, forward and backward, in `dws bench
/// ops`), except for causal attention with fewer queries than keys. With a bias the
/// scores go through the fused softmax: under autodiff (training) burn would fall back to
/// separate operations with its scalar softmax, and without autodiff matmuls with the
/// fused softmax beat burn's flash-style kernel as long as the score matrix fits in 512
/// MiB; beyond that burn's kernel (memory linear in the sequence length) is used, except
/// for causal attention with fewer queries than keys, where burn's Flex kernel masks
/// differently from its other backends. Other backends take burn's `attention`.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    causal: bool,
) -> Tensor<B, 4> {
    // The score matrix of the composed form, in bytes; above this, burn's flash-style
    // kernel (memory linear in the sequence length) is used on Flex without autodiff.
    const MAX_SCORES: usize = 1 << 29;
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    let small = b * h * lq * lk * 4 <= MAX_SCORES;
    // burn's Flex kernel aligns a causal mask differently from burn's own fallback (and
    // from this function) when there are fewer queries than keys: keep one convention.
    let small = small || (causal && lq != lk);
    let fused = path::<B>() == Path::Fused && is_float(&q);
    if fused && bias.is_none() && (!causal || lq == lk) {
        return flash_attention(q, k, v, causal);
    }
    let training = std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<Flex>>();
    let composed = fused && (training || small);
    if !composed {
        let options = burn::tensor::ops::AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        return burn::tensor::module::attention(q, k, v, None, bias, options);
    }
    if causal {
        // The mask inside the softmax kernel, not built with separate operations.
        return attention_composed(q, k, v, bias, false, softmax_causal);
    }
    attention_composed(q, k, v, bias, false, softmax)
}

/// Softmax along the last dimension of `[.., Lq, Lk]` scores over each query i's keys
/// `0..=i` (the other entries 0): the mask inside the fused kernel on Flex, a mask and
/// burn's softmax elsewhere.
pub fn softmax_causal<B: Backend>(s: Tensor<B, 4>) -> Tensor<B, 4> {
    if path::<B>() == Path::Fused && is_float(&s) {
        let s = match on::<B, Flex, 4>(s, Flex::fused_softmax_causal) {
            Ok(y) => return y,
            Err(s) => s,
        };
        match on::<B, Autodiff<Flex>, 4>(s, Autodiff::<Flex>::fused_softmax_causal) {
            Ok(y) => y,
            Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
        }
    } else {
        let [_, _, lq, lk] = s.dims();
        let device = s.device();
        let rows = Tensor::<B, 1, Int>::arange(0..lq as i64, &device).reshape([1, 1, lq, 1]);
        let cols = Tensor::<B, 1, Int>::arange(0..lk as i64, &device).reshape([1, 1, 1, lk]);
        reference::softmax(s.mask_fill(cols.greater(rows), f32::NEG_INFINITY), false)
    }
}

/// Flash-style attention ([`flash`]: tiled, online softmax, memory linear in the
/// sequence length, causal tiles above the diagonal skipped) with scale `1/sqrt(d)`, on
/// Flex with or without autodiff; burn's `attention` on every other backend. Causal
/// attention needs as many queries as keys here.
pub fn flash_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    let [_, _, lq, _] = q.dims();
    let lk = k.dims()[2];
    assert!(
        !causal || lq == lk,
        "causal flash attention takes as many queries ({lq}) as keys ({lk})"
    );
    if path::<B>() != Path::Fused || !is_float(&q) {
        let options = burn::tensor::ops::AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        return burn::tensor::module::attention(q, k, v, None, None, options);
    }
    fused_attention_on(q, k, v, causal, false)
}

/// [`FusedBackend::fused_attention`]'s output for a `B` that is Flex or Autodiff<Flex>.
fn fused_attention_on<B: Backend, const D: usize>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
    heads_last: bool,
) -> Tensor<B, D> {
    type Qkv<F> = (Tensor<F, 4>, Tensor<F, 4>, Tensor<F, 4>);
    let run = |(q, k, v): Qkv<Flex>| -> Tensor<Flex, D> {
        tensor(Flex::fused_attention(float(q), float(k), float(v), causal, heads_last).0)
    };
    let parts = match on_parts::<_, Qkv<Flex>, Tensor<B, D>, _>((q, k, v), run) {
        Ok(y) => return y,
        Err(p) => p,
    };
    let run = |(q, k, v): Qkv<Autodiff<Flex>>| -> Tensor<Autodiff<Flex>, D> {
        let (out, _) =
            Autodiff::<Flex>::fused_attention(float(q), float(k), float(v), causal, heads_last);
        tensor(out)
    };
    match on_parts::<_, Qkv<Autodiff<Flex>>, Tensor<B, D>, _>(parts, run) {
        Ok(y) => y,
        Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
    }
}

/// Multi-head self-attention of a packed projection `qkv` `[B, L, 3·D]` (queries, keys
/// and values side by side, each `heads` heads of `D / heads` columns, as one `Linear`
/// to `3·D` makes them) with scale `1/sqrt(D / heads)`, optionally causal: `[B, L, D]`
/// with the heads side by side, ready for the output projection. On Flex (with or
/// without autodiff) the flash kernel reads the heads in place and its backward writes
/// the packed gradient directly, so no head is split, transposed or merged by a copy;
/// elsewhere, the same through burn's operations and `attention`.
pub fn self_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize, causal: bool) -> Tensor<B, 3> {
    let w3 = qkv.dims()[2];
    assert!(
        heads > 0 && w3.is_multiple_of(3 * heads),
        "self_attention: the last dimension {w3} is not 3 × {heads} heads × a head width"
    );
    if path::<B>() == Path::Fused && is_float(&qkv) {
        fn run<F: FusedBackend>(qkv: Tensor<F, 3>, heads: usize, causal: bool) -> Tensor<F, 3> {
            tensor(F::fused_self_attention(float(qkv), heads, causal).0)
        }
        let qkv =
            match on_parts::<_, Tensor<Flex, 3>, Tensor<B, 3>, _>(qkv, |x| run(x, heads, causal)) {
                Ok(y) => return y,
                Err(x) => x,
            };
        return match on_parts::<_, Tensor<Autodiff<Flex>, 3>, Tensor<B, 3>, _>(qkv, |x| {
            run(x, heads, causal)
        }) {
            Ok(y) => y,
            Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
        };
    }
    self_attention_split(qkv, heads, causal)
}

/// [`self_attention`] through [`attention`] on split heads: burn's operations on other
/// backends, and the path models took before the packed kernel (tests, benchmarks).
pub fn self_attention_split<B: Backend>(
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
    attention(split(0), split(1), split(2), None, causal)
        .swap_dims(1, 2)
        .reshape([b, l, d])
}

/// Multi-head attention of `q` `[B, Lq, H, d]`, `k` `[B, Lk, H, d]`, `v` `[B, Lk, H, dv]`
/// (heads last, as projections reshaped to heads are) with scale `1/sqrt(d)`, optionally
/// causal (then `Lq == Lk`): `[B, Lq, H·dv]`, the heads side by side, ready for the
/// output projection. On Flex the flash kernel reads the heads in place and writes the
/// gradients in the same layout, so no head is transposed or merged by a copy; elsewhere
/// (and with a causal mask over unequal lengths) [`attention`] on transposed heads.
pub fn attention_heads_last<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 3> {
    let [b, lq, h, _] = q.dims();
    let [_, lk, _, dv] = v.dims();
    if path::<B>() != Path::Fused || !is_float(&q) || (causal && lq != lk) {
        let t = |x: Tensor<B, 4>| x.swap_dims(1, 2);
        return attention(t(q), t(k), t(v), None, causal)
            .swap_dims(1, 2)
            .reshape([b, lq, h * dv]);
    }
    fused_attention_on(q, k, v, causal, true)
}

/// Attention from matmuls and the given softmax (the fused one, or burn's for tests).
pub fn attention_composed<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    causal: bool,
    softmax: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, lq, d] = q.dims();
    let lk = k.dims()[2];
    let mut scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (d as f64).sqrt());
    if causal {
        // Query i sees keys 0..=i (burn's convention when the lengths differ).
        let rows =
            Tensor::<B, 1, Int>::arange(0..lq as i64, &scores.device()).reshape([1, 1, lq, 1]);
        let cols =
            Tensor::<B, 1, Int>::arange(0..lk as i64, &scores.device()).reshape([1, 1, 1, lk]);
        let future = cols.greater(rows);
        scores = scores.mask_fill(future, f32::NEG_INFINITY);
    }
    if let Some(b) = bias {
        scores = scores + b;
    }
    softmax(scores).matmul(v)
}

/// `norm` (burn's `LayerNorm`) along the last dimension of `x`. On Flex under autodiff
/// burn composes it from about ten operations, each a pass over the tensor with its own
/// backward; here it is one pass forward and one backward (the same values within
/// rounding). Other backends, and a `LayerNorm` without a bias, take `norm.forward`.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &burn::nn::LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let (Some(beta), Some(epsilon)) = (norm.beta.as_ref(), layer_norm_epsilon(norm)) else {
        return norm.forward(x);
    };
    if path::<B>() != Path::Fused || !is_float(&x) {
        return norm.forward(x);
    }
    fn run<F: FusedBackend, const D: usize>(
        (x, gamma, beta): (Tensor<F, D>, Tensor<F, 1>, Tensor<F, 1>),
        epsilon: f64,
    ) -> Tensor<F, D> {
        tensor(F::fused_layer_norm(float(x), float(gamma), float(beta), epsilon).0)
    }
    type Parts<F, const D: usize> = (Tensor<F, D>, Tensor<F, 1>, Tensor<F, 1>);
    let parts = (x, norm.gamma.val(), beta.val());
    let parts = match on_parts::<_, Parts<Flex, D>, Tensor<B, D>, _>(parts, |p| run(p, epsilon)) {
        Ok(y) => return y,
        Err(p) => p,
    };
    match on_parts::<_, Parts<Autodiff<Flex>, D>, Tensor<B, D>, _>(parts, |p| run(p, epsilon)) {
        Ok(y) => y,
        Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
    }
}

/// A `LayerNorm`'s epsilon, which burn keeps private but prints (`epsilon: 0.00001`).
pub fn layer_norm_epsilon<B: Backend>(norm: &burn::nn::LayerNorm<B>) -> Option<f64> {
    let text = format!("{norm}");
    let rest = &text[text.find("epsilon: ")? + "epsilon: ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `x` with its axes permuted (output axis `i` is input axis `axes[i]`), as a new
/// contiguous tensor: on Flex one parallel pass forward and one backward, where burn
/// makes a permuted view contiguous element by element on one thread whenever the
/// next operation needs it (a reshape, a matrix product); elsewhere `x.permute(axes)`.
pub fn permute<B: Backend, const D: usize>(x: Tensor<B, D>, axes: [usize; D]) -> Tensor<B, D> {
    if path::<B>() != Path::Fused || !is_float(&x) {
        return x.permute(axes);
    }
    let x = match on::<B, Flex, D>(x, |t| Flex::fused_permute(t, &axes)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    match on::<B, Autodiff<Flex>, D>(x, |t| Autodiff::<Flex>::fused_permute(t, &axes)) {
        Ok(y) => y,
        Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
    }
}

/// `layer` applied to the last dimension of `x`. On Flex it is one matrix product over
/// all rows with the bias in the product's starting values ([`mm`]), and a backward
/// that computes only the gradients asked for. burn's `Linear` on a `[B, L, D]` input
/// multiplies each batch item on its own, adds the bias by a broadcast addition that
/// costs about 40% of the product's time, and in the backward makes one weight gradient
/// per item and then sums them. Other backends (and the CPU one with the kernels off)
/// take `layer.forward` as it is.
pub fn linear<B: Backend, const D: usize>(
    layer: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    if path::<B>() != Path::Fused || !is_float(&x) {
        return layer.forward(x);
    }
    let mut dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let w = layer.weight.val();
    let [d_in, d_out] = w.dims();
    assert_eq!(
        dims[D - 1],
        d_in,
        "linear: inputs of width {} into a layer of {d_in} inputs",
        dims[D - 1]
    );
    let b = match &layer.bias {
        Some(b) => b.val(),
        None => Tensor::zeros([d_out], &w.device()),
    };
    fn run<F: FusedBackend>((x, w, b): Parts<F>) -> Tensor<F, 2> {
        tensor(F::fused_linear(float(x), float(w), float(b)))
    }
    type Parts<F> = (Tensor<F, 2>, Tensor<F, 2>, Tensor<F, 1>);
    let parts = (x.reshape([rows, d_in]), w, b);
    let y = match on_parts::<_, Parts<Flex>, Tensor<B, 2>, _>(parts, run) {
        Ok(y) => y,
        Err(parts) => match on_parts::<_, Parts<Autodiff<Flex>>, Tensor<B, 2>, _>(parts, run) {
            Ok(y) => y,
            Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
        },
    };
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// Adaptive modulation `x · (1 + scale) + shift` of tokens `[B, F, N, D]` by per-frame
/// rows `[B, F, 1, D]` (adaLN and the DWS action module): one fused pass forward and
/// backward on Flex, where burn's broadcasting takes a slow strided path; burn's
/// operations elsewhere.
pub fn modulate<B: Backend>(
    x: Tensor<B, 4>,
    shift: Tensor<B, 4>,
    scale: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, f, n, d] = x.dims();
    let fused = path::<B>() == Path::Fused
        && is_float(&x)
        && shift.dims() == [b, f, 1, d]
        && scale.dims() == [b, f, 1, d];
    if !fused {
        return x * (scale + 1.0) + shift;
    }
    let g = b * f;
    let parts = (
        x.reshape([g, n, d]),
        shift.reshape([g, 1, d]),
        scale.reshape([g, 1, d]),
    );
    let out = match on3::<B, Flex>(parts, Flex::fused_modulate) {
        Ok(y) => y,
        Err(parts) => match on3::<B, Autodiff<Flex>>(parts, Autodiff::<Flex>::fused_modulate) {
            Ok(y) => y,
            Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
        },
    };
    out.reshape([b, f, n, d])
}

/// Rotary positions (RoPE, burn's `RotaryEncoding` convention: pairs `(x[2i], x[2i+1])`
/// turned by `p · θ^(-2i/d)`) of `x` `[B, L, H, d]` at positions `start..start + L`: one
/// fused pass forward and backward on Flex, burn's operations elsewhere.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, start: usize, theta: f32) -> Tensor<B, 4> {
    if path::<B>() == Path::Fused && is_float(&x) {
        let x = match on::<B, Flex, 4>(x, |p| Flex::fused_rotary(p, start, theta, false)) {
            Ok(y) => return y,
            Err(x) => x,
        };
        match on::<B, Autodiff<Flex>, 4>(x, |p| {
            Autodiff::<Flex>::fused_rotary(p, start, theta, false)
        }) {
            Ok(y) => y,
            Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
        }
    } else {
        rotary_reference(x, start, theta)
    }
}

/// [`rotary`] from burn's operations, on any backend.
pub fn rotary_reference<B: Backend>(x: Tensor<B, 4>, start: usize, theta: f32) -> Tensor<B, 4> {
    let [b, l, h, d] = x.dims();
    let half = d / 2;
    let device = x.device();
    let (mut cos, mut sin) = (Vec::with_capacity(l * half), Vec::with_capacity(l * half));
    for p in start..start + l {
        for i in 0..half {
            let freq = (theta as f64).powf(-2.0 * i as f64 / d as f64);
            let (s, c) = (p as f64 * freq).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    let table = |v: Vec<f32>| {
        Tensor::<B, 1>::from_data(TensorData::new(v, [l * half]), &device)
            .reshape([1, l, 1, half, 1])
    };
    let (cos, sin) = (table(cos), table(sin));
    let pairs = x.reshape([b, l, h, half, 2]);
    let (a, bb) = (pairs.clone().narrow(4, 0, 1), pairs.narrow(4, 1, 1));
    let even = a.clone() * cos.clone() - bb.clone() * sin.clone();
    let odd = a * sin + bb * cos;
    Tensor::cat(vec![even, odd], 4).reshape([b, l, h, d])
}

type Three<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>);

/// [`on`] for three tensors.
fn on3<B: Backend, F: FusedBackend>(
    parts: Three<B>,
    f: impl FnOnce(FloatTensor<F>, FloatTensor<F>, FloatTensor<F>) -> FloatTensor<F>,
) -> Result<Tensor<B, 3>, Three<B>> {
    on_parts::<_, Three<F>, _, Tensor<F, 3>>(parts, |(a, b, c)| {
        tensor(f(float(a), float(b), float(c)))
    })
}

/// 2-D convolution with stride 1, zero padding `[rows, cols]` and a bias: `x`
/// `[N, C, H, W]`, `weight` `[O, C, kh, kw]`, `bias` `[O]`. On Flex (and under autodiff)
/// one im2col + GEMM pass forward and backward ([`conv`]); burn's `conv2d` elsewhere.
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    padding: [usize; 2],
) -> Tensor<B, 4> {
    let [_, c, h, w] = x.dims();
    let [o, c2, kh, kw] = weight.dims();
    let fused = path::<B>() == Path::Fused
        && is_float(&x)
        && c == c2
        && bias.dims() == [o]
        && h + 2 * padding[0] >= kh
        && w + 2 * padding[1] >= kw;
    if !fused {
        return burn::tensor::module::conv2d(
            x,
            weight,
            Some(bias),
            burn::tensor::ops::ConvOptions::new([1, 1], padding, [1, 1], 1),
        );
    }
    let parts = (x, weight, bias);
    match on_conv::<B, Flex>(parts, |x, w, b| Flex::fused_conv2d(x, w, b, padding)) {
        Ok(y) => y,
        Err(parts) => match on_conv::<B, Autodiff<Flex>>(parts, |x, w, b| {
            Autodiff::<Flex>::fused_conv2d(x, w, b, padding)
        }) {
            Ok(y) => y,
            Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
        },
    }
}

type ConvParts<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 1>);

/// [`on`] for a convolution's input, weight and bias.
fn on_conv<B: Backend, F: FusedBackend>(
    parts: ConvParts<B>,
    f: impl FnOnce(FloatTensor<F>, FloatTensor<F>, FloatTensor<F>) -> FloatTensor<F>,
) -> Result<Tensor<B, 4>, ConvParts<B>> {
    on_parts::<_, ConvParts<F>, _, Tensor<F, 4>>(parts, |(x, w, b)| {
        tensor(f(float(x), float(w), float(b)))
    })
}

/// 2-D max pooling of `[N, C, H, W]` (no dilation, floor mode): one pass that keeps the
/// winners on Flex, burn's `max_pool2d` elsewhere or for shapes the kernel does not take.
pub fn max_pool2d<B: Backend>(
    x: Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<B, 4> {
    let args = PoolArgs {
        kernel,
        stride,
        padding,
    };
    let fused =
        path::<B>() == Path::Fused && is_float(&x) && pool_shape(x.dims(), args).supported();
    if !fused {
        return burn::tensor::module::max_pool2d(x, kernel, stride, padding, [1, 1], false);
    }
    match on::<B, Flex, 4>(x, |p| Flex::fused_max_pool2d(p, args)) {
        Ok(y) => y,
        Err(x) => {
            match on::<B, Autodiff<Flex>, 4>(x, |p| Autodiff::<Flex>::fused_max_pool2d(p, args)) {
                Ok(y) => y,
                Err(_) => unreachable!("the fused path runs on Flex or Autodiff<Flex> only"),
            }
        }
    }
}
