//! The Fréchet distance between two sets of features (FVD when the features are I3D
//! logits of videos): `‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½`, in `f64`.
//!
//! With few samples the covariances are singular, and a general matrix square root of
//! `Σ₁ Σ₂` is numerically fragile. `tr (Σ₁ Σ₂)^½` equals `tr (Σ₁^½ Σ₂ Σ₁^½)^½`, a symmetric
//! positive semi-definite matrix, so both roots come from symmetric eigendecompositions, with
//! eigenvalues at round-off level treated as zero.

use crate::{MetricsError, Result};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and (unbiased, `n − 1`) covariance of `n` feature rows of width `d`.
pub fn moments(features: &[f64], d: usize) -> Result<(DVector<f64>, DMatrix<f64>)> {
    if d == 0 || !features.len().is_multiple_of(d) {
        return Err(MetricsError::Input(format!(
            "{} feature values are not rows of width {d}",
            features.len()
        )));
    }
    let n = features.len() / d;
    if n < 2 {
        return Err(MetricsError::Input(format!(
            "the Fréchet distance needs at least two clips per side, got {n}"
        )));
    }
    let x = DMatrix::from_row_slice(n, d, features);
    let mu = x.row_mean().transpose();
    let mut centred = x;
    for mut row in centred.row_iter_mut() {
        row -= mu.transpose();
    }
    let cov = centred.transpose() * &centred / (n as f64 - 1.0);
    Ok((mu, cov))
}

/// Square roots of eigenvalues, with those at round-off level (below `n · ε · λ_max`,
/// which a rank-deficient covariance has plenty of) set to zero rather than to `√ε`-sized
/// noise.
fn eigen_roots(values: &DVector<f64>) -> DVector<f64> {
    let max = values.iter().cloned().fold(0.0, f64::max);
    let floor = max * values.len() as f64 * f64::EPSILON;
    values.map(|v| if v > floor { v.sqrt() } else { 0.0 })
}

fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (m + m.transpose()) * 0.5;
    let e = SymmetricEigen::new(sym);
    let roots = eigen_roots(&e.eigenvalues);
    &e.eigenvectors * DMatrix::from_diagonal(&roots) * e.eigenvectors.transpose()
}

/// The Fréchet distance between Gaussians fitted to two feature sets (rows of width `d`).
pub fn frechet_distance(a: &[f64], b: &[f64], d: usize) -> Result<f64> {
    let (mu1, s1) = moments(a, d)?;
    let (mu2, s2) = moments(b, d)?;
    let r1 = sqrt_psd(&s1);
    let inner = &r1 * &s2 * &r1;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_root: f64 = eigen_roots(&SymmetricEigen::new(inner).eigenvalues).sum();
    let diff = mu1 - mu2;
    Ok(diff.dot(&diff) + s1.trace() + s2.trace() - 2.0 * tr_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_against_itself_is_zero_and_shifts_add_their_square() {
        let a: Vec<f64> = (0..5 * 3)
            .map(|i| ((i * 7919) % 13) as f64 / 13.0)
            .collect();
        let d = frechet_distance(&a, &a, 3).unwrap();
        assert!(d.abs() < 1e-9, "{d}");
        let b: Vec<f64> = a.iter().map(|v| v + 2.0).collect();
        // Same covariance, means 2 apart in each of 3 dimensions: 3 · 2² = 12.
        assert!((frechet_distance(&a, &b, 3).unwrap() - 12.0).abs() < 1e-9);
    }

    #[test]
    fn one_clip_is_refused() {
        let e = frechet_distance(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 2).unwrap_err();
        assert!(e.to_string().contains("at least two clips"), "{e}");
    }
}
