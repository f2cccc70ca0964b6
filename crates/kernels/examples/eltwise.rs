//! One-thread timings of the element-wise kernels and the softmax at the shapes of
//! `dws bench ops`, written into a buffer, into a new one, and on a slice that stays in
//! cache (the same work, so compute-bound code shows the same time in all three):
//!
//!     RAYON_NUM_THREADS=1 taskset -c 1 cargo run --release -p dws-kernels --example eltwise
//!
//! Compare with `scripts/bench_ops_torch.py --threads 1 --quick` pinned the same way.
use dws_kernels::math::{self, Unary};
use std::time::Instant;

fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut t = Vec::new();
    for _ in 0..30 {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn main() {
    let n = 8 * 256 * 768;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * 6.0)
        .collect();
    let small: Vec<f32> = x[..16384].to_vec();
    for op in [
        Unary::Exp,
        Unary::Erf,
        Unary::Tanh,
        Unary::Sigmoid,
        Unary::Silu,
        Unary::Gelu,
        Unary::GeluTanh,
    ] {
        let mut out = vec![0f32; n];
        let big = time(|| math::forward(op, &mut out, &x));
        let mut out_s = vec![0f32; small.len()];
        let reps = n / small.len();
        let hot = time(|| {
            for _ in 0..reps {
                math::forward(op, &mut out_s, &small);
            }
        });
        let alloc = time(|| {
            let v = math::fill_new(n, |d| math::forward_into(op, d, &x));
            std::hint::black_box(v);
        });
        println!(
            "{:>10}: {big:.3} ms into a buffer, {alloc:.3} ms new buffer, {hot:.3} ms in cache",
            op.name()
        );
    }
    let rows = 8 * 6 * 256;
    let s: Vec<f32> = (0..rows * 256)
        .map(|i| ((i * 31 % 1009) as f32) / 100.0)
        .collect();
    let mut o = vec![0f32; s.len()];
    let t = time(|| math::softmax(&mut o, &s, 256, false));
    println!("softmax [8,6,256,256]: {t:.3} ms");
}
