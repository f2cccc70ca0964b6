//! Fused operations for dws models, fast on burn's CPU backend (`Flex`).
//!
//! burn's CPU backend runs transcendental functions as scalar code; these kernels
//! vectorise them ([`math`]) and fuse each function with its derivative. They follow
//! burn's backend-extension pattern: [`FusedBackend`] is implemented for `Flex` (the fast
//! kernels) and for `Autodiff<B>` over any `B: FusedBackend` (registering the backward
//! pass), so training uses them too.
//!
//! Model code never names a backend: it calls the generic functions ([`gelu`], [`silu`],
//! [`softmax`], ...) on `Tensor<B, D>` for any `B: Backend`. They take the fused path
//! when `B` is `Flex` or `Autodiff<Flex>` and burn's own operations on every other
//! backend (CUDA keeps burn's kernels).

pub mod math;

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
use std::any::Any;

/// A backend with the fused operations. Every method acts along the whole tensor
/// (element-wise) or its last dimension (softmax).
pub trait FusedBackend: Backend {
    fn fused_unary(op: Unary, x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad · op'(x)`.
    fn fused_unary_backward(
        op: Unary,
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Softmax (or log-softmax) along the last dimension.
    fn fused_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self>;
    /// The input gradient of [`FusedBackend::fused_softmax`] from its output `y`.
    fn fused_softmax_backward(
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        log: bool,
    ) -> FloatTensor<Self>;
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
        let mut out = vec![0f32; src.len()];
        math::forward(op, &mut out, src);
        flex_from(out, shape)
    }

    fn fused_unary_backward(op: Unary, x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let ((cx, shape), (cg, _)) = (flex_f32(&x), flex_f32(&grad));
        let xs = cx.as_slice::<f32>().expect("contiguous f32");
        let gs = cg.as_slice::<f32>().expect("contiguous f32");
        let mut out = vec![0f32; xs.len()];
        math::backward(op, &mut out, xs, gs);
        flex_from(out, shape)
    }

    fn fused_softmax(x: FlexTensor, log: bool) -> FlexTensor {
        let (c, shape) = flex_f32(&x);
        let n = *shape.as_slice().last().expect("a tensor with dimensions");
        let src = c.as_slice::<f32>().expect("contiguous f32");
        let mut out = vec![0f32; src.len()];
        if n > 0 {
            math::softmax(&mut out, src, n, log);
        }
        flex_from(out, shape)
    }

    fn fused_softmax_backward(y: FlexTensor, grad: FlexTensor, log: bool) -> FlexTensor {
        let ((cy, shape), (cg, _)) = (flex_f32(&y), flex_f32(&grad));
        let n = *shape.as_slice().last().expect("a tensor with dimensions");
        let ys = cy.as_slice::<f32>().expect("contiguous f32");
        let gs = cg.as_slice::<f32>().expect("contiguous f32");
        let mut out = vec![0f32; ys.len()];
        if n > 0 {
            math::softmax_backward(&mut out, ys, gs, n, log);
        }
        flex_from(out, shape)
    }
}

#[derive(Debug)]
struct UnaryBackward(Unary);

impl<B: FusedBackend> Backward<B, 1> for UnaryBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let x = ops.state;
        let op = self.0;
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_unary_backward(op, x, grad)
        });
    }
}

#[derive(Debug)]
struct SoftmaxBackward(bool);

impl<B: FusedBackend> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let y = ops.state;
        let log = self.0;
        ad_unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_softmax_backward(y, grad, log)
        });
    }
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn fused_unary(op: Unary, x: FloatTensor<Self>) -> FloatTensor<Self> {
        match UnaryBackward(op)
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_unary(op, x.primitive.clone());
                prep.finish(x.primitive, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_unary(op, x.primitive)),
        }
    }

    fn fused_unary_backward(
        _op: Unary,
        _x: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unimplemented!("second derivatives of the fused operations are not supported")
    }

    fn fused_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self> {
        match SoftmaxBackward(log)
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::fused_softmax(x.primitive, log);
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_softmax(x.primitive, log)),
        }
    }

    fn fused_softmax_backward(
        _y: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
        _log: bool,
    ) -> FloatTensor<Self> {
        unimplemented!("second derivatives of the fused operations are not supported")
    }
}

/// Runs `f` on `x` as a `Tensor<F, D>` when `B` is `F`; gives `x` back otherwise.
fn on<B: Backend, F: FusedBackend, const D: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(FloatTensor<F>) -> FloatTensor<F>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let any: Box<dyn Any> = Box::new(x);
    match any.downcast::<Tensor<F, D>>() {
        Ok(t) => {
            let y = Tensor::<F, D>::from_primitive(TensorPrimitive::Float(f(t
                .into_primitive()
                .tensor())));
            let back: Box<dyn Any> = Box::new(y);
            Ok(*back
                .downcast::<Tensor<B, D>>()
                .expect("B is F, so their tensors are one type"))
        }
        Err(any) => Err(*any
            .downcast::<Tensor<B, D>>()
            .expect("the box holds the tensor it was given")),
    }
}

/// Which path [`unary`] and [`softmax`] take on backend `B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The vectorised kernels.
    Fused,
    /// burn's own operations.
    Reference,
}

/// The path taken on backend `B`.
pub fn path<B: Backend>() -> Path {
    use std::any::TypeId;
    let b = TypeId::of::<B>();
    if b == TypeId::of::<Flex>() || b == TypeId::of::<Autodiff<Flex>>() {
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
    if !is_float(&x) || D == 0 {
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
    if !is_float(&x) || D == 0 {
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
