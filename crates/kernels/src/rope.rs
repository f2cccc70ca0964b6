//! Rotary positions (RoPE) on f32 slices: in `x` `[B, L, H, d]` the pairs
//! `(x[2i], x[2i+1])` of the token at position `p = start + l` turn by the angle
//! `p · θ^(-2i/d)` (burn's `RotaryEncoding` convention). The backward is the turn back.

use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sizes of one rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeShape {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    /// Head width (even).
    pub dim: usize,
    /// Position of the first token.
    pub start: usize,
    pub theta: f32,
}

/// `(cos, sin)` `[len, dim / 2]` of positions `start..start + len`.
type Table = Arc<(Vec<f32>, Vec<f32>)>;

/// Tables by (start, len, dim, theta's bits).
type Tables = HashMap<(usize, usize, usize, u32), Table>;

fn table(s: &RopeShape) -> Table {
    static CACHE: Mutex<Option<Tables>> = Mutex::new(None);
    let key = (s.start, s.len, s.dim, s.theta.to_bits());
    let mut guard = CACHE.lock().expect("rope table cache");
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(t) = map.get(&key) {
        return t.clone();
    }
    let half = s.dim / 2;
    let mut cos = Vec::with_capacity(s.len * half);
    let mut sin = Vec::with_capacity(s.len * half);
    for l in 0..s.len {
        let p = (s.start + l) as f64;
        for i in 0..half {
            let freq = (s.theta as f64).powf(-2.0 * i as f64 / s.dim as f64);
            let (sn, cs) = (p * freq).sin_cos();
            cos.push(cs as f32);
            sin.push(sn as f32);
        }
    }
    let t: Table = Arc::new((cos, sin));
    if map.len() > 256 {
        map.clear();
    }
    map.insert(key, t.clone());
    t
}

/// `x` turned by its positions' angles (`inverse`: turned back, the backward pass).
pub fn rotate(s: RopeShape, x: &[f32], inverse: bool) -> Vec<f32> {
    assert!(
        s.dim.is_multiple_of(2),
        "rotary positions need an even head width"
    );
    assert_eq!(
        x.len(),
        s.batch * s.len * s.heads * s.dim,
        "x is not [B, L, H, d]"
    );
    let t = table(&s);
    let (cos, sin) = (&t.0, &t.1);
    let half = s.dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let row = s.heads * s.dim;
    let mut out = vec![0f32; x.len()];
    if row == 0 {
        return out;
    }
    out.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .for_each(|(r, (o, xr))| {
            let l = r % s.len;
            let (c, sn) = (
                &cos[l * half..(l + 1) * half],
                &sin[l * half..(l + 1) * half],
            );
            for (oh, xh) in o.chunks_exact_mut(s.dim).zip(xr.chunks_exact(s.dim)) {
                for i in 0..half {
                    let (a, b) = (xh[2 * i], xh[2 * i + 1]);
                    let (ci, si) = (c[i], sign * sn[i]);
                    oh[2 * i] = a * ci - b * si;
                    oh[2 * i + 1] = a * si + b * ci;
                }
            }
        });
    out
}
