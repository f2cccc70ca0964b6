//! Media written for people: side-by-side GIFs.

use anyhow::{Context, Result};
use std::path::Path;

const SCALE: usize = 3;
const GAP: usize = 2;

/// One GIF: per frame, ground truth | prediction | absolute difference, upscaled.
/// `truth` and `pred` are `[T, H, W, C]` u8 with the same T.
pub fn write_side_by_side_gif(
    path: &Path,
    truth: &[u8],
    pred: &[u8],
    h: usize,
    w: usize,
    c: usize,
) -> Result<()> {
    let f = h * w * c;
    let frames = truth.len() / f;
    let (cw, ch) = (w * SCALE, h * SCALE);
    let width = 3 * cw + 2 * GAP;
    let height = ch;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = gif::Encoder::new(file, width as u16, height as u16, &[])?;
    enc.set_repeat(gif::Repeat::Infinite)?;
    for t in 0..frames {
        let gt = &truth[t * f..(t + 1) * f];
        let pr = &pred[t * f..(t + 1) * f];
        let mut rgb = vec![40u8; width * height * 3];
        for y in 0..ch {
            for x in 0..cw {
                let src = ((y / SCALE) * w + x / SCALE) * c;
                for k in 0..3 {
                    let (a, b) = (gt[src + k.min(c - 1)], pr[src + k.min(c - 1)]);
                    let row = y * width;
                    rgb[(row + x) * 3 + k] = a;
                    rgb[(row + cw + GAP + x) * 3 + k] = b;
                    rgb[(row + 2 * (cw + GAP) + x) * 3 + k] = a.abs_diff(b);
                }
            }
        }
        let mut frame = gif::Frame::from_rgb_speed(width as u16, height as u16, &rgb, 10);
        frame.delay = 25; // 4 frames per second
        enc.write_frame(&frame)?;
    }
    Ok(())
}
