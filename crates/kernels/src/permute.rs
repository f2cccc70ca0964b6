//! Axis permutation into a new contiguous buffer: output row by output row (rows of the
//! last output axis), split over threads, each task walking its rows with an odometer
//! (no division per element), rows whose input is contiguous copied whole. burn's CPU
//! backend makes a permuted view contiguous one element at a time through a generic
//! strided iterator on one thread.

use rayon::prelude::*;

/// Output rows per parallel task.
const ROWS: usize = 256;

/// `src` (row-major, `shape`) with its axes permuted: output axis `i` is input axis
/// `axes[i]`. Returns the output, row-major in the permuted shape.
pub fn permute(src: &[f32], shape: &[usize], axes: &[usize]) -> Vec<f32> {
    let n = shape.len();
    assert_eq!(axes.len(), n, "permute: {n} axes needed");
    let mut seen = vec![false; n];
    for &a in axes {
        assert!(a < n && !seen[a], "permute: {axes:?} is not a permutation");
        seen[a] = true;
    }
    let total: usize = shape.iter().product();
    assert_eq!(
        src.len(),
        total,
        "permute: {} values for {shape:?}",
        src.len()
    );
    let mut out = vec![0f32; total];
    if total == 0 {
        return out;
    }
    if n <= 1 {
        out.copy_from_slice(src);
        return out;
    }
    // Row-major strides of the input, read in output order.
    let mut in_strides = vec![1usize; n];
    for d in (0..n - 1).rev() {
        in_strides[d] = in_strides[d + 1] * shape[d + 1];
    }
    let dims: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let strides: Vec<usize> = axes.iter().map(|&a| in_strides[a]).collect();
    let (last, step) = (dims[n - 1], strides[n - 1]);
    out.par_chunks_mut(ROWS * last)
        .enumerate()
        .for_each(|(t, chunk)| {
            // The multi-index of this task's first row over the output axes 0..n-1.
            let mut idx = vec![0usize; n - 1];
            let mut r = t * ROWS;
            for d in (0..n - 1).rev() {
                idx[d] = r % dims[d];
                r /= dims[d];
            }
            let mut base: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
            for row in chunk.chunks_exact_mut(last) {
                if step == 1 {
                    row.copy_from_slice(&src[base..base + last]);
                } else {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = src[base + j * step];
                    }
                }
                // The next row: the odometer over axes n-2, n-3, ...
                let mut d = n - 2;
                loop {
                    idx[d] += 1;
                    base += strides[d];
                    if idx[d] < dims[d] {
                        break;
                    }
                    base -= strides[d] * dims[d];
                    idx[d] = 0;
                    if d == 0 {
                        break;
                    }
                    d -= 1;
                }
            }
        });
    out
}

/// The permutation that undoes `axes`.
pub fn inverse(axes: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; axes.len()];
    for (i, &a) in axes.iter().enumerate() {
        inv[a] = i;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_matches_the_definition_and_inverse_undoes_it() {
        // More rows than one task takes, so tasks start mid-odometer.
        let shape = [6, 7, 5, 4, 3];
        let total: usize = shape.iter().product();
        let src: Vec<f32> = (0..total).map(|i| i as f32).collect();
        for axes in [
            [0, 1, 2, 3, 4],
            [4, 3, 2, 1, 0],
            [0, 2, 4, 1, 3],
            [1, 0, 2, 4, 3],
        ] {
            let out = permute(&src, &shape, &axes);
            let dims: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
            // Every output element against its input index, computed directly.
            for (o, &v) in out.iter().enumerate() {
                let mut rest = o;
                let mut idx = [0usize; 5];
                for d in (0..5).rev() {
                    idx[d] = rest % dims[d];
                    rest /= dims[d];
                }
                let mut in_idx = [0usize; 5];
                for d in 0..5 {
                    in_idx[axes[d]] = idx[d];
                }
                let flat = in_idx
                    .iter()
                    .zip(&shape)
                    .fold(0, |acc, (&i, &s)| acc * s + i);
                assert_eq!(v, flat as f32, "axes {axes:?}, output {o}");
            }
            let back = permute(&out, &dims, &inverse(&axes));
            assert_eq!(back, src, "axes {axes:?}: the inverse does not undo it");
        }
    }
}
