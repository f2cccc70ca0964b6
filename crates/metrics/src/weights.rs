//! Reading the reference implementations' pickled weights into burn tensors.

use crate::pickle::{load_arrays, Array};
use crate::{MetricsError, Result};
use burn::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

pub(crate) fn load_pickle(path: &Path) -> Result<BTreeMap<String, Array>> {
    let bytes = std::fs::read(path).map_err(|e| MetricsError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    load_arrays(&bytes).map_err(|detail| MetricsError::Weights {
        path: path.to_path_buf(),
        detail,
    })
}

/// Removes `key` from the map, or says which weight the file lacks.
pub(crate) fn take(m: &mut BTreeMap<String, Array>, path: &Path, key: &str) -> Result<Array> {
    m.remove(key).ok_or_else(|| MetricsError::Weights {
        path: path.to_path_buf(),
        detail: format!("missing `{key}`"),
    })
}

/// A flax 2-D kernel `[kh, kw, in, out]` as burn's `[out, in, kh, kw]`.
pub(crate) fn conv2d_weight<B: Backend>(a: Array, device: &B::Device) -> Tensor<B, 4> {
    let s: [usize; 4] = a.shape.clone().try_into().expect("4-D kernel");
    Tensor::<B, 4>::from_data(TensorData::new(a.data, s), device).permute([3, 2, 0, 1])
}

/// A flax 3-D kernel `[kt, kh, kw, in, out]` as burn's `[out, in, kt, kh, kw]`.
pub(crate) fn conv3d_weight<B: Backend>(a: Array, device: &B::Device) -> Tensor<B, 5> {
    let s: [usize; 5] = a.shape.clone().try_into().expect("5-D kernel");
    Tensor::<B, 5>::from_data(TensorData::new(a.data, s), device).permute([4, 3, 0, 1, 2])
}
