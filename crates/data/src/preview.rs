//! Preview grids: a PNG of frames, one row per episode, evenly spaced over its length.

use crate::{io_err, DataError, Dataset, Result};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct PreviewOptions {
    /// Rows (episodes) per dataset.
    pub episodes: usize,
    /// Columns (frames) per row.
    pub frames: usize,
    /// Nearest-neighbour upscaling factor.
    pub scale: usize,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        Self {
            episodes: 4,
            frames: 8,
            scale: 2,
        }
    }
}

const GAP: usize = 2;
const GAP_COLOUR: [u8; 3] = [32, 32, 32];

/// Builds an RGB image (width, height, pixels) from the first episodes of each dataset.
/// All datasets must share a frame shape.
pub fn preview_grid(
    datasets: &[Dataset],
    opts: &PreviewOptions,
) -> Result<(usize, usize, Vec<u8>)> {
    let first = datasets
        .first()
        .ok_or_else(|| DataError::Invalid("no dataset to preview".into()))?;
    let [fh, fw, _] = first.header().frame_shape;
    if let Some(d) = datasets
        .iter()
        .find(|d| d.header().frame_shape != first.header().frame_shape)
    {
        return Err(DataError::Invalid(format!(
            "{} has frames of shape {:?}, {} of {:?}: preview them separately",
            d.dir().display(),
            d.header().frame_shape,
            first.dir().display(),
            first.header().frame_shape
        )));
    }
    let mut rows = Vec::new();
    for d in datasets {
        for i in 0..d.len().min(opts.episodes.max(1)) {
            rows.push(d.read_episode(i)?);
        }
    }
    if rows.is_empty() {
        return Err(DataError::Invalid("the datasets hold no episodes".into()));
    }
    let (cols, s) = (opts.frames.max(1), opts.scale.max(1));
    let (cell_w, cell_h) = (fw * s, fh * s);
    let width = cols * cell_w + (cols + 1) * GAP;
    let height = rows.len() * cell_h + (rows.len() + 1) * GAP;
    let mut img: Vec<u8> = GAP_COLOUR
        .iter()
        .copied()
        .cycle()
        .take(width * height * 3)
        .collect();
    for (r, ep) in rows.iter().enumerate() {
        let n = ep.num_frames();
        for c in 0..cols {
            // Evenly spaced, first and last frame included.
            let t = if cols == 1 {
                0
            } else {
                c * (n - 1) / (cols - 1)
            };
            let frame = ep.frame(t);
            let (x0, y0) = (GAP + c * (cell_w + GAP), GAP + r * (cell_h + GAP));
            for y in 0..cell_h {
                for x in 0..cell_w {
                    let src = ((y / s) * fw + x / s) * 3;
                    let dst = ((y0 + y) * width + x0 + x) * 3;
                    img[dst..dst + 3].copy_from_slice(&frame[src..src + 3]);
                }
            }
        }
    }
    Ok((width, height, img))
}

/// Writes an RGB8 PNG.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(io_err("creating", path))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| DataError::Io {
        action: "writing PNG",
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let mut w = enc.write_header().map_err(png_err)?;
    w.write_image_data(rgb).map_err(png_err)?;
    w.finish().map_err(png_err)?;
    Ok(())
}
