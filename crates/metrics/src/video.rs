//! Sets of u8 video clips, checked, through the networks: the entry point for scoring
//! videos that come from anywhere (`dws eval`, and files a user brings).

use crate::fvd::frechet_distance;
use crate::i3d::{I3d, FEATURES, MIN_FRAMES};
use crate::{MetricsError, Result};
use burn::prelude::*;

/// Clips per I3D forward pass (memory stays near 1 GB at 16 frames).
pub const I3D_BATCH: usize = 4;

/// One clip: `[frames, height, width, 3]` u8, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Clip<'a> {
    pub data: &'a [u8],
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl<'a> Clip<'a> {
    /// Checks that `data` holds `frames × height × width × 3` values.
    pub fn new(data: &'a [u8], frames: usize, height: usize, width: usize) -> Result<Self> {
        let want = frames * height * width * 3;
        if frames == 0 || height == 0 || width == 0 || data.len() != want {
            return Err(MetricsError::Input(format!(
                "a clip of {frames} RGB frames of {height}×{width} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Self {
            data,
            frames,
            height,
            width,
        })
    }
}

/// A contiguous `[clips, frames, height, width, 3]` buffer as clips.
pub fn split_clips(
    data: &[u8],
    frames: usize,
    height: usize,
    width: usize,
) -> Result<Vec<Clip<'_>>> {
    let per = frames * height * width * 3;
    if per == 0 || !data.len().is_multiple_of(per) {
        return Err(MetricsError::Input(format!(
            "{} bytes are not whole clips of {frames} RGB frames of {height}×{width}",
            data.len()
        )));
    }
    data.chunks(per)
        .map(|c| Clip::new(c, frames, height, width))
        .collect()
}

/// Checks that a set is non-empty and all its clips share one length and frame size;
/// returns that `(frames, height, width)`.
pub fn common_shape(name: &str, clips: &[Clip]) -> Result<(usize, usize, usize)> {
    let first = clips
        .first()
        .ok_or_else(|| MetricsError::Input(format!("the {name} set has no clips")))?;
    let shape = (first.frames, first.height, first.width);
    for (i, c) in clips.iter().enumerate() {
        if (c.frames, c.height, c.width) != shape {
            return Err(MetricsError::Input(format!(
                "{name} clip {i} has {} frames of {}×{}, clip 0 has {} frames of {}×{}: clips of one set must match",
                c.frames, c.height, c.width, shape.0, shape.1, shape.2
            )));
        }
    }
    Ok(shape)
}

/// I3D features (FVD's) of a set of clips, as `f64` rows of width 400. `progress` is
/// called with the number of clips done after each batch.
pub fn i3d_features<B: Backend>(
    net: &I3d<B>,
    name: &str,
    clips: &[Clip],
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let (t, h, w) = common_shape(name, clips)?;
    if t < MIN_FRAMES {
        return Err(MetricsError::Input(format!(
            "FVD needs clips of at least {MIN_FRAMES} frames; the {name} clips have {t}"
        )));
    }
    let mut out = Vec::with_capacity(clips.len() * FEATURES);
    for chunk in clips.chunks(I3D_BATCH) {
        let n = chunk.len();
        let v: Vec<f32> = chunk
            .iter()
            .flat_map(|c| c.data.iter().map(|&x| x as f32 / 255.0))
            .collect();
        let x = Tensor::<B, 5>::from_data(TensorData::new(v, [n, t, h, w, 3]), device)
            .permute([0, 1, 4, 2, 3]);
        let f = net.video_features(x)?;
        out.extend(
            f.into_data()
                .to_vec::<f32>()
                .expect("float features")
                .into_iter()
                .map(f64::from),
        );
        progress(n);
    }
    Ok(out)
}

/// FVD between two sets of clips (each at least 2 clips of at least 9 frames; the sets
/// may differ in size, frame size and length).
pub fn fvd<B: Backend>(net: &I3d<B>, a: &[Clip], b: &[Clip], device: &B::Device) -> Result<f64> {
    for (name, set) in [("first", a), ("second", b)] {
        if set.len() < 2 {
            return Err(MetricsError::Input(format!(
                "FVD needs at least two clips per set; the {name} set has {}",
                set.len()
            )));
        }
    }
    let fa = i3d_features(net, "first", a, device, |_| {})?;
    let fb = i3d_features(net, "second", b, device, |_| {})?;
    frechet_distance(&fa, &fb, FEATURES)
}
