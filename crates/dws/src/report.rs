//! Media written for people: side-by-side GIFs and PNG filmstrips of predictions.

use anyhow::{Context, Result};
use std::path::Path;

const SCALE: usize = 3;
const GAP: usize = 2;
const BACKGROUND: u8 = 40;

/// One rollout to show: ground truth and prediction, `[T, H, W, C]` u8 each, same T.
pub struct Pair<'a> {
    pub truth: &'a [u8],
    pub pred: &'a [u8],
}

fn create(path: &Path) -> Result<std::fs::File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Draws an `[H, W, C]` frame whose value at index `i` is `f(i)` into the RGB canvas at
/// (x0, y0), upscaled by `scale`.
fn blit(
    canvas: &mut [u8],
    canvas_w: usize,
    (h, w, c): (usize, usize, usize),
    (x0, y0): (usize, usize),
    scale: usize,
    f: impl Fn(usize) -> u8,
) {
    for y in 0..h * scale {
        for x in 0..w * scale {
            let s = ((y / scale) * w + x / scale) * c;
            let d = ((y0 + y) * canvas_w + x0 + x) * 3;
            for k in 0..3 {
                canvas[d + k] = f(s + k.min(c - 1));
            }
        }
    }
}

/// One GIF with a row per rollout: ground truth | prediction | absolute difference,
/// upscaled, 4 frames per second.
pub fn write_side_by_side_gif(
    path: &Path,
    rows: &[Pair<'_>],
    h: usize,
    w: usize,
    c: usize,
) -> Result<()> {
    anyhow::ensure!(
        !rows.is_empty(),
        "no rollouts to draw into {}",
        path.display()
    );
    let f = h * w * c;
    let frames = rows[0].truth.len() / f;
    let (cw, ch) = (w * SCALE, h * SCALE);
    let width = 3 * cw + 2 * GAP;
    let height = rows.len() * (ch + GAP) - GAP;
    let mut enc = gif::Encoder::new(create(path)?, width as u16, height as u16, &[])?;
    enc.set_repeat(gif::Repeat::Infinite)?;
    for t in 0..frames {
        let mut rgb = vec![BACKGROUND; width * height * 3];
        for (r, pair) in rows.iter().enumerate() {
            let gt = &pair.truth[t * f..(t + 1) * f];
            let pr = &pair.pred[t * f..(t + 1) * f];
            let y0 = r * (ch + GAP);
            let dims = (h, w, c);
            blit(&mut rgb, width, dims, (0, y0), SCALE, |i| gt[i]);
            blit(&mut rgb, width, dims, (cw + GAP, y0), SCALE, |i| pr[i]);
            blit(&mut rgb, width, dims, (2 * (cw + GAP), y0), SCALE, |i| {
                gt[i].abs_diff(pr[i])
            });
        }
        let mut frame = gif::Frame::from_rgb_speed(width as u16, height as u16, &rgb, 10);
        frame.delay = 25;
        enc.write_frame(&frame)?;
    }
    Ok(())
}

/// A still of the same rollouts: per rollout, a row of ground-truth frames over a row of
/// predicted frames, time left to right, at twice the size.
pub fn write_filmstrip_png(
    path: &Path,
    rows: &[Pair<'_>],
    h: usize,
    w: usize,
    c: usize,
) -> Result<()> {
    const S: usize = 2;
    anyhow::ensure!(
        !rows.is_empty(),
        "no rollouts to draw into {}",
        path.display()
    );
    let f = h * w * c;
    let frames = rows[0].truth.len() / f;
    let (cw, ch) = (w * S, h * S);
    let width = frames * (cw + GAP) - GAP;
    let height = rows.len() * (2 * ch + 3 * GAP) - 2 * GAP;
    let mut rgb = vec![BACKGROUND; width * height * 3];
    for (r, pair) in rows.iter().enumerate() {
        let y0 = r * (2 * ch + 3 * GAP);
        for t in 0..frames {
            let gt = &pair.truth[t * f..(t + 1) * f];
            let pr = &pair.pred[t * f..(t + 1) * f];
            let x0 = t * (cw + GAP);
            blit(&mut rgb, width, (h, w, c), (x0, y0), S, |i| gt[i]);
            blit(&mut rgb, width, (h, w, c), (x0, y0 + ch + GAP), S, |i| {
                pr[i]
            });
        }
    }
    dws_data::write_png(path, width, height, &rgb)?;
    Ok(())
}
